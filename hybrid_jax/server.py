"""An OpenAI-compatible HTTP server over one engine: `hybrid-jax serve`.

Starlette on uvicorn: an ASGI stack with server-sent events and client-disconnect signals, without FastAPI's
request models, whose validation errors (422, their own JSON) are not OpenAI's 400s: every check here answers
in OpenAI's error format and names the parameter.

Requests are served one at a time (batch 1) by one worker thread that owns the engine, from a FIFO queue with a
bound (past it: 503 with Retry-After). The engine's own KV reuse makes a chat's next turn prefill only its new
tokens. A request whose client goes away is stopped at its next token. The page at `/` (static/chat.html, in the
package) is a small chat client of the same API.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import queue
import secrets
import threading
import time
from importlib import resources

from .engine import Engine, _all_ints, _is_int, _is_real as _is_num, generate

log = logging.getLogger("hybrid_jax.server")

# OpenAI request fields, per endpoint, that are served; any other field is refused (400), never ignored.
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
               "stream", "stream_options", "n", "user", "logprobs", "presence_penalty", "frequency_penalty",
               "logit_bias", "tools", "tool_choice", "functions", "function_call", "response_format",
               "parallel_tool_calls", "top_logprobs"}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                     "stream_options", "n", "user", "logprobs", "presence_penalty", "frequency_penalty",
                     "logit_bias", "echo", "suffix", "best_of"}
# fields accepted only at their neutral value (what OpenAI does when they are left out)
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None,
           "top_logprobs": None, "logit_bias": None, "tools": None, "tool_choice": None, "functions": None,
           "function_call": None, "parallel_tool_calls": None, "echo": False, "suffix": None}
MAX_STOPS = 4
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---- request checks ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One request as the worker runs it, and what it sends back."""
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _check_common(body: dict, fields: set[str]) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unsupported_parameter")
    for k, neutral in NEUTRAL.items():
        if k in body and body[k] is not None and body[k] != neutral and not (k == "logprobs" and body[k] is False) \
                and not (k in ("tools", "functions", "logit_bias") and body[k] in ([], {})):
            raise ApiError(400, f"'{k}' is not supported by this server (it serves one sequence at a time, "
                                f"with no {k}); leave it out", param=k, code="unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported", param="response_format",
                       code="unsupported_parameter")
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise _bad("stream", f"'stream' must be a boolean, got {body['stream']!r}")
    so = body.get("stream_options")
    if so is not None:
        if not body.get("stream"):
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(so, dict) or set(so) - {"include_usage"} or not isinstance(so.get("include_usage", False), bool):
            raise _bad("stream_options", "'stream_options' takes only {\"include_usage\": true|false}")
    t = body.get("temperature")
    if t is not None and (not _is_num(t) or not 0 <= t <= 2):
        raise _bad("temperature", f"'temperature' must be a number in [0, 2], got {t!r}")
    p = body.get("top_p")
    if p is not None and (not _is_num(p) or not 0 < p <= 1):
        raise _bad("top_p", f"'top_p' must be a number in (0, 1], got {p!r}")
    s = body.get("seed")
    if s is not None and (not _is_int(s) or not -2**63 <= s < 2**63):
        raise _bad("seed", f"'seed' must be an integer, got {s!r}")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise _bad("stop", "'stop' must be a non-empty string or a list of them")
        if len(stops) > MAX_STOPS:
            raise _bad("stop", f"'stop' takes at most {MAX_STOPS} sequences, got {len(stops)}")


def _max_tokens(body: dict, n_prompt: int, max_seq_len: int, default: int | None) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = body.get(name)
    room = max_seq_len - n_prompt
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens. However, your prompt "
                            f"has {n_prompt} tokens, which leaves no room for an answer.", param="messages"
                       if "messages" in body else "prompt", code="context_length_exceeded")
    if v is None:
        return room if default is None else min(default, room)
    if not _is_int(v) or v < 1:
        raise _bad(name, f"'{name}' must be an integer >= 1, got {v!r}")
    if n_prompt + v > max_seq_len:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                            f"{n_prompt + v} tokens ({n_prompt} in the prompt, {v} for the answer).", param=name,
                       code="context_length_exceeded")
    return v


def _messages(msgs) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise _bad(where, f"{where} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {list(ROLES)}, got {m['role']!r}"
                       + (" (tools are not supported)" if m["role"] in ("tool", "function") else ""))
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _bad(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported", code="unsupported_parameter")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            parts = []
            for j, part in enumerate(c):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}]", f"{where}.content[{j}]: only text parts are supported",
                               code="unsupported_parameter")
                parts.append(part["text"])
            c = "".join(parts)
        if not isinstance(c, str):
            raise _bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": c})
    return out


# ---- the worker ----------------------------------------------------------------------------------------------

class Worker:
    """The thread that owns the engine: runs queued jobs one at a time, in order."""

    def __init__(self, engine: Engine, max_queue: int, metrics: "Metrics"):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.q: queue.Queue = queue.Queue()
        self.waiting = 0  # queued, not yet running
        self.running: Job | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="hybrid_jax-serve", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stop.is_set():
                raise ApiError(503, "The server is shutting down", type_="server_error", code="shutting_down")
            if self.waiting >= self.max_queue:
                self.metrics.rejected.inc()
                raise ApiError(503, f"The server is busy: {self.waiting} requests are waiting (the bound is "
                                    f"{self.max_queue}). Retry shortly.", type_="server_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self.waiting += 1
            self.metrics.queue.set(self.waiting)
        self.q.put(job)

    def stop_soon(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """`stop` from a signal handler: it runs on the loop's thread between two bytecodes, maybe inside this
        worker's lock or its queue's (`submit`), so it only asks `loop` to stop the worker once it is back."""
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.stop)

    def stop(self) -> None:
        """Cancel the running request and every queued one; the thread exits."""
        with self._lock:
            self._stop.set()
            if self.running is not None:
                self.running.cancelled.set()
        self.q.put(None)

    def _loop(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                break
            with self._lock:
                self.waiting -= 1
                self.metrics.queue.set(self.waiting)
                self.running = job
                if self._stop.is_set():
                    job.cancelled.set()
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own, the server goes on
                log.exception("request failed")
                self.metrics.errors.inc()
                job.send(("error", f"{type(e).__name__}: {e}"))
            finally:
                with self._lock:
                    self.running = None
        while True:  # queued behind the stop: tell them
            try:
                job = self.q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(("error", "The server is shutting down"))

    def _run(self, job: Job) -> None:
        m = self.metrics
        m.queue_wait.observe(time.perf_counter() - job.enqueued)
        if job.cancelled.is_set():
            job.send(("done", None))
            return
        stream = generate(self.engine, job.ids, max_new_tokens=job.max_tokens, temperature=job.temperature,
                          top_p=job.top_p, seed=job.seed, stop=job.stop or None, stream=True)
        stream.when_enqueued(lambda: job.send(("started", None)))
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    break
                if piece.text or self.engine.tokenizer is None:  # (no tokenizer: an empty chunk a token)
                    job.send(("text", piece.text))
        finally:
            stream.close()
        res = stream.result
        if job.cancelled.is_set():
            res.finish_reason = "cancelled"
        t = res.timings
        if t.ttft_s:
            m.ttft.observe(t.ttft_s)
        for dt in t.itl_s:
            m.tpot.observe(dt)
        m.prompt_tokens.inc(len(res.prompt_token_ids))
        m.completion_tokens.inc(len(res.token_ids))
        m.reused_tokens.inc(t.reused_tokens)
        m.requests.labels(res.finish_reason).inc()
        job.send(("done", res))


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        lat = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
        self.ttft = Histogram("hybrid_jax_ttft_seconds", "Time to first token (prompt on the worker -> first token)",
                              buckets=lat, registry=r)
        self.tpot = Histogram("hybrid_jax_tpot_seconds", "Time between tokens", buckets=lat, registry=r)
        self.queue_wait = Histogram("hybrid_jax_queue_wait_seconds", "Time a request waited for the engine",
                                    buckets=lat, registry=r)
        self.prompt_tokens = Counter("hybrid_jax_prompt_tokens", "Prompt tokens served", registry=r)
        self.completion_tokens = Counter("hybrid_jax_completion_tokens", "Tokens generated", registry=r)
        self.reused_tokens = Counter("hybrid_jax_reused_prompt_tokens", "Prompt tokens whose KV rows were reused",
                                     registry=r)
        self.requests = Counter("hybrid_jax_requests", "Requests finished, by finish reason", ["finish_reason"],
                                registry=r)
        self.errors = Counter("hybrid_jax_errors", "Requests that failed in the engine", registry=r)
        self.rejected = Counter("hybrid_jax_rejected", "Requests refused with 503 (queue full)", registry=r)
        self.bad = Counter("hybrid_jax_bad_requests", "Requests refused with a 4xx", registry=r)
        self.queue = Gauge("hybrid_jax_queue_depth", "Requests waiting for the engine", registry=r)


# ---- the app -------------------------------------------------------------------------------------------------

def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_queue: int = 16,
               default_max_tokens: int | None = None):
    """The ASGI app over `engine` (already warmed up). `model_id` is the name /v1/models lists and requests must
    name; `api_key`, when given, is required as `Authorization: Bearer KEY` on /v1/*. An engine without a
    tokenizer serves /v1/completions of token ids only. Text pieces stream as they are decoded; without a
    tokenizer a completion's text is empty and `usage` counts the tokens."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    metrics = Metrics()
    worker = Worker(engine, max_queue, metrics)
    created = int(time.time())
    page = resources.files("hybrid_jax").joinpath("static/chat.html").read_text(encoding="utf-8")

    def error(e: ApiError) -> JSONResponse:
        if 400 <= e.status < 500:
            metrics.bad.inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), api_key.encode())):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request, fields: set[str]) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
        if body.get("model") != model_id:
            if "model" not in body:
                raise _bad("model", "you must provide a model parameter", code="missing_required_parameter")
            raise ApiError(404, f"The model '{body.get('model')}' does not exist; this server serves "
                                f"'{model_id}'", param="model", code="model_not_found")
        _check_common(body, fields)
        return body

    def job_for(body: dict, ids: list[int]) -> Job:
        stop = body.get("stop")
        return Job(ids=ids, max_tokens=_max_tokens(body, len(ids), engine.max_seq_len, default_max_tokens),
                   temperature=float(body.get("temperature") if body.get("temperature") is not None else 1.0),
                   top_p=None if body.get("top_p") is None else float(body["top_p"]), seed=body.get("seed"),
                   stop=[stop] if isinstance(stop, str) else list(stop or []), loop=asyncio.get_running_loop(),
                   out=asyncio.Queue())

    async def next_item(request: Request, job: Job):
        """The worker's next (what, value), or None once the client has gone (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.out.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None

    async def run(request: Request, body: dict, job: Job, kind: str):
        worker.submit(job)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())

        def usage(res) -> dict:
            p, c = len(res.prompt_token_ids), len(res.token_ids)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                    "prompt_tokens_details": {"cached_tokens": res.timings.reused_tokens}}

        def finish(res) -> str:
            return "length" if res.finish_reason == "length" else "stop"

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(delta=None, text=None, reason=None, use=None, choices=True) -> str:
                c = {"id": rid, "object": obj + ".chunk" if kind == "chat" else obj, "created": now,
                     "model": model_id, "choices": []}
                if choices:
                    ch = {"index": 0, "finish_reason": reason}
                    if kind == "chat":
                        ch["delta"] = delta or {}
                        ch["logprobs"] = None
                    else:
                        ch.update(text=text or "", logprobs=None)
                    c["choices"] = [ch]
                if include_usage:
                    c["usage"] = use
                return f"data: {json.dumps(c)}\n\n"

            # The headers go once the request's first steps are on the device: this thread's work then runs
            # while the device computes, not while the engine's thread waits for the GIL to enqueue them.
            try:
                first = await next_item(request, job)
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if first is None:
                return Response(status_code=499)
            if first[0] == "error":
                return error(ApiError(500, first[1], type_="server_error"))
            if first[0] != "started":  # the request ended before any step: events() reads how
                job.out.put_nowait(first)

            async def events():
                try:
                    if kind == "chat":
                        yield chunk(delta={"role": "assistant", "content": ""})
                    while True:
                        what, val = await job.out.get()
                        if what == "text":
                            yield chunk(delta={"content": val}, text=val)
                        elif what == "error":
                            yield f"data: {json.dumps(ApiError(500, val, type_='server_error').body())}\n\n"
                            break
                        else:
                            if val is not None:
                                yield chunk(reason=finish(val))
                                if include_usage:
                                    yield chunk(use=usage(val), choices=False)
                            break
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (the task is cancelled) or the stream ended
                    job.cancelled.set()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        parts = []
        try:
            while True:
                if (item := await next_item(request, job)) is None:
                    return Response(status_code=499)
                what, val = item
                if what == "started":
                    continue
                if what == "text":
                    parts.append(val)
                elif what == "error":
                    return error(ApiError(500, val, type_="server_error"))
                else:
                    res = val
                    break
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        text = "".join(parts)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish(res)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish(res)}
        return JSONResponse({"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice],
                             "usage": usage(res), "system_fingerprint": None})

    async def chat(request: Request):
        try:
            body = await read_body(request, CHAT_FIELDS)
            msgs = _messages(body.get("messages"))
            if engine.tokenizer is None:
                raise _bad("messages", "this model has no tokenizer: use /v1/completions with token ids",
                           code="unsupported_parameter")
            ids = engine.tokenizer.encode_chat(msgs)
            return await run(request, body, job_for(body, ids), "chat")
        except ApiError as e:
            return error(e)

    async def completions(request: Request):
        try:
            body = await read_body(request, COMPLETION_FIELDS)
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]
            if isinstance(p, str):
                if not p:
                    raise _bad("prompt", "'prompt' is empty")
                if engine.tokenizer is None:
                    raise _bad("prompt", "this model has no tokenizer: give the prompt as token ids")
                ids = engine.tokenizer.encode(p, chat=False)
            elif isinstance(p, list) and p and _all_ints(p):
                if min(p) < 0 or max(p) >= engine.cfg.vocab_size:
                    raise _bad("prompt", f"'prompt' token ids must be in [0, {engine.cfg.vocab_size})")
                ids = list(p)
            elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
                raise ApiError(400, "'prompt' as a batch of prompts is not supported (one sequence a request)",
                               param="prompt", code="unsupported_parameter")
            else:
                raise _bad("prompt", "'prompt' must be a string or a list of token ids")
            return await run(request, body, job_for(body, ids), "completion")
        except ApiError as e:
            return error(e)

    async def models(request: Request):
        try:
            authorize(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                         "owned_by": "hybrid_jax"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_id, "waiting": worker.waiting,
                             "busy": worker.running is not None})

    async def metrics_(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request):
        return HTMLResponse(page.replace("{{MODEL}}", json.dumps(model_id)))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()
        yield
        worker.stop()  # shutdown (SIGTERM / SIGINT): the running request is cancelled at its next token

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_, methods=["GET"]),
        Route("/", index, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.loop = None  # the serving loop, once started
    return app


def serve(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 16) -> None:
    """Run the server until SIGINT / SIGTERM: the running request is cancelled at its next token, the waiting ones
    are answered, and this returns (the process exits normally)."""
    import signal

    import uvicorn

    app = create_app(engine, model_id, api_key=api_key, max_queue=max_queue)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # cancel now rather than wait for the running answer to end (lifespan's end stops it too)
            app.state.worker.stop_soon(app.state.loop)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10,
                                   lifespan="on"))
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers that is a no-op, so the
    # process exits 0 instead of dying of the signal
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
