#!/usr/bin/env bash
# THE test command (README, .ci/run). Stages:
#   1. setup (packages, tokenizer)
#   2. Release build with gcc, warnings as errors -> build/,      all tests (ctest)
#   3. build with clang, warnings as errors       -> build-clang/, build only
#   4. ASan + UBSan build with clang              -> build-asan/,  unit tests (ctest)
#      then a ThreadSanitizer build               -> build-tsan/,  the multi-threaded tests
#      then an aarch64 cross build (gcc)          -> build-aarch64/, test_kernels under qemu
#   5. libFuzzer build with clang                 -> build-fuzz/,  each fuzz_* target for
#      DSINFER_FUZZ_SECONDS (default 30) seconds from its seed corpus tests/fuzz/corpus/<name>/
# Any failure fails the script.
#
# Environment:
#   DSINFER_FUZZ_SECONDS      seconds per fuzz target (0: only replay the seed corpus)
#   DSINFER_ASAN_CTEST_EXCLUDE  ctest -E regex of tests to skip under ASan (default: none)
#   DSINFER_JOBS              build/test parallelism (default: nproc)
#   DSINFER_FIXTURES          golden fixtures directory (default: ../shared/fixtures)
#   CI=true                   missing fixtures fail the tests instead of skipping them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

FUZZ_SECONDS="${DSINFER_FUZZ_SECONDS:-30}"
ASAN_EXCLUDE="${DSINFER_ASAN_CTEST_EXCLUDE:-}"
case "$FUZZ_SECONDS" in
  '' | *[!0-9]*)
    echo "error: DSINFER_FUZZ_SECONDS must be a whole number of seconds, got '$FUZZ_SECONDS'" >&2
    exit 2
    ;;
esac
T0=$SECONDS
stage_times=()
stage_done() { stage_times+=("$(printf '%-34s %4ds' "$1" $((SECONDS - $2)))"); }

section "1/5 setup: packages and tokenizer"
t=$SECONDS
bash "$ROOT/scripts/setup.sh"
stage_done "setup" "$t"

section "2/5 Release build (gcc, -Werror) -> build/ + ctest"
t=$SECONDS
configure build gcc -DCMAKE_BUILD_TYPE=Release -DDSINFER_WERROR=ON
build build
ctest --test-dir build --output-on-failure --no-tests=error -j "$JOBS"
stage_done "gcc Release build + tests" "$t"

section "3/5 clang build (-Werror) -> build-clang/ (build only)"
t=$SECONDS
configure build-clang clang -DCMAKE_BUILD_TYPE=Release -DDSINFER_WERROR=ON
build build-clang
stage_done "clang build" "$t"

section "4/5 ASan+UBSan build (clang) -> build-asan/ + ctest"
t=$SECONDS
configure build-asan clang -DCMAKE_BUILD_TYPE=Release -DDSINFER_SANITIZE=ON -DDSINFER_WERROR=ON
build build-asan
asan_args=(--test-dir build-asan --output-on-failure --no-tests=error -j "$JOBS")
if [ -n "$ASAN_EXCLUDE" ]; then
  echo "excluding under ASan: $ASAN_EXCLUDE"
  asan_args+=(-E "$ASAN_EXCLUDE")
fi
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1}" \
  UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
  ctest "${asan_args[@]}"
stage_done "ASan+UBSan build + tests" "$t"

section "4b/5 ThreadSanitizer build (clang) -> build-tsan/ + the multi-threaded tests"
t=$SECONDS
configure build-tsan clang -DCMAKE_BUILD_TYPE=Release -DDSINFER_TSAN=ON -DDSINFER_WERROR=ON
# test_server_hostile runs the TSan-built `dsinfer serve` (HTTP threads + engine) under a storm
build build-tsan --target test_pool test_kernels test_forward test_batch test_engine dsinfer \
  test_server_hostile
TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1}" \
  ctest --test-dir build-tsan --output-on-failure --no-tests=error \
  -R '^(test_pool|test_kernels|test_forward|test_batch|test_engine|test_server_hostile)$'
stage_done "TSan build + threaded tests" "$t"

section "4c/5 aarch64 cross build (gcc) -> build-aarch64/ + test_kernels under qemu-aarch64"
# The NEON table cannot run on an x86 CI machine, so the kernels test (it needs only src/core and
# src/kernels: no jansson / pcre2) is cross-compiled with Debian's gcc-aarch64-linux-gnu, the NEON
# file with its own -march flags as in CMakeLists.txt, and run under user-mode qemu (its default
# CPU has the dot-product extension). DS_ISA children cover scalar and neon.
t=$SECONDS
ACC=aarch64-linux-gnu-gcc
AOUT=build-aarch64
ACFLAGS=(-std=c11 -D_GNU_SOURCE -O2 -g -Wall -Wextra -Werror -Isrc -Itests)
mkdir -p "$AOUT"
"$ACC" "${ACFLAGS[@]}" -march=armv8.2-a+dotprod+fp16 -c src/kernels/kernels_neon.c \
  -o "$AOUT/kernels_neon.o"
mapfile -t asrcs < <(ls src/core/*.c src/kernels/*.c tests/testutil.c tests/kernels/test_kernels.c |
  grep -v -E '_(avx2|avx512|neon)\.c$')
"$ACC" "${ACFLAGS[@]}" -DDSINFER_FIXTURES_DEFAULT='"none"' -DDSINFER_SOURCE_DIR="\"$ROOT\"" \
  -DDSINFER_BIN='"none"' -o "$AOUT/test_kernels" "${asrcs[@]}" "$AOUT/kernels_neon.o" -lpthread -lm
timeout 300 qemu-aarch64 -L /usr/aarch64-linux-gnu "$AOUT/test_kernels"
stage_done "aarch64 cross build + qemu kernels" "$t"

section "5/5 fuzz build (clang libFuzzer) -> build-fuzz/, ${FUZZ_SECONDS}s per target"
t=$SECONDS
configure build-fuzz clang -DCMAKE_BUILD_TYPE=Release -DDSINFER_FUZZ=ON -DDSINFER_WERROR=ON
build build-fuzz --target fuzzers
fuzzers=()
for src in tests/fuzz/fuzz_*.c; do
  [ -e "$src" ] || continue
  fuzzers+=("$(basename "$src" .c)")
done
if [ "${#fuzzers[@]}" -eq 0 ]; then
  echo "error: no fuzz targets in tests/fuzz/" >&2
  exit 1
fi
failed=()
for name in "${fuzzers[@]}"; do
  bin="build-fuzz/$name"
  work="build-fuzz/fuzz-work/$name"   # new inputs land here, never in the committed seeds
  mkdir -p "$work/corpus" "$work/artifacts"
  args=(-timeout=30 -rss_limit_mb=2048 -print_final_stats=1 "-artifact_prefix=$work/artifacts/")
  [ -f "tests/fuzz/$name.dict" ] && args+=("-dict=tests/fuzz/$name.dict")
  if [ "$FUZZ_SECONDS" -gt 0 ]; then
    args+=("-max_total_time=$FUZZ_SECONDS")
  else
    args+=(-runs=0) # replay the corpus only
  fi
  dirs=("$work/corpus")
  [ -d "tests/fuzz/corpus/$name" ] && dirs+=("tests/fuzz/corpus/$name")
  echo "--- $name: ${args[*]} ${dirs[*]}"
  log="$work/last-run.log"
  if timeout $((FUZZ_SECONDS + 300)) "$bin" "${args[@]}" "${dirs[@]}" >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added|#[0-9]+ +DONE)' "$log" || true
    echo "--- $name: ok"
  else
    rc=$?
    tail -n 80 "$log"
    echo "--- $name: FAILED (exit $rc); log: $log, crashing input in $work/artifacts/" >&2
    failed+=("$name")
  fi
done
stage_done "fuzz build + ${#fuzzers[@]} targets" "$t"

section "summary"
printf '  %s\n' "${stage_times[@]}"
printf '  %-34s %4ds\n' "total" $((SECONDS - T0))
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED fuzz targets: ${failed[*]}" >&2
  exit 1
fi
echo "all stages passed"
