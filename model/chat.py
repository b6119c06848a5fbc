"""Chat templates: a checkpoint's own prompt format, for chat data (train/data.py) and `llama-adapter generate --chat`.

    from llama_adapter_triton.model.chat import ChatTemplate, encode_chat, encode_chat_prompt
    template = ChatTemplate.find("Llama-2-7b-chat-hf/")          # its tokenizer_config.json's chat_template
    messages = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "And?")]
    text = template.render(messages, add_generation_prompt=True)  # the prompt of the next assistant turn
    prompt = encode_chat_prompt(template, tokenizer, messages)     # its ids: generation's prompt
    ids, targets = encode_chat(template, tokenizer, messages[:3])   # training: targets True on the assistant turns

The template: a folder's chat_template.jinja, else its tokenizer_config.json's "chat_template" (a string, or the
"default" of a list), or a file given on its own. Rendering is transformers' apply_chat_template's (jinja2's
ImmutableSandboxedEnvironment: a template from the Hub is untrusted code), and the ids are its tokenize=True ids:
the template writes BOS and its markers itself, read as control tokens (tokenizer.encode(..., special=True)).
Unlike transformers, a rendering has a budget (max_seconds, 5 s; max_chars, 4,000,000 characters of output or of
any string or list it builds, 16 times that in all), checked before each allocation that could exceed it, and
whatever a template does wrong is a one-line ValueError naming its file. The targets are every assistant turn (and
what the template writes after the last one), found in one rendering with each content replaced by a marker. A
message holding a special-token string ("</s>") is refused, and so is a rendering whose special tokens differ from
the template's own: data never becomes a control token (model/tokenizer.py). The details: docs/data.md.
"""

from __future__ import annotations

import bisect
import contextvars
import functools
import inspect
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from llama_adapter_triton.kernels.checks import check_int

from .io import CheckpointError, read_json

ROLES = ("system", "user", "assistant")
RENDER_SECONDS = 5.0  # the default budget of one rendering: seconds,
RENDER_CHARS = 4_000_000  # and characters (the output; any one string or list the template builds)
WORK_FACTOR = 16  # everything the template builds in one rendering: at most this many times RENDER_CHARS
LOOP_STEP = 16  # the work of one step of a loop, in characters (a nested range(100000) loop stops in 0.3 s)
MAX_INT_BITS = 10_000  # an integer a template computes (a product, a power)


class ChatTokenizer(Protocol):
    """What encode_chat needs of a tokenizer: model.Tokenizer's encode with special=True, its special_tokens."""

    special_tokens: frozenset[str]
    bos_token: str
    eos_token: str

    def encode(self, text: str, *, bos: bool, eos: bool = False, special: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja2 chat template and the special-token strings it may write; origin: where it was read (messages);
    max_seconds / max_chars: the rendering budget (the module docstring)."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "chat template"
    max_seconds: float = RENDER_SECONDS
    max_chars: int = RENDER_CHARS

    def __post_init__(self) -> None:
        check_budget(self.max_seconds, self.max_chars)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ChatTemplate:
        """From a .jinja file, a tokenizer_config.json with a "chat_template", or a folder holding either
        (chat_template.jinja first); CheckpointError naming the file when there is no template."""
        path = Path(path)
        template = cls.find(path) if path.is_dir() else cls._read(path)
        if template is None:
            raise CheckpointError(f"{path}: no chat template (chat_template.jinja, or tokenizer_config.json's "
                                  "\"chat_template\")")
        return template

    @classmethod
    def find(cls, folder: str | os.PathLike) -> ChatTemplate | None:
        """The chat template of a checkpoint or tokenizer folder (a tokenizer file: its folder), or None."""
        folder = Path(folder)
        folder = folder if folder.is_dir() else folder.parent
        config = cls._config(folder / "tokenizer_config.json")
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return cls._read(jinja, config)
        return cls._read(folder / "tokenizer_config.json", config) if config.get("chat_template") else None

    @classmethod
    def _read(cls, path: Path, config: dict | None = None) -> ChatTemplate | None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such chat template file")
        if path.suffix != ".json":
            config = cls._config(path.parent / "tokenizer_config.json") if config is None else config
            try:
                source = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{path}: a chat template must be UTF-8 text; byte {e.start} is not "
                                      f"({e.reason})") from None
        else:
            config = cls._config(path)
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: transformers takes "default"
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                if "default" not in named:
                    raise CheckpointError(f"{path}: its chat_template is a list of named templates "
                                          f"({', '.join(map(str, named))}) without a \"default\" one")
                source = named["default"]
            if source is None:
                return None
        if not isinstance(source, str) or not source.strip():
            raise CheckpointError(f"{path}: the chat template must be a non-empty string, got {source!r}")
        tokens = {}
        for key in ("bos_token", "eos_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise CheckpointError(f"{path.parent / 'tokenizer_config.json'}: {key!r} must be a token (a string), "
                                      f"got {value!r}")
            tokens[key] = value or ""
        template = cls(source, origin=str(path), **tokens)
        _ = template._compiled  # compiled now: a syntax error names the file
        return template

    @staticmethod
    def _config(path: Path) -> dict:
        return read_json(path) if path.is_file() else {}

    @property
    def _compiled(self):
        import jinja2

        try:
            return _compile(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise CheckpointError(f"{self.origin}: the chat template is not valid jinja2 (line {e.lineno}: "
                                  f"{e.message})") from None
        except Exception as e:  # noqa: BLE001 - untrusted code: a RecursionError of a deeply nested expression...
            raise CheckpointError(f"{self.origin}: the chat template cannot be compiled ({_one_line(e)})") from None

    def for_tokenizer(self, tokenizer: ChatTokenizer) -> ChatTemplate:
        """This template with the tokenizer's BOS / EOS strings where its file named none (a .jinja file alone, a
        sentencepiece checkpoint without tokenizer_config.json), as transformers takes the tokenizer's."""
        return replace(self, bos_token=self.bos_token or tokenizer.bos_token,
                       eos_token=self.eos_token or tokenizer.eos_token)

    def render(self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The conversation's text; messages: (role, content) pairs, role one of ROLES. ValueError of one line naming
        the template for a conversation it refuses (its raise_exception), one over its budget, or any error it
        makes (the module docstring)."""
        import jinja2

        compiled = self._compiled
        budget = _Budget(self.max_seconds, self.max_chars)
        token = _BUDGET.set(budget)
        try:
            pieces, length = [], 0
            for piece in compiled.generate(messages=[{"role": r, "content": c} for r, c in messages],
                                           add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                           eos_token=self.eos_token):
                length += len(piece)
                if length > self.max_chars:
                    raise _OverBudget(f"its output passes {self.max_chars} characters")
                pieces.append(piece)
                budget.tick()
            return "".join(pieces)
        except _OverBudget as e:
            raise ValueError(f"the chat template of {self.origin} exceeds its rendering budget: {e} (limits: "
                             f"{self.max_seconds:g} s and {self.max_chars} characters per rendering; raise them with "
                             "--chat-max-seconds / --chat-max-chars, or ChatTemplate's max_seconds / max_chars)") \
                from None
        except jinja2.exceptions.SecurityError as e:
            raise ValueError(f"the chat template of {self.origin} does what its sandbox forbids: {_one_line(e)}") \
                from None
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template of {self.origin} refuses this conversation: {_one_line(e)}") \
                from None
        except Exception as e:  # noqa: BLE001 - untrusted code: whatever it raises is its failure, said in one line
            raise ValueError(f"the chat template of {self.origin} fails on this conversation: {_one_line(e)}") \
                from None
        finally:
            _BUDGET.reset(token)


def check_budget(max_seconds: object, max_chars: object, names: tuple[str, str] = ("max_seconds", "max_chars")) \
        -> None:
    """ValueError unless max_seconds is a finite number > 0 and max_chars an integer >= 1; names: as the caller
    calls them (the command line's flags)."""
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not 0 < max_seconds < 1e9:
        raise ValueError(f"{names[0]} must be a number of seconds > 0, got {max_seconds!r}")
    check_int(names[1], max_chars, 1, what="an integer >= 1")


def _one_line(error: BaseException) -> str:
    """An exception as one short line: its type (Python's errors) and its message."""
    import jinja2

    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:300] + "..."
    if isinstance(error, jinja2.exceptions.TemplateError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# The bounded sandbox


class _OverBudget(Exception):
    """A rendering passed its budget; the message says what."""


class _Budget:
    """The limits of one rendering, and what it has used."""

    def __init__(self, seconds: float, chars: int):
        self.seconds, self.chars = seconds, chars
        self.deadline = time.perf_counter() + seconds
        self.work, self.max_work = 0, WORK_FACTOR * chars

    def tick(self, cost: int = 0) -> None:
        """cost more units of work (characters, items, loop steps) done; _OverBudget past the limits."""
        self.work += cost
        if self.work > self.max_work:
            raise _OverBudget(f"it builds more than {self.max_work} characters or items in all")
        if time.perf_counter() > self.deadline:
            raise _OverBudget(f"it runs longer than {self.seconds:g} s")

    def check(self, size: int, what: str) -> None:
        """_OverBudget if one value of size characters (items) would pass max_chars; else it is work done."""
        if size > self.chars:
            raise _OverBudget(f"{what} would make {size} characters or items, over {self.chars}")
        self.tick(size)


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    """The budget of the rendering under way; outside one (jinja2 folding constants while it compiles), a fresh
    one of the default limits."""
    return _BUDGET.get() or _Budget(RENDER_SECONDS, RENDER_CHARS)


def _size(value: object, limit: int) -> int:
    """The characters of value's text form, about (strings by length, containers by their items, each reference
    counted again: [s] * 1000 is 1000 times s), counted up to just past limit."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if not isinstance(value, (Mapping, list, tuple, set, frozenset)) and type(value).__name__ != "Namespace":
        return 1
    from jinja2.utils import Namespace

    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, Mapping):
            total += 2 + 2 * len(v)
            stack += [*v.keys(), *v.values()][:limit]
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + len(v)
            stack += list(v)[:limit]
        elif isinstance(v, Namespace):
            stack.append(dict(v._Namespace__attrs))
        else:
            total += 1
    return total


def _shallow(value: object) -> int:
    """The cost of making value: its length for a string or a container (its items are references), else 1."""
    return len(value) if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)) else 1


def _int_arg(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACES = re.compile(r"\{[^{}]*\}")


def _format_size(fmt: str, values: Sequence[object], limit: int) -> int:
    """An upper bound of fmt % values or fmt.format(*values): each field at most the largest value, widened to the
    largest width or precision it names (or an integer among the values, for * and nested fields)."""
    fields = _PERCENT.findall(fmt) if "%" in fmt else []
    widths = [int(n) for f in fields for n in f if n.isdigit()]
    count = len(fields)
    if "{" in fmt:
        braces = _BRACES.findall(fmt)
        count += len(braces)
        widths += [int(n) for b in braces for n in re.findall(r"\d+", b.partition(":")[2])]
    largest = max((_size(v, limit) for v in values), default=0)
    widest = max([*widths, *(_int_arg(v) for v in values)], default=0)
    return len(fmt) + count * (largest + widest)


def _format_values(args: Sequence[object], kwargs: Mapping[str, object]) -> list[object]:
    values = [*args, *kwargs.values()]
    if len(values) == 1 and isinstance(values[0], (tuple, Mapping)):  # fmt % (a, b), fmt % {...}, format_map(d)
        values = list(values[0].values() if isinstance(values[0], Mapping) else values[0])
    return values


def _join_size(sep: object, items: list, limit: int) -> int:
    return _size(sep, limit) * max(len(items) - 1, 0) + sum(_size(i, limit) for i in items)


def _replace_size(text: str, old: object, new: object, count: object = -1) -> int:
    if not isinstance(old, type(text)) or not isinstance(new, type(text)):
        return len(text)
    n = text.count(old)
    n = min(n, count) if _int_arg(count) >= 0 and count != -1 else n
    return len(text) + n * len(new)


def _materialize(value: object, limit: int) -> object:
    """An iterator as a list (at most limit + 1 items), so that its size can be told before it is used."""
    if isinstance(value, Iterator):
        items = []
        for item in value:
            items.append(item)
            if len(items) > limit:
                raise _OverBudget(f"an iterator of more than {limit} items")
        return items
    return value


def _method_size(owner: object, name: str, args: tuple, kwargs: dict, limit: int) -> int | None:
    """An upper bound of the result of the method owner.name(*args, **kwargs) where it may be far larger than its
    arguments (padding, repetition, joining); None for the others (linear in their arguments)."""
    if isinstance(owner, int) and name == "to_bytes":
        return _int_arg(args[0] if args else kwargs.get("length", 1))
    if not isinstance(owner, (str, bytes, bytearray)):
        return None
    if name in ("center", "ljust", "rjust", "zfill") and args:
        return max(len(owner), _int_arg(args[0]))
    if name == "expandtabs":
        tabsize = _int_arg(args[0] if args else kwargs.get("tabsize", 8))
        return len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * tabsize
    if name == "join" and args:
        return _join_size(owner, args[0], limit)
    if name == "replace" and len(args) >= 2:
        return _replace_size(owner, *args[:3])
    if name == "translate" and args and isinstance(args[0], Mapping):
        return len(owner) * max([1, *(_size(v, limit) for v in args[0].values())])
    if name in ("format", "format_map") and isinstance(owner, str):
        return _format_size(owner, _format_values(args, kwargs), limit)
    return None


# filters whose result may be far larger than their arguments: an upper bound of it, from their named arguments
_FILTER_SIZES = {
    "center": lambda a, n: max(_size(a["value"], n), _int_arg(a.get("width", 80))),
    "indent": lambda a, n: _size(a["s"], n) * (1 + (_int_arg(a.get("width", 4)) if not isinstance(
        a.get("width"), str) else len(a["width"]))),
    "format": lambda a, n: _format_size(str(a["value"]), _format_values(a.get("args", ()), a.get("kwargs", {})), n),
    "join": lambda a, n: _join_size(a.get("d", ""), list(a["value"]), n),
    "replace": lambda a, n: _replace_size(str(a["s"]), a["old"], a["new"], a.get("count") or -1)
    if isinstance(a["s"], str) else _size(a["s"], n) * (1 + _size(a["new"], n)),
    "wordwrap": lambda a, n: _size(a["s"], n) * (2 + _size(a.get("wrapstring") or "\n", n)
                                                 // max(_int_arg(a.get("width", 79)), 1)),
    "batch": lambda a, n: _size(a["value"], n) + _int_arg(a["linecount"]),
    "slice": lambda a, n: _size(a["value"], n) + _int_arg(a["slices"]),
    "sum": lambda a, n: _size(a.get("start", 0), n) + sum(_size(i, n) for i in a["iterable"]),
    "tojson": lambda a, n: _size(a["x"], n) * (2 + 2 * (len(a["indent"]) if isinstance(a.get("indent"), str)
                                                         else _int_arg(a.get("indent")))),
}
# the filters that take an iterable whose size must be told first: it is passed on as a list
_FILTER_ITERABLES = {"join": "value", "sum": "iterable"}
# the filters that make text of their value (a list's text may be far larger than the list: [s] * 1000)
_FILTER_TEXTS = {"capitalize", "e", "escape", "forceescape", "lower", "pprint", "safe", "string", "striptags", "title",
                 "trim", "truncate", "upper", "urlencode", "urlize", "wordcount", "xmlattr"}


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: json.dumps keeping non-ASCII characters."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _bounded_filter(name: str, func):
    """The filter func, its result's size told first where it may be large, and counted."""
    from jinja2.utils import _PassArg

    signature = inspect.signature(func)
    passed = 1 if _PassArg.from_obj(func) is not None else 0  # the context / environment jinja2 passes first

    @functools.wraps(func)
    def bounded(*args, **kwargs):
        budget = _budget()
        if name in _FILTER_SIZES:
            bound = signature.bind(*args, **kwargs)
            arguments = dict(list(bound.arguments.items())[passed:])
            key = _FILTER_ITERABLES.get(name)
            if key in arguments:
                arguments[key] = bound.arguments[key] = _materialize(arguments[key], budget.chars)
            budget.check(_FILTER_SIZES[name](arguments, budget.chars), f"the filter {name}")
            args, kwargs = bound.args, bound.kwargs
        elif name in _FILTER_TEXTS and len(args) > passed and not isinstance(args[passed], str):
            budget.check(_size(args[passed], budget.chars), f"the filter {name}'s value")
        result = func(*args, **kwargs)
        budget.tick(_shallow(result))
        return result

    return bounded


@functools.cache
def _environment():
    """The environment transformers renders chat templates in, bounded (the module docstring)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import pass_context

    class Generation(Extension):  # {% generation %} ... {% endgeneration %}: the content, as it is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox with a budget: its operator and call hooks tell a result's size before making it."""

        intercepted_binops = frozenset(("+", "*", "**", "%"))

        def call_binop(self, context, operator, left, right):
            budget = _budget()
            budget.tick()
            if operator == "**" and _int_arg(left) and _int_arg(right) > 0:
                size = abs(left).bit_length() * right
                if size > MAX_INT_BITS:
                    raise _OverBudget(f"the power {left} ** {right} would have {size} bits, over {MAX_INT_BITS}")
            elif operator == "*" and _int_arg(left) and _int_arg(right):
                size = abs(left).bit_length() + abs(right).bit_length()
                if size > MAX_INT_BITS:
                    raise _OverBudget(f"a product would have {size} bits, over {MAX_INT_BITS}")
            elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
                sequence, times = (left, right) if isinstance(right, int) else (right, left)
                budget.check(_size(sequence, budget.chars) * max(times, 0), "a repetition")
            elif operator == "+" and not isinstance(left, (int, float)):
                budget.check(_shallow(left) + _shallow(right), "a concatenation")
            elif operator == "%" and isinstance(left, str):
                budget.check(_format_size(left, _format_values((right,), {}), budget.chars), "a % format")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            budget = _budget()
            budget.tick()
            method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
            owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
            if name == "join" and isinstance(owner, (str, bytes)) and args:
                args = (_materialize(args[0], budget.chars), *args[1:])
            size = _method_size(owner, name, args, kwargs, budget.chars)
            if size is not None:
                budget.check(size, f"{type(owner).__name__}.{name}")
            result = super().call(__context, __obj, *args, **kwargs)
            budget.tick(_shallow(result))
            return result

    @pass_context
    def output(context, value):  # every piece of output, at any depth (macros, blocks): counted, as text
        budget = _budget()
        if not isinstance(value, str):
            budget.check(_size(value, budget.chars), "an output")
            value = str(value)
        budget.tick(len(value))
        return value

    @pass_context
    def concat(context, values):  # a ~ b ~ c
        budget = _budget()
        budget.check(sum(_size(v, budget.chars) for v in values), "a ~ concatenation")
        return "".join(map(str, values))

    @pass_context
    def loop(context, iterable):  # every loop: its steps are work; an iterator's, one at a time
        budget = _budget()
        budget.tick(LOOP_STEP * len(iterable) if hasattr(iterable, "__len__") else 0)
        return iterable if hasattr(iterable, "__len__") else _ticking(iterable, budget)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters.update({"_bounded_output": output, "_bounded_concat": concat, "_bounded_loop": loop})
    env.globals.pop("lipsum", None)  # n paragraphs of lorem ipsum: nothing a chat template needs
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env


def _ticking(iterable: Iterable, budget: _Budget) -> Iterator:
    for item in iterable:
        budget.tick(LOOP_STEP)
        yield item


@functools.cache
def _compile(source: str):
    """The compiled template of source, every output, `~` and loop routed through the budget's filters; compiled
    once per source (a template is rendered for every record, and for_tokenizer makes new ChatTemplate objects of
    the same source)."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    env = _environment()

    def bounded(node, name):
        return nodes.Filter(node, name, [], [], None, None).set_lineno(node.lineno).set_environment(env)

    class Bound(NodeTransformer):
        def visit_Output(self, node):
            self.generic_visit(node)
            node.nodes = [bounded(child, "_bounded_output") for child in node.nodes]
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return bounded(nodes.List(node.nodes).set_lineno(node.lineno).set_environment(env), "_bounded_concat")

        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = bounded(node.iter, "_bounded_loop")
            return node

    tree = Bound().visit(env.parse(source))
    return env.template_class.from_code(env, env.compile(tree), env.make_globals(None), None)


# ----------------------------------------------------------------------------------------------------------------
# Conversations to tokens


def check_messages(messages: Sequence[tuple[str, str]], special_tokens: frozenset[str] = frozenset()) -> None:
    """ValueError naming the message: a role not in ROLES, content not a string, or content holding one of
    special_tokens (the module docstring)."""
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        found = sorted(t for t in special_tokens if t in content)
        if found:
            raise ValueError(f"message {i} ({role}): its content holds the tokenizer's special token {found[0]!r}; "
                             "special-token strings in data are text, but a chat template's text is tokenized with "
                             "its special tokens, so it would become a control token")


_MARKER = "\ue000{}\ue001"  # a message's content in the marked rendering: private-use characters and its index
_MARKER_RE = re.compile("\ue000(\\d+)\ue001")


@functools.cache
def _special_pattern(special_tokens: frozenset[str]) -> re.Pattern | None:
    """A regex that finds the special-token strings (longest first) and splits text at them, keeping them."""
    if not special_tokens:
        return None
    return re.compile("(" + "|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True))) + ")")


def _render(template: ChatTemplate, tokenizer: ChatTokenizer, messages: Sequence[tuple[str, str]], *,
            add_generation_prompt: bool) -> tuple[ChatTemplate, str, str]:
    """(template for the tokenizer, text, marked): the rendering, and the rendering with each content replaced by
    its marker. ValueError as check_messages, for an empty rendering, or for one whose special tokens are not the
    template's own (the marked rendering's)."""
    check_messages(messages, tokenizer.special_tokens)
    template = template.for_tokenizer(tokenizer)
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    if not text:
        raise ValueError(f"the chat template of {template.origin} renders this conversation as an empty string")
    marked = template.render([(role, _MARKER.format(i)) for i, (role, _) in enumerate(messages)],
                             add_generation_prompt=add_generation_prompt)
    pattern = _special_pattern(tokenizer.special_tokens)
    if pattern is not None:
        found, own = pattern.findall(text), pattern.findall(marked)
        if found != own:
            extra = [t for t in found if found.count(t) > own.count(t)]
            what = f"the special token {extra[0]!r} more often than" if extra else "other special tokens than"
            raise ValueError(f"the chat template of {template.origin} renders this conversation with {what} the "
                             "template writes itself: it joins or transforms the contents (e.g. \"<\" + \"/s>\", "
                             "or | lower), which would make data a control token")
    return template, text, marked


def _content_spans(text: str, marked: str) -> dict[int, list[tuple[int, int] | None]]:
    """Where each message's content lies in text: message index -> (start, end) of each place the template writes
    it (None where two contents touch and cannot be told apart). The pieces of marked between its markers are the
    template's own text: each is found in text after the previous one. Empty when text does not fit them."""
    cuts = list(_MARKER_RE.finditer(marked))
    pieces = [marked[a.end() if a else 0:b.start() if b else len(marked)]
              for a, b in zip([None, *cuts], [*cuts, None], strict=True)]
    if not text.startswith(pieces[0]):
        return {}
    spans: dict[int, list[tuple[int, int] | None]] = {}
    at = len(pieces[0])
    for k, (cut, piece) in enumerate(zip(cuts, pieces[1:], strict=True)):
        last = k == len(cuts) - 1
        found = len(text) - len(piece) if last else text.find(piece, at) if piece else -1
        if last and (not text.endswith(piece) or found < at):
            return {}
        if found < 0 and piece:
            return {}
        spans.setdefault(int(cut.group(1)), []).append((at, found) if found >= 0 else None)
        at = found + len(piece) if found >= 0 else at
    return spans


class _TokenPositions:
    """The token index in ids (= encode(text)) of a character position of text, in time linear in the text: the
    text between special tokens is encoded piece by piece once (as the tokenizers split it), and a position is
    found within its piece; where the pieces' tokens are not ids (a tokenizer that does not split so), by encoding
    the text up to it."""

    def __init__(self, tokenizer: ChatTokenizer, text: str, ids: list[int]):
        self.tokenizer, self.text, self.ids = tokenizer, text, ids
        self.starts, self.offsets = [], []
        pattern = _special_pattern(tokenizer.special_tokens)
        tokens, at = [], 0
        for part in pattern.split(text) if pattern is not None else [text]:
            if part:
                self.starts.append(at)
                self.offsets.append(len(tokens))
                tokens += tokenizer.encode(part, bos=False, special=True)
            at += len(part)
        self.piecewise = tokens == ids

    def at(self, position: int) -> int | None:
        """The number of tokens of text[:position], or None where no token boundary lies there."""
        if self.piecewise:
            j = bisect.bisect_right(self.starts, position) - 1
            start, offset = (self.starts[j], self.offsets[j]) if j >= 0 else (0, 0)
        else:
            start, offset = 0, 0
        head = self.tokenizer.encode(self.text[start:position], bos=False, special=True) if position > start else []
        return offset + len(head) if self.ids[offset:offset + len(head)] == head else None


def encode_chat_prompt(template: ChatTemplate, tokenizer: ChatTokenizer,
                       messages: Sequence[tuple[str, str]]) -> list[int]:
    """The ids of a conversation with the assistant's turn opened, the prompt a reply is generated from (model.generate
    --chat), tokenized as encode_chat tokenizes. ValueError as check_messages, or for a conversation the template
    refuses or fails on (ChatTemplate.render)."""
    _, text, _ = _render(template, tokenizer, messages, add_generation_prompt=True)
    return tokenizer.encode(text, bos=False, special=True)


def encode_chat(template: ChatTemplate, tokenizer: ChatTokenizer,
                messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(ids, targets) of a conversation: ids as apply_chat_template(messages, tokenize=True) gives them, targets
    True at the tokens of every assistant turn (the module docstring). ValueError as encode_chat_prompt, or naming
    the message whose assistant turn cannot be found."""
    template, text, marked = _render(template, tokenizer, messages, add_generation_prompt=False)
    ids = tokenizer.encode(text, bos=False, special=True)
    targets = [False] * len(ids)
    assistants = [i for i, (role, _) in enumerate(messages) if role == "assistant"]
    if not assistants:
        return ids, targets
    spans = _content_spans(text, marked)
    if not spans:
        raise ValueError(f"the chat template of {template.origin} renders this conversation differently once its "
                         "contents are replaced by markers (it branches on them); its assistant turns cannot be "
                         "found")
    # what the template writes after an assistant's content when it ends the conversation: the end of every turn
    last = assistants[-1]
    tail = marked if last == len(messages) - 1 else template.render(
        [(role, _MARKER.format(i)) for i, (role, _) in enumerate(messages[:last + 1])])
    cuts = list(_MARKER_RE.finditer(tail))
    if not cuts or cuts[-1].group(1) != str(last):
        raise ValueError(f"message {last}: the chat template of {template.origin} does not end a conversation with "
                         "this assistant turn; its assistant turns cannot be found")
    end_of_turn = tail[cuts[-1].end():]
    positions = _TokenPositions(tokenizer, text, ids)
    for i in assistants:
        places = spans.get(i, [])
        if len(places) != 1 or places[0] is None:
            raise ValueError(f"message {i}: the chat template of {template.origin} writes this assistant turn "
                             f"{len(places)} time(s) where it can be told apart (once is needed); its assistant turns "
                             "cannot be found")
        start, end = places[0]
        if not text.startswith(end_of_turn, end):
            raise ValueError(f"message {i}: the chat template of {template.origin} does not end this assistant turn "
                             f"as it ends the last one ({end_of_turn!r}); its assistant turns cannot be found")
        first = positions.at(start)
        if first is None:  # the content's first token takes the space before it (sentencepiece's "▁Lima")
            first = positions.at(len(text[:start].rstrip()))
        stop = positions.at(end + len(end_of_turn))
        if first is None or stop is None:
            raise ValueError(f"message {i}: the tokens of the conversation rendered by the chat template of "
                             f"{template.origin} do not split where this assistant turn starts or ends; its assistant "
                             "turns cannot be found")
        targets[first:stop] = [True] * (stop - first)
    return ids, targets
