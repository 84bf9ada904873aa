#!/usr/bin/env bash
# The shipped SFT model's run on one H200 (second device call, ~4 minutes). The first call
# (scripts/sft_small_h200.sh) tried A (Muon 0.004 / AdamW 5e-4, answers ≤ 200 tokens: 66 % test pass, bits/byte
# +0.9 %) and B (Muon 0.008 / AdamW 1e-3, answers ≤ 128 tokens: 84 %, +3.2 %). This one trains C, A's learning rates
# with B's 128-token answers, then evaluates it on the same test slice (200 held-out requests, with bits/byte), on a
# fresh slice that no choice has seen (offset 300, 200 requests), and the shipped model's bits/byte again.
#   OUT=<results folder> bash scripts/sft_small_h200_final.sh      (device tool: carry .whl)
set -euo pipefail
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-/tmp/sft-small}
STEPS=${STEPS:-800} N=${N:-200} NEW=${NEW:-256} BPB=${BPB:-1000000}
ROOTS=${ROOTS:-stdlib,site-packages}
SFT_ARGS=${SFT_ARGS:-} EVAL_ARGS=${EVAL_ARGS:-}
BASE=${BASE:-models/small.gguf}  # the base (pre-SFT) model: since SFT it is git show 3a4026f:models/small.gguf
mkdir -p "$OUT" "$W"
logs() {
    (cd "$W" && tar czf "$OUT/logs_final.tgz" --ignore-failed-read log_*.txt c/metrics.jsonl c/sft_summary.json \
        c/pairs_sample.json 2> /dev/null) || true
}
trap logs EXIT
nvidia-smi -L 2> /dev/null || true
python3 -m train.sft --gguf $BASE --out "$W/data" --roots "$ROOTS" --prepare-only 1 $SFT_ARGS > "$W/log_data.txt" 2>&1
M=$W/data/data/corpus/manifest.jsonl
S=$W/data/data/shards
python3 -m train.sft --gguf $BASE --manifest "$M" --shards "$S" --steps "$STEPS" --out "$W/c" --lr-matrix 0.004 \
    --lr-embed 5e-4 --max-answer-tokens 128 $SFT_ARGS > "$W/log_c.txt" 2>&1 &
c=$!
python3 -m train.chat_eval --gguf $BASE --manifest "$M" --shards "$S" --out "$OUT/bpb_base.json" --n 0 \
    --bpb-tokens "$BPB" $EVAL_ARGS > "$W/log_base.txt" 2>&1
wait $c
cp "$W/c/model.gguf" "$OUT/model.gguf"
cp "$W/c/sft_summary.json" "$OUT/sft_summary_c.json"
python3 -m train.chat_eval --gguf "$W/c/model.gguf" --manifest "$M" --shards "$S" --out "$OUT/chat_after_c.json" \
    --n "$N" --max-new-tokens "$NEW" --bpb-tokens "$BPB" $EVAL_ARGS > "$W/log_after_c.txt" 2>&1 &
t=$!
python3 -m train.chat_eval --gguf "$W/c/model.gguf" --manifest "$M" --out "$OUT/chat_fresh_c.json" --offset 300 \
    --n "$N" --max-new-tokens "$NEW" --bpb-tokens 0 $EVAL_ARGS > "$W/log_fresh_c.txt" 2>&1 &
f=$!
wait $t
wait $f
tail -n 3 "$W/log_base.txt" "$W/log_after_c.txt" "$W/log_fresh_c.txt"
