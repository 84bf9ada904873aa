#!/usr/bin/env bash
# The shipped model's training run, exactly as executed on a 2×H200 device machine (one call, < 10 minutes):
# build the corpus/tokenizer/shards once, train the ternary model on GPU 0 and the dense baseline on GPU 1 in
# parallel (same shapes, same token budget), export + evaluate both, then measure training throughput on 1 and 2 GPUs.
#   OUT=<results folder> bash scripts/train_small_h200x2.sh      (device tool: carry .whl)
set -euo pipefail
# the device image lacks the gguf package: carry its wheel in .whl/ (pip download gguf==0.19.0 -d .whl)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import gguf"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:?set OUT to a results folder}
R=${R:-/tmp/recipe-small}
STEPS=${STEPS:-2500}
COMMON=(--preset small --out "$R" --steps "$STEPS" --batch-size 128 --seq-len 512 --compile
        --eval-tokens 1000000 --eval-functions 120)
mkdir -p "$OUT" "$R"
nvidia-smi -L
python3 -m train.recipe "${COMMON[@]}" --variant data > "$R/log_data.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 python3 -m train.recipe "${COMMON[@]}" --variant ternary > "$R/log_ternary.txt" 2>&1 &
t=$!
CUDA_VISIBLE_DEVICES=1 python3 -m train.recipe "${COMMON[@]}" --variant dense > "$R/log_dense.txt" 2>&1 &
d=$!
wait $t
wait $d
cp "$R/model.gguf" "$OUT/"
cd "$R" && tar czf "$OUT/results.tgz" summary_*.json eval_*.json run/metrics.jsonl dense/metrics.jsonl run/loss.png \
    dense/loss.png corpus/summary.json shards/meta.json tokenizer.json log_*.txt && cd - > /dev/null
cat "$R"/summary_ternary.json "$R"/summary_dense.json
TP=(--preset small --batch-size 128 --seq-len 512 --steps 20 --warmup 8 --compile)
CUDA_VISIBLE_DEVICES=0 python3 -m train.throughput "${TP[@]}" --out "$OUT/throughput_1gpu.json" | tail -n 3
torchrun --nproc_per_node 2 -m train.throughput "${TP[@]}" --out "$OUT/throughput_2gpu.json" | tail -n 3
grep -h '"tokens_per_s"\|"mfu"\|"world_size"' "$OUT"/throughput_*.json
