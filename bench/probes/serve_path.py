"""Where a streamed request's TTFT goes between the client and the engine (issue 26): stamps along the path of one
`POST /v1/completions` (stream) against the same prompt in process, for uvicorn's HTTP parsers and event loops,
the interpreter's switch interval, and when the response's headers go (`early`: as the engine's thread starts the
request; default: once its first steps are enqueued, Stream.when_enqueued).

    python3 -m bench.probes.serve_path --shape llama2-7b --out $OUT
    JAX_PLATFORMS=cpu python3 -m bench.probes.serve_path --shape tiny --reps 5 --out /tmp/sp

The client runs in its own process over one keep-alive connection (http.client; "new" variants open one a
request). Stamps (time.perf_counter is CLOCK_MONOTONIC, one clock for both processes): client start -> request
sent -> route entered -> job queued -> worker calls generate -> first piece -> first chunk read by the client.
Writes serve_path.json and prints medians (ms).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from bench.probes.harness import parse, parser, random_params, run_record, shape_config, write_json
from bench.probes.serve_check import serve_in_thread

STAMPS = ("sent", "route", "queued", "generate", "first_piece", "client_first")


def _client(conn, port: int, new_conn: bool) -> None:
    import http.client
    import json
    keep = http.client.HTTPConnection("127.0.0.1", port)
    while (req := conn.recv()) is not None:
        ids, n = req
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port) if new_conn else keep
        c.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": ids, "max_tokens": n,
                                                         "temperature": 0, "stream": True}),
                  {"Content-Type": "application/json"})
        sent = time.perf_counter()
        r = c.getresponse()
        first = None
        while line := r.readline():
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter()
        if new_conn:
            c.close()
        conn.send((t0, sent, first))


def main(argv=None) -> None:
    ap = parser(__doc__, shape="llama2-7b")
    ap.add_argument("--lengths", default="10,500")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--variants", default="asyncio/httptools,asyncio/httptools/early,asyncio/h11",
                    help="LOOP/HTTP[/swMS][/new][/early], comma-separated; early: the response's headers sent as the "
                         "engine's thread starts the request (as before Stream.when_enqueued), not once its first "
                         "steps are on the device")
    args = parse(ap, argv)
    import jax
    import numpy as np

    import hybrid_jax
    from hybrid_jax import server as S
    from hybrid_jax.engine import Engine

    on_acc = jax.devices()[0].platform != "cpu"
    cfg = shape_config(args.shape, "bfloat16" if on_acc else "float32")
    # KV reuse off: the prompts repeat. Only the buckets the lengths use (start-up is most of a GPU call).
    buckets = tuple(sorted({max(16, 1 << (int(n) - 1).bit_length()) for n in args.lengths.split(",")}))
    eng = Engine(cfg, random_params(cfg), max_seq_len=1024, prefill_buckets=buckets, compile_sampling=False,
                 kv_reuse=False)
    eng.warmup()

    st: dict = {}
    generate0, submit0, send0 = S.generate, S.Worker.submit, S.Job.send

    def generate(*a, **k):
        st["generate"] = time.perf_counter()
        return generate0(*a, **k)

    def submit(self, job):
        submit0(self, job)
        st["queued"] = time.perf_counter()

    def send(self, item):
        if item[0] == "text" and "first_piece" not in st:
            st["first_piece"] = time.perf_counter()
        send0(self, item)

    S.generate, S.Worker.submit, S.Job.send = generate, submit, send
    rng = np.random.default_rng(0)
    rec = {"run": run_record(), "args": vars(args), "variants": {}}
    sw0 = sys.getswitchinterval()
    when_enqueued = hybrid_jax.engine.Stream.when_enqueued
    for variant in args.variants.split(","):
        parts = variant.split("/")
        loop, http = parts[0], parts[1]
        sw = next((float(p[2:]) * 1e-3 for p in parts[2:] if p.startswith("sw")), sw0)
        sys.setswitchinterval(sw)
        hybrid_jax.engine.Stream.when_enqueued = (lambda self, fn: fn()) if "early" in parts else when_enqueued
        app = S.create_app(eng, "m")
        route = next(r for r in app.router.routes if getattr(r, "path", None) == "/v1/completions")
        inner = route.app

        async def stamped(scope, receive, send, inner=inner):
            st["route"] = time.perf_counter()
            await inner(scope, receive, send)
        route.app = stamped
        stop, a = serve_in_thread(app, _client, "new" in parts, loop=loop, http=http)
        out = {}
        for n in [int(x) for x in args.lengths.split(",")]:
            ids = [int(t) for t in rng.integers(3, cfg.vocab_size, n)]
            rows = []
            for i in range(args.reps + 3):
                st.clear()
                a.send((ids, args.new_tokens))
                t0, sent, first = a.recv()
                stamps = dict(st, sent=sent, client_first=first)
                t_api, api = time.perf_counter(), None
                # read to the end, as the server's worker does (an abandoned stream's steps in flight would be
                # waited for by the next request)
                for _ in hybrid_jax.generate(eng, ids, max_new_tokens=args.new_tokens, ignore_eos=True, stream=True):
                    api = api or time.perf_counter() - t_api
                if i >= 3:  # warm-up
                    row, prev = {}, t0
                    for k in STAMPS:
                        row[k] = (stamps[k] - prev) * 1e3
                        prev = stamps[k]
                    row["http_ttft"] = (first - t0) * 1e3
                    row["api_ttft"] = api * 1e3
                    rows.append(row)
            out[n] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            out[n]["over_api"] = statistics.median(r["http_ttft"] - r["api_ttft"] for r in rows)
            out[n]["rows"] = rows
        stop()
        key, k = variant, 1
        while key in rec["variants"]:  # a variant named again (A, B, A, B) keeps each run
            k += 1
            key = f"{variant} ({k})"
        rec["variants"][key] = out
        write_json(os.path.join(args.out, "serve_path.json"), rec)
    sys.setswitchinterval(sw0)
    hybrid_jax.engine.Stream.when_enqueued = when_enqueued

    print(f"\n{rec['run']['device']}, {args.shape}; medians (ms), each stamp after the one before")
    print("variant                     n   " + "  ".join(f"{k:>12s}" for k in STAMPS) + "   http   api  +api")
    for variant, out in rec["variants"].items():
        for n, r in out.items():
            print(f"{variant:26s} {n:4d}  " + "  ".join(f"{r[k]:12.3f}" for k in STAMPS)
                  + f"  {r['http_ttft']:5.2f} {r['api_ttft']:5.2f} {r['over_api']:5.2f}")


if __name__ == "__main__":
    main()
