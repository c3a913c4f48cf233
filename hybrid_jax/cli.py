"""`hybrid-jax` command line: generate (streaming), chat, warmup, convert, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_load_args(p: argparse.ArgumentParser):
    """What `_engine` loads: the model, its cache length, the executable cache, the tensor-parallel degree."""
    p.add_argument("--model", default=None,
                   help="converted model folder (default: the embedded SmolLM2-135M-Instruct, converted on first use)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="compiled-executable cache folder")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel: split the model over the first N devices (must divide n_kv_heads)")


def _add_model_args(p: argparse.ArgumentParser):
    _add_load_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print timings and engine stats to stderr")


def _engine(args, **runtime_kw):
    from .default_model import ensure_default_model
    from .engine import load

    path = args.model or ensure_default_model()
    return load(path, max_seq_len=args.max_seq_len, cache_dir=args.cache_dir, tensor_parallel=args.tp, **runtime_kw)


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def _print_stats(res, engine):
    t = res.timings
    itl = sorted(t.itl_s)
    p99 = itl[min(len(itl) - 1, int(0.99 * len(itl)))] if itl else 0.0
    print(f"[{len(res.prompt_token_ids)} prompt tokens, {len(res.token_ids)} generated, finish: {res.finish_reason}; "
          f"TTFT {t.ttft_s * 1e3:.1f} ms, TPOT p50 {t.tpot_s * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms, "
          f"{t.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    print(json.dumps(engine.stats()), file=sys.stderr)


def cmd_generate(args) -> int:
    from .engine import generate

    if not args.prompt.strip():
        raise ValueError("prompt is empty")
    # One request, then the process ends: no executable for later requests is compiled beside it (the
    # prompt's own bucket; the sampling step unless this request samples, when it starts at load as usual),
    # since those compiles would only slow it.
    engine = _engine(args, background_compiles=False, compile_sampling=args.temperature > 0)
    st = generate(engine, args.prompt, stream=True, raw=args.raw, system=args.system, **_sampling(args))
    for piece in st:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        _print_stats(st.result, engine)
    return 0


def cmd_chat(args) -> int:
    from .engine import generate

    engine = _engine(args)
    if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
        raise ValueError("this model's tokenizer has no chat template")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("(empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = engine.tokenizer.encode_chat(messages)
        st = generate(engine, ids, stream=True, **_sampling(args))
        for piece in st:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": st.result.text})
        if args.stats:
            _print_stats(st.result, engine)
    return 0


def cmd_warmup(args) -> int:
    """Compile every executable the engine can use into the disk cache (or check that it is there), so that
    later processes load them instead of compiling beside their first requests."""
    import time

    t0 = time.perf_counter()
    engine = _engine(args)
    engine.warmup(progress=not args.no_progress and sys.stderr.isatty())
    st = engine.stats()
    where = engine.runtime.exec_cache.dir if engine.runtime.exec_cache is not None else "no disk cache"
    print(f"{st['compiles'] + st['cache_hits']} executables ready in {time.perf_counter() - t0:.1f} s: "
          f"{st['compiles']} compiled, {st['cache_hits']} loaded from the cache ({where}); "
          f"prefill buckets {st['buckets_compiled']}")
    engine.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hybrid-jax", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streaming")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    c = sub.add_parser("chat", help="multi-turn conversation on stdin/stdout")
    _add_model_args(c)
    c.add_argument("--system", default=None)
    w = sub.add_parser("warmup", help="compile every prefill bucket and decode step into the disk cache "
                       "(give the --max-seq-len and --tp it will be served with)")
    _add_load_args(w)
    w.add_argument("--no-progress", action="store_true",
                   help="no progress bar (the default when stderr is no terminal)")
    sub.add_parser("convert", help="convert a checkpoint (see `python -m convert --help`)", add_help=False)
    sub.add_parser("bench", help="latency suite / XLA-flag sweep (`hybrid-jax bench latency|sweep ...`)",
                   add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from convert.__main__ import main as convert_main
        return convert_main(argv[1:])
    if argv and argv[0] == "bench":
        from bench import cli_entry
        return cli_entry(argv[1:]) or 0
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": cmd_generate, "chat": cmd_chat, "warmup": cmd_warmup}[args.cmd](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
