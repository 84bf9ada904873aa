# Build machine (this commit), then two device calls on one H200, carrying .gpu/rt and .gpu/packed:
bash scripts/gpu_prepare.sh small nano-1b
# call 1 (170 s): parity with PyTorch, then bench.runtime: step-by-step decode and chained decode (tvm-chain) in the
# same process, 5 interleaved runs, the copy roof and a profiler trace of each
OUT=$OUT RUNS=5 SKIP_TORCH=1 CHAIN_BURST=16 NAMES="small nano-1b" bash scripts/gpu_model.sh
# call 2 (25 s): generation on the held-out code prompts: plain, 1 and 3 drafts, chains of 16 (spec_small_cuda.json,
# committed as docs/speculative/chain_small_cuda.json)
OUT=$OUT DRAFTS="0 1 3" CHAIN_BURST=16 bash scripts/gpu_speculative.sh
