#!/usr/bin/env bash
# Three MTP heads (recurrent draft steps) for the shipped model on one H200 (one device call, about 6 minutes): build
# the corpus and shards with the GGUF's tokenizer, distil the heads onto the frozen model (train.mtp), evaluate
# them on the held-out split (drafts and acceptance; the main model's bits/byte before and after), and write the GGUF,
# the report, the metrics and the log to $OUT.
#   OUT=<results folder> bash scripts/mtp_small_h200.sh      (device tool: carry .whl)
# CPU dry run: STEPS=2 TIME=0 ROOTS=<a small folder> OUT=/tmp/o W=/tmp/w MTP_ARGS="--device cpu --workers 1
#   --batch-size 2 --chat-batch-size 2 --seq-len 64 --eval-tokens 4096 --eval-windows 4 --eval-prompts 2
#   --eval-requests 2 --eval-new-tokens 8" bash scripts/mtp_small_h200.sh
set -euo pipefail
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-/tmp/mtp-small}
STEPS=${STEPS:-100000} TIME=${TIME:-210}  # at most STEPS steps and TIME seconds of training (the schedule ends at either)
ROOTS=${ROOTS:-stdlib,site-packages}
GGUF=${GGUF:-models/small.gguf}
MTP_ARGS=${MTP_ARGS:-}
mkdir -p "$OUT" "$W"
results() {  # on any exit: whatever exists so far
    cp "$W"/log.txt "$W"/metrics.jsonl "$W"/mtp_report.json "$W"/model.gguf "$OUT"/ 2> /dev/null || true
    cp "$W"/data/corpus/summary.json "$OUT"/corpus_summary.json 2> /dev/null || true
    cp "$W"/data/shards/meta.json "$OUT"/shards_meta.json 2> /dev/null || true
}
trap results EXIT
nvidia-smi -L 2> /dev/null || true
python3 -m train.mtp --gguf "$GGUF" --out "$W" --heads 3 --steps "$STEPS" --time-limit-s "$TIME" --roots "$ROOTS" \
    $MTP_ARGS > "$W/log.txt" 2>&1 || { tail -c 3000 "$W/log.txt"; exit 1; }
tail -n 6 "$W/log.txt"
