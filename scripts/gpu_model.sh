#!/usr/bin/env bash
# GPU host: whole-model runs of CUDA modules compiled on the build machine (model.so + meta.json per entry under
# .gpu/entries/<name>; the weights are repacked here from the GGUF: compiler.build --repack-into), with TVM's runtime
# only: parity with the PyTorch CUDA reference, and decode/prefill speed vs PyTorch eager bf16.
# Build machine first:
#   python -m compiler.build --model models/small.gguf --target cuda     (and nano-1b: model.random_model, same)
#   copy each entry's model.so + meta.json to .gpu/entries/{small,nano1b}/; bash scripts/gpu_runtime_bundle.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
source scripts/gpu_env.sh
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 -m model.random_model --preset nano-1b --out /tmp/nano1b.gguf > /dev/null
declare -A GGUF=([small]=models/small.gguf [nano1b]=/tmp/nano1b.gguf)
for e in small nano1b; do
  [ -f ".gpu/entries/$e/model.so" ] || continue
  python3 -m compiler.build --model "${GGUF[$e]}" --target cuda --repack-into ".gpu/entries/$e" > /dev/null
  python3 -m bench.parity --model "${GGUF[$e]}" --entry ".gpu/entries/$e" --torch-device cuda --steps 64 \
    --json "$OUT/parity_${e}_cuda.json" 2>&1 | tail -1
  impls="tvm torch"; [ "$e" = nano1b ] && [ "${SKIP_TORCH_NANO:-0}" = 1 ] && impls=tvm
  python3 -m bench.runtime --impl $impls --model "${GGUF[$e]}" --entry ".gpu/entries/$e" --target cuda --threads 16 \
    --torch-device cuda --torch-dtype bfloat16 --prompt-tokens 64 --decode-tokens 128 \
    --json "$OUT/runtime_${e}_cuda.json" 2>&1 | tail -4
done
