#!/usr/bin/env bash
# Build machine: pack what the GPU host needs to run our prebuilt CUDA modules with TVM's *runtime* only
# (no libtvm_compiler.so, which is too large to carry): the tvm Python package minus the compiler library and
# sources (~3 MB as tar.xz), the cp312 apache-tvm-ffi wheel and the gguf wheel (pure Python; the GPU host lacks it).
# Output: .gpu/rt/ (gitignored, carried by `device`); scripts/gpu_env.sh installs it there.
#   bash scripts/gpu_runtime_bundle.sh            then, on the GPU host: source scripts/gpu_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu/rt
mkdir -p "$out"
tvm_dir=$(python -c "import tvm, os; print(os.path.dirname(tvm.__file__))")
ffi_ver=$(python -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
if [ ! -f "$out/tvm_runtime.tar.xz" ]; then
  tar -C "$(dirname "$tvm_dir")" --exclude='tvm/lib/libtvm_compiler.so' --exclude='tvm/3rdparty' \
      --exclude='tvm/include' --exclude='tvm/src' --exclude='tvm/web' --exclude='__pycache__' \
      -cJf "$out/tvm_runtime.tar.xz" tvm
fi
ls "$out"/apache_tvm_ffi-*cp312*.whl >/dev/null 2>&1 || python -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$out" "apache-tvm-ffi==$ffi_ver"
gguf_ver=$(python -c "import importlib.metadata as m; print(m.version('gguf'))")
ls "$out"/gguf-*.whl >/dev/null 2>&1 || { cp .whl/gguf-"$gguf_ver"-*.whl "$out"/ 2>/dev/null || \
  python -m pip download -q --no-deps --only-binary=:all: -d "$out" "gguf==$gguf_ver"; }
du -sh "$out"/*
