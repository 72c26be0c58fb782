"""Chat templates: real models' templates render as HF / llama-cpp-python render them, the
fallbacks, and hostile templates refused in one line with no side effect."""

from __future__ import annotations

import os
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload import chat_template as ct
from offload.chat_template import ChatTemplate, ChatTemplateError
from offload.errors import OffloadError
from offload.testing import shared_data_dir

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]

# Templates that do not render the plain conversation above as is, and why:
#
# - tool-use variants iterate over `tools` unconditionally (HF and llama-cpp-python fail
#   the same way with tools=None): rendered with an empty tool list;
# - firefunction-v2 concatenates the variables `functions` and `datetime` (strings its
#   serving stack passes) into its system prompt: rendered with both given.
EXTRA_VARIABLES = {
    "CohereForAI-c4ai-command-r-plus-tool_use": {"tools": []},
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": {"tools": []},
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": {"tools": []},
    "fireworks-ai-llama-3-firefunction-v2": {"functions": "[]", "datetime": "2024-07-26"},
}
# Templates that refuse a system message with their own raise_exception ("System role
# not supported"): the test checks that refusal, then renders the conversation without it.
NO_SYSTEM_ROLE = {"google-gemma-2-2b-it"}


def _template_names() -> list[str]:
    shared = shared_data_dir()
    if shared is None or not (shared / "templates").is_dir():
        return ["(no shared data)"]  # the shared_data fixture skips it
    return sorted(p.stem for p in (shared / "templates").glob("*.jinja"))


def _load(shared, name: str, bos: str = "<s>", eos: str = "</s>") -> ChatTemplate:
    return ChatTemplate.from_string((shared / "templates" / f"{name}.jinja").read_text(), bos, eos)


def _render_real(shared, name: str) -> tuple[str, list[dict], dict]:
    """Renders CONVERSATION with template `name` as the exception lists say: (text, messages, extras)."""
    t = _load(shared, name)
    extra = EXTRA_VARIABLES.get(name, {})
    messages = CONVERSATION
    if name in NO_SYSTEM_ROLE:
        with pytest.raises(ChatTemplateError) as e:
            t.render(messages, **extra)
        assert e.value.template_message is not None, "refused by something other than the template's raise_exception"
        assert "system" in e.value.template_message.lower()
        messages = CONVERSATION[1:]
    return t.render(messages, **extra), messages, extra


# -- every real template --------------------------------------------------------------


@pytest.mark.parametrize("name", _template_names())
def test_real_template_renders_a_conversation(shared_data, name):
    text, messages, _ = _render_real(shared_data, name)
    for m in messages:
        if m["role"] != "system":
            assert m["content"] in text, f"{name} lost the {m['role']} message"
    assert messages is CONVERSATION or name in NO_SYSTEM_ROLE
    # and without the generation prompt (a finished conversation, e.g. for a KV-cache prefix)
    t = _load(shared_data, name)
    done = messages[:3] if messages is CONVERSATION else messages[:2]
    assert "Hello! How can I help?" in t.render(done, add_generation_prompt=False, **EXTRA_VARIABLES.get(name, {}))


def test_exception_lists_name_real_templates(shared_data):
    names = set(_template_names())
    assert set(EXTRA_VARIABLES) <= names and NO_SYSTEM_ROLE <= names


@pytest.mark.parametrize("name", sorted(EXTRA_VARIABLES))
def test_templates_needing_variables_fail_cleanly_without_them(shared_data, name):
    with pytest.raises(ChatTemplateError) as e:
        _load(shared_data, name).render(CONVERSATION)
    assert "\n" not in str(e.value) and e.value.template_message is None


@pytest.mark.parametrize("name", _template_names())
def test_real_template_matches_llama_cpp_python(shared_data, name):
    """Same text as llama-cpp-python's Jinja2ChatFormatter (HF's environment) for the same input."""
    formatter_cls = pytest.importorskip("llama_cpp.llama_chat_format").Jinja2ChatFormatter
    ours, messages, extra = _render_real(shared_data, name)
    source = (shared_data / "templates" / f"{name}.jinja").read_text()
    theirs = formatter_cls(source, eos_token="</s>", bos_token="<s>")(messages=messages, **extra).prompt
    assert ours == theirs


# -- exact renderings -----------------------------------------------------------------


def test_chatml_qwen25_exact(shared_data):
    t = _load(shared_data, "Qwen-Qwen2.5-7B-Instruct", bos="", eos="<|im_end|>")
    assert t.render(CONVERSATION) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # no system message: Qwen's default one; no generation prompt
    assert t.render(CONVERSATION[1:3], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    )
    assert not t.renders_bos()


# Mixtral-8x7B-Instruct-v0.1's template (tokenizer_config.json), as its GGUFs carry it
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def test_mixtral_inst_exact():
    t = ChatTemplate.from_string(MIXTRAL, bos_token="<s>", eos_token="</s>")
    assert t.source == "model" and t.renders_bos()
    assert t.render(CONVERSATION[1:]) == "<s>[INST] Hi there [/INST]Hello! How can I help?</s>[INST] What is 2+2? [/INST]"
    with pytest.raises(ChatTemplateError) as e:
        t.render(CONVERSATION)  # a system message breaks the alternation: the template's own refusal
    assert e.value.template_message == "Conversation roles must alternate user/assistant/user/assistant/..."
    assert "Conversation roles must alternate" in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, OffloadError)


def test_mistral_nemo_inst_exact(shared_data):
    t = _load(shared_data, "mistralai-Mistral-Nemo-Instruct-2407")
    # Nemo puts the system message before the last user message
    assert t.render(CONVERSATION) == (
        "<s>[INST]Hi there[/INST]Hello! How can I help?</s>[INST]You are helpful.\n\nWhat is 2+2?[/INST]"
    )


def test_llama3_exact(shared_data):
    t = _load(shared_data, "meta-llama-Llama-3.1-8B-Instruct", bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert t.render(CONVERSATION) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert t.renders_bos()
    # Llama 3.2 dates its system prompt with strftime_now
    t32 = _load(shared_data, "meta-llama-Llama-3.2-3B-Instruct", bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}" in t32.render(CONVERSATION)


def test_extra_variables_reach_the_template(shared_data):
    t = _load(shared_data, "Qwen-Qwen3-0.6B")
    assert t.render(CONVERSATION[1:2], enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert t.render(CONVERSATION[1:2]).endswith("<|im_start|>assistant\n")


# -- the GGUF path --------------------------------------------------------------------


def _for_model(shared, family: str) -> ChatTemplate:
    from offload.gguf_file import GGUFFile
    from offload.tokenizer import Tokenizer

    path = shared / "vocab" / f"ggml-vocab-{family}.gguf"
    return ChatTemplate.for_model(GGUFFile(path), Tokenizer(path))


def test_for_model_qwen2_uses_its_template(shared_data):
    t = _for_model(shared_data, "qwen2")
    assert t.source == "model"
    assert (t.bos_token, t.eos_token) == ("<|endoftext|>", "<|endoftext|>")
    assert t.render(CONVERSATION[1:]) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not t.renders_bos()


def test_for_model_phi3_uses_its_template(shared_data):
    t = _for_model(shared_data, "phi-3")
    assert t.source == "model"
    assert (t.bos_token, t.eos_token) == ("<s>", "<|endoftext|>")
    assert t.render(CONVERSATION) == (
        "<s><|user|>\nHi there<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    )
    assert t.renders_bos()


def test_for_model_spm_without_template_falls_back_to_inst(shared_data):
    t = _for_model(shared_data, "llama-spm")
    assert t.source == "fallback: mistral-instruct"
    assert (t.bos_token, t.eos_token) == ("<s>", "</s>")
    assert t.render(CONVERSATION) == (
        "<s>[INST] You are helpful.\n\nHi there [/INST] Hello! How can I help?</s>[INST] What is 2+2? [/INST]"
    )
    assert t.renders_bos()


def test_for_model_bpe_without_template_falls_back_to_chatml(shared_data):
    t = _for_model(shared_data, "llama-bpe")
    assert t.source == "fallback: chatml"
    assert t.render(CONVERSATION[1:2]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(CONVERSATION[1:2], add_generation_prompt=False) == "<|im_start|>user\nHi there<|im_end|>\n"
    assert not t.renders_bos()


def test_fallback_choice():
    assert ct.fallback_name("llama") == "mistral-instruct"
    for model in ("gpt2", None, "bert", "t5"):
        assert ct.fallback_name(model) == "chatml"


# -- the environment HF templates expect ----------------------------------------------


def test_hf_environment():
    render = lambda src, **kw: ChatTemplate.from_string(src).render(CONVERSATION, **kw)  # noqa: E731
    # HF's tojson: no HTML escaping, non-ASCII kept, indent
    assert render("{{ {'a': '<é&>'}|tojson }}") == '{"a": "<é&>"}'
    assert render("{{ [1]|tojson(indent=2) }}") == "[\n  1\n]"
    assert render("{{ strftime_now('%Y') }}") == str(datetime.now().year)
    assert render("{{ tools is none }}") == "True"
    assert render("{{ tools|length }}", tools=[{"type": "function"}]) == "1"
    assert render("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }},{% endfor %}") == (
        "system,user,"
    )
    assert render("{% generation %}{{ messages[2].content }}{% endgeneration %}") == "Hello! How can I help?"
    # trim_blocks / lstrip_blocks
    assert render("  {% if true %}\nx\n  {% endif %}\ny") == "x\ny"
    assert render("{{ add_generation_prompt }}") == "True"
    assert ChatTemplate.from_string("{{ add_generation_prompt }}").render([], add_generation_prompt=False) == "False"


def test_messages_are_not_mutated():
    messages = [dict(m) for m in CONVERSATION]
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_string("{% set _ = messages[0].update({'content': 'x'}) %}").render(messages)
    assert messages == CONVERSATION


def test_bad_messages():
    t = ChatTemplate.from_string("{{ messages }}")
    for bad in ("hello", [("user", "hi")], [{"content": "no role"}]):
        with pytest.raises(ChatTemplateError):
            t.render(bad)


# -- errors: one line, the cause named ------------------------------------------------


def _error(src: str, messages=CONVERSATION) -> ChatTemplateError:
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate.from_string(src).render(messages)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and msg.startswith("chat template")
    return e.value


def test_syntax_error_at_compile_time():
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate.from_string("{% for m in messages %}{{ m.content }}")
    assert "syntax error at line 1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate.from_string("ok\n{% if %}")
    with pytest.raises(ChatTemplateError, match="must be text"):
        ChatTemplate.from_string(None)  # type: ignore[arg-type]


def test_undefined_misuse():
    assert "undefined value" in str(_error("{{ foo.bar }}"))
    assert "'functions' is undefined" in str(_error("{{ 'x' + functions }}"))
    # undefined names used only as values render as nothing (as in HF)
    assert ChatTemplate.from_string("[{{ documents }}]").render(CONVERSATION) == "[]"


def test_raise_exception_message():
    e = _error("{{ raise_exception('Only user and assistant roles\nare supported!') }}")
    assert e.template_message == "Only user and assistant roles\nare supported!"
    assert "refused the conversation: Only user and assistant roles are supported!" in str(e)


def test_other_runtime_errors_are_one_line():
    assert "ZeroDivisionError" in str(_error("{{ 1 / 0 }}"))
    assert "recursion" in str(_error("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"))


# -- hostile templates ----------------------------------------------------------------

SECRET = "offload-test-secret-4815162342"


def _hostile(target: str) -> dict[str, str]:
    """Templates that try to reach Python internals, to write `target` or read os.environ."""
    write = f"open('{target}', 'w').write('pwned')"
    system = f"system('touch {target}')"
    return {
        "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "bare_class": "{{ ''.__class__ }}",
        "cycler_globals_os": "{{ cycler.__init__.__globals__.os." + system + " }}",
        "cycler_environ": "{{ cycler.__init__.__globals__.os.environ['OFFLOAD_TEST_SECRET'] }}",
        "joiner_builtins_open": "{{ joiner.__init__.__globals__.__builtins__['open']('" + target + "', 'w') }}",
        "lipsum_popen": "{{ lipsum.__globals__['os'].popen('touch " + target + "').read() }}",
        "namespace_init": "{{ namespace.__init__.__globals__.os." + system + " }}",
        "raise_exception_globals": "{{ raise_exception.__globals__['os'].environ }}",
        "strftime_now_globals": "{{ strftime_now.__globals__['sys'].modules['os'].environ }}",
        "self_context": "{{ self._TemplateReference__context }}",
        "self_init": "{{ self.__init__.__globals__['__builtins__']['__import__']('os')." + system + " }}",
        "attr_filter": "{{ ''|attr('__class__')|attr('__mro__') }}",
        "getitem_dunder": "{{ messages['__class__']['__base__']['__subclasses__']() }}",
        "format_string": "{{ '{0.__class__.__mro__}'.format(messages) }}",
        "format_map": "{{ '{m.__class__}'.format_map({'m': messages}) }}",
        "dict_items_class": "{% for k, v in messages[0].items() %}{{ v.__class__.__base__.__subclasses__() }}{% endfor %}",
        "import_builtin": "{{ __import__('os')." + system + " }}",
        "builtins_open": "{{ __builtins__.open('" + target + "','w') }}",
        "list_append": "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
        "dict_setdefault": "{% set _ = messages[0].setdefault('x', 1) %}",
        "tojson_globals": "{{ (messages|tojson).__class__ }}",
        "write_via_builtins": "{{ cycler.__init__.__globals__.__builtins__." + write + " }}",
    }


@pytest.mark.parametrize("name", sorted(_hostile("/tmp/x")))
def test_hostile_template_refused_without_side_effect(name, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("OFFLOAD_TEST_SECRET", SECRET)
    target = tmp_path / "pwned"
    src = _hostile(str(target))[name]
    e = _error(src)
    assert any(w in str(e) for w in ("refused", "undefined value", "stopped", "failed")), str(e)
    assert SECRET not in str(e)
    assert not target.exists()
    out, err = capfd.readouterr()
    assert SECRET not in out + err and "uid=" not in out + err


def test_unsafe_attribute_is_an_error_not_an_empty_string():
    e = _error("{{ ''.__class__ }}")
    assert "refused: unsafe operation" in str(e) and "__class__" in str(e)


def test_output_never_contains_the_environment(monkeypatch):
    monkeypatch.setenv("OFFLOAD_TEST_SECRET", SECRET)
    # everything a template can name without underscores: none of it is os.environ
    src = "{{ cycler }}{{ joiner }}{{ namespace }}{{ lipsum }}{{ range }}{{ dict }}{{ self }}{{ messages }}"
    out = ChatTemplate.from_string(src).render(CONVERSATION)
    assert SECRET not in out


# -- runaway templates ----------------------------------------------------------------


@pytest.mark.parametrize(
    "src",
    [
        "{{ 'a' * 10**10 }}",
        "{{ [0] * 10**9 }}",
        "{{ 2 ** 10000000 }}",
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ 'a'|center(10**10) }}",
        "{{ 'a'.ljust(10**10) }}",
        "{{ '%9999999999s' % 'a' }}",
        "{{ '%9999999999s'|format('a') }}",
        "{{ '{:>9999999999}'.format('a') }}",
        "{{ '{:>{w}}'.format('a', w='9999999999') }}",
        "{{ '{x:>{w}}'.format_map({'x': 'a', 'w': '9999999999'}) }}",
        "{{ '%*s' % (10**10, 'a') }}",
        "{% set s = 'a' * 10**7 %}{{ s.replace('a', s) }}",
        "{% set s = 'a' * 10**7 %}{{ s|replace('a', s) }}",
        "{% set s = 'a' * 10**7 %}{{ s.join(s) }}",
        "{% set s = 'a' * 10**7 %}{{ s|join(s) }}",
        "{% set s = '\\n' * 10**7 %}{{ s|indent(10**6) }}",
        "{% set s = '\\t' * 10**7 %}{{ s.expandtabs(10**6) }}",
        "{{ range(100000)|list|tojson(indent=10**6) }}",
        "{{ messages|tojson(indent=10**9) }}",
        "{% for i in range(10**9) %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 64 }}{% endfor %}{% endfor %}",
    ],
)
def test_runaway_template_stopped(src):
    e = _error(src)
    assert "stopped" in str(e) or "range too big" in str(e), str(e)


def test_endless_loop_times_out(monkeypatch):
    monkeypatch.setattr(ct, "RENDER_TIMEOUT_S", 0.3)
    e = _error("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert "took longer than 0.3 s" in str(e)
    # a normal template still renders afterwards
    assert ChatTemplate.from_string(MIXTRAL, "<s>", "</s>").render(CONVERSATION[1:2]) == "<s>[INST] Hi there [/INST]"


def test_trace_function_restored():
    import sys

    before = sys.gettrace()
    ChatTemplate.from_string("{{ messages|length }}").render(CONVERSATION)
    with pytest.raises(ChatTemplateError):
        ChatTemplate.from_string("{{ raise_exception('no') }}").render(CONVERSATION)
    assert sys.gettrace() is before


def test_format_still_works():
    render = lambda src: ChatTemplate.from_string(src).render(CONVERSATION)  # noqa: E731
    assert render("{{ '{:>5}|{x}'.format('a', x=1) }}") == "    a|1"
    assert render("{{ '{r}'.format_map({'r': messages[0].role}) }}") == "system"
    assert render("{{ '%3d|%s' % (7, 'b') }}{{ '%s!'|format('c') }}") == "  7|bc!"
    assert "refused" in str(_error("{{ '{0.__class__}'.format(messages) }}"))
    assert render("{{ 'a-b'.replace('-', '+') }}{{ 'x-y'|replace('-', '') }}{{ ', '.join(['p', 'q']) }}") == "a+bxyp, q"
    assert render("{{ ['r', 's']|join('/') }}{{ 'l1\\nl2'|indent(2) }}{{ {'k': 1}|tojson(indent=4) }}") == (
        'r/sl1\n  l2{\n    "k": 1\n}'
    )


def test_renders_bos_edge_cases():
    assert not ChatTemplate.from_string("{{ bos_token }}x").renders_bos()  # BOS with no text
    assert ChatTemplate.from_string("{{ bos_token }}x", "<s>").renders_bos()
    assert not ChatTemplate.from_string("x{{ bos_token }}", "<s>").renders_bos()
    # a template that refuses a lone user message is probed with a system one too
    only_with_system = "{% if messages[0].role != 'system' %}{{ raise_exception('need system') }}{% endif %}{{ bos_token }}"
    assert ChatTemplate.from_string(only_with_system, "<s>").renders_bos()
    assert not ChatTemplate.from_string("{{ raise_exception('never') }}", "<s>").renders_bos()
    assert "ChatTemplate(source='model'" in repr(ChatTemplate.from_string("x"))


def test_environment_is_sandboxed_and_immutable():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert isinstance(ct._ENV, ImmutableSandboxedEnvironment)
    assert ct._ENV.trim_blocks and ct._ENV.lstrip_blocks
    assert os.environ.get("OFFLOAD_TEST_SECRET") is None


# -- hostile conversations, fuzzed over every real template ---------------------------

_ANY_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=6)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "function", "ipython", "", "??"]) | _ANY_VALUE,
     "content": st.text(max_size=40) | _ANY_VALUE},
    optional={"tool_calls": _ANY_VALUE, "name": _ANY_VALUE, "reasoning_content": _ANY_VALUE})


@settings(max_examples=int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "300")), deadline=None, derandomize=True)
@given(name=st.sampled_from(_template_names()), messages=st.lists(_MESSAGE, max_size=5) | _ANY_VALUE,
       tools=st.none() | _ANY_VALUE, add_generation_prompt=st.booleans())
def test_hostile_conversations_render_or_are_one_clear_error(name, messages, tools, add_generation_prompt):
    """Messages of any shape (missing roles, numbers for text, nested junk in tool_calls) and
    junk tools through each real template: text, or one ChatTemplateError line, never another
    exception (templates index, iterate and call methods on whatever they are given)."""
    shared = shared_data_dir()
    if shared is None or not (shared / "templates").is_dir():
        pytest.skip("no shared data")
    try:
        out = _load(shared, name).render(messages, add_generation_prompt=add_generation_prompt,
                                         **({} if tools is None else {"tools": tools}))
        assert isinstance(out, str)
    except ChatTemplateError as e:
        assert str(e) and "\n" not in str(e)
