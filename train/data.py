"""Instruction data for LLaMA-Adapter fine-tuning: records, tokenization with shifted labels, packed and padded batches.

    records, load_report = load_records("alpaca_data.json", on_bad_record="skip")
    data, tok_report = tokenize_records(records, tokenizer, max_seq_len=512)
    train, val = split_eval(data, eval_size=0.02, seed=0)
    loader = PackedLoader(train, token_budget=8192, micro_batches_per_step=4, seed=0, rank=rank, world_size=world_size)
    for step in loader.iter_epoch(epoch, start_step=resume_step):  # step.batches: this rank's micro-batches

Records (JSON list or JSON Lines): Alpaca {instruction, input, output}, image-text pairs {image, caption},
conversations {conversations: [...]} and messages {messages: [...]} (the model's chat template, model/chat.py); an
optional "image" per record. Bad records are reported by index and field.
Tokenization is the official script's: encode(prompt + output, bos, eos), its first len(encode(prompt, bos)) tokens
masked ("litgpt": the response encoded on its own). Labels are shifted here: labels[t] = tokens[t + 1] on the
targets, IGNORE_INDEX elsewhere (the prompt, each sequence's last token, padding); the loss shifts nothing more.
Longer examples are truncated to max_seq_len, examples without a target left dropped; both reported.
Packed: whole examples, best fit, in rows of at most token_budget tokens with cu_seqlens (attention per sequence,
positions restarting). Padded: the official (B, 512) layout, right padding. An epoch's plan depends only on the
data, the budget, seed and epoch: rank r of W takes micro-batches r, r + W, ... of each step (fillers where a step
has too few), so W processes see exactly the step one process sees, and a resumed run the same batches.
The full story (formats, the boundary merge, labels, steps and ranks): docs/data.md.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypedDict

import numpy as np
import torch

from llama_adapter_triton.model.chat import ROLES, ChatTemplate, encode_chat
from llama_adapter_triton.model.cli import remedy_text
from llama_adapter_triton.model.prompt import CAPTION_INSTRUCTION, CHAT_TEMPLATE, TEMPLATES, format_prompt, user_message

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that has no target (prompt, last token of a sequence, padding)."""

_SHOWN = 10  # how many problems or indices a message lists before "... and N more"


class TokenizerLike(Protocol):
    """What the data needs of a tokenizer: the interface of model.Tokenizer."""

    bos_id: int | None  # None: no BOS (Qwen2's tokenizer); encode(bos=True) then adds none
    eos_id: int
    pad_id: int | None  # -1 or None when the tokenizer has no pad token
    vocab_size: int

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ----------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Record:
    """One example. index: the 0-based position of its record in the source file (None if built by hand); a
    conversation gives one example per reply in the chat template, all with its index."""

    instruction: str
    input: str
    output: str
    index: int | None = None
    image: str | None = None  # multi-modal data: the example's image file, as the record gives it
    template: str = "alpaca"  # model/prompt.py's TEMPLATES
    history: tuple[tuple[str, str], ...] = ()  # chat: the (human, assistant) exchanges before this one
    messages: tuple[tuple[str, str], ...] = ()  # a conversation for the model's chat template: (role, content)

    @property
    def prompt(self) -> str:
        if self.messages:
            raise ValueError("a messages example has no prompt string: the model's chat template renders it "
                             "(model/chat.py)")
        return format_prompt(self.template, self.instruction, self.input, self.history)


@dataclass(frozen=True)
class RecordProblem:
    """What is wrong with one record: index (0-based, file order), field (None: the whole record)."""

    index: int
    field: str | None
    message: str
    line: int | None = None  # JSONL: the 1-based line number

    def __str__(self) -> str:
        where = f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        what = f"field {self.field!r} " if self.field else ""
        return f"{where}: {what}{self.message}"


class DataError(ValueError):
    """A data file or record that cannot be used; .problems lists the bad records, if any; .remedy: (argument, value)
    that gets past it, when the message names one (model/cli.py's cli_message)."""

    def __init__(self, message: str, problems: Sequence[RecordProblem] = (), *,
                 remedy: tuple[str, object] | None = None):
        super().__init__(message)
        self.problems = list(problems)
        self.remedy = remedy


@dataclass
class LoadReport:
    """What load_records read: source, format, records seen, problems and the indices skipped."""

    source: str
    format: str
    num_records: int
    problems: list[RecordProblem] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    num_examples: int = 0  # the records' examples (a conversation in the chat template gives one per reply)

    @property
    def num_loaded(self) -> int:
        return self.num_records - len(self.skipped)

    def summary(self) -> str:
        text = f"{self.source} ({self.format}): {self.num_loaded} of {self.num_records} records loaded"
        if self.num_examples != self.num_loaded:
            text += f" ({self.num_examples} examples)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad record(s):\n" + _listing(self.problems)
        return text


def _listing(items: Sequence[object], indent: str = "  ") -> str:
    lines = [f"{indent}{item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        lines.append(f"{indent}... and {len(items) - _SHOWN} more")
    return "\n".join(lines)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    for types, name in ((bool, "boolean"), (str, "string"), ((int, float), "number"), (list, "array"),
                        (dict, "object")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


_HUMAN, _ASSISTANT = ("human", "user"), ("gpt", "assistant", "chatgpt", "bard")


def _check_conversation(obj: dict, index: int, line: int | None) -> tuple[list[tuple[str, str]], list[RecordProblem]]:
    """The (human, assistant) exchanges of a conversations record, or what is wrong with it."""
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        return [], [RecordProblem(index, "conversations", "must be a non-empty list of turns", line)]
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or \
                not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return [], [RecordProblem(index, "conversations", f"turn {i} must be an object with a 'from' string and a "
                                                              "non-empty 'value' string", line)]
        want = _HUMAN if i % 2 == 0 else _ASSISTANT
        if turn["from"].lower() not in want:
            return [], [RecordProblem(index, "conversations", f"turn {i} is from {turn['from']!r}; turns alternate, "
                                                              f"human first (from: {' / '.join(want)})", line)]
    if len(turns) < 2:
        return [], [RecordProblem(index, "conversations", "has no reply: a human turn needs an assistant turn", line)]
    return [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns) - 1, 2)], []


_SHAREGPT_ROLES = {**dict.fromkeys(_HUMAN, "user"), **dict.fromkeys(_ASSISTANT, "assistant"), "system": "system"}


def _check_messages(obj: dict, name: str, index: int, line: int | None) -> tuple[list[tuple[str, str]],
                                                                                 list[RecordProblem]]:
    """The (role, content) messages of a "messages" record (OpenAI style), or of a "conversations" record
    (ShareGPT: from / value, human and gpt as user and assistant) under the model's chat template; or what is wrong."""
    turns = obj[name]
    keys = ("role", "content") if name == "messages" else ("from", "value")

    def problem(message: str) -> tuple[list, list[RecordProblem]]:
        return [], [RecordProblem(index, name, message, line)]

    if not isinstance(turns, list) or not turns:
        return problem("must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        role = turn.get(keys[0]) if isinstance(turn, dict) else None
        role = _SHAREGPT_ROLES.get(role.lower()) if name != "messages" and isinstance(role, str) else role
        if role not in ROLES or not isinstance(turn.get(keys[1]), str) or not turn[keys[1]].strip():
            return problem(f"message {i} must be an object with a {keys[0]!r} ("
                           f"{', '.join(ROLES if name == 'messages' else _SHAREGPT_ROLES)}) and a non-empty "
                           f"{keys[1]!r} string")
        if role == "system" and i > 0:
            return problem(f"message {i} is a system message: only the first message may be")
        messages.append((role, turn[keys[1]]))
    first = 1 if messages[0][0] == "system" else 0
    if first == len(messages) or messages[first][0] != "user":
        return problem("must start with a user message (after an optional system message)")
    if not any(role == "assistant" for role, _ in messages):
        return problem("has no assistant message: nothing to learn")
    return messages, []


def _check_record(obj: object, index: int, line: int | None,
                  template: str = "alpaca") -> tuple[list[Record], list[RecordProblem]]:
    """The examples of one record (one, or one per reply of a conversation in the chat template), or its problems."""
    if not isinstance(obj, dict):
        return [], [RecordProblem(index, None, f"is a JSON {_json_type(obj)}, not an object", line)]
    problems, values = [], {}
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        what = "is empty" if isinstance(image, str) else f"is a JSON {_json_type(image)}, not a string"
        problems.append(RecordProblem(index, "image", f"{what} (a file name, or null / absent for no image)", line))
    kinds = [k for k in ("instruction", "caption", "conversations", "messages") if k in obj]
    if len(kinds) > 1:
        return [], problems + [RecordProblem(index, None, f"has both {kinds[0]!r} and {kinds[1]!r}: a record is an "
                                                          "instruction, an image caption or a conversation", line)]
    if kinds == ["messages"] or (kinds == ["conversations"] and template == CHAT_TEMPLATE):
        messages, more = _check_messages(obj, kinds[0], index, line)
        if problems or more:
            return [], problems + more
        return [Record("", "", "", index, image, CHAT_TEMPLATE, messages=tuple(messages))], []
    if kinds == ["conversations"]:
        exchanges, more = _check_conversation(obj, index, line)
        if problems or more:
            return [], problems + more
        if template == "alpaca":  # the official V2 multi-modal code: the first exchange
            exchanges = exchanges[:1]
        return [Record(q, "", a, index, image, template, tuple(exchanges[:i])) for i, (q, a) in
                enumerate(exchanges)], []
    if kinds == ["caption"]:
        caption = obj["caption"]
        if not isinstance(caption, str) or not caption.strip():
            what = "is empty" if isinstance(caption, str) else f"is a JSON {_json_type(caption)}, not a string"
            problems.append(RecordProblem(index, "caption", what, line))
        if image is None:
            problems.append(RecordProblem(index, "image", "is missing: a caption record is an image-text pair", line))
        return ([], problems) if problems else ([_record(CAPTION_INSTRUCTION, "", caption, index, image, template)], [])
    for name in ("instruction", "input", "output"):
        required = name != "input"
        if name not in obj:
            if required:
                problems.append(RecordProblem(index, name, "is missing", line))
            values[name] = ""
        elif not isinstance(obj[name], str):
            problems.append(RecordProblem(index, name, f"is a JSON {_json_type(obj[name])}, not a string", line))
        elif required and not obj[name].strip():
            problems.append(RecordProblem(index, name, "is empty", line))
        else:
            values[name] = obj[name]
    if problems:
        return [], problems
    return [_record(values["instruction"], values["input"], values["output"], index, image, template)], []


def _record(instruction: str, input: str, output: str, index: int, image: str | None, template: str) -> Record:
    """An instruction example; in the model's chat template, a user message (the instruction, and the input on a
    new line) and the assistant's reply."""
    if template != CHAT_TEMPLATE:
        return Record(instruction, input, output, index, image, template)
    return Record(instruction, input, output, index, image, template,
                  messages=(("user", user_message(instruction, input)), ("assistant", output)))


class _InvalidJSON(str):
    """A JSONL line that does not parse; the string is the parser's message."""


def _collect(items: Sequence[tuple[int, int | None, object]], on_bad_record: str, source: str,
             fmt: str, template: str) -> tuple[list[Record], LoadReport]:
    records, report = [], LoadReport(source, fmt, len(items))
    for index, line, obj in items:
        if isinstance(obj, _InvalidJSON):
            examples, problems = [], [RecordProblem(index, None, f"is not valid JSON: {obj}", line)]
        else:
            examples, problems = _check_record(obj, index, line, template)
        if problems:
            report.problems.extend(problems)
            report.skipped.append(index)
        else:
            records.extend(examples)
    report.num_examples = len(records)
    if report.skipped and on_bad_record == "error":
        raise DataError(f"{source}: {len(report.skipped)} bad record(s) of {len(items)}:\n"
                        f"{_listing(report.problems)}\n"
                        f"Fix them, or pass {remedy_text('on_bad_record', 'skip')} to skip them.", report.problems,
                        remedy=("on_bad_record", "skip"))
    if not records:
        listing = f":\n{_listing(report.problems)}" if report.problems else ""
        raise DataError(f"{source}: no usable records ({len(items)} in the file){listing}", report.problems)
    if report.skipped:
        log.warning(report.summary())
    return records, report


def parse_records(objects: Sequence[object], *, on_bad_record: Literal["error", "skip"] = "error",
                  source: str = "records", template: str = "alpaca") -> tuple[list[Record], LoadReport]:
    """Records from already parsed objects (e.g. a JSON list), checked as load_records checks them."""
    _check_choice("on_bad_record", on_bad_record, ("error", "skip"))
    _check_choice("template", template, TEMPLATES)
    if isinstance(objects, (str, bytes, dict)) or not isinstance(objects, Sequence):
        raise TypeError(f"objects must be a sequence of records (dicts), got {type(objects).__name__}")
    return _collect([(i, None, obj) for i, obj in enumerate(objects)], on_bad_record, source, "objects", template)


def _detect_format(path: Path, text: str) -> str:
    """jsonl by the name, else json when the whole text is one JSON value (a list, or a mistake: a dict), else jsonl."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if text.lstrip().startswith("["):
        return "json"
    try:
        json.loads(text)
    except json.JSONDecodeError:  # several lines of records, or broken JSON Lines: read line by line
        return "jsonl"
    return "json"


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM allowed); DataError naming the file and the first bad byte otherwise."""
    raw = path.read_bytes()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(f"{path}: not UTF-8 text: byte {offset} (0x{raw[offset]:02x}, line {line}) cannot be "
                        "decoded; save the file as UTF-8") from None


def load_records(path: str | Path, *, on_bad_record: Literal["error", "skip"] = "error",
                 format: Literal["auto", "json", "jsonl"] = "auto",
                 template: str = "alpaca") -> tuple[list[Record], LoadReport]:
    """Load records (Alpaca, image-text pairs, conversations: the module docstring) from a JSON list or a JSONL file.

    Arguments:
        path: the file, UTF-8. format "auto": JSONL if it is named *.jsonl or *.ndjson, else JSON if its first
            non-blank character is "[" or the whole file is one JSON value (a top level other than a list is an
            error: one record is a list of one, or a line of a .jsonl file), else JSONL.
        on_bad_record: "error" raises a DataError that lists every bad record (index, line for JSONL,
            field, what is wrong); "skip" leaves them out, logs a warning and lists them in the report.
        template: the prompt template of the examples (model/prompt.py's TEMPLATES: "alpaca", "chat", or "model",
            the checkpoint's chat template, which messages records always use).
    Returns:
        (records, report): the examples of the good records in file order, each with its record's index; the
        LoadReport.
    Raises DataError for a file that is not a JSON list or JSONL, or that has no usable record.
    """
    _check_choice("on_bad_record", on_bad_record, ("error", "skip"))
    _check_choice("format", format, ("auto", "json", "jsonl"))
    _check_choice("template", template, TEMPLATES)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = _read_text(path)
    fmt = _detect_format(path, text) if format == "auto" else format
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected "
                            "a JSON list of records, or JSON Lines (one record per line)") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: the top level is a JSON {_json_type(data)}; it must be a list of records, or "
                            "lines of records (JSON Lines, one record per line; name the file .jsonl)")
        items = [(i, None, obj) for i, obj in enumerate(data)]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = _InvalidJSON(f"{e.msg} at column {e.colno}")
            items.append((len(items), lineno, obj))
    return _collect(items, on_bad_record, str(path), fmt, template)


# ----------------------------------------------------------------------------------------------
# Tokenization


class TokenizedDataset:
    """Tokenized examples in flat buffers; see the module docstring for the label convention.

    Attributes:
        tokens, labels: (total_tokens,) int64, the examples one after the other.
        offsets: (num_examples + 1,) int64; example i is tokens[offsets[i]:offsets[i + 1]].
        prompt_lens: (num_examples,) int64, BOS included: the tokens before the first target; source_index:
            (num_examples,) int64, the record index of each example (DataErrors and reports name it).
        targets: None (every token after the prompt is a target), or (total_tokens,) bool, True at the tokens that
            are targets (chat-template examples: every assistant turn, several runs in one example).
        lengths, num_targets: numpy int64 arrays, tokens and targets of each example.
        pad_id: the id padding and filler batches use (any valid id: padding is never attended to).
    """

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, prompt_lens: torch.Tensor,
                 source_index: torch.Tensor, pad_id: int, targets: torch.Tensor | None = None):
        for name, t, dim in (("tokens", tokens, 1), ("offsets", offsets, 1), ("prompt_lens", prompt_lens, 1),
                             ("source_index", source_index, 1)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != dim:
                raise TypeError(f"{name} must be a 1-D int64 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        n = len(prompt_lens)
        if len(offsets) != n + 1 or len(source_index) != n or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError(f"offsets {tuple(offsets.shape)} must be (num_examples + 1,) = ({n + 1},), from 0 to "
                             f"len(tokens) = {len(tokens)}; source_index {tuple(source_index.shape)} must be ({n},)")
        lengths = offsets.diff()
        if n and not bool(((prompt_lens >= 1) & (prompt_lens < lengths)).all()):
            i = int(((prompt_lens < 1) | (prompt_lens >= lengths)).nonzero()[0])
            raise ValueError(f"example {i}: prompt_lens ({int(prompt_lens[i])}) must be in [1, length - 1] "
                             f"(length {int(lengths[i])}): every example needs a target")
        if len(tokens) and int(tokens.min()) < 0:
            raise ValueError("tokens must be non-negative ids")
        if targets is not None and (not isinstance(targets, torch.Tensor) or targets.dtype != torch.bool
                                    or targets.shape != tokens.shape):
            got = f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}"
            raise TypeError(f"targets must be a bool tensor of the shape of tokens {tuple(tokens.shape)}, got {got}")
        self.tokens, self.offsets, self.prompt_lens, self.source_index = tokens, offsets, prompt_lens, source_index
        self.pad_id, self.targets = int(pad_id), targets
        self.lengths = lengths.numpy()
        # labels[t] = tokens[t + 1] where the position t lies in [n_prompt - 1, length - 2] of its example (and, with
        # targets, where tokens[t + 1] is a target)
        example = torch.repeat_interleave(torch.arange(n), lengths)
        local = torch.arange(len(tokens)) - offsets[:-1][example]
        has_target = (local >= prompt_lens[example] - 1) & (local <= lengths[example] - 2)
        if targets is not None:
            has_target &= targets.roll(-1)
        self.num_targets = torch.bincount(example[has_target], minlength=n).numpy()
        self.labels = torch.where(has_target, tokens.roll(-1), IGNORE_INDEX)

    @classmethod
    def from_examples(cls, examples: Sequence[Sequence[int]], prompt_lens: Sequence[int], *, pad_id: int,
                      source_index: Sequence[int] | None = None,
                      targets: Sequence[Sequence[bool]] | None = None) -> TokenizedDataset:
        """From token lists (BOS + prompt + response + EOS) and their prompt lengths (BOS included); targets: None,
        or a list of bools per example (True at its target tokens)."""
        if len(prompt_lens) != len(examples) or (targets is not None and len(targets) != len(examples)):
            raise ValueError(f"prompt_lens ({len(prompt_lens)}) and targets must have an entry per example "
                             f"({len(examples)})")
        lengths = torch.tensor([len(e) for e in examples], dtype=torch.int64)
        tokens = torch.tensor([t for e in examples for t in e], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        index = range(len(examples)) if source_index is None else source_index
        mask = None if targets is None else torch.tensor([t for e in targets for t in e], dtype=torch.bool)
        return cls(tokens, offsets, torch.tensor(list(prompt_lens), dtype=torch.int64),
                   torch.tensor(list(index), dtype=torch.int64), pad_id, mask)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels) of example i, views into the flat buffers."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[start:end], self.labels[start:end]

    def subset(self, indices: Sequence[int]) -> TokenizedDataset:
        """The examples at these positions, in this order."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got {int(idx.min())} .. {int(idx.max())}")
        spans = [slice(self.offsets[i], self.offsets[i + 1]) for i in idx.tolist()]
        tokens = torch.cat([self.tokens[s] for s in spans]) if spans else torch.zeros(0, dtype=torch.int64)
        targets = None if self.targets is None else \
            torch.cat([self.targets[s] for s in spans]) if spans else torch.zeros(0, dtype=torch.bool)
        lengths = torch.as_tensor(self.lengths)[idx]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        return TokenizedDataset(tokens, offsets, self.prompt_lens[idx], self.source_index[idx], self.pad_id, targets)


@dataclass
class TokenizeReport:
    """What tokenize_records did. Counts are of examples and tokens; indices are record indices."""

    max_seq_len: int
    num_records: int
    num_examples: int  # kept
    num_tokens: int  # kept, after truncation
    num_targets: int  # kept: the positions the loss counts
    longest: int  # the longest example before truncation
    truncated: list[int] = field(default_factory=list)  # kept, but cut to max_seq_len
    tokens_truncated: int = 0  # tokens cut from them: all response tokens (EOS included), i.e. targets lost
    dropped: list[int] = field(default_factory=list)  # prompt alone >= max_seq_len: no target left
    tokens_dropped: int = 0  # all tokens of the dropped examples
    boundary_merged: list[int] = field(default_factory=list)  # encode(prompt) not a prefix of encode(prompt + output)
    skipped: list[int] = field(default_factory=list)  # on_bad_record="skip": conversations the chat template or the
    problems: list[RecordProblem] = field(default_factory=list)  # tokenizer cannot take, and why

    def summary(self) -> str:
        text = (f"{self.num_examples} examples, {self.num_tokens} tokens, {self.num_targets} targets "
                f"(max_seq_len {self.max_seq_len}, longest example {self.longest} tokens)")
        if self.truncated:
            text += (f"; truncated {len(self.truncated)} example(s) to {self.max_seq_len} tokens, "
                     f"{self.tokens_truncated} response tokens cut (records {_first(self.truncated)})")
        if self.dropped:
            text += (f"; dropped {len(self.dropped)} example(s) whose prompt alone has >= {self.max_seq_len} "
                     f"tokens ({self.tokens_dropped} tokens; records {_first(self.dropped)})")
        if self.skipped:
            text += (f"; skipped {len(self.skipped)} conversation(s) that the chat template or the tokenizer cannot "
                     f"take:\n{_listing(self.problems)}")
        if self.boundary_merged:
            text += (f"; {len(self.boundary_merged)} example(s) whose prompt's tokens are not a prefix of the "
                     "example's (masked by count, as the official script does; records "
                     f"{_first(self.boundary_merged)})")
        return text


def _first(indices: Sequence[int]) -> str:
    shown = ", ".join(map(str, indices[:_SHOWN]))
    return shown + (f", ... and {len(indices) - _SHOWN} more" if len(indices) > _SHOWN else "")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


TOKENIZATIONS = ("official", "litgpt")


def _pad_id(tokenizer: TokenizerLike) -> int:
    """The tokenizer's pad id, or EOS where it has none; its ids checked first."""
    for attr in ("bos_id", "eos_id", "vocab_size"):
        value = getattr(tokenizer, attr, None)
        if not isinstance(value, (int, np.integer)) and not (attr == "bos_id" and value is None):  # no BOS: Qwen2
            raise TypeError(f"tokenizer.{attr} must be an int{' or None' * (attr == 'bos_id')}, got {value!r}")
    pad_id = tokenizer.pad_id
    if pad_id is None or not 0 <= pad_id < tokenizer.vocab_size:
        pad_id = tokenizer.eos_id  # no pad token: any valid id does, padding is never attended to
    return pad_id


def _encode_text(prompt: str, output: str, tokenizer: TokenizerLike, tokenization: str) -> tuple[list[int], int, bool]:
    """(tokens, n_prompt, whether encode(prompt) is not a prefix of the tokens) of an instruction example."""
    if tokenization == "litgpt":  # the response encoded on its own
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        return prompt_ids + tokenizer.encode(output, bos=False, eos=True), len(prompt_ids), False
    # the official script: encode(prompt + output), its first len(encode(prompt)) tokens masked
    tokens = tokenizer.encode(prompt + output, bos=True, eos=True)
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    return tokens, len(prompt_ids), tokens[:len(prompt_ids)] != prompt_ids


def tokenize_records(records: Sequence[Record], tokenizer: TokenizerLike, *, max_seq_len: int = 512,
                     chat_template: ChatTemplate | None = None, tokenization: str = "official",
                     on_bad_record: Literal["error", "skip"] = "error") -> tuple[TokenizedDataset, TokenizeReport]:
    """Tokenize records as the official script does: encode(prompt + output, bos, eos), the first
    len(encode(prompt, bos)) tokens masked (the module docstring); messages examples through the chat template.

    Arguments:
        records: from load_records or parse_records (or Record(...) built by hand).
        tokenizer: anything with encode(text, bos, eos), bos_id, eos_id, pad_id, vocab_size (messages examples:
            model.Tokenizer, whose encode takes special=True, and its special_tokens).
        max_seq_len: longer examples are truncated, and examples whose prompt alone fills it are
            dropped; both are counted in the report and logged as a warning.
        chat_template: the model's chat template (model.chat.ChatTemplate), needed by messages examples.
        tokenization: "official" (above) or "litgpt": encode(prompt, bos) + encode(output, bos=False, eos=True).
        on_bad_record: for the messages examples the chat template or the tokenizer cannot take (a special-token
            string in a message, a conversation the template refuses or fails on): "error" raises a DataError naming
            each record; "skip" leaves them out, listed in the report (skipped) and logged as a warning.
    Returns:
        (dataset, report).
    """
    _check_int("max_seq_len", max_seq_len, 2)
    _check_choice("tokenization", tokenization, TOKENIZATIONS)
    _check_choice("on_bad_record", on_bad_record, ("error", "skip"))
    pad_id = _pad_id(tokenizer)
    examples, prompt_lens, index, masks, problems = [], [], [], [], []
    chat = any(isinstance(r, Record) and r.messages for r in records)
    report = TokenizeReport(max_seq_len, len(records), 0, 0, 0, 0)
    for position, record in enumerate(records):
        if not isinstance(record, Record):
            raise TypeError(f"records[{position}] must be a Record, got {type(record).__name__}")
        source = position if record.index is None else record.index
        if record.messages:
            if chat_template is None:
                raise DataError(f"record {source} is a conversation (messages) for the model's chat template, and "
                                "no chat_template was given (model.chat.ChatTemplate.find(checkpoint folder))")
            try:
                tokens, targets = encode_chat(chat_template, tokenizer, record.messages)
            except ValueError as e:
                problems.append(RecordProblem(source, "messages", str(e)))
                continue
            targets[0] = False  # nothing predicts the first token
            n_prompt = targets.index(True) if True in targets else len(tokens)
        else:
            tokens, n_prompt, merged = _encode_text(record.prompt, record.output, tokenizer, tokenization)
            targets = None
            if merged:
                report.boundary_merged.append(source)
        report.longest = max(report.longest, len(tokens))
        if n_prompt >= min(len(tokens), max_seq_len):
            report.dropped.append(source)
            report.tokens_dropped += len(tokens)
            continue
        if len(tokens) > max_seq_len:
            report.truncated.append(source)
            report.tokens_truncated += len(tokens) - max_seq_len
        examples.append(tokens[:max_seq_len])
        prompt_lens.append(n_prompt)
        index.append(source)
        if chat:  # per-token targets: every assistant turn; an Alpaca example's from its prompt on (prompt_lens)
            masks.append(targets[:max_seq_len] if targets is not None else [True] * min(len(tokens), max_seq_len))
    if problems and on_bad_record == "error":
        raise DataError(f"{len(problems)} conversation(s) that the chat template or the tokenizer cannot take:\n"
                        f"{_listing(problems)}\nFix them, or pass {remedy_text('on_bad_record', 'skip')} to skip "
                        "them.", problems, remedy=("on_bad_record", "skip"))
    report.skipped = [p.index for p in problems]
    report.problems = problems
    data = TokenizedDataset.from_examples(examples, prompt_lens, pad_id=pad_id, source_index=index,
                                          targets=masks if chat else None)
    report.num_examples, report.num_tokens = len(data), len(data.tokens)
    report.num_targets = int(data.num_targets.sum())
    if report.truncated or report.dropped or report.skipped:
        log.warning(report.summary())
    if not len(data):
        raise DataError(f"no example left after tokenization: {report.summary()}")
    return data, report


def split_eval(data: TokenizedDataset, eval_size: int | float, *,
               seed: int = 0) -> tuple[TokenizedDataset, TokenizedDataset]:
    """A seeded, deterministic held-out split: (train, eval), each in the data's order.

    eval_size: a number of examples (int, 0 for none) or a fraction in (0, 1) (at least one example).
    """
    _check_int("seed", seed, 0)
    n = len(data)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"eval_size must be an int or a float, got {eval_size!r}")
    if isinstance(eval_size, (float, np.floating)):
        if not 0 < eval_size < 1:
            raise ValueError(f"eval_size as a fraction must lie in (0, 1), got {eval_size}")
        n_eval = max(1, round(eval_size * n))
    else:
        n_eval = int(eval_size)
    if not 0 <= n_eval < n:
        raise ValueError(f"eval_size={eval_size!r} leaves {n - n_eval} of {n} examples to train on; need >= 1")
    perm = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(perm[n_eval:])), data.subset(np.sort(perm[:n_eval]))


# ----------------------------------------------------------------------------------------------
# Batches


class PackedBatch(TypedDict):
    tokens: torch.Tensor  # (1, T) int64, the sequences one after the other
    labels: torch.Tensor  # (1, T) int64, targets (already shifted), IGNORE_INDEX where none
    positions: torch.Tensor  # (1, T) int64, restarting at 0 in each sequence
    cu_seqlens: torch.Tensor  # (num_seqs + 1,) int32, cumulative offsets (flash-attn varlen)
    max_seqlen: int
    num_seqs: int
    num_tokens: int  # computed tokens: T
    num_real_tokens: int  # T, or 0 for a filler
    num_targets: int
    example_ids: torch.Tensor  # (num_seqs,) int64 positions in the dataset (empty for a filler)
    filler: bool


class PaddedBatch(TypedDict):
    tokens: torch.Tensor  # (B, L) int64, right-padded with the dataset's pad_id
    labels: torch.Tensor  # (B, L) int64, targets (already shifted), IGNORE_INDEX where none
    positions: torch.Tensor  # (B, L) int64, 0 ... L - 1 in every row
    lengths: torch.Tensor  # (B,) int64, real tokens of each row
    num_seqs: int
    num_tokens: int  # computed tokens: B * L
    num_real_tokens: int  # sum of lengths (0 for a filler)
    num_targets: int
    example_ids: torch.Tensor  # (B,) int64 positions in the dataset (empty for a filler)
    filler: bool


@dataclass
class Step:
    """One optimizer step: this rank's micro-batches and the whole step's counts (all ranks).

    num_targets is the loss denominator of the step. The counts leave filler micro-batches out and
    are the same on every rank and for every world size.
    """

    epoch: int
    index: int
    batches: list[dict]
    num_examples: int
    num_tokens: int  # computed, padding included
    num_real_tokens: int
    num_targets: int
    kind_targets: dict[int, int] | None = None  # with kinds: the step's targets per kind (all ranks)


class _Loader:
    """The plan of an epoch, its steps, their share for this rank, resuming; subclasses collate."""

    def __init__(self, data: TokenizedDataset, *, micro_batches_per_step: int | None, shuffle: bool, seed: int,
                 rank: int, world_size: int, kinds: Sequence[int] | None = None):
        if not isinstance(data, TokenizedDataset):
            raise TypeError(f"data must be a TokenizedDataset, got {type(data).__name__}")
        if not len(data):
            raise ValueError("data has no examples")
        if kinds is not None:
            kinds = np.asarray(kinds)
            if kinds.shape != (len(data),) or kinds.dtype.kind not in "iu" or (kinds < 0).any():
                raise ValueError(f"kinds must hold one int >= 0 per example ({len(data)}), got {kinds.dtype} "
                                 f"{kinds.shape}")
        self.kinds = kinds
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if micro_batches_per_step is None:
            micro_batches_per_step = world_size
        _check_int("micro_batches_per_step", micro_batches_per_step, 1)
        if micro_batches_per_step % world_size:
            raise ValueError(f"micro_batches_per_step ({micro_batches_per_step}) must be a multiple of world_size "
                             f"({world_size}): the ranks share each step's micro-batches")
        _check_int("seed", seed, 0)
        self.data, self.shuffle, self.seed = data, bool(shuffle), int(seed)
        self.rank, self.world_size, self.micro_batches_per_step = rank, world_size, micro_batches_per_step
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def _check_longest_fits(self, name: str, limit: int, remedy: str) -> None:
        """ValueError naming the argument and the longest example when that example exceeds limit tokens."""
        longest = int(self.data.lengths.argmax())
        if self.data.lengths[longest] > limit:
            raise ValueError(f"{name}={limit} is smaller than example {longest} (record "
                             f"{int(self.data.source_index[longest])}) of {int(self.data.lengths[longest])} tokens; "
                             f"{remedy}")

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the examples: a permutation seeded by (seed, epoch), or 0 ... n-1."""
        _check_int("epoch", epoch, 0)
        if not self.shuffle:
            return np.arange(len(self.data))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The epoch's micro-batches, as arrays of dataset positions; the same on every rank."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, [np.asarray(ids, dtype=np.int64) for ids in self._plan(self.order(epoch))])
        return self._cached[1]

    def num_steps(self, epoch: int) -> int:
        return math.ceil(len(self.plan(epoch)) / self.micro_batches_per_step)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Step]:
        """The steps of an epoch from start_step on, with this rank's micro-batches collated."""
        n_steps = self.num_steps(epoch)
        _check_int("start_step", start_step, 0)
        if start_step > n_steps:
            raise ValueError(f"start_step={start_step} is past the end of epoch {epoch} ({n_steps} steps)")
        return self._steps(epoch, start_step, n_steps)

    def _steps(self, epoch: int, start_step: int, n_steps: int) -> Iterator[Step]:
        plan, m, w = self.plan(epoch), self.micro_batches_per_step, self.world_size
        for index in range(start_step, n_steps):
            micro = plan[index * m:(index + 1) * m]
            mine = [self.collate(ids) for ids in micro[self.rank::w]]
            if w > 1:  # every rank runs m // w passes, also in a short last step
                mine += [self._filler() for _ in range(m // w - len(mine))]
            counts = np.array([self._counts(ids) for ids in micro]).sum(0)
            kind_targets = None
            if self.kinds is not None:  # each micro-batch holds one kind
                for batch in mine:
                    batch["kind"] = int(self.kinds[batch["example_ids"][0]]) if len(batch["example_ids"]) else -1
                kind_targets = {}
                for ids in micro:
                    kind = int(self.kinds[ids[0]])
                    kind_targets[kind] = kind_targets.get(kind, 0) + int(self.data.num_targets[ids].sum())
            yield Step(epoch, index, mine, *(int(c) for c in counts), kind_targets=kind_targets)

    def _counts(self, ids: np.ndarray) -> tuple[int, int, int, int]:
        """(examples, computed tokens, real tokens, targets) of a micro-batch."""
        real = int(self.data.lengths[ids].sum())
        return len(ids), self._computed_tokens(ids, real), real, int(self.data.num_targets[ids].sum())

    def _plan(self, order: np.ndarray) -> list[Sequence[int]]:
        raise NotImplementedError

    def _computed_tokens(self, ids: np.ndarray, real: int) -> int:
        raise NotImplementedError

    def collate(self, ids: Sequence[int]) -> dict:
        raise NotImplementedError

    def _filler(self) -> dict:
        raise NotImplementedError


class PackedLoader(_Loader):
    """Whole examples packed into micro-batches of at most token_budget tokens, without padding.

    Packing: best fit (each example goes to the open micro-batch it fills the most, or a new one)
    over the epoch's shuffled order; micro-batches come in the order they were opened. With kinds (an int
    per example: joint training's text and image records), each micro-batch holds examples of one kind,
    its batch["kind"], and each step counts its targets per kind (Step.kind_targets).

    Arguments:
        data: a TokenizedDataset; every example must fit the budget (tokenize with
            max_seq_len <= token_budget).
        token_budget: the most tokens in one micro-batch.
        micro_batches_per_step: micro-batches per optimizer step, all ranks together (default:
            world_size); a multiple of world_size. Global budget: micro_batches_per_step * token_budget.
        shuffle, seed: the order of each epoch is a permutation seeded by (seed, epoch).
        rank, world_size: this process's share of each step (see the module docstring).
        kinds: None, or an int per example; micro-batches then hold one kind each (joint training).
    """

    def __init__(self, data: TokenizedDataset, token_budget: int, *, micro_batches_per_step: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 kinds: Sequence[int] | None = None):
        super().__init__(data, micro_batches_per_step=micro_batches_per_step, shuffle=shuffle, seed=seed,
                         rank=rank, world_size=world_size, kinds=kinds)
        _check_int("token_budget", token_budget, 1)
        self._check_longest_fits("token_budget", token_budget, "tokenize with max_seq_len <= token_budget, or "
                                 "raise token_budget")
        self.token_budget = token_budget

    def _plan(self, order: np.ndarray) -> list[list[int]]:
        lengths, budget = self.data.lengths, self.token_budget
        shortest = int(lengths.min())
        bins: list[list[int]] = []
        rooms: dict[int, list[tuple[int, int]]] = {}  # per kind: (free tokens, bin) of the bins with room, sorted
        for i in order.tolist():
            room = rooms.setdefault(0 if self.kinds is None else int(self.kinds[i]), [])
            size = int(lengths[i])
            j = bisect_left(room, (size, -1))  # the tightest bin with room for it
            if j == len(room):
                bins.append([])
                free, b = budget, len(bins) - 1
            else:
                free, b = room.pop(j)
            bins[b].append(i)
            if free - size >= shortest:
                insort(room, (free - size, b))
        return bins

    def _computed_tokens(self, ids: np.ndarray, real: int) -> int:
        return real

    def collate(self, ids: Sequence[int]) -> PackedBatch:
        """One packed row of these examples (dataset positions), in this order."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            raise ValueError("ids must name at least one example")
        data = self.data
        lengths = torch.as_tensor(data.lengths[ids])
        spans = [(int(data.offsets[i]), int(data.offsets[i + 1])) for i in ids.tolist()]
        tokens = torch.cat([data.tokens[s:e] for s, e in spans])
        if len(tokens) > self.token_budget:
            raise ValueError(f"examples {ids.tolist()} have {len(tokens)} tokens, "
                             f"over token_budget={self.token_budget}")
        labels = torch.cat([data.labels[s:e] for s, e in spans])
        starts = lengths.cumsum(0) - lengths
        positions = torch.arange(len(tokens)) - torch.repeat_interleave(starts, lengths)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        return PackedBatch(tokens=tokens[None], labels=labels[None], positions=positions[None],
                           cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()), num_seqs=len(ids),
                           num_tokens=len(tokens), num_real_tokens=len(tokens),
                           num_targets=int(data.num_targets[ids].sum()), example_ids=torch.as_tensor(ids),
                           filler=False)

    def _filler(self) -> PackedBatch:
        one = torch.ones(1, 1, dtype=torch.int64)
        return PackedBatch(tokens=one * self.data.pad_id, labels=one * IGNORE_INDEX, positions=one * 0,
                           cu_seqlens=torch.tensor([0, 1], dtype=torch.int32), max_seqlen=1, num_seqs=1,
                           num_tokens=1, num_real_tokens=0, num_targets=0,
                           example_ids=torch.zeros(0, dtype=torch.int64), filler=True)


class PaddedLoader(_Loader):
    """batch_size examples per micro-batch, right-padded to pad_to tokens or to the longest of the batch.

    Arguments:
        data: a TokenizedDataset; with an int pad_to, every example must fit it.
        batch_size: examples per micro-batch (the last one of an epoch may have fewer).
        pad_to: the row length (512, the official script's), or "longest": the batch's longest example.
        micro_batches_per_step, shuffle, seed, rank, world_size, kinds: as for PackedLoader (with kinds, a
            micro-batch holds batch_size examples of one kind, in the order they fill up). The global batch
            size is micro_batches_per_step * batch_size.
    """

    def __init__(self, data: TokenizedDataset, batch_size: int, *, pad_to: int | Literal["longest"] = 512,
                 micro_batches_per_step: int | None = None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, kinds: Sequence[int] | None = None):
        super().__init__(data, micro_batches_per_step=micro_batches_per_step, shuffle=shuffle, seed=seed,
                         rank=rank, world_size=world_size, kinds=kinds)
        _check_int("batch_size", batch_size, 1)
        if pad_to != "longest":
            _check_int("pad_to", pad_to, 1)
            self._check_longest_fits("pad_to", pad_to, "tokenize with max_seq_len <= pad_to, or use pad_to='longest'")
        self.batch_size, self.pad_to = batch_size, pad_to

    def _plan(self, order: np.ndarray) -> list[np.ndarray]:
        if self.kinds is None:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches, filling = [], {}  # with kinds: batch_size examples of one kind, in the order they fill up
        for i in order.tolist():
            batch = filling.setdefault(int(self.kinds[i]), [])
            batch.append(i)
            if len(batch) == self.batch_size:
                batches.append(filling.pop(int(self.kinds[i])))
        return batches + list(filling.values())

    def _row_length(self, lengths: np.ndarray) -> int:
        return int(lengths.max()) if self.pad_to == "longest" else self.pad_to

    def _computed_tokens(self, ids: np.ndarray, real: int) -> int:
        return len(ids) * self._row_length(self.data.lengths[ids])

    def collate(self, ids: Sequence[int]) -> PaddedBatch:
        """One (B, L) batch of these examples (dataset positions), in this order."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            raise ValueError("ids must name at least one example")
        data, lengths = self.data, self.data.lengths[ids]
        row = self._row_length(lengths)  # every example fits an int pad_to: checked at setup
        tokens = torch.full((len(ids), row), data.pad_id, dtype=torch.int64)
        labels = torch.full((len(ids), row), IGNORE_INDEX, dtype=torch.int64)
        for r, i in enumerate(ids.tolist()):
            example_tokens, example_labels = data[i]
            tokens[r, :len(example_tokens)] = example_tokens
            labels[r, :len(example_labels)] = example_labels
        return PaddedBatch(tokens=tokens, labels=labels, positions=torch.arange(row).expand(len(ids), row).clone(),
                           lengths=torch.as_tensor(lengths), num_seqs=len(ids), num_tokens=tokens.numel(),
                           num_real_tokens=int(lengths.sum()), num_targets=int(data.num_targets[ids].sum()),
                           example_ids=torch.as_tensor(ids), filler=False)

    def _filler(self) -> PaddedBatch:
        row = 1 if self.pad_to == "longest" else self.pad_to
        return PaddedBatch(tokens=torch.full((1, row), self.data.pad_id, dtype=torch.int64),
                           labels=torch.full((1, row), IGNORE_INDEX, dtype=torch.int64),
                           positions=torch.arange(row)[None], lengths=torch.zeros(1, dtype=torch.int64), num_seqs=1,
                           num_tokens=row, num_real_tokens=0, num_targets=0,
                           example_ids=torch.zeros(0, dtype=torch.int64), filler=True)
