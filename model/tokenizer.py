"""Tokenizers of the LLaMA family: sentencepiece (LLaMA-1/2) and tokenizer.json (Llama-3) behind one class.

- tokenizer.model, a sentencepiece model (LLaMA-1/2, Meta's and HF's releases): BOS <s> = 1,
  EOS </s> = 2, through the sentencepiece package.
- tokenizer.json, a Hugging Face tokenizers file (Llama-3, or HF's LLaMA-1/2 releases), through the
  tokenizers package. Its special tokens are read from tokenizer_config.json beside it when there
  is one, else the usual names (<|begin_of_text|> / <s>, <|end_of_text|> / </s>). The file's own
  post-processor is bypassed (add_special_tokens=False): encode adds BOS/EOS only when asked.
- encode(text, bos=True, eos=False) as the official LLaMA-Adapter code calls it; decode drops
  special tokens. stop_ids: EOS, and Llama-3's <|eot_id|> / <|eom_id|> when the vocabulary has them.
Meta's Llama-3 tokenizer.model is a tiktoken file, not sentencepiece: give the tokenizer.json of
the HF release instead (a clear error says so).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import sentencepiece
import tokenizers

_BOS_NAMES = ("<|begin_of_text|>", "<s>")
_EOS_NAMES = ("<|end_of_text|>", "</s>")
_EXTRA_STOP_NAMES = ("<|eot_id|>", "<|eom_id|>")


class Tokenizer:
    """tokenizer.model (sentencepiece) or tokenizer.json (tokenizers); path is the file or its folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = self._pick(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        self.path = path
        self._sp: sentencepiece.SentencePieceProcessor | None = None
        self._hf: tokenizers.Tokenizer | None = None
        if path.suffix == ".json":
            self._hf = tokenizers.Tokenizer.from_file(str(path))
            special = self._special_tokens(path.parent / "tokenizer_config.json")
            self.bos_id = self._token_id(special.get("bos_token"), _BOS_NAMES, "BOS")
            self.eos_id = self._token_id(special.get("eos_token"), _EOS_NAMES, "EOS")
            self.pad_id = self._hf.token_to_id(special["pad_token"]) if special.get("pad_token") else None
            self.vocab_size = self._hf.get_vocab_size()
            extra = [self._hf.token_to_id(t) for t in _EXTRA_STOP_NAMES]
        else:
            if _is_tiktoken(path):
                raise ValueError(f"{path}: a tiktoken file (Meta's Llama-3 release), not a sentencepiece model; use "
                                 "the tokenizer.json of the Hugging Face release")
            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as e:
                raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
            self.vocab_size = self._sp.vocab_size()
            extra = []
        self.stop_ids = frozenset([self.eos_id, *(i for i in extra if i is not None)])

    @staticmethod
    def _pick(folder: Path) -> Path:
        """tokenizer.model when it is sentencepiece, else tokenizer.json."""
        model, js = folder / "tokenizer.model", folder / "tokenizer.json"
        if model.is_file() and not (_is_tiktoken(model) and js.is_file()):
            return model
        if js.is_file():
            return js
        raise FileNotFoundError(f"{folder}: no tokenizer.model or tokenizer.json")

    @staticmethod
    def _special_tokens(config_file: Path) -> dict[str, str]:
        if not config_file.is_file():
            return {}
        config = json.loads(config_file.read_text())
        tokens = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            tokens[key] = value.get("content") if isinstance(value, dict) else value
        return tokens

    def _token_id(self, configured: str | None, names: tuple[str, ...], what: str) -> int:
        for name in ((configured,) if configured else names):
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"{self.path}: no {what} token ({configured or ' or '.join(names)}) in the vocabulary")

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text) if self._sp is not None else self._hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids, skip_special_tokens=True)


def _is_tiktoken(path: Path) -> bool:
    """tiktoken BPE files are text lines "<base64 token> <rank>"; sentencepiece models are binary protobuf."""
    with open(path, "rb") as f:
        first = f.readline(200).split()
    return len(first) == 2 and first[1].isdigit()
