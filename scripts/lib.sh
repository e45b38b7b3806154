# Shared helpers for scripts/build.sh and scripts/test.sh (sourced, not run).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${DSINFER_JOBS:-$(nproc 2>/dev/null || echo 2)}"

section() {
  printf '\n==============================================================================\n'
  printf '== %s\n' "$*"
  printf '==============================================================================\n'
}

# configure DIR COMPILER [cmake args...]
# Configures DIR (relative to the repo root) with the given C compiler. Ninja when available,
# else Makefiles; an existing directory keeps its generator, and one configured with another
# compiler is reset (CMake cannot switch compilers in place).
configure() {
  local dir="$1" cc="$2"
  shift 2
  local want cached gen=()
  want="$(command -v "$cc" || true)"
  if [ -z "$want" ]; then
    echo "error: C compiler '$cc' not found (run scripts/setup.sh)" >&2
    return 1
  fi
  if [ -f "$ROOT/$dir/CMakeCache.txt" ]; then
    cached="$(sed -n 's/^CMAKE_C_COMPILER:[A-Z]*=//p' "$ROOT/$dir/CMakeCache.txt")"
    if [ -n "$cached" ] && [ "$(readlink -f "$cached")" != "$(readlink -f "$want")" ]; then
      echo "note: $dir was configured with $cached; reconfiguring it with $want"
      rm -rf -- "$ROOT/$dir/CMakeCache.txt" "$ROOT/$dir/CMakeFiles"
    fi
  fi
  if [ ! -f "$ROOT/$dir/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
    gen=(-G Ninja)
  fi
  cmake -S "$ROOT" -B "$ROOT/$dir" "${gen[@]}" -DCMAKE_C_COMPILER="$want" "$@"
}

# build DIR [cmake --build args...]
build() {
  local dir="$1"
  shift
  cmake --build "$ROOT/$dir" -j "$JOBS" "$@"
}
