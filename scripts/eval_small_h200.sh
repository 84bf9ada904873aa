#!/usr/bin/env bash
# Second device call for the shipped model (one H200): rebuild the corpus/tokenizer/shards (deterministic), evaluate
# the shipped ternary GGUF (models/small.gguf) on the held-out split, and retrain + evaluate the dense baseline
# (its checkpoint from the first call was lost with that machine).
#   OUT=<results folder> bash scripts/eval_small_h200.sh      (device tool: carry .whl)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a results folder}
R=${R:-/tmp/recipe-small}
COMMON=(--preset small --out "$R" --steps 2500 --batch-size 128 --seq-len 512 --compile
        --eval-tokens 1000000 --eval-functions 200)
mkdir -p "$OUT" "$R"
nvidia-smi -L
python3 -m train.recipe "${COMMON[@]}" --variant data > "$R/log_data.txt" 2>&1
sha256sum "$R/tokenizer.json"
python3 -m train.eval --gguf models/small.gguf --data "$R/shards" --manifest "$R/corpus/manifest.jsonl" \
    --out "$R/eval_ternary.json" --max-tokens 1000000 --n-functions 200 > "$R/log_eval_ternary.txt" 2>&1 || true
python3 -m train.recipe "${COMMON[@]}" --variant dense > "$R/log_dense.txt" 2>&1
cd "$R" && tar czf "$OUT/results2.tgz" summary_*.json eval_*.json dense/metrics.jsonl dense/loss.png \
    corpus/summary.json shards/meta.json log_*.txt && cd - > /dev/null
cat "$R/summary_dense.json"; tail -n 12 "$R/log_eval_ternary.txt"
