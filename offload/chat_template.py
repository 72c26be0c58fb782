"""Chat templates: a conversation (a list of messages) to the prompt text a model expects.

A GGUF carries its model's chat template as Jinja source in `tokenizer.chat_template`
(as Hugging Face's tokenizer_config.json does). Templates come with the model file, so
they are untrusted input: one rendered with a plain Jinja environment can reach Python
internals (`cycler.__init__.__globals__.os`, `''.__class__.__mro__[1].__subclasses__()`)
and run code: the server-side template injection of a popular binding in 2024
(CVE-2024-34359). Here every template is compiled and rendered in jinja2's
`ImmutableSandboxedEnvironment` (no underscore attributes, no mutating methods of lists
and dicts, bounded `range`), set up as Hugging Face transformers' `apply_chat_template`
sets it up (and llama-cpp-python's `Jinja2ChatFormatter` follows), so real templates
render as they do there:

- `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`break`, `continue`)
  and a pass-through `{% generation %}` tag;
- variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`
  (None unless given) and any extra keyword given to `render` (`enable_thinking`, ...);
- `raise_exception(msg)` (becomes a `ChatTemplateError` with the template's message),
  `strftime_now(fmt)`, and a `tojson` filter that, as HF's, does not HTML-escape and
  keeps non-ASCII (`ensure_ascii=False`, with `indent`, `separators`, `sort_keys`).

Beyond the sandbox, a rendering is bounded: an unsafe attribute is an error at once (not
a silent empty string); `+`, `*`, `**`, `~`, `%`, `str.format` widths, `replace`, `join`,
`indent`, `expandtabs` and `tojson`'s indent refuse results beyond `MAX_OUTPUT_CHARS`
(or integers beyond `MAX_INT_BITS`) before building them, and integer arguments of
method calls and filters are bounded by it too; every other value a call or filter
returns is checked after it; the output stops at `MAX_OUTPUT_CHARS`; and a rendering
that runs past `RENDER_TIMEOUT_S` (a template can loop: nested `range`s) is stopped.
These are guards against runaway templates, not a proof: a builtin that multiplies
sizes and is not in that list is caught only when it returns. Every failure (a
syntax error, an undefined value used wrongly, a refused operation, the template's own
`raise_exception`, a runaway) is one `ChatTemplateError` line naming the cause.

Without a template in the file, `ChatTemplate.for_model` falls back by tokenizer family:

- a SentencePiece vocabulary (`tokenizer.ggml.model` = "llama": Mixtral, Mistral,
  Llama 2) gets the Mistral instruct format, `<s>[INST] user [/INST] answer</s>[INST] ...`
  (a system message is put before the first user message, separated by a blank line);
- anything else gets ChatML, `<|im_start|>role\\ncontent<|im_end|>\\n`, with
  `<|im_start|>assistant\\n` as the generation prompt.

`source` says which: "model" or "fallback: mistral-instruct" / "fallback: chatml".
"""

from __future__ import annotations

import json
import re
import functools
import sys
import time
import types
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError

from .errors import OffloadError

if TYPE_CHECKING:
    from .gguf_file import GGUFFile
    from .tokenizer import Tokenizer

# Bounds on one rendering: generous for any real conversation (a long context is a few
# MB of text), small enough that a hostile template cannot exhaust memory or time.
MAX_OUTPUT_CHARS = 16 * 2**20
MAX_INT_BITS = 4096
RENDER_TIMEOUT_S = 5.0
_MAX_MESSAGE_CHARS = 300  # of a template's own message quoted in an error

_TEMPLATE_KEY = "tokenizer.chat_template"
_TEMPLATE_FILENAME = "<chat template>"


class ChatTemplateError(OffloadError):
    """A chat template that cannot be compiled or rendered (its message is one line).

    `template_message` is the template's own text when it called `raise_exception`
    (a template refusing a conversation it does not support), else None.
    """

    def __init__(self, message: str, template_message: str | None = None):
        super().__init__(message)
        self.template_message = template_message


# -- fallbacks ----------------------------------------------------------------------

_MISTRAL_INSTRUCT = """\
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('the [INST] format has only user and assistant messages (and one system message first), not ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""

_CHATML = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

FALLBACKS = {"mistral-instruct": _MISTRAL_INSTRUCT, "chatml": _CHATML}


def fallback_name(tokenizer_model: str | None) -> str:
    """The fallback template for a vocabulary family (`tokenizer.ggml.model`)."""
    return "mistral-instruct" if tokenizer_model == "llama" else "chatml"


# -- the sandbox ----------------------------------------------------------------------


class _TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception(message)."""


class _Runaway(Exception):
    """A rendering past its time or size bounds."""


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # HF's override: json.dumps as is (Jinja's own tojson HTML-escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant spans with it): its body, as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _too_big(what: str, n: int) -> _Runaway:
    return _Runaway(f"{what} of {n:,} characters is over the limit of {MAX_OUTPUT_CHARS:,}")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_OUTPUT_CHARS:
        raise _too_big("a value", len(value))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _Runaway(f"an integer of {value.bit_length():,} bits is over the limit of {MAX_INT_BITS}")
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_OUTPUT_CHARS:
            raise _Runaway(f"an argument of {a:,} is over the limit of {MAX_OUTPUT_CHARS:,}")


# a width or precision of 8+ digits in a %- or {}-format spec: a string of >= 10 MB
_HUGE_FORMAT_WIDTH = re.compile(r"%[^a-zA-Z%]*\d{8}|\{[^{}]*:[^{}]*\d{8}")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _HUGE_FORMAT_WIDTH.search(fmt):
        raise _Runaway("a format width over the size limit")


_DIGITS = re.compile(r"\d+")


class _GuardedFormatter(SandboxedFormatter):
    """str.format in the sandbox, refusing field widths beyond the size limit (also nested ones)."""

    def format_field(self, value, format_spec):
        if any(len(d) > 8 or int(d) > MAX_OUTPUT_CHARS for d in _DIGITS.findall(format_spec)):
            raise _Runaway("a format width over the size limit")
        return super().format_field(value, format_spec)


_MAX_JSON_INDENT = 64


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(items, (str, list, tuple)):
        return 0
    seps = len(str(sep)) * max(len(items) - 1, 0)
    if isinstance(items, str) or seps > MAX_OUTPUT_CHARS:
        return seps + len(items)
    return seps + sum(len(x) for x in items if isinstance(x, str))


def _precheck(name: str | None, value: Any, args: tuple, kwargs: dict, is_filter: bool) -> None:
    """The size of a string operation that multiplies sizes (replace, join, indent, ...), before it runs.

    `value` is the filtered value (a filter) or the string the method is bound to.
    """
    est = 0
    if name == "replace" and isinstance(value, str) and len(args) >= 2 and isinstance(args[0], str):
        old, new = args[0], str(args[1])
        n = value.count(old) if old else len(value) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        est = len(value) + n * max(0, len(new) - len(old))
    elif name == "join":
        if is_filter:
            est = _join_size(args[0] if args else kwargs.get("d", ""), value)
        elif isinstance(value, str) and args:
            est = _join_size(value, args[0])
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        est = len(value) + (value.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    elif name == "expandtabs" and isinstance(value, str):
        size = args[0] if args else kwargs.get("tabsize", 8)
        est = len(value) + value.count("\t") * size if isinstance(size, int) else 0
    elif name == "tojson" and is_filter:
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        width = indent if isinstance(indent, int) else len(str(indent)) if indent is not None else 0
        if width > _MAX_JSON_INDENT:
            raise _Runaway(f"a JSON indent of {width:,} is over the limit of {_MAX_JSON_INDENT}")
    if est > MAX_OUTPUT_CHARS:
        raise _too_big(f"the result of {name}", est)


def _guarded_filter(name: str, func):
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/eval_ctx/environment

    def guarded(*args, **kwargs):
        _check_args(args, kwargs)
        if len(args) > skip:
            _precheck(name, args[skip], args[skip + 1 :], kwargs, is_filter=True)
        return _check_size(func(*args, **kwargs))

    guarded.__dict__.update(getattr(func, "__dict__", {}))  # keeps jinja_pass_arg (context/environment filters)
    guarded.__name__ = getattr(func, "__name__", "filter")
    guarded.__doc__ = func.__doc__
    return guarded


class _GuardedCodeGenerator(CodeGenerator):
    """Routes `~` (string concatenation) through a size check, as `+` is by call_binop."""

    def visit_Concat(self, node, frame):
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def unsafe_undefined(self, obj, attribute):
        # jinja's sandbox returns an Undefined that fails only when used further (and
        # prints as ""): refuse the access itself.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        sized = (str, bytes, list, tuple)
        if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            if len(left) + len(right) > MAX_OUTPUT_CHARS:
                raise _too_big("a sum", len(left) + len(right))
        elif operator == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, sized) and isinstance(b, int) and len(a) * b > MAX_OUTPUT_CHARS:
                    raise _too_big("a product", len(a) * b)
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Runaway(f"an integer product over {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if (left.bit_length() - 1) * right > MAX_INT_BITS:
                    raise _Runaway(f"an integer power over {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
        return _check_size(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        # as jinja's, with a formatter that bounds field widths
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format", "format_map"
        ):
            return None
        fmt = value.__self__
        if not isinstance(fmt, str):
            return None
        formatter = _GuardedFormatter(self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args, **kwargs):
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return _check_size(formatter.vformat(str(fmt), args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def guarded_concat(self, values) -> str:
        out = "".join(map(str, values))
        return _check_size(out)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_args(args, kwargs)
        bound_to = getattr(__obj, "__self__", None)
        if isinstance(bound_to, str):
            _precheck(getattr(__obj, "__name__", None), bound_to, args, kwargs, is_filter=False)
        return _check_size(super().call(__context, __obj, *args, **kwargs))


def _make_environment() -> _Environment:
    env = _Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
        autoescape=False,
    )
    env.filters["tojson"] = _tojson
    for name, func in list(env.filters.items()):
        env.filters[name] = _guarded_filter(name, func)
    if "format" in env.filters:
        inner_format = env.filters["format"]

        def _format(value, *args, **kwargs):
            _check_format(value)
            return inner_format(value, *args, **kwargs)

        env.filters["format"] = _format
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


class _Deadline:
    """Stops the template's code past a deadline: a line tracer on the template's frames only."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds

    def _local(self, frame, event, arg):
        if event == "line" and time.monotonic() > self.deadline:
            raise _Runaway(f"rendering took longer than {self.seconds:g} s")
        return self._local

    def _global(self, frame, event, arg):
        if frame.f_code.co_filename == _TEMPLATE_FILENAME:
            return self._local
        return None

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)
        return False


def _one_line(text: Any, limit: int = _MAX_MESSAGE_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error(exc: BaseException, name: str) -> ChatTemplateError:
    """One ChatTemplateError line for whatever compiling or rendering raised."""
    where = f"chat template ({name})"
    if isinstance(exc, _TemplateRaised):
        msg = _one_line(exc.message)
        return ChatTemplateError(f"{where} refused the conversation: {msg}", template_message=str(exc.message))
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return ChatTemplateError(f"{where}: syntax error at line {exc.lineno}: {_one_line(exc.message)}")
    if isinstance(exc, SecurityError):
        return ChatTemplateError(f"{where} refused: unsafe operation ({_one_line(exc)})")
    if isinstance(exc, jinja2.UndefinedError):
        return ChatTemplateError(f"{where}: undefined value ({_one_line(exc.message)})")
    if isinstance(exc, _Runaway):
        return ChatTemplateError(f"{where} stopped: {exc}")
    if isinstance(exc, jinja2.TemplateError):
        return ChatTemplateError(f"{where}: {type(exc).__name__}: {_one_line(exc)}")
    if isinstance(exc, RecursionError):
        return ChatTemplateError(f"{where} stopped: recursion too deep")
    if isinstance(exc, MemoryError):
        return ChatTemplateError(f"{where} stopped: out of memory")
    return ChatTemplateError(f"{where} failed: {type(exc).__name__}: {_one_line(exc)}")


def _check_messages(messages: Any) -> list:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"chat messages must be a list of dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"chat message {i} must be a dict with 'role' and 'content', not {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"chat message {i} has no 'role' string")
    return list(messages)


class ChatTemplate:
    """A compiled, sandboxed chat template and the BOS/EOS texts it renders with."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", source: str = "model"):
        if not isinstance(template, str):
            raise ChatTemplateError(f"chat template must be text, not {type(template).__name__}")
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.source = source
        self._renders_bos: bool | None = None
        try:
            code = _ENV.compile(template, filename=_TEMPLATE_FILENAME)
            self._compiled = _ENV.template_class.from_code(_ENV, code, _ENV.make_globals(None), None)
        except Exception as e:  # noqa: BLE001 (all become one line)
            raise _error(e, source) from None

    @classmethod
    def from_string(cls, template: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        return cls(template, bos_token, eos_token, source="model")

    @classmethod
    def for_model(cls, gguf: GGUFFile, tokenizer: Tokenizer) -> ChatTemplate:
        """The GGUF's own template (`tokenizer.chat_template`), or the fallback for its vocabulary."""
        bos = _token_text(tokenizer, getattr(tokenizer, "bos_id", -1))
        eos = _token_text(tokenizer, getattr(tokenizer, "eos_id", -1))
        template = gguf.get(_TEMPLATE_KEY)
        if isinstance(template, str) and template.strip():
            return cls(template, bos, eos, source="model")
        name = fallback_name(gguf.get("tokenizer.ggml.model"))
        return cls(FALLBACKS[name], bos, eos, source=f"fallback: {name}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *, tools: Any = None,
               **extra: Any) -> str:
        """The prompt text for `messages` ({"role": ..., "content": ...} dicts).

        Extra keywords become template variables (e.g. `enable_thinking=False`).
        """
        messages = _check_messages(messages)
        variables = {
            **extra,
            "messages": messages,
            "add_generation_prompt": bool(add_generation_prompt),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": tools,
        }
        out: list[str] = []
        total = 0
        try:
            with _Deadline(RENDER_TIMEOUT_S):
                for chunk in self._compiled.generate(**variables):
                    total += len(chunk)
                    if total > MAX_OUTPUT_CHARS:
                        raise _too_big("the rendered prompt", total)
                    out.append(chunk)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 (all become one line)
            raise _error(e, self.source) from None
        return "".join(out)

    def renders_bos(self) -> bool:
        """Whether the rendered text starts with `bos_token` (then tokenize without adding BOS).

        Decided once, on a probe conversation (a user message; a system and a user one if
        the template refuses that); False when BOS has no text or neither renders.
        """
        if self._renders_bos is None:
            self._renders_bos = False
            if self.bos_token:
                for probe in ([{"role": "user", "content": "Hello"}],
                              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]):
                    try:
                        self._renders_bos = self.render(probe).startswith(self.bos_token)
                        break
                    except ChatTemplateError:
                        continue
        return self._renders_bos

    def __repr__(self) -> str:
        return f"ChatTemplate(source={self.source!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"


def _token_text(tokenizer: Any, token: int) -> str:
    """The text of a special token (e.g. "<s>", "<|endoftext|>"), "" when the vocab has none."""
    if token is None or token < 0:
        return ""
    try:
        return tokenizer.piece(token, special=True).decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 (a token id outside the vocab: no text)
        return ""
