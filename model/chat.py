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
the template writes BOS and its markers itself, read as control tokens (tokenizer.encode(..., special=True)). The
targets are every assistant turn and what the template writes after it up to the next turn, found by rendering the
conversation prefix by prefix; a template that does not render a conversation's beginning as the beginning of the
whole is refused (ValueError). The one departure from transformers: a message holding a special-token string of the
tokenizer ("</s>") is refused (ValueError), since special-token strings in data are text (model/tokenizer.py).
The details (variables, filters, where BOS / EOS come from): docs/data.md (Chat data and chat templates).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from .io import CheckpointError, read_json

ROLES = ("system", "user", "assistant")


class ChatTokenizer(Protocol):
    """What encode_chat needs of a tokenizer: model.Tokenizer's encode with special=True, its special_tokens."""

    special_tokens: frozenset[str]
    bos_token: str
    eos_token: str

    def encode(self, text: str, *, bos: bool, eos: bool = False, special: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class ChatTemplate:
    """A jinja2 chat template and the special-token strings it may write; origin: where it was read (messages)."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "chat template"

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
            source = path.read_text(encoding="utf-8")
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

    def for_tokenizer(self, tokenizer: ChatTokenizer) -> ChatTemplate:
        """This template with the tokenizer's BOS / EOS strings where its file named none (a .jinja file alone, a
        sentencepiece checkpoint without tokenizer_config.json), as transformers takes the tokenizer's."""
        return replace(self, bos_token=self.bos_token or tokenizer.bos_token,
                       eos_token=self.eos_token or tokenizer.eos_token)

    def render(self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = False) -> str:
        """The conversation's text; messages: (role, content) pairs, role one of ROLES. ValueError for a
        conversation the template refuses (its raise_exception), naming the template."""
        import jinja2

        try:
            return self._compiled.render(messages=[{"role": r, "content": c} for r, c in messages],
                                           add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                           eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template of {self.origin} refuses this conversation: {e}") from None


@functools.cache
def _compile(source: str):
    """The compiled template of source, in the environment transformers renders chat templates in; compiled once per
    source (a template is rendered for every record: encode_chat renders each conversation several times, and
    for_tokenizer makes new ChatTemplate objects of the same source)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # {% generation %} ... {% endgeneration %}: the content, as it is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(source)


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


def encode_chat_prompt(template: ChatTemplate, tokenizer: ChatTokenizer,
                       messages: Sequence[tuple[str, str]]) -> list[int]:
    """The ids of a conversation with the assistant's turn opened, the prompt a reply is generated from (model.generate
    --chat), tokenized as encode_chat tokenizes. ValueError as check_messages, or for a conversation the template
    refuses."""
    check_messages(messages, tokenizer.special_tokens)
    text = template.for_tokenizer(tokenizer).render(messages, add_generation_prompt=True)
    return tokenizer.encode(text, bos=False, special=True)


def encode_chat(template: ChatTemplate, tokenizer: ChatTokenizer,
                messages: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """(ids, targets) of a conversation: ids as apply_chat_template(messages, tokenize=True) gives them, targets
    True at the tokens of every assistant turn (the module docstring). ValueError as check_messages, or when the
    template does not render the conversation's beginning as the beginning of the whole."""
    check_messages(messages, tokenizer.special_tokens)
    template = template.for_tokenizer(tokenizer)
    text = template.render(messages)
    ids = tokenizer.encode(text, bos=False, special=True)
    targets = [False] * len(ids)
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        start, end = template.render(messages[:i], add_generation_prompt=True), template.render(messages[:i + 1])
        if not (text.startswith(end) and end.startswith(start)):
            raise ValueError(f"message {i}: the chat template of {template.origin} does not render the conversation "
                             "up to this turn as the beginning of the whole; its assistant turns cannot be found")
        first = len(tokenizer.encode(start, bos=False, special=True))
        last = len(tokenizer.encode(end, bos=False, special=True))
        targets[first:last] = [True] * (last - first)
    return ids, targets
