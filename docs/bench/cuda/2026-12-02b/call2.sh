#!/usr/bin/env bash
# session 2026-12-02b, call 2: shuffles + staged attention against the session-start build (baseline) and the
# attention-only build (attn); nano-1b's quantized combine (quant) against the new build.
set -uo pipefail
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
python3 -m model.random_model --preset nano-1b --out /tmp/nano-1b.gguf >/dev/null
for e in small nano-1b; do
  g=/tmp/nano-1b.gguf; [ $e = small ] && g=models/small.gguf
  for d in entries baseline attn quant; do
    [ -f .gpu/$d/$e/model.so ] && python3 -m compiler.build --model $g --target cuda --repack-into .gpu/$d/$e >/dev/null
  done
  python3 -m bench.parity --model $g --entry .gpu/entries/$e --torch-device cuda --steps 64 --json $OUT/parity_${e}_cuda.json 2>&1 | tail -1
  python3 -m bench.compare .gpu/baseline/$e .gpu/entries/$e --rounds 11 --tokens 64 --check-steps 64 --json $OUT/compare_${e}_cuda.json 2>&1 | tail -2
  python3 -m bench.compare .gpu/attn/$e .gpu/entries/$e --rounds 11 --tokens 64 --check-steps 64 --json $OUT/compare_shuffles_${e}_cuda.json 2>&1 | tail -2
done
python3 -m bench.compare .gpu/entries/nano-1b .gpu/quant/nano-1b --rounds 11 --tokens 64 --check-steps 64 --json $OUT/compare_quant_nano-1b_cuda.json 2>&1 | tail -2
python3 -m bench.runtime --impl tvm --model /tmp/nano-1b.gguf --entry .gpu/entries/nano-1b --baseline-entry .gpu/baseline/nano-1b --target cuda --threads 16 --prompt-tokens 64 --decode-tokens 128 --runs 5 --json $OUT/runtime_nano-1b_cuda.json 2>&1 | tail -6
