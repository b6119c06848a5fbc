"""train/scienceqa.py: ScienceQA's files to records, answers parsed and scored by its categories, evaluation of a
multi-modal adapter (a tiny random model and CLIP: the machinery, not the accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_utils import set_adapter_
from PIL import Image
from test_visual import WIDTH, checkpoint, clip  # noqa: F401  (fixtures)

from llama_adapter_triton import AdapterConfig, load_checkpoint, save_adapter
from llama_adapter_triton.train.data import load_records
from llama_adapter_triton.train.scienceqa import (
    EvalArgs,
    ScienceQAError,
    accuracy_table,
    categories,
    convert,
    evaluate,
    main,
    parse_answer,
)

PROBLEMS = {
    "1": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 1, "hint": "",
          "image": "image.png", "subject": "natural science", "grade": "grade2", "split": "train",
          "lecture": "Animals differ.", "solution": "It barks."},
    "2": {"question": "Which word comes first in the dictionary?", "choices": ["apple", "zebra", "mango"],
          "answer": 0, "hint": "Think of the alphabet.", "image": None, "subject": "language science",
          "grade": "grade8", "split": "train", "lecture": "", "solution": ""},
    "3": {"question": "Which is a state?", "choices": ["Ohio", "Paris"], "answer": 0, "hint": "A map.",
          "image": "image.png", "subject": "social science", "grade": "grade5", "split": "test",
          "lecture": "", "solution": ""},
    "4": {"question": "Is ice cold?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
          "subject": "natural science", "grade": "grade11", "split": "test", "lecture": "", "solution": ""},
    "5": {"question": "Which colour is the sky?", "choices": ["green", "blue"], "answer": 1, "hint": "",
          "image": "image.png", "subject": "natural science", "grade": "grade1", "split": "test",
          "lecture": "", "solution": ""},
}


@pytest.fixture
def sqa(tmp_path) -> Path:
    """ScienceQA's layout: problems.json, pid_splits.json, images/<split>/<id>/image.png."""
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1", "2"], "test": ["3", "4", "5"],
                                                      "minitest": ["5"]}))
    for pid, p in PROBLEMS.items():
        if p["image"]:
            folder = root / "images" / p["split"] / pid
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 40), (int(pid) * 40, 100, 200)).save(folder / "image.png")
    return root


def test_convert_writes_records_train_finetune_reads(sqa, tmp_path):
    out = tmp_path / "sqa" / "train.json"
    assert convert(sqa / "problems.json", "train", sqa / "images", out, pid_splits_file=sqa / "pid_splits.json") \
        == (out, 2, 1)
    records = json.loads(out.read_text())
    assert records[0]["instruction"] == "Which animal is shown?\nOptions: (A) cat (B) dog"
    assert records[0]["input"] == "" and records[0]["output"] == "The answer is B."
    assert (out.parent / records[0]["image"]).resolve() == (sqa / "images/train/1/image.png").resolve()
    assert records[1]["input"] == "Context: Think of the alphabet." and records[1]["image"] is None
    assert (records[1]["answer"], records[1]["n_choices"], records[1]["has_text"]) == ("A", 3, True)
    loaded, _ = load_records(out)  # the extra keys are ignored; the image is kept as written
    assert loaded[0].image == records[0]["image"] and loaded[1].image is None

    by_problem = tmp_path / "sqa" / "by-problem.json"
    convert(sqa / "problems.json", "train", sqa / "images", by_problem)  # the split from each problem's "split"
    assert json.loads(by_problem.read_text()) == records
    with pytest.raises(FileExistsError):
        convert(sqa / "problems.json", "train", sqa / "images", out)
    # minitest: images live under the problem's own split (test/)
    mini = tmp_path / "mini.json"
    convert(sqa / "problems.json", "minitest", sqa / "images", mini, pid_splits_file=sqa / "pid_splits.json")
    assert (mini.parent / json.loads(mini.read_text())[0]["image"]).resolve() == \
        (sqa / "images/test/5/image.png").resolve()
    # with --explain the lecture and solution come first
    explained = tmp_path / "explained.json"
    convert(sqa / "problems.json", "train", sqa / "images", explained, explain=True)
    assert json.loads(explained.read_text())[0]["output"] == "Animals differ. It barks. The answer is B."


def test_convert_errors(sqa, tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(ScienceQAError, match="has no split 'dev'; it has minitest, test, train"):
        convert(sqa / "problems.json", "dev", sqa / "images", out, pid_splits_file=sqa / "pid_splits.json")
    with pytest.raises(ScienceQAError, match=r"no problem has split 'dev'; the splits are \['test', 'train'\]"):
        convert(sqa / "problems.json", "dev", sqa / "images", out)
    with pytest.raises(ScienceQAError, match=r"2 image file\(s\) of split 'test' do not exist"):
        convert(sqa / "problems.json", "test", tmp_path, out)
    bad = dict(PROBLEMS, **{"4": {**PROBLEMS["4"], "answer": 2}})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ScienceQAError, match="problem '4': answer 2 is not the index of one of its 2 choices"):
        convert(tmp_path / "bad.json", "test", sqa / "images", out)
    assert not out.exists()
    assert main_exit(["convert", "--problems", str(tmp_path / "nope.json"), "--split", "test", "--images",
                      str(sqa), "--out", str(out)]) == 1


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_answers_and_categories():
    assert parse_answer("The answer is B.", 2) == "B"
    assert parse_answer("Because ... The answer is (A).", 3) == "A"
    assert parse_answer("The answer is A. No wait, the answer is C. The answer is C", 3) == "C"  # the last one
    assert parse_answer("The answer is D.", 3) is None  # not one of the choices
    assert parse_answer("B", 2) is None and parse_answer("", 2) is None
    record = {"subject": "social science", "grade": "grade7", "has_text": True, "has_image": True}
    assert categories(record) == ["SOC", "TXT", "IMG", "G7-12"]
    assert categories({**record, "has_text": False, "has_image": False, "grade": "grade6"}) == ["SOC", "NO", "G1-6"]
    table = accuracy_table([{**record, "correct": True}, {**record, "subject": "natural science", "correct": False}])
    assert table["Avg"] == (1, 2) and table["SOC"] == (1, 1) and table["NAT"] == (0, 1) and table["NO"] == (0, 0)


def test_evaluate_a_multimodal_adapter(sqa, checkpoint, clip, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "test.json"
    convert(sqa / "problems.json", "test", sqa / "images", data, pid_splits_file=sqa / "pid_splits.json")
    model = load_checkpoint(checkpoint, adapter=AdapterConfig(adapter_len=4, adapter_layers=1, visual_dim=2 * WIDTH,
                                                              visual_hidden=16, clip_layers=(2, 4)))
    adapter = save_adapter(set_adapter_(model), tmp_path / "mm.safetensors")
    common = dict(checkpoint=checkpoint, data=data, adapter=adapter, clip=clip, max_new_tokens=6, device="cpu")
    one = evaluate(EvalArgs(out=tmp_path / "one.jsonl", batch_size=1, **common))
    batched = evaluate(EvalArgs(out=tmp_path / "three.jsonl", batch_size=3, **common))
    rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["3", "4", "5"]
    # a batch of rows with and without images generates what each row generates alone
    assert rows == [json.loads(line) for line in (tmp_path / "three.jsonl").read_text().splitlines()]
    assert one == {**batched, "accuracy": one["accuracy"], "counts": one["counts"]}
    for r in rows:
        assert r["correct"] == (r["predicted"] == r["answer"])
    assert one["counts"]["Avg"] == [sum(r["correct"] for r in rows), 3] and one["counts"]["IMG"][1] == 2
    assert json.loads((tmp_path / "one.jsonl.summary.json").read_text()) == one
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate(EvalArgs(out=tmp_path / "one.jsonl", **common))
    with pytest.raises(ScienceQAError, match="give --clip"):
        evaluate(EvalArgs(out=tmp_path / "x.jsonl", **{**common, "clip": None}))
    assert main_exit(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out",
                      str(tmp_path / "y.jsonl"), "--batch-size", "0"]) == 2
    assert "--batch-size must be an integer >= 1" in capsys.readouterr().err

    # files that cannot be used: one line naming them, exit status 1, no traceback
    (tmp_path / "junk.safetensors").write_bytes(b"not an adapter")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{ not json")
    base = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "z.jsonl"),
            "--device", "cpu"]
    for extra, named in ((["--adapter", str(tmp_path / "junk.safetensors")], "junk.safetensors"),
                         (["--adapter", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
                         (["--tokenizer", str(tmp_path / "tok")], "tokenizer.json")):
        assert main_exit([*base, *extra]) == 1, extra
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        assert main_exit([*base[:-2], "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA GPU is available" in capsys.readouterr().err


def test_convert_says_when_train_finetune_needs_allow_external_files(sqa, tmp_path, capsys):
    """Records beside the images name them inside the default --image-root; elsewhere they lead out of it, which
    train.finetune refuses without --allow-external-files: convert says so."""
    common = ["convert", "--problems", str(sqa / "problems.json"), "--split", "train", "--images", str(sqa / "images")]
    main([*common, "--out", str(sqa / "train.json")])
    assert "--allow-external-files" not in capsys.readouterr().out
    main([*common, "--out", str(tmp_path / "sqa" / "train.json")])
    assert "they lead out of it, to --images: llama-adapter finetune reads them only with --allow-external-files" in \
        capsys.readouterr().out
