"""Tests for train/data.py: records, templates and label mask, truncation, packing, padding, resume, ranks.

The tokenizer is a tiny sentencepiece BPE model trained here, on the demo set and random words,
in the LLaMA tokenizer's style (byte fallback, identity normalization, BOS 1, EOS 2, no pad).
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from llama_adapter_triton.model.prompt import alpaca_prompt
from llama_adapter_triton.train.data import (
    IGNORE_INDEX,
    DataError,
    PackedLoader,
    PaddedLoader,
    Record,
    TokenizedDataset,
    load_records,
    parse_records,
    split_eval,
    tokenize_records,
)

DEMO = Path(__file__).resolve().parent.parent / "train" / "demo_data" / "demo.json"
WORDS = ["alpha", "brick", "cloud", "delta", "ember", "frost", "grain", "hinge", "ivory", "jolly", "kayak", "lemon",
         "maple", "noble", "ocean", "piano", "quilt", "river", "stone", "tiger", "umbra", "vivid", "whale", "xenon",
         "yield", "zebra", "a", "an", "of", "to", "is", "it"]


class SPTokenizer:
    """The model Tokenizer's protocol over a sentencepiece processor."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp
        self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        self.vocab_size = sp.get_piece_size()

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def random_record(rng: random.Random, max_words: int = 30) -> Record:
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return Record(words(1, 8).capitalize() + "?", words(0, 6) if rng.random() < 0.5 else "", words(1, max_words))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> SPTokenizer:
    rng = random.Random(0)
    demo = json.loads(DEMO.read_text(encoding="utf-8"))
    corpus = [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in demo]
    corpus += [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    corpus.append(string.printable)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=450,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return SPTokenizer(spm.SentencePieceProcessor(model_file=str(path)))


@pytest.fixture(scope="session")
def records() -> list[Record]:
    rng = random.Random(1)
    return [random_record(rng) for _ in range(150)]


def random_dataset(seed: int, n: int = 120, max_len: int = 60) -> tuple[TokenizedDataset, list[list[int]], list[int]]:
    """Random token ids and prompt lengths: (dataset, examples, prompt_lens)."""
    rng = random.Random(seed)
    examples, prompt_lens = [], []
    for _ in range(n):
        length = rng.randint(2, max_len)
        examples.append([1] + [rng.randrange(3, 500) for _ in range(length - 2)] + [2])
        prompt_lens.append(rng.randint(1, length - 1))
    return TokenizedDataset.from_examples(examples, prompt_lens, pad_id=0), examples, prompt_lens


def expected_labels(tokens: list[int], n_prompt: int) -> list[int]:
    """The convention written out: position t targets tokens[t + 1] from the last prompt token on."""
    return [tokens[t + 1] if n_prompt - 1 <= t < len(tokens) - 1 else IGNORE_INDEX for t in range(len(tokens))]


def sequences(batch: dict) -> dict[int, tuple[list[int], list[int]]]:
    """example id -> (tokens, labels) as a packed or padded batch holds it, padding cut off."""
    ids = batch["example_ids"].tolist()
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        spans = [(0, a, b) for a, b in zip(cu[:-1], cu[1:], strict=True)]
    else:
        spans = [(r, 0, int(n)) for r, n in enumerate(batch["lengths"])]
    return {i: (batch["tokens"][r, a:b].tolist(), batch["labels"][r, a:b].tolist())
            for i, (r, a, b) in zip(ids, spans, strict=True)}


def write_json(path: Path, objects: list) -> Path:
    path.write_text(json.dumps(objects), encoding="utf-8")
    return path


def as_dicts(records: list[Record]) -> list[dict]:
    return [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in records]


# ---------------------------------------------------------------------------------------------
# Templates and the label mask


OFFICIAL_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:")
OFFICIAL_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{}\n\n### Response:")


@pytest.mark.parametrize("instruction, input, output", [
    ("Reverse the word.", "stone", "enots"),
    ("What is the capital of France?", "", "Paris"),
    ("Summarize.", "   ", "Nothing to say: it is empty."),   # a blank input uses the template without input
    ("Repeat it.", "tiger\nwhale", "tiger whale\ntiger whale"),
])
def test_template_and_label_mask(tokenizer, instruction, input, output):
    data, report = tokenize_records([Record(instruction, input, output)], tokenizer, max_seq_len=512)
    tokens, labels = (t.tolist() for t in data[0])
    n_prompt = int(data.prompt_lens[0])
    prompt_text = OFFICIAL_WITH_INPUT.format(instruction, input) if input.strip() else \
        OFFICIAL_NO_INPUT.format(instruction)
    # the prompt positions are BOS + the official template, exactly what generation encodes
    assert tokens[0] == tokenizer.bos_id
    assert tokenizer.decode(tokens[1:n_prompt]) == prompt_text
    assert tokens[:n_prompt] == tokenizer.encode(prompt_text, bos=True, eos=False)
    # the official script's ids: prompt + output encoded as one string; the rest is the output and EOS
    assert tokens == tokenizer.encode(prompt_text + output, bos=True, eos=True)
    assert tokens[-1] == tokenizer.eos_id and tokenizer.decode(tokens[n_prompt:-1]) == output
    assert labels == expected_labels(tokens, n_prompt)
    targets = [t for t in labels if t != IGNORE_INDEX]
    assert targets == tokens[n_prompt:] and targets[-1] == tokenizer.eos_id
    assert report.num_targets == len(targets) == int(data.num_targets[0]) and not report.truncated


SEED_TASKS = [  # real-looking Alpaca records (the self-instruct seed tasks' style)
    ("Is the following sentence grammatically correct?", "She don't like apples.", "No. It should be \"She "
     "doesn't like apples.\""),
    ("Give three tips for staying healthy.", "", "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."),
    ("Classify the sentiment of the review.", "The river view was vivid and the piano noble.", "Positive"),
    ("Answer the question.", "Can a zebra swim?", "Yes, zebras can swim short distances."),
    ("Write a haiku about the ocean.", "", "\nWaves fold into foam\nthe tide keeps its slow promise\nstone "
     "remembers salt"),  # a response that starts with a newline: ":\n" is one piece, across the boundary
]


def test_official_tokenization_recipe(tokenizer):
    """The official script's rule, alpaca_finetuning_v1/finetuning.py: tokens = encode(prompt + output, bos, eos),
    its first len(encode(prompt, bos)) masked: by count, also where the prompt's tokens are not a prefix."""
    records = [Record(*task, index=i) for i, task in enumerate(SEED_TASKS)]
    data, report = tokenize_records(records, tokenizer, max_seq_len=512)
    for i, r in enumerate(records):
        tokens, labels = (t.tolist() for t in data[i])
        example = tokenizer.encode(r.prompt + r.output, bos=True, eos=True)
        n_prompt = len(tokenizer.encode(r.prompt, bos=True, eos=False))
        assert tokens == example and int(data.prompt_lens[i]) == n_prompt
        assert labels == [example[t + 1] if t >= n_prompt - 1 and t + 1 < len(example) else IGNORE_INDEX
                          for t in range(len(example))]
    # the response's first token is the whole string's ("Yes" glued to "Response:"), not encode(output)'s "▁Yes"
    tokens, _ = data[3]
    assert tokens[int(data.prompt_lens[3])] != tokenizer.encode(SEED_TASKS[3][2], bos=False, eos=False)[0]
    # the edge: encode(prompt) is not a prefix (":" and "\n" merge); masked by count all the same, and reported
    assert tokenizer.encode(records[4].prompt + "\n", bos=True, eos=False)[:int(data.prompt_lens[4])] != \
        tokenizer.encode(records[4].prompt, bos=True, eos=False)
    assert report.boundary_merged == [4] and "1 example(s) whose prompt's tokens are not a prefix" in report.summary()


def test_litgpt_tokenization(tokenizer):
    """tokenization="litgpt" (litgpt's SFTDataset): encode(prompt, bos) + encode(output, bos=False, eos=True), the
    prompt's tokens masked; the response's first token is encode(output)'s ("▁Yes"); an unknown rule is refused."""
    records = [Record(*task, index=i) for i, task in enumerate(SEED_TASKS)]
    data, report = tokenize_records(records, tokenizer, max_seq_len=512, tokenization="litgpt")
    for i, r in enumerate(records):
        tokens, labels = (t.tolist() for t in data[i])
        prompt = tokenizer.encode(r.prompt, bos=True, eos=False)
        example = prompt + tokenizer.encode(r.output, bos=False, eos=True)
        assert tokens == example and int(data.prompt_lens[i]) == len(prompt)
        assert labels == [example[t + 1] if t >= len(prompt) - 1 and t + 1 < len(example) else IGNORE_INDEX
                          for t in range(len(example))]
    assert report.boundary_merged == []
    official, _ = tokenize_records(records, tokenizer, max_seq_len=512)
    assert data[3][0].tolist() != official[3][0].tolist()  # "▁Yes" here, "Yes" glued to "Response:" there
    with pytest.raises(ValueError, match="tokenization must be one of 'official', 'litgpt', got 'hf'"):
        tokenize_records(records, tokenizer, tokenization="hf")


def test_labels_on_random_examples():
    data, examples, prompt_lens = random_dataset(seed=3)
    for i, (example, n_prompt) in enumerate(zip(examples, prompt_lens, strict=True)):
        tokens, labels = data[i]
        assert tokens.tolist() == example
        assert labels.tolist() == expected_labels(example, n_prompt)


def test_truncation_is_counted_and_reported(tokenizer, records, caplog):
    prompt_lens = [len(tokenizer.encode(r.prompt, bos=True, eos=False)) for r in records]
    full = [len(tokenizer.encode(r.prompt + r.output, bos=True, eos=True)) for r in records]
    max_seq_len = int(np.percentile(prompt_lens, 60))  # some prompts alone fill it, some outputs are cut
    with caplog.at_level(logging.WARNING, logger="llama_adapter_triton.train.data"):
        data, report = tokenize_records(records, tokenizer, max_seq_len=max_seq_len)
    dropped = [i for i, p in enumerate(prompt_lens) if p >= max_seq_len]
    truncated = [i for i, (p, f) in enumerate(zip(prompt_lens, full, strict=True)) if p < max_seq_len < f]
    assert dropped and truncated
    assert report.dropped == dropped and report.truncated == truncated
    assert report.tokens_truncated == sum(full[i] - max_seq_len for i in truncated)
    assert report.tokens_dropped == sum(full[i] for i in dropped)
    assert report.num_examples == len(data) == len(records) - len(dropped)
    assert report.longest == max(full)
    assert data.source_index.tolist() == [i for i in range(len(records)) if i not in dropped]
    assert int(data.lengths.max()) <= max_seq_len
    assert report.num_targets == int((data.labels != IGNORE_INDEX).sum())
    for j, i in enumerate(data.source_index.tolist()):
        tokens, labels = data[j]
        expected = tokenizer.encode(records[i].prompt + records[i].output, bos=True, eos=True)[:max_seq_len]
        assert tokens.tolist() == expected
        assert labels.tolist() == expected_labels(expected, prompt_lens[i])
    assert f"truncated {len(truncated)} example(s)" in caplog.text and f"dropped {len(dropped)}" in caplog.text


def test_no_warning_without_truncation(tokenizer, records, caplog):
    with caplog.at_level(logging.WARNING, logger="llama_adapter_triton.train.data"):
        _, report = tokenize_records(records, tokenizer, max_seq_len=4096)
    assert not report.truncated and not report.dropped and not caplog.records


def test_nothing_left_after_tokenization_is_an_error(tokenizer, records):
    with pytest.raises(DataError, match="no example left"):
        tokenize_records(records[:3], tokenizer, max_seq_len=8)


# ---------------------------------------------------------------------------------------------
# Records: JSON, JSONL, bad records


GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
BAD_RECORDS = [  # (record, field, words the message must have)
    (["not", "an", "object"], None, "is a JSON array, not an object"),
    ("text", None, "is a JSON string, not an object"),
    ({"input": "", "output": "x"}, "instruction", "is missing"),
    ({"instruction": "Do it."}, "output", "is missing"),
    ({"instruction": 3, "output": "x"}, "instruction", "is a JSON number, not a string"),
    ({"instruction": "Do it.", "output": None}, "output", "is a JSON null, not a string"),
    ({"instruction": "Do it.", "input": ["a"], "output": "x"}, "input", "is a JSON array, not a string"),
    ({"instruction": "Do it.", "output": ""}, "output", "is empty"),
    ({"instruction": "Do it.", "output": " \n"}, "output", "is empty"),
    ({"instruction": "", "output": "x"}, "instruction", "is empty"),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("bad, field, message", BAD_RECORDS)
def test_bad_record_error_names_index_and_field(tmp_path, suffix, bad, field, message):
    objects = [GOOD, GOOD, bad, GOOD]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        write_json(path, objects)
    else:
        path.write_text("\n".join(json.dumps(o) for o in objects) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    where = "record 2" + (" (line 3)" if suffix == ".jsonl" else "")
    expected = f"{where}: " + (f"field {field!r} " if field else "") + message
    assert expected in str(info.value) and "1 bad record(s) of 4" in str(info.value)
    assert [(p.index, p.field) for p in info.value.problems] == [(2, field)]

    records, report = load_records(path, on_bad_record="skip")
    assert [r.index for r in records] == [0, 1, 3] and report.skipped == [2]
    assert report.num_records == 4 and report.num_loaded == 3
    assert expected in report.summary() and "skipped 1 bad record(s)" in report.summary()


def test_invalid_jsonl_line_has_its_line_number(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": "x", "output": \n' + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"record 1 \(line 3\): is not valid JSON"):
        load_records(path)
    with caplog.at_level(logging.WARNING, logger="llama_adapter_triton.train.data"):
        records, report = load_records(path, on_bad_record="skip")
    assert [r.index for r in records] == [0, 2] and report.skipped == [1]
    assert "skipped 1 bad record(s)" in caplog.text and "line 3" in caplog.text


def test_skip_mode_counts_and_lists_the_first(tmp_path, records):
    objects = as_dicts(records[:40])
    bad_at = list(range(1, 40, 3))
    for i in bad_at:
        objects[i] = {"instruction": objects[i]["instruction"], "output": 7}
    path = write_json(tmp_path / "data.json", objects)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert f"{len(bad_at)} bad record(s) of 40" in str(info.value)
    assert f"... and {len(bad_at) - 10} more" in str(info.value)
    assert [p.index for p in info.value.problems] == bad_at
    kept, report = load_records(path, on_bad_record="skip")
    assert report.skipped == bad_at and len(kept) == 40 - len(bad_at)
    assert [r.index for r in kept] == [i for i in range(40) if i not in bad_at]
    assert all(r == Record(**o, index=i) for r, (i, o) in zip(kept, ((r.index, objects[r.index]) for r in kept),
                                                              strict=True))


def test_record_with_several_problems_lists_each(tmp_path):
    path = write_json(tmp_path / "data.json", [GOOD, {"instruction": "", "input": 1}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert [(p.index, p.field) for p in info.value.problems] == [(1, "instruction"), (1, "input"), (1, "output")]
    assert "1 bad record(s) of 2" in str(info.value)


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x", "output": "y"', "not valid JSON"),   # JSONL by content: one bad line
    ('[{"instruction": "x", "output": "y"}', "not valid JSON"),
    ('{"data": [1]}\n', "the top level is a JSON object; it must be a list of records, or lines of records"),
    ("", "the file is empty"),
    ("[]", "no usable records"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_records(path, on_bad_record="skip" if content.startswith('{"data"') else "error")


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_json(tmp_path / "data.json", [{"output": "x"}, 5])
    with pytest.raises(DataError, match="no usable records") as info:
        load_records(path, on_bad_record="skip")
    assert [p.index for p in info.value.problems] == [0, 1]


def test_top_level_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"instruction": "x", "output": "y"}')
    with pytest.raises(DataError, match="top level is a JSON object"):
        load_records(path, format="json")


def test_bad_arguments(tmp_path, tokenizer, records):
    path = write_json(tmp_path / "data.json", [GOOD])
    with pytest.raises(ValueError, match="on_bad_record"):
        load_records(path, on_bad_record="ignore")
    with pytest.raises(ValueError, match="format"):
        load_records(path, format="csv")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_records(records, tokenizer, max_seq_len=1)
    with pytest.raises(TypeError, match=r"records\[0\]"):
        tokenize_records([GOOD], tokenizer)
    with pytest.raises(TypeError, match="objects"):
        parse_records(GOOD)


def test_json_and_jsonl_give_the_same_records(tmp_path, records):
    objects = as_dicts(records)
    for o in objects[::5]:
        o["extra"] = {"ignored": True}   # other keys are ignored
    for o in objects[::7]:
        del o["input"]                   # input is optional
    from_json, _ = load_records(write_json(tmp_path / "a.json", objects))
    lines = [json.dumps(o) for o in objects]
    lines.insert(10, "   ")              # blank lines are not records
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_jsonl, report = load_records(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text("\n".join(lines), encoding="utf-8")   # JSONL named .json: by content
    from_content, content_report = load_records(tmp_path / "b.json")
    from_objects, _ = parse_records(objects)
    assert from_json == from_jsonl == from_content == from_objects
    assert [(r.instruction, r.input, r.output, r.index) for r in from_json] == \
        [(r.instruction, "" if i % 7 == 0 else r.input, r.output, i) for i, r in enumerate(records)]
    assert report.format == content_report.format == "jsonl" and report.num_records == len(records)


# ---------------------------------------------------------------------------------------------
# Eval split


def test_split_eval_is_seeded_and_disjoint():
    data, _, _ = random_dataset(seed=4, n=101)
    train, val = split_eval(data, 0.1, seed=5)
    assert len(val) == 10 and len(train) == 91
    ids_train, ids_val = train.source_index.tolist(), val.source_index.tolist()
    assert sorted(ids_train + ids_val) == list(range(101)) and not set(ids_train) & set(ids_val)
    assert ids_train == sorted(ids_train) and ids_val == sorted(ids_val)
    for part in (train, val):
        for j, i in enumerate(part.source_index.tolist()):
            assert all(torch.equal(a, b) for a, b in zip(part[j], data[i], strict=True))
    again_train, again_val = split_eval(data, 10, seed=5)
    assert again_val.source_index.tolist() == ids_val and again_train.source_index.tolist() == ids_train
    assert split_eval(data, 10, seed=6)[1].source_index.tolist() != ids_val
    assert len(split_eval(data, 0)[1]) == 0
    for bad in (101, -1, 1.0, 0.0, True, "5"):
        with pytest.raises(ValueError, match="eval_size"):
            split_eval(data, bad)


# ---------------------------------------------------------------------------------------------
# Packing


def reference_best_fit(lengths: np.ndarray, order: np.ndarray, budget: int) -> list[list[int]]:
    """Best fit written plainly: the open bin with the least room that still fits, lowest index on ties."""
    bins, free = [], []
    for i in order.tolist():
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            bins.append([])
            free.append(budget)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= int(lengths[i])
    return bins


def all_batches(loader, epoch: int) -> list[dict]:
    return [batch for step in loader.iter_epoch(epoch) for batch in step.batches]


@pytest.mark.parametrize("seed, budget", [(0, 60), (1, 64), (2, 97), (3, 256), (4, 1000)])
def test_packing(seed, budget):
    data, examples, prompt_lens = random_dataset(seed, max_len=60)
    loader = PackedLoader(data, budget, seed=seed)
    plan = loader.plan(epoch=2)
    assert [p.tolist() for p in plan] == reference_best_fit(data.lengths, loader.order(2), budget)
    assert sum(data.lengths[p].sum() <= budget // 2 for p in plan) <= 1   # any-fit: at most one bin half empty
    batches = all_batches(loader, epoch=2)
    seen = Counter()
    for batch in batches:
        tokens, labels, positions = batch["tokens"], batch["labels"], batch["positions"]
        cu = batch["cu_seqlens"]
        assert tokens.shape == labels.shape == positions.shape == (1, batch["num_tokens"])
        assert tokens.dtype == labels.dtype == positions.dtype == torch.int64 and cu.dtype == torch.int32
        assert batch["num_tokens"] <= budget and batch["num_real_tokens"] == batch["num_tokens"]
        assert cu[0] == 0 and cu[-1] == tokens.shape[1] and len(cu) == batch["num_seqs"] + 1
        lengths = cu.diff()
        assert batch["max_seqlen"] == int(lengths.max()) and bool((lengths > 0).all())
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            assert positions[0, a:b].tolist() == list(range(b - a))      # RoPE positions restart
            assert labels[0, b - 1] == IGNORE_INDEX                        # no target across the boundary
        for t in (labels[0] != IGNORE_INDEX).nonzero().flatten().tolist():
            assert labels[0, t] == tokens[0, t + 1]
            assert not (cu == t + 1).any()                                 # t + 1 is in t's sequence
        for i, (seq_tokens, seq_labels) in sequences(batch).items():
            assert seq_tokens == examples[i] and seq_labels == expected_labels(examples[i], prompt_lens[i])
        assert batch["num_targets"] == int((labels != IGNORE_INDEX).sum())
        seen.update(batch["example_ids"].tolist())
    assert seen == Counter(range(len(data)))   # every example exactly once per epoch


def test_packing_is_deterministic_and_reshuffled_each_epoch():
    data, _, _ = random_dataset(seed=5)
    a, b = PackedLoader(data, 200, seed=7), PackedLoader(data, 200, seed=7)
    plan = lambda loader, epoch: [p.tolist() for p in loader.plan(epoch)]
    assert plan(a, 0) == plan(b, 0) and plan(a, 3) == plan(b, 3)
    assert plan(a, 0) != plan(a, 1) and plan(a, 0) != plan(PackedLoader(data, 200, seed=8), 0)
    ordered = PackedLoader(data, 200, shuffle=False)
    assert plan(ordered, 0) == plan(ordered, 5) == reference_best_fit(data.lengths, np.arange(len(data)), 200)


def test_example_over_budget_is_an_error_at_setup(tokenizer, records):
    data, _ = tokenize_records(records, tokenizer, max_seq_len=4096)
    longest = int(data.lengths.max())
    with pytest.raises(ValueError, match=f"token_budget={longest - 1} is smaller than example .* of {longest} tokens"):
        PackedLoader(data, longest - 1)
    PackedLoader(data, longest)
    truncated, _ = tokenize_records(records, tokenizer, max_seq_len=longest - 1)
    PackedLoader(truncated, longest - 1)   # truncation to max_seq_len <= token_budget makes it fit
    with pytest.raises(ValueError, match="pad_to"):
        PaddedLoader(data, 4, pad_to=longest - 1)
    loader = PackedLoader(data, longest)
    with pytest.raises(ValueError, match="over token_budget"):
        loader.collate(np.argsort(-data.lengths)[:2])


# ---------------------------------------------------------------------------------------------
# Padded mode, and the same (token, target) pairs as packing


@pytest.mark.parametrize("pad_to", [64, "longest"])
def test_padded_batches(pad_to):
    data, examples, prompt_lens = random_dataset(seed=6, max_len=60)
    loader = PaddedLoader(data, 8, pad_to=pad_to, seed=1)
    seen = Counter()
    for batch in all_batches(loader, epoch=0):
        tokens, labels, lengths = batch["tokens"], batch["labels"], batch["lengths"]
        row = 64 if pad_to == 64 else int(lengths.max())
        assert tokens.shape == labels.shape == batch["positions"].shape == (batch["num_seqs"], row)
        assert batch["num_tokens"] == tokens.numel() and batch["num_real_tokens"] == int(lengths.sum())
        assert batch["positions"].tolist() == [list(range(row))] * batch["num_seqs"]
        pad = torch.arange(row)[None] >= lengths[:, None]
        assert bool((tokens[pad] == data.pad_id).all()) and bool((labels[pad] == IGNORE_INDEX).all())
        for i, (seq_tokens, seq_labels) in sequences(batch).items():
            assert seq_tokens == examples[i] and seq_labels == expected_labels(examples[i], prompt_lens[i])
        assert batch["num_targets"] == int((labels != IGNORE_INDEX).sum())
        seen.update(batch["example_ids"].tolist())
    assert seen == Counter(range(len(data)))
    assert len(loader.plan(0)) == -(-len(data) // 8)


def triples(batch: dict) -> Counter:
    """(position in its sequence, token, target) over a batch, padding left out."""
    keep = torch.ones_like(batch["tokens"], dtype=torch.bool)
    if "lengths" in batch:
        keep = torch.arange(batch["tokens"].shape[1])[None] < batch["lengths"][:, None]
    return Counter(zip(batch["positions"][keep].tolist(), batch["tokens"][keep].tolist(),
                       batch["labels"][keep].tolist(), strict=True))


def test_packed_and_padded_hold_the_same_token_target_pairs(tokenizer, records):
    data, _ = tokenize_records(records, tokenizer, max_seq_len=256)
    packed, padded = PackedLoader(data, 1024, seed=3), PaddedLoader(data, 6, pad_to=256, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):   # the same examples collated both ways
        ids = rng.choice(len(data), size=5, replace=False)
        a, b = packed.collate(ids), padded.collate(ids)
        assert triples(a) == triples(b) and a["num_targets"] == b["num_targets"]
        assert sequences(a) == sequences(b)
        assert a["num_real_tokens"] == b["num_real_tokens"] == a["num_tokens"] < b["num_tokens"]
    # and over a whole epoch, whatever the grouping
    epoch_a = sum((triples(x) for x in all_batches(packed, 1)), Counter())
    epoch_b = sum((triples(x) for x in all_batches(padded, 1)), Counter())
    assert epoch_a == epoch_b


# ---------------------------------------------------------------------------------------------
# Resuming and several processes


def same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("make", [lambda d: PackedLoader(d, 150, micro_batches_per_step=3, seed=2),
                                  lambda d: PaddedLoader(d, 5, pad_to="longest", micro_batches_per_step=2, seed=2),
                                  lambda d: PackedLoader(d, 150, micro_batches_per_step=4, rank=1, world_size=2)])
def test_resume_yields_exactly_the_remaining_steps(make):
    data, _, _ = random_dataset(seed=8)
    for epoch in (0, 3):
        full = list(make(data).iter_epoch(epoch))
        assert len(full) == make(data).num_steps(epoch) > 3
        for start in (0, 1, len(full) - 1, len(full)):
            resumed = list(make(data).iter_epoch(epoch, start_step=start))   # a fresh loader, as after a restart
            assert [s.index for s in resumed] == list(range(start, len(full)))
            for s, t in zip(resumed, full[start:], strict=True):
                assert (s.epoch, s.num_targets, s.num_tokens, s.num_real_tokens) == \
                       (t.epoch, t.num_targets, t.num_tokens, t.num_real_tokens)
                assert len(s.batches) == len(t.batches)
                assert all(same_batch(a, b) for a, b in zip(s.batches, t.batches, strict=True))
    with pytest.raises(ValueError, match="start_step"):
        make(data).iter_epoch(epoch, start_step=len(full) + 1)   # at the call, not at the first step


@pytest.mark.parametrize("mode", ["packed", "padded"])
@pytest.mark.parametrize("world_size, micro_batches_per_step", [(2, 2), (2, 4), (3, 3), (4, 8)])
def test_distributed_shares_are_disjoint_and_make_the_single_process_step(mode, world_size, micro_batches_per_step):
    data, _, _ = random_dataset(seed=9, n=97)
    make = lambda rank, world: (
        PackedLoader(data, 120, micro_batches_per_step=micro_batches_per_step, seed=4, rank=rank, world_size=world)
        if mode == "packed" else
        PaddedLoader(data, 3, pad_to=64, micro_batches_per_step=micro_batches_per_step, seed=4, rank=rank,
                     world_size=world))
    single = list(make(0, 1).iter_epoch(1))
    ranks = [list(make(r, world_size).iter_epoch(1)) for r in range(world_size)]
    assert all(len(steps) == len(single) for steps in ranks)
    n_fillers = 0
    for index, step in enumerate(single):
        expected = Counter(i for b in step.batches for i in b["example_ids"].tolist())
        shares = [steps[index].batches for steps in ranks]
        assert all(len(share) == micro_batches_per_step // world_size for share in shares)   # lockstep
        union = Counter(i for share in shares for b in share for i in b["example_ids"].tolist())
        assert union == expected and max(union.values()) == 1                     # disjoint, same examples
        got = sum((triples(b) for share in shares for b in share if not b["filler"]), Counter())
        assert got == sum((triples(b) for b in step.batches), Counter())          # same (token, target) pairs
        for steps in ranks:
            s = steps[index]
            assert (s.num_examples, s.num_tokens, s.num_real_tokens, s.num_targets) == \
                   (step.num_examples, step.num_tokens, step.num_real_tokens, step.num_targets)
        assert step.num_targets == sum(b["num_targets"] for b in step.batches)
        assert step.num_examples == sum(expected.values())
        fillers = [b for share in shares for b in share if b["filler"]]
        assert all(b["num_targets"] == 0 and bool((b["labels"] == IGNORE_INDEX).all()) for b in fillers)
        assert not fillers or index == len(single) - 1                            # only in a short last step
        n_fillers += len(fillers)
    assert n_fillers == -len(make(0, 1).plan(1)) % micro_batches_per_step


def test_loader_arguments():
    data, _, _ = random_dataset(seed=10)
    with pytest.raises(ValueError, match="micro_batches_per_step"):
        PackedLoader(data, 100, micro_batches_per_step=3, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(data, 100, rank=2, world_size=2)
    with pytest.raises(ValueError, match="token_budget"):
        PackedLoader(data, 0)
    with pytest.raises(ValueError, match="batch_size"):
        PaddedLoader(data, 0)
    with pytest.raises(ValueError, match="epoch"):
        PackedLoader(data, 100).plan(-1)
    with pytest.raises(ValueError, match="no examples"):
        PackedLoader(data.subset([]), 100)
    with pytest.raises(TypeError, match="data"):
        PackedLoader([[1, 2]], 100)
    with pytest.raises(ValueError, match="prompt_lens"):
        TokenizedDataset.from_examples([[1, 5, 2]], [3], pad_id=0)   # no target left


# ---------------------------------------------------------------------------------------------
# The demo's instruction set


CHECKS = [  # (instruction pattern, how the answer follows from the instruction's groups and the input)
    (r"What is the capital of (\w+)\?", None),
    (r"Name the capital city of this country\.", None),
    (r"What is the opposite of (\w+)\?", None),
    (r"Give the opposite of the word\.", None),
    (r"What is (\d+) plus (\d+)\?", lambda g, x: str(int(g[0]) + int(g[1]))),
    (r"Add the two numbers\.", lambda g, x: str(sum(int(n) for n in x.split(" + ")))),
    (r"What is (\d+) minus (\d+)\?", lambda g, x: str(int(g[0]) - int(g[1]))),
    (r"Subtract the second number from the first\.", lambda g, x: str(int(x.split(" - ")[0]) - int(x.split(" - ")[1]))),
    (r"Which letter comes after ([a-y])\?", lambda g, x: chr(ord(g[0]) + 1)),
    (r"Give the next letter of the alphabet\.", lambda g, x: chr(ord(x) + 1)),
    (r"What number comes after (\d+)\?", lambda g, x: str(int(g[0]) + 1)),
    (r"Give the next number\.", lambda g, x: str(int(x) + 1)),
    (r"Write the word in capital letters\.", lambda g, x: x.upper()),
    (r"Write the word in small letters\.", lambda g, x: x.lower()),
    (r"Spell (\w+) backwards\.", lambda g, x: g[0][::-1]),
    (r"Reverse the letters of the word\.", lambda g, x: x[::-1]),
    (r"Repeat the word (\w+) (\d+) times\.", lambda g, x: " ".join([g[0]] * int(g[1]))),
    (r"Repeat the word three times\.", lambda g, x: " ".join([x] * 3)),
]


def test_demo_dataset(tokenizer):
    records, report = load_records(DEMO)
    assert report.num_records == len(records) and not report.skipped and not report.problems
    assert 300 <= len(records) <= 1000
    with_input = sum(bool(r.input) for r in records)
    assert 0.3 < with_input / len(records) < 0.7
    assert len({(r.instruction, r.input) for r in records}) == len(records)
    answers: dict[tuple[str, str], set[str]] = {}   # lookup tasks: one answer per question, both forms agree
    for r in records:
        matches = [(re.fullmatch(p, r.instruction), check) for p, check in CHECKS]
        (m, check), = [(m, c) for m, c in matches if m]
        assert bool(r.input) == ("(" not in m.re.pattern), r   # a task's form either names the word or takes it
        assert len(r.output.split()) <= 4 and r.output == r.output.strip(), r
        if check is not None:
            assert r.output == check(m.groups(), r.input), r
        else:
            key = "capital" if "capital" in r.instruction else "opposite"
            answers.setdefault((key, m.groups()[0] if m.groups() else r.input), set()).add(r.output)
    assert all(len(v) == 1 for v in answers.values())
    opposites = {(word, next(iter(v))) for (key, word), v in answers.items() if key == "opposite"}
    assert all((b, a) in opposites for a, b in opposites)   # the antonym list is symmetric
    data, tok_report = tokenize_records(records, tokenizer, max_seq_len=128)
    assert not tok_report.truncated and not tok_report.dropped and len(data) == len(records)


def test_file_level_errors_say_what_the_file_must_be(tmp_path):
    """A dict at the top level was read as JSON Lines ("field 'instruction' is missing", "N bad records"); a file
    that is not UTF-8 raised a bare UnicodeDecodeError."""
    from llama_adapter_triton.model.cli import cli_message

    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [GOOD, GOOD]}, indent=2))  # pretty-printed: many lines, none a record
    with pytest.raises(DataError, match=r"data\.json: the top level is a JSON object; it must be a list of records, "
                                        r"or lines of records \(JSON Lines"):
        load_records(path, on_bad_record="skip")
    path.write_text(json.dumps(GOOD))  # one record alone is not a list
    with pytest.raises(DataError, match="the top level is a JSON object"):
        load_records(path)
    (tmp_path / "one.jsonl").write_text(json.dumps(GOOD))  # but it is one line of JSON Lines
    assert len(load_records(tmp_path / "one.jsonl")[0]) == 1

    text = json.dumps([GOOD, {**GOOD, "output": "café"}], indent=1, ensure_ascii=False).encode("utf-8")
    bad = text.replace("café".encode(), "caf\xe9".encode("latin-1"))
    path.write_bytes(bad)
    offset = bad.index(b"\xe9")
    line = bad.count(b"\n", 0, offset) + 1
    with pytest.raises(DataError, match=rf"data\.json: not UTF-8 text: byte {offset} \(0xe9, line {line}\) cannot "
                                        "be decoded"):
        load_records(path)
    path.write_bytes(b"\xef\xbb\xbf" + text)  # a BOM is fine
    assert load_records(path)[0][1].output == "café"

    path.write_text(json.dumps([GOOD, {"instruction": "x"}]))
    with pytest.raises(DataError) as info:
        load_records(path)
    assert "pass on_bad_record='skip' to skip them" in str(info.value)  # Python callers read the argument
    assert "pass --on-bad-record skip to skip them" in cli_message(info.value)  # command-line users the flag


@pytest.mark.parametrize("make", [lambda d, k: PackedLoader(d, 120, micro_batches_per_step=3, seed=1, kinds=k),
                                  lambda d, k: PaddedLoader(d, 3, pad_to=60, micro_batches_per_step=2, seed=1,
                                                            kinds=k)], ids=["packed", "padded"])
def test_kinds_keep_each_micro_batch_to_one_kind(make):
    """Joint training's loaders: every micro-batch of one kind (its batch["kind"]), every example once, and each
    step's targets counted per kind; without kinds the plan is the one of before."""
    data, _, _ = random_dataset(5, max_len=60)
    kinds = np.random.default_rng(0).integers(0, 2, len(data))
    loader, seen = make(data, kinds), Counter()
    for step in loader.iter_epoch(1):
        per_kind = Counter()
        for batch in step.batches:
            ids = batch["example_ids"].numpy()
            assert set(kinds[ids].tolist()) == {batch["kind"]}
            per_kind[batch["kind"]] += batch["num_targets"]
            seen.update(ids.tolist())
        assert step.kind_targets == dict(per_kind) and sum(per_kind.values()) == step.num_targets
    assert seen == Counter(range(len(data)))
    assert [p.tolist() for p in make(data, None).plan(1)] != [p.tolist() for p in loader.plan(1)]
    with pytest.raises(ValueError, match=r"kinds must hold one int >= 0 per example"):
        make(data, kinds[:-1])


def test_caption_and_conversation_records(tokenizer):
    """LLaMA-Adapter V2's data: image-text pairs as the official code's caption instruction; conversations as their
    first exchange (alpaca, the official multi-modal code) or one example per reply (chat, the official chat
    model's template); bad ones named."""
    from llama_adapter_triton.model.prompt import CAPTION_INSTRUCTION, chat_prompt

    chat = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."},
                              {"from": "user", "value": "And you?"}, {"from": "assistant", "value": "Fine."}],
            "image": "a.png"}
    objects = [{"image": "cat.png", "caption": "A cat on a mat."}, chat, {"instruction": "Add 1 and 2.", "output": "3"}]
    records, report = parse_records(objects)
    assert records[0] == Record(CAPTION_INSTRUCTION, "", "A cat on a mat.", 0, "cat.png")
    assert records[0].prompt == alpaca_prompt("Generate caption of this image")
    assert records[1] == Record("Hi?", "", "Hello.", 1, "a.png") and len(records) == 3
    records, report = parse_records(objects, template="chat")
    assert [r.output for r in records] == ["A cat on a mat.", "Hello.", "Fine.", "3"]
    assert "4 examples" in report.summary()
    assert records[2].prompt == chat_prompt("And you?", [("Hi?", "Hello.")]) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: Hi?###Assistant: Hello.###Human: And you?"
        "###Assistant:")
    data, _ = tokenize_records(records, tokenizer, max_seq_len=512)
    assert data.source_index.tolist() == [0, 1, 1, 2]
    bad = [{"caption": "no image"}, {"conversations": [{"from": "gpt", "value": "x"}]},
           {"conversations": [{"from": "human", "value": "q"}]}, {"instruction": "i", "output": "o", "caption": "c"}]
    with pytest.raises(DataError) as e:
        parse_records(bad)
    assert [str(p) for p in e.value.problems] == [
        "record 0: field 'image' is missing: a caption record is an image-text pair",
        "record 1: field 'conversations' turn 0 is from 'gpt'; turns alternate, human first (from: human / user)",
        "record 2: field 'conversations' has no reply: a human turn needs an assistant turn",
        "record 3: has both 'instruction' and 'caption': a record is an instruction, an image caption or a "
        "conversation"]
