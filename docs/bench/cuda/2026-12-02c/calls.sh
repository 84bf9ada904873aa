# The 2B-4T shape on the H200 at 2166d5f+ (main after this session's CPU work; the CUDA code is that of acba2f4).
# Build machine:
bash scripts/gpu_prepare.sh bitnet-2b4t          # .gpu/rt + .gpu/packed/entries-bitnet-2b4t.tar.xz
# GPU host, through the device tool (carry .gpu/rt .gpu/packed):
OUT=$OUT NAMES=bitnet-2b4t RUNS=5 bash scripts/gpu_model.sh   # parity_bitnet-2b4t_cuda.json, runtime_bitnet-2b4t_cuda.json
