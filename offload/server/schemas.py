"""OpenAI request bodies: checked field by field into plain requests, or an APIError.

Every field a client may send is listed with its check. A field OpenAI defines that offload
cannot honour (n > 1, logprobs, logit_bias, a JSON response format...) is accepted at its
neutral value and refused otherwise, so a client never gets silently different behaviour;
a field nobody defines is refused (a typo such as "max_token" would otherwise be ignored).
Sampling fields absent from a request take the server's defaults (the `offload serve`
flags, named as llama.cpp's); llama.cpp's extras (top_k, min_p, repeat_penalty) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from ..sampling import SamplingParams

MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error returned to the client as OpenAI shapes it: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass
class Request:
    """What both endpoints share."""

    sampling: SamplingParams
    max_tokens: int | None  # None: until the end of the turn (chat) or a full context
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    model: str | None = None


@dataclass
class ChatRequest(Request):
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    reasoning_effort: str | None = None


@dataclass
class CompletionRequest(Request):
    prompt: str | list[int] = ""


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_kind(data)}", code="invalid_json")
    return data


# -- field checks ---------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _number(body: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(name, f"{name} must be a number, not {_kind(v)}", "invalid_type")
    if not lo <= v <= hi:
        raise invalid(name, f"{name} must lie in [{lo:g}, {hi:g}], not {v:g}")
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int | None, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(name, f"{name} must be an integer, not {_kind(v)}", "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise invalid(name, f"{name} must be at least {lo}" + (f" and at most {hi}" if hi is not None else "")
                      + f", not {v}")
    return v


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"{name} must be true or false, not {_kind(v)}", "invalid_type")
    return v


def _neutral(body: dict, name: str, neutral_values: tuple, why: str) -> None:
    """A field offload does not implement: fine absent or at its neutral value, refused otherwise."""
    v = body.get(name)
    if v is None or any(v == n and type(v) is type(n) for n in neutral_values):
        return
    raise APIError(400, f"{name}={json.dumps(v)[:80]} is not supported: {why}", code="unsupported_value", param=name)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", f"stop must be a string or an array of strings, not {_kind(v)}", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, not {len(stops)}")
    return [s for s in stops if s]


def _common(body: dict, known: set[str], defaults: SamplingParams, default_max: int | None) -> dict:
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                       else ""), code="unknown_field", param=unknown[0])
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"model must be a string, not {_kind(model)}", "invalid_type")
    _neutral(body, "n", (1,), "one choice per request")
    _neutral(body, "logit_bias", ({},), "no logit bias")
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(body, "seed", -(2**63), 2**64 - 1, None)
        seed = seed % 2**64  # numpy's generator takes a non-negative seed
    sampling = replace(
        defaults,
        temperature=_number(body, "temperature", 0.0, 2.0, defaults.temperature),
        top_p=_number(body, "top_p", 0.0, 1.0, defaults.top_p),
        top_k=_integer(body, "top_k", 0, None, defaults.top_k),
        min_p=_number(body, "min_p", 0.0, 1.0, defaults.min_p),
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0, defaults.repeat_penalty),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, defaults.presence_penalty),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, defaults.frequency_penalty),
        seed=seed if seed is not None else defaults.seed,
    )
    if sampling.repeat_penalty <= 0:
        raise invalid("repeat_penalty", "repeat_penalty must be above 0 (1: off)")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options", f"stream_options must be an object, not {_kind(options)}", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage")
    if options and set(options) - {"include_usage"}:
        raise APIError(400, f"unknown field stream_options.{sorted(set(options) - {'include_usage'})[0]}",
                       code="unknown_field", param="stream_options")
    return dict(sampling=sampling, max_tokens=default_max, stop=_stop(body), stream=stream,
                include_usage=include_usage, model=model)


# -- /v1/chat/completions -------------------------------------------------------------------

CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "stop", "seed", "stream", "stream_options", "n",
    "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort", "user", "logprobs", "top_logprobs",
    "response_format", "logit_bias", "metadata", "store", "service_tier",
}


def chat_request(body: dict, defaults: SamplingParams, n_ctx: int) -> ChatRequest:
    common = _common(body, CHAT_FIELDS, defaults, None)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise invalid("max_tokens", "give max_tokens or max_completion_tokens, not both")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    common["max_tokens"] = _max_tokens(body, name, n_ctx, None)
    _neutral(body, "logprobs", (False,), "no log probabilities")
    _neutral(body, "top_logprobs", (0,), "no log probabilities")
    _neutral(body, "response_format", ({"type": "text"},), "no constrained (JSON) output")
    _boolean(body, "parallel_tool_calls", True)
    for name in ("user", "service_tier"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise invalid(name, f"{name} must be a string, not {_kind(body[name])}", "invalid_type")
    messages = _messages(body.get("messages"))
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                                  and isinstance(t.get("function"), dict)
                                                  and isinstance(t["function"].get("name"), str) for t in tools):
            raise invalid("tools", 'tools must be an array of {"type": "function", "function": {"name": ...}}',
                          "invalid_type")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise APIError(400, f"tool_choice={json.dumps(choice)[:80]} is not supported: only \"auto\" and \"none\" "
                       "(the model decides whether to call a tool)", code="unsupported_value", param="tool_choice")
    if choice == "none":
        tools = None  # the template then offers no tools
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in ("low", "medium", "high"):
        raise invalid("reasoning_effort", f"reasoning_effort must be low, medium or high, not {json.dumps(effort)}")
    return ChatRequest(**common, messages=messages, tools=tools or None, reasoning_effort=effort)


def _messages(v: Any) -> list[dict]:
    if v is None:
        raise invalid("messages", "messages is required", "missing_field")
    if not isinstance(v, list) or not v:
        raise invalid("messages", "messages must be a non-empty array of messages", "invalid_type")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"{where} must be an object, not {_kind(m)}", "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, not "
                          f"{json.dumps(role)[:40]}")
        msg = dict(m)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid(f"{where}.content[{j}]", f"{where}.content[{j}]: only text parts are supported "
                                  '({"type": "text", "text": ...})', "unsupported_value")
                texts.append(part["text"])
            msg["content"] = "".join(texts)
        elif content is None:
            if not (role == "assistant" and m.get("tool_calls")):
                raise invalid(f"{where}.content", f"{where}.content is required", "missing_field")
        elif not isinstance(content, str):
            raise invalid(f"{where}.content", f"{where}.content must be a string or an array of text parts, not "
                          f"{_kind(content)}", "invalid_type")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise invalid(f"{where}.tool_calls", f"{where}.tool_calls must be an array of objects", "invalid_type")
        out.append(msg)
    return out


# -- /v1/completions ------------------------------------------------------------------------

COMPLETION_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
    "presence_penalty", "frequency_penalty", "stop", "seed", "stream", "stream_options", "n", "best_of", "echo",
    "suffix", "logprobs", "user", "logit_bias",
}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def completion_request(body: dict, defaults: SamplingParams, n_ctx: int) -> CompletionRequest:
    common = _common(body, COMPLETION_FIELDS, defaults, None)
    common["max_tokens"] = _max_tokens(body, "max_tokens", n_ctx, COMPLETION_MAX_TOKENS)
    _neutral(body, "best_of", (1,), "one choice per request")
    _neutral(body, "echo", (False,), "the prompt is not repeated")
    _neutral(body, "suffix", ("",), "no insertion (fill-in-the-middle)")
    _neutral(body, "logprobs", (0,), "no log probabilities")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid("user", f"user must be a string, not {_kind(body['user'])}", "invalid_type")
    return CompletionRequest(**common, prompt=_prompt(body.get("prompt")))


def _prompt(v: Any) -> str | list[int]:
    if v is None:
        raise invalid("prompt", "prompt is required", "missing_field")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # a batch of one
    if isinstance(v, str):
        if not v:
            raise invalid("prompt", "prompt is empty")
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return list(v)
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
        raise APIError(400, "a batch of several prompts is not supported: send one prompt per request",
                       code="unsupported_value", param="prompt")
    raise invalid("prompt", "prompt must be a string or an array of token ids", "invalid_type")


def _max_tokens(body: dict, name: str, n_ctx: int, default: int | None) -> int | None:
    v = _integer(body, name, 1, None, default)
    if v is not None and v > n_ctx:
        raise APIError(400, f"{name}={v} is more than the context of {n_ctx} tokens", code="context_length_exceeded",
                       param=name)
    return v
