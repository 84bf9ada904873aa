#!/usr/bin/env bash
# Build machine: compress folders under .gpu/ for the trip to the GPU host (the device tool carries at most 64 MiB with
# the repository; a CUDA model.so of ~5 MB is ~0.3 MB as tar.xz). Each folder becomes .gpu/packed/<path with - for
# />.tar.xz; scripts/gpu_env.sh, which every GPU script sources, unpacks them back into .gpu/ on the GPU host.
#   bash scripts/gpu_pack.sh entries/small baseline/nano-1b       then carry .gpu/rt and .gpu/packed
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/packed
for p in "$@"; do
  [ -d ".gpu/$p" ] || { echo "no folder .gpu/$p" >&2; exit 2; }
  tar -C .gpu -cJf ".gpu/packed/${p//\//-}.tar.xz" "$p"
  echo ".gpu/packed/${p//\//-}.tar.xz <- .gpu/$p"
done
