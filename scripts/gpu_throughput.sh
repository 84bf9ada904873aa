#!/usr/bin/env bash
# GPU host: training throughput and MFU (`python -m train.throughput`, the exact training step on random tokens) of
# one preset, each configuration GPUS:BATCH (GPUs under DDP : sequences per GPU) once per round, rounds interleaved so
# that every configuration sees the same host. Round 1 compiles (torch.compile's caches under /tmp then serve the
# later rounds); every round is kept.
#   OUT=<results folder> PRESET=base SEQ=2048 CONFIGS="1:32 2:32 2:64" ROUNDS=5 bash scripts/gpu_throughput.sh
# (device tool, kind nvidia-h200-x2, or nvidia-h200 with 1:… configurations only; nothing to carry)
# OUT gets summary.json (`python -m train.throughput --summary`) and runs.tgz (each run's JSON and log).
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:?set OUT to a results folder}
PRESET=${PRESET:-base}
SEQ=${SEQ:-2048}
CONFIGS=${CONFIGS:-1:32 2:32 2:64}
ROUNDS=${ROUNDS:-5}
STEPS=${STEPS:-16}
WARMUP=${WARMUP:-6}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__)"
TP=(--preset "$PRESET" --seq-len "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --compile)
for r in $(seq 1 "$ROUNDS"); do
    for c in $CONFIGS; do
        g=${c%%:*} b=${c##*:} name="r${r}_${g}gpu_b${b}"
        if [ "$g" = 1 ]; then run=(env CUDA_VISIBLE_DEVICES=0 python3 -m); else run=(torchrun --nproc_per_node "$g" -m); fi
        "${run[@]}" train.throughput "${TP[@]}" --batch-size "$b" --out "$OUT/$name.json" > "$OUT/log_$name.txt" 2>&1 \
            || echo "$name failed: $(tail -n 1 "$OUT/log_$name.txt")"
    done
    grep -h '"world_size"\|"batch_size_per_rank"\|"mfu"\|"peak_mem_gib"' "$OUT"/r"${r}"_*.json | tr -s ' \n' ' ' || true
    echo
done
python3 -m train.throughput --summary "$OUT"/r*_*.json --out "$OUT/summary.json"
cd "$OUT" && tar czf runs.tgz r*_*.json log_*.txt && rm -f r*_*.json log_*.txt
