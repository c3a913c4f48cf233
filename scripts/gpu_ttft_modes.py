"""Why is TTFT at 100 tokens bimodal in the latency suite (7.1-7.5 or 9.4-10.5 ms, run 22), at the same
reps in both hybrid systems? Per request: the host time of the prefill call, then the time to the first
token, 128 decode steps after each (LLaMA-2-7B shape, random bf16), for the suite's own prompts (one per
rep, twice over) and for one prompt repeated; then per suite prompt generate()'s TTFT and the prefill's
device time alone. Slow reps that follow the prompt point at the data; a slow request with a slow prefill
call at the host side."""
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402

from hybrid_jax import weights  # noqa: E402
from hybrid_jax.config import PRESETS, LlamaConfig  # noqa: E402
from hybrid_jax.generate import Engine, generate  # noqa: E402

cfg = PRESETS.get(sys.argv[1] if len(sys.argv) > 1 else "llama2-7b") or LlamaConfig(
    vocab_size=512, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=512)
params = weights.init_random(cfg, jax.random.PRNGKey(0))
eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp(), compile_sampling=False)
rt = eng.runtime
rt._get(("prefill", 128, 128))
from bench.worker import prompt_ids  # noqa: E402

fixed = [int(t) for t in np.random.RandomState(0).randint(3, cfg.vocab_size, size=100)]
out = {"device": jax.devices()[0].device_kind}
# the suite's prompts (one per rep, as bench.latency sends them), twice; then one prompt repeated
for name, new in (("suite", 128), ("suite", 128), ("fixed", 128)):
    rows = []
    for rep in range(15):
        ids = prompt_ids(cfg.vocab_size, 100, rep, 0) if name == "suite" else fixed
        t0 = time.perf_counter()
        state, tok = rt.prefill(rt.state, ids, request=(0, 0.0, None, None))
        t1 = time.perf_counter()
        pos = len(ids)
        state, nxt = rt.decode(state, rt.decode_spec(pos, False))
        t2 = time.perf_counter()
        int(np.asarray(tok))
        t3 = time.perf_counter()
        for i in range(new - 2):
            pos += 1
            state, nxt2 = rt.decode(state, rt.decode_spec(pos, False))
            int(np.asarray(nxt))
            nxt = nxt2
        int(np.asarray(nxt))
        rt.state = state
        rows.append({"call_ms": (t1 - t0) * 1e3, "decode_enqueue_ms": (t2 - t1) * 1e3, "ttft_ms": (t3 - t0) * 1e3})
    out.setdefault(name, []).append(rows)
    print(name, [(round(r["ttft_ms"], 2), round(r["call_ms"], 2), round(r["decode_enqueue_ms"], 2)) for r in rows], flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ttft_modes.json"), "w"))

# per suite prompt: generate()'s own TTFT (the suite's path), and the prefill's device time alone (5 of
# that prompt back to back, no reads): slow prompts with slow device time mean data-dependent device work
rows = []
for rep in range(15):
    ids = prompt_ids(cfg.vocab_size, 100, rep, 0)
    ttft = generate(eng, ids, max_new_tokens=128, ignore_eos=True).timings.ttft_s
    st = rt.state
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(5):
        st, tok = rt.prefill(st, ids, request=(0, 0.0, None, None))
    tok.block_until_ready()
    rt.state = st
    rows.append({"generate_ttft_ms": ttft * 1e3, "prefill_device_ms": (time.perf_counter() - t0) / 5 * 1e3})
out["per_prompt"] = rows
print("per prompt (generate TTFT, prefill device)", [(round(r["generate_ttft_ms"], 2), round(r["prefill_device_ms"], 2))
                                                     for r in rows], flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ttft_modes.json"), "w"))
