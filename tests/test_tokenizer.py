"""Tokenizer: a sentencepiece model trained here, and a tokenizers tokenizer.json built here."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece
import tokenizers

from model import Tokenizer

TEXT = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:",
    "Eat a balanced diet, exercise regularly and sleep well.",
    "The quick brown fox jumps over the lazy dog; alpacas and llamas graze in the Andes.",
    "Zero-init attention gates the adaption prompts with a learned factor that starts at zero.",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A sentencepiece BPE model with LLaMA's settings (<unk>=0, <s>=1, </s>=2, byte fallback, identity
    normalization, whitespace kept), trained on TEXT."""
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=out, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(out.getvalue())
    return folder / "tokenizer.model"


def test_sentencepiece_round_trip(sp_model):
    tok = Tokenizer(sp_model.parent)  # the folder finds tokenizer.model
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 400)
    assert tok.stop_ids == {2}
    for text in ["Give three tips for staying healthy.", "  leading spaces and\nnew lines", "ünïcödé → bytes ✓"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and 2 not in ids
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=False, eos=True) == ids[1:] + [2]
    assert tok.decode(tok.encode("llamas", eos=True)) == "llamas"  # BOS/EOS dropped on decode


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A Llama-3-style tokenizer.json (byte-level BPE, <|begin_of_text|> ... <|eot_id|>) with its config."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator(TEXT, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    # as in Llama-3's file: a post-processor that would add BOS by itself (Tokenizer must not let it)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}}))
    return folder / "tokenizer.json"


def test_tokenizer_json_round_trip(hf_tokenizer):
    tok = Tokenizer(hf_tokenizer)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.stop_ids == {1, 2}  # EOS and <|eot_id|>
    for text in ["Give three tips for staying healthy.", " leading space", "ünïcödé → bytes ✓"]:
        ids = tok.encode(text)
        assert ids.count(0) == 1 and ids[0] == 0  # one BOS, ours
        assert tok.decode(ids) == text
    assert tok.encode("llamas", bos=False, eos=True)[-1] == 1


def test_tokenizer_errors(tmp_path, sp_model):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # Meta's Llama-3 file is tiktoken
    with pytest.raises(ValueError, match=r"tokenizer\.model: a tiktoken file .* use the tokenizer\.json"):
        Tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="missing: no such tokenizer file"):
        Tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path / "empty")
    (tmp_path / "bad.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match=r"bad\.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
