"""Chat evaluation with the compiled CPU engine (``runtime.engine.Engine``, read-only use; ``train`` may not import
``runtime``): the requests of an earlier ``train.chat_eval`` report (or any JSON with ``samples`` holding ``name``,
``file``, ``request``), greedy, 256 new tokens at most, stopping at control tokens, scored by
``train.chat_eval.score_answer``. Compiles the GGUF into a temporary directory (``jit_policy="readonly"``).

    python docs/train/sft/cpu/engine_eval.py models/small.gguf docs/train/sft/run1/chat_after.json out.json [N]
"""

import json
import sys
import time
from pathlib import Path

from model.gguf_io import read_gguf
from model.sampling import Generation, SamplingParams
from model.tokenizer import hf_from_spec
from runtime.engine import Engine
from train.chat_eval import requests_of, score_answer
from train.sft import render_chat

gguf, report, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
n = int(sys.argv[4]) if len(sys.argv) > 4 else 200
gg = read_gguf(gguf)
tok = hf_from_spec(gg.tokenizer)
t0 = time.time()
eng = Engine.from_gguf(gguf, threads=2, jit_policy="readonly")
stop = tuple(sorted(tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special))
params = SamplingParams(max_new_tokens=256, temperature=0.0, stop_token_ids=stop)
samples, counts = [], {"has_block": 0, "parses": 0, "defines": 0, "ok": 0, "hit_limit": 0}
for i, r in enumerate(requests_of(report)[:n]):
    prompt = render_chat([{"role": "user", "content": r["request"]}], gg.tokenizer.chat_template)
    res = Generation()
    gen = [t for t in eng.generate_tokens(tok.encode(prompt, add_special_tokens=False).ids, params, res)
           if t not in stop]  # fmt: skip
    text = tok.decode(gen, skip_special_tokens=True)
    score = score_answer(text, r["name"])
    for k in ("has_block", "parses", "defines", "ok"):
        counts[k] += score[k]
    counts["hit_limit"] += res.finish_reason == "length"
    samples.append(r | {"answer": text, "finish_reason": res.finish_reason, "tokens": len(gen)} | score)
    if i % 20 == 0:
        print(i, counts, round(time.time() - t0, 1), flush=True)
m = max(1, len(samples))
rates = {f"{k}_rate": v / m for k, v in counts.items() if k != "ok"}
rep = {"model": gguf, "generator": "runtime.engine (compiled, CPU, 2 threads), greedy", "requests": len(samples),
       "pass_rate": counts["ok"] / m} | rates | {"passed": counts["ok"], "samples": samples}  # fmt: skip
out.write_text(json.dumps(rep, indent=2) + "\n")
print(json.dumps({k: v for k, v in rep.items() if k != "samples"}))
