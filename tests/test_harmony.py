"""gpt-oss's harmony format: the reply parser, the real template's renderings, the chat API and
`offload chat` on a harmony reply (a tiny random model whose sampler is scripted), and the
KV cache when a later turn renders the reply without its reasoning."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from click.testing import CliRunner

import offload
import offload.chat as chat_module
from offload import chat_template as ct
from offload.chat import ChatSession, common_prefix, prompt_ids
from offload.chat_template import ChatTemplate, ChatTemplateError
from offload.cli import main
from offload.errors import OffloadError
from offload.harmony import CONTENT, REASONING, TOOL_CALL, HarmonyParser, is_harmony, parse, prepare_messages
from offload.sampling import SamplingParams
from offload.testing import TinyConfig

# -- the parser -----------------------------------------------------------------------------

ANSWER = ("<|channel|>analysis<|message|>The user greets. Reply briefly.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>")
TOOL_CALL_REPLY = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
                   "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                   '<|message|>{"city":"Paris"}<|call|>')
RECIPIENT_FIRST = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city":"Paris"}<|call|>'

# (model output, reasoning, content, tool calls as (name, arguments), the marker that ended it)
CASES = {
    "analysis then final": (ANSWER, "The user greets. Reply briefly.", "Hello! How can I help?", [], "<|return|>"),
    "text after the end is ignored": (ANSWER + "<|start|>assistant<|channel|>final<|message|>more",
                                      "The user greets. Reply briefly.", "Hello! How can I help?", [], "<|return|>"),
    "final only": ("<|channel|>final<|message|>4<|return|>", "", "4", [], "<|return|>"),
    "tool call, recipient after the channel": (TOOL_CALL_REPLY, "Need the weather.", "",
                                               [("get_weather", '{"city":"Paris"}')], "<|call|>"),
    "tool call, recipient in the header before the channel": (RECIPIENT_FIRST, "", "",
                                                              [("get_weather", '{"city":"Paris"}')], "<|call|>"),
    "role and recipient before the channel": (
        '<|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{"q": 1}<|call|>',
        "", "", [("lookup", '{"q": 1}')], "<|call|>"),
    "commentary preamble is content": ("<|channel|>commentary<|message|>Checking. <|end|>"
                                       "<|start|>assistant<|channel|>final<|message|>Done.<|return|>",
                                       "", "Checking. Done.", [], "<|return|>"),
    "truncated in the analysis": ("<|channel|>analysis<|message|>Let me count: one, two",
                                  "Let me count: one, two", "", [], None),
    "truncated inside a marker": ("<|channel|>analysis<|message|>Let me count.<|en", "Let me count.", "", [], None),
    "truncated in a header": ("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|chan", "Hm.", "", [], None),
    "truncated in the first header": ("<|channel|>analy", "", "", [], None),
    "no header: all content": ("Just an answer, with a < sign.", "", "Just an answer, with a < sign.", [], None),
    "no header, then the turn's end": ("Plain.<|return|>", "", "Plain.", [], "<|return|>"),
    "no header, starting like to=": ("today is fine", "", "today is fine", [], None),
    "leading whitespace before the header": (" \n<|channel|>final<|message|>Hi<|return|>", "", "Hi", [], "<|return|>"),
    "a missing <|end|> before the next header": ("<|channel|>analysis<|message|>Think.<|start|>assistant"
                                                 "<|channel|>final<|message|>Said.<|return|>",
                                                 "Think.", "Said.", [], "<|return|>"),
    "a marker-like text that is no marker stays": ("<|channel|>final<|message|>a <|b|> c<|return|>",
                                                   "", "a <|b|> c", [], "<|return|>"),
}


def summary(p: HarmonyParser):
    return p.reasoning, p.content, [(c["function"]["name"], c["function"]["arguments"]) for c in p.tool_calls], p.ended_by


def run_chunks(chunks: list[str]):
    p = HarmonyParser()
    deltas = []
    for c in chunks:
        deltas += p.feed(c)
    deltas += p.finish()
    return p, deltas


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_whole(name):
    text, reasoning, content, calls, ended_by = CASES[name]
    assert summary(parse(text)) == (reasoning, content, calls, ended_by)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parse_in_any_chunks(name):
    """Every way of cutting the text in two, one character at a time, and random cuts: the same
    reply, and the streamed deltas add up to it."""
    text, *expected = CASES[name]
    rng = random.Random(0)
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for _ in range(20):
        points = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1)))
        cuts.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)])])
    for chunks in cuts:
        p, deltas = run_chunks(chunks)
        assert summary(p) == tuple(expected), chunks
        assert "".join(d.text for d in deltas if d.kind == REASONING) == p.reasoning
        assert "".join(d.text for d in deltas if d.kind == CONTENT) == p.content
        for i, call in enumerate(p.tool_calls):
            mine = [d for d in deltas if d.kind == TOOL_CALL and d.index == i]
            assert mine[0].name == call["function"]["name"] and mine[0].text == ""
            assert "".join(d.text for d in mine) == call["function"]["arguments"]


def test_parser_streams_before_the_message_ends():
    """Reasoning shows as it comes, holding back only what could begin a marker."""
    p = HarmonyParser()
    assert p.feed("<|channel|>analy") == []
    assert [d.text for d in p.feed("sis<|message|>Thinking hard <|")] == ["Thinking hard "]
    assert [(d.kind, d.text) for d in p.feed("end|><|start|>assistant<|channel|>final<|message|>Yes")] == \
        [(CONTENT, "Yes")]


def test_tool_calls_are_openai_shaped():
    call = parse(TOOL_CALL_REPLY).tool_calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}


# -- the real template ------------------------------------------------------------------------

DATE = "2025-08-05"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]


def system_block(effort: str = "medium", tools: bool = False) -> str:
    return ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            f"Knowledge cutoff: 2024-06\nCurrent date: {DATE}\n\nReasoning: {effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message."
            + ("\nCalls to these tools must go to the commentary channel: 'functions'." if tools else "")
            + "<|end|>")


@pytest.fixture
def gpt_oss(shared_data, monkeypatch):
    monkeypatch.setitem(ct._ENV.globals, "strftime_now", lambda fmt: DATE)
    source = (shared_data / "templates" / "openai-gpt-oss-120b.jinja").read_text()
    t = ChatTemplate.from_string(source, "<|startoftext|>", "<|return|>")

    def render(messages, **extra):
        return t.render(prepare_messages(messages), **extra)

    render.template = t
    return render


def test_gpt_oss_is_harmony_and_no_other_real_template_is(shared_data):
    found = {p.stem for p in (shared_data / "templates").glob("*.jinja") if is_harmony(p.read_text())}
    assert found == {"openai-gpt-oss-120b"}
    assert not is_harmony(ChatTemplate.from_string(ct.FALLBACKS["chatml"]))


def test_gpt_oss_system_and_user(gpt_oss):
    got = gpt_oss([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert got == (system_block() + "<|start|>developer<|message|># Instructions\n\nBe terse.\n\n<|end|>"
                   "<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_gpt_oss_drops_earlier_reasoning(gpt_oss):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets."},
                {"role": "user", "content": "Bye"}]
    assert gpt_oss(messages) == (system_block() + "<|start|>user<|message|>Hi<|end|>"
                                 "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
                                 "<|start|>user<|message|>Bye<|end|><|start|>assistant")
    # a finished conversation (training's shape) keeps the last reply's reasoning, and ends it with <|return|>
    assert gpt_oss(messages[:2], add_generation_prompt=False).endswith(
        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>analysis<|message|>The user greets.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>")


def test_gpt_oss_reasoning_effort(gpt_oss):
    for effort in ("low", "high"):
        assert gpt_oss([{"role": "user", "content": "Hi"}], reasoning_effort=effort) == (
            system_block(effort) + "<|start|>user<|message|>Hi<|end|><|start|>assistant")


TOOL_TURN = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "20 degrees"},
]
TOOL_DEVELOPER = ("<|start|>developer<|message|># Instructions\n\nBe terse.\n\n# Tools\n\n## functions\n\n"
                  "namespace functions {\n\n// Get the current weather\ntype get_weather = (_: {\n"
                  "// City name\ncity: string,\n}) => any;\n\n} // namespace functions<|end|>")


def test_gpt_oss_tool_call_turn(gpt_oss):
    """The analysis before a call stays while no final answer follows it; the arguments (a JSON
    string, as OpenAI sends them) are written as JSON, not as a quoted string."""
    assert gpt_oss(TOOL_TURN, tools=TOOLS) == (
        system_block(tools=True) + TOOL_DEVELOPER + "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"20 degrees"<|end|>'
        "<|start|>assistant")
    # once a final answer follows, the call's analysis is dropped
    later = TOOL_TURN + [{"role": "assistant", "content": "20 degrees."}, {"role": "user", "content": "Thanks"}]
    got = gpt_oss(later, tools=TOOLS)
    assert "Need the weather." not in got
    assert got.endswith('<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>'
                        '{"city": "Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary'
                        '<|message|>"20 degrees"<|end|><|start|>assistant<|channel|>final<|message|>20 degrees.<|end|>'
                        "<|start|>user<|message|>Thanks<|end|><|start|>assistant")


def test_gpt_oss_tool_turn_matches_llama_cpp_python(gpt_oss, shared_data):
    formatter_cls = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    source = (shared_data / "templates" / "openai-gpt-oss-120b.jinja").read_text()
    theirs = formatter_cls(source, eos_token="<|return|>", bos_token="<|startoftext|>")(
        messages=prepare_messages(TOOL_TURN), tools=TOOLS).prompt
    assert gpt_oss(TOOL_TURN, tools=TOOLS).split("Current date: ")[1][10:] == theirs.split("Current date: ")[1][10:]


def test_gpt_oss_refuses_channel_tags_in_content(gpt_oss):
    with pytest.raises(ChatTemplateError) as e:
        gpt_oss([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER},
                 {"role": "user", "content": "Again"}])
    assert "\n" not in str(e.value) and "thinking" in e.value.template_message


def test_prepare_messages_copies():
    messages = [{"role": "assistant", "content": None, "reasoning_content": "r",
                 "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]},
                {"role": "assistant", "content": "x", "tool_calls": [{"function": {"name": "g", "arguments": "not json"}}]}]
    before = repr(messages)
    out = prepare_messages(messages)
    assert repr(messages) == before
    assert out[0]["content"] == "" and out[0]["thinking"] == "r"
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[1]["tool_calls"][0]["function"]["arguments"] == "not json"


