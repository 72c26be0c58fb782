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


# -- a model replying in harmony ---------------------------------------------------------------

# harmony-like: the markers of gpt-oss's template, written as plain text (the tiny model's SentencePiece
# vocabulary has no such tokens). A finished assistant message ends with <|end|>, which must not stop a reply.
HARMONY = ("<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
           "{% for m in messages %}{% if m.role == 'assistant' %}"
           "<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
           "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|start|>assistant{% endif %}")
SMALL = TinyConfig(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_expert=4, n_expert_used=2, n_ctx=4096)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def model_path(model_factory):
    return model_factory(SMALL, "Q8_0")


@pytest.fixture
def model(model_path):
    with offload.Model.load(model_path, n_ctx=1024, chat_template=HARMONY) as m:
        yield m


class Script:
    """Replaces the chat's sampler: each reply samples the next script's tokens (the model still
    runs every token, so the KV cache is real)."""

    def __init__(self, monkeypatch, *replies: list[int]):
        self.replies = list(replies)
        self.sampled: list[list[int]] = []
        script = self

        class Sampler:
            def __init__(self, params):
                self.tokens = iter(script.replies.pop(0))
                script.sampled.append([])

            def accept(self, token):
                pass

            def sample(self, logits):
                token = next(self.tokens)
                script.sampled[-1].append(token)
                return token

        monkeypatch.setattr(chat_module, "Sampler", Sampler)


def tokens(m, text: str) -> list[int]:
    return m.tokenize(text, add_bos=False)


def reply(m, text: str) -> list[int]:
    """A scripted reply: its tokens, then tokens that must never be reached, then EOS."""
    return tokens(m, text) + tokens(m, " SHOULD NOT APPEAR") + [m.tokenizer.eos_id]


def test_completion_splits_reasoning_and_stops_at_return(model, monkeypatch):
    script = Script(monkeypatch, reply(model, ANSWER))
    r = model.create_chat_completion(messages=HI, max_tokens=500)
    c = r["choices"][0]
    assert c["message"] == {"role": "assistant", "content": "Hello! How can I help?",
                            "reasoning_content": "The user greets. Reply briefly."}
    assert c["finish_reason"] == "stop"
    # it ran on past the analysis message's <|end|> and stopped at the <|return|>'s last token
    assert r["usage"]["completion_tokens"] == len(tokens(model, ANSWER)) == len(script.sampled[0])


def test_stream_carries_reasoning_then_content(model, monkeypatch):
    Script(monkeypatch, reply(model, ANSWER))
    chunks = list(model.create_chat_completion(messages=HI, max_tokens=500, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    kinds = [next(iter(d)) for d in deltas[1:-1]]
    assert set(kinds) == {"reasoning_content", "content"} and kinds == sorted(kinds, reverse=True)  # reasoning first
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets. Reply briefly."
    assert "".join(d.get("content", "") for d in deltas) == "Hello! How can I help?"


def test_chat_gives_the_answer_only(model, monkeypatch):
    Script(monkeypatch, reply(model, ANSWER))
    assert model.chat(HI, stream=False) == "Hello! How can I help?"


def test_tool_call_reply(model, monkeypatch):
    Script(monkeypatch, reply(model, TOOL_CALL_REPLY), reply(model, TOOL_CALL_REPLY))
    r = model.create_chat_completion(messages=HI, tools=TOOLS, max_tokens=500)
    c = r["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    assert c["message"]["content"] is None and c["message"]["reasoning_content"] == "Need the weather."
    [call] = c["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    chunks = list(model.create_chat_completion(messages=HI, tools=TOOLS, max_tokens=500, stream=True))
    calls = [d["tool_calls"][0] for c in chunks if "tool_calls" in (d := c["choices"][0]["delta"])]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert "".join(t["function"]["arguments"] for t in calls) == '{"city":"Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_max_tokens_in_the_analysis(model, monkeypatch):
    analysis = "<|channel|>analysis<|message|>Let me think about this for a while"
    Script(monkeypatch, reply(model, ANSWER))
    r = model.create_chat_completion(messages=HI, max_tokens=len(tokens(model, analysis)))
    c = r["choices"][0]
    assert c["finish_reason"] == "length"
    assert c["message"] == {"role": "assistant", "content": "",
                            "reasoning_content": "The user greets. Reply briefly."[: len(c["message"]["reasoning_content"])]}
    assert c["message"]["reasoning_content"].startswith("The user greets")


def test_reply_without_header_is_content(model, monkeypatch):
    Script(monkeypatch, tokens(model, "Just words") + [model.tokenizer.eos_id])
    r = model.create_chat_completion(messages=HI)
    assert r["choices"][0]["message"] == {"role": "assistant", "content": " Just words"}


def test_control_token_markers(model, monkeypatch):
    """As in a real gpt-oss vocabulary: the markers are single control tokens that render only as
    special pieces, <|return|> and <|call|> end generation, and an older llama.cpp that also counts
    <|end|> as end-of-generation must not end the reply at the analysis message."""
    tok = model.tokenizer
    controls = {31990 + i: s for i, s in enumerate(["<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>"])}
    ids = {s: i for i, s in controls.items()}
    piece, is_eog = tok.piece, tok.is_end_of_generation
    monkeypatch.setattr(tok, "piece", lambda t, special=False: (controls[t].encode() if special else b"")
                        if t in controls else piece(t, special))
    monkeypatch.setattr(tok, "is_end_of_generation", lambda t: t in (ids["<|end|>"], ids["<|return|>"]) or is_eog(t))
    c, m, e, s, ret = (ids[k] for k in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|return|>"))
    script = ([c, *tokens(model, "analysis"), m, *tokens(model, "Thinking"), e, s, *tokens(model, "assistant"), c,
               *tokens(model, "final"), m, *tokens(model, "Answer"), ret] + tokens(model, " SHOULD NOT APPEAR"))
    Script(monkeypatch, script)
    r = model.create_chat_completion(messages=HI)
    assert r["choices"][0]["message"] == {"role": "assistant", "content": " Answer", "reasoning_content": " Thinking"}
    assert r["choices"][0]["finish_reason"] == "stop" and model.last_generation.stop_reason == "eos"
    assert r["usage"]["completion_tokens"] == script.index(ret)


def test_reasoning_effort_reaches_the_template(model, monkeypatch):
    seen = []
    render = ChatTemplate.render
    monkeypatch.setattr(ChatTemplate, "render", lambda self, *a, **kw: seen.append(render(self, *a, **kw)) or seen[-1])
    Script(monkeypatch, reply(model, ANSWER))
    model.create_chat_completion(messages=HI, reasoning_effort="high")
    assert any(s.startswith("<|start|>system<|message|>Reasoning: high<|end|>") for s in seen)
    with pytest.raises(OffloadError, match="not one of low, medium, high"):
        model.create_chat_completion(messages=HI, reasoning_effort="extreme")
    with pytest.raises(OffloadError, match="not one of"):
        model.chat(HI, reasoning_effort="max")


def test_next_turn_recomputes_after_the_dropped_reasoning(model, monkeypatch):
    """The cache holds the reply as generated (with its analysis); the next turn renders it without:
    the common prefix ends at the reply's first token, everything after it runs again, and the
    logits equal a fresh prefill's."""
    Script(monkeypatch, reply(model, ANSWER), [model.tokenizer.eos_id])
    session = ChatSession(model, model.chat_template, SamplingParams(temperature=0.0),
                          template_vars={"reasoning_effort": "low"})
    first = list(session.send("Hi"))
    assert "".join(d.text for d in first if d.kind == CONTENT) == "Hello! How can I help?"
    assert session.messages[-1] == {"role": "assistant", "content": "Hello! How can I help?",
                                    "reasoning_content": "The user greets. Reply briefly."}
    turn1 = prompt_ids(model, model.chat_template, session.messages[:1], session.template_vars)
    cached = list(model._kv_ids)
    assert cached[:len(turn1)] == turn1 and len(cached) > len(turn1)  # the prompt and the reply's tokens

    turn2 = prompt_ids(model, model.chat_template, session.messages + [{"role": "user", "content": "Bye"}],
                       session.template_vars)
    assert "Reasoning: low" in model.detokenize(turn2) and "The user greets" not in model.detokenize(turn2)
    expected = common_prefix(cached, turn2)
    assert len(turn1) - 2 <= expected < len(cached)  # diverges inside the cached reply
    forwarded, logits = [], []
    forward = model.transformer.forward

    def spy(ids, all_logits=False):
        out = forward(ids, all_logits)
        forwarded.append(len(ids))
        logits.append(out[-1].copy())
        return out

    monkeypatch.setattr(model.transformer, "forward", spy)
    res = chat_module.TurnResult()
    list(session.send("Bye", result=res))
    assert res.cached_tokens == expected and forwarded[0] == len(turn2) - expected
    monkeypatch.setattr(model.transformer, "forward", forward)
    fresh = model.logits(turn2)[-1]
    assert np.linalg.norm(logits[0] - fresh) <= 1e-4 * np.linalg.norm(fresh)


# -- offload chat --------------------------------------------------------------------------------

@pytest.fixture
def template_file(tmp_path):
    p = tmp_path / "harmony.jinja"
    p.write_text(HARMONY)
    return p


def run_chat_cli(args, input="Hi\n", **kw):
    return CliRunner().invoke(main, ["chat", *map(str, args)], input=input, **kw)


def test_chat_command_shows_reasoning_apart(model_path, template_file, monkeypatch):
    probe = offload.Model.load(model_path, n_ctx=64)
    script = reply(probe, ANSWER)
    probe.close()
    rendered = []
    render = ChatTemplate.render
    monkeypatch.setattr(ChatTemplate, "render", lambda self, *a, **kw: rendered.append(render(self, *a, **kw)) or rendered[-1])
    Script(monkeypatch, script, script, script)
    r = run_chat_cli([model_path, "--chat-template-file", template_file, "--reasoning-effort", "high"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Hello! How can I help?\n"  # stdout: the answer only
    assert "The user greets. Reply briefly.\n" in r.stderr and "\x1b" not in r.stderr
    assert any(s.startswith("<|start|>system<|message|>Reasoning: high<|end|>") for s in rendered)
    r = run_chat_cli([model_path, "--chat-template-file", template_file, "--hide-reasoning"])
    assert r.exit_code == 0 and r.stdout == "Hello! How can I help?\n" and "The user greets" not in r.stderr
    r = run_chat_cli([model_path, "--chat-template-file", template_file], color=True)
    assert "\x1b[2mThe" in r.stderr and "\x1b" not in r.stdout  # the reasoning dimmed where styles are shown
    assert "The user greets. Reply briefly." in re.sub(r"\x1b\[[0-9;]*m", "", r.stderr)


def test_chat_command_bad_reasoning_effort():
    r = run_chat_cli(["--reasoning-effort", "extreme"])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("offload: error: ") and "'extreme'" in r.stderr
    assert "low" in r.stderr and "Traceback" not in r.stderr


def test_reasoning_effort_on_a_template_without_it(model_path, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    r = run_chat_cli([model_path, "--chat-template-file", plain, "--reasoning-effort", "low", "-n", "2"])
    assert r.exit_code == 0, r.stderr
    assert "has no reasoning effort" in r.stderr
