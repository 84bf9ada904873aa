#!/usr/bin/env bash
# The GPU-host commands of calls 2 and 3 of docs/bench/cuda (section "2026-12-02, later"), run from the repository
# root with .gpu/rt and .gpu/packed carried (scripts/gpu_pack.sh). Builds, made on the build machine with
# scripts/gpu_prepare.sh at each commit and packed: baseline = ba99825, attn = 1bb63dc, shuf = 35ec9e2, quant =
# 35ec9e2 with QUANT_COMBINE_COLUMNS = 2048, entries = 35ec9e2 (call 2) or e334593 (call 3).
#   CALL=2 OUT=<folder> bash calls.sh      (call 1 was call 2's baseline compare and the nano-1b runtime line)
set -uo pipefail
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
python3 -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf >/dev/null
C="--rounds 11 --tokens 64 --check-steps 64"
R="--target cuda --threads 16 --prompt-tokens 64 --decode-tokens 128 --runs 5"
for e in small nano-1b; do
  g=/tmp/nano-1b.gguf; [ $e = small ] && g=models/small.gguf
  for d in entries baseline attn shuf quant; do
    [ -f .gpu/$d/$e/model.so ] && python3 -m compiler.build --model $g --target cuda --repack-into .gpu/$d/$e >/dev/null
  done
  python3 -m bench.parity --model $g --entry .gpu/entries/$e --torch-device cuda --steps 64 --json $OUT/parity_${e}_cuda.json
  python3 -m bench.compare .gpu/baseline/$e .gpu/entries/$e $C --json $OUT/compare_${e}_cuda.json
  if [ "$CALL" = 2 ]; then
    python3 -m bench.compare .gpu/attn/$e .gpu/entries/$e $C --json $OUT/compare_shuffles_${e}_cuda.json
  else
    python3 -m bench.compare .gpu/shuf/$e .gpu/entries/$e $C --json $OUT/compare_prefetch_${e}_cuda.json
    python3 -m bench.runtime --impl tvm --model $g --entry .gpu/entries/$e --baseline-entry .gpu/baseline/$e $R \
      --json $OUT/runtime_${e}_cuda.json
  fi
done
if [ "$CALL" = 2 ]; then
  python3 -m bench.compare .gpu/entries/nano-1b .gpu/quant/nano-1b $C --json $OUT/compare_quant_nano-1b_cuda.json
  python3 -m bench.runtime --impl tvm --model /tmp/nano-1b.gguf --entry .gpu/entries/nano-1b \
    --baseline-entry .gpu/baseline/nano-1b $R --json $OUT/runtime_nano-1b_cuda.json
fi
