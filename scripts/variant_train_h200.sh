#!/usr/bin/env bash
# Architecture variants against their baseline at the same training compute (issue 21), on one H200 in one device
# call (< 9.5 minutes): build the corpus and shards with the shipped GGUF's tokenizer, train the presets of MODELS
# (the variants first, the baseline last; default "small-moe small": 8 ternary experts of 768, top 2, against the
# dense FFN of 1536; "small-mla small-deltanet small": latent attention and a DeltaNet hybrid against GQA) from
# scratch, one after the other, with the same data, steps, batch, sequence length, optimizer settings and seed, then
# export each (GGUF, exactness-checked) and score each on the same held-out tokens (train.eval: bits/byte on the val
# split's first EVAL_TOKENS tokens), and write to $OUT: ${NAME}_compare.json (the summary, each variant against the
# baseline; NAME default: moe), loss_<preset>.png, model_<preset>.gguf (only if < 16 MiB: "small" is ~15 MB,
# "small-moe" ~30 MB is left out) and runs.tgz (metrics, configs, evaluations, corpus and shard summaries, logs):
# 2 + 2 per preset files at most, within the 8 the device tool returns for up to three presets.
#   OUT=<results folder> bash scripts/variant_train_h200.sh                                (device tool: carry .whl)
#   OUT=<results folder> MODELS="small-mla small-deltanet small" NAME=attention STEPS=400 bash scripts/variant_train_h200.sh
# CPU dry run (a few minutes; ROOTS = two stdlib packages; one layer, no compile: Muon's bf16 Newton-Schulz takes
# seconds per matrix on a CPU, so the full presets need minutes per step there):
#   S=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])"); STEPS=2 BATCH=2 SEQ=64 EVAL_EVERY=1
#   LOOP_EVAL_TOKENS=512 EVAL_TOKENS=2048 DATA_MB=1 TRAIN_ARGS='--model {"n_layers":1}' EVAL_ARGS="--device cpu"
#   ROOTS=$S/asyncio,$S/email TIME=900 BUDGET=3600 OUT=/tmp/moe-o W=/tmp/moe-w bash scripts/variant_train_h200.sh
#
# Same compute = the same number of training TOKENS (a fixed step count, STEPS), not the same wall time:
# * small-moe's active FFN (2 of 8 experts of 768) equals small's FFN (1536), so both cost the same FLOPs per token
#   (train.train.flops_per_token: 201.5 M vs 201.3 M at seq 512; reported as flops_per_token). Equal steps at equal
#   batch are then equal tokens and equal training FLOPs; train.train.Batches draws batch (seed, step) as a pure
#   function of its arguments, so both models see the identical token windows, in the same order, at the same lr.
# * The lr schedule (warmup-stable-decay) spans --steps. A wall-clock budget would stop the slower model earlier, at
#   fewer tokens and mid-schedule (before or inside its decay), which mixes "slower implementation" with "worse
#   model". Speed is reported separately instead: tokens/s (steady: the median of the logged intervals after the
#   first, which holds the compilation; and overall: tokens / process wall time incl. start-up and compilation).
# * The loop also scores both on the same val tokens every EVAL_EVERY steps (val_loss, nats/token), so the curve is
#   compared at equal token counts too ("equal_tokens" in the JSON: every common step and the largest one).
# TIME is only a per-run safety cap (seconds, compilation included): a run that reaches it gets SIGTERM, train.train
# finishes the step in flight and checkpoints, the run is marked "interrupted", and the equal-token comparison
# falls back to the largest step at which both runs evaluated (the final bits/byte are then not at equal tokens, and
# the JSON says so). The caps also shrink to keep the whole script inside BUDGET seconds. Both train with
# TRAIN_ARGS (default --compile, as the shipped model did); a run that fails without a checkpoint (e.g. torch.compile
# of the MoE's data-dependent routing, which this CPU compiles with graph breaks but no GPU has tried) is retried
# once without --compile, and the JSON then shows it (compiled_attempt_failed, train_settings_differ).
# Sequential, not concurrent: two processes on one GPU time-slice, so each run's tokens/s would measure the other's
# load (the MoE, which syncs with the host per expert and layer, most of all); one after the other, each number is
# that model's own. The MoE runs first because its speed is the unknown (small: ~40 s of compilation, then
# 1.26 M tokens/s, docs/train/small).
# Data: built here from this host's stdlib + site-packages (ROOTS), like scripts/mtp_small_h200.sh and
# scripts/sft_small_h200.sh (train.sft --prepare-only): the GGUF's tokenizer is the one "small" was pretrained with,
# the val split (hence the held-out tokens) is docs/train/small's; DATA_MB of the train split is tokenized (default:
# twice the bytes the steps draw). Nothing else to carry: the shards for 600 steps would be ~80 MB.
set -euo pipefail
T0=$(date +%s)
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-/tmp/moe-train}
STEPS=${STEPS:-600} BATCH=${BATCH:-128} SEQ=${SEQ:-512} SEED=${SEED:-0}
WARMUP=${WARMUP:-$((STEPS / 10 < 100 ? STEPS / 10 : 100))}  # train.recipe's rule
EVAL_EVERY=${EVAL_EVERY:-50} LOOP_EVAL_TOKENS=${LOOP_EVAL_TOKENS:-262144} EVAL_TOKENS=${EVAL_TOKENS:-1000000}
TIME=${TIME:-240}      # per-run cap, s (safety, see above)
GRACE=${GRACE:-30}     # s between a capped run's SIGTERM and its SIGKILL
BUDGET=${BUDGET:-540}  # the whole script, s, worst case (the device call's limit is 570)
POST=${POST:-75}       # s kept for the exports, evaluations and summary after training
NEXT=${NEXT:-150}      # s kept for each run still to come
DATA_MB=${DATA_MB:-$((STEPS * BATCH * SEQ * 7 / 1000000 + 1))}  # 2 × ~3.5 bytes/token × tokens drawn
ROOTS=${ROOTS:-stdlib,site-packages}
GGUF=${GGUF:-models/small.gguf}  # only its tokenizer is used
TRAIN_ARGS=${TRAIN_ARGS---compile} EVAL_ARGS=${EVAL_ARGS:-} PREP_ARGS=${PREP_ARGS:-}
read -r -a MODELS <<< "${MODELS:-small-moe small}"  # the variants, then their baseline
NAME=${NAME:-moe}
mkdir -p "$OUT" "$W"
results() {  # on any exit: whatever exists so far, in few files (the device tool returns at most 8)
    for p in "${MODELS[@]}"; do
        cp "$W/$p/loss.png" "$OUT/loss_$p.png" 2> /dev/null || true
    done
    (cd "$W" && tar czf "$OUT/runs.tgz" --ignore-failed-read log_*.txt run_*.json train_*.json export_*.json \
        eval_*.json ./*/metrics.jsonl ./*/config.json data/data/corpus/summary.json data/data/shards/meta.json \
        2> /dev/null) || true
}
trap results EXIT
nvidia-smi -L 2> /dev/null || true
python3 -m train.sft --gguf "$GGUF" --out "$W/data" --roots "$ROOTS" --plain-mb "$DATA_MB" --prepare-only 1 \
    $PREP_ARGS > "$W/log_data.txt" 2>&1 || { tail -c 3000 "$W/log_data.txt"; exit 1; }
M=$W/data/data/corpus/manifest.jsonl S=$W/data/data/shards TOK=$W/data/data/tokenizer.json
echo "data: $(($(date +%s) - T0)) s, $(python3 -c "import json; print(json.load(open('$S/meta.json'))['splits'])")"
train_one() {  # preset, training flags beyond the common ones, seconds kept for the runs after it
    local p=$1 args=$2 keep=$3 cap t rc=0 wall c
    cap=$((BUDGET - ($(date +%s) - T0) - POST - keep - GRACE))
    cap=$((cap < TIME ? cap : TIME))
    if ((cap < 30)); then
        echo "{\"preset\": \"$p\", \"skipped\": \"no time left (cap $cap s)\"}" > "$W/run_$p.json"
        return 0
    fi
    t=$(date +%s.%N)
    timeout --foreground -s TERM -k "$GRACE" "$cap" python3 -m train.train --preset "$p" --data "$S" --out "$W/$p" \
        --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --seed "$SEED" --warmup-steps "$WARMUP" \
        --eval-every "$EVAL_EVERY" --eval-tokens "$LOOP_EVAL_TOKENS" --ckpt-every "$STEPS" --log-every 10 \
        $args > "$W/train_$p.json" 2> "$W/log_$p.txt" || rc=$?
    wall=$(python3 -c "import time; print(round(time.time() - $t, 2))")
    [[ " $args " == *" --compile "* ]] && c=true || c=false
    echo "{\"preset\": \"$p\", \"rc\": $rc, \"cap_s\": $cap, \"wall_s\": $wall, \"compile\": $c}" > "$W/run_$p.json"
    echo "$p: rc $rc, $wall s (cap $cap s); $(tail -n 1 "$W/$p/metrics.jsonl" 2> /dev/null | cut -c1-300)"
    return $rc
}
left=${#MODELS[@]}
for p in "${MODELS[@]}"; do
    left=$((left - 1))
    rc=0
    train_one "$p" "$TRAIN_ARGS" $((left * NEXT)) || rc=$?
    compiled=0
    [[ " $TRAIN_ARGS " == *" --compile "* ]] && compiled=1
    if ((rc != 0 && rc != 124 && rc != 137 && compiled)) && [ ! -d "$W/$p/checkpoints" ]; then
        # it failed without a checkpoint (e.g. torch.compile of the MoE's data-dependent routing): once more in eager
        # mode; the JSON's train_settings_differ then shows compile false/true, and its tokens/s are not comparable
        echo "$p failed (exit $rc): $(tail -c 600 "$W/log_$p.txt")"
        mv "$W/log_$p.txt" "$W/log_${p}_compile_failed.txt"
        mv "$W/run_$p.json" "$W/run_${p}_compile_failed.json"
        rm -rf "${W:?}/$p"
        train_one "$p" "${TRAIN_ARGS//--compile/}" $((left * NEXT)) || true
    fi
done
pids=()
post=$((BUDGET + 15 - ($(date +%s) - T0)))  # the exports and evaluations may not run past the budget (+15 s)
post=$((post < 30 ? 30 : post))
for p in "${MODELS[@]}"; do
    [ -d "$W/$p/checkpoints" ] || continue
    timeout "$post" python3 -m train.export --run "$W/$p" --tokenizer "$TOK" --out "$W/$p/model.gguf" \
        > "$W/export_$p.json" 2> "$W/log_export_$p.txt" &
    pids+=($!)
    timeout "$post" python3 -m train.eval --run "$W/$p" --tokenizer "$TOK" --data "$S" --manifest "$M" \
        --out "$W/eval_$p.json" --n-functions 0 --max-tokens "$EVAL_TOKENS" --seq-len "$SEQ" --batch-size 64 \
        $EVAL_ARGS > "$W/log_eval_$p.txt" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a job failed (exit $?): see log_export_*/log_eval_* in runs.tgz"; done
for p in "${MODELS[@]}"; do
    g=$W/$p/model.gguf
    if [ -f "$g" ] && (($(stat -c %s "$g") < 16777216)); then cp "$g" "$OUT/model_$p.gguf"; fi
done
python3 - "$OUT" "$W" "$STEPS" "$BATCH" "$SEQ" "$NAME" "${MODELS[@]}" << 'PY'
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from model.config import ModelConfig, get_config
from model.transformer import Transformer
from train.train import flops_per_token

out, w, steps, batch, seq, tag, models = (Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6],
                                         sys.argv[7:])


def load(p: Path):  # a JSON file, or None if missing, empty or torn (a killed run)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


res, curves, settings = {}, {}, {}
for name in models:
    run, cfg = load(w / f"run_{name}.json") or {}, load(w / name / "config.json")
    mp = w / name / "metrics.jsonl"
    rows = [json.loads(x) for x in mp.read_text().splitlines() if x] if mp.is_file() else []
    mc = ModelConfig(**cfg["model"]) if cfg else get_config(name)  # what the run trained (TRAIN_ARGS may --model)
    model = Transformer(mc)  # on the CPU, for its parameter counts and FLOPs per token
    total = sum(x.numel() for x in model.parameters())
    experts = sum(x.numel() for n, x in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * mc.ffn_active // mc.ffn_copies
    r = {"preset": name, "params_total": total, "params_active": active,
         "params_embedding": model.tok_emb.weight.numel(), "flops_per_token": flops_per_token(model, seq),
         "n_experts": mc.n_experts, "n_experts_used": mc.n_experts_used if mc.n_experts else 0,
         "kv_lora_rank": mc.kv_lora_rank, "full_attention_interval": mc.full_attention_interval,
         "kv_bytes_per_token": mc.kv_bytes_per_token} | run
    if failed := load(w / f"run_{name}_compile_failed.json"):
        r["compiled_attempt_failed"] = failed  # this run is the eager retry (log_<preset>_compile_failed.txt)
    trained = load(w / f"train_{name}.json")
    r["status"] = (trained or {}).get("status", "killed or failed" if rows else "not run")
    if trained or rows:  # the step reached (an interrupted run may stop between logged steps)
        r["steps"] = trained["step"] if trained else rows[-1]["step"]
        r["tokens_seen"] = r["steps"] * batch * seq * (cfg["train"]["grad_accum"] if cfg else 1)
    if rows:
        last = rows[-1]
        r |= {"last_logged_step": last["step"], "final_train_loss": last["loss"],
              "final_train_ce": last["ce"], "train_ce_mean_last5_logs": statistics.mean(x["ce"] for x in rows[-5:])}
        tps = [x["tokens_per_s"] for x in rows[1:]] or [rows[0]["tokens_per_s"]]
        r["tokens_per_s_steady"] = statistics.median(tps)  # median of logged intervals; the first (compile) left out
        prev, loop_s = 0, 0.0
        for x in rows:
            loop_s, prev = loop_s + (x["tokens"] - prev) / x["tokens_per_s"], x["tokens"]
        r["train_loop_s"] = loop_s  # steps only (no start-up, no loop evaluations); includes the compilation
        if run.get("wall_s"):
            r["tokens_per_s_wall"] = r["tokens_seen"] / run["wall_s"]  # process wall time: start-up, compile, evals
        if rows[-1].get("mfu") is not None:
            r["mfu_steady"] = statistics.median([x["mfu"] for x in rows[1:]] or [rows[0]["mfu"]])
        if "moe_aux" in last:
            r |= {"moe_aux_final": last["moe_aux"], "moe_load_max_final": last["moe_load_max"],
                  "moe_aux_mean_last5_logs": statistics.mean(x["moe_aux"] for x in rows[-5:]),
                  "moe_load_max_mean_last5_logs": statistics.mean(x["moe_load_max"] for x in rows[-5:]),
                  "moe_load_max_worst": max(x["moe_load_max"] for x in rows)}
    curves[name] = {x["step"]: x["val_loss"] for x in rows if "val_loss" in x}
    r["val_curve"] = [{"step": s, "tokens": s * batch * seq, "val_loss": v} for s, v in curves[name].items()]
    ev = load(w / f"eval_{name}.json")
    if ev:
        r["heldout"] = {k: ev[k] for k in ("val_loss", "bits_per_byte", "val_tokens", "val_bytes")}
        r["heldout"]["model"] = "the final checkpoint (float32 forward)"
    ex = load(w / f"export_{name}.json")
    if ex:
        r["gguf"] = {"bytes": ex["bytes"], "max_logit_gap": ex["max_logit_gap"],
                     "copied": (out / f"model_{name}.gguf").is_file()}
    if cfg:
        settings[name] = {k: v for k, v in cfg["train"].items() if k not in ("preset", "out")}
    res[name] = r
base = models[-1]  # the baseline; every model before it is a variant compared with it


def compare(variant: str) -> dict:
    common = sorted(set(curves[variant]) & set(curves[base]))
    both = variant in settings and base in settings
    keys = sorted(settings[variant].keys() | settings[base].keys()) if both else []
    differ = {k: [settings[variant].get(k), settings[base].get(k)] for k in keys
              if settings[variant].get(k) != settings[base].get(k)}  # fmt: skip
    cmp = {"same_train_settings": both and not differ, "train_settings_differ": differ,
           "equal_tokens": {"steps": common, "tokens": [s * batch * seq for s in common],
                            "val_loss": {n: [curves[n][s] for s in common] for n in (variant, base)},
                            "note": "train.train's loop evaluation: next-token CE (nats) on the val split's first "
                                    "eval_tokens tokens (end-of-text targets included), same tokens for both models"}}
    if common:
        s = common[-1]
        gap = curves[variant][s] - curves[base][s]
        cmp["equal_tokens"]["largest"] = {"step": s, "tokens": s * batch * seq, variant: curves[variant][s],
                                          base: curves[base][s], "variant_minus_baseline_nats": gap}
    hv, hb = res[variant].get("heldout"), res[base].get("heldout")
    if hv and hb:
        same = res[variant].get("tokens_seen") == res[base].get("tokens_seen")
        cmp["heldout_bits_per_byte"] = {variant: hv["bits_per_byte"], base: hb["bits_per_byte"],
                                        "variant_minus_baseline": hv["bits_per_byte"] - hb["bits_per_byte"],
                                        "variant_relative_pct": 100 * (hv["bits_per_byte"] / hb["bits_per_byte"] - 1),
                                        "at_equal_tokens": same, "note": "lower is better; > 0: the variant is worse"}
    if res[variant].get("tokens_per_s_steady") and res[base].get("tokens_per_s_steady"):
        cmp["variant_speed_vs_baseline"] = {k: res[variant][k] / res[base][k] for k in
                                        ("tokens_per_s_steady", "tokens_per_s_wall") if res[variant].get(k) and res[base].get(k)}
    return cmp


comparisons = {v: compare(v) for v in models[:-1]}
env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
summary = {"issue": 21, "variants": models[:-1], "baseline": base,
           "budget": {"steps": steps, "batch_size": batch, "seq_len": seq, "tokens": steps * batch * seq},
           "env": env, "train_settings": settings.get(base), "comparison": comparisons, "runs": res}
(out / f"{tag}_compare.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'preset':10} {'status':11} {'steps':>6} {'tokens':>11} {'tok/s':>10} {'train CE':>9} {'held-out bpb':>12}")
for n, r in res.items():
    bpb = r.get("heldout", {}).get("bits_per_byte", math.nan)
    print(f"{n:10} {r['status']:11} {r.get('steps', 0):6} {r.get('tokens_seen', 0):11} "
          f"{r.get('tokens_per_s_steady', math.nan):10.0f} {r.get('final_train_ce', math.nan):9.4f} {bpb:12.4f}")
for v, cmp in comparisons.items():
    brief = {k: x for k, x in cmp.items() if k != "equal_tokens"}
    print(v, json.dumps(brief | {"largest_equal_tokens": cmp["equal_tokens"].get("largest")}))
PY
echo "total $(($(date +%s) - T0)) s"
