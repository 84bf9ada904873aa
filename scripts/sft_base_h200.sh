#!/usr/bin/env bash
# After scripts/train_base_h200.sh has finished the base model on this machine (same $W, the machine kept warm between
# device calls): instruction tuning (train.sft, the shipped model's setting C: Muon 0.004, AdamW 5e-4, answers <= 128
# tokens; docs/train/sft), then the scores the issue-19 default-model rule needs, next to those of the pretrained
# base and of models/small.gguf, then (when the corpus holds the split "exec": EXEC_FRAC of the pretraining) the
# held-out execution tasks mined on this host and their pass@k (issue 20). Each stage is skipped when its result
# exists, so a call that runs out of time is continued by calling again.
#   OUT=<results> bash scripts/sft_base_h200.sh        (device tool; carry .whl .gpu/rt .gpu/packed)
# Stages and results ($OUT): sft_summary.json, base-sft.gguf.part-* (`cat base-sft.gguf.part-* > base-sft.gguf`);
# eval_sft_ctx{512,2048}.json (held-out bits/byte), validity_sft_{plain,freq05}.json (bench.eval_engine, the 200
# held-out functions of docs/train/small); exec_heldout_base.jsonl (train.exec_tasks --split exec) and
# exec_{base,sft}.json (train.eval --suite exec); sft_base_summary.json gathers them.
# CPU dry run after train_base_h200.sh's: SFT_STEPS=2 SFT_ARGS="--batch-size 2 --plain-batch-size 1 --device cpu"
#   DEVICE=cpu EVAL_TOKENS=4096 N_FUNCTIONS=0 EXEC_ARGS="--n 2 --k 1 --task-sample 2 --device cpu" W=/tmp/base-w
#   OUT=/tmp/base-o bash scripts/sft_base_h200.sh
set -euo pipefail
T0=$(date +%s)
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-.gpu/base-train}
BUDGET=${BUDGET:-560} SFT_STEPS=${SFT_STEPS:-800} SFT_ARGS=${SFT_ARGS:-}
EVAL_TOKENS=${EVAL_TOKENS:-1000000} N_FUNCTIONS=${N_FUNCTIONS:-200} DEVICE=${DEVICE:-cuda}
PER_PKG=${PER_PKG:-30} EXEC_ARGS=${EXEC_ARGS:---n 10 --k 1,10}
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
stage sft "$W/sft/model.gguf" python3 -m train.sft --gguf "$R/model.gguf" --manifest "$M" --shards "$S" \
    --steps "$SFT_STEPS" --out "$W/sft" --lr-matrix 0.004 --lr-embed 5e-4 --max-answer-tokens 128 $SFT_ARGS
[ -f "$W/sft/model.gguf" ] || exit 1
[ -f "$OUT/base-sft.gguf.part-0" ] || split -b 15M -d -a 1 "$W/sft/model.gguf" "$OUT/base-sft.gguf.part-"
cp "$W/sft/sft_summary.json" "$OUT/sft_summary.json" 2> /dev/null || true
for ctx in 512 2048; do
    stage "eval_sft_$ctx" "$OUT/eval_sft_ctx$ctx.json" python3 -m train.eval --gguf "$W/sft/model.gguf" --data "$S" \
        --manifest "$M" --n-functions 0 --max-tokens "$EVAL_TOKENS" --seq-len "$ctx" --device "$DEVICE" \
        --out "$OUT/eval_sft_ctx$ctx.json"
done
if ((N_FUNCTIONS > 0)); then  # the compiled CUDA engine, as train_base_h200.sh scores base and small
    (
        . scripts/gpu_env.sh
        mkdir -p .gpu/entries/base-sft && cp .gpu/entries/base/model.so .gpu/entries/base/meta.json .gpu/entries/base-sft/
        python3 -m compiler.build --model "$W/sft/model.gguf" --target cuda --repack-into .gpu/entries/base-sft > /dev/null
        for s in plain: freq05:--frequency-penalty_0.5; do
            tag=${s%%:*} flags=${s#*:}
            stage "validity_$tag" "$OUT/validity_sft_$tag.json" python3 -m bench.eval_engine --gguf "$W/sft/model.gguf" \
                --data "$S" --manifest "$M" --engine-entry .gpu/entries/base-sft --max-tokens 0 \
                --n-functions "$N_FUNCTIONS" --prompt-seed 0 ${flags//_/ } --out "$OUT/validity_sft_$tag.json"
        done
    )
fi
if python3 -c "import json, sys; sys.exit(0 if json.load(open('$W/data/data/corpus/summary.json')).get('exec') else 1)"; then
    stage exec_tasks "$OUT/exec_heldout_base.jsonl" python3 -m train.exec_tasks --manifest "$M" --split exec \
        --per-package "$PER_PKG" --out "$OUT/exec_heldout_base.jsonl"
    for m in base:"$R/model.gguf" sft:"$W/sft/model.gguf"; do
        name=${m%%:*} gguf=${m#*:}
        [ -f "$OUT/exec_heldout_base.jsonl" ] && stage "exec_$name" "$OUT/exec_$name.json" python3 -m train.eval \
            --suite exec --gguf "$gguf" --tasks "$OUT/exec_heldout_base.jsonl" --out "$OUT/exec_$name.json" $EXEC_ARGS
    done
else
    echo "no exec split in this corpus (EXEC_FRAC=0 in train_base_h200.sh): no execution tasks"
fi
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
