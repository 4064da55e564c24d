#!/usr/bin/env bash
# Fetches Intel MKL (static libraries + headers + OpenMP runtime) from the PyPI wheels, with no other
# network access, and unpacks them where the `mkl` cargo feature finds them through MKLROOT.
#
#   scripts/setup-mkl.sh [DIR]          # default DIR: ~/.cache/clip4str/mkl
#   eval "$(scripts/setup-mkl.sh [DIR])"   # sets MKLROOT and KMP_BLOCKTIME=0
#   cargo build --release -p clip4str-cli --features mkl
#
# KMP_BLOCKTIME=0 stops MKL's OpenMP threads from spinning after each call, where they would fight candle's
# own thread pool for the cores.
set -euo pipefail
dir="${1:-$HOME/.cache/clip4str/mkl}"
mkdir -p "$dir/wheels"
if ! ls "$dir"/wheels/mkl_static-*.whl >/dev/null 2>&1; then
    python3 -m pip download --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
        --python-version 3.11 -d "$dir/wheels" mkl-static mkl-include intel-openmp >&2
fi
for wheel in "$dir"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$dir/root"
done
# Link the OpenMP runtime statically too, so the binary stays self-contained (intel-mkl-src prefers the
# shared libiomp5 when both are present). The wheels' pkg-config files have a bogus prefix; MKLROOT is
# searched instead.
find "$dir/root" -name 'libiomp5*.so' -delete
test -f "$(find "$dir/root" -name mkl.h | head -1)" || { echo "mkl.h not found under $dir/root" >&2; exit 1; }
echo "export MKLROOT=$dir/root KMP_BLOCKTIME=0"
