#!/usr/bin/env bash
# The bigger model (preset "base", ~89 M parameters, 3x "small"; issue 19) on one H200, over several device calls:
# each call trains until its time budget (SIGTERM: train.train finishes the step and checkpoints) and the next call
# resumes from that checkpoint, which stays in $W (an ignored folder of the repository, kept on the device machine
# between calls while it stays warm). The call in which the run reaches STEPS also scores it:
#   * export (train.export: GGUF, exactness-checked) and held-out bits/byte on the val split's first EVAL_TOKENS
#     tokens, for the new model and for models/small.gguf on the same tokens, at 512 tokens of context (the shipped
#     model's published setting, docs/train/small) and at each model's own context;
#   * code validity with the compiled CUDA engine (bench.eval_engine; .gpu/entries/base is built on the build machine
#     from random weights, here only repacked): the 200 held-out functions of docs/train/small (--prompt-seed 0),
#     plain greedy and with frequency penalty 0.5, for both models;
#   * $OUT: base_summary.json, runs.tgz (metrics, configs, evaluations, logs), loss.png and the GGUF in < 16 MiB parts
#     (base.gguf.part-aa, -ab, ...: `cat base.gguf.part-* > base.gguf`).
# Data: the corpus of this host's stdlib + site-packages and the shipped GGUF's tokenizer (so the val split and the
# bits/byte are docs/train/small's), all of the train split tokenized (~111 M tokens). EXEC_FRAC=F > 0 holds out a
# fraction F of the train files with doctests as the split "exec" (train.corpus --exec-file-frac; val unchanged),
# never trained on: the held-out execution tasks of issue 20 (scripts/sft_base_h200.sh mines and scores them).
# GPUs: NPROC (default: all of this host's) ranks under torchrun, BATCH sequences each (DDP; Muon's Newton-Schulz
# split over the ranks), so STEPS × BATCH × SEQ × NPROC tokens in all. Then: scripts/sft_base_h200.sh on the same
# machine (SFT, its scores, the exec tasks).
#
# Build machine first (nvcc, no GPU): bash scripts/gpu_prepare.sh small base   (.gpu/rt, .gpu/entries/{small,base})
# Then, device tool, carry .whl .gpu/rt .gpu/packed (the entries as tar.xz, unpacked by scripts/gpu_env.sh: with the
# entries themselves the trip is over its 64 MiB; not all of .gpu either: that would replace $W):
#   OUT=<results> STEPS=9000 bash scripts/train_base_h200.sh                  # call 1: data, then train
#   OUT=<results> STEPS=9000 RESUME_ONLY=1 bash scripts/train_base_h200.sh    # calls 2..n: resume, train, (score)
# RESUME_ONLY=1 stops at once when no checkpoint is here (the machine was given back between calls). STEPS may be
# changed between calls while the run is still before its decay (the last 30 % of STEPS): it is a resumable setting.
# CPU dry run (minutes): STEPS=2 BATCH=2 SEQ=64 EVAL_TOKENS=4096 N_FUNCTIONS=2 ROOTS=<a stdlib package> DEVICE=cpu
#   TRAIN_ARGS="--model {\"n_layers\":1}" W=/tmp/base-w OUT=/tmp/base-o bash scripts/train_base_h200.sh
set -euo pipefail
T0=$(date +%s)
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-.gpu/base-train}
STEPS=${STEPS:-9000} BATCH=${BATCH:-32} SEQ=${SEQ:-2048} SEED=${SEED:-0} WARMUP=${WARMUP:-200}
BUDGET=${BUDGET:-545}  # this call, s (the device call's limit is 600, minus start-up and the copy of $OUT)
POST=${POST:-200}      # s kept after training in the call that finishes the run: export, evaluations, validity
GRACE=${GRACE:-40}     # s between SIGTERM and SIGKILL (the step in flight and the checkpoint)
EVAL_TOKENS=${EVAL_TOKENS:-1000000} N_FUNCTIONS=${N_FUNCTIONS:-200} DEVICE=${DEVICE:-cuda}
ROOTS=${ROOTS:-stdlib,site-packages} RESUME_ONLY=${RESUME_ONLY:-0} EXEC_FRAC=${EXEC_FRAC:-0}
SMALL_VALIDITY=${SMALL_VALIDITY:-1}  # 0: skip models/small.gguf's validity (greedy on the same engine: same result)
SMALL_EVAL=${SMALL_EVAL:-1}  # 0: skip models/small.gguf's held-out bits/byte (the val split does not move with EXEC_FRAC)
PER_PKG=${PER_PKG:-20} MINE_WORKERS=${MINE_WORKERS:-12}  # the exec split's task mining, beside the training
NPROC=${NPROC:-$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)}
NPROC=$((NPROC > 0 ? NPROC : 1))
TRAIN_ARGS=${TRAIN_ARGS---compile}
mkdir -p "$OUT" "$W"
R=$W/base
if [ "$RESUME_ONLY" = 1 ] && [ ! -d "$R/checkpoints" ]; then
    echo "no checkpoint in $W: the device machine was given back since the last call; nothing done"
    exit 3
fi
miner=
results() {  # on any exit: what exists so far, in few files (the device tool returns at most 8)
    [ -z "$miner" ] || wait "$miner" || echo "exec mining: not finished in this call (its journal continues it)"
    cp "$W/exec_heldout.jsonl" "$OUT/exec_heldout.jsonl" 2> /dev/null || true
    cp "$R/loss.png" "$OUT/loss.png" 2> /dev/null || true
    (cd "$W" && tar czf "$OUT/runs.tgz" --ignore-failed-read log_*.txt train_*.json eval_*.json validity_*.json \
        export.json base/metrics.jsonl base/config.json data/data/corpus/summary.json data/data/shards/meta.json \
        2> /dev/null) || true
}
trap results EXIT
nvidia-smi -L 2> /dev/null || true
if [ ! -f "$W/data/data/shards/meta.json" ]; then
    mkdir -p "$W/data/data"
    python3 -m train.corpus --out "$W/data/data/corpus" --roots ${ROOTS//,/ } --exec-file-frac "$EXEC_FRAC" \
        > "$W/log_data.txt" 2>&1 || { tail -c 3000 "$W/log_data.txt"; exit 1; }
    python3 -m train.sft --gguf models/small.gguf --out "$W/data" --manifest "$W/data/data/corpus/manifest.jsonl" \
        --roots "$ROOTS" --plain-mb 100000 --prepare-only 1 >> "$W/log_data.txt" 2>&1 ||
        { tail -c 3000 "$W/log_data.txt"; exit 1; }
    echo "data: $(($(date +%s) - T0)) s"
fi
M=$W/data/data/corpus/manifest.jsonl S=$W/data/data/shards TOK=$W/data/data/tokenizer.json
if [ "$EXEC_FRAC" != 0 ] && [ ! -f "$W/exec_heldout.jsonl" ]; then
    # the held-out exec tasks (issue 20), mined on this host's CPUs while the GPU trains: at most PER_PKG candidates
    # a package, each verdict journaled, so a call that ends first is continued by the next; ends with this call
    nice -n 10 timeout "$((BUDGET - ($(date +%s) - T0) - 5))" python3 -m train.exec_tasks --manifest "$M" --split exec \
        --per-package "$PER_PKG" --workers "$MINE_WORKERS" --journal "$W/exec_journal.jsonl" \
        --out "$W/exec_heldout.jsonl" > "$W/log_exec_tasks.txt" 2>&1 &
    miner=$!
    echo "exec mining in the background (pid $miner, log_exec_tasks.txt)"
fi
python3 -c "import json; print('splits', json.load(open('$S/meta.json'))['splits'])"
done_steps() {  # the last logged step (0 if none); a SIGTERM checkpoint may be a few steps past it
    python3 -c "import json, sys; from pathlib import Path; p = Path('$R/metrics.jsonl'); \
rows = [json.loads(x) for x in p.read_text().splitlines() if x] if p.is_file() else []; print(rows[-1]['step'] if rows else 0)"
}
# train: the whole budget, or what is left after POST when this call can reach STEPS (rate of the last call)
left=$((BUDGET - ($(date +%s) - T0) - GRACE))
cap=$left
if python3 - "$R/metrics.jsonl" "$STEPS" "$((left - POST))" << 'PY'; then
import json, sys
from pathlib import Path
p, steps, avail = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(x) for x in p.read_text().splitlines() if x] if p.is_file() else []
if len(rows) < 3:
    sys.exit(1)  # no rate known yet: train the whole budget
rate = sorted(r["tokens_per_s"] for r in rows[1:])[len(rows[1:]) // 2] / rows[-1]["tokens"] * rows[-1]["step"]
need = (steps - rows[-1]["step"]) / rate + 60  # + start-up and compilation
print(f"{steps - rows[-1]['step']} steps left at {rate:.2f} steps/s: ~{need:.0f} s (available {avail:.0f} s)")
sys.exit(0 if need < avail else 1)
PY
    cap=$((left - POST))
fi
echo "training from step $(done_steps) to $STEPS on $NPROC GPU(s), cap $cap s"
rc=0
if ((NPROC > 1)); then run=(torchrun --standalone --nproc_per_node "$NPROC" -m); else run=(python3 -m); fi
timeout --foreground -s TERM -k "$GRACE" "$cap" "${run[@]}" train.train --preset base --data "$S" --out "$R" \
    --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --seed "$SEED" --warmup-steps "$WARMUP" \
    --eval-every 500 --eval-tokens 262144 --ckpt-every 1000 --log-every 25 $TRAIN_ARGS \
    > "$W/train_$(date +%s).json" 2>> "$W/log_train.txt" || rc=$?
now=$(done_steps)
echo "train: exit $rc, at step $now of $STEPS, $(($(date +%s) - T0)) s; $(tail -n 1 "$R/metrics.jsonl" | cut -c1-240)"
if ((now < STEPS)); then
    echo "not finished: call again with RESUME_ONLY=1"
    exit 0
fi
# --- the run is complete: export and score (each step capped so the call ends within its budget) ----------------------
post() { echo $((BUDGET + 20 - ($(date +%s) - T0))); }
timeout "$(post)" python3 -m train.export --run "$R" --tokenizer "$TOK" --out "$R/model.gguf" > "$W/export.json" \
    2> "$W/log_export.txt" || { tail -c 2000 "$W/log_export.txt"; exit 1; }
split -b 15M -d -a 1 "$R/model.gguf" "$OUT/base.gguf.part-"
models=(base:"$R/model.gguf")
[ "$SMALL_EVAL" = 1 ] && models+=(small:models/small.gguf)
for m in "${models[@]}"; do
    name=${m%%:*} gguf=${m#*:}
    for ctx in 512 2048; do  # small's own context is 1024: train.eval caps the windows at the model's context
        timeout "$(post)" python3 -m train.eval --gguf "$gguf" --data "$S" --manifest "$M" --n-functions 0 \
            --max-tokens "$EVAL_TOKENS" --seq-len "$ctx" --device "$DEVICE" --out "$W/eval_${name}_ctx$ctx.json" \
            > /dev/null 2>> "$W/log_eval.txt" || echo "eval $name $ctx failed: see log_eval.txt"
    done
done
(   # validity through the compiled CUDA engine: the TVM runtime bundle (scripts/gpu_env.sh) in this subshell only
    . scripts/gpu_env.sh
    python3 -m compiler.build --model "$R/model.gguf" --target cuda --repack-into .gpu/entries/base > /dev/null
    [ "$SMALL_VALIDITY" = 0 ] || [ -f .gpu/entries/small/params.npz ] ||
        python3 -m compiler.build --model models/small.gguf --target cuda --repack-into .gpu/entries/small > /dev/null
    models=(base:"$R/model.gguf")
    [ "$SMALL_VALIDITY" = 1 ] && models+=(small:models/small.gguf)
    for m in "${models[@]}"; do
        name=${m%%:*} gguf=${m#*:}
        for s in plain: freq05:--frequency-penalty_0.5; do
            tag=${s%%:*} flags=${s#*:}
            timeout "$(post)" python3 -m bench.eval_engine --gguf "$gguf" --data "$S" --manifest "$M" \
                --engine-entry ".gpu/entries/$name" --max-tokens 0 --n-functions "$N_FUNCTIONS" --prompt-seed 0 \
                ${flags//_/ } --out "$W/validity_${name}_$tag.json" > /dev/null 2>> "$W/log_validity.txt" ||
                echo "validity $name $tag failed: see log_validity.txt"
        done
    done
) || echo "validity stage failed"
python3 - "$OUT" "$W" << 'PY'
import json
import sys
from pathlib import Path

out, w = Path(sys.argv[1]), Path(sys.argv[2])


def load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


rows = [json.loads(x) for x in (w / "base/metrics.jsonl").read_text().splitlines() if x]
cfg = load(w / "base/config.json")
steady = rows[1:] or rows  # the first logged interval holds the compilation


def median(xs: list):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


summary = {"issue": 19, "note": "held-out windows are min(context_asked, the model's max_seq_len) tokens: small's is "
                                 "1024, base's 2048; validity: docs/train/small's 200 held-out functions, greedy", "preset": "base", "model": cfg["model"], "train": cfg["train"],
           "steps": rows[-1]["step"], "tokens_seen": rows[-1]["tokens"],
           "tokens_per_s_median": median([r["tokens_per_s"] for r in steady]),
           "mfu_median": median([r.get("mfu") for r in steady]),
           "val_curve": [{"step": r["step"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r],
           "export": load(w / "export.json"), "heldout": {}, "validity": {}}
for name in ("base", "small"):
    for ctx in (512, 2048):
        ev = load(w / f"eval_{name}_ctx{ctx}.json")
        if ev:
            summary["heldout"][f"{name}_ctx{ctx}"] = {k: ev.get(k) for k in ("val_loss", "bits_per_byte", "val_tokens",
                                                                             "val_bytes")} | {"context_asked": ctx}
    for tag in ("plain", "freq05"):
        ev = load(w / f"validity_{name}_{tag}.json")
        if ev:
            summary["validity"][f"{name}_{tag}"] = {k: ev["code"].get(k) for k in ("validity_rate", "validity_rate_trimmed",
                                                                              "valid", "functions", "hit_token_limit")}
(out / "base_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: summary[k] for k in ("steps", "tokens_seen", "tokens_per_s_median", "mfu_median", "heldout",
                                           "validity")}, indent=1))
PY
echo "total $(($(date +%s) - T0)) s"
