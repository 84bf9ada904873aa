# Build machine at commit 284d11c (Engine.chain with the host-tracked ring count), then one device call on one H200,
# carrying .gpu/rt and .gpu/packed (456 s):
bash scripts/gpu_prepare.sh small nano-1b
bash scripts/gpu_prepare.sh bitnet-2b4t   # the 2B-4T shape from random weights (a model.config preset)
# parity with PyTorch, then bench.runtime: step-by-step decode and chained decode (tvm-chain) in the same process,
# 5 interleaved runs, the copy roof and a profiler trace of each
OUT=$OUT RUNS=5 SKIP_TORCH=1 CHAIN_BURST=16 NAMES="small nano-1b bitnet-2b4t" bash scripts/gpu_model.sh
