"""The one harness every script in bench/ runs on; each script keeps its cases, providers, FLOP formula and checks.

Import it before the kernels: without a GPU it sets TRITON_INTERPRET=1 (unless set), so that the Triton kernels run
under Triton's interpreter, as tests/conftest.py does. A script's `from llama_adapter_triton.bench.harness import`
sorts before its kernels/, model/ and train/ imports as long as those are `from` imports too (isort puts a plain
`import llama_adapter_triton.kernels...` first).

- Command line: bench_parser makes one --flag per field of the script's config dataclass (common.opt) plus --smoke;
  bench_config applies the smoke configuration and the flags; bench_main runs it: bad arguments exit 2 naming the
  flag, a provider that computes a wrong answer exits 1 with nothing of it timed.
- The run: BenchResult (rows appended to <what>.csv as they come, never rewritten), start_run and finish_run (the
  first and last lines), check_rows, metric_rows and skipped_row (the CSV rows: what, provider, mode, shape, metric,
  value, unit, gpu_name, date, git_commit), skip_reason (out of memory: a "skipped" row, not a crash). Every
  provider is checked against the oracle (common.Expected) before it is timed.
- The report: text_report (printed, a bar chart, the summary record), titled_table, write_summary (a markdown record
  beside the CSV), stamped (a plot's title), targets_text, log_outputs.
- sdpa_backend: the backend F.scaled_dot_product_attention picks (the attention, fine-tuning and decode rows say it).
common.py holds the tools underneath: environment, timing, memory, the correctness bar, CSV rows, output places,
plots, argument types and the random LLaMA models.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_adapter_triton.bench.common import (
    CPU_NOTICE,
    BenchEnv,
    ConfigError,
    CorrectnessError,
    Row,
    add_config_arguments,
    append_rows,
    bench_env,
    check_choices,
    check_csv,
    config_from_args,
    describe_exception,
    format_table,
    free_device_memory,
    is_oom,
    oom_reason,
    op_backend,
    plot_bars,
    resolve_out_dir,
    unique_path,
)

if not torch.cuda.is_available():
    # without a GPU the Triton kernels run under Triton's interpreter: set before `kernels` is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

CPU_RUN = "CPU smoke run: these numbers mean nothing for the GPU"  # under a plot's or a table's title


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
EPILOG = ("Lists are comma-separated. Without a GPU the run is the smoke configuration and its numbers mean nothing "
          "for the GPU.")


def bench_parser(prog: str, description: str, defaults: object, smoke: Mapping[str, object], *, epilog: str = EPILOG,
                 smoke_shown: str | None = None,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """A script's parser: extra(parser)'s own flags, --smoke (smoke_shown: how its help shows the smoke configuration),
    then one --flag per field of the config dataclass instance defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    if extra is not None:
        extra(parser)
    shown = ", ".join(f"{k}={v}" for k, v in smoke.items()) if smoke_shown is None else smoke_shown
    parser.add_argument("--smoke", action="store_true",
                        help=f"the tiny smoke configuration ({shown}); implied without a GPU; other flags still "
                             "narrow it")
    add_config_arguments(parser, defaults)
    return parser


def bench_config(args: argparse.Namespace, base: object, smoke: Mapping[str, object], *, is_smoke: bool,
                 providers: Iterable[str] | None = None) -> object:
    """base with the smoke fields (is_smoke) and then the flags given; with providers, --providers must name them."""
    cfg = config_from_args(args, dataclasses.replace(base, **smoke) if is_smoke else base)
    if providers is not None:
        check_choices("providers", cfg.providers, providers, "provider")
    return cfg


def bench_main(parser: argparse.ArgumentParser, args: argparse.Namespace, what: str,
               make_config: Callable[[bool], object], run: Callable[[object, BenchEnv, Path], object]) -> int:
    """A benchmark's main, after parsing: the smoke configuration where there is no GPU, the output folder
    and its CSV checked first, bad arguments as argparse errors naming them (exit 2), a failed correctness
    check as exit status 1 with nothing of the wrong provider timed.

    make_config(smoke) builds the run's configuration (ValueError: a bad argument);
    run(config, env, out_dir) measures (ConfigError: a bad argument found once data is read)."""
    env = bench_env()
    smoke = args.smoke or not env.is_cuda
    if not args.smoke and not env.is_cuda:
        print("No CUDA device: running the smoke configuration (--smoke).")
    try:
        cfg = make_config(smoke)
        out_dir = resolve_out_dir(cfg.out, env, smoke=smoke, name=what)
        try:
            check_csv(out_dir / f"{what}.csv")
        except ValueError as exc:
            raise ValueError(f"--out {out_dir}: {exc}") from None
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(cfg, env, out_dir)
    except CorrectnessError as exc:
        print(f"\nCORRECTNESS CHECK FAILED - the benchmark stops here.\n{exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        parser.error(str(exc))
    return 0


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    """What a run measured, the material of every report; a script's subclass adds its cases and configuration.
    The shared fields are keyword-only, so that a subclass's own fields follow out_dir and csv_path in order."""

    env: BenchEnv
    out_dir: Path
    csv_path: Path | None
    measurements: list = field(default_factory=list, kw_only=True)  # the script's Measurement records
    skipped: list[tuple] = field(default_factory=list, kw_only=True)  # (where..., reason), the script's order
    checks: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict, kw_only=True)  # -> err / tol
    plot_path: Path | None = field(default=None, kw_only=True)
    summary_path: Path | None = field(default=None, kw_only=True)

    def write(self, rows: Iterable[Row]) -> int:
        """Append rows to the run's CSV now (a run that stops half-way keeps what it measured)."""
        return append_rows(self.csv_path, rows, self.env)


def start_run(script: str, env: BenchEnv, csv_path: Path, log: Callable[[str], None], fused: str | None = None) -> None:
    """The run's first lines: the script and environment, the CPU notice, what runs the fused op, where rows go."""
    log(f"{script} | {env.describe()}")
    if not env.is_cuda:
        log(CPU_NOTICE)
    log(f"fused op: {op_backend(env.device) if fused is None else fused} | rows go to {csv_path}")


def finish_run(result: BenchResult, report: Callable[..., object], log: Callable[[str], None]) -> BenchResult:
    """The run's last lines: the script's report, then where the rows went."""
    log("")
    report(result, log=log)
    log(f"CSV rows appended to {result.csv_path}")
    return result


def metric_rows(what: str, provider: str, mode: str, shape: str,
                metrics: Iterable[tuple[str, float | int | str, str]]) -> list[Row]:
    """One row per (metric, value, unit)."""
    return [Row(what, provider, mode, shape, metric, value, unit) for metric, value, unit in metrics]


def skipped_row(what: str, provider: str, mode: str, shape: str, reason: str) -> Row:
    """A row saying why something was not measured."""
    return Row(what, provider, mode, shape, "skipped", reason, "")


def skip_reason(exc: BaseException, device: torch.device, *, any_error: bool = False) -> str:
    """Why a step is skipped after exc, called once the caller has dropped what the step built (a model): out of
    memory (common.oom_reason), anything else re-raised as the bug it is; any_error: any exception (a shape a peer
    does not take). The device's memory is freed, garbage collected first (the traceback may hold tensors)."""
    if any_error:
        reason = ("out of memory: " if is_oom(exc) else "") + describe_exception(exc)
    else:
        reason = oom_reason(exc)
    free_device_memory(device, collect=True)
    return reason


def check_rows(what: str, provider: str, shape: str, ratios: Mapping[str, float]) -> list[Row]:
    """A passed correctness check: the worst error / tolerance, and the names of the results checked."""
    return metric_rows(what, provider, "check", shape, [("max_err_over_tol", max(ratios.values()), "ratio"),
                                                        ("checked", " ".join(ratios), "")])


# --------------------------------------------------------------------------------------------------
# Reports: targets, plot, summary
# --------------------------------------------------------------------------------------------------
def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("MET" if met else "NOT MET")


def targets_text(head: str, checks: Sequence, env: BenchEnv, noun: str = "targets") -> str:
    """The targets (issue 5's, stated for an H100) one a line under head, and how many were met; checks carry
    .line() and .met."""
    if "H100" not in env.gpu_name:
        head += f" - measured on {env.gpu_name}, not an H100: informative only"
    met = sum(c.met is True for c in checks)
    return "\n".join([head] + [c.line() for c in checks] + [f"{met} of {len(checks)} {noun} met"])


def titled_table(title: str, header: Sequence[str], lines: Sequence[Sequence[object]], env: BenchEnv, *,
                 empty: str = "Nothing was measured.", cpu_note: str = CPU_RUN) -> str:
    """A results table under its title (with cpu_note after it on a CPU run), or empty when there are no lines."""
    if not lines:
        return empty
    return (title if env.is_cuda else f"{title} - {cpu_note}") + "\n" + format_table(header, lines)


def stamped(title: str, env: BenchEnv, sep: str = "\n") -> str:
    """A plot's title with the GPU, the date and the commit; on a CPU, the warning that the numbers mean nothing."""
    title = f"{title}{sep}{env.gpu_name} | {env.date} | {env.git_commit}"
    return title if env.is_cuda else f"{title}\n{CPU_RUN}"


def text_report(result: BenchResult, text: str, *, skipped: Sequence[str], groups: Mapping[str, Mapping[str, float]],
                title: str, ylabel: str, summary_title: str, stem: str, notes: Sequence[str] | None = None,
                log: Callable[[str], None] = print) -> BenchResult:
    """The report of a benchmark whose results read as one text (tables, projections, targets): printed with what
    was skipped, a bar chart of groups (common.plot_bars; none when nothing was measured) and the summary record,
    both named by date and commit beside the CSV."""
    log(text)
    if skipped:
        log("Skipped: " + "; ".join(skipped))
    if groups:
        result.plot_path = plot_bars(groups, unique_path(result.out_dir, stem, ".png", result.env), ylabel=ylabel,
                                     title=stamped(title, result.env))
    result.summary_path = write_summary(result, summary_title, ["```", text, "```", ""], stem=stem, notes=notes,
                                        skipped=skipped)
    log_outputs(result, log)
    return result


def write_summary(result: BenchResult, title: str, body: Sequence[str], *, stem: str, source: str | None = None,
                  notes: Sequence[str] | None = None, skipped: Sequence[str] = ()) -> Path:
    """A markdown record of the run, named by date and commit beside the CSV (the material for bench/RESULTS.md):
    the environment and configuration (result.config, if any), notes, the CPU notice, body, and what was skipped."""
    env, cfg = result.env, getattr(result, "config", None)
    lines = [f"# {title}, {env.date}", "", f"- GPU: {env.gpu_name}", f"- date: {env.date}",
             f"- commit: {env.git_commit}"]
    if source is not None:
        lines.append(f"- source: {source}")
    if cfg is not None:
        lines += [f"- torch {torch.__version__}", f"- configuration: {dataclasses.asdict(cfg)}"]
    lines += [f"- rows: {result.csv_path}; plot: {result.plot_path.name if result.plot_path else 'none'}", ""]
    if notes is not None:
        lines += [*notes, ""]
    if not env.is_cuda:
        lines += [f"**{CPU_NOTICE}**", ""]
    lines += list(body)
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in skipped] + [""]
    path = unique_path(result.out_dir, stem, ".md", env)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def log_outputs(result: BenchResult, log: Callable[[str], None]) -> None:
    log(f"plot: {result.plot_path}" if result.plot_path else "plot: nothing measured, no plot")
    log(f"summary: {result.summary_path}")


# --------------------------------------------------------------------------------------------------
# SDPA's backend choice (recorded next to the attention, fine-tuning and decode rows)
# --------------------------------------------------------------------------------------------------
_SDP_NAMES = {}
for _n in ("ERROR", "MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE"):
    _b = getattr(torch.nn.attention.SDPBackend, _n, None)
    if _b is not None:
        _SDP_NAMES[int(_b.value)] = _n


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, enable_gqa: bool) -> str:
    """The backend F.scaled_dot_product_attention picks for these tensors (torch's own dispatcher choice)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    try:
        idx = int(choose(q, k, v, None, 0.0, is_causal, scale=None, enable_gqa=enable_gqa))
    except Exception as exc:  # private API: record why rather than fail the benchmark
        return f"unknown ({describe_exception(exc, 120)})"
    return _SDP_NAMES.get(idx, f"backend-{idx}")


def sdpa_enabled_backends() -> str:
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
             "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}
    return " ".join(n for n, on in flags.items() if on) or "none"
