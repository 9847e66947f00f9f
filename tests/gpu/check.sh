#!/usr/bin/env bash
# GPU verification of the CUDA backend, in two halves.
#
#   tests/gpu/check.sh build   On a build machine (x86-64 Linux with Rust; no CUDA needed):
#                              builds the worker, gpu-bench and the GPU test executables with
#                              the `cuda` feature (CUDA_FEATURE=cuda-12 for CUDA 12) into
#                              target/gpu/.
#   tests/gpu/check.sh run     On the GPU machine, from a copy of this repository holding
#                              target/gpu/ (no Rust or registry needed): the kernels compiled by
#                              NVRTC, every op against the CPU backend, the reference fixtures end
#                              to end in bf16 and f32, `worker serve --device cuda` driven over
#                              its API, NCCL's collectives, and the decode benchmark on a
#                              Mistral-7B-shaped model next to transformers on the same GPU.
#                              Prints the tables.
#
# The CUDA libraries are found on LD_LIBRARY_PATH, in /usr/local/nvidia, or in the nvidia-*
# Python wheels next to PyTorch.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=target/gpu

build() {
    local feature=${CUDA_FEATURE:-cuda}
    cargo build --release --locked -p worker --features "$feature" --bins
    mkdir -p "$OUT_DIR"
    cp target/release/worker target/release/gpu-bench "$OUT_DIR/"
    # The test executables' paths come from cargo's JSON messages.
    cargo test --release --locked -p worker --features "$feature" --lib --test cuda --no-run --message-format=json \
        | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        kind = m["target"]["kind"][0]
        name = "worker-unit-tests" if kind == "lib" else m["target"]["name"] + "-tests"
        shutil.copy(m["executable"], sys.argv[1] + "/" + name)
        print("built", name)
' "$OUT_DIR"
    # Without debug info the whole set is ~20 MB, small enough to carry to the GPU machine.
    strip "$OUT_DIR"/*
    ls -la "$OUT_DIR"
}

# Puts the CUDA libraries on LD_LIBRARY_PATH; NCCL's wheel ships only libnccl.so.2, which is
# linked as libnccl.so where the loader looks.
cuda_libraries() {
    local dirs links=/tmp/tramontane-cuda-libs
    dirs=$(python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p.endswith("-packages")])
found = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu*", "lib"))})
print(":".join(found))
EOF
)
    mkdir -p "$links"
    for d in ${dirs//:/ } /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do
        [ -e "$d/libnccl.so.2" ] && [ ! -e "$links/libnccl.so" ] && ln -sf "$d/libnccl.so.2" "$links/libnccl.so"
    done
    # The machine's own toolkit first: its NVRTC emits PTX its driver accepts.
    local extra=$links
    [ -d /usr/local/cuda/lib64 ] && extra="$extra:/usr/local/cuda/lib64"
    [ -n "$dirs" ] && extra="$extra:$dirs"
    [ -d /usr/local/nvidia/lib64 ] && extra="$extra:/usr/local/nvidia/lib64"
    export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

run() {
    [ -x "$OUT_DIR/worker-unit-tests" ] || { echo "no $OUT_DIR/ here: run 'tests/gpu/check.sh build' first" >&2; exit 2; }
    cuda_libraries
    export TRAMONTANE_FIXTURES=$PWD/tests/fixtures TRAMONTANE_WORKER_BIN=$PWD/$OUT_DIR/worker
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    echo "libraries: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d" 2>/dev/null | grep -E '^lib(nvrtc|cublas|nccl|cuda)\.so' | sed "s|^|  $d/|"; done || true
    local status=0
    echo "== kernels (NVRTC) and NCCL unit tests"
    "$OUT_DIR/worker-unit-tests" --test-threads=1 backend::cuda comm::nccl || status=1
    echo "== ops against the CPU backend, fixtures end to end, a GPU worker process, NCCL at world size 1"
    "$OUT_DIR/cuda-tests" --test-threads=1 --nocapture || status=1
    echo "== decode benchmark"
    "$OUT_DIR/gpu-bench" --peers ${GPU_BENCH_ARGS:-} || status=1
    return "$status"
}

case "${1:-}" in
build) build ;;
run) run ;;
*)
    echo "usage: tests/gpu/check.sh build|run" >&2
    exit 2
    ;;
esac
