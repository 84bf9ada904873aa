#!/usr/bin/env bash
# Issue 20's held-out execution tasks, mined on the GPU host's CPUs alone (no training beside it): the corpus of this
# host's stdlib + site-packages with the exec split that the GPU runs' `base` models never trained on
# (train.corpus --exec-file-frac EXEC_FRAC, a salted hash of file names: the same host image gives the same manifest,
# checked here against bench/data/exec_heldout_v2.jsonl's header), then train.exec_tasks on that split with at most
# PER_PKG candidates a package, WORKERS sandboxes at once. The mining journals each verdict, so a call that ends
# first is continued by the next while the machine stays warm, or on a fresh machine from the journal it returned
# (carry it as .gpu/seed/exec_journal.jsonl).
#   OUT=<results> bash scripts/exec_mine_h200.sh          # device tool, carry .whl (the gguf wheel) [.gpu/seed]
# $OUT: exec_heldout.jsonl (when finished), exec_journal.jsonl, log_exec_mine.txt.
# CPU dry run: ROOTS=<a stdlib package> PER_PKG=2 W=/tmp/mine-w OUT=/tmp/mine-o bash scripts/exec_mine_h200.sh
set -euo pipefail
T0=$(date +%s)
. scripts/gpu_train_env.sh
OUT=${OUT:?set OUT to a results folder}
W=${W:-.gpu/exec-mine}
EXEC_FRAC=${EXEC_FRAC:-0.5} PER_PKG=${PER_PKG:-60} WORKERS=${WORKERS:-$(nproc)}
ROOTS=${ROOTS:-stdlib,site-packages} BUDGET=${BUDGET:-560} REF=${REF:-bench/data/exec_heldout_v2.jsonl}
mkdir -p "$OUT" "$W"
LOG=$OUT/log_exec_mine.txt
finish() {
    cp "$W/exec_journal.jsonl" "$OUT/" 2> /dev/null || true
    cp "$W/exec_heldout.jsonl" "$OUT/" 2> /dev/null || true
}
trap finish EXIT
if [ ! -f "$W/corpus/manifest.jsonl" ]; then
    python3 -m train.corpus --out "$W/corpus" --roots ${ROOTS//,/ } --exec-file-frac "$EXEC_FRAC" > "$LOG" 2>&1 ||
        { tail -c 3000 "$LOG"; exit 1; }
    echo "corpus: $(($(date +%s) - T0)) s" | tee -a "$LOG"
fi
M=$W/corpus/manifest.jsonl
python3 - "$M" "$REF" << 'PY' | tee -a "$LOG"
import hashlib, sys
from train.exec_tasks import read_header
sha = hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()
ref = read_header(sys.argv[2]).get("manifest_sha256")
print(f"manifest sha256 {sha[:16]}…: {'the same as' if sha == ref else 'DIFFERENT from'} {sys.argv[2]}'s")
PY
[ -f "$W/exec_journal.jsonl" ] || cp .gpu/seed/exec_journal.jsonl "$W/" 2> /dev/null || true
timeout "$((BUDGET - ($(date +%s) - T0)))" python3 -m train.exec_tasks --manifest "$M" --split exec \
    --per-package "$PER_PKG" --workers "$WORKERS" --journal "$W/exec_journal.jsonl" \
    --out "$W/exec_heldout.jsonl" >> "$LOG" 2>&1 || echo "mining stopped (rc $?): the journal continues it" | tee -a "$LOG"
tail -c 2500 "$LOG"
echo "total: $(($(date +%s) - T0)) s"
