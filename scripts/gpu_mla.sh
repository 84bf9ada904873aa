#!/usr/bin/env bash
# GPU host: multi-head latent attention against GQA (bench.mla) with the CUDA modules built on the build machine:
#   python -m bench.mla --build-only --target cuda --out-dir .gpu/mla; bash scripts/gpu_runtime_bundle.sh  (build machine)
#   OUT=<results folder> [RUNS=5] bash scripts/gpu_mla.sh                                                (GPU host, carry .gpu)
# writes the same random GGUFs as the build machine (seed 0, context 2048), repacks their weights into the modules,
# then times decode at contexts 128, 512 and 2048, interleaved, into $OUT/mla_vs_gqa_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
RUNS=${RUNS:-5}
source scripts/gpu_env.sh
W=/tmp/bench-mla
for g in $(python3 -m bench.mla --write-gguf --work-dir "$W"); do
  p=$(basename "$g" .gguf); p=${p%-ctx*}
  python3 -m compiler.build --model "$g" --target cuda --repack-into ".gpu/mla/$p" > /dev/null
done
python3 -m bench.mla --entry small=.gpu/mla/small --entry small-mla=.gpu/mla/small-mla --threads 16 --runs "$RUNS" \
  --work-dir "$W" --json "$OUT/mla_vs_gqa_cuda.json"
