"""Tool calls written as text (Hermes/Qwen, Mistral, Llama 3) parsed into OpenAI tool_calls,
whatever way the reply is cut into streamed pieces; and served through the openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offload import Model
from offload.demo import demo_model_path
from offload.harmony import CONTENT, Delta
from offload.server import ServerConfig
from offload.server import generate as server_generate
from offload.server.tools import ToolCallParser, tool_format
from offload.testing import shared_data_dir

WEATHER = {"city": "Paris", "unit": "°C"}
REPLIES = {
    "hermes": ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) +
               '}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
               "Let me look.", ["get_weather", "get_time"]),
    "mistral": ('[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) + "}]", "",
                ["get_weather"]),
    "mistral-args": ("[TOOL_CALLS]get_weather[ARGS]" + json.dumps(WEATHER) + "[TOOL_CALLS]get_time[ARGS]{}", "",
                     ["get_weather", "get_time"]),
    "llama3": ('<|python_tag|>{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", "",
               ["get_weather"]),
}


def run_parser(fmt: str, text: str, cuts: list[int]) -> tuple[str, list[dict], str]:
    p = ToolCallParser(fmt)
    streamed, calls = "", []
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        out, new = p.feed(text[a:b])
        streamed += out
        calls += new
    out, new = p.finish()
    return streamed + out, calls + new, p.content


@pytest.mark.parametrize("case", sorted(REPLIES))
def test_calls_are_found_however_the_reply_is_cut(case):
    text, content, names = REPLIES[case]
    fmt = case.split("-")[0]
    for cuts in ([], list(range(1, len(text))), list(range(3, len(text), 7))):
        streamed, calls, whole = run_parser(fmt, text, cuts)
        assert streamed.strip() == content and whole.strip() == content
        assert [c["function"]["name"] for c in calls] == names
        assert json.loads(calls[0]["function"]["arguments"]) == WEATHER
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
        assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("fmt, text", [
    ("hermes", "No call here, only <b>text</b> and a <tool_ at the end"),
    ("hermes", "<tool_call>not json</tool_call> and after"),
    ("hermes", "cut short: <tool_call>{\"name\": \"get_wea"),
    ("mistral", "[TOOL_CALLS] something that is not a call"),
    ("llama3", "{not a call, just braces}"),
    ("llama3", "Plain answer with {braces} inside."),
])
def test_text_that_is_not_a_call_stays_content(fmt, text):
    for cuts in ([], list(range(1, len(text)))):
        streamed, calls, whole = run_parser(fmt, text, cuts)
        assert calls == [] and streamed == text and whole == text


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data (real chat templates) is absent")
@pytest.mark.parametrize("name, fmt", [
    ("Qwen-Qwen2.5-7B-Instruct", "hermes"), ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes"),
    ("Qwen-Qwen3-0.6B", "hermes"), ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
    ("Mistral-Small-3.2-24B-Instruct-2506", "mistral"), ("meta-llama-Llama-3.1-8B-Instruct", "llama3"),
    ("google-gemma-2-2b-it", None),
])
def test_the_format_is_read_off_the_template(name, fmt):
    text = (Path(shared_data_dir()) / "templates" / f"{name}.jinja").read_text()
    assert tool_format(text) == fmt


# -- through the server: the model's reply is scripted (the demo model calls no tools) ---------

HERMES_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                   "{% if tools %}<tools>{{ tools | tojson }}</tools> answer with <tool_call>{...}</tool_call>{% endif %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tool_server():
    from test_serve import RunningServer

    s = RunningServer(ServerConfig(model_name="demo"),
                      lambda: Model.load(demo_model_path(), chat_template=HERMES_TEMPLATE))
    yield s
    s.stop()


@pytest.fixture
def scripted_reply(monkeypatch):
    """run_chat replaced by one that 'generates' REPLIES["hermes"] in 5-character pieces."""
    seen_vars = []

    def run_chat(model, template, messages, params, max_tokens=None, stop=None, result=None, template_vars=None):
        seen_vars.append(template_vars)
        text = REPLIES["hermes"][0]
        result.prompt_tokens = 5
        for i in range(0, len(text), 5):
            result.completion_tokens += 1
            yield Delta(CONTENT, text[i:i + 5])
        result.text = text
        result.finish_reason, result.stop_reason = "stop", "eos"

    monkeypatch.setattr(server_generate, "run_chat", run_chat)
    return seen_vars


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def test_tool_calls_through_the_openai_client(tool_server, scripted_reply):
    client = tool_server.client()
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS)
    assert scripted_reply[-1] == {"tools": TOOLS}
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(choice.message.tool_calls[0].function.arguments) == WEATHER
    # streamed: content pieces, then each call whole in one delta
    chunks = list(client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content.strip() == "Let me look." and "<tool_call" not in content
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": no tools offered, the text is left alone
    r = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, tool_choice="none")
    assert scripted_reply[-1] == {} and r.choices[0].message.tool_calls is None
    assert "<tool_call>" in r.choices[0].message.content


def test_harmony_reasoning_and_tool_calls_reach_the_client(tool_server, monkeypatch):
    """What offload.chat splits out of a harmony reply (gpt-oss) goes out as llama.cpp's server
    sends it: reasoning_content, and tool_calls opened with their name, then the arguments."""
    from offload.harmony import REASONING, TOOL_CALL

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}

    def run_chat(model, template, messages, params, max_tokens=None, stop=None, result=None, template_vars=None):
        result.prompt_tokens, result.tool_calls = 5, [call]
        for d in (Delta(REASONING, "The user wants "), Delta(REASONING, "the weather."), Delta(CONTENT, "Checking."),
                  Delta(TOOL_CALL, "", 0, "get_weather"), Delta(TOOL_CALL, '{"city":', 0),
                  Delta(TOOL_CALL, '"Paris"}', 0)):
            result.completion_tokens += 1
            yield d
        result.reasoning, result.text = "The user wants the weather.", "Checking."
        result.finish_reason, result.stop_reason = "tool_calls", "eos"

    monkeypatch.setattr(server_generate, "run_chat", run_chat)
    client = tool_server.client()
    messages = [{"role": "user", "content": "Weather?"}]
    r = client.chat.completions.create(model="demo", messages=messages)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    assert msg.model_extra["reasoning_content"] == "The user wants the weather."
    assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls] == \
        [("call_1", "get_weather", '{"city":"Paris"}')]
    chunks = list(client.chat.completions.create(model="demo", messages=messages, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "The user wants the weather."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id == "call_1" and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city":"Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
