"""The server's cost and KV reuse's gain (issue 26): the same requests through the in-process API and through
`hybrid-jax serve` (HTTP, the official openai client, streaming), and a growing multi-turn chat with and without
reuse.

    python3 -m bench.probes.serve_check --shape llama2-7b --out $OUT      # random weights, token-id prompts
    python3 -m bench.probes.serve_check --model DIR --out $OUT            # a converted model (SmolLM2)
    JAX_PLATFORMS=cpu python3 -m bench.probes.serve_check --shape tiny --turns 3 --reps 2 --out /tmp/sc

Overhead: prompts of 10 / 100 / 500 tokens (random ids), 64 greedy tokens, EOS ignored, --reps each after a
warm-up; TTFT and the median time between tokens, in process (generate(stream=True)) and over HTTP (the time the
client sees each streamed chunk; the server sends one chunk a token). The client runs in a process of its own, as
a real one does (in the server's process it would contend for the GIL with the server's threads); the two kinds of
request alternate, one of each a rep. KV reuse off for both (prompts repeat).
Multi-turn: --turns turns of ~50 new user tokens, each answered with 50 tokens and appended to the history, through
generate() with kv_reuse on and off (two engines, same weights); TTFT per turn. Writes serve_check.json, prints a
table.
"""
from __future__ import annotations

import os
import socket
import statistics
import threading
import time

from bench.probes.harness import parse, parser, random_params, run_record, shape_config, write_json


def _stream_times(chunks):
    """(TTFT, median gap) from an iterator of chunks, timed as they arrive; the clock starts at the call."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() - t0 for _ in chunks]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0], statistics.median(gaps) if gaps else 0.0


def _raw_stream(conn, ids: list, n: int):
    """One streamed completion over http.client on a kept-alive connection, as the openai client keeps its
    connections (json.dumps of the body, the SSE lines read as they come): yields each chunk's JSON. What the
    server costs, without a client library's own per-request work."""
    import json
    conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": ids, "max_tokens": n,
                                                        "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": "Bearer x"})
    r = conn.getresponse()
    while line := r.readline():
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])


def _openai_stream(client, ids: list, n: int):
    """One streamed completion through the official client: yields its chunks. A generator, so that the request
    (the client's own building of it included) is made inside the timed iteration, not before the clock starts."""
    for c in client.completions.create(model="m", prompt=ids, max_tokens=n, temperature=0, stream=True):
        if c.choices:
            yield c


def _client(conn, port: int) -> None:
    """The HTTP side, in its own process: for each (kind, ids, max_tokens) received, one streamed completion
    through the official openai client ("openai") or http.client ("raw"); sends back (TTFT, median gap) in
    seconds. None ends it."""
    import http.client

    import openai
    raw = http.client.HTTPConnection("127.0.0.1", port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    while (req := conn.recv()) is not None:
        kind, ids, n = req
        if kind == "openai":
            chunks = _openai_stream(client, ids, n)
        else:
            chunks = (c for c in _raw_stream(raw, ids, n) if c["choices"])
        conn.send(_stream_times(chunks))


def serve_in_thread(app, client, *client_args, **uvicorn_kw):
    """`app` on uvicorn in a thread of this process, on a free local port; `client(conn, port, *client_args)` in a
    process of its own. Returns (stop, conn): `conn` is this side of the pipe to the client; stop() tells the
    client to end (None), waits for it, then stops the server."""
    import multiprocessing

    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **uvicorn_kw))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=client, args=(child, port, *client_args), daemon=True)
    proc.start()

    def stop():
        conn.send(None)
        proc.join()
        server.should_exit = True
        th.join()
    return stop, conn


def main(argv=None) -> None:
    ap = parser(__doc__, shape="llama2-7b")
    ap.add_argument("--model", default=None, help="a converted model folder (else random weights of --shape)")
    ap.add_argument("--lengths", default="10,100,500")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--turns", type=int, default=10)
    args = parse(ap, argv)

    import jax
    import numpy as np

    import hybrid_jax
    from hybrid_jax.engine import Engine
    from hybrid_jax.server import create_app

    on_acc = jax.devices()[0].platform != "cpu"
    kw = dict(max_seq_len=1024, prefill_buckets=(16, 32, 64, 128, 256, 512, 1024), compile_sampling=False)

    def engine(reuse: bool):
        if args.model:
            return hybrid_jax.load(args.model, kv_reuse=reuse, **kw)
        return Engine(cfg, params, kv_reuse=reuse, **kw)

    cfg = None if args.model else shape_config(args.shape, "bfloat16" if on_acc else "float32")
    params = None if args.model else random_params(cfg)
    eng = engine(False)
    eng.warmup()
    cfg = eng.cfg
    rng = np.random.default_rng(0)
    rec = {"run": run_record(), "args": vars(args), "overhead": {}, "turns": {}}
    lengths = [int(x) for x in args.lengths.split(",")]

    # ---- the server, in this process (uvicorn in a thread), the clients in another ----
    stop, conn = serve_in_thread(create_app(eng, "m"), _client)

    for n in lengths:
        ids = [int(t) for t in rng.integers(3, cfg.vocab_size, n)]

        def api():
            return _stream_times(hybrid_jax.generate(eng, ids, max_new_tokens=args.new_tokens, ignore_eos=True,
                                                     stream=True))

        def http(kind):
            def f():
                conn.send((kind, ids, args.new_tokens))
                return conn.recv()
            return f
        kinds = {"api": api, "http": http("raw"), "openai": http("openai")}
        t = {name: [] for name in kinds}
        for f in kinds.values():  # warm-up
            f()
        for _ in range(args.reps):
            for name, f in kinds.items():
                t[name].append(f())
        rec["overhead"][n] = {name: {"ttft_ms": statistics.median(x[0] for x in v) * 1e3,
                                     "tpot_ms": statistics.median(x[1] for x in v) * 1e3,
                                     "ttft_samples_ms": [x[0] * 1e3 for x in v]} for name, v in t.items()}
        for name in ("http", "openai"):  # paired: each rep's requests ran back to back
            rec["overhead"][n][f"{name}_over_api_ttft_ms"] = statistics.median(
                (h[0] - a[0]) * 1e3 for a, h in zip(t["api"], t[name]))
        write_json(os.path.join(args.out, "serve_check.json"), rec)
    stop()

    # ---- multi-turn: reuse on / off ----
    engines = {"reuse": engine(True), "no_reuse": eng}
    engines["reuse"].warmup()

    def chat(e, seed, turns):
        r2 = np.random.default_rng(seed)
        hist, ttft = [], []
        for _ in range(turns):
            hist += [int(t) for t in r2.integers(3, cfg.vocab_size, 50)]
            res = hybrid_jax.generate(e, hist, max_new_tokens=50, ignore_eos=True)
            ttft.append(res.timings.ttft_s * 1e3)
            hist += res.token_ids
        return hist, ttft

    for name, e in engines.items():
        chat(e, 2, 2)  # a warm-up conversation: the measured one's first turn shares no prefix with it
        hist, ttft = chat(e, 1, args.turns)
        rec["turns"][name] = {"ttft_ms": ttft, "history_tokens": len(hist)}
        write_json(os.path.join(args.out, "serve_check.json"), rec)

    print(f"\n{rec['run']['device']}, {args.model or args.shape}")
    print("TTFT and TPOT medians (ms); http: http.client, openai: the official client (its request building "
          "included); +: paired median difference to api")
    print("prompt  api TTFT  http TTFT  +      openai TTFT  +      api TPOT  http TPOT  +       openai TPOT  +")
    for n, r in rec["overhead"].items():
        a, h, o = r["api"], r["http"], r["openai"]
        print(f"{n:6d}  {a['ttft_ms']:8.2f}  {h['ttft_ms']:9.2f}  {r['http_over_api_ttft_ms']:5.2f}  "
              f"{o['ttft_ms']:11.2f}  {r['openai_over_api_ttft_ms']:5.2f}  {a['tpot_ms']:8.3f}  {h['tpot_ms']:9.3f}  "
              f"{h['tpot_ms'] - a['tpot_ms']:6.3f}  {o['tpot_ms']:11.3f}  {o['tpot_ms'] - a['tpot_ms']:6.3f}")
    for name, r in rec["turns"].items():
        t = r["ttft_ms"]
        print(f"{name:9s} TTFT turn 1 {t[0]:.2f} ms, turn {len(t)} {t[-1]:.2f} ms ({t[-1] / t[0]:.2f}x); "
              f"history {r['history_tokens']} tokens")


if __name__ == "__main__":
    main()
