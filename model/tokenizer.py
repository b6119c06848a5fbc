"""Tokenizers of the LLaMA family: sentencepiece (LLaMA-1/2) and tokenizer.json (Llama-3) behind one class.

- tokenizer.model, a sentencepiece model (LLaMA-1/2): BOS <s> = 1, EOS </s> = 2.
- tokenizer.json, a Hugging Face tokenizers file (Llama-3, or HF's LLaMA-1/2 releases): special tokens from the
  tokenizer_config.json beside it, else the usual names; its post-processor is bypassed (add_special_tokens=False).
- tokenizer.model, a tiktoken BPE file (Meta's Llama-3 to 3.3 releases), built as Meta's reference code builds it:
  the file's ranks, Llama-3's pre-tokenizer pattern, 256 special tokens after them (<|begin_of_text|> 128000, ...).
encode(text, bos=True, eos=False) as the official LLaMA-Adapter code calls it; a tokenizer without BOS (Qwen2's) has
bos_id None, and bos=True then adds nothing. stop_ids: EOS, and Llama-3's <|eot_id|> / <|eom_id|> when present.
Special-token strings in text ("</s>", "<|eot_id|>"), one rule for every kind of file, are plain text, never control
tokens, so a data record or a prompt cannot end an example early or inject a turn; control tokens come only from
bos / eos, or from encode(text, special=True), a chat template's own rendering (model/chat.py), as transformers'
apply_chat_template tokenizes. decode(ids) drops control tokens and gives every other token back as text: what
encode(text) read comes back whole, "</s>" included.
A file that is not a tokenizer of its kind raises CheckpointError naming it; check_vocab refuses a tokenizer whose
ids do not all fit a model's embedding. The details: docs/checkpoints.md (Tokenizers).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

import sentencepiece
import tiktoken
import tokenizers

from .io import CheckpointError, read_json

_BOS_NAMES = ("<|begin_of_text|>", "<s>")
_EOS_NAMES = ("<|end_of_text|>", "</s>")
_EXTRA_STOP_NAMES = ("<|eot_id|>", "<|eom_id|>")

# Meta's Llama-3 tiktoken tokenizer: pre-tokenizer pattern and special tokens (Llama-3.1's names; Llama-3 had
# reserved tokens in places 4, 5, 8 and 10 of this list, and 3.2's vision models <|image|> in place 11)
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                 "<|eot_id|>", "<|python_tag|>")
_LLAMA3_SPECIAL = (*_LLAMA3_NAMED, *(f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(_LLAMA3_NAMED))))
# tiktoken's Rust core can fail on very long texts and overflow its stack on huge runs of whitespace or of
# non-whitespace: Meta's code encodes pieces of at most _MAX_CHARS characters with no run over _MAX_RUN (_pieces)
_MAX_CHARS = 400_000
_MAX_RUN = 25_000


class Tokenizer:
    """tokenizer.model (sentencepiece or tiktoken) or tokenizer.json (tokenizers); path is the file or its folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path = self.find(path)
        self._sp: sentencepiece.SentencePieceProcessor | None = None
        self._hf: tokenizers.Tokenizer | None = None
        self._tt: tiktoken.Encoding | None = None
        if path.suffix == ".json":
            try:
                self._hf = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the tokenizers package raises a bare Exception for a bad file
                raise CheckpointError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
            special = self._special_tokens(path.parent / "tokenizer_config.json")
            no_bos = "bos_token" in special and special["bos_token"] is None  # bos_token: null (Qwen2's)
            self.bos_id = None if no_bos else self._token_id(special.get("bos_token"), _BOS_NAMES, "BOS")
            self.eos_id = self._token_id(special.get("eos_token"), _EOS_NAMES, "EOS")
            self.pad_id = self._hf.token_to_id(special["pad_token"]) if special.get("pad_token") else None
            self.vocab_size = self._hf.get_vocab_size()
            extra = [self._hf.token_to_id(t) for t in _EXTRA_STOP_NAMES]
            self.special_tokens = frozenset(t.content for t in self._hf.get_added_tokens_decoder().values()
                                            if t.special)
        elif _is_tiktoken(path):
            self._tt = _llama3_tiktoken(path)
            self.bos_id, self.eos_id = (self._tt.encode_single_token(t) for t in _LLAMA3_SPECIAL[:2])
            self.pad_id = None
            self.vocab_size = self._tt.n_vocab
            extra = [self._tt.encode_single_token(t) for t in _EXTRA_STOP_NAMES]
            self._special_ids = frozenset(self._tt.encode_single_token(t) for t in _LLAMA3_SPECIAL)
            self.special_tokens = frozenset(_LLAMA3_SPECIAL)
        else:
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as e:
                raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from e
            self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
            self.eos_id = self._sp.eos_id()
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
            self.vocab_size = self._sp.vocab_size()
            extra = []
            self.special_tokens = frozenset(self._sp.id_to_piece(i) for i in range(self.vocab_size)
                                            if self._sp.is_control(i) or self._sp.is_unknown(i))
        self.stop_ids = frozenset([self.eos_id, *(i for i in extra if i is not None)])
        self.bos_token, self.eos_token = (self._token(i) for i in (self.bos_id, self.eos_id))  # their strings

    @staticmethod
    def find(path: str | os.PathLike) -> Path:
        """The tokenizer file Tokenizer(path) reads: path itself, or in a folder tokenizer.model (sentencepiece or
        tiktoken), else tokenizer.json; FileNotFoundError when there is none."""
        path = Path(path)
        if path.is_dir():
            model, js = path / "tokenizer.model", path / "tokenizer.json"
            if not model.is_file() and not js.is_file():
                raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json")
            path = model if model.is_file() else js
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        return path

    @staticmethod
    def _special_tokens(config_file: Path) -> dict[str, str]:
        if not config_file.is_file():
            return {}
        config = read_json(config_file)
        tokens = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise CheckpointError(f"{config_file}: {key!r} must be a token (a string), got {value!r}")
            if key in config:  # a null one says there is none
                tokens[key] = value
        return tokens

    def _token_id(self, configured: str | None, names: tuple[str, ...], what: str) -> int:
        for name in ((configured,) if configured else names):
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        raise CheckpointError(f"{self.path}: no {what} token ({configured or ' or '.join(names)}) in the vocabulary")

    def _token(self, token_id: int | None) -> str:
        """The string of a special token; "" for none (a tokenizer without BOS)."""
        if token_id is None:
            return ""
        if self._sp is not None:
            return self._sp.id_to_piece(token_id)
        if self._hf is not None:
            return self._hf.id_to_token(token_id)
        return self._tt.decode_single_token_bytes(token_id).decode("utf-8")

    def check_vocab(self, vocab_size: int) -> None:
        """CheckpointError unless every id of this tokenizer is below vocab_size (the model's embedding rows)."""
        if self.vocab_size > vocab_size:
            raise CheckpointError(f"{self.path}: the tokenizer has {self.vocab_size} tokens, more than the model's "
                                  f"{vocab_size}: not the model's tokenizer")

    def encode(self, text: str, *, bos: bool = True, eos: bool = False, special: bool = False) -> list[int]:
        """Token ids of text, BOS first / EOS last when asked. special-token strings in text are plain text, unless
        special=True (a chat template's rendering): then each of special_tokens is its control id."""
        if self._sp is not None:
            if not special or not self.special_tokens:
                ids = self._sp.encode(text)
            else:  # the special-token strings as their ids, the text between them piece by piece
                ids = []
                for piece in re.split(self._special_pattern(), text):
                    if piece in self.special_tokens:
                        ids.append(self._sp.piece_to_id(piece))
                    elif piece:
                        ids += self._sp.encode(piece)
        elif self._hf is not None:
            self._hf.encode_special_tokens = not special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        elif special:  # a chat template's rendering: its special-token strings are control tokens
            ids = [i for piece in _pieces(text) for i in self._tt.encode(piece, allowed_special="all")]
        else:  # special-token text is plain text (disallowed_special=()), as in Meta's encode
            ids = [i for piece in _pieces(text) for i in self._tt.encode(piece, disallowed_special=())]
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def _special_pattern(self) -> str:
        """A regex that splits text at the special-token strings (longest first), keeping them."""
        return "(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")"

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._tt.decode([i for i in ids if i not in self._special_ids])


def _is_tiktoken(path: Path) -> bool:
    """tiktoken BPE files are text lines "<base64 token> <rank>"; sentencepiece models are binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline(200).split()
    return len(first) == 2 and first[1].isdigit()


def _llama3_tiktoken(path: Path) -> tiktoken.Encoding:
    """Meta's Llama-3 tokenizer from its tiktoken file. The ranks are read here rather than by
    tiktoken.load.load_tiktoken_bpe, which caches files by their path name in a temporary folder and would
    serve a stale copy after the file at that path is replaced."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as e:
                raise CheckpointError(f"{path}: line {number} is not '<base64 token> <rank>' of a tiktoken file") \
                    from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: the ranks of a tiktoken file must be 0 .. {len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE encodes any text through its 256 single bytes
        raise CheckpointError(f"{path}: a tiktoken file holds a token for each of the 256 bytes; this one lacks "
                              f"{len(missing)} of them (it has {len(ranks)} tokens)")
    return tiktoken.Encoding(name=path.stem, pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(_LLAMA3_SPECIAL)})


def _pieces(text: str) -> list[str]:
    """text cut as Meta's encode cuts it for tiktoken: chunks of at most _MAX_CHARS characters, each cut again
    inside any run of more than _MAX_RUN whitespace (or non-whitespace) characters. Shorter texts stay whole."""
    pieces = []
    for chunk in (text[i:i + _MAX_CHARS] for i in range(0, len(text), _MAX_CHARS)) if text else ("",):
        start, run, space = 0, 0, None
        for i, c in enumerate(chunk):
            run = run + 1 if c.isspace() == space else 1
            space = c.isspace()
            if run > _MAX_RUN:
                pieces.append(chunk[start:i])
                start, run = i, 1
        pieces.append(chunk[start:])
    return pieces
