#!/usr/bin/env bash
# The checks that need a GPU, in one run, for a lent GPU machine: python3 with torch and
# Triton, no network, no vLLM (docs/vllm.md section 9, docs/kernels.md). From the repo root:
#   tests/gpu/run.sh [OUT_DIR]        (make test-gpu)
# Wheels in .whl/ are installed first: msgspec, which the connector's events module imports
# and the GPU image lacks; fetch it where pip works, e.g. `pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl msgspec`.
# The worker's CUDA cases import the connector's modules with tests/gpu/vllm_stand_in on the
# path in place of vLLM; the kernel tests and benches need no vLLM. Only the CUDA cases run
# here: the CPU (Triton interpreter) cases are CI's, and the interpreter of the image's
# Triton 3.6 with NumPy 2.5 cannot run a loop whose bounds are kernel arguments.
set -u
out=${1:-${OUT:-/tmp/meshkv-gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > /tmp/install.txt 2>&1; then
    tail -5 /tmp/install.txt
    exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())"
failed=0
step() {  # step NAME SECONDS CMD...: run, keep the output, remember a failure
    local name=$1 secs=$2
    shift 2
    echo "== $name"
    timeout "$secs" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 12 "$out/$name.txt"
    echo "== $name: exit $rc"
    [ $rc -eq 0 ] || failed=1
}
pytest=(python3 -m pytest -q -p no:cacheprovider -p no:warnings -rs)
step kernel_tests 150 "${pytest[@]}" tests/unit/test_kernels.py tests/unit/test_kernels_paged.py -k "cuda or launch_shape or pin"
step worker_cuda_tests 90 env PYTHONPATH="tests/gpu/vllm_stand_in:${PYTHONPATH:-}" \
    "${pytest[@]}" tests/unit/test_vllm_worker_side.py -k cuda
step layered_loads 150 env PYTHONPATH="tests/gpu/vllm_stand_in:${PYTHONPATH:-}" \
    python3 -m tests.gpu.layered_loads --json "$out/layered_loads.json"
step kernel_tiles 150 python3 -m benchmarks.kernel_tiles --json "$out/kernel_tiles.json"
step bench_kernels 100 python3 -m meshkv bench kernels --device cuda --layouts flash_attn,mla \
    --layers 32 --kv-heads 8 --head-size 128 --block-size 16 --dtype bfloat16 --chunks 16 \
    --repeats 20 --json "$out/bench_kernels_cuda.json"
exit $failed
