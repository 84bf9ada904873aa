#!/usr/bin/env bash
# After scripts/train_base_h200.sh has finished the base model on this machine (same $W, the machine kept warm between
# device calls): instruction tuning (train.sft, the shipped model's setting C: Muon 0.004, AdamW 5e-4, answers <= 128
# tokens; docs/train/sft), then the scores the issue-19 default-model rule needs, next to those of the pretrained
# base and of models/small.gguf, then (when the corpus holds the split "exec": EXEC_FRAC of the pretraining) the
# held-out execution tasks mined on this host and their pass@k (issue 20). Each stage is skipped when its result
# exists, so a call that runs out of time is continued by calling again.
#   OUT=<results> bash scripts/sft_base_h200.sh        (device tool; carry .whl .gpu/rt .gpu/packed)
# Stages and results ($OUT), the most wanted first so that a call which runs out loses the least: the pretrained
# model's exec_base.json while SFT trains (beside it: the GPU is shared, the sandbox checks are CPU work); then
# sft_summary.json, base-sft.gguf.part-* (`cat base-sft.gguf.part-* > base-sft.gguf`), validity_sft_plain.json
# (bench.eval_engine, the 200 held-out functions of docs/train/small), exec_sft.json, eval_sft_ctx{2048,512}.json
# (held-out bits/byte), validity_sft_freq05.json. The exec tasks are $W/exec_heldout.jsonl, mined by
# train_base_h200.sh (else here: train.exec_tasks --split exec), returned as exec_heldout.jsonl; pass@k through the
# compiled CUDA engine (bench.eval_engine --suite exec). sft_base_summary.json gathers them.
# CPU dry run after train_base_h200.sh's: SFT_STEPS=2 SFT_ARGS="--batch-size 2 --plain-batch-size 1 --device cpu"
#   DEVICE=cpu EVAL_TOKENS=4096 N_FUNCTIONS=0 W=/tmp/base-w OUT=/tmp/base-o bash scripts/sft_base_h200.sh
#   (the engine stages, CUDA only, say they could not be set up)
set -euo pipefail
T0=$(date +%s)
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-.gpu/base-train}
BUDGET=${BUDGET:-560} SFT_STEPS=${SFT_STEPS:-800} SFT_ARGS=${SFT_ARGS:-}
EVAL_TOKENS=${EVAL_TOKENS:-1000000} N_FUNCTIONS=${N_FUNCTIONS:-200} DEVICE=${DEVICE:-cuda}
PER_PKG=${PER_PKG:-20} EXEC_ARGS=${EXEC_ARGS:---n 10 --k 1,10 --workers 12}
R=$W/base M=$W/data/data/corpus/manifest.jsonl S=$W/data/data/shards
[ -f "$R/model.gguf" ] || { echo "no $R/model.gguf: run scripts/train_base_h200.sh to its end first"; exit 3; }
mkdir -p "$OUT"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stage() {  # stage NAME RESULT COMMAND...: run COMMAND unless RESULT exists, within the time left
    local name=$1 result=$2
    shift 2
    if [ -e "$result" ]; then
        echo "$name: done before"
        return 0
    fi
    if (($(left) < 30)); then
        echo "$name: no time left in this call: call again"
        exit 0
    fi
    local t=$(date +%s)
    if timeout "$(left)" "$@" > "$W/log_$name.txt" 2>&1; then
        echo "$name: $(($(date +%s) - t)) s"
    else
        echo "$name failed or ran out of time (log_$name.txt): $(tail -c 400 "$W/log_$name.txt")"
        rm -f "$result"
    fi
}
trap '(cd "$W" && tar czf "$OUT/sft_runs.tgz" --ignore-failed-read log_*.txt sft/metrics.jsonl sft/sft_summary.json \
    2> /dev/null) || true' EXIT
T=$W/exec_heldout.jsonl  # mined by train_base_h200.sh beside the training (else here, below)
have_exec() { python3 -c "import json, sys; sys.exit(0 if json.load(open('$W/data/data/corpus/summary.json')).get('exec') else 1)"; }
exec_score() {  # exec_score NAME GGUF ENTRY: pass@k through the compiled CUDA engine's continuous batch
    [ -f "$T" ] || return 0
    (
        . scripts/gpu_env.sh
        stage "exec_$1" "$OUT/exec_$1.json" python3 -m bench.eval_engine --suite exec --gguf "$2" --tasks "$T" \
            --engine-entry "$3" --out "$OUT/exec_$1.json" $EXEC_ARGS
    ) || echo "exec_$1: the engine could not be set up"
}
bg=
if have_exec; then  # the pretrained model's pass@k while SFT trains: the GPU is shared, the checks are CPU work
    (
        stage exec_tasks "$T" python3 -m train.exec_tasks --manifest "$M" --split exec --per-package "$PER_PKG" \
            --journal "$W/exec_journal.jsonl" --out "$T"
        exec_score base "$R/model.gguf" .gpu/entries/base
    ) &
    bg=$!
else
    echo "no exec split in this corpus (EXEC_FRAC=0 in train_base_h200.sh): no execution tasks"
fi
stage sft "$W/sft/model.gguf" python3 -m train.sft --gguf "$R/model.gguf" --manifest "$M" --shards "$S" \
    --steps "$SFT_STEPS" --out "$W/sft" --lr-matrix 0.004 --lr-embed 5e-4 --max-answer-tokens 128 $SFT_ARGS
[ -f "$W/sft/model.gguf" ] || { [ -z "$bg" ] || wait "$bg"; exit 1; }
[ -f "$OUT/base-sft.gguf.part-0" ] || split -b 15M -d -a 1 "$W/sft/model.gguf" "$OUT/base-sft.gguf.part-"
cp "$W/sft/sft_summary.json" "$OUT/sft_summary.json" 2> /dev/null || true
evaluate() {  # held-out bits/byte at context $1
    stage "eval_sft_$1" "$OUT/eval_sft_ctx$1.json" python3 -m train.eval --gguf "$W/sft/model.gguf" --data "$S" \
        --manifest "$M" --n-functions 0 --max-tokens "$EVAL_TOKENS" --seq-len "$1" --device "$DEVICE" \
        --out "$OUT/eval_sft_ctx$1.json"
}
validity() {  # validity TAG FLAGS: the compiled CUDA engine, as train_base_h200.sh scores base and small
    (
        . scripts/gpu_env.sh
        stage "validity_$1" "$OUT/validity_sft_$1.json" python3 -m bench.eval_engine --gguf "$W/sft/model.gguf" \
            --data "$S" --manifest "$M" --engine-entry .gpu/entries/base-sft --max-tokens 0 \
            --n-functions "$N_FUNCTIONS" --prompt-seed 0 ${2//_/ } --out "$OUT/validity_sft_$1.json"
    ) || echo "validity_$1: the engine could not be set up"
}
if ((N_FUNCTIONS > 0)); then
    (
        . scripts/gpu_env.sh
        mkdir -p .gpu/entries/base-sft && cp .gpu/entries/base/model.so .gpu/entries/base/meta.json .gpu/entries/base-sft/
        python3 -m compiler.build --model "$W/sft/model.gguf" --target cuda --repack-into .gpu/entries/base-sft > /dev/null
    ) || echo "base-sft entry: repack failed"
fi
# most wanted first (issue 19: greedy validity; issue 20: pass@k), so a call that runs out loses the least
((N_FUNCTIONS > 0)) && validity plain ""
[ -z "$bg" ] || exec_score sft "$W/sft/model.gguf" .gpu/entries/base-sft
evaluate 2048
evaluate 512
((N_FUNCTIONS > 0)) && validity freq05 --frequency-penalty_0.5
[ -z "$bg" ] || wait "$bg" || true
cp "$T" "$OUT/exec_heldout.jsonl" 2> /dev/null || true
python3 - "$OUT" << 'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name: str):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


summary = {"issue": [19, 20], "sft": load("sft_summary.json"), "heldout": {}, "validity": {}, "exec": {}}
for ctx in (512, 2048):
    ev = load(f"eval_sft_ctx{ctx}.json")
    if ev:
        summary["heldout"][f"sft_ctx{ctx}"] = {k: ev.get(k) for k in ("val_loss", "bits_per_byte", "val_tokens")}
for tag in ("plain", "freq05"):
    ev = load(f"validity_sft_{tag}.json")
    if ev:
        summary["validity"][f"sft_{tag}"] = {k: ev["code"].get(k) for k in ("validity_rate", "validity_rate_trimmed",
                                                                         "valid", "functions", "hit_token_limit")}
for name in ("base", "sft"):
    ev = load(f"exec_{name}.json")
    if ev:
        summary["exec"][name] = {k: v for k, v in ev.items() if k != "tasks"}
(out / "sft_base_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("heldout", "validity")}, indent=1))
PY
echo "total $(($(date +%s) - T0)) s"
