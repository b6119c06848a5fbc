"""bench/attention_report.py: issue 5's targets checked with numbers, the ratio table (fused over each peer)."""

from __future__ import annotations

import pytest
import torch

from llama_adapter_triton.bench import attention_report as ar
from llama_adapter_triton.bench import bench_attention as ba
from llama_adapter_triton.bench import common


def _synthetic_result(gpu: str, medians: dict[tuple[str, int], float]) -> ar.RunResult:
    args = ba.build_parser().parse_args(["--dtypes", "bf16", "--headdims", "128", "--shapes", "7b",
                                         "--seqlens", "512,8192", "--modes", "full"])
    cfg = ba.make_config(args, smoke=False, providers=ba.PROVIDERS)
    env = common.BenchEnv(torch.device("cuda"), gpu, "2025-01-01T00:00:00Z", "abc1234")
    result = ar.RunResult(env, out_dir=None, csv_path=None, cases=ba.cases_of(cfg), providers=cfg.providers,
                          modes=cfg.modes, config=cfg)
    for case in ba.cases_of(cfg):
        for (prov, seqlen), ms in medians.items():
            if seqlen == case.seqlen:
                result.measurements.append(ar.Measurement(case, prov, "full", common.Timing(ms, ms, ms), 1.0, None))
    return result


def test_targets_are_checked_with_numbers():
    result = _synthetic_result("NVIDIA H100 80GB HBM3", {
        ("fused", 512): 1.0, ("sdpa_causal", 512): 0.9, ("sdpa2", 512): 1.4, ("fused_atomic", 512): 0.8,
        ("fused", 8192): 9.0, ("sdpa_causal", 8192): 1.0})  # 8192 lies outside the targets' range
    checks = ar.check_targets(result)
    assert {c.shape for c in checks} == {"b32-s512-h32-kv32-d128-p10-bf16"}
    assert [(c.target.split()[0], c.met) for c in checks] == [
        ("fused", True), ("fused", None), ("fused_atomic", True), ("sdpa2", False), ("eager", None)]
    assert checks[0].value == pytest.approx(1 / 0.9) and checks[2].value == pytest.approx(0.8)
    assert checks[3].value == pytest.approx(1.4)
    text = ar.format_targets(checks, result.env)
    assert "MET" in text and "NOT MET" in text and "not measured" in text and "not an H100" not in text
    assert "not an H100" in ar.format_targets(checks, _synthetic_result("NVIDIA A100", {}).env)


def test_ratio_table_is_fused_over_peer():
    result = _synthetic_result("NVIDIA H100", {("fused", 512): 1.0, ("sdpa2", 512): 2.0, ("eager", 512): 8.0})
    table = ar.ratio_table(result)
    line = next(ln for ln in table.splitlines() if "s512" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in table.splitlines()[1].strip("|").split("|")]
    row = dict(zip(header, cells, strict=True))
    assert row["fused/sdpa2"] == "0.50" and row["fused/eager"] == "0.12"
    assert "fused/flex2" not in row  # never measured: no column
