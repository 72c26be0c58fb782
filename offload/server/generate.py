"""The work of one request, run in the engine's worker thread: a generator of events.

First it checks what can only be checked with the model (the rendered prompt's length
against the context, with max_tokens) and yields READY, so that the handler can still
answer with a 4xx; then it yields ("chunk", dict) for every piece of the reply (OpenAI's
chunk shapes) or TICK (a token gave nothing to send yet), and last ("done", response,
usage): the whole non-streamed response and the usage. Closing the generator (a client
gone) stops the generation before its next token.

Chat replies come from offload.chat.run_chat (the model's chat template, the KV cache
reused across requests where the tokens agree, harmony's reasoning and tool calls; other
models' tool calls parsed out of the text by offload.server.tools when the request offers tools);
completions from Model.generate_tokens, the same tokens `Model.generate` gives.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterator

from .. import harmony
from ..chat import TurnResult, chunk_dict, completion_dict, completion_id, delta_dict, prompt_ids, run_chat
from ..tokenizer import StreamDecoder
from .schemas import APIError, ChatRequest, CompletionRequest
from .tools import ToolCallParser, call_delta, tool_format

READY = ("ready", None)
TICK = ("tick", None)  # nothing to send yet; lets the engine check for a cancel between tokens


def check_fits(prompt_tokens: int, max_tokens: int | None, n_ctx: int, name: str) -> None:
    if prompt_tokens >= n_ctx:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens; the context holds {n_ctx} (and at least one "
                       "token must be generated)", code="context_length_exceeded", param=name)
    if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens and max_tokens asks for {max_tokens} more: "
                       f"{prompt_tokens + max_tokens}, more than the context of {n_ctx}",
                       code="context_length_exceeded", param="max_tokens")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_work(req: ChatRequest, name: str, metrics, activity, default_max_tokens: int | None = None):
    """`default_max_tokens` (serve -n): the cap of a reply whose request gives none (a cap, not
    a demand: the context may end the reply first)."""

    def work(model) -> Iterator[tuple]:
        template = model.chat_template
        tvars: dict = {}
        if req.tools:
            tvars["tools"] = req.tools
        if req.reasoning_effort:
            tvars["reasoning_effort"] = req.reasoning_effort
        ids = prompt_ids(model, template, req.messages, tvars)
        check_fits(len(ids), req.max_tokens, model.n_ctx, "messages")
        yield READY
        if activity is not None:
            activity.start_request()
        metrics.begin(model, len(ids))
        res = TurnResult()
        cid, created = completion_id(), int(time.time())
        limit = req.max_tokens if req.max_tokens is not None else default_max_tokens
        deltas = run_chat(model, template, req.messages, req.sampling, limit, req.stop, result=res,
                          template_vars=tvars)
        fmt = tool_format(template.template) if req.tools and not harmony.is_harmony(template) else None
        calls = ToolCallParser(fmt) if fmt else None  # tool calls written as text, split from the content

        def parsed(text_and_calls: tuple[str, list[dict]]) -> list[dict]:
            """The parser's output as deltas: content, then each completed call."""
            text, new_calls = text_and_calls
            first = len(calls.calls) - len(new_calls)
            return ([{"content": text}] if text else []) + [call_delta(first + i, c) for i, c in enumerate(new_calls)]

        seen = 0
        finished = False
        try:
            yield "chunk", chunk_dict(cid, created, name, {"role": "assistant", "content": ""})
            for d in deltas:
                while seen < res.completion_tokens:
                    seen += 1
                    metrics.token()
                if calls is not None and d.kind == harmony.CONTENT:
                    out = parsed(calls.feed(d.text))
                else:
                    out = [delta] if (delta := delta_dict(d, res)) else []
                for delta in out:
                    yield "chunk", chunk_dict(cid, created, name, delta)
                if not out:
                    yield TICK  # text held back (a tool call being written): still a point to stop at
            if calls is not None:
                for delta in parsed(calls.finish()):
                    yield "chunk", chunk_dict(cid, created, name, delta)
                if calls.calls:
                    res.text, res.tool_calls = calls.content.strip(), calls.calls
                    if res.finish_reason == "stop":
                        res.finish_reason = "tool_calls"
            finished = True
        finally:
            deltas.close()
            metrics.end(res.prompt_tokens, res.new_prompt_tokens, res.completion_tokens, res.prompt_seconds,
                        res.generate_seconds, res.time_to_first_token, cancelled=not finished)
        yield "chunk", chunk_dict(cid, created, name, {}, res.finish_reason)
        response = completion_dict(cid, created, name, res)
        response["usage"] = usage(res.prompt_tokens, res.completion_tokens, res.cached_tokens)
        yield "done", response, response["usage"]

    return work


def completion_work(req: CompletionRequest, name: str, metrics, activity):
    def work(model) -> Iterator[tuple]:
        ids = model.tokenize(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        if len(ids) > model.n_ctx:
            check_fits(len(ids), None, model.n_ctx, "prompt")
        model._check_tokens(ids)  # token ids inside the vocabulary
        check_fits(len(ids), req.max_tokens, model.n_ctx, "prompt")
        yield READY
        if activity is not None:
            activity.start_request()
        metrics.begin(model, len(ids))
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

        def chunk(text: str, finish_reason: str | None = None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        tokens = model.generate_tokens(ids, req.max_tokens, req.sampling)
        decoder = StreamDecoder(model.tokenizer)
        pending, text, finish = "", [], None
        finished = False
        try:
            for token in tokens:
                metrics.token()
                pending += decoder.push(token)
                found = harmony.first_marker(pending, req.stop)
                if found is not None:
                    out, pending, finish = pending[: found[0]], "", "stop"
                else:
                    keep = harmony.partial_marker(pending, req.stop)
                    out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
                if out:
                    text.append(out)
                    yield "chunk", chunk(out)
                else:
                    yield TICK
                if finish:
                    break
            else:
                out = pending + decoder.flush()
                if out:
                    text.append(out)
                    yield "chunk", chunk(out)
                finish = "stop" if model.last_generation.stop_reason == "eos" else "length"
            finished = True
        finally:
            tokens.close()
            g = model.last_generation
            metrics.end(len(ids), len(ids), g.generated_tokens, g.prompt_seconds, g.generate_seconds,
                        g.prompt_seconds, cancelled=not finished)
        g = model.last_generation
        yield "chunk", chunk("", finish)
        response = chunk("".join(text), finish)
        response["usage"] = usage(len(ids), g.generated_tokens)
        yield "done", response, response["usage"]

    return work
