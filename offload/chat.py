"""Chat: a conversation rendered with the model's own template, reusing the KV cache.

Every turn renders the whole conversation (`offload.chat_template`), tokenizes it (special
tokens parsed, no extra BOS when the template writes it), and compares it with the tokens
already in the KV cache: only the tokens after the longest common prefix run through the
model. The reply's own tokens go into the cache as they are generated, so the next turn
prefills only the new message (and the template's end-of-turn text), however long the
conversation has become.

`ChatSession` is the conversation of `offload chat`; `Model.chat` and
`Model.create_chat_completion` use `run_chat` directly on any list of messages (a client
that resends the history gets the same reuse).

A reply streams as `Delta`s: content, and for a model that reasons in OpenAI's harmony
format (gpt-oss, `offload.harmony`) also reasoning and tool calls. A later turn's template
may render a reply otherwise than it was generated (gpt-oss's drops the reasoning): the
common prefix then ends inside the cached reply, and everything after it runs again.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from . import harmony
from .errors import ContextOverflowError, OffloadError
from .harmony import CONTENT, REASONING, TOOL_CALL, Delta
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .model import Model


WARM_UP_TOKENS = 32


class ContextFullError(ContextOverflowError):
    """The conversation no longer fits the context window."""


@dataclass
class TurnResult:
    """What one reply did: filled in while it streams, final once it ends."""

    text: str = ""  # the answer (content)
    reasoning: str = ""  # a harmony reply's analysis channel
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI-shaped: id, type, function {name, arguments}
    prompt_tokens: int = 0  # the whole rendered conversation
    cached_tokens: int = 0  # of those, already in the KV cache
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (end of turn), "tool_calls", "length" (max_tokens or context full)
    stop_reason: str = ""  # "eos", "stop", "length", "context", "interrupted"
    time_to_first_token: float = 0.0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0

    @property
    def new_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def reply_frame(template) -> tuple[str, bool]:
    """How the template frames an assistant message: the text it writes after one (e.g.
    "<|im_end|>"), stripped, used as a stop string beside the EOG tokens ("" when none or
    unknown); and whether it writes a space right before one (then the reply's own leading
    space, as SentencePiece models start a word, is dropped: rendered again it would be
    doubled, and the next turn could not reuse the reply's tokens in the cache)."""
    marker = "\x00offload-reply\x00"
    try:
        text = template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                               add_generation_prompt=False)
    except Exception:
        return "", False
    at = text.rfind(marker)
    if at < 0:
        return "", False
    tail = text[at + len(marker):].strip()
    if template.eos_token and tail.startswith(template.eos_token):
        tail = template.eos_token  # an EOS token: the tokenizer's EOG check sees it first anyway
    return tail, text[:at].endswith(" ")


def prompt_ids(model: "Model", template, messages: list[dict], template_vars: dict | None = None) -> list[int]:
    """The conversation rendered (`template_vars`: extra template variables, e.g. tools) and tokenized."""
    if harmony.is_harmony(template):
        messages = harmony.prepare_messages(messages)
    text = template.render(messages, add_generation_prompt=True, **(template_vars or {}))
    return model.tokenizer.encode(text, add_special=not template.renders_bos(), parse_special=True)


def system_prompt_tokens(model: "Model", template, messages: list[dict], template_vars: dict | None = None) -> int | None:
    """How many tokens the conversation's rendering starts with up to the end of its system
    message (BOS included), which a context shift keeps by default; None without one."""
    if not messages or messages[0].get("role") != "system":
        return None
    head = messages[:1]
    try:
        a = prompt_ids(model, template, head + [{"role": "user", "content": "\x01"}], template_vars)
        b = prompt_ids(model, template, head + [{"role": "user", "content": "\x02"}], template_vars)
    except OffloadError:
        return None
    return common_prefix(a, b)


class PlainReply:
    """A reply without structure: all of it is content (HarmonyParser's interface)."""

    reasoning = ""

    def __init__(self) -> None:
        self.content = ""
        self.tool_calls: list[dict] = []

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        self.content += text
        return [Delta(CONTENT, text)]

    def finish(self) -> list[Delta]:
        return []


def run_chat(model: "Model", template, messages: list[dict], params: SamplingParams, max_tokens: int | None = None,
             stop: list[str] | None = None, result: TurnResult | None = None,
             template_vars: dict | None = None) -> Iterator[Delta]:
    """A chat turn (see _chat_turn) holding the model for this thread until it ends or is closed."""
    with model.exclusive():
        yield from _chat_turn(model, template, messages, params, max_tokens, stop, result, template_vars)


def _chat_turn(model: "Model", template, messages: list[dict], params: SamplingParams, max_tokens: int | None = None,
               stop: list[str] | None = None, result: TurnResult | None = None,
               template_vars: dict | None = None) -> Iterator[Delta]:
    """Stream the assistant's reply to `messages` as Deltas, reusing the KV cache.

    `max_tokens` None or <= 0: until end of turn or a full context. `stop`: extra stop
    strings (never part of the text). `template_vars`: extra template variables (tools,
    reasoning_effort). `result` (a TurnResult) is filled in as it goes; it stays valid if
    the caller stops early (Ctrl-C, closing the iterator).

    A harmony template's reply is decoded with the control tokens' text and parsed into
    reasoning, content and tool calls; it ends at `<|return|>` or `<|call|>` (end-of-generation
    tokens in gpt-oss's vocabulary, stop strings where the markers are plain text), never at
    the `<|end|>` that closes the analysis message."""
    res = result if result is not None else TurnResult()
    ids = prompt_ids(model, template, messages, template_vars)
    if not ids:
        raise OffloadError("the chat template rendered an empty prompt")
    n_ctx = model.n_ctx
    if len(ids) >= n_ctx:
        raise ContextFullError(f"the conversation has {len(ids)} tokens, it does not fit the context of {n_ctx}")
    model._check_tokens(ids)
    is_harmony = harmony.is_harmony(template)
    reply = harmony.HarmonyParser() if is_harmony else PlainReply()
    res.tool_calls = reply.tool_calls
    end_text, strip_space = reply_frame(template)
    # a harmony turn ends at <|return|> or <|call|>, whatever the template writes after a finished reply
    ends = list(harmony.TURN_ENDS) if is_harmony else [end_text]
    stops = [s for s in [*ends, *(stop or [])] if s]
    t_start = time.perf_counter()
    cache = model.transformer.cache
    kv = model._kv_sync()
    # Everything after the first token that differs from the cache runs again, also when the cache
    # holds a reply that this rendering writes otherwise (e.g. without its reasoning); at least
    # one token runs (its logits start the reply); all of it once a sliding window's ring has
    # overwritten cells the shorter cache would need.
    prefix = model._reusable_prefix(ids)
    res.prompt_tokens, res.cached_tokens = len(ids), prefix
    stats = model._begin_generation(len(ids) - prefix)
    stats.cached_tokens = prefix
    sampler = Sampler(params)
    for t in ids:
        sampler.accept(t)
    cache.n_past = prefix
    del kv[prefix:]
    logits = model.transformer.forward(np.asarray(ids[prefix:], dtype=np.int64))[-1]
    kv.extend(ids[prefix:])
    stats.prompt_seconds = res.prompt_seconds = time.perf_counter() - t_start
    decoder = StreamDecoder(model.tokenizer, special=is_harmony)
    pending = ""  # text held back while it could be the start of a stop string
    limit = max_tokens if max_tokens and max_tokens > 0 else None
    res.stop_reason, res.finish_reason = "interrupted", None
    t0 = time.perf_counter()

    def take(deltas: list[Delta]) -> list[Delta]:
        if deltas and not res.time_to_first_token:
            res.time_to_first_token = time.perf_counter() - t_start
        res.text, res.reasoning = reply.content, reply.reasoning
        return deltas

    try:
        while True:
            token = sampler.sample(logits)
            if model.tokenizer.is_end_of_generation(token) and not (is_harmony and _harmony_end(model, token)):
                res.stop_reason, res.finish_reason = "eos", "stop"
                break
            sampler.accept(token)
            res.completion_tokens += 1
            stats.generated_tokens += 1
            pending += decoder.push(token)
            if pending:
                found = harmony.first_marker(pending, stops)
                if found is not None:
                    out, pending = pending[: found[0]], ""
                    yield from take(reply.feed(out))
                    res.stop_reason, res.finish_reason = "stop", "stop"
                    # the sampled token is not in the cache; the next turn renders the end of turn itself
                    break
                if strip_space and not res.text:
                    pending = pending.lstrip(" ")
                keep = harmony.partial_marker(pending, stops)
                out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
                yield from take(reply.feed(out))
            if limit is not None and res.completion_tokens >= limit:
                res.stop_reason, res.finish_reason = "length", "length"
                break
            if not model._room_for_one(lambda: model._keep(ids, system_prompt_tokens(model, template, messages,
                                                                                     template_vars))):
                res.stop_reason, res.finish_reason = "context", "length"
                break
            logits = model.transformer.forward(np.array([token], dtype=np.int64))[-1]
            kv.append(token)
        if res.stop_reason != "stop":
            pending += decoder.flush()
            if strip_space and not res.text:
                pending = pending.lstrip(" ")
            yield from take(reply.feed(pending))
        yield from take(reply.finish())
        if res.tool_calls and res.finish_reason == "stop":
            res.finish_reason = "tool_calls"
    finally:
        if not res.time_to_first_token:
            res.time_to_first_token = time.perf_counter() - t_start
        stats.generate_seconds = res.generate_seconds = time.perf_counter() - t0
        stats.time_to_first_token = res.time_to_first_token
        stats.stop_reason = res.stop_reason


def _harmony_end(model: "Model", token: int) -> bool:
    """`<|end|>` closes one harmony message, not the turn; llama.cpp's vocabulary takes it off
    the end-of-generation tokens when `<|return|>` and `<|call|>` are there, an older one may not."""
    return model.tokenizer.piece(token, special=True) == harmony.END.encode()


@dataclass
class ChatSession:
    """A conversation with a model: messages, sampling, and the slash commands' state."""

    model: "Model"
    template: object
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    system: str | None = None
    context_shift: bool = False
    template_vars: dict = field(default_factory=dict)  # extra template variables (reasoning_effort)
    messages: list[dict] = field(default_factory=list)
    last: TurnResult | None = None
    turns: list[TurnResult] = field(default_factory=list)
    shifted: int = 0  # messages dropped by context shifts

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeping the system prompt); the cache is reused where it still matches."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def warm_up(self) -> int:
        """Prefill what every turn starts with (BOS, the system prompt), so that the first
        turn's time to first token does not include compiling kernels. Returns tokens run."""
        ids: list[int] = []
        if self.system:  # the rendered system message up to where the first user message would go
            n = system_prompt_tokens(self.model, self.template, self.messages, self.template_vars)
            ids = prompt_ids(self.model, self.template, self.messages + [{"role": "user", "content": "\x01"}],
                             self.template_vars)[:n] if n else []
        if not ids and self.model.tokenizer.bos_id >= 0 and (self.template.renders_bos() or self.model.tokenizer.adds_bos):
            ids = [self.model.tokenizer.bos_id]
        m = self.model
        kv = m._kv_sync()
        # a batch of a few dozen tokens first (then forgotten): the first prompt otherwise pays for
        # loading the batched kernels (Numba's cache) and for the first touch of the weights
        n = min(WARM_UP_TOKENS, m.n_ctx)
        if len(ids) < n:
            m.transformer.cache.n_past = 0
            del kv[:]
            m.transformer.forward(np.arange(n, dtype=np.int64) % m.args.n_vocab)
        m.transformer.cache.n_past = 0
        del kv[:]
        if not ids or len(ids) >= m.n_ctx:
            return 0
        m.transformer.forward(np.asarray(ids, dtype=np.int64))
        kv.extend(ids)
        return len(ids)

    def send(self, text: str, result: TurnResult | None = None) -> Iterator[Delta]:
        """Add a user message and stream the reply (Deltas); the reply (even a partial one, when
        the caller stops early) joins the conversation, with its reasoning and tool calls (the
        template decides what of them later turns see)."""
        self.messages.append({"role": "user", "content": text})
        res = result if result is not None else TurnResult()
        self.last = res
        while True:
            try:
                stream = run_chat(self.model, self.template, self.messages, self.params, self.max_tokens, result=res,
                                  template_vars=self.template_vars)
                first = next(stream, None)  # renders, checks the context, prefills
                break
            except ContextFullError:
                if self.context_shift and self._shift():
                    continue
                self.messages.pop()
                raise
            except BaseException:  # refused, or Ctrl-C during the prefill: the turn did not happen
                self.messages.pop()
                raise
        try:
            if first is not None:
                yield first
                yield from stream
        finally:
            stream.close()
            self.messages.append(assistant_message(res))
            self.turns.append(res)

    def _shift(self) -> bool:
        """Drop the oldest exchange after the system prompt (llama.cpp shifts the context
        instead; here the conversation is re-rendered, which keeps the template's structure)."""
        start = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        if len(self.messages) - start <= 1:
            return False
        drop = 2 if len(self.messages) - start > 2 else 1
        del self.messages[start:start + drop]
        self.shifted += drop
        return True

    def save(self, path: str) -> None:
        """The conversation as JSON at `path`, and the KV cache that holds it at state_path(path)
        (offload.session), so that `load` continues it without running it again."""
        import json

        from .atomic import atomic_write

        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump({"model": self.model.path, "messages": self.messages}, f, ensure_ascii=False, indent=2)
            f.write("\n")
        self.model.save_state(state_path(path))

    def load(self, path: str) -> int:
        """Continue the conversation saved at `path`: its messages, and its KV cache where the
        state file is there and fits this model (else the next turn runs the conversation
        again). Returns the tokens restored into the cache; OffloadError for an unreadable
        transcript, session.StateError for a state that does not fit."""
        import json

        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            messages = saved["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError("messages must be a list of {role, content}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise OffloadError(f"{path}: not a saved conversation ({e})") from None
        self.messages = messages
        if not os.path.exists(state_path(path)):
            return 0
        return len(self.model.load_state(state_path(path)))


def state_path(path: str) -> str:
    """Where /save keeps the KV state beside a conversation's JSON."""
    return f"{path}.kv"


# -- OpenAI-shaped results, as llama-cpp-python's Llama.create_chat_completion returns them ----

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4()}"


def assistant_message(res: TurnResult) -> dict:
    """The reply as an OpenAI assistant message, with llama.cpp's `reasoning_content` when there is
    reasoning; content None beside tool calls when there is no text, as OpenAI returns it."""
    msg: dict = {"role": "assistant", "content": res.text}
    if res.reasoning:
        msg["reasoning_content"] = res.reasoning
    if res.tool_calls:
        msg["tool_calls"] = copy.deepcopy(res.tool_calls)
        if not res.text:
            msg["content"] = None
    return msg


def delta_dict(d: Delta, res: TurnResult) -> dict | None:
    """A Delta as a chat.completion.chunk's delta (None: nothing to send)."""
    if d.kind == REASONING:
        return {"reasoning_content": d.text} if d.text else None
    if d.kind == TOOL_CALL:
        if d.name:  # opens the call: its id, type and name, as OpenAI's first tool-call chunk
            call = res.tool_calls[d.index]
            return {"tool_calls": [{"index": d.index, "id": call["id"], "type": "function",
                                    "function": {"name": d.name, "arguments": d.text}}]}
        return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]} if d.text else None
    return {"content": d.text} if d.text else None


def completion_dict(cid: str, created: int, model: str, res: TurnResult) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": assistant_message(res),
            "logprobs": None,
            "finish_reason": res.finish_reason,
        }],
        "usage": {
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens,
        },
    }


def chunk_dict(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": cid,
        "model": model,
        "created": created,
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
