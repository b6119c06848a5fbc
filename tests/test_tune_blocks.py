"""bench/tune_blocks.py and the block override it shares with kernels.compile_check.

- The smoke configuration runs end to end under pytest-benchmark (Triton's interpreter on a CPU): every candidate
  checked against the default blocks' results, then timed; one CSV row per candidate, never in bench/results/.
- kernels.block_sizes.override_blocks replaces one kernel's blocks, and is gone on leaving, exceptions included.
- A candidate whose kernel computes a wrong answer is reported, not timed, and makes the run exit 1; one that
  needs more shared memory than the GPU has is skipped; the time budget stops the sweep cleanly.
- With controlled times, a candidate faster by more than 3% at most seqlens is confirmed and suggested.
- Bad command lines name the argument.
"""

from __future__ import annotations

import csv

import pytest
import torch
from bench_utils import ON_CUDA, assert_names_the_argument, gpu_only, results_snapshot
from triton.runtime.errors import OutOfResources

import llama_adapter_triton.kernels.zero_init_attn as zia
from llama_adapter_triton.bench import common
from llama_adapter_triton.bench import tune_blocks as tb
from llama_adapter_triton.kernels import block_sizes

CANDIDATE_METRICS = {"time_ms", "skipped", "failed"}  # exactly one of these per candidate and shape


def _candidate_rows(path) -> list[dict[str, str]]:
    return [r for r in common.read_rows(path) if r["metric"] in CANDIDATE_METRICS]


def _blocks_now(kernel: str) -> tuple[int, ...]:
    """What the launchers would use for kernel right now (under whatever override is active)."""
    return tuple(block_sizes.choose(torch.bfloat16, 32, 64, 10, 232448)[kernel])


# --------------------------------------------------------------------------------------------------
# The smoke run, end to end
# --------------------------------------------------------------------------------------------------
def test_smoke_run_checks_times_and_writes_one_row_per_candidate(benchmark, tmp_path, capsys):
    before = results_snapshot()
    rc = benchmark.pedantic(tb.main, args=(["--smoke", "--out", str(tmp_path)],), rounds=1, iterations=1)
    assert rc == 0
    out = capsys.readouterr().out
    if not ON_CUDA:
        assert common.CPU_NOTICE in out
    assert "plan: 12 candidate measurements" in out and "Suggested _blocks changes" in out

    path = tmp_path / "tune_blocks.csv"
    with path.open(newline="") as f:
        assert tuple(next(csv.reader(f))) == common.CSV_COLUMNS
    rows = _candidate_rows(path)
    cfg = tb.make_config(tb.build_parser().parse_args(["--smoke"]), smoke=True)
    cases = tb.cases_of(cfg)
    assert [(c.batch, c.seqlen, c.nheads, c.nheads_kv, c.headdim) for c in cases] == [(1, 64, 2, 2, 32),
                                                                                      (1, 128, 2, 2, 32)]
    expected = set()
    for kernel in tb.KERNELS:
        default, cands = tb.candidates_for(kernel, cases[0], torch.device("cpu"), cfg)
        assert len(cands) == 2 and cands[0] == default
        for case in cases:
            for c in cands:
                expected.add((c.name + (" (default)" if c == default else ""), tb.TIMED_MODE[kernel], case.shape))
    got = [(r["provider"], r["mode"], r["shape"]) for r in rows]
    assert len(got) == len(set(got)) == 12 and set(got) == expected  # one row per candidate and shape
    assert all(r["what"] == "tune_blocks" and r["metric"] == "time_ms" and float(r["value"]) > 0
               and r["unit"] == "ms" for r in rows)
    assert sum(r["provider"].endswith("(default)") for r in rows) == 6  # one default per kernel and shape
    assert {r["gpu_name"] for r in rows} == {"cpu" if not ON_CUDA else torch.cuda.get_device_name()}
    assert results_snapshot() == before  # a smoke run never writes into bench/results/


# --------------------------------------------------------------------------------------------------
# The override
# --------------------------------------------------------------------------------------------------
def test_override_replaces_one_kernel_and_is_gone_after_an_exception():
    before = block_sizes.choose(torch.bfloat16, 32, 64, 10, 232448)
    with pytest.raises(RuntimeError, match="inside"):
        with block_sizes.override_blocks({"dq": (16, 16, 2, 1)}):
            assert _blocks_now("dq") == (16, 16, 2, 1)
            assert _blocks_now("fwd") == tuple(before["fwd"]) and _blocks_now("dkdv") == tuple(before["dkdv"])
            with block_sizes.override_blocks({"fwd": (32, 16, 4, 2)}):  # nested: both apply
                assert _blocks_now("fwd") == (32, 16, 4, 2) and _blocks_now("dq") == (16, 16, 2, 1)
            assert _blocks_now("fwd") == tuple(before["fwd"])
            raise RuntimeError("inside")
    assert block_sizes.choose(torch.bfloat16, 32, 64, 10, 232448) == before and not block_sizes._OVERRIDES
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        with block_sizes.override_blocks({"fwd": (64, 48, 4, 3)}):
            pass
    with pytest.raises(ValueError, match="unknown kernel 'bwd'"):
        with block_sizes.override_blocks({"bwd": (64, 64, 4, 3)}):
            pass
    assert block_sizes.choose(torch.bfloat16, 32, 64, 10, 232448) == before and not block_sizes._OVERRIDES


def test_parse_blocks_is_compile_checks_form():
    assert block_sizes.parse_blocks("fwd=128,64,8,3") == ("fwd", (128, 64, 8, 3))
    assert block_sizes.parse_blocks("pre=64,4") == ("pre", (64, 4))
    for bad in ("fwd=1,2", "fwd", "dq=64,x,4,3", "dkdv=8,64,4,3", "dq=64,32,3,3", "dq=64,32,4,0", "bwd=64,64,4,3"):
        with pytest.raises(ValueError):
            block_sizes.parse_blocks(bad)


def test_curated_candidates_are_launchable_and_distinct():
    for kernel, lists in (("fwd", tb.CANDIDATES["fwd"]), ("dkdv", tb.CANDIDATES["dkdv"]),
                          ("dq", tb.CANDIDATES["dq"])):
        assert len(set(lists)) == len(lists) and 8 <= len(lists) <= 20
        for blocks in lists:
            block_sizes.check_blocks(kernel, blocks)
    for kernel, lists in tb.SMOKE_CANDIDATES.items():
        assert len(lists) == 2
        for blocks in lists:
            block_sizes.check_blocks(kernel, blocks)


# --------------------------------------------------------------------------------------------------
# Wrong candidates, out of resources, the time budget
# --------------------------------------------------------------------------------------------------
class _Planted:
    """Stands in for a @triton.jit kernel: launches the real one, then misbehaves for one block size."""

    def __init__(self, kernel, when, act):
        self.kernel, self.when, self.act = kernel, when, act

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.when(kwargs) and self.act == "out_of_resources":
                raise OutOfResources(300000, 232448, "shared memory")
            if self.when(kwargs) and self.act == "crash":
                raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
            self.kernel[grid](*args, **kwargs)
            if self.when(kwargs):
                self.act(args)

        return launch


def _corrupt(index):
    def act(args):
        args[index].view(-1)[:5] += 1.0  # a few elements of the output (fwd) or of dk (dkdv) off by 1

    return act


@pytest.mark.parametrize("kernel, attr, when, index", [
    ("fwd", "_zia_fwd_kernel", lambda kw: kw["BLOCK_N"] == 32, 6),  # OUT
    ("dkdv", "_zia_bwd_dkdv_kernel", lambda kw: kw["BLOCK_M"] == 16, 4),  # DK
])
def test_wrong_candidate_is_reported_not_timed_and_fails_the_run(kernel, attr, when, index, monkeypatch, tmp_path,
                                                                 capsys):
    monkeypatch.setattr(zia, attr, _Planted(getattr(zia, attr), when, _corrupt(index)))
    rc = tb.main(["--smoke", "--out", str(tmp_path), "--kernels", kernel, "--seqlens", "64"])
    assert rc == 1
    captured = capsys.readouterr()
    wrong = tb.Candidate(kernel, tb.SMOKE_CANDIDATES[kernel][1]).name
    assert f"{wrong}" in captured.out and "!!! FAILED correctness" in captured.out
    assert "CORRECTNESS CHECK FAILED" in captured.err and "WRONG" in captured.err and wrong in captured.err
    assert ("out deviates" if kernel == "fwd" else "dk deviates") in captured.err
    rows = {r["provider"]: r for r in _candidate_rows(tmp_path / "tune_blocks.csv")}
    assert rows[wrong]["metric"] == "failed" and rows[wrong]["value"].startswith("FAILED correctness")
    default = next(p for p in rows if p.endswith("(default)"))
    assert rows[default]["metric"] == "time_ms"  # the right one is still timed


def test_out_of_resources_is_skipped_and_the_sweep_goes_on(monkeypatch, tmp_path, capsys):
    real = zia._zia_bwd_dq_kernel
    monkeypatch.setattr(zia, "_zia_bwd_dq_kernel", _Planted(real, lambda kw: kw["BLOCK_N"] == 16, "out_of_resources"))
    assert tb.main(["--smoke", "--out", str(tmp_path), "--kernels", "dq", "--seqlens", "32,64"]) == 0
    rows = _candidate_rows(tmp_path / "tune_blocks.csv")
    assert len(rows) == 4
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert [r["provider"] for r in skipped] == ["dq M32 N16 w4 s1"] * 2
    assert all(r["value"].startswith("out of resources") for r in skipped)
    assert "Skipped (2)" in capsys.readouterr().out


def test_a_crashing_candidate_fails_the_run_and_stops_it(monkeypatch, tmp_path, capsys):
    """An illegal memory access loses the CUDA context: the candidate is a failure and nothing more can run."""
    real = zia._zia_fwd_kernel
    monkeypatch.setattr(zia, "_zia_fwd_kernel", _Planted(real, lambda kw: kw["BLOCK_N"] == 32, "crash"))
    assert tb.main(["--smoke", "--out", str(tmp_path), "--kernels", "fwd"]) == 1
    assert "crashed" in capsys.readouterr().err
    rows = common.read_rows(tmp_path / "tune_blocks.csv")
    assert [r["metric"] for r in rows] == ["time_ms", "failed", "stopped"]  # s64 only: the sweep stopped there
    assert "illegal memory access" in rows[1]["value"] and "2 of 4" in rows[2]["value"]
    assert "crashed the GPU's context" in rows[2]["value"]


def test_time_budget_stops_cleanly(tmp_path, capsys):
    assert tb.main(["--smoke", "--out", str(tmp_path), "--time-budget", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "STOPPED: time budget" in out and "Suggested _blocks changes" in out
    rows = common.read_rows(tmp_path / "tune_blocks.csv")
    assert [r["metric"] for r in rows] == ["stopped"] and "0 of 12" in rows[0]["value"]


# --------------------------------------------------------------------------------------------------
# Suggestions, with controlled times
# --------------------------------------------------------------------------------------------------
def test_a_confirmed_win_at_most_seqlens_is_suggested(monkeypatch, tmp_path, capsys):
    """Times made up: dq M32 N16 is 10% faster than the default at every seqlen; the confirmation re-times both,
    and the suggestion carries the confirmed speed-ups."""
    calls = []

    def fake_time_fn(fn, device, **kwargs):
        blocks = _blocks_now("dq")
        calls.append(blocks)
        ms = 0.9 if blocks == (32, 16, 4, 1) else 1.0
        return common.Timing(ms, ms, ms)

    monkeypatch.setattr(tb, "time_fn", fake_time_fn)
    assert tb.main(["--smoke", "--out", str(tmp_path), "--kernels", "dq", "--seqlens", "32,64"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "SUGGEST" in ln)
    assert "dq [h2-kv2-d32-p10-bf16]: (64, 64, 4, 1) -> (32, 16, 4, 1)" in line
    assert "s32 x1.111 s64 x1.111" in line and "at 2 of 2 seqlens" in line
    # the sweep (2 candidates x 2 seqlens), then default, candidate, candidate, default at each seqlen
    d, c = (64, 64, 4, 1), (32, 16, 4, 1)
    assert calls == [d, c, d, c, d, c, c, d, d, c, c, d]
    rows = common.read_rows(tmp_path / "tune_blocks.csv")
    confirmed = [(r["provider"], r["value"]) for r in rows if r["metric"] == "confirm_time_ms"]
    assert len(confirmed) == 4 and ("dq M32 N16 w4 s1", "0.9") in confirmed


def _synthetic(times: dict[tuple[tuple[int, ...], int], float]) -> tb.TuneResult:
    env = common.BenchEnv(torch.device("cpu"), "cpu", "2025-01-01T00:00:00Z", "abc1234")
    result = tb.TuneResult(env, out_dir=None, csv_path=None, config=tb.TuneConfig())
    default = (128, 32, 8, 3)
    for (blocks, seqlen), ms in times.items():
        case = tb.ba.Case(batch=16384 // seqlen, seqlen=seqlen, nheads=32, nheads_kv=32, headdim=128, prompt_len=10,
                          dtype="bf16")
        result.records.append(tb.Record(tb.Candidate("dq", blocks), case, blocks == default, "timed",
                                        common.Timing(ms, ms, ms)))
    return result


def test_suggestions_need_a_win_above_3_percent_at_most_seqlens():
    d, a, b = (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)
    seqlens = (512, 1024, 2048, 4096)
    # a: 5% faster at three seqlens of four; b: 20% faster at two only
    times = {(d, s): 1.0 for s in seqlens}
    times.update({(a, 512): 1 / 1.05, (a, 1024): 1 / 1.05, (a, 2048): 1 / 1.05, (a, 4096): 1.01})
    times.update({(b, 512): 1 / 1.2, (b, 1024): 1 / 1.2, (b, 2048): 1.1, (b, 4096): 1.1})
    (sug,) = tb.suggestions(_synthetic(times))
    assert sug.candidate.blocks == a and sug.wins == 3 and sug.holds and sug.default == d
    # 2% faster everywhere is noise, not a win; two wins of four are not most
    times.update({(a, s): 1 / 1.02 for s in seqlens})
    (sug,) = tb.suggestions(_synthetic(times))
    assert sug.candidate.blocks == b and sug.wins == 2 and not sug.holds


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["--kernels", "fwd,pre"], "--kernels"),
    (["--kernels", "bwd"], "--kernels"),
    (["--seqlens", "0,64"], "--seqlens"),
    (["--seqlens", "-64"], "--seqlens"),
    (["--dtypes", "fp8"], "--dtypes"),
    (["--dtypes", "fp32"], "--dtypes"),
    (["--headdims", "100"], "--headdims"),
    (["--shapes", "32:5"], "--shapes"),
    (["--candidates", "fwd=1,2"], "--candidates"),
    (["--candidates", "pre=64,4"], "--candidates"),
    (["--kernels", "fwd", "--candidates", "dq=64,32,4,3"], "--candidates"),
    (["--time-budget", "0"], "--time-budget"),
    (["--out", str(common.RESULTS_DIR / "smoke")], "--out"),
])
def test_bad_command_line_names_the_argument(argv, flag, capsys):
    assert_names_the_argument(tb.main, argv, flag, capsys)


def test_candidates_replace_only_the_kernels_they_name():
    args = tb.build_parser().parse_args(["--candidates", "dq=128,64,8,3; dq=64,64,4,3 dq=128,64,8,3"])
    cfg = tb.make_config(args, smoke=False)
    case = tb.cases_of(cfg)[0]
    default, cands = tb.candidates_for("dq", case, torch.device("cpu"), cfg)
    assert [c.blocks for c in cands] == [default.blocks, (128, 64, 8, 3), (64, 64, 4, 3)]
    _, fwd = tb.candidates_for("fwd", case, torch.device("cpu"), cfg)
    assert {c.blocks for c in fwd[1:]} <= set(tb.CANDIDATES["fwd"])
    assert cfg.seqlens == (512, 1024, 2048, 4096) and case.shape == "b32-s512-h32-kv32-d128-p10-bf16"


# --------------------------------------------------------------------------------------------------
# On a GPU: a small real sweep
# --------------------------------------------------------------------------------------------------
@gpu_only
def test_gpu_small_sweep(tmp_path):
    argv = ["--out", str(tmp_path), "--seqlens", "512", "--headdims", "64", "--tokens", "1024", "--rep-ms", "20",
            "--warmup-ms", "5", "--candidates", "fwd=64,64,4,3 dkdv=64,64,8,3 dq=64,32,4,3"]
    assert tb.main(argv) == 0
    rows = _candidate_rows(tmp_path / "tune_blocks.csv")
    assert {r["provider"].split()[0] for r in rows} == set(tb.KERNELS)
    assert all(r["metric"] in ("time_ms", "skipped") for r in rows)
    assert sum(r["metric"] == "time_ms" for r in rows) >= 3  # at least every default
