# Build machine at commit cef676a (the warp-shuffle argmax: the final kernels of this session; the Gumbel noise from
# 23 hash bits), one device call on one H200 carrying .gpu/rt and .gpu/packed (220 s; no baseline: the device budget
# was spent):
bash scripts/gpu_prepare.sh small nano-1b
OUT=$OUT RUNS=5 SKIP_TORCH=1 CHAIN_BURST=16 NAMES="small nano-1b" bash scripts/gpu_model.sh
TEMPERATURE=0.8 DRAFTS="0" CHAIN_BURST=16 ROUNDS=5 OUT=$OUT bash scripts/gpu_speculative.sh   # spec_small_cuda_t0.8.json
