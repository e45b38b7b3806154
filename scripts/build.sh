#!/usr/bin/env bash
# Installs the dependencies (scripts/setup.sh) and builds the Release binary build/dsinfer with
# gcc, plus the tiny demo checkpoint build/demo-model/. Extra arguments go to cmake's configure
# step, e.g. `bash scripts/build.sh -DDSINFER_WERROR=ON`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

section "setup: packages and tokenizer"
bash "$ROOT/scripts/setup.sh"

section "Release build (gcc) -> build/"
configure build gcc -DCMAKE_BUILD_TYPE=Release "$@"
build build
echo
echo "built: $ROOT/build/dsinfer"
