# Build machine at commit 697502b (the warp-per-row LM head, the 1024-thread shared-tree argmax, sampled chains), one
# device call on one H200 carrying .gpu/rt and .gpu/packed (458 s). The baseline: the CUDA modules of call 3 of
# 2026-12-02 (2026-12-02e, compiler of 284d11c, unchanged through db87055), run by db87055's own source:
bash scripts/gpu_prepare.sh small nano-1b bitnet-2b4t                  # this commit's modules, .gpu/entries
# .gpu/baseline/<name>: the earlier modules; .gpu/basesrc: `git archive db87055 compiler runtime model bench targets
# pyproject.toml`; each packed by scripts/gpu_pack.sh (baseline/small ... basesrc)
OUT=$OUT RUNS=5 SKIP_TORCH=1 CHAIN_BURST=16 BASELINE=.gpu/baseline BASELINE_SRC=.gpu/basesrc NAMES="small nano-1b" \
  bash scripts/gpu_model.sh
TEMPERATURE=0.8 DRAFTS="0" CHAIN_BURST=16 OUT=$OUT bash scripts/gpu_speculative.sh   # spec_small_cuda_t0.8.json
