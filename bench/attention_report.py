"""The report of bench_attention: what a run measured (RunResult), the ratio table, issue 5's targets, the plot and
the summary, and the same report rebuilt from the CSV rows of a sweep run in pieces (--report).

Ratio table: per case and mode, the fused op's median time over each measured peer's (below 1: fused is faster).
Targets (H100, bf16, causal, head dim 128, forward+backward, seqlen 512-4096): fused / sdpa_causal and fused /
sdpa_causal_flash time <= 1.15, sdpa2 / fused >= 1.5, eager / fused >= 5 (and, not a target, whether fused_atomic is
faster than fused); checked on GPU runs only. Plot: TFLOP/s (flash-attn's causal count) against seqlen, a panel per
(dtype, heads, head dim) and mode, a line per provider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llama_adapter_triton.bench.common import (
    CPU_NOTICE,
    BenchEnv,
    Panel,
    Timing,
    plot_panels,
    read_rows,
    unique_path,
)
from llama_adapter_triton.bench.harness import (
    BenchResult,
    log_outputs,
    stamped,
    targets_text,
    titled_table,
    verdict,
    write_summary,
)

if TYPE_CHECKING:  # the script's types, named in annotations only (the script imports this module)
    from llama_adapter_triton.bench.bench_attention import BenchConfig, Case

WHAT = "attention"


# --------------------------------------------------------------------------------------------------
# What a run measured
# --------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    case: Case
    provider: str
    mode: str
    timing: Timing
    tflops: float
    peak_mib: float | None


@dataclass
class RunResult(BenchResult):
    """What a run measured (or what a report rebuilt from CSV rows): the material of every report.
    measurements: Measurement; skipped: (provider, mode, shape, reason); checks: (shape, provider) -> err / tol."""

    cases: list[Case]
    providers: tuple[str, ...]
    modes: tuple[str, ...]
    config: BenchConfig | None = None  # None for a report rebuilt from rows
    source: str = "measured in this run"
    targets: list[TargetCheck] = field(default_factory=list)

    def median(self, shape: str, provider: str, mode: str) -> float | None:
        for m in self.measurements:
            if m.case.shape == shape and m.provider == provider and m.mode == mode:
                return m.timing.median_ms
        return None


# --------------------------------------------------------------------------------------------------
# Reports: ratio table, targets, plot, summary
# --------------------------------------------------------------------------------------------------
def report(result: RunResult, *, log: Callable[[str], None] = print, stem: str = WHAT) -> RunResult:
    """Print the ratio table (and, for GPU results, the targets); write the plot and the summary."""
    log(ratio_table(result))
    if result.env.is_cuda:
        result.targets = check_targets(result)
        log(format_targets(result.targets, result.env))
    else:
        log("Targets (H100) are checked on GPU runs only. " + CPU_NOTICE)
    result.plot_path = write_plot(result, stem=stem)
    result.summary_path = summary(result, stem=stem)
    log_outputs(result, log)
    return result


def ratio_table(result: RunResult) -> str:
    """Per configuration and mode: the fused op's median time over each peer's (below 1: fused is faster)."""
    measured = {m.provider for m in result.measurements}
    peers = [p for p in result.providers if p != "fused" and p in measured]  # the skipped ones are listed apart
    lines = []
    for case in result.cases:
        for mode in result.modes:
            fused = result.median(case.shape, "fused", mode)
            if fused is None:
                continue
            cells = []
            for p in peers:
                t = result.median(case.shape, p, mode)
                cells.append(f"{fused / t:.2f}" if t else "-")
            lines.append([case.shape, mode, f"{fused:.3f}"] + cells)
    return titled_table("Time ratio fused / peer (median; below 1 = the fused op is faster)",
                        ["shape", "mode", "fused ms"] + [f"fused/{p}" for p in peers], lines, result.env,
                        empty="Ratio table: the fused op was not measured.",
                        cpu_note="CPU smoke run: these ratios mean nothing for the GPU")


@dataclass
class TargetCheck:
    target: str
    shape: str
    value: float | None  # the measured ratio, None when a side was not measured
    bound: float
    met: bool | None

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.2f}"
        return f"{verdict(self.met):<12} {self.target:<44} {self.shape:<34} {shown} (bound {self.bound})"


# Issue 5's targets, stated for an H100, bf16, causal, head dim 128, forward+backward.
TARGET_SEQLENS = (512, 4096)


def check_targets(result: RunResult) -> list[TargetCheck]:
    checks = []
    for case in result.cases:
        if case.dtype != "bf16" or case.headdim != 128 or not TARGET_SEQLENS[0] <= case.seqlen <= TARGET_SEQLENS[1]:
            continue
        t = {p: result.median(case.shape, p, "full")
             for p in ("fused", "fused_atomic", "sdpa_causal", "sdpa_causal_flash", "sdpa2", "eager")}
        for name, num, den, bound, upper in (
                ("fused / sdpa_causal time <= 1.15", "fused", "sdpa_causal", 1.15, True),
                ("fused / sdpa_causal_flash time <= 1.15", "fused", "sdpa_causal_flash", 1.15, True),
                # not a target: whether deterministic=False should become the default (DESIGN.md)
                ("fused_atomic / fused time < 1 (atomic dq faster)", "fused_atomic", "fused", 1.0, True),
                ("sdpa2 / fused time >= 1.5 (1.5x faster)", "sdpa2", "fused", 1.5, False),
                ("eager / fused time >= 5 (5x faster)", "eager", "fused", 5.0, False)):
            if num not in result.providers or den not in result.providers:
                continue
            value = t[num] / t[den] if t[num] and t[den] else None
            met = None if value is None else (value <= bound if upper else value >= bound)
            checks.append(TargetCheck(name, case.shape, value, bound, met))
    return checks


def format_targets(checks: Sequence[TargetCheck], env: BenchEnv) -> str:
    if not checks:
        return ("Targets: none of the measured configurations is a target configuration "
                "(bf16, head dim 128, seqlen 512-4096, mode full).")
    head = "Targets (issue 5: H100, bf16, causal, head dim 128, forward+backward, seqlen 512-4096)"
    return targets_text(head, checks, env, "target checks")


def write_plot(result: RunResult, *, stem: str = WHAT) -> Path | None:
    """TFLOP/s against seqlen, one line per provider; one panel per (dtype, shape, head dim) and mode."""
    if not result.measurements:
        return None
    families = list(dict.fromkeys(c.family for c in result.cases))
    panels = []
    for family in families:
        for mode in result.modes:
            series = {}
            for p in result.providers:
                pts = [(m.case.seqlen, m.tflops) for m in result.measurements
                       if m.case.family == family and m.mode == mode and m.provider == p]
                if pts:
                    series[p] = pts
            panels.append(Panel(f"{mode} | {family}", series))
    tokens = sorted({c.batch * c.seqlen for c in result.cases})
    shown = f"{tokens[0]} tokens/step" if len(tokens) == 1 else f"{tokens[0]}-{tokens[-1]} tokens/step"
    title = stamped(f"zero-init attention: TFLOP/s (causal count, prompt part not counted), {shown}", result.env,
                    " | ")
    path = unique_path(result.out_dir, stem, ".png", result.env)
    return plot_panels(panels, path, xlabel="seqlen", ylabel="TFLOP/s", title=title, ncols=len(result.modes))


def summary(result: RunResult, *, stem: str = WHAT) -> Path:
    """The markdown record of the run (harness.write_summary): ratio table, targets (GPU runs), skips."""
    body = ["## Time ratios", "", ratio_table(result), ""]
    if result.env.is_cuda:
        body += ["## Targets", "", "```", format_targets(result.targets, result.env), "```", ""]
    return write_summary(result, "Attention benchmark", body, stem=stem, source=result.source,
                         skipped=[f"{p} {m} {s}: {r}" for p, m, s, r in result.skipped])


# --------------------------------------------------------------------------------------------------
# Reports rebuilt from CSV rows (a sweep run in pieces: one table, one plot)
# --------------------------------------------------------------------------------------------------
def result_from_csv(path: Path, out_dir: Path, *, case_of: Callable[[str], Case | None], providers: Sequence[str],
                    modes: Sequence[str], commit: str | None = None) -> RunResult:
    """The measurements of one commit on one GPU, gathered from the attention rows of a CSV (any number of
    runs; the latest row wins where a measurement was repeated). Default: the commit and GPU of the last row.
    The script says how a shape column reads back as its Case (case_of: None for a foreign one), and the order
    of its providers and modes. Raises ValueError when there is nothing to report."""
    rows = [r for r in read_rows(path) if r.get("what") == WHAT]
    if not rows:
        raise ValueError(f"{path} holds no '{WHAT}' rows")
    commit = commit or rows[-1]["git_commit"]
    gpu = rows[-1]["gpu_name"] if commit == rows[-1]["git_commit"] else \
        next((r["gpu_name"] for r in reversed(rows) if r["git_commit"] == commit), None)
    rows = [r for r in rows if r["git_commit"] == commit and r["gpu_name"] == gpu]
    if not rows:
        raise ValueError(f"{path} holds no '{WHAT}' rows of commit {commit}")
    values: dict[tuple[str, str, str], dict[str, str]] = {}
    skipped: dict[tuple[str, str, str], str] = {}
    for r in rows:  # in file order: later runs overwrite earlier ones
        key = (r["provider"], r["mode"], r["shape"])
        if r["metric"] == "skipped":
            skipped[key] = r["value"]
        else:
            values.setdefault(key, {})[r["metric"]] = r["value"]
            if r["metric"] == "time_median":
                skipped.pop(key, None)
    measurements = []
    for (prov, mode, shape), v in values.items():
        case = case_of(shape)
        if case is None or mode not in modes or "time_median" not in v:
            continue
        timing = Timing(float(v["time_median"]), float(v.get("time_p20", "nan")), float(v.get("time_p80", "nan")))
        peak = float(v["peak_mem"]) if "peak_mem" in v else None
        measurements.append(Measurement(case, prov, mode, timing, float(v["tflops"]), peak))
    if not measurements:
        raise ValueError(f"{path} holds no timed '{WHAT}' rows of commit {commit} on {gpu}")
    families = list(dict.fromkeys(m.case.family for m in measurements))
    cases = sorted({m.case for m in measurements}, key=lambda c: (families.index(c.family), c.seqlen))
    seen = list(dict.fromkeys(m.provider for m in measurements))
    order = tuple([p for p in providers if p in seen] + [p for p in seen if p not in providers])
    modes = tuple(m for m in modes if any(x.mode == m for x in measurements))
    env = BenchEnv(device=torch.device("cpu" if gpu == "cpu" else "cuda"), gpu_name=gpu,
                   date=max(r["date"] for r in rows), git_commit=commit)
    result = RunResult(env=env, out_dir=out_dir, csv_path=Path(path), cases=cases, providers=order, modes=modes,
                       source=f"rows of {path} for commit {commit} on {gpu} ({len(rows)} rows)")
    result.measurements = measurements
    result.skipped = [(p, m, s, why) for (p, m, s), why in skipped.items()]
    return result
