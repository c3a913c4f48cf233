"""Speculative decoding (prompt lookup) on one device: what a verify step costs, and what it gives.

    python -m bench.probes.spec_check --shape llama2-7b            # step costs, random weights
    python -m bench.probes.spec_check --model DIR [--hf-gguf FILE]  # real model: tokens/s, identical output
    python -m bench.probes.spec_check --project REAL.json --costs COSTS.json  # a shape's projected tokens/s

Step costs (random weights, so acceptance is whatever it is: only the cost is read): a prompt of 100 tokens,
then `--steps` steps enqueued back to back and waited for at the end (the device's time a step), for the
one-token decode step and verify steps of K = 4 and 8 (5 and 9 rows). The tokens/s such a verify step would
give on a real model is projected from its cost and the acceptance measured on one (`--project`, marked as a
projection): each prompt's verify steps, and the one-token steps its remaining tokens took, at the costs of the
other shape.

Real model: each prompt of bench/workloads/speculative.json ("grounded": answers that copy from the prompt;
"chat": open questions), greedy, up to --new-tokens, EOS honoured, through generate(): plain decode, and
prompt lookup at K = 4 and 8 (back-off off, and on). Decode tokens/s = (tokens - 1) / (total - TTFT), median of
--reps. Output equality with plain decode is counted per prompt. With --hf-gguf, HF transformers (bf16, eager)
on the same prompts, with and without its prompt lookup (prompt_lookup_num_tokens), as a peer.
Writes spec_check.json and prints a table.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from bench.probes.harness import parse, parser, random_engine, random_params, run_record, shape_config, write_json
from bench.worker import DRAFT_DIMS  # the draft's shape: random weights, only its cost is read

WORKLOADS = Path(__file__).resolve().parents[1] / "workloads" / "speculative.json"
KS = (4, 8)


def _options(**kw):
    """The engine's options (auto), or on the CPU the kernels interpreted (a dry run of the GPU's paths)."""
    import jax

    from hybrid_jax.options import KernelOptions
    if jax.default_backend() == "cpu":
        kw = dict(gemv="interpret", decode_attention="interpret", chunk_attention="interpret", **kw)
    return KernelOptions(**kw)


def step_costs(cfg, steps: int, draft: bool = True) -> dict:
    """ms a step: decode, verify K = 4 and 8 (verify_k{K}) and (with `draft`) a draft iteration (K = 4)."""
    import tempfile

    import numpy as np

    params = random_params(cfg)
    dcfg = cfg.replace(**DRAFT_DIMS)
    dparams = random_params(dcfg, seed=1)
    cache = tempfile.mkdtemp()  # the engines share their prefill and decode executables
    out = {"draft_params": dcfg.n_params}
    runs = [(0, None)] + [(k, "ngram") for k in KS] + ([(4, "draft")] if draft else [])
    for k, kind in runs:
        eng, _ = random_engine(cfg, params, lengths=(100,), max_seq_len=1024, compile_sampling=False, cache_dir=cache,
                               speculative=kind, num_speculative_tokens=k or 4,
                               draft=(dcfg, dparams) if kind == "draft" else None,
                               options=_options())
        rt = eng.runtime
        ids = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, 100)]
        spec = (rt.verify_kind, rt.cache_len, k, False) if k else ("decode", rt.cache_len, False)
        times = [eng.step_seconds([spec], steps, ids)[0] for _ in range(3)]
        name = "decode" if not k else (f"verify_k{k}" if kind == "ngram" else f"draft_k{k}")
        out[name] = round(statistics.median(times) * 1e3, 4)
        eng.close()
        del eng
    for name in [n for n in out if n.startswith(("verify_", "draft_k"))]:
        out[f"{name}_over_decode"] = round(out[name] / out["decode"], 3)
    return out


def exactness(cfg, k: int = 8, prompt: int = 100) -> dict:
    """How far a verify step's rows are from the decode step's: after a `prompt`-token prefill, K + 1 tokens as
    one-token steps (the decode step's options) against one K + 1-row chunk (the verify step's options), random
    weights. Logits and written cache rows compared; the largest differences reported. The weights are the
    programs' arguments, not constants folded into them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hybrid_jax import kv_cache, model

    params = random_params(cfg)
    eng, _ = random_engine(cfg, params, max_seq_len=1024, compile_sampling=False, options=_options())
    rt = eng.runtime
    od = rt.step_options(("decode", rt.cache_len, False))
    ov = rt.step_options((rt.verify_kind, rt.cache_len, k, False))
    n = rt.cache_len
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, prompt + k + 1), jnp.int32)
    _, cache0 = jax.jit(lambda w, c, t, p: model.forward(cfg, w, c, t, p))(
        params, kv_cache.zeros(cfg, n), ids[:prompt], jnp.arange(prompt, dtype=jnp.int32))
    step = jax.jit(lambda w, c, t, p: model.forward(cfg, w, c, t, p, n, od))
    cache, one = cache0, []
    for i in range(prompt, prompt + k + 1):
        lg, cache = step(params, cache, ids[i:i + 1], jnp.asarray([i], jnp.int32))
        one.append(np.asarray(lg[0]))
    one = np.stack(one)
    pos = jnp.arange(prompt, prompt + k + 1, dtype=jnp.int32)
    chunk, cache_c = jax.jit(lambda w, c, t, p: model.forward(cfg, w, c, t, p, n, ov))(params, cache0, ids[prompt:],
                                                                                       pos)
    chunk = np.asarray(chunk)
    kv = [np.asarray(a[:, prompt:prompt + k + 1], np.float32) for a in (cache.k, cache.v, cache_c.k, cache_c.v)]
    eng.close()
    return {"rows": k + 1, "chunk_logits_equal": bool(np.array_equal(chunk, one)),
            "chunk_cache_equal": bool(np.array_equal(kv[0], kv[2]) and np.array_equal(kv[1], kv[3])),
            "chunk_max_abs_diff": float(np.max(np.abs(chunk - one))),
            "chunk_argmax_equal": bool((chunk.argmax(-1) == one.argmax(-1)).all())}


def _gen(eng, prompt, new, reps, **kw):
    import hybrid_jax
    runs = [hybrid_jax.generate(eng, prompt, max_new_tokens=new, **kw) for _ in range(reps + 1)][1:]
    tps = [(len(r.token_ids) - 1) / max(r.timings.total_s - r.timings.ttft_s, 1e-9) for r in runs]
    r = runs[-1]
    return {"tok_s": round(statistics.median(tps), 1), "tokens": len(r.token_ids), "ids": r.token_ids,
            "verify_steps": r.timings.verify_steps, "accepted": r.timings.accepted, "proposed": r.timings.proposed}


def real_model(path: str, new: int, reps: int, draft: str | None = None) -> dict:
    import hybrid_jax

    work = json.loads(WORKLOADS.read_text())
    # nothing compiles beside the timed decode (a prompt goes through the chunks it finds: TTFT is not timed)
    kw = dict(max_seq_len=1024, compile_sampling=False, background_compiles=False, kv_reuse=False)
    engines = {"plain": hybrid_jax.load(path, **kw)}
    for k in KS:
        engines[f"ngram_k{k}"] = hybrid_jax.load(path, speculative="ngram", num_speculative_tokens=k, **kw)
    if draft:
        engines["draft_k4"] = hybrid_jax.load(path, speculative="draft", draft=draft, num_speculative_tokens=4, **kw)
    res = {"break_even": {n: round(e.spec_break_even, 3) for n, e in engines.items() if e.speculative}}
    for wl in ("grounded", "chat"):
        rows = []
        for prompt in work[wl]:
            row = {"prompt": prompt[:60]}
            base = _gen(engines["plain"], prompt, new, reps)
            row["plain"] = {k: v for k, v in base.items() if k != "ids"}
            if draft:
                r = _gen(engines["draft_k4"], prompt, new, reps)
                r["same_as_plain"] = r.pop("ids") == base["ids"]
                row["draft_k4"] = r
            for k in KS:
                e = engines[f"ngram_k{k}"]
                for adapt in (False, True):
                    saved = e.spec_break_even
                    if not adapt:
                        e.spec_break_even = 0.0
                    try:
                        r = _gen(e, prompt, new, reps)
                    finally:
                        e.spec_break_even = saved
                    r["same_as_plain"] = r.pop("ids") == base["ids"]
                    row[f"ngram_k{k}" + ("_adaptive" if adapt else "")] = r
            rows.append(row)
        res[wl] = rows
    return res


def _step_costs(rec: dict) -> dict:
    """decode and verify_k{K} ms from a step-costs record: this probe's (`step_ms`) or chunk_check's (its
    "kernel" variant, the default attention)."""
    if "step_ms" in rec:
        return rec["step_ms"]
    if "variants" in rec:
        return rec["variants"]["kernel"]
    raise ValueError("the costs file has neither step_ms (spec_check) nor variants (chunk_check)")


def project(real: dict, costs: dict) -> dict:
    """A PROJECTION of prompt lookup's decode tokens/s on another shape: the verify steps and the one-token steps
    of each prompt in `real` (a --model run's record), timed at that shape's step costs (`costs`, ms). Tokens
    from a verify step = its accepted proposals + 1; the rest of the decoded tokens (tokens - 1, the first is
    the prefill's) came from one-token steps. Per workload and column: summed tokens over summed time, and the
    ratio to plain decode (one step a token). The back-off's decisions are the measured model's."""
    c = _step_costs(costs)
    out = {"decode_ms": c["decode"], "plain_tok_s": round(1e3 / c["decode"], 1)}
    for wl in ("grounded", "chat"):
        cols = {}
        for row in real["real"][wl]:
            for name, r in row.items():
                if not name.startswith("ngram_k"):
                    continue
                k = int(name[len("ngram_k"):].split("_")[0])
                decoded = r["tokens"] - 1
                single = max(0, decoded - r["accepted"] - r["verify_steps"])
                ms = r["verify_steps"] * c[f"verify_k{k}"] + single * c["decode"]
                t = cols.setdefault(name, {"tokens": 0, "plain_ms": 0.0, "ms": 0.0})
                t["tokens"] += decoded
                t["plain_ms"] += decoded * c["decode"]
                t["ms"] += ms
        out[wl] = {name: {"tok_s": round(t["tokens"] / t["ms"] * 1e3, 1), "over_plain": round(t["plain_ms"] / t["ms"], 3)}
                   for name, t in cols.items()}
    return out


def hf_peer(gguf: str, new: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.bfloat16).cuda().eval()
    work = json.loads(WORKLOADS.read_text())
    res = {}
    for wl in ("grounded", "chat"):
        rows = []
        for prompt in work[wl]:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"].cuda()
            row = {}
            for name, kw in (("hf_eager", {}), ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 10})):
                tps = []
                for _ in range(2):  # one warm-up, one timed: HF eager is ~10x slower than the rest
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=new, do_sample=False, **kw)
                    torch.cuda.synchronize()
                    n = out.shape[1] - ids.shape[1]
                    tps.append(n / (time.perf_counter() - t0))
                row[name] = {"tok_s": round(tps[-1], 1), "tokens": int(n)}
            rows.append(row)
        res[wl] = rows
    return res


def main(argv=None) -> None:
    ap = parser(__doc__, shape="llama2-7b")
    ap.add_argument("--model", help="a converted real model: tokens/s on the workloads (else step costs)")
    ap.add_argument("--hf-gguf", help="with --model: the GGUF it came from, for HF transformers as a peer")
    ap.add_argument("--draft", help="with --model: a draft model folder (speculative='draft', K = 4)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-draft", action="store_true", help="step costs: leave out the draft iteration")
    ap.add_argument("--exactness", action="store_true",
                    help="step costs: also compare a verify step's rows with one-token steps")
    ap.add_argument("--project", metavar="REAL_JSON", help="a --model run's spec_check.json: project its "
                    "acceptance onto the step costs of --costs (no device work)")
    ap.add_argument("--costs", metavar="COSTS_JSON", help="with --project: a step-costs spec_check.json or chunk_check json")
    args = parse(ap, argv)
    if args.project:
        if not args.costs:
            ap.error("--project needs --costs")
        proj = project(json.loads(Path(args.project).read_text()), json.loads(Path(args.costs).read_text()))
        rec = {"projection": proj, "real": args.project, "costs": args.costs}
        write_json(os.path.join(args.out, "spec_projection.json"), rec)
        print(f"PROJECTION at {proj['decode_ms']} ms a decode step ({proj['plain_tok_s']} tok/s plain):")
        for wl in ("grounded", "chat"):
            print(f"  {wl}: " + ", ".join(f"{n} {v['tok_s']:.0f} tok/s ({v['over_plain']:.2f}x)" for n, v in proj[wl].items()))
        return
    rec = {"run": run_record(), "args": vars(args)}
    if args.model:
        rec["real"] = real_model(args.model, args.new_tokens, args.reps, args.draft)
        if args.hf_gguf:
            rec["hf"] = hf_peer(args.hf_gguf, args.new_tokens, args.reps)
    else:
        if args.exactness:
            rec["exactness"] = exactness(shape_config(args.shape))
            write_json(os.path.join(args.out, "spec_check.json"), rec)
            print(f"{args.shape}: {rec['exactness']}")
        rec["step_ms"] = step_costs(shape_config(args.shape), args.steps, draft=not args.no_draft)
    write_json(os.path.join(args.out, "spec_check.json"), rec)

    print(f"\n{rec['run']['device']}")
    if "step_ms" in rec:
        s = rec["step_ms"]
        print(f"{args.shape}: decode step {s['decode']:.3f} ms; draft {s['draft_params'] / 1e9:.2f} B")
        for name in [n for n in s if n.startswith(("verify_", "draft_k")) and not n.endswith("_over_decode")]:
            print(f"  {name:24s} {s[name]:8.3f} ms  {s[name + '_over_decode']:.3f}x decode")
        return
    print(f"verify step / decode step, timed at load: {rec['real']['break_even']}")
    for wl in ("grounded", "chat"):
        rows = rec["real"][wl]
        print(f"\n{wl}: decode tok/s (median of {args.reps}); same = output identical to plain")
        cols = ["plain"] + [f"ngram_k{k}{a}" for k in KS for a in ("", "_adaptive")] + (["draft_k4"] if args.draft else [])
        print("prompt".ljust(24) + "".join(c.rjust(18) for c in cols) + ("  hf / hf_lookup" if "hf" in rec else ""))
        for i, row in enumerate(rows):
            cells = [f"{row['plain']['tok_s']:.0f}"]
            for c in cols[1:]:
                r = row[c]
                cells.append(f"{r['tok_s']:.0f} {r['accepted']}/{r['proposed']}{'' if r['same_as_plain'] else ' DIFF'}")
            hf = ""
            if "hf" in rec:
                h = rec["hf"][wl][i]
                hf = f"  {h['hf_eager']['tok_s']:.0f} / {h['hf_prompt_lookup']['tok_s']:.0f}"
            print(row["prompt"][:22].replace("\n", " ").ljust(24) + "".join(x.rjust(18) for x in cells) + hf)


if __name__ == "__main__":
    main()
