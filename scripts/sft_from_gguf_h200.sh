#!/usr/bin/env bash
# SFT and its scores (scripts/sft_base_h200.sh) for a pretrained base GGUF carried to a fresh GPU host, when the machine
# that pretrained it is gone (the device machine is handed back after 30 s idle, and $W with it). Rebuilds the data
# (train.corpus with the pretraining's EXEC_FRAC: the splits are salted hashes of file names, so the same host image
# gives the same manifest, checked against the task file's header), puts the GGUF and the exec tasks where
# sft_base_h200.sh looks, repacks the CUDA entry and runs it.
#   build machine: mkdir -p .gpu/seed && cat base.gguf.part-* > .gpu/seed/base.gguf
#                  cp exec_heldout.jsonl .gpu/seed/   (train_base_h200.sh's, optional)
#   device tool, carry .whl .gpu/rt .gpu/packed .gpu/seed:  OUT=<results> bash scripts/sft_from_gguf_h200.sh
# The trip's limit is 64 MiB with the tree: a 34 MB GGUF fits only with tuning_logs/ (31 MB, never read on the GPU
# host) moved out of the working tree for that call (`mv tuning_logs /tmp/` before it, back after).
# CALL: this call's seconds (data + repack ~65 s, then sft_base_h200.sh's BUDGET); SFT_STEPS as there.
set -euo pipefail
T0=$(date +%s)
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-.gpu/base-train} SEED=${SEED_DIR:-.gpu/seed} EXEC_FRAC=${EXEC_FRAC:-0.5} CALL=${CALL:-540}
[ -f "$SEED/base.gguf" ] || { echo "no $SEED/base.gguf (see this script's header)"; exit 3; }
mkdir -p "$W/data/data" "$W/base" "$OUT"
if [ ! -f "$W/data/data/shards/meta.json" ]; then
    python3 -m train.corpus --out "$W/data/data/corpus" --roots stdlib site-packages --exec-file-frac "$EXEC_FRAC" \
        > "$W/log_data.txt" 2>&1
    python3 -m train.sft --gguf models/small.gguf --out "$W/data" --manifest "$W/data/data/corpus/manifest.jsonl" \
        --roots stdlib,site-packages --plain-mb 100000 --prepare-only 1 >> "$W/log_data.txt" 2>&1
fi
cp "$SEED/base.gguf" "$W/base/model.gguf"
if [ -f "$SEED/exec_heldout.jsonl" ]; then
    python3 - "$SEED/exec_heldout.jsonl" "$W/data/data/corpus/manifest.jsonl" << 'PY'
import hashlib, json, sys
head = json.loads(open(sys.argv[1]).readline())
same = hashlib.sha256(open(sys.argv[2], "rb").read()).hexdigest() == head["manifest_sha256"]
print("the task file's manifest is this corpus's:", same)
sys.exit(0 if same else 4)
PY
    cp "$SEED/exec_heldout.jsonl" "$W/exec_heldout.jsonl"
fi
(
    . scripts/gpu_env.sh
    python3 -m compiler.build --model "$W/base/model.gguf" --target cuda --repack-into .gpu/entries/base > /dev/null
)
echo "data + repack: $(($(date +%s) - T0)) s"
OUT=$OUT BUDGET=$((CALL - 30 - ($(date +%s) - T0))) bash scripts/sft_base_h200.sh
