#!/usr/bin/env bash
# session 2026-12-02b, call 3: the final build (entries) against the session-start build (baseline) and the
# build before the unrolled/prefetched norm kernels (shuf); runtime with the baseline timed back to back + trace.
set -uo pipefail
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
python3 -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf >/dev/null
for e in small nano-1b; do
  g=/tmp/nano-1b.gguf; [ $e = small ] && g=models/small.gguf
  for d in entries baseline shuf; do
    python3 -m compiler.build --model $g --target cuda --repack-into .gpu/$d/$e >/dev/null
  done
  python3 -m bench.parity --model $g --entry .gpu/entries/$e --torch-device cuda --steps 64 --json $OUT/parity_${e}_cuda.json 2>&1 | tail -1
  python3 -m bench.compare .gpu/baseline/$e .gpu/entries/$e --rounds 11 --tokens 64 --check-steps 64 --json $OUT/compare_${e}_cuda.json 2>&1 | tail -2
  j=/tmp/cp_$e.json; [ $e = nano-1b ] && j=$OUT/compare_prefetch_nano-1b_cuda.json
  python3 -m bench.compare .gpu/shuf/$e .gpu/entries/$e --rounds 11 --tokens 64 --check-steps 64 --json $j 2>&1 | tail -2
  python3 -m bench.runtime --impl tvm --model $g --entry .gpu/entries/$e --baseline-entry .gpu/baseline/$e --target cuda --threads 16 --prompt-tokens 64 --decode-tokens 128 --runs 5 --json $OUT/runtime_${e}_cuda.json 2>&1 | tail -5
done
