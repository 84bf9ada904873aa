# GPU host (sourced): unpack the runtime bundle of scripts/gpu_runtime_bundle.sh (TVM's runtime, the tvm-ffi and gguf
# wheels) into /tmp/site and put it and the repository on PYTHONPATH; TVM then loads its runtime library only
# (TVM_USE_RUNTIME_LIB=1). Folders packed by scripts/gpu_pack.sh (.gpu/packed/*.tar.xz) are unpacked into .gpu/ first,
# once per machine (a marker per archive: unpacking again would undo a `compiler.build --repack-into` of the entry).
for t in .gpu/packed/*.tar.xz; do
  m=.gpu/.unpacked-$(basename "$t" .tar.xz)
  if [ -e "$t" ] && [ ! -e "$m" ]; then tar -C .gpu -xJf "$t" && touch "$m"; fi
done
site=/tmp/site
if [ ! -d "$site/tvm" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/rt/*.whl  # tvm-ffi, gguf
  tar -C "$site" -xJf .gpu/rt/tvm_runtime.tar.xz
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
