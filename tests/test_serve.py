"""`offload serve` against the clients that use it: the official openai package, and raw HTTP
for what a client library never sends (malformed bodies). The answers are checked against
offload.Model directly, the same file loaded in the test: a served reply must be exactly what
the model gives alone, whatever the queue, the cache reuse or the memory budget."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from offload import Model
from offload.demo import demo_model_path
from offload.server import ServerConfig, create_app
from offload.server.app import STATIC

PROMPTS = ["In the beginning", "And the LORD said unto Moses", "Blessed are the meek"]


class RunningServer:
    """An app served by uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, config: ServerConfig, load, wait: bool = True):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = create_app(config, load)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        if wait:
            self.wait_until(lambda: httpx.get(self.url + "/health").status_code == 200)

    def wait_until(self, ready) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if ready():
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.05)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(f"offload_{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def slow_model(budget: str | None = None, delay: float = 0.004):
    """The demo model, each forward step `delay` seconds slower (results unchanged): long enough
    for requests to overlap, for a client to hang up mid-reply."""

    def load():
        m = Model.load(demo_model_path(), memory_budget=budget)
        forward = m.transformer.forward

        def slowed(*args, **kwargs):
            time.sleep(delay)
            return forward(*args, **kwargs)

        m.transformer.forward = slowed
        return m

    return load


@pytest.fixture(scope="module")
def oracle():
    with Model.load(demo_model_path()) as m:
        yield m


@pytest.fixture(scope="module")
def server():
    s = RunningServer(ServerConfig(model_name="demo"), lambda: Model.load(demo_model_path()))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow_tiered_server():
    """Slowed down, and under a memory budget that holds a few experts: they are read from the file."""
    s = RunningServer(ServerConfig(model_name="demo"), slow_model("54MB"))
    yield s
    s.stop()


def oracle_chat(oracle, messages, **kw) -> str:
    oracle._kv_ids.clear()  # a fresh context: the served reply must not depend on what ran before
    oracle.transformer.reset()
    return oracle.create_chat_completion(messages, **kw)["choices"][0]["message"]["content"]


def oracle_completion(oracle, prompt, max_tokens, **kw) -> str:
    return oracle.generate(prompt, max_tokens=max_tokens, stream=False, **kw)


def ask(client, kind: str, prompt: str, stream: bool, max_tokens: int, **kw) -> str:
    """The text of one request through the openai client: "chat" (one user message) or a completion."""
    if kind == "chat":
        r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, stream=stream, **kw)
        return "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=max_tokens, stream=stream, **kw)
    return "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text


# -- the OpenAI API through the openai client ------------------------------------------------

def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == ["demo"]
    assert server.client().models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


def test_chat_is_the_models_reply(server, oracle):
    client = server.client()
    for prompt in PROMPTS[:2]:
        messages = [{"role": "system", "content": "Speak as the prophets."}, {"role": "user", "content": prompt}]
        r = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0)
        expected = oracle_chat(oracle, messages, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == expected and expected
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        # streamed: the same text in pieces, a role first, the finish reason last, then the usage
        chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_is_model_generate(server, oracle):
    client = server.client()
    kw = dict(temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.4, frequency_penalty=0.3)
    extra = {"top_k": 20, "min_p": 0.02, "repeat_penalty": 1.1}
    for prompt in PROMPTS:
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=32, extra_body=extra, **kw)
        expected = oracle_completion(oracle, prompt, 32, top_k=20, min_p=0.02, repeat_penalty=1.1, **kw)
        assert r.choices[0].text == expected and expected
        assert r.usage.completion_tokens == 32 and r.choices[0].finish_reason == "length"
        streamed = client.completions.create(model="demo", prompt=prompt, max_tokens=32, stream=True,
                                             extra_body=extra, **kw)
        assert "".join(c.choices[0].text for c in streamed) == expected
    # token ids as the prompt: the same as the text they encode
    ids = oracle.tokenize(PROMPTS[0])
    r = client.completions.create(model="demo", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == oracle_completion(oracle, PROMPTS[0], 8, temperature=0)


def test_default_max_tokens_of_completions_is_openais(server):
    r = server.client().completions.create(model="demo", prompt=PROMPTS[1], temperature=0)
    assert r.usage.completion_tokens == 16


def test_stop_strings(server, oracle):
    client = server.client()
    full = oracle_completion(oracle, PROMPTS[0], 40, temperature=0)
    word = full.split()[3]
    cut = full[: full.index(word)]
    for stream in (False, True):
        r = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                      stop=["@@never@@", word], stream=stream)
        if stream:
            chunks = list(r)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == cut and finish == "stop"
    messages = [{"role": "user", "content": PROMPTS[0]}]
    full = oracle_chat(oracle, messages, max_tokens=40, temperature=0)
    word = full.split()[2]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0, stop=word)
    assert r.choices[0].message.content == full[: full.index(word)] and r.choices[0].finish_reason == "stop"


def test_seeds(server):
    client = server.client()

    def sample(seed):
        return client.completions.create(model="demo", prompt=PROMPTS[2], max_tokens=24, temperature=1.0,
                                         top_p=1.0, seed=seed, extra_body={"min_p": 0, "top_k": 0}).choices[0].text

    assert sample(1) == sample(1)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


# -- bad requests: raw HTTP ------------------------------------------------------------------

def expect_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, err
    return err


def test_bad_requests_get_openai_errors(server):
    chat, comp = server.url + "/v1/chat/completions", server.url + "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    post = httpx.post
    expect_error(post(chat, content=b'{"messages": [', headers={"content-type": "application/json"}), 400,
                 "invalid_json")
    expect_error(post(chat, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400, "invalid_json")
    expect_error(post(chat, json=[1, 2]), 400, "invalid_json")
    expect_error(post(chat, content=b"[" * 100_000), 400, "invalid_json")
    expect_error(post(chat, content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'), 400)
    expect_error(post(chat, json={}), 400, "missing_field")
    expect_error(post(chat, json={"messages": "hi"}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    expect_error(post(chat, json={"messages": [{"role": "user", "content": 3}]}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "temperature": "hot"}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "temperature": 9}), 400, "invalid_value")
    expect_error(post(chat, json={"messages": msgs, "max_tokens": 2.5}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "max_tokens": 0}), 400, "invalid_value")
    expect_error(post(chat, json={"messages": msgs, "stream": "yes"}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "stop": [1]}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "seed": "x"}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "max_token": 5}), 400, "unknown_field")
    expect_error(post(chat, json={"messages": msgs, "n": 2}), 400, "unsupported_value")
    expect_error(post(chat, json={"messages": msgs, "presence_penalty": 2.5}), 400, "invalid_value")
    expect_error(post(chat, json={"messages": msgs, "frequency_penalty": "lots"}), 400, "invalid_type")
    expect_error(post(chat, json={"messages": msgs, "max_tokens": 100_000}), 400, "context_length_exceeded")
    expect_error(post(chat, json={"messages": msgs, "max_tokens": 510}), 400, "context_length_exceeded")
    long_text = " ".join(["And it came to pass"] * 200)
    expect_error(post(chat, json={"messages": [{"role": "user", "content": long_text}]}), 400,
                 "context_length_exceeded")
    expect_error(post(comp, json={"prompt": long_text}), 400, "context_length_exceeded")
    expect_error(post(comp, json={"prompt": [1, 2, 10**9]}), 400)
    expect_error(post(comp, json={"prompt": ["a", "b"]}), 400, "unsupported_value")
    expect_error(post(comp, json={"prompt": ""}), 400)
    expect_error(post(comp, content=b"x" * (5 * 2**20)), 413, "request_too_large")
    expect_error(post(comp, content=(b"x" * 2**20 for _ in range(5))), 413, "request_too_large")  # chunked
    expect_error(httpx.get(chat), 405)
    expect_error(httpx.get(server.url + "/v1/nothing"), 404)
    # neutral values of unsupported fields are fine; the server is still up and answering
    r = post(chat, json={"messages": msgs, "max_tokens": 2, "n": 1, "presence_penalty": 0, "logprobs": False,
                         "user": "me", "response_format": {"type": "text"}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_and_cors():
    s = RunningServer(ServerConfig(model_name="demo", api_key="sesame", cors_origins=("http://app.example",)),
                      lambda: Model.load(demo_model_path()))
    try:
        # a page from the allowed origin may call the API (the preflight needs no key), others may not
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        denied = httpx.get(s.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://app.example"
        expect_error(httpx.get(s.url + "/v1/models"), 401, "invalid_api_key")
        expect_error(httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        expect_error(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sesame").completions.create(model="demo", prompt="In", max_tokens=2).usage.completion_tokens
        assert httpx.get(s.url + "/health").status_code == 200  # not an API route
    finally:
        s.stop()


def test_503_while_the_model_loads_then_200():
    go = threading.Event()

    def load():
        go.wait(30)
        return Model.load(demo_model_path())

    s = RunningServer(ServerConfig(model_name="demo"), load, wait=False)
    try:
        s.wait_until(lambda: httpx.get(s.url + "/health").status_code == 503)
        assert httpx.get(s.url + "/health").json() == {"status": "loading"}
        expect_error(httpx.post(s.url + "/v1/completions", json={"prompt": "In"}), 503, "model_loading")
        expect_error(httpx.get(s.url + "/v1/offload/experts"), 503, "model_loading")
        assert httpx.get(s.url + "/v1/models").status_code == 200  # the name is known before the model
        go.set()
        s.wait_until(lambda: httpx.get(s.url + "/health").status_code == 200)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "In", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        go.set()
        s.stop()


# -- queue, disconnects, metrics -------------------------------------------------------------

def test_dropped_stream_stops_its_generation(slow_tiered_server, oracle):
    s = slow_tiered_server
    cancelled = s.metric("generations_cancelled_total")
    tokens_before = s.metric("completion_tokens_total")
    body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for _, line in zip(range(6), lines) if line.startswith("data: ")]
        assert got
    deadline = time.monotonic() + 10
    while s.metric("generations_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    assert s.metric("completion_tokens_total") - tokens_before < 200  # 400 at 4 ms each would take 1.6 s more
    # the next request is served as if nothing happened
    messages = [{"role": "user", "content": PROMPTS[2]}]
    r = s.client().chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == oracle_chat(oracle, messages, max_tokens=16, temperature=0)


def test_a_client_that_leaves_before_the_answer_stops_it(slow_tiered_server):
    """Not streamed: the server notices the closed connection and cancels the generation."""
    s = slow_tiered_server
    cancelled = s.metric("generations_cancelled_total")
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0}).encode()
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while s.metric("requests_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while s.metric("generations_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    assert s.metric("requests_running") == 0


def test_concurrent_clients_get_their_solo_answers(slow_tiered_server, oracle):
    """3 clients x 2 requests at once (chat and completions, streamed and not, greedy and
    seeded), on a server that reads experts from the file: every answer is the one the model
    gives that request alone."""
    s = slow_tiered_server
    jobs = []
    for c in range(3):
        jobs.append(("chat", PROMPTS[c], c % 2 == 0, dict(temperature=0.8, seed=10 + c)))
        jobs.append(("completion", PROMPTS[(c + 1) % 3], c % 2 == 1, dict(temperature=0.0)))

    def expected(job):
        kind, prompt, _, kw = job
        if kind == "chat":
            return oracle_chat(oracle, [{"role": "user", "content": prompt}], max_tokens=40, **kw)
        return oracle_completion(oracle, prompt, 40, **kw)

    answers: dict = {}
    errors: list = []

    def client_thread(c: int) -> None:
        client = s.client()
        try:
            for j in (2 * c, 2 * c + 1):
                kind, prompt, stream, kw = jobs[j]
                answers[j] = ask(client, kind, prompt, stream, 40, **kw)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    depth_seen = []
    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        depth_seen.append(s.metric("queue_depth"))
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert not errors, errors
    for j, job in enumerate(jobs):
        assert answers[j] == expected(job), (j, job)
    assert max(depth_seen) >= 1  # they did wait for each other
    experts = httpx.get(s.url + "/v1/offload/experts").json()
    assert experts["layers"] == [0, 1, 2, 3] and experts["n_expert"] == 8
    held = [v for row in experts["held"] for v in row]
    assert 0 < sum(v > 0 for v in held) < 32  # a budget that holds some experts, not all
    assert s.metric("expert_misses_total") > 0 and s.metric("expert_bytes_read_total") > 0


def test_metrics_and_expert_panel(server):
    server.client().completions.create(model="demo", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("requests_total", "completion_tokens_total", "queue_depth", "expert_hits_total",
                 "expert_bytes_read_total", "resident_memory_bytes", "decode_tokens_per_second"):
        assert f"# TYPE offload_{name} " in text
    assert 'offload_requests_total{route="/v1/completions",code="200"}' in text
    assert server.metric("completion_tokens_total") >= 8 and server.metric("resident_memory_bytes") > 0
    panel = httpx.get(server.url + "/v1/offload/experts").json()
    assert sum(map(sum, panel["hits"])) > 0 and panel["live"]["tokens"] == 8
    assert all(v == 1 for row in panel["held"] for v in row)  # the whole model in RAM
    assert [sum(v > 0 for v in row) for row in panel["last"]] == [2] * 4  # the last token's top-2 in each layer
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for ref in ("/static/app.js", "/static/style.css"):
        assert ref in page.text and httpx.get(server.url + ref).status_code == 200


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to check the page's JavaScript")
def test_page_script_parses():
    subprocess.run(["node", "--check", str(STATIC / "app.js")], check=True)


# -- the command -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offload_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "offload", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("sig, code, slots", [(signal.SIGTERM, -signal.SIGTERM, 1), (signal.SIGINT, 130, 1),
                                               (signal.SIGTERM, -signal.SIGTERM, 2)])
def test_serve_command_starts_and_stops_on_a_signal(sig, code, slots):
    """SIGTERM ends the process by that signal (uvicorn raises it again once shut down), Ctrl-C
    with 130 as every offload command; both after a clean shutdown, without a traceback, with
    one slot or several (-np)."""
    port = free_port()
    p = offload_cli("serve", "--port", str(port), "--temp", "0", "-n", "8", "-np", str(slots))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, p.communicate()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "In the beginning"}]})
        assert r.json()["usage"]["completion_tokens"] <= 8  # the -n default
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == code, err
    assert "Traceback" not in err and "serving" in err and "Application shutdown complete" in err
    assert (f"{slots} slots of" in err) == (slots > 1)


def test_serve_command_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p = offload_cli("serve", "--port", str(taken.getsockname()[1]))
        out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.startswith("offload: error: cannot listen on 127.0.0.1:"), err
    assert "serving" not in err  # refused before loading anything


def test_serve_command_refuses_slots_the_context_cannot_hold():
    p = offload_cli("serve", "--port", str(free_port()), "-c", "64", "-np", "8")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "Traceback" not in err, err
    assert "offload: error: a context of 64 split over 8 slots leaves 8 tokens each" in err


def test_serve_command_refuses_a_bad_model(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    for model in (str(tmp_path / "missing.gguf"), str(bad)):
        p = offload_cli("serve", model, "--port", str(free_port()))
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, err
        assert "Traceback" not in err and "offload: error:" in err


def test_load_stays_within_the_memory_budget(oracle):
    """A bounded load test: `offload serve` under a budget that holds a quarter of the experts,
    3 clients x 2 requests at once; every answer is the model's own, and what the process
    grew by from before the model loaded (its peak) stays within the budget, as test_store
    checks it for one process that generates."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = offload_cli("serve", "--port", str(port), "--memory-budget", "54MB")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, p.communicate()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        answers, errors = {}, []

        def client(c: int) -> None:
            try:
                for j in range(2):
                    messages = [{"role": "user", "content": f"{PROMPTS[(c + j) % 3]} {c}"}]
                    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                                   json={"messages": messages, "max_tokens": 24, "temperature": 0.7, "seed": c + j})
                    answers[(c, j)] = (messages, r.json()["choices"][0]["message"]["content"])
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(answers) == 6
        for (c, j), (messages, text) in answers.items():
            assert text == oracle_chat(oracle, messages, max_tokens=24, temperature=0.7, seed=c + j)
        metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(url + "/metrics").text.splitlines()
                   if line.startswith("offload_") and " " in line}
        growth = metrics["offload_peak_resident_memory_bytes"] - metrics["offload_resident_memory_before_load_bytes"]
        assert metrics["offload_resident_memory_before_load_bytes"] > 0
        assert 0 < growth <= metrics["offload_memory_budget_bytes"], metrics
        assert metrics["offload_expert_misses_total"] > 0 and metrics["offload_generations_total"] == 6
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


def test_serve_has_the_model_and_sampling_flags_of_chat():
    from offload.cli import chat, serve

    chat_only = {"system", "context_shift", "reasoning_effort", "hide_reasoning"}  # a session's, not a server's
    flags = {p.name: p.opts for p in serve.params}
    for p in chat.params:
        if p.name not in chat_only:
            assert flags.get(p.name) == p.opts, p.name
