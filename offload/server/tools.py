"""Tool calls in the text of a reply, turned into OpenAI `tool_calls` as the reply streams.

gpt-oss's harmony replies are split by offload.chat itself (offload.harmony). Other models
write their calls as text, each family in its own format, which its chat template shows
(the templates in shared/data):

    hermes   Qwen 2.5/3, Hermes, and their kin:
             <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
    mistral  Mistral Nemo / Small:  [TOOL_CALLS][{"name": "get_weather", "arguments": {...}}]
             and the newer        [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}
    llama3   Llama 3.1-3.3: the whole reply is one JSON object (after an optional <|python_tag|>)
             {"name": "get_weather", "parameters": {"city": "Paris"}}

`ToolCallParser` takes the reply's content as it streams and gives back content (text outside
the calls, sent on at once except a tail that could start a call's marker) and whole calls
(each sent as one tool_calls delta when it is complete). Text that looks like a call but does
not parse stays content. Only used when the request offers tools.
"""

from __future__ import annotations

import json
import uuid

from ..harmony import partial_marker

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
PYTHON_TAG = "<|python_tag|>"


def tool_format(template_text: str) -> str | None:
    """Which format a chat template asks its model to call tools in (None: none known)."""
    if HERMES_OPEN in template_text:
        return "hermes"
    if MISTRAL_MARK in template_text:
        return "mistral"
    if PYTHON_TAG in template_text or ('"parameters"' in template_text and "<|eot_id|>" in template_text):
        return "llama3"
    return None


def openai_call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _call_from_json(obj, args_key: str = "arguments") -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
        return openai_call(obj["name"], args if args is not None else {})
    return None


class ToolCallParser:
    def __init__(self, fmt: str):
        self.format = fmt
        self.content = ""  # the reply's text outside the calls
        self.calls: list[dict] = []  # OpenAI-shaped: id, type, function {name, arguments}
        self._buffer = ""
        self._inside = False  # hermes: within <tool_call>...; mistral, llama3: collecting the calls to the end
        self._started = False  # llama3: whether any non-space text came (a call must come first)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """Content to send now, and the calls completed by this text."""
        self._buffer += text
        return getattr(self, "_feed_" + self.format)()

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the reply: the rest, an unfinished call parsed if it can be."""
        rest, self._buffer = self._buffer, ""
        if not self._inside:
            return self._text(rest), []
        self._inside = False
        calls = self._parse_rest(rest)
        if calls is None:  # not a call after all: it was text
            opener = {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARK}.get(self.format, "")
            return self._text(opener + rest), []
        self.calls.extend(calls)
        return "", calls

    # -- the formats ------------------------------------------------------------------------
    def _feed_hermes(self) -> tuple[str, list[dict]]:
        out, calls = "", []
        while True:
            if not self._inside:
                at = self._buffer.find(HERMES_OPEN)
                if at < 0:
                    keep = partial_marker(self._buffer, [HERMES_OPEN])
                    out += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return self._text(out), calls
                out += self._buffer[:at]
                self._buffer = self._buffer[at + len(HERMES_OPEN):]
                self._inside = True
            end = self._buffer.find(HERMES_CLOSE)
            if end < 0:
                return self._text(out), calls
            body, self._buffer = self._buffer[:end], self._buffer[end + len(HERMES_CLOSE):]
            self._inside = False
            parsed = self._parse_rest(body)
            if parsed is None:
                out += HERMES_OPEN + body + HERMES_CLOSE
            else:
                self.calls.extend(parsed)
                calls.extend(parsed)

    def _feed_mistral(self) -> tuple[str, list[dict]]:
        if self._inside:
            return "", []
        at = self._buffer.find(MISTRAL_MARK)
        if at >= 0:
            out, self._buffer = self._buffer[:at], self._buffer[at + len(MISTRAL_MARK):]
            self._inside = True  # the calls run to the end of the reply
            return self._text(out), []
        keep = partial_marker(self._buffer, [MISTRAL_MARK])
        out, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        return self._text(out), []

    def _feed_llama3(self) -> tuple[str, list[dict]]:
        if self._inside:
            return "", []
        if not self._started:
            head = self._buffer.lstrip()
            if not head:
                return "", []
            if head.startswith(PYTHON_TAG) or head.startswith("{"):
                self._buffer = head.removeprefix(PYTHON_TAG)
                self._inside = True  # held to the end: the whole reply should be one JSON object
                self._started = True
                return "", []
            if PYTHON_TAG.startswith(head):
                return "", []  # maybe the tag, still arriving
            self._started = True
        out, self._buffer = self._buffer, ""
        return self._text(out), []

    def _parse_rest(self, body: str) -> list[dict] | None:
        """The calls in `body` (what followed the marker), None if it is not a call."""
        body = body.strip()
        if self.format == "mistral" and MISTRAL_ARGS in body and not body.startswith("["):
            calls = []  # name[ARGS]{...} repeated, each after its own [TOOL_CALLS] (already split off once)
            for part in body.split(MISTRAL_MARK):
                name, sep, args = part.partition(MISTRAL_ARGS)
                if not sep or not name.strip():
                    return None
                try:
                    calls.append(openai_call(name.strip(), json.loads(args)))
                except ValueError:
                    return None
            return calls
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        items = obj if isinstance(obj, list) else [obj]
        calls = [_call_from_json(item, "parameters" if self.format == "llama3" else "arguments") for item in items]
        return calls if calls and all(c is not None for c in calls) else None

    def _text(self, text: str) -> str:
        self.content += text
        return text


def call_delta(index: int, call: dict) -> dict:
    """A whole call as one chat.completion.chunk delta (OpenAI's first tool-call chunk, complete)."""
    return {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                            "function": {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}}]}
