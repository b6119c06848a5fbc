"""bench/bench_finetune.py and the model's attention switch (set_attention_impl) it benchmarks.

- The eager implementation (the official code's formulation) gives the fused path's logits and adapter gradients
  on a tiny model, padded or left-padded, MHA or GQA, with and without a KV cache; it refuses packed batches.
- The smoke configuration runs end to end under pytest-benchmark (providers checked, then timed; CSV rows,
  plot and summary in a temporary folder, never in bench/results/).
- A wrong provider stops the benchmark before it is timed; bad command lines name the argument.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re

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
from model_utils import VOCAB, tiny_model

from llama_adapter_triton import (
    AdapterConfig,
    Tokenizer,
    adapter_layers,
    adapter_state_dict,
    alpaca_prompt,
    mark_only_adapter_as_trainable,
    set_attention_impl,
)
from llama_adapter_triton.bench import bench_finetune as bf
from llama_adapter_triton.bench import common
from llama_adapter_triton.model.llama import eager_attention
from llama_adapter_triton.train.data import load_records, tokenize_records
from llama_adapter_triton.train.demo import DEMO_DATA, train_tokenizer


def tokens(batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The attention switch: eager (official formulation) == fused
# --------------------------------------------------------------------------------------------------
def _loss_and_grads(model, x, impl, **kwargs):
    set_attention_impl(model, impl)
    model.zero_grad(set_to_none=True)
    logits = model(x, **kwargs)
    loss = logits.float().square().mean()
    loss.backward()
    return logits.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}


@pytest.mark.gpu_leg
@pytest.mark.parametrize("gqa", [False, True])
def test_eager_impl_gives_the_fused_logits_and_adapter_gradients(gqa, device, triton_kernels_only):
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=gqa)  # layer 0 plain, layer 1 adapted
    model.to(device)
    mark_only_adapter_as_trainable(model)
    x = tokens(2, 21).to(device)
    fused, fused_grads = _loss_and_grads(model, x, "fused")
    eager, eager_grads = _loss_and_grads(model, x, "eager")
    assert model.layers[0].attention.attn_impl == model.layers[1].attention.attn_impl == "eager"
    torch.testing.assert_close(eager, fused, atol=1e-4, rtol=1e-4)
    for name, g in fused_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(eager_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert set_attention_impl(model, "fused") == "eager"  # returns the previous implementation
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0


@pytest.mark.gpu_leg
def test_eager_impl_with_kv_cache_and_left_padding_equals_fused(device, triton_kernels_only):
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=True).to(device)
    x = tokens(3, 12, seed=1).to(device)
    out = {}
    with torch.no_grad():
        for impl in ("fused", "eager"):
            set_attention_impl(model, impl)
            model.setup_cache(3, 16)
            steps = [model(x[:, :9], input_pos=0, left_pad=[0, 3, 5])]  # prefill of left-padded rows
            steps += [model(x[:, t:t + 1], input_pos=t, left_pad=[0, 3, 5]) for t in range(9, 12)]  # decode
            model.clear_cache()
            out[impl] = torch.cat(steps, dim=1)
    assert out["eager"].isfinite().all()
    torch.testing.assert_close(out["eager"], out["fused"], atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward > 0


def test_eager_attention_is_the_official_formulation():
    """Against an independent write-up of the official LLaMA code: additive -inf mask, fp32 softmax."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 4, 16, generator=g) for _ in range(3))
    mask = torch.full((7, 7), float("-inf")).triu(1)
    scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / 4.0 + mask
    want = (torch.softmax(scores.float(), -1) @ v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(eager_attention(q, k, v, None, True), want)
    torch.testing.assert_close(eager_attention(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril(), False), want)
    # a decode step (one query over the cache) sees every key
    one = eager_attention(q[:, -1:], k, v, None, False)
    torch.testing.assert_close(one, want[:, -1:])


def test_eager_impl_refuses_packed_batches_and_bad_names():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    set_attention_impl(model, "eager")
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed sequences .* need attention impl 'fused'"):
        model(tokens(1, 9), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="impl must be one of fused, eager, got 'flash'"):
        set_attention_impl(model, "flash")


# --------------------------------------------------------------------------------------------------
# The smoke run, end to end, under pytest-benchmark
# --------------------------------------------------------------------------------------------------
def test_smoke_run_checks_times_and_writes_rows(benchmark, tmp_path, capsys):
    before = results_snapshot()
    rc = benchmark.pedantic(bf.main, args=(["--smoke", "--out", str(tmp_path)],), rounds=1, iterations=1)
    assert rc == 0
    out = capsys.readouterr().out
    if not ON_CUDA:
        assert "CPU numbers mean nothing for the GPU" in out
    assert "8 A100-hours" in out and "5 epochs of Alpaca-52K" in out
    path = tmp_path / "finetune.csv"
    with path.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == common.CSV_COLUMNS
    rows = common.read_rows(path)
    idx = index(rows)
    shape = "smoke-K4-L1-bf16"
    assert int(idx[("data", "all", shape, "examples")]) == 24
    assert idx[("data", "all", shape, "source")].startswith("synthetic Alpaca-like lengths")
    assert int(idx[("all", "all", shape, "trained_params")]) == 4 * 64 + 2  # K x dim prompts + one gate per head
    # V2: + a bias and an output scale of the 7 linears (wq wk wv wo w2: 64; w1 w3: 192) of both layers, 5 norms
    assert int(idx[("all-v2", "all", shape, "trained_params")]) == 4 * 64 + 2 + 2 * 2 * (5 * 64 + 2 * 192) + 5 * 64
    assert float(idx[("v2_packed", "vs_v1", shape, "real_tokens_per_s_ratio")]) > 0
    assert int(idx[("all-hf", "all", shape, "trained_params")]) == 4 * 64 + 1  # PEFT: K x dim prompts + a gate
    assert "LLaMA-Adapter V2 (v2_packed) at" in out
    mean_len = float(idx[("data", "all", shape, "mean_tokens")])
    for prov in bf.PROVIDERS:
        assert 0 <= float(idx[(prov, "check", shape, "max_err_over_tol")]) <= 1
        checked = bf.CHECKED_V2 if prov == "v2_packed" else bf.CHECKED
        assert idx[(prov, "check", shape, "checked")].split() == list(checked)
        key = lambda metric: (prov, "step", shape, metric)  # noqa: B023
        med, p20, p80 = (float(idx[key(m)]) for m in ("step_median", "step_p20", "step_p80"))
        assert 0 < p20 <= med <= p80
        assert int(idx[key("timed_steps")]) == 2
        processed, real = float(idx[key("processed_tokens_per_s")]), float(idx[key("real_tokens_per_s")])
        if prov in ("ours_packed", "v2_packed"):
            assert real == pytest.approx(processed)  # no padding
            assert int(idx[key("timed_real_tokens")]) == int(idx[key("timed_processed_tokens")])
            assert "varlen" in idx[(prov, "all", shape, "attention")]
        else:
            assert real == pytest.approx(processed * mean_len / 64)  # the fill ratio of rows padded to 64
            assert int(idx[key("timed_processed_tokens")]) == 2 * 2 * 64  # 2 steps of 2 rows of 64
            assert idx[(prov, "all", shape, "batching")] == "padded, 2 x 64 tokens per micro-batch"
        processed_epoch = 52_002 * (mean_len if prov in ("ours_packed", "v2_packed") else 64)
        assert float(idx[key("projected_hours")]) == pytest.approx(5 * processed_epoch / processed / 3600, rel=1e-6)
        assert (key("peak_mem") in idx) == ON_CUDA
    assert "zero_init_attention_ref" in idx[("eager_padded512", "all", shape, "attention")]
    assert "SDPA" in idx[("ours_padded512", "all", shape, "attention")]
    assert "PEFT's prompt attention" in idx[("hf_peft", "all", shape, "attention")]
    assert "use_fused_attention" in idx[("hf_peft_fused", "all", shape, "attention")]
    targets = [r["metric"] for r in rows if r["mode"] == "target"]
    assert targets == (["ours_packed / eager_padded512 real tokens/s >= 3"] if ON_CUDA else [])  # no 7B: no hours
    assert len({(r["gpu_name"], r["date"], r["git_commit"]) for r in rows}) == 1  # one run, one stamp
    png, md = list(tmp_path.glob("finetune_*.png")), list(tmp_path.glob("finetune_*.md"))
    assert len(png) == len(md) == 1 and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ours_packed" in md[0].read_text()
    assert results_snapshot() == before  # a smoke run never writes into bench/results/
    # a second run appends, and keeps the earlier files
    first = path.read_text()
    assert bf.main(["--smoke", "--out", str(tmp_path), "--providers", "eager_padded512", "--steps", "1"]) == 0
    assert path.read_text().startswith(first) and path.read_text().count("what,provider") == 1
    assert len(list(tmp_path.glob("finetune_*.png"))) == 2


# --------------------------------------------------------------------------------------------------
# Wrong providers stop the benchmark before they are timed
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _packed_rows_as_one_sequence(model):
    """Packed batches through plain causal attention: each sequence sees the ones before it (no cu_seqlens)."""
    forward = model.forward
    model.forward = lambda tokens, logits_at=None, head=True, **packing: forward(tokens, logits_at=logits_at, head=head)
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def _frozen_prompts(model):
    """The prompts do not learn."""
    layers = list(adapter_layers(model).values())
    for m in layers:
        m.adapter_prompt.requires_grad_(False)
    try:
        yield
    finally:
        for m in layers:
            m.adapter_prompt.requires_grad_(True)


@contextlib.contextmanager
def _hf_fused_tanh(model):
    """The drop-in with the paper's tanh(gate) where PEFT multiplies by the raw gate."""
    import llama_adapter_triton.model.hf as hf

    op = hf.zero_init_attention
    with bf.hf_fused(model), pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf, "zero_init_attention", lambda *a, **k: op(*a, **{**k, "gate_act": "tanh"}))
        yield


WRONG = {
    "leaky_packed": (bf.Provider("leaky_packed", "fused", "packed", _packed_rows_as_one_sequence),
                     ["prompt_grads: max abs error", "gate_grads: max abs error"]),
    "raw_gate": (bf.Provider("raw_gate", "fused", "padded", raw_gate), ["gate_grads: max abs error"]),
    "frozen_prompts": (bf.Provider("frozen_prompts", "fused", "padded", _frozen_prompts),
                       ["prompt_grads: not computed"]),
    "hf_tanh_gate": (bf.Provider("hf_tanh_gate", None, "padded", _hf_fused_tanh, family="hf"),
                     ["gate_grads: max abs error"]),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_wrong_provider_fails_loudly_and_is_not_timed(wrong, tmp_path, capsys):
    provider, named = WRONG[wrong]
    providers = {"eager_padded512": bf.PROVIDERS["eager_padded512"], wrong: provider}
    argv = ["--smoke", "--out", str(tmp_path), "--providers", f"eager_padded512,{wrong}", "--steps", "1"]
    err, rows = assert_stops_before_timing(bf.main, argv, providers, wrong, tmp_path, "finetune", capsys)
    assert "it is not timed" in err
    for part in named:
        assert part in err
    assert any(r["provider"] == "eager_padded512" and r["metric"] == "step_median" for r in rows)


def test_hf_providers_are_skipped_without_transformers_and_peft(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bf, "hf_missing", lambda: "needs transformers and peft (pip install -e '.[dev]'): test")
    assert bf.main(["--smoke", "--out", str(tmp_path), "--providers", "hf_peft,hf_peft_fused"]) == 0
    rows = common.read_rows(tmp_path / "finetune.csv")
    skipped = {r["provider"]: r["value"] for r in rows if r["metric"] == "skipped"}
    assert set(skipped) == {"hf_peft", "hf_peft_fused"} and all("needs transformers and peft" in v
                                                                for v in skipped.values())
    assert not any(r["metric"] == "step_median" for r in rows)
    assert "SKIP smoke (transformers + PEFT): needs transformers and peft" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Data: real data (the Alpaca-length approximation: tests/test_alpaca_data.py)
# --------------------------------------------------------------------------------------------------
def test_real_alpaca_data_is_tokenized_for_its_lengths(tmp_path, capsys):
    records = json.loads(DEMO_DATA.read_text())[:12]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    texts = [alpaca_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in json.loads(DEMO_DATA.read_text())]
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(train_tokenizer(texts, vocab_size=300))
    argv = ["--smoke", "--out", str(tmp_path / "out"), "--data", str(data), "--tokenizer", str(tokenizer),
            "--providers", "eager_padded512", "--steps", "1"]
    assert bf.main(argv) == 0
    idx = index(common.read_rows(tmp_path / "out" / "finetune.csv"))
    assert idx[("data", "all", "smoke-K4-L1-bf16", "source")].startswith(str(data))
    assert int(idx[("data", "all", "smoke-K4-L1-bf16", "examples")]) == 12
    expected, _ = tokenize_records(load_records(data)[0], Tokenizer(tokenizer), max_seq_len=64)
    assert float(idx[("data", "all", "smoke-K4-L1-bf16", "mean_tokens")]) == pytest.approx(expected.lengths.mean())
    # a tokenizer larger than the model's vocabulary is refused, naming the flag
    big = tmp_path / "big.model"
    big.write_bytes(train_tokenizer(texts, vocab_size=600))
    with pytest.raises(SystemExit):
        bf.main([*argv[:5], "--tokenizer", str(big)])
    assert "--tokenizer" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Projection, targets, command line
# --------------------------------------------------------------------------------------------------
def _measurement(provider: str, real_tps: float, hours: float) -> bf.Measurement:
    return bf.Measurement("llama-7b", provider, "-", common.Timing(1.0, 1.0, 1.0), real_tps, real_tps, hours, None,
                          1, 1, 1, 1.0)


@pytest.mark.parametrize("ours, eager, hours, met", [(30_000, 9_000, 0.7, [True, True]),
                                                     (20_000, 9_000, 1.2, [False, False])])
def test_targets_are_checked_with_numbers(ours, eager, hours, met):
    cfg = bf.FinetuneBenchConfig(models=("llama-7b",))
    env = common.BenchEnv(torch.device("cuda"), "NVIDIA H100 80GB HBM3", "2025-01-01T00:00:00Z", "abc1234")
    result = bf.RunResult(env, None, None, cfg)
    result.measurements = [_measurement("ours_packed", ours, hours), _measurement("eager_padded512", eager, 3.0)]
    result.targets = bf.check_targets(result)
    assert [c.met for c in result.targets] == met
    assert result.targets[0].value == pytest.approx(ours / eager) and result.targets[1].value == hours
    text = bf.format_targets(result)
    assert ("MET" in text) and ("not an H100" not in text)
    rows = bf.target_rows(result)
    assert rows[0].value.startswith("MET" if met[0] else "NOT MET") and rows[0].shape == "llama-7b-K10-L30-bf16"
    result.measurements = result.measurements[:1]
    assert [c.met for c in bf.check_targets(result)] == [None, met[1]]  # eager not measured


def test_epoch_projection_counts_padding():
    cfg = bf.FinetuneBenchConfig()
    assert bf.epoch_tokens(bf.PROVIDERS["ours_packed"], 160.0, cfg) == (52_002 * 160.0, 52_002 * 160.0)
    assert bf.epoch_tokens(bf.PROVIDERS["eager_padded512"], 160.0, cfg) == (52_002 * 160.0, 52_002 * 512)


def test_memory_plan_and_smoke_memory_rows(tmp_path, capsys):
    """--memory-plan predicts the real shapes without building anything; --memory measures the smoke model's rows on
    a CPU (TensorMemory) next to the prediction."""
    assert bf.main(["--memory-plan", "yes", "--out", str(tmp_path / "plan")]) == 0
    out = capsys.readouterr().out
    assert "| llama2-70b | nf4  | yes           | 16,384 | 33.88   |" in out, out
    idx = index(common.read_rows(tmp_path / "plan" / "finetune.csv"))
    total = float(idx[("plan", "memory", "llama2-7b-K10-L30-nf4-nockpt-512tok", "predicted_total")])
    assert 5 * 1024 < total < 6 * 1024  # MiB: Llama-2-7B in nf4 on 512-token micro-batches, under 8 GB
    assert len([k for k in idx if k[3] == "predicted_total"]) == 3 * 3 * 2 * 2

    argv = ["--smoke", "--memory", "yes", "--bases", "nf4", "--memory-tokens", "96", "--steps", "1",
            "--warmup-steps", "1", "--out", str(tmp_path / "rows")]
    assert bf.main(argv) == 0
    idx = index(common.read_rows(tmp_path / "rows" / "finetune.csv"))
    for checkpointing in ("nockpt", "ckpt"):
        shape = f"smoke-K4-L1-nf4-{checkpointing}-96tok"
        peak, predicted = (float(idx[("ours_packed", "memory", shape, m)]) for m in ("peak_mem", "predicted_peak"))
        assert predicted == pytest.approx(peak, rel=0.15) and float(idx[("ours_packed", "memory", shape,
                                                                         "real_tokens_per_s")]) > 0


@pytest.mark.parametrize("argv, flag", [
    (["--bases", "fp8"], "--bases"),
    (["--models", "llama-9b"], "--models"),
    (["--providers", "ours_packed,nope"], "--providers"),
    (["--token-budget", "0"], "--token-budget"),
    (["--token-budget", "32"], "--token-budget"),  # below --pad-to 64
    (["--adapter-layers", "3"], "--adapter-layers"),  # the smoke model has 2 layers
    (["--data", "/nonexistent.json"], "--data"),
    (["--data", __file__], "--tokenizer"),  # --data without --tokenizer
    (["--length-scale", "-1"], "--length-scale"),
    (["--examples", "1"], "--examples"),
    (["--out", str(common.RESULTS_DIR / "smoke")], "--out"),
])
def test_bad_command_line_names_the_argument(argv, flag, capsys):
    assert_names_the_argument(bf.main, argv, flag, capsys)


# --------------------------------------------------------------------------------------------------
# On a GPU: the real kernels, a small model, every provider
# --------------------------------------------------------------------------------------------------
@gpu_only
def test_gpu_small_run_checks_and_times_every_provider(tmp_path):
    idx = gpu_rows(bf.main, tmp_path, "finetune", [
        "--models", "tiny", "--adapter-layers", "3", "--token-budget", "1024",
        "--pad-to", "256", "--examples", "400", "--length-scale", "0.5", "--warmup-steps", "1", "--steps", "3"])
    shape = "tiny-K10-L3-bf16"
    for prov in bf.PROVIDERS:
        assert float(idx[(prov, "check", shape, "max_err_over_tol")]) <= 1
        assert float(idx[(prov, "step", shape, "peak_mem")]) > 0
        assert float(idx[(prov, "step", shape, "real_tokens_per_s")]) > 0
    assert "(triton)" in idx[("ours_packed", "all", shape, "attention")]
    # the target row states the measured ratio and the verdict that follows from it (a tiny model need not meet
    # it: the check is that it was measured and judged right, not that it was met)
    verdict = idx[("all", "target", shape, "ours_packed / eager_padded512 real tokens/s >= 3")]
    match = re.fullmatch(r"(MET|NOT MET) \(([0-9.e+]+), bound 3\)", verdict)
    assert match, verdict
    ratio = (float(idx[("ours_packed", "step", shape, "real_tokens_per_s")])
             / float(idx[("eager_padded512", "step", shape, "real_tokens_per_s")]))
    assert float(match.group(2)) == pytest.approx(ratio, rel=2e-3)
    assert (match.group(1) == "MET") == (ratio >= 3)
