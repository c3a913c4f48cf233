"""`hybrid-jax` command line: generate (streaming), chat, serve, warmup, verify, convert, bench.

Every error the command can foresee (bad arguments, a missing or damaged model, an interrupt) is one line on
stderr and exit status 1 (130 for Ctrl-C); anything else is a bug: one line too, and its traceback with --debug.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

DEFAULT_NEW_TOKENS = 256  # the answer's length when --max-new-tokens is not given (clipped to fit --max-seq-len)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none to show."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default" in h or d is None or d is False or d == argparse.SUPPRESS:
            return h
        return super()._get_help_string(action)


def _add_load_args(p: argparse.ArgumentParser):
    """What `_engine` loads: the model, its cache length, the executable cache, the tensor-parallel degree."""
    p.add_argument("--model", default=None,
                   help="converted model folder (default: the embedded SmolLM2-135M-Instruct, converted on first use)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + answer served (default: the model's positions, at most 2048)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="allow --max-seq-len past the positions the model was trained on")
    p.add_argument("--cache-dir", default=None,
                   help="compiled-executable cache folder (default: ~/.cache/hybrid_jax/executables, or "
                        "$HYBRID_JAX_CACHE/executables)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel: split the model over the first N devices (must divide n_kv_heads)")
    p.add_argument("--speculative", choices=("ngram", "draft"), default=None,
                   help="speculative decoding: ngram proposes the tokens that followed the latest earlier "
                        "occurrence of the last few tokens (prompt lookup), draft those of --draft's model; "
                        "the output is unchanged")
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="with --speculative draft: a smaller converted model of the same vocabulary")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="proposals verified per step with --speculative (1..15; default 8 for ngram, 4 for draft)")


def _add_model_args(p: argparse.ArgumentParser):
    _add_load_args(p)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"longest answer in tokens (default: {DEFAULT_NEW_TOKENS}, or what fits --max-seq-len "
                        "after the prompt)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities sum to P (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: from the clock)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop when the answer contains this string, left out of it (repeatable)")
    p.add_argument("--stats", action="store_true", help="print timings and engine stats to stderr")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _engine(args, **runtime_kw):
    """Load the model, saying what takes time and, at the end, how long it took and what it compiled."""
    from .default_model import default_model_dir
    from .engine import load

    t0 = time.perf_counter()
    path = args.model
    if path is not None and not Path(path).is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    _say(f"loading {path or default_model_dir()} ...")
    engine = load(path, max_seq_len=args.max_seq_len, cache_dir=args.cache_dir, tensor_parallel=args.tp,
                  allow_long_context=args.allow_long_context, speculative=args.speculative,
                  num_speculative_tokens=args.num_speculative_tokens, draft=args.draft, **runtime_kw)
    st = engine.stats()
    pre = st["compiled_beside_conversion"]
    loaded = (f"{st['cache_hits']} executables loaded from the disk cache" if not pre else
              f"{pre} executables compiled beside the conversion, {st['cache_hits']} loaded from the disk cache")
    _say(f"ready in {time.perf_counter() - t0:.1f} s ({loaded}, {st['compiles']} compiled in "
         f"{st['compile_seconds']:.1f} s)")
    return engine


def _read_prompt(args) -> str:
    """--prompt TEXT, --prompt - (standard input) or --prompt-file PATH."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise ValueError("give either --prompt or --prompt-file, not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({e.reason})") from None
    if args.prompt is None:
        raise ValueError("give the prompt: --prompt TEXT, --prompt - (standard input) or --prompt-file PATH")
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _new_tokens(args, engine, n_prompt: int) -> int:
    """--max-new-tokens, or the default clipped to what fits after the prompt (said in one line)."""
    room = engine.max_seq_len - n_prompt
    if room < 1:
        raise ValueError(f"the prompt ({n_prompt} tokens) fills --max-seq-len {engine.max_seq_len}: "
                         f"give a larger --max-seq-len or a shorter prompt")
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if room < DEFAULT_NEW_TOKENS:
        _say(f"(answer limited to {room} tokens: the prompt has {n_prompt} of --max-seq-len {engine.max_seq_len})")
    return min(DEFAULT_NEW_TOKENS, room)


def _check_sampling(args) -> None:
    """The generation arguments, checked before the model loads (the same checks as generate())."""
    from .engine import _check_request, check_max_seq_len_arg, speculative_tokens

    check_max_seq_len_arg(args.max_seq_len)
    speculative_tokens(args.speculative, args.num_speculative_tokens)
    if (args.speculative == "draft") != (args.draft is not None):
        raise ValueError("--speculative draft needs --draft DIR, and --draft needs --speculative draft")
    n = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    _check_request("x", n, args.temperature, args.top_k, args.top_p, args.seed, args.stop, None, {}, None)


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop)


def _print_stats(res, engine):
    t = res.timings
    itl = sorted(t.itl_s)
    p99 = itl[min(len(itl) - 1, int(0.99 * len(itl)))] if itl else 0.0
    print(f"[{len(res.prompt_token_ids)} prompt tokens, {len(res.token_ids)} generated, finish: {res.finish_reason}; "
          f"TTFT {t.ttft_s * 1e3:.1f} ms, TPOT p50 {t.tpot_s * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms, "
          f"{t.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    if t.verify_steps:
        print(f"[speculative: {t.verify_steps} verify steps, {t.accepted} of {t.proposed} proposals accepted]",
              file=sys.stderr)
    print(json.dumps(engine.stats()), file=sys.stderr)


def cmd_generate(args) -> int:
    from .engine import generate

    prompt = _read_prompt(args)
    if not prompt.strip():
        raise ValueError("prompt is empty")
    _check_sampling(args)
    # One request, then the process ends: no executable for later requests is compiled beside it (the
    # prompt's own bucket; the sampling step unless this request samples, when it starts at load as usual),
    # since those compiles would only slow it.
    engine = _engine(args, background_compiles=False, compile_sampling=args.temperature > 0)
    ids = engine.encode(prompt, raw=args.raw, system=args.system)
    st = generate(engine, ids, stream=True, max_new_tokens=_new_tokens(args, engine, len(ids)), **_sampling(args))
    for piece in st:
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        _print_stats(st.result, engine)
    return 0


CHAT_HELP = "(/reset starts over, /stats shows timings and engine stats, /exit or an empty line or Ctrl-D quits)"


def _fit_history(engine, messages: list[dict], want: int) -> tuple[list[int], int]:
    """Token ids of the conversation, dropping its oldest turns (a user message and the answer to it; never
    the system message nor the latest message) until the prompt leaves room for `want` new tokens; returns
    (ids, turns dropped)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = engine.tokenizer.encode_chat(messages)
        if len(ids) + want <= engine.max_seq_len or len(messages) - first <= 1:
            return ids, dropped
        del messages[first]  # the oldest user message, and the answer to it
        if len(messages) - first > 1 and messages[first]["role"] == "assistant":
            del messages[first]
        dropped += 1


def cmd_chat(args) -> int:
    from .engine import generate

    _check_sampling(args)
    engine = _engine(args)
    if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
        raise ValueError("this model's tokenizer has no chat template")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    # each answer may take up to this many tokens; the oldest turns go when the history leaves less room
    want = args.max_new_tokens if args.max_new_tokens is not None else min(DEFAULT_NEW_TOKENS,
                                                                           engine.max_seq_len // 2)
    if want >= engine.max_seq_len:
        raise ValueError(f"--max-new-tokens {want} leaves no room for a prompt in --max-seq-len "
                         f"{engine.max_seq_len}")
    _say(CHAT_HELP)
    last = None
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        cmd = line.strip()
        if not cmd or cmd == "/exit":
            break
        if cmd == "/reset":
            messages = list(system)
            _say("(conversation reset)")
            continue
        if cmd == "/stats":
            if last is not None:
                _print_stats(last, engine)
            else:
                _say(json.dumps(engine.stats()))
            continue
        messages.append({"role": "user", "content": line})
        ids, dropped = _fit_history(engine, messages, want)
        if dropped:
            _say(f"(context full: the oldest {dropped} turn{'s' if dropped > 1 else ''} left the conversation)")
        if len(ids) + 1 > engine.max_seq_len:
            messages.pop()
            _say(f"error: this message ({len(ids)} tokens with the template) does not fit --max-seq-len "
                 f"{engine.max_seq_len}; say it shorter or start again with a larger --max-seq-len")
            continue
        st = generate(engine, ids, stream=True, max_new_tokens=min(want, engine.max_seq_len - len(ids)),
                      **_sampling(args))
        for piece in st:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        last = st.result
        messages.append({"role": "assistant", "content": st.result.text})
        if args.stats:
            _print_stats(st.result, engine)
    return 0


def cmd_warmup(args) -> int:
    """Compile every executable the engine can use into the disk cache (or check that it is there), so that
    later processes load them instead of compiling beside their first requests."""

    t0 = time.perf_counter()
    engine = _engine(args)
    engine.warmup(progress=not args.no_progress)
    st = engine.stats()
    xc = engine.runtime.exec_cache
    where = (xc.dir if xc is not None and xc.enabled
             else f"disk cache disabled: {xc.disabled_reason if xc else 'off'}")
    print(f"{st['compiles'] + st['cache_hits']} executables ready in {time.perf_counter() - t0:.1f} s: "
          f"{st['compiles']} compiled, {st['cache_hits']} loaded from the cache ({where}); "
          f"prefill buckets {st['buckets_compiled']}")
    engine.close()
    return 0


def cmd_serve(args) -> int:
    """The OpenAI-compatible server (server.py): warmed up before it listens, so the first request waits for no
    compile; exits 0 on SIGINT / SIGTERM (the running request cancelled)."""
    from .engine import check_max_seq_len_arg, speculative_tokens
    from .server import serve

    check_max_seq_len_arg(args.max_seq_len)
    speculative_tokens(args.speculative, args.num_speculative_tokens)
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("HYBRID_JAX_API_KEY") or None
    engine = _engine(args)
    if engine.tokenizer is None:
        raise ValueError("the model has no tokenizer: the server needs one to read messages")
    t0 = time.perf_counter()
    if not args.no_warmup:
        engine.warmup(progress=False)
        _say(f"warmed up in {time.perf_counter() - t0:.1f} s")
    model_id = args.model_id or (Path(args.model).name if args.model else "smollm2-135m-instruct")
    _say(f"serving {model_id} on http://{args.host}:{args.port} (OpenAI API under /v1, chat page at /)"
         + (", API key required" if api_key else ""))
    serve(engine, model_id, host=args.host, port=args.port, api_key=api_key, max_queue=args.max_queue)
    engine.close()
    return 0


def cmd_verify(args) -> int:
    """Check every file of a converted model against its manifest (sizes and sha256)."""
    from . import checkpoint

    report = checkpoint.verify(args.model_dir, progress=sys.stderr.isatty())
    print(f"{args.model_dir}: OK ({report['files']} files, {report['bytes'] / 2**20:.1f} MiB checked)")
    if report["unlisted"]:
        _say(f"note: {len(report['unlisted'])} files not in the manifest (never read): "
             f"{', '.join(report['unlisted'][:5])}")
    return 0


def main(argv=None) -> int:
    from . import __version__

    fmt = _HelpFormatter
    ap = argparse.ArgumentParser(prog="hybrid-jax", description=__doc__, formatter_class=fmt)
    ap.add_argument("--version", action="version", version=f"hybrid-jax {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does (compiles, cache)")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streaming", formatter_class=fmt)
    _add_model_args(g)
    g.add_argument("--prompt", default=None, help="the prompt; - reads it from standard input")
    g.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from this UTF-8 file")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    c = sub.add_parser("chat", help="multi-turn conversation on stdin/stdout", formatter_class=fmt,
                       description=f"Chat with the model. {CHAT_HELP} When the history no longer fits "
                                   "--max-seq-len, its oldest messages are dropped (the system message stays).")
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system message, kept for the whole conversation")
    w = sub.add_parser("warmup", formatter_class=fmt,
                       help="compile every prefill bucket and decode step into the disk cache "
                       "(give the --max-seq-len and --tp it will be served with)")
    _add_load_args(w)
    w.add_argument("--no-progress", action="store_true",
                   help="no progress (a bar on a terminal, a line per executable otherwise)")
    s = sub.add_parser("serve", formatter_class=fmt, help="OpenAI-compatible HTTP server (chat page at /)",
                       description="Serve the model over OpenAI's API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models), with /health, /metrics (Prometheus) and a chat page at /. "
                                   "Requests run one at a time, in order; a chat's next turn reuses the "
                                   "cache rows of its history.")
    _add_load_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 (default: $HYBRID_JAX_API_KEY, else none)")
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait; past it: 503 + Retry-After")
    s.add_argument("--model-id", default=None, help="the model's name in the API (default: the folder's name)")
    s.add_argument("--no-warmup", action="store_true", help="listen before every prefill bucket is compiled")
    v = sub.add_parser("verify", formatter_class=fmt,
                       help="check a converted model's files against its manifest (sizes, sha256)")
    v.add_argument("model_dir", help="converted model folder")
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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cmds = {"generate": cmd_generate, "chat": cmd_chat, "warmup": cmd_warmup, "verify": cmd_verify,
                "serve": cmd_serve}
        return cmds[args.cmd](args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # foreseen: bad arguments, a missing or damaged model, a full disk
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def entry() -> None:
    """The `hybrid-jax` command: main(), then an exit without the interpreter's teardown of JAX's CPU client and
    the modules, which took 0.25-0.8 s after every answer on 2 cores (frees nothing the OS would not).
    Non-daemon threads are waited for and exit handlers run, as a normal exit does; the streams are flushed."""
    try:
        rc = main()
    except SystemExit as e:  # argparse's --help, --version and usage errors (it has printed what to say)
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(rc)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg if len(msg) <= 500 else msg[:500] + " ..."


if __name__ == "__main__":
    sys.exit(main())
