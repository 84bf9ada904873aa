#!/usr/bin/env bash
# Held-out pass@k of several GGUFs on one GPU host (one device call), side by side: the GPU samples each model's
# completions in large batches (train.eval --suite exec, --jobs-per-call 1024) and the host's cores, split between
# the models, run the checks in the sandbox. Writes exec_<name>.json per model (name: the GGUF's file name without
# .gguf) and logs.tgz to $OUT.
#   OUT=<results folder> bash scripts/exec_eval_h200.sh models/small.gguf runs/grpo.gguf ...   (device tool: carry
#   .whl, and the GGUFs where they are not in the repository: one 15.6 MB GGUF fits beside the 49 MB tree under the
#   64 MiB it may carry, two do not)
# NS samples per task (20), K (1,10), NEW max new tokens (128), HELDOUT the task file (v1: the shipped model's
# held-out split), SAMPLE tasks of it (0: all), DEADLINE seconds after which unfinished evaluations stop (570).
# CPU dry run: NS=2 K=1,2 NEW=16 SAMPLE=3 EVAL_ARGS="--device cpu" OUT=/tmp/o bash scripts/exec_eval_h200.sh models/small.gguf
set -euo pipefail
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
[ $# -gt 0 ] || { echo "usage: OUT=<folder> bash scripts/exec_eval_h200.sh A.gguf [B.gguf ...]" >&2; exit 2; }
HELDOUT=${HELDOUT:-bench/data/exec_heldout_v1.jsonl}
NS=${NS:-20} K=${K:-1,10} NEW=${NEW:-128} SAMPLE=${SAMPLE:-0} DEADLINE=${DEADLINE:-570}
EVAL_ARGS=${EVAL_ARGS:-}
W=${W:-/tmp/exec-eval}
CORES=$(nproc)
WK=$((CORES / $# > 0 ? CORES / $# : 1))
mkdir -p "$OUT" "$W"
trap '(cd "$W" && tar czf "$OUT/logs.tgz" log_*.txt 2> /dev/null) || true' EXIT
nvidia-smi -L 2> /dev/null || true
for g in "$@"; do
    name=$(basename "$g" .gguf)
    timeout "$DEADLINE" python3 -m train.eval --suite exec --tasks "$HELDOUT" --n "$NS" --k "$K" --max-new-tokens "$NEW" \
        --task-sample "$SAMPLE" --workers "$WK" --jobs-per-call 1024 --gguf "$g" --out "$OUT/exec_$name.json" \
        $EVAL_ARGS > "$W/log_$name.txt" 2>&1 &
done
wait || true
tail -n 2 "$W"/log_*.txt
