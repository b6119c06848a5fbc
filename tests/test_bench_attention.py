"""Tests of bench/bench_attention.py and bench/common.py.

The smoke configuration runs end to end (every provider checked against the reference, then timed;
CSV, plot and summary written to a temporary folder); pytest-benchmark wraps the fused op's
forward+backward so that `pytest --benchmark-disable` still runs it once; wrong providers must stop
the benchmark before they are timed; bad command lines must name the argument.
"""

from __future__ import annotations

import csv
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
    results_snapshot,
)

from llama_adapter_triton import zero_init_attention_ref
from llama_adapter_triton.bench import bench_attention as ba
from llama_adapter_triton.bench import common
from llama_adapter_triton.kernels.sdpa_fallback import zero_init_attention_sdpa

ADAPTER_TENSORS = ["out", "dq", "dk", "dv", "dprompt_k", "dprompt_v", "dgate"]


def _xformers_imports() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def _smoke_config(*argv: str) -> ba.BenchConfig:
    args = ba.build_parser().parse_args(["--smoke", *argv])
    return ba.make_config(args, smoke=True, providers=ba.PROVIDERS)


# --------------------------------------------------------------------------------------------------
# The smoke run, end to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    before = results_snapshot()
    rc = ba.main(["--smoke", "--out", str(out)])
    return out, rc, before


def test_smoke_run_writes_checked_rows(smoke_run):
    out, rc, _ = smoke_run
    assert rc == 0
    path = out / "attention.csv"
    with path.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == common.CSV_COLUMNS
    rows = common.read_rows(path)
    idx = index(rows)
    cfg = _smoke_config()
    cases = ba.cases_of(cfg)
    assert len(cases) == 4 and {c.nheads_kv for c in cases} == {2} and {c.nheads for c in cases} == {2, 4}

    timed = ["fused", "fused_atomic", "eager", "sdpa2", "sdpa_causal", "sdpa_causal_flash"] + (
        ["flex2"] if ON_CUDA else [])
    floors = ("sdpa_causal", "sdpa_causal_flash")
    for case in cases:
        for prov in timed:
            assert float(idx[(prov, "check", case.shape, "max_err_over_tol")]) <= 1.0
            checked = idx[(prov, "check", case.shape, "checked")].split()
            assert checked == (ADAPTER_TENSORS if prov not in floors else ADAPTER_TENSORS[:4])
            for mode in ba.MODES:
                key = lambda metric: (prov, mode, case.shape, metric)  # noqa: B023
                med, p20, p80 = (float(idx[key(m)]) for m in ("time_median", "time_p20", "time_p80"))
                assert 0 < p20 <= med <= p80
                flop = 4 * case.batch * case.nheads * case.seqlen**2 * case.headdim / 2 * ba.MODE_FACTOR[mode]
                assert float(idx[key("gflop")]) == pytest.approx(flop / 1e9, rel=1e-5)
                assert float(idx[key("tflops")]) == pytest.approx(flop / 1e9 / med, rel=1e-4)  # GFLOP/ms = TFLOP/s
                pflop = 4 * case.batch * case.nheads * case.seqlen * case.prompt_len * case.headdim
                if prov in floors:
                    assert key("prompt_gflop") not in idx
                else:
                    assert float(idx[key("prompt_gflop")]) == pytest.approx(
                        pflop * ba.MODE_FACTOR[mode] / 1e9, rel=1e-5)
                assert (key("peak_mem") in idx) == ON_CUDA
        assert idx[("sdpa_causal_flash", "all", case.shape, "sdpa_backend_tokens")] == "FLASH_ATTENTION (forced)"
        assert idx[("fused_atomic", "all", case.shape, "deterministic")] == "False"
        for prov in ("sdpa2", "sdpa_causal"):
            assert idx[(prov, "all", case.shape, "sdpa_backend_tokens")]
            gqa = idx[(prov, "all", case.shape, "sdpa_gqa")]
            assert gqa == "none" if case.nheads == case.nheads_kv else gqa in ("enable_gqa", "repeat_interleave")
        assert idx[("sdpa2", "all", case.shape, "sdpa_backend_prompt")]
        if not ON_CUDA:
            # flex2: forward checked and timed; its backward does not exist on a CPU and says so
            assert idx[("flex2", "check", case.shape, "checked")] == "out"
            assert float(idx[("flex2", "fwd", case.shape, "time_median")]) > 0
            for mode in ("bwd", "full"):
                assert "no backward on the CPU" in idx[("flex2", mode, case.shape, "skipped")]
    if not _xformers_imports():
        assert "does not import" in idx[("xformers2", "all", "all", "skipped")]

    env_cols = {(r["gpu_name"], r["date"], r["git_commit"]) for r in rows}
    assert len(env_cols) == 1  # one run, one stamp
    gpu, date, commit = env_cols.pop()
    assert gpu == ("cpu" if not ON_CUDA else torch.cuda.get_device_name())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", date)
    assert re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?|unknown", commit)


def test_smoke_run_writes_plot_and_summary_never_into_results(smoke_run):
    out, rc, before = smoke_run
    assert rc == 0
    pngs = list(out.glob("attention_*.png"))
    assert len(pngs) == 1
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pngs[0].stat().st_size > 10_000
    summaries = list(out.glob("attention_*.md"))
    assert len(summaries) == 1
    text = summaries[0].read_text()
    assert "fused/sdpa2" in text and "fused/sdpa_causal" in text
    if not ON_CUDA:
        assert "CPU numbers mean nothing for the GPU" in text
    assert results_snapshot() == before  # a smoke run never writes into bench/results/


def test_rerun_appends_and_keeps_earlier_files(tmp_path):
    argv = ["--smoke", "--out", str(tmp_path), "--providers", "eager,sdpa_causal", "--modes", "fwd",
            "--seqlens", "64", "--shapes", "tiny"]
    assert ba.main(argv) == 0
    first = (tmp_path / "attention.csv").read_text()
    first_png = list(tmp_path.glob("*.png"))
    assert ba.main(argv) == 0
    second = (tmp_path / "attention.csv").read_text()
    assert second.startswith(first)  # appended, nothing rewritten
    assert second.count("what,provider,mode") == 1
    assert len(second.splitlines()) == 2 * len(first.splitlines()) - 1
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and set(first_png) < set(pngs)  # the earlier plot is kept


def test_report_rebuilt_from_rows_matches_the_run(smoke_run, tmp_path, capsys):
    out, rc, _ = smoke_run
    assert rc == 0
    summary = next(out.glob("attention_*.md")).read_text()
    assert ba.main(["--report", str(out / "attention.csv"), "--out", str(tmp_path)]) == 0
    rebuilt = next(tmp_path.glob("attention_report_*.md")).read_text()
    table = lambda text: text.split("## Time ratios")[1].split("##")[0].strip()  # noqa: E731
    assert table(rebuilt) == table(summary) and "| fused/sdpa2" in table(summary)
    assert next(tmp_path.glob("attention_report_*.png")).stat().st_size > 10_000


def test_report_of_gpu_rows_checks_targets(tmp_path, capsys):
    path = tmp_path / "attention.csv"
    h100 = "NVIDIA H100 80GB HBM3"
    piece = lambda date, commit: common.BenchEnv(torch.device("cuda"), h100, date, commit)  # noqa: E731

    def rows(prov, seqlen, ms):
        shape = f"b{16384 // seqlen}-s{seqlen}-h32-kv32-d128-p10-bf16"
        return [common.Row("attention", prov, "full", shape, m, v, u) for m, v, u in
                (("time_median", ms, "ms"), ("time_p20", ms, "ms"), ("time_p80", ms, "ms"), ("tflops", 1.0, "TFLOP/s"))]

    common.append_rows(path, rows("fused", 1024, 1.0) + rows("sdpa_causal", 1024, 0.8), piece("2025-01-01T00:00:00Z",
                                                                                                  "abc1234"))
    common.append_rows(path, rows("fused", 1024, 0.9) + rows("sdpa2", 1024, 1.8) + rows("eager", 2048, 9.0),
                       piece("2025-01-01T01:00:00Z", "abc1234"))  # a second piece: fused re-measured
    common.append_rows(path, rows("sdpa_causal", 1024, 100.0), piece("2025-01-02T00:00:00Z", "0ther00"))
    assert ba.main(["--report", str(path), "--report-commit", "abc1234"]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if "s1024" in ln and ("MET" in ln or "not measured" in ln)]
    assert len(lines) == 3
    assert lines[0].startswith("MET") and "1.12" in lines[0]  # 0.9 / 0.8: the latest fused (1.0 / 0.8 fails)
    assert lines[1].startswith("MET") and "2.00" in lines[1]  # 1.8 / 0.9
    assert lines[2].startswith("not measured")  # no eager at 1024
    assert len(list(tmp_path.glob("attention_report_*.png"))) == 1  # written beside the CSV
    assert ba.main(["--report", str(path)]) == 0  # default: the last row's commit, a different set of rows
    assert "0ther00" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--report", "/nonexistent/attention.csv"], "--report"),
    (["--report", "x.csv", "--seqlens", "64"], "--seqlens"),
    (["--report-commit", "abc"], "--report-commit"),
])
def test_report_command_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        ba.main(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# pytest-benchmark around one provider
# --------------------------------------------------------------------------------------------------
def test_fused_forward_backward_benchmark(benchmark, device):
    case = ba.cases_of(_smoke_config("--shapes", "tiny-gqa", "--seqlens", "64"))[0]
    x = ba.make_inputs(case, torch.device(device))
    expected = ba.expected_results(x, adapter=True, need_grad=True)
    fwd, _ = ba.PROVIDERS["fused"].build(x)
    ratios = ba.check_provider("fused", fwd, x, expected, adapter=True, need_grad=True)
    assert list(ratios) == ADAPTER_TENSORS and max(ratios.values()) <= 1
    full = ba.mode_closure(fwd, "full", x)

    def step():
        for t in x.leaves():
            t.grad = None
        full()

    benchmark.pedantic(step, rounds=3, iterations=1)
    # what was timed computed the right gradients
    for name, leaf in zip(ADAPTER_TENSORS[1:], x.leaves(), strict=True):
        err = (leaf.grad.to(expected.oracle[name].dtype) - expected.oracle[name]).abs().max().item()
        assert err <= expected.tol[name], name


# --------------------------------------------------------------------------------------------------
# Wrong providers stop the benchmark before they are timed
# --------------------------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _ref(x, **kw):
    args = dict(q=x.q, k=x.k, v=x.v, prompt_k=x.prompt_k, prompt_v=x.prompt_v, gate=x.gate)
    args.update(kw)
    return zero_init_attention_ref(**args, causal=True)


WRONG = {
    # the official release's ambiguity: the raw gate instead of tanh(gate)
    "raw_gate": (lambda x: (lambda: _ref(x, gate_act="identity"), {}), ["out"]),
    # right forward, dk 5% too large
    "bad_dk": (lambda x: (lambda: _ref(x, k=_ScaleGrad.apply(x.k, 1.05)), {}), ["dk"]),
    # query head h reads kv head h % nheads_kv instead of h // groups
    "bad_gqa": (lambda x: (lambda: _ref(x, **{n: getattr(x, n).repeat(1, 1, x.case.nheads // x.case.nheads_kv, 1)
                                            for n in ("k", "v", "prompt_k", "prompt_v")}), {}), ["out"]),
    # the prompt part does not learn
    "no_prompt_grad": (lambda x: (lambda: _ref(x, prompt_k=x.prompt_k.detach(), prompt_v=x.prompt_v.detach()), {}),
                       ["dprompt_k: no gradient", "dprompt_v: no gradient"]),
    # an fp32 output for bf16 inputs
    "bad_dtype": (lambda x: (lambda: _ref(x).float(), {}), ["output must be"]),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_wrong_provider_fails_loudly(wrong, tmp_path, capsys):
    build, named = WRONG[wrong]
    providers = {"eager": ba.PROVIDERS["eager"], wrong: ba.Provider(wrong, build)}
    argv = ["--smoke", "--out", str(tmp_path), "--providers", f"eager,{wrong}", "--seqlens", "64",
            "--shapes", "tiny-gqa"] + (["--modes", "fwd"] if wrong in ("raw_gate", "bad_gqa") else [])
    err, rows = assert_stops_before_timing(ba.main, argv, providers, wrong, tmp_path, "attention", capsys)
    for part in named:
        assert part in err
    assert any(r["provider"] == "eager" and r["metric"] == "time_median" for r in rows)


def test_check_raises_correctness_error_directly(device):
    case = ba.cases_of(_smoke_config("--shapes", "tiny", "--seqlens", "64", "--dtypes", "fp32"))[0]
    x = ba.make_inputs(case, torch.device(device))
    expected = ba.expected_results(x, adapter=True, need_grad=True)
    assert expected.oracle["out"].dtype == torch.float64  # fp32 cases are checked against fp64
    ok, _ = ba.PROVIDERS["sdpa2"].build(x)
    assert max(ba.check_provider("sdpa2", ok, x, expected, adapter=True, need_grad=True).values()) <= 1
    with pytest.raises(ba.CorrectnessError, match=r"'tiny_error'.*\n.*out: max abs error"):
        ba.check_provider("tiny_error", lambda: ok() * (1 + 1e-3), x, expected, adapter=True, need_grad=False)


def _fake_xformers(monkeypatch) -> list[tuple[int, ...]]:
    """A stand-in for xformers.ops with memory_efficient_attention's documented semantics (layouts BMHK and, for
    GQA, BMGHK with kv heads expanded over H; LowerTriangularMask top-left aligned; scale 1/sqrt(K); output in
    the query's layout), so that the xformers2 provider's layout handling is checked without a GPU."""
    import sys
    import types

    calls = []

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert p == 0.0 and scale is None and query.dim() in (4, 5) and key.shape[:2] == value.shape[:2]
        calls.append(tuple(query.shape))
        shape = query.shape
        q, k, v = (t.reshape(*t.shape[:2], -1, t.shape[-1]).transpose(1, 2) for t in (query, key, value))
        causal = isinstance(attn_bias, LowerTriangularMask)
        assert causal or attn_bias is None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return out.transpose(1, 2).reshape(shape)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.LowerTriangularMask = memory_efficient_attention, LowerTriangularMask
    pkg = types.ModuleType("xformers")
    pkg.ops, pkg.__version__ = ops, "stand-in"
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


@pytest.mark.parametrize("shape", ["tiny", "tiny-gqa"])
def test_xformers2_layouts_against_a_stand_in(shape, monkeypatch, device):
    calls = _fake_xformers(monkeypatch)
    case = ba.cases_of(_smoke_config("--shapes", shape, "--seqlens", "64"))[0]
    x = ba.make_inputs(case, torch.device(device))
    if device == "cpu":
        assert "no CPU kernels" in ba.PROVIDERS["xformers2"].unavailable(torch.device("cpu"))
    fwd, info = ba.PROVIDERS["xformers2"].build(x)
    assert info == {"xformers_version": "stand-in"}
    expected = ba.expected_results(x, adapter=True, need_grad=True)
    assert max(ba.check_provider("xformers2", fwd, x, expected, adapter=True, need_grad=True).values()) <= 1
    b, s, h, hkv = case.batch, case.seqlen, case.nheads, case.nheads_kv
    assert calls == [(b, s, h, 32)] * 2 if h == hkv else [(b, s, hkv, h // hkv, 32)] * 2


# --------------------------------------------------------------------------------------------------
# The reference the checks rely on
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [True, False])
def test_chunked_reference_equals_one_call(adapter):
    case = ba.Case(batch=2, seqlen=24, nheads=4, nheads_kv=2, headdim=16, prompt_len=5, dtype="fp32")
    x = ba.make_inputs(case, torch.device("cpu"), seed=3)
    chunked = ba.reference_outputs(x, torch.float64, adapter=adapter, need_grad=True, budget_bytes=1)
    leaves = [t.detach().double().requires_grad_() for t in x.leaves()]
    if not adapter:
        leaves[3] = leaves[4] = torch.zeros(1, 0, 2, 16, dtype=torch.float64)
    out = zero_init_attention_ref(*leaves, causal=True)
    wrt = leaves if adapter else leaves[:3]
    grads = torch.autograd.grad(out, wrt, x.dout.double())
    names = ADAPTER_TENSORS if adapter else ADAPTER_TENSORS[:4]
    assert list(chunked) == names
    for name, want in zip(names, [out, *grads], strict=True):
        torch.testing.assert_close(chunked[name], want, rtol=0, atol=1e-12, msg=name)


def test_head_chunks_map_onto_whole_kv_heads():
    per_head = 100
    assert ba._head_chunk(32, 8, per_head, 2 * per_head) == 2  # within one kv head's group of 4
    assert ba._head_chunk(32, 8, per_head, 12 * per_head) == 8  # two whole groups
    assert ba._head_chunk(32, 8, per_head, 10**9) == 32
    assert ba._head_chunk(32, 32, per_head, 1) == 1
    assert ba._head_chunk(32, 4, per_head, 7 * per_head) == 4  # divisors of 8 only, below a group


def test_flop_counts_follow_flash_attn():
    fwd = 4 * 2 * 32 * 1024 * 1024 * 128 / 2
    assert ba.attention_flops(2, 1024, 32, 128, "fwd") == fwd
    assert ba.attention_flops(2, 1024, 32, 128, "bwd") == 2.5 * fwd
    assert ba.attention_flops(2, 1024, 32, 128, "full") == 3.5 * fwd
    assert ba.prompt_flops(2, 1024, 32, 128, 10, "fwd") == 4 * 2 * 32 * 1024 * 10 * 128
    assert ba.prompt_flops(2, 1024, 32, 128, 10, "full") == 3.5 * 4 * 2 * 32 * 1024 * 10 * 128


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--seqlens", "12x"], "--seqlens"),
    (["--seqlens", "0,64"], "--seqlens"),
    (["--headdims", "100"], "--headdims"),
    (["--dtypes", "fp8"], "--dtypes"),
    (["--shapes", "32:5"], "--shapes"),
    (["--shapes", "llama"], "--shapes"),
    (["--providers", "fused,nope"], "--providers"),
    (["--modes", "forward"], "--modes"),
    (["--prompt-len", "0"], "--prompt-len"),
    (["--tokens", "-3"], "--tokens"),
    (["--gate-act", "relu"], "--gate-act"),
    (["--out", str(common.RESULTS_DIR / "smoke")], "--out"),
])
def test_bad_command_line_names_the_argument(argv, flag, capsys):
    assert_names_the_argument(ba.main, argv, flag, capsys)


def test_foreign_csv_is_refused_and_left_alone(tmp_path, capsys):
    path = tmp_path / "attention.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(SystemExit):
        ba.main(["--smoke", "--out", str(tmp_path), "--providers", "eager", "--modes", "fwd"])
    assert "--out" in capsys.readouterr().err
    assert path.read_text() == "a,b,c\n1,2,3\n"
    env = common.bench_env(torch.device("cpu"))
    with pytest.raises(ValueError, match="refusing to append"):
        common.append_rows(path, [common.Row("attention", "p", "fwd", "s", "m", 1.0, "ms")], env)
    assert path.read_text() == "a,b,c\n1,2,3\n"


def test_cli_narrows_the_sweep_defaults():
    args = ba.build_parser().parse_args(["--seqlens", "512,512,1024", "--dtypes", "bf16", "--shapes", "gqa,16:4"])
    cfg = ba.make_config(args, smoke=False, providers=ba.PROVIDERS)
    assert cfg.seqlens == (512, 1024) and cfg.headdims == (64, 128) and cfg.tokens == 16384
    cases = ba.cases_of(cfg)
    assert [(c.batch, c.seqlen, c.nheads, c.nheads_kv) for c in cases if c.headdim == 64] == [
        (32, 512, 32, 8), (16, 1024, 32, 8), (32, 512, 16, 4), (16, 1024, 16, 4)]
    assert cases[0].shape == "b32-s512-h32-kv8-d64-p10-bf16"


# --------------------------------------------------------------------------------------------------
# Reports and helpers
# --------------------------------------------------------------------------------------------------
def test_cpu_timer_resets_grads_and_orders_quantiles():
    t = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        assert t.grad is None or len(calls) < 2  # reset before every timed call
        calls.append(1)
        (t * 2).sum().backward()

    timing = common.time_fn(fn, torch.device("cpu"), grad_to_none=[t], cpu_warmup=2, cpu_reps=5)
    assert len(calls) == 7
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert common.peak_memory_mib(fn, torch.device("cpu")) is None


def test_unique_names_never_replace(tmp_path):
    env = common.BenchEnv(torch.device("cpu"), "cpu", "2025-01-02T03:04:05Z", "abc1234-dirty")
    first = common.unique_path(tmp_path, "attention", ".png", env)
    assert first.name == "attention_20250102-030405_abc1234-dirty.png"
    first.write_bytes(b"x")
    second = common.unique_path(tmp_path, "attention", ".png", env)
    assert second.name == "attention_20250102-030405_abc1234-dirty-1.png"


# --------------------------------------------------------------------------------------------------
# On a GPU: the peers that only run there, at a real (small) size
# --------------------------------------------------------------------------------------------------
@gpu_only
def test_gpu_all_providers_small_sweep(tmp_path):
    idx = gpu_rows(ba.main, tmp_path, "attention", [
        "--seqlens", "512", "--headdims", "64", "--dtypes", "bf16",
        "--shapes", "gqa", "--tokens", "1024", "--rep-ms", "20", "--warmup-ms", "5"])
    shape = "b2-s512-h32-kv8-d64-p10-bf16"
    provs = ["fused", "fused_atomic", "eager", "sdpa2", "flex2", "sdpa_causal", "sdpa_causal_flash"]
    for prov in provs + (["xformers2"] if _xformers_imports() else []):
        for mode in ba.MODES:
            assert float(idx[(prov, mode, shape, "time_median")]) > 0, (prov, mode)
            assert float(idx[(prov, mode, shape, "peak_mem")]) > 0


# --------------------------------------------------------------------------------------------------
# --cpu-fallback: the op's CPU path against the eager reference and two bare SDPA calls
# --------------------------------------------------------------------------------------------------
def test_cpu_fallback_mode_times_the_three_side_by_side(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ba, "CPU_SAMPLE_MS", 2.0)  # a few calls per sample (20 ms: the real runs' decode)
    threads = torch.get_num_threads()
    assert ba.main(["--cpu-fallback", "--smoke", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "fallback / 2 SDPA" in printed and "eager / fallback" in printed and "1 CPU threads" in printed
    rows = common.read_rows(tmp_path / "attention_cpu.csv")
    idx = index(rows)
    cases = sorted({r["shape"] for r in rows})
    assert [c.split("-")[0] for c in cases] == ["decode", "prefill"] and "-q1-" in cases[0]
    for case in cases:
        for prov in ("eager", "fallback"):  # checked against the oracle before anything is timed
            assert float(idx[(prov, "check", case, "max_err_over_tol")]) <= 1.0
        for mode in ba.CPU_MODES:
            medians = {p: float(idx[(p, mode, case, "time_median")]) for p in ("eager", "fallback", "floor")}
            assert all(m > 0 for m in medians.values())
            ratio = float(idx[("fallback", mode, case, "over_floor")])
            assert ratio == pytest.approx(medians["fallback"] / medians["floor"])
            assert float(idx[("eager", mode, case, "over_fallback")]) == pytest.approx(
                medians["eager"] / medians["fallback"])


def test_cpu_fallback_mode_stops_on_a_wrong_fallback(tmp_path, monkeypatch, capsys):
    """A fallback that computes a wrong answer (the raw gate for tanh(gate)) stops the run before it is timed."""
    def raw_gate(*args, gate_act, **kwargs):
        return zero_init_attention_sdpa(*args, gate_act="identity", **kwargs)

    monkeypatch.setattr(ba, "zero_init_attention_sdpa", raw_gate)
    assert ba.main(["--cpu-fallback", "--smoke", "--out", str(tmp_path)]) == 1
    assert "CORRECTNESS CHECK FAILED" in capsys.readouterr().err
    assert not (tmp_path / "attention_cpu.csv").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--cpu-fallback", "--report", "x.csv"], "--report"),
    (["--cpu-fallback", "--modes", "bwd"], "argument --modes"),
    (["--cpu-fallback", "--threads", "0"], "argument --threads"),
    (["--threads", "2"], "argument --threads: only goes with --cpu-fallback"),
])
def test_cpu_fallback_mode_command_line_errors(argv, flag, capsys):
    """Exit 2, the error line (not merely the usage above it) naming the argument."""
    with pytest.raises(SystemExit) as exc:
        ba.main(["--smoke", *argv])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and error.startswith("llama-adapter bench attention: error:") and flag in error, error
