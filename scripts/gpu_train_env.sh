# GPU host, training scripts (sourced): the device image lacks the gguf package, so install its carried wheel
# (.whl/gguf-*.whl: `pip download gguf==0.19.0 --no-deps -d .whl`) into /tmp/site, and put it and the repository
# on PYTHONPATH.
if ! python3 -c "import gguf" 2> /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
