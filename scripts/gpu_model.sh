#!/usr/bin/env bash
# GPU host: whole-model runs of the CUDA modules compiled on the build machine (bash scripts/gpu_prepare.sh puts
# model.so + meta.json in .gpu/entries/{small,nano-1b} and TVM's runtime in .gpu/rt; the weights are repacked here
# from the GGUF), with TVM's runtime only: parity with the PyTorch CUDA reference (64 greedy steps), then
# bench.runtime: decode/prefill against PyTorch eager bf16, $RUNS interleaved runs, the HBM bound from a device copy
# in the same run, and the profiler's count of what one decode step launches (bench.cuda_trace).
#   OUT=<results folder> [RUNS=5] [CHAIN_BURST=16] [NAMES="small nano-1b"] [SKIP_TORCH_NANO=1 | SKIP_TORCH=1] [BASELINE=.gpu/baseline] \
#     bash scripts/gpu_model.sh
#   (NAMES: any entry gpu_prepare.sh built, e.g. bitnet-2b4t; BASELINE: a folder of entries of the same names built
#   from an earlier commit, e.g. `git worktree add /tmp/old <commit> && (cd /tmp/old && bash scripts/gpu_prepare.sh)`
#   then copy /tmp/old/.gpu/entries/* there: bench.runtime --baseline-entry times each right after the new build;
#   BASELINE_SRC: that commit's source tree (`git archive <commit> | tar -x -C <dir>`, carried, e.g. packed by
#   scripts/gpu_pack.sh), which repacks the baseline's weights and runs the baseline's decode: its own runtime for its
#   own module, whatever changed since)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
RUNS=${RUNS:-5}
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt"
for e in ${NAMES:-small nano-1b}; do
  [ -f ".gpu/entries/$e/model.so" ] || { echo "no .gpu/entries/$e (bash scripts/gpu_prepare.sh on the build machine)"; continue; }
  if [ "$e" = small ]; then gguf=models/small.gguf; else
    gguf=/tmp/$e.gguf; python3 -m model.random_model --preset "$e" --out "$gguf" > /dev/null; fi
  python3 -m compiler.build --model "$gguf" --target cuda --repack-into ".gpu/entries/$e" > /dev/null
  python3 -m bench.parity --model "$gguf" --entry ".gpu/entries/$e" --torch-device cuda --steps 64 \
    --json "$OUT/parity_${e}_cuda.json" 2>&1 | tail -1
  ab=()
  if [ -n "${BASELINE:-}" ] && [ -f "$BASELINE/$e/model.so" ]; then
    ag=$(realpath "$gguf"); ae=$(realpath "$BASELINE/$e")
    (cd "${BASELINE_SRC:-.}" && python3 -m compiler.build --model "$ag" --target cuda --repack-into "$ae" > /dev/null)
    ab=(--baseline-entry "$BASELINE/$e")
    [ -n "${BASELINE_SRC:-}" ] && ab+=(--baseline-src "$BASELINE_SRC")
  fi
  impls="tvm torch"; [ "$e" = nano-1b ] && [ "${SKIP_TORCH_NANO:-0}" = 1 ] && impls=tvm
  [ "${SKIP_TORCH:-0}" = 1 ] && impls=tvm
  python3 -m bench.runtime --impl $impls --model "$gguf" --entry ".gpu/entries/$e" --target cuda --threads 16 \
    --torch-device cuda --torch-dtype bfloat16 --prompt-tokens 64 --decode-tokens 128 --runs "$RUNS" \
    --chain-burst "${CHAIN_BURST:-16}" ${ab[@]+"${ab[@]}"} --json "$OUT/runtime_${e}_cuda.json" 2>&1 | tail -14
done
