#!/usr/bin/env bash
# RL from execution feedback for the shipped model on one H200 (one device call, about 9 minutes): GRPO and MaxRL
# side by side on a train-split task file for TIME seconds each, while the starting model's held-out pass@k runs beside
# them; then the held-out pass@k of both results. Writes the three pass@k reports, both GGUFs and runs.tgz (metrics,
# curves, summaries, logs) to $OUT.
#   OUT=<results folder> TASKS=<train-split task file> bash scripts/rl_small_h200.sh      (device tool: carry .whl)
# The train-split tasks come from the build machine (python -m train.exec_tasks --split train ...; their modules must
# exist on the GPU host too: tasks whose check fails there only ever score 0, which GRPO's groups ignore).
# Budget: TIME, then ~40 s of export, then both after-RL evaluations, which on v1 in full (NS=10, 8 sandboxes each) take
# ~170 s: TIME=300 did not leave them room before a 520 s DEADLINE on an H100 host (docs/train/rl, second round).
# NS=0: RL only, the host's cores split between the two runs (score the models after with scripts/exec_eval_h200.sh).
# CPU dry run: TIME=20 NS=2 NEW=16 SAMPLE=2 RL_ARGS="--device cpu --prompts-per-step 2 --group-size 2" \
#   EVAL_ARGS="--device cpu" OUT=/tmp/o W=/tmp/w TASKS=<file> bash scripts/rl_small_h200.sh
set -euo pipefail
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
TASKS=${TASKS:?set TASKS to a train-split task file}
W=${W:-/tmp/rl-small}
GGUF=${GGUF:-models/small.gguf}
HELDOUT=${HELDOUT:-bench/data/exec_heldout_v1.jsonl}
TIME=${TIME:-270}        # seconds of RL per algorithm (the run exports the model as it stands then)
STEPS=${STEPS:-30}       # the learning-rate schedule's length (warmup, then linear decay over its last 30 %)
NS=${NS:-10} K=${K:-1,10} NEW=${NEW:-160} SAMPLE=${SAMPLE:-24}  # held-out pass@k: samples, k, tokens, tasks
RL_ARGS=${RL_ARGS:-"--prompts-per-step 4 --group-size 16 --max-new-tokens 128"}
EVAL_ARGS=${EVAL_ARGS:-}
DEADLINE=${DEADLINE:-570}  # seconds after the start by which the after-RL evaluations are stopped (device calls: 600)
CORES=$(nproc)
JOBS=$((NS > 0 ? 3 : 2))  # the jobs that run at once: both RL runs and, with NS > 0, the starting model's pass@k
WK=$((CORES / JOBS > 0 ? CORES / JOBS : 1))  # sandbox processes for each
mkdir -p "$OUT" "$W"
results() {  # on any exit, whatever exists so far, in at most 6 files (the device tool brings back 8)
    for a in grpo maxrl; do
        cp "$W/$a/model.gguf" "$OUT/${a}.gguf" 2> /dev/null || true
    done
    (cd "$W" && tar czf "$OUT/runs.tgz" --ignore-failed-read log_*.txt */metrics.jsonl */rl_curves.png \
        */rl_summary.json */config.json 2> /dev/null) || true
}
trap results EXIT
nvidia-smi -L 2> /dev/null || true
python3 -m train.sandbox --isolation > "$W/log_isolation.txt" 2>&1 || true
EVAL=(--suite exec --tasks "$HELDOUT" --n "$NS" --k "$K" --max-new-tokens "$NEW" --task-sample "$SAMPLE"
      --workers "$WK")
for a in grpo maxrl; do
    python3 -m train.rl --algo $a --gguf "$GGUF" --tasks "$TASKS" --out "$W/$a" --steps "$STEPS" --time-limit-s "$TIME" \
        --workers "$WK" $RL_ARGS > "$W/log_$a.txt" 2>&1 &
done
if [ "$NS" -gt 0 ]; then
    python3 -m train.eval "${EVAL[@]}" --gguf "$GGUF" --out "$OUT/exec_before.json" $EVAL_ARGS \
        > "$W/log_before.txt" 2>&1 &
fi
wait
results  # the models now, in case the evaluations below run out of time
[ "$NS" -gt 0 ] || exit 0
LEFT=$((DEADLINE - SECONDS > 1 ? DEADLINE - SECONDS : 1))
for a in grpo maxrl; do
    timeout "$LEFT" python3 -m train.eval "${EVAL[@]}" --gguf "$W/$a/model.gguf" --out "$OUT/exec_after_$a.json" \
        $EVAL_ARGS > "$W/log_after_$a.txt" 2>&1 &
done
wait || true
tail -n 3 "$W"/log_*.txt
