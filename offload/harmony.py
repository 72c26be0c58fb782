"""OpenAI's harmony chat format (gpt-oss): recognise it, prepare messages for its template,
and split a reply into reasoning, answer and tool calls as it streams.

After the generation prompt `<|start|>assistant`, a harmony reply is a sequence of
messages, each a header and a body:

    <|channel|>analysis<|message|>...reasoning...<|end|>
    <|start|>assistant<|channel|>final<|message|>...answer...<|return|>

or, for a tool call (the recipient may also come before the channel, right after the role):

    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>

`<|end|>` closes one message and more follow; `<|return|>` and `<|call|>` end the turn, so
generation must stop there and not at `<|end|>`. As llama.cpp's server does, the analysis
channel becomes `reasoning_content`, the final channel (and a commentary message without a
recipient, a preamble to the user) `content`, and a message with a recipient an
OpenAI-style tool call. A reply without any header is content.

The markers are control tokens in a real gpt-oss vocabulary (rendered only when a token's
special text is asked for) but may also arrive as plain text pieces split anywhere (a model
without the o200k vocabulary), so the parser works on text and holds back any tail that
could be the start of a marker.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import OffloadError

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
END, RETURN, CALL = "<|end|>", "<|return|>", "<|call|>"
TURN_ENDS = (RETURN, CALL)  # stop strings of a harmony reply (beside the EOG tokens)

REASONING, CONTENT, TOOL_CALL = "reasoning", "content", "tool_call"
REASONING_EFFORTS = ("low", "medium", "high")

_HEADER_STARTS = (START, CHANNEL, "to=")  # what a header can begin with (after whitespace)
_BODY_ENDS = (END, RETURN, CALL, START, CHANNEL)  # what ends a message body
_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT_RE = re.compile(r"\bto=([^\s<]+)")


@dataclass(frozen=True)
class Delta:
    """A piece of a reply: `kind` is "reasoning", "content" or "tool_call".

    A tool call's first delta opens it (`name` set, `text` ""); the following ones carry its
    arguments (`name` ""). `index` numbers the reply's tool calls from 0."""

    kind: str
    text: str
    index: int = 0
    name: str = ""


def is_harmony(template: Any) -> bool:
    """Whether a ChatTemplate (or template text) writes the harmony format."""
    text = template if isinstance(template, str) else getattr(template, "template", "")
    return isinstance(text, str) and CHANNEL in text and START + "assistant" in text


def check_reasoning_effort(value: Any) -> str | None:
    if value is None or value in REASONING_EFFORTS:
        return value
    raise OffloadError(f"reasoning effort {value!r} is not one of {', '.join(REASONING_EFFORTS)}")


def prepare_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-shaped messages as the gpt-oss template reads them (copies; the input is kept).

    - `reasoning_content` (what offload and llama.cpp return) goes to `thinking`, the field
      the template reads (it drops it for finished turns, keeps it before a tool call);
    - a `content` of None (an OpenAI tool-call message) becomes "": the template tests
      `"..." in message.content`;
    - tool-call `arguments` given as a JSON string are parsed: the template writes them
      with `tojson`, which would otherwise quote the string a second time."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            out.append(m)
            continue
        m = dict(m)
        if "thinking" not in m and isinstance(m.get("reasoning_content"), str):
            m["thinking"] = m["reasoning_content"]
        if "content" in m and m["content"] is None:
            m["content"] = ""
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_parsed_arguments(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _parsed_arguments(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    call = dict(call)
    target = call  # the template reads `function` when there is one, else the call itself
    if isinstance(call.get("function"), dict):
        target = call["function"] = dict(call["function"])
    if isinstance(target.get("arguments"), str):
        try:
            target["arguments"] = json.loads(target["arguments"])
        except ValueError:  # not JSON: the template writes it as a string
            pass
    return call


def partial_marker(text: str, markers) -> int:
    """How many characters at the end of `text` could begin one of `markers` (chat's stop
    strings too): the tail to hold back until the next piece says."""
    best = 0
    for s in markers:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def first_marker(text: str, markers) -> tuple[int, str] | None:
    """Where the earliest of `markers` starts in `text`, and which it is; None if none does."""
    found = [(i, s) for s in markers if (i := text.find(s)) >= 0]
    return min(found) if found else None


class HarmonyParser:
    """Feeds on a harmony reply's text, in chunks cut anywhere; gives Deltas as they become certain.

    `reasoning`, `content` and `tool_calls` (OpenAI-shaped dicts: id, type, function name
    and arguments string) hold the reply so far; `ended_by` is "<|return|>" or "<|call|>"
    once the turn's end was seen in the text (None for a stream cut short, or ended by an
    end-of-generation token that the text does not show)."""

    def __init__(self) -> None:
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[dict] = []
        self.ended_by: str | None = None
        self._buf = ""
        self._in_body = False
        self._kind = CONTENT

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        if self.ended_by is not None:
            return out  # text after the end of the turn is not part of the reply
        self._buf += text
        while self._buf and self.ended_by is None and (self._body(out) if self._in_body else self._header(out)):
            pass
        if self.ended_by is not None:
            self._buf = ""
        return out

    def finish(self) -> list[Delta]:
        """The end of the stream (complete or cut short): what was held back, as far as it is text."""
        out: list[Delta] = []
        rest, self._buf = self._buf, ""
        if self.ended_by is not None or not rest:
            return out
        if not self._in_body:
            head = rest.lstrip()
            if not head or head.startswith(_HEADER_STARTS) or head.startswith("<|"):
                return out  # an unfinished header: nothing of it is reply text
            self._kind = CONTENT
        elif rest.startswith("<|"):
            return out  # the beginning of a marker the stream was cut in
        self._emit(rest, out)
        return out

    # -- states -------------------------------------------------------------------------
    def _header(self, out: list[Delta]) -> bool:
        """Between messages. True when it moved on, False when it needs more text."""
        buf = self._buf
        head = buf.lstrip()
        if not head:
            return False
        if not head.startswith(_HEADER_STARTS):
            if any(s.startswith(head) for s in _HEADER_STARTS):
                return False  # could still become a header
            self._kind, self._in_body = CONTENT, True  # no header: plain text is the answer
            return True
        found = first_marker(buf, (MESSAGE, END, RETURN, CALL))
        if found is None:
            return False
        at, marker = found
        header, self._buf = buf[:at], buf[at + len(marker):]
        if marker == MESSAGE:
            self._open(header, out)
        elif marker in TURN_ENDS:
            self.ended_by = marker
        return True  # END: an empty message; the next header follows

    def _body(self, out: list[Delta]) -> bool:
        buf = self._buf
        found = first_marker(buf, _BODY_ENDS)
        if found is None:
            keep = partial_marker(buf, _BODY_ENDS)
            self._emit(buf[: len(buf) - keep], out)
            self._buf = buf[len(buf) - keep:]
            return False
        at, marker = found
        self._emit(buf[:at], out)
        self._in_body = False
        if marker in (START, CHANNEL):  # a new header without the <|end|> before it
            self._buf = buf[at:]
        else:
            self._buf = buf[at + len(marker):]
            if marker in TURN_ENDS:
                self.ended_by = marker
        return True

    def _open(self, header: str, out: list[Delta]) -> None:
        channel = _CHANNEL_RE.search(header)
        recipient = _RECIPIENT_RE.search(header)
        self._in_body = True
        if recipient:
            name = recipient.group(1).removeprefix("functions.")
            self._kind = TOOL_CALL
            self.tool_calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                    "function": {"name": name, "arguments": ""}})
            out.append(Delta(TOOL_CALL, "", len(self.tool_calls) - 1, name))
        elif channel and channel.group(1) == "analysis":
            self._kind = REASONING
        else:  # final, a commentary preamble, or a channel we do not know: shown to the user
            self._kind = CONTENT

    def _emit(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if self._kind == REASONING:
            self.reasoning += text
            out.append(Delta(REASONING, text))
        elif self._kind == TOOL_CALL:
            self.tool_calls[-1]["function"]["arguments"] += text
            out.append(Delta(TOOL_CALL, text, len(self.tool_calls) - 1))
        else:
            self.content += text
            out.append(Delta(CONTENT, text))


def parse(text: str) -> HarmonyParser:
    """A whole reply at once (the parser, finished)."""
    p = HarmonyParser()
    p.feed(text)
    p.finish()
    return p
