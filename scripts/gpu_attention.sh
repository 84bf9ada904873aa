#!/usr/bin/env bash
# GPU host: attention variants against GQA (bench.attention) with the CUDA modules built on the build machine:
#   python -m bench.attention --build-only --target cuda; bash scripts/gpu_runtime_bundle.sh   (build machine)
#   OUT=<results folder> [RUNS=5] [CONTEXTS=128,512,2048] [VARIANTS=a,b] bash scripts/gpu_attention.sh   (GPU host)
# (VARIANTS: the same --variants as the --build-only call; default bench.attention's)
# writes the same random GGUFs as the build machine (seed 0, context 2176), repacks their weights into the modules,
# then times decode at contexts 128, 512 and 2048, interleaved, into $OUT/attention_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
RUNS=${RUNS:-5}
source scripts/gpu_env.sh
W=/tmp/bench-attention
entries=()
var=(${VARIANTS:+--variants "$VARIANTS"})
for g in $(python3 -m bench.attention --write-gguf --work-dir "$W" "${var[@]}"); do
  s=$(basename "$g" .gguf); s=${s%-ctx*}
  python3 -m compiler.build --model "$g" --target cuda --repack-into ".gpu/attention/$s" > /dev/null
done
for s in $(ls .gpu/attention); do entries+=(--entry "$s=.gpu/attention/$s"); done
python3 -m bench.attention "${entries[@]}" "${var[@]}" --threads 16 --runs "$RUNS" --work-dir "$W" \
  ${CONTEXTS:+--contexts "$CONTEXTS"} --json "$OUT/attention_cuda.json"
