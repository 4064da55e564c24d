#!/usr/bin/env bash
# Sets up a CUDA 13.0 build of clip4str on a machine with no CUDA toolkit and no GPU (how the binary that trained
# the bundled model's phase 3 was built): nvcc, headers and libraries come from NVIDIA's PyPI wheels, libcuda (the
# driver, absent here) is replaced at link time by a stub holding the driver API's symbols, and candle-kernels is
# patched to skip its MoE/GGUF kernels (never used here; they are most of the build time and 20 MB of binary).
# The binary then runs wherever the NVIDIA driver and the CUDA 13 cuBLAS/cuRAND/NVRTC libraries are present.
#
#   eval "$(scripts/setup-cuda.sh [DIR])"      # default DIR: ~/.cache/clip4str/cuda; sets CUDA_HOME etc.
#   cargo build --release -p clip4str-cli --features cuda --config "$CLIP4STR_CUDA_PATCH"
#
# The patched build records the local candle-kernels in Cargo.lock: `git checkout Cargo.lock` afterwards.
# A machine with a CUDA toolkit needs none of this: `cargo build --release -p clip4str-cli --features cuda`.
set -euo pipefail
dir="${1:-$HOME/.cache/clip4str/cuda}"
cap="${CUDA_COMPUTE_CAP:-90}" # the H100/H200's; PTX for it is what the binary carries
mkdir -p "$dir/wheels"
if ! ls "$dir"/wheels/nvidia_cublas-*.whl >/dev/null 2>&1; then
    python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir/wheels" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-curand" >&2
fi
for wheel in "$dir"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$dir/root"
done
home="$dir/root/nvidia/cu13"
chmod +x "$home"/bin/* "$home"/nvvm/bin/* 2>/dev/null || true
lib="$home/lib"
for name in cublas cublasLt nvrtc cudart; do
    ln -sf "$(basename "$(ls "$lib"/lib$name.so.* | head -1)")" "$lib/lib$name.so"
done
ln -sf libcurand.so.10 "$lib/libcurand.so"

# The sources cargo fetched for the locked versions (run `cargo fetch --features cuda` first if missing).
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -1)
cudarc=$(ls -d "$registry"cudarc-0.19.* | tail -1)
kernels=$(ls -d "$registry"candle-kernels-0.11.* | tail -1)
test -d "$cudarc" -a -d "$kernels" || { echo "cudarc/candle-kernels sources not fetched: run cargo fetch" >&2; exit 1; }

# A link-time stand-in for libcuda.so.1: every driver entry point cudarc declares, as an empty function.
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | awk '{print "void " $4 "(void){}"}' \
    | sort -u > "$dir/cuda-stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$dir/cuda-stub.c"

# candle-kernels without the statically built MoE/GGUF kernels.
rm -rf "$dir/candle-kernels"
cp -r "$kernels" "$dir/candle-kernels"
python3 - "$dir/candle-kernels/build.rs" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
start = src.index("    let mut moe_sources = vec![")
end = src.index("    Ok(())\n}")
open(path, "w").write(src[:start] + src[end:])
EOF

echo "export CUDA_HOME=$home PATH=$home/bin:\$PATH LIBRARY_PATH=$lib CUDA_COMPUTE_CAP=$cap" \
    "CLIP4STR_CUDA_PATCH='patch.crates-io.candle-kernels.path=\"$dir/candle-kernels\"'"
