#!/usr/bin/env bash
# GPU host: time the CUDA tuning candidates and the kernel benchmark that the build machine compiled, plus the
# PyTorch bf16 decode baseline of nano-1b. Results go to $OUT (device tool) or ./gpu_out.
# Build machine first:
#   bash scripts/gpu_runtime_bundle.sh
#   python -m compiler.tune --target cuda --config small --config nano-1b --bench-shapes --export-candidates .gpu/cands
#   python -m bench.kernels --target cuda --export .gpu/bench
# then carry .gpu (and .whl with the gguf wheel) and run: bash scripts/gpu_tune.sh
# and back here: python -m compiler.tune --target cuda --import-timings <OUT>/timings.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
source scripts/gpu_env.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
if [ -f .gpu/cands/manifest.json ]; then
  python3 -m compiler.cuda_remote run .gpu/cands --out "$OUT/timings.json" > "$OUT/tune.log" 2>&1
  echo "tune exit $?"; grep -c FAILED "$OUT/tune.log"; tail -3 "$OUT/tune.log"
fi
if [ -f .gpu/bench/bench_manifest.json ]; then
  python3 -m bench.kernels --target cuda --from .gpu/bench --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${TORCH_BASELINE:-1}" = 1 ]; then
  python3 -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf > /dev/null &&
  python3 -m bench.runtime --impl torch --model /tmp/nano-1b.gguf --threads 16 --torch-device cuda \
    --torch-dtype bfloat16 --decode-tokens 64 --json "$OUT/torch_nano-1b_bf16.json" 2>&1 | tail -4
fi
