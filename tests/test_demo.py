"""train/demo.py: the smoke version runs every stage end to end, writes its files, and reuses its base."""

from __future__ import annotations

import csv
import json

import torch
from safetensors.torch import load_file

from llama_adapter_triton import load_adapter, load_checkpoint, read_adapter_config
from llama_adapter_triton.train.demo import DEMO_DATA, facts, main


def test_facts_state_what_the_demo_asks():
    """Every answer of demo.json is the answer of some pre-training fact (the base can know it)."""
    text = facts()
    assert len(text) == len(set(text)) and not any("###" in t or "Instruction" in t for t in text)
    answers = {t.rsplit(" A: ", 1)[1] for t in text if t.startswith("Q: ")}
    missing = [r["output"] for r in json.loads(DEMO_DATA.read_text()) if r["output"] not in answers]
    assert not missing, missing[:5]


def test_demo_smoke_runs_end_to_end_and_keeps_earlier_results(tmp_path, capsys):
    out, base = tmp_path / "demo", tmp_path / "demo-base"
    argv = ["--smoke", "--out", str(out), "--base", str(base), "--device", "cpu"]
    main(argv)
    printed = capsys.readouterr().out
    assert "not a real LLaMA" in printed and "pre-trained in" in printed and "Exactly right:" in printed
    for name in ("adapter.safetensors", "log.csv", "loss.png"):
        assert (out / name).is_file(), name
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"step", "loss"} <= rows[0].keys() and all(float(r["loss"]) > 0 for r in rows)
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "demo-base.json", "model.safetensors",
                                                      "tokenizer.model"]
    model = load_checkpoint(base, adapter=read_adapter_config(out / "adapter.safetensors"))
    load_adapter(model, out / "adapter.safetensors")

    first = load_file(out / "adapter.safetensors")
    main(argv)  # again: the base is reused, the first run's results are moved aside, not overwritten
    printed = capsys.readouterr().out
    assert f"base: reusing {base}/" in printed and "held an earlier run: moved it to" in printed
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("demo-") and p != base]
    assert len(moved) == 1
    for again in (load_file(moved[0] / "adapter.safetensors"), load_file(out / "adapter.safetensors")):
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)  # same seed
