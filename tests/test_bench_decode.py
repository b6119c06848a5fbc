"""bench/bench_decode.py: the smoke configuration end to end under pytest-benchmark (each provider's cached logits
checked against a full recompute, then generation timed; CSV rows, plot and summary in a temporary folder, never in
bench/results/); wrong providers stop the benchmark before anything is timed; bad command lines name the argument."""

from __future__ import annotations

import contextlib

import pytest
import torch
from bench_utils import (
    ON_CUDA,
    assert_names_the_argument,
    assert_stops_before_timing,
    gpu_only,
    gpu_rows,
    index,
    raw_gate,
    results_snapshot,
)

from llama_adapter_triton.bench import bench_decode as bd
from llama_adapter_triton.bench import common
from llama_adapter_triton.model.llama import KVCache


def test_smoke_run_checks_times_and_writes_rows(benchmark, tmp_path, capsys):
    before = results_snapshot()
    rc = benchmark.pedantic(bd.main, args=(["--smoke", "--out", str(tmp_path)],), rounds=1, iterations=1)
    assert rc == 0
    if not ON_CUDA:
        assert "CPU numbers mean nothing for the GPU" in capsys.readouterr().out
    idx = index(common.read_rows(tmp_path / "decode.csv"))
    check_shape = "smoke-K4-L1-bf16-check-b2-p8-c3"
    for prov in bd.PROVIDERS:
        assert 0 <= float(idx[(prov, "check", check_shape, "max_err_over_tol")]) <= 1
        assert idx[(prov, "check", check_shape, "checked")] == "logits"
        for batch in (1, 2):
            shape = f"smoke-K4-L1-bf16-b{batch}-p8-n4"
            key = lambda metric: (prov, "generate", shape, metric)  # noqa: B023
            med, p20, p80 = (float(idx[key(m)]) for m in ("decode_step_median", "decode_step_p20", "decode_step_p80"))
            assert 0 < p20 <= med <= p80
            prefill = float(idx[key("prefill_ms")])
            assert float(idx[key("prefill_tokens_per_s")]) == pytest.approx(batch * 8 / prefill * 1e3)
            assert float(idx[key("decode_tokens_per_s")]) > 0 and (key("peak_mem") in idx) == ON_CUDA
            assert idx[(prov, "all", shape, "attention")]
    assert "zero_init_attention_ref" in idx[("eager", "all", "smoke-K4-L1-bf16-b1-p8-n4", "attention")]
    assert len(list(tmp_path.glob("decode_*.png"))) == len(list(tmp_path.glob("decode_*.md"))) == 1
    assert results_snapshot() == before  # a smoke run never writes into bench/results/


def test_ragged_prompts_are_left_padded_and_timed(tmp_path):
    assert bd.main(["--smoke", "--out", str(tmp_path), "--batch-sizes", "3", "--ragged", "yes"]) == 0
    idx = index(common.read_rows(tmp_path / "decode.csv"))
    for prov in bd.PROVIDERS:
        assert float(idx[(prov, "generate", "smoke-K4-L1-bf16-b3-p8-ragged-n4", "decode_tokens_per_s")]) > 0
    prompts = bd.ragged_prompts(64, 8, 100, seed=0)
    assert {len(p) for p in prompts} == {4, 5, 6, 7, 8}  # lengths from [prompt_len / 2, prompt_len]
    assert bd.check_left_pad(3, 8) == [0, 2, 0]


@contextlib.contextmanager
def _cache_misses_the_newest_key(model):
    """A KV cache off by one: a decode step sees the key before its own in place of its own."""
    update = KVCache.update

    def stale(self, input_pos, k, v):
        keys, values = update(self, input_pos, k, v)
        if k.shape[1] != 1:
            return keys, values
        return tuple(torch.cat([x[:, :-1], x[:, -2:-1]], dim=1) for x in (keys, values))

    KVCache.update = stale
    try:
        yield
    finally:
        KVCache.update = update


@contextlib.contextmanager
def _one_pad_key_seen(model):
    """Left padding off by one in the adapted layers: each padded row attends to its last pad key."""
    import llama_adapter_triton.model.adapter as adapter

    op = adapter.zero_init_attention

    def off_by_one(*args, leftpad_k=None, **kwargs):
        return op(*args, leftpad_k=None if leftpad_k is None else (leftpad_k - 1).clamp(min=0), **kwargs)

    adapter.zero_init_attention = off_by_one
    try:
        yield
    finally:
        adapter.zero_init_attention = op


@pytest.mark.parametrize("wrong, patch", [("stale_cache", _cache_misses_the_newest_key), ("raw_gate", raw_gate),
                                          ("pad_seen", _one_pad_key_seen)])
def test_wrong_provider_fails_loudly_before_anything_is_timed(wrong, patch, tmp_path, capsys):
    providers = {"eager": bd.PROVIDERS["eager"], wrong: bd.Provider(wrong, "fused", patch)}
    argv = ["--smoke", "--out", str(tmp_path), "--providers", f"eager,{wrong}", "--batch-sizes", "1"]
    err, rows = assert_stops_before_timing(bd.main, argv, providers, wrong, tmp_path, "decode", capsys)
    assert "logits: max abs error" in err
    assert not any(r["mode"] == "generate" for r in rows)  # every check comes before any timing


@pytest.mark.parametrize("argv, flag", [
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--providers", "fused,flash"], "--providers"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--check-tokens", "1"], "--check-tokens"),
    (["--prompt-len", "600"], "--new-tokens"),  # past the smoke model's 512-token context
    (["--models", "gpt2"], "--models"),
    (["--ragged", "maybe"], "--ragged"),
    (["--adapter-layers", "5"], "--adapter-layers"),
    (["--out", str(common.RESULTS_DIR / "smoke")], "--out"),
])
def test_bad_command_line_names_the_argument(argv, flag, capsys):
    assert_names_the_argument(bd.main, argv, flag, capsys)


@gpu_only
def test_gpu_small_run_checks_and_times_every_provider(tmp_path):
    idx = gpu_rows(bd.main, tmp_path, "decode", [
        "--models", "tiny", "--adapter-layers", "3", "--batch-sizes", "1,4",
        "--prompt-len", "32", "--new-tokens", "16", "--warmup-tokens", "4"])
    for prov in bd.PROVIDERS:
        assert float(idx[(prov, "check", "tiny-K10-L3-bf16-check-b2-p32-c8", "max_err_over_tol")]) <= 1
        for batch in (1, 4):
            shape = f"tiny-K10-L3-bf16-b{batch}-p32-n16"
            assert float(idx[(prov, "generate", shape, "decode_tokens_per_s")]) > 0
            assert float(idx[(prov, "generate", shape, "peak_mem")]) > 0


def test_adapter_bank_rows(tmp_path):
    """--bank-adapters: generation through an AdapterBank of 1 and 2 distinct adapters (the GPU plan: 16 requests,
    1, 4 and 16), its path checked against the oracle first, and each count's decode time against one adapter's."""
    argv = ["--smoke", "--out", str(tmp_path), "--providers", "fused", "--batch-sizes", "2", "--bank-adapters", "1,2"]
    assert bd.main(argv) == 0
    idx = index(common.read_rows(tmp_path / "decode.csv"))
    assert 0 <= float(idx[("bank", "check", "smoke-K4-L1-bf16-check-b2-p8-c3", "max_err_over_tol")]) <= 1
    shape = "smoke-K4-L1-bf16-b2-p8-n4"
    for n in (1, 2):
        assert float(idx[(f"bank-a{n}", "generate", shape, "decode_tokens_per_s")]) > 0
        assert ((f"bank-a{n}", "generate", shape, "decode_time_vs_1_adapter") in idx) == (n > 1)
        assert (f"bank-a{n}", "generate", shape, "peak_mem") in idx or not ON_CUDA
