"""Chat: the Python API (OpenAI shapes, KV reuse) and `offload chat` through a pipe and a pseudo-terminal.

The models have random weights: their text is noise, so these tests check structure (shapes,
turns, what is prefilled, how the command reacts to keys), not content."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
import pytest

import offload
from offload.chat import ContextFullError, common_prefix, prompt_ids
from offload.testing import TinyConfig

SMALL = TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_expert=4, n_expert_used=2, n_ctx=4096)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def model_path(model_factory):
    return model_factory(SMALL, "Q8_0")


@pytest.fixture
def template_file(tmp_path):
    p = tmp_path / "chatml.jinja"
    p.write_text(CHATML)
    return p


@pytest.fixture
def model(model_path):
    with offload.Model.load(model_path, n_ctx=2048, chat_template=CHATML) as m:
        yield m


def count_forwarded(m) -> list[int]:
    """Wrap the transformer's forward: the list receives the token count of every call."""
    calls: list[int] = []
    forward = m.transformer.forward

    def wrapped(tokens, all_logits=False):
        calls.append(len(tokens))
        return forward(tokens, all_logits)

    m.transformer.forward = wrapped
    return calls


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


# -- Python API ------------------------------------------------------------------------------

def test_chat_completion_has_the_openai_shape(model):
    r = model.create_chat_completion(messages=MESSAGES, max_tokens=6)
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    assert isinstance(r["created"], int) and abs(r["created"] - time.time()) < 60
    assert r["model"] == model.path
    assert len(r["choices"]) == 1
    c = r["choices"][0]
    assert set(c) == {"index", "message", "logprobs", "finish_reason"}
    assert c["index"] == 0 and c["logprobs"] is None and c["finish_reason"] == "length"
    assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str) and c["message"]["content"]
    u = r["usage"]
    assert u["completion_tokens"] == 6
    assert u["prompt_tokens"] == len(prompt_ids(model, model.chat_template, MESSAGES))
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_streamed_chunks_have_the_openai_shape(model):
    chunks = list(model.create_chat_completion(messages=MESSAGES, max_tokens=5, stream=True, temperature=0.0))
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for c in chunks:
        assert set(c) == {"id", "model", "created", "object", "choices"}
        assert c["object"] == "chat.completion.chunk"
        assert set(c["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[0]["choices"][0]["finish_reason"] is None
    middle = chunks[1:-1]
    assert middle and all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    # the same text as the non-streamed call (greedy)
    whole = model.create_chat_completion(messages=MESSAGES, max_tokens=5, temperature=0.0)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == whole["choices"][0]["message"]["content"]


def test_chat_streams_strings_or_returns_one(model):
    pieces = list(model.chat(MESSAGES, max_tokens=8, temperature=0.0))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert model.chat(MESSAGES, max_tokens=8, temperature=0.0, stream=False) == "".join(pieces)


def test_generate_stream_false_returns_the_whole_text(model):
    assert model.generate("Once upon a time", max_tokens=8, temperature=0.0, stream=False) == \
        "".join(model.generate("Once upon a time", max_tokens=8, temperature=0.0))


def test_context_manager_and_stats(model_path):
    with offload.Model.load(model_path, n_ctx=512, chat_template=CHATML) as m:
        m.chat(MESSAGES, max_tokens=4, stream=False)
        st = m.stats()
        assert st["generated_tokens"] == 4 and "hit_rate" in st and "bytes_read" in st


def test_later_turns_prefill_only_the_new_turn(model):
    """Turn 5 runs only its own message (and the end of the previous reply): not the history."""
    calls = count_forwarded(model)
    messages = [{"role": "system", "content": "You are terse."}]
    prefills, prompt_tokens = [], []
    for turn in range(5):
        messages.append({"role": "user", "content": f"This is question number {turn}: how are things going today?"})
        calls.clear()
        reply = model.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0)
        prefills.append(calls[0])
        prompt_tokens.append(reply["usage"]["prompt_tokens"])
        assert calls[1:] == [1] * (len(calls) - 1)  # then one token at a time
        messages.append(reply["choices"][0]["message"])
    assert prefills[0] == prompt_tokens[0]
    # everything up to the previous turn's prompt is reused; the rest is the new message and at most the
    # previous reply (random-weight noise does not always tokenize back to the tokens that were generated)
    assert model.last_generation.cached_tokens >= prompt_tokens[3]
    new_message = len(model.tokenize("<|im_start|>user\nThis is question number 4: how are things going today?"
                                     "<|im_end|>\n<|im_start|>assistant\n", add_bos=False, special=True))
    assert prefills[4] <= new_message + 12 + 8
    assert prefills[4] < prompt_tokens[4] / 3


def reused_logits_match_fresh(m, messages) -> int:
    """Run a turn on whatever the cache holds; its first logits must equal a fresh prefill's (to
    float rounding: cached positions were computed in other batch sizes, so in other summation
    orders). Returns the tokens reused."""
    got = []
    forward = m.transformer.forward

    def capture(tokens, all_logits=False):
        out = forward(tokens, all_logits)
        got.append(out[-1].copy())
        return out

    m.transformer.forward = capture
    try:
        m.chat(messages, max_tokens=1, temperature=0.0, stream=False)
    finally:
        m.transformer.forward = forward
    reused = m.last_generation.cached_tokens
    fresh = m.logits(prompt_ids(m, m.chat_template, messages))[-1]
    assert np.linalg.norm(got[0] - fresh) <= 1e-4 * np.linalg.norm(fresh)
    return reused


def test_reused_cache_gives_the_same_logits_as_a_fresh_one(model):
    messages = list(MESSAGES)
    first = model.chat(messages, max_tokens=10, temperature=0.0, stream=False)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    assert reused_logits_match_fresh(model, messages) > len(prompt_ids(model, model.chat_template, MESSAGES)) - 1


def test_generate_between_chats_does_not_reuse_a_stale_cache(model):
    a = model.chat(MESSAGES, max_tokens=6, temperature=0.0, stream=False)
    "".join(model.generate("Something else entirely", max_tokens=4))
    assert model.chat(MESSAGES, max_tokens=6, temperature=0.0, stream=False) == a
    # generate's tokens are known to the cache (save_state keeps them): only the BOS they share is reused
    assert model.last_generation.cached_tokens == 1
    model.logits([1, 2, 3])
    assert reused_logits_match_fresh(model, MESSAGES) == 0


def test_interrupted_reply_keeps_the_cache_consistent(model):
    it = model.chat(MESSAGES, max_tokens=50, temperature=0.0)
    next(it), next(it)
    it.close()
    assert len(model._kv_ids) == model.transformer.cache.n_past
    messages = MESSAGES + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "More."}]
    assert reused_logits_match_fresh(model, messages) > 0


def test_full_context(model_path):
    with offload.Model.load(model_path, n_ctx=64, chat_template=CHATML) as m:
        r = m.create_chat_completion(messages=MESSAGES, max_tokens=100)
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] == 64 + 1
        with pytest.raises(ContextFullError):
            m.chat([{"role": "user", "content": "word " * 60}], stream=False)


def test_stop_strings(model):
    text = model.chat(MESSAGES, max_tokens=20, temperature=0.0, stream=False)
    cut = text[3:6]
    r = model.create_chat_completion(messages=MESSAGES, max_tokens=20, temperature=0.0, stop=[cut])
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == text[: text.find(cut)]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix(list(np.arange(5)), list(np.arange(5))) == 5


# -- the command, through a pipe ------------------------------------------------------------

def chat_cli(*args, input: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload", "chat", *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=timeout)


def test_chat_through_a_pipe(model_path, template_file, tmp_path):
    save = tmp_path / "conversation.json"
    r = chat_cli(model_path, "--chat-template-file", template_file, "-n", "8", "--temp", "0", "-t", "1",
                 "--system", "Be brief.", input=f"Hello there\n/stats\nTell me more\n/help\n/save {save}\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 2 and all(replies)
    status = [line for line in r.stderr.splitlines() if line.startswith("[8 tokens")]
    assert len(status) == 2 and all("tok/s" in s and "first token" in s and "reused" in s for s in status)
    assert "hit rate" in r.stderr and "read" in r.stderr and "RSS" in r.stderr  # /stats
    assert "/reset" in r.stderr  # /help
    saved = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant", "user", "assistant"]
    assert saved[1]["content"] == "Hello there" and saved[4]["content"] == replies[1]
    assert "\x1b" not in r.stderr and "#####" not in r.stderr  # no progress bar when stderr is not a terminal


def test_chat_reset_and_context_full(model_path, template_file):
    r = chat_cli(model_path, "--chat-template-file", template_file, "-c", "40", "-n", "100", "--temp", "0",
                 input="Hello there\nAgain please\n/reset\nHello there\n")
    assert r.returncode == 0, r.stderr
    assert "context of 40 tokens is full" in r.stderr and "/reset" in r.stderr
    assert "does not fit the context of 40" in r.stderr  # the second message, on top of a full context
    assert "conversation reset" in r.stderr
    assert len(r.stdout.splitlines()) == 2
    status = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(status) == 2 and " 0 reused" not in status[1]  # after /reset, the cached first message is reused


def test_chat_context_shift(model_path, template_file):
    r = chat_cli(model_path, "--chat-template-file", template_file, "-c", "64", "-n", "20", "--temp", "0",
                 "--context-shift", input="one two three\nfour five six\nseven eight nine\nten eleven\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 4
    assert "does not fit" not in r.stderr


def test_chat_has_the_sampling_and_memory_flags_of_generate():
    from offload.cli import chat, generate

    wanted = {"--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--seed", "-c", "-t", "-n",
              "--memory-budget", "--cache-policy", "--cache-scope", "--o-direct", "--prefetch-depth", "--no-prefetch"}
    opts = lambda cmd: {o for p in cmd.params for o in p.opts}  # noqa: E731
    assert wanted <= opts(generate) and wanted <= opts(chat)
    g = {p.name: p.default for p in generate.params}
    assert all(g[p.name] == p.default for p in chat.params if p.name in g and p.name != "n_predict")


def test_chat_with_the_models_own_template(model_path):
    """No --chat-template: the model's template (or the fallback for a model without one)."""
    r = chat_cli(model_path, "-n", "4", "--temp", "0", input="Hello\n")
    if r.returncode == 0:
        assert len(r.stdout.splitlines()) == 1
    else:  # refused: then in one line
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# -- the command, in a pseudo-terminal -------------------------------------------------------

class Terminal:
    """`offload chat` with a pseudo-terminal as its controlling terminal (stdin, stdout, stderr)."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ["TERM"] = "dumb"
            os.execv(sys.executable, [sys.executable, "-m", "offload", "chat", *map(str, args)])
        self.out = b""

    def read_until(self, needle: bytes, timeout: float = 60, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while needle not in self.out[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.out[-2000:]!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"exited before {needle!r}; got {self.out[-2000:]!r}")
                self.out += data
        return self.out.index(needle, start) + len(needle)

    def read_some(self, timeout: float = 30) -> None:
        """Wait for more output."""
        n = len(self.out)
        deadline = time.monotonic() + timeout
        while len(self.out) == n and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:
                self.out += os.read(self.fd, 65536)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.out += os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"did not exit; got {self.out[-2000:]!r}")


def test_chat_in_a_terminal(model_path, template_file):
    t = Terminal(model_path, "--chat-template-file", template_file, "-c", "4096", "-n", "2000", "--temp", "0", "-t", "1")
    try:
        at = t.read_until(b"> ")
        assert b"ready" in t.out[:at]  # the loading bar, on a terminal
        # turn 1: short
        t.send(b"Hello there\n")
        t.read_until(b"stop: ", start=at)
        at = t.read_until(b"> ", start=at)
        # /stats
        t.send(b"/stats\n")
        at = t.read_until(b"hit rate", start=at)
        at = t.read_until(b"> ", start=at)
        # turn 2: a long reply (2000 tokens), stopped by Ctrl-C after its first bytes
        t.send(b"Tell me a long story\n")
        at = t.read_until(b"story\r\n", start=at)
        t.read_some()
        t.send(b"\x03")
        at = t.read_until(b"[reply stopped]", start=at)
        at = t.read_until(b"> ", start=at)
        # turn 3 works after the interruption
        t.send(b"/stats\n")
        at = t.read_until(b"turns 2", start=at)
        at = t.read_until(b"> ", start=at)
        time.sleep(0.3)
        t.send(b"\x04")  # Ctrl-D at the prompt
        assert t.wait() == 0
        assert b"Traceback" not in t.out
    finally:
        try:
            os.kill(t.pid, 9)
            os.waitpid(t.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(t.fd)


def test_ctrl_c_at_the_prompt_leaves(model_path, template_file):
    t = Terminal(model_path, "--chat-template-file", template_file, "-n", "4")
    try:
        at = t.read_until(b"> ")
        t.send(b"Hi\n")
        at = t.read_until(b"stop: ", start=at)
        t.read_until(b"> ", start=at)
        time.sleep(0.3)  # a SIGINT between the prompt and readline's select() waits for the next key (CPython)
        t.send(b"\x03")
        assert t.wait() == 0
        assert b"Traceback" not in t.out
    finally:
        try:
            os.kill(t.pid, 9)
            os.waitpid(t.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(t.fd)


def test_the_models_own_template_reuses_the_reply(model_path):
    """With the model's template (here the fallback for a SentencePiece model without one), the next
    turn finds at least the first reply token in the cache: the reply's leading space is not doubled."""
    with offload.Model.load(model_path, n_ctx=1024) as m:
        messages = [{"role": "user", "content": "Hello there"}]
        r = m.create_chat_completion(messages=messages, max_tokens=8, temperature=0.0)
        messages += [r["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        m.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)
        assert m.last_generation.cached_tokens > r["usage"]["prompt_tokens"]


def test_chat_errors_are_one_line(model_path, tmp_path):
    r = chat_cli("/nonexistent/model.gguf", input="Hi\n")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "offload: error: " in r.stderr
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    r = chat_cli(model_path, "--chat-template-file", bad, input="Hi\n")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("offload: error: ") and "Traceback" not in r.stderr
    raising = tmp_path / "raising.jinja"  # compiles, but refuses a conversation: that turn is refused, not the session
    raising.write_text("{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                       "{{ messages[0]['content'] }}")
    save = tmp_path / "after-refusal.json"
    r = chat_cli(model_path, "--chat-template-file", raising, "-n", "3", input=f"Hi\nAgain\n/save {save}\n")
    assert r.returncode == 0, r.stderr
    assert "one message only" in r.stderr and "Traceback" not in r.stderr
    # The refused turn left no trace: one exchange kept, one reply printed. (A random model's 3 tokens can hold
    # any character, line separators included, so the reply is compared as text, not counted in lines.)
    messages = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hi"
    assert r.stdout.strip() == messages[1]["content"].strip()
