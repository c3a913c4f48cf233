"""Where does TTFT go? LLaMA-2-7B shape, random bf16 weights: TTFT with the first decode step enqueued
before vs after reading the first token, and the prefill executable alone (device + host), per length."""
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import jax  # noqa: E402

from hybrid_jax import weights  # noqa: E402
from hybrid_jax.config import PRESETS  # noqa: E402
from hybrid_jax.engine import Engine, generate  # noqa: E402
from gpu_prefill_host import reset_then_prefill  # noqa: E402  (this folder)

from hybrid_jax.config import LlamaConfig  # noqa: E402
cfg = PRESETS.get(sys.argv[1] if len(sys.argv) > 1 else "llama2-7b") or LlamaConfig(vocab_size=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=512)
lengths = [10, 100, 500]
t0 = time.perf_counter()
params = weights.init_random(cfg, jax.random.PRNGKey(0))
jax.block_until_ready(params)
t1 = time.perf_counter()
eng = Engine(cfg, params, max_seq_len=1024, cache_dir=tempfile.mkdtemp(), prefill_buckets=(16, 128, 512, 1024),
             compile_sampling=False)
t2 = time.perf_counter()
for b in (16, 128, 512):
    eng.runtime._get_async(("prefill", b, b))
eng.wait_background()
t3 = time.perf_counter()
res = {"device": jax.devices()[0].device_kind, "init_s": t1 - t0, "engine_build_s": t2 - t1, "buckets_s": t3 - t2,
       "stats": eng.stats()}
rt = eng.runtime
rng = np.random.RandomState(0)
for n in lengths:
    ids = [int(x) for x in rng.randint(3, cfg.vocab_size, size=n)]
    row = {}
    for mode in ("lookahead", "read_first", "lookahead", "read_first"):
        eng.lookahead_first = mode == "lookahead"
        ts = []
        for _ in range(12):
            r = generate(eng, ids, max_new_tokens=4, ignore_eos=True)
            ts.append(r.timings.ttft_s)
        row.setdefault(mode, []).append(float(np.median(ts[2:]) * 1e3))
    th = [reset_then_prefill(rt, ids) for _ in range(12)]
    row["prefill_only_ms"] = float(np.median([x[2] for x in th[2:]]) * 1e3)
    row["host_reset_ms"] = float(np.median([x[0] for x in th[2:]]) * 1e3)
    row["host_prefill_enqueue_ms"] = float(np.median([x[1] for x in th[2:]]) * 1e3)
    res[n] = row
    print(n, row, flush=True)
eng.lookahead_first = True
res["pipelined_ms"] = eng.pipelined_step_seconds(200) * 1e3
print(json.dumps(res))
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "ttft_probe.json"), "w"))
