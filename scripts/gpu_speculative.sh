#!/usr/bin/env bash
# Speculative decoding on the GPU host: the shipped model (with its MTP heads) compiled for CUDA on the build machine,
# run with TVM's runtime only: (1) the compiled drafts (CUDA argmax and all) against the PyTorch heads' on the held-out
# prompts ($OUT/draft_parity.json); (2) bench.speculative over those prompts, plain decoding (0 drafts) against 1, 2
# and 3 drafted tokens per step, and plain greedy as device chains of $CHAIN_BURST (default 16; 0: none) steps
# (Engine.chain), plain and speculative with each of $CHAIN_DRAFTS drafts per call (default "1 2 3"; "": none),
# interleaved over $ROUNDS rounds, with the identical-token check; and prompt-lookup drafts, up to each of $LOOKUP
# (default "3 7"; "": none) a step, alone and with $LOOKUP_HEADS (default 1; 0: none) MTP drafts where lookup finds
# none (settings lK, lKdJ; CUDA's default LOOKUP_TOKENS stays 0 until these are measured).
# Build machine first: bash scripts/gpu_prepare.sh small   (→ .gpu/rt and .gpu/entries/small)
# then carry .gpu/rt and .gpu/entries/small and run: OUT=<results folder> bash scripts/gpu_speculative.sh
# JSON: $OUT/spec_small_cuda.json (committed as docs/speculative/spec_small_cuda.json); TEMPERATURE=T: every setting
# samples at T (prompt i with seed i), JSON $OUT/spec_small_cuda_tT.json.
# CPU smoke test (a CPU entry in $ENTRY; nothing is compiled): ENTRY=<cpu entry> NO_GPU=1 OUT=/tmp/o bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
ENTRY=${ENTRY:-.gpu/entries/small}
ROUNDS=${ROUNDS:-5} PROMPTS=${PROMPTS:-16} TOKENS=${TOKENS:-128} DRAFTS=${DRAFTS:-0 1 2 3}
if [ "${NO_GPU:-0}" != 1 ]; then
  source scripts/gpu_env.sh
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt"
  [ -f "$ENTRY/params.npz" ] || python3 -m compiler.build --model models/small.gguf --target cuda --repack-into "$ENTRY" > /dev/null
fi
python3 - "$ENTRY" "$OUT" <<'PY'
import json, sys
import numpy as np, torch
from model.gguf_io import read_gguf
from model.transformer import Transformer
from runtime.engine import Engine
entry, out = sys.argv[1:3]
eng = Engine(entry, "models/small.gguf", draft_tokens=0)
vd = eng.meta["draft_vocab"]
g = read_gguf("models/small.gguf")
model = Transformer.from_gguf_tensors(g.config, g.model_tensors()).eval()
prompts = [p["prompt"] for p in json.load(open("bench/data/heldout_code_prompts.json"))["prompts"]]
same = total = 0
for p in prompts:
    ids = eng.tokenize(p)
    eng.reset()
    tok = int(np.argmax(eng.prefill(ids)))
    got = eng.draft(eng.seq.hidden[None], [tok])[0].tolist()
    with torch.no_grad():
        gg, t, ref = model.hidden(torch.tensor([ids]))[:, -1:], tok, []
        for step in model.mtp:
            gg = step(gg, model.tok_emb(torch.tensor([[t]])))
            t = int(model.head(gg)[0, -1, :vd].argmax())  # over the compiled draft vocabulary
            ref.append(t)
    same += sum(a == b for a, b in zip(got, ref))
    total += len(ref)
json.dump({"prompts": len(prompts), "drafts": total, "same_as_pytorch": same, "draft_vocab": vd}, open(f"{out}/draft_parity.json", "w"))
print(f"compiled drafts equal to PyTorch's: {same}/{total}")
PY
python3 -m bench.speculative --entry "$ENTRY" --model models/small.gguf --draft-tokens $DRAFTS --rounds "$ROUNDS" \
  --n-prompts "$PROMPTS" --tokens "$TOKENS" --chain-burst "${CHAIN_BURST:-16}" --temperature "${TEMPERATURE:-0}" \
  --chain-drafts ${CHAIN_DRAFTS-1 2 3} --lookup-tokens ${LOOKUP-3 7} --lookup-heads "${LOOKUP_HEADS:-1}" \
  --json "$OUT/spec_small_cuda${TEMPERATURE:+_t$TEMPERATURE}.json"
