#!/usr/bin/env bash
# GPU host's CPU (16 cores here): thread scaling of the tuned CPU kernels and of whole-model decode, with TVM's
# runtime only. The kernels and the model's module are built on the build machine, for the thread counts they run with:
#   python -m bench.threads export .gpu/threads --threads 1,2,4,8,16
#   python -m model.random_model --preset nano-1b --out /tmp/nano1b.gguf
#   python -m compiler.build --model /tmp/nano1b.gguf --target avx512 --cores 16 --cache-dir /tmp/cc
#   mkdir -p .gpu/entries/nano1b_avx512 && cp /tmp/cc/<entry>/{model.so,meta.json} .gpu/entries/nano1b_avx512/
#   bash scripts/gpu_runtime_bundle.sh; pip download --no-deps -d .whl gguf==0.19.0
# then, through the device tool (carry .gpu and .whl): OUT=$OUT bash scripts/gpu_cpu_scaling.sh
# (the nano-1b module's kernels do not depend on the thread count: its 2-bit GEMVs split over row tiles.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
source scripts/gpu_env.sh
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
THREADS=${THREADS:-1 2 4 8 16}
lscpu > "$OUT/lscpu.txt"
grep -m1 "model name" /proc/cpuinfo; nproc
[ "${SKIP_KERNELS:-0}" = 1 ] || python3 -m bench.threads run .gpu/threads --json "$OUT/scaling_kernels_avx512.json"
if [ -f .gpu/entries/nano1b_avx512/model.so ]; then
  python3 -m model.random_model --preset nano-1b --out /tmp/nano1b.gguf > /dev/null
  python3 -m compiler.build --model /tmp/nano1b.gguf --target avx512 --repack-into .gpu/entries/nano1b_avx512 > /dev/null
  python3 -m bench.runtime --impl tvm --model /tmp/nano1b.gguf --entry .gpu/entries/nano1b_avx512 --threads $THREADS \
    --roof-dir .gpu/threads --prompt-tokens 64 --decode-tokens 64 --json "$OUT/scaling_nano1b_avx512.json"
  python3 -m bench.profile --entry .gpu/entries/nano1b_avx512 --threads $THREADS --steps 32 \
    --json "$OUT/profile_nano1b_avx512.json"
fi
