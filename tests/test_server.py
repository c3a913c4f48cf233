"""The OpenAI-compatible server (issue 26): the official `openai` client against a live `hybrid-jax serve` of the
real SmolLM2, started by the test; concurrency, disconnects, the queue's bound, the API key, SIGTERM, and the
chat page in a headless Chromium."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")  # noqa: F811 - a test dependency (pyproject's [test] extra)

KEY = "sk-test-0123"
MODEL = "smol"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    port = _free_port()
    folder = tmp_path_factory.mktemp("serve")
    log = folder / "server.log"
    # its own executable cache (with the test run's secret, conftest.py), not the user's
    cmd = [sys.executable, "-m", "hybrid_jax", "serve", "--model", str(smollm2_dir), "--port", str(port),
           "--max-seq-len", "256", "--max-queue", "4", "--api-key", KEY, "--model-id", MODEL,
           "--cache-dir", str(folder / "xc")]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"server not ready: {log.read_text()}")
    yield {"base": base, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=300)


Q = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(client, messages=Q, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **{"temperature": 0, "max_tokens": 24, **kw})


def _streamed(client, **kw):
    text, chunks, usage, reasons = "", 0, None, []
    for c in _chat(client, stream=True, **kw):
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            text += ch.delta.content or ""
            chunks += 1
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    return text, chunks, usage, reasons


def test_models_health_and_chat(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = _chat(client)
    assert "Paris" in r.choices[0].message.content and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == MODEL
    u = r.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 24 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    text, chunks, usage, reasons = _streamed(client, stream_options={"include_usage": True})
    assert text == r.choices[0].message.content and chunks > 2 and reasons == ["stop"]
    assert usage.completion_tokens == u.completion_tokens and usage.prompt_tokens == u.prompt_tokens
    # the same question again: its prompt's rows are in the cache (all but the last token reused)
    assert usage.prompt_tokens_details.cached_tokens == u.prompt_tokens - 1


def test_completions_and_length(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    s = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5, stream=True) if c.choices)
    assert s == r.choices[0].text and "Paris" in s


def test_stop_strings(client):
    full = _chat(client).choices[0].message.content
    cut = _chat(client, stop=["Paris"])
    assert cut.choices[0].finish_reason == "stop" and "Paris" not in cut.choices[0].message.content
    assert full.startswith(cut.choices[0].message.content)
    text, *_ = _streamed(client, stop="Paris")
    assert text == cut.choices[0].message.content


def test_seed_reproducible(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=16, messages=[{"role": "user", "content": "Tell me a story."}])
    a = _chat(client, seed=7, **kw).choices[0].message.content
    b = _chat(client, seed=7, **kw).choices[0].message.content
    c = _chat(client, seed=8, **kw).choices[0].message.content
    assert a == b and a != c


@pytest.mark.parametrize("kw, param", [
    (dict(n=2), "n"), (dict(logit_bias={"5": 1}), "logit_bias"), (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (dict(logprobs=True), "logprobs"), (dict(extra_body={"mirostat": 1}), "mirostat"),
    (dict(temperature=3), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=400), "max_tokens"), (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(messages=[]), "messages"), (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": "word " * 300}]), "messages"),
    (dict(response_format={"type": "json_object"}), "response_format"),
])
def test_bad_requests_are_400_naming_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["message"]


def test_unknown_model_and_api_key(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=Q)
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        _chat(bad)


PROMPTS = ["The capital of France is", "One, two, three,", "The opposite of hot is", "Water is made of"]


@pytest.mark.parametrize("n", [2, 4])
def test_clients_at_once_get_their_own_answers(client, n):
    def one(p):
        return client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=12).choices[0].text
    ref = [one(p) for p in PROMPTS[:n]]
    with cf.ThreadPoolExecutor(n) as pool:
        got = list(pool.map(one, PROMPTS[:n] * 2))
    assert got == ref * 2


def _post(server, path: str, body: dict, timeout: float = 300):
    """(status, headers, the open response) of a raw POST (http.client: the test controls the connection)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(server["base"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}",
                                                               "Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, dict(r.getheaders()), r, conn


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server["base"] + "/metrics") as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_disconnect_mid_stream_frees_the_engine(server, client):
    ref = _chat(client).choices[0].message.content
    before = _metric(server, 'hybrid_jax_requests_total{finish_reason="cancelled"}')
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
            "max_tokens": 200, "temperature": 0, "stream": True}
    status, _, r, conn = _post(server, "/v1/chat/completions", body)
    got = [r.readline() for _ in range(6)]
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    assert status == 200 and any(x.startswith(b"data: ") for x in got)
    t0 = time.perf_counter()
    assert _chat(client).choices[0].message.content == ref
    assert time.perf_counter() - t0 < 60  # not behind the 200-token essay
    deadline = time.time() + 30
    while _metric(server, 'hybrid_jax_requests_total{finish_reason="cancelled"}') <= before and time.time() < deadline:
        time.sleep(0.2)
    assert _metric(server, 'hybrid_jax_requests_total{finish_reason="cancelled"}') == before + 1


def test_queue_bound_gives_503_with_retry_after(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}

    def post(_):
        status, headers, r, conn = _post(server, "/v1/completions", body)
        out = (status, {k.lower(): v for k, v in headers.items()}, json.loads(r.read()))
        conn.close()
        return out
    with cf.ThreadPoolExecutor(9) as pool:
        rs = list(pool.map(post, range(9)))
    codes = sorted(st for st, _, _ in rs)
    assert codes.count(200) >= 5 and 503 in codes, codes  # 1 running + 4 waiting; the rest refused
    _, headers, busy = next(x for x in rs if x[0] == 503)
    assert headers["retry-after"] and busy["error"]["code"] == "queue_full"
    ok = {b["choices"][0]["text"] for st, _, b in rs if st == 200}
    assert len(ok) == 1  # the same greedy answer for each
    assert _metric(server, "hybrid_jax_ttft_seconds_count") > 0 and _metric(server, "hybrid_jax_rejected_total") >= 1


def test_chat_page_in_headless_chromium(server, tmp_path):
    """The page at / streams two answers of one conversation into the DOM (the second turn reuses the first's
    rows) and shows TTFT and tokens/s; a screenshot is written."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)
    assert chromium, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server["base"] + f"/?key={KEY}")
        for i, q in enumerate(["What is the capital of France?", "Say that again in one word."]):
            page.fill("#input", q)
            page.click("#send")
            page.wait_for_selector(f".msg.assistant >> nth={i}")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant')[{i}].dataset.done === '1'",
                                   timeout=300_000)
        answers = page.locator(".msg.assistant").all_inner_texts()
        stats = page.locator(".stats").all_inner_texts()
        shot = Path(os.environ.get("HYBRID_JAX_SCREENSHOT", tmp_path / "chat.png"))
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert len(answers) == 2 and "Paris" in answers[0], answers
    assert all("TTFT" in s and "tokens/s" in s for s in stats), stats
    assert "0 reused" not in stats[1], stats  # the second turn reused the first's rows
    assert shot.stat().st_size > 1000


def test_sigterm_cancels_and_exits_0(server):
    """Last: SIGTERM while a request streams; the server cancels it and exits 0."""
    proc = server["proc"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    status, _, r, conn = _post(server, "/v1/completions", body, timeout=60)
    assert status == 200 and r.readline().startswith(b"data: ")
    proc.send_signal(signal.SIGTERM)
    try:
        while r.readline():
            pass
    except OSError:
        pass
    conn.close()
    assert proc.wait(timeout=60) == 0, server["log"].read_text()


def test_engine_failure_before_the_first_token_is_a_500_and_the_next_request_is_served(monkeypatch, tmp_path):
    """An engine error before a request's first steps are on the device answers 500 with OpenAI's error JSON,
    streamed or not (a streamed response's headers wait for those steps), and the next request is served."""
    import threading

    import uvicorn

    from conftest import hf_params, make_hf_model
    from hybrid_jax import server as S
    from hybrid_jax.config import LlamaConfig
    from hybrid_jax.engine import Engine

    m = make_hf_model("gqa", seed=5)
    cfg = LlamaConfig.from_hf(m.config.to_dict(), dtype="float32")
    eng = Engine(cfg, hf_params(m, cfg), max_seq_len=64, cache_dir=tmp_path / "xc")
    real = S.generate

    def generate(engine, ids, **kw):
        if ids[0] == 7:
            raise RuntimeError("device lost")
        return real(engine, ids, **kw)
    monkeypatch.setattr(S, "generate", generate)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(S.create_app(eng, "m"), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        for stream in (True, False):
            with pytest.raises(openai.InternalServerError, match="device lost"):
                c.completions.create(model="m", prompt=[7, 8, 9], max_tokens=3, temperature=0, stream=stream)
        pieces = list(c.completions.create(model="m", prompt=[5, 8, 9], max_tokens=3, temperature=0, stream=True))
        assert pieces and pieces[-1].choices[0].finish_reason in ("length", "stop")
        ok = c.completions.create(model="m", prompt=[5, 8, 9], max_tokens=3, temperature=0)
        assert ok.usage.prompt_tokens == 3 and 1 <= ok.usage.completion_tokens <= 3
    finally:
        srv.should_exit = True
        th.join()
        eng.close()


def test_stop_from_a_signal_handler_that_interrupted_a_lock_holder():
    """uvicorn's SIGTERM handler (serve's Server.handle_exit) runs on the event loop's thread between two bytecodes,
    maybe while that thread holds the worker's lock or its queue's (submit): what it calls must not wait for them
    (plain locks: it would wait for itself), and the worker stops once the loop is back."""
    import asyncio
    import threading

    from hybrid_jax import server as S

    worker = S.Worker(None, 2, S.Metrics())  # stop never reaches the engine

    async def main():
        loop = asyncio.get_running_loop()
        returned = threading.Event()

        def interrupted_holder():
            with worker._lock, worker.q.mutex:  # the loop's thread inside submit ...
                worker.stop_soon(loop)  # ... when the handler runs
                returned.set()
        threading.Thread(target=interrupted_holder, daemon=True).start()
        assert await asyncio.to_thread(returned.wait, 10), "the signal handler waited for a lock"
        for _ in range(100):
            if worker._stop.is_set():
                break
            await asyncio.sleep(0.01)
        assert worker._stop.is_set(), "the worker was not stopped once the loop was back"

    asyncio.run(main())
    worker.thread.join(10)
    assert not worker.thread.is_alive()
