#!/usr/bin/env bash
# Build machine (nvcc, no GPU needed): everything the GPU scripts read, under .gpu/ (gitignored; carry it with
# `device`): TVM's runtime bundle and the wheels the GPU host lacks (.gpu/rt, scripts/gpu_runtime_bundle.sh) and the
# CUDA modules of the shipped model and of nano-1b (random weights), model.so + meta.json in .gpu/entries/<name>
# (the GPU host repacks the weights from the GGUF: compiler.build --repack-into), each also compressed into
# .gpu/packed/ (scripts/gpu_pack.sh: carry .gpu/rt and .gpu/packed, well under the device tool's 64 MiB). Then, on the
# GPU host:
#   OUT=<results folder> bash scripts/gpu_model.sh
#   bash scripts/gpu_prepare.sh [small] [nano-1b] [bitnet-2b4t]   (default: small nano-1b; any preset of
#   model.config.PRESETS is built from random weights, e.g. bitnet-2b4t, the BitNet b1.58 2B-4T shape)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu_runtime_bundle.sh
names=${*:-small nano-1b}
for name in $names; do
  case $name in
    small) gguf=models/small.gguf ;;
    *) gguf=/tmp/$name.gguf; python -m model.random_model --preset "$name" --out "$gguf" > /dev/null ;;
  esac
  entry=$(python -m compiler.build --model "$gguf" --target cuda | tail -1)
  mkdir -p ".gpu/entries/$name"
  cp "$entry/model.so" "$entry/meta.json" ".gpu/entries/$name/"
  echo ".gpu/entries/$name <- $entry"
  bash scripts/gpu_pack.sh "entries/$name"
done
