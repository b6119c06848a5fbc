"""The benchmarks' tools, under bench/harness.py: environment, timing, peak memory, correctness checks, CSV rows,
output places, plots, argument types, and the random LLaMA models of the end-to-end benchmarks.

Every result lands in one format, one measurement per row, appended to a CSV (never rewritten):

    what, provider, mode, shape, metric, value, unit, gpu_name, date, git_commit

with the GPU's name, the run's start date (UTC) and the short commit hash ("-dirty" when tracked files outside
bench/results/ differ). Rules these helpers enforce:
- On CUDA, times come from triton.testing.do_bench (median and the 20th/80th percentiles, L2 cleared before each
  repetition); on the CPU a perf_counter median/quantiles fallback: CPU numbers mean nothing for the GPU.
- Only full GPU runs write into bench/results/ (the files kept in the repo); CPU and smoke runs go to the folder
  given by --out, which must lie elsewhere, or to a fresh temporary folder.
- An existing CSV only ever gets rows appended, and only when its header is ours; plots and summaries get names
  carrying the date and the commit, so no earlier file is replaced.
- Nothing is timed before it is checked: a provider's results must lie within flash-attn's bar of an oracle
  computed in higher precision (Expected, check_results), else CorrectnessError stops the run.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llama_adapter_triton.model.llama import LLaMA

CSV_COLUMNS = ("what", "provider", "mode", "shape", "metric", "value", "unit", "gpu_name", "date", "git_commit")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
QUANTILES = (0.5, 0.2, 0.8)  # median first, as triton.testing.do_bench returns them

CPU_NOTICE = (
    "NOTE: no CUDA device - this is a smoke run on the CPU. CPU numbers mean nothing for the GPU: "
    "they only show that the benchmark runs and that every provider computes the right answer."
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchEnv:
    """Where and when a run happens; stamped on every CSV row."""

    device: torch.device
    gpu_name: str  # torch.cuda.get_device_name, or "cpu"
    date: str  # the run's start, ISO-8601 UTC, e.g. 2025-11-23T15:46:00Z
    git_commit: str  # short hash, "-dirty" appended when tracked files differ; else COMMIT's; else "unknown"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def stamp(self) -> str:
        """The date in a form fit for file names: 20251123-154600."""
        return self.date.replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")

    def describe(self) -> str:
        return f"device {self.gpu_name} | date {self.date} | commit {self.git_commit} | torch {torch.__version__}"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Short hash of HEAD, with "-dirty" when tracked files differ from it (bench/results/ excluded:
    appending results must not mark the next run dirty). Where git or the repository's .git is missing (a device
    machine gets a copy of the working tree), the commit in repo/COMMIT, which `bash bench/gpu_session.sh
    --write-commit` writes before the call; "unknown" when neither says."""
    try:
        top, head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                   capture_output=True, text=True, check=True, timeout=30).stdout.split()
        if Path(top).resolve() != repo.resolve():  # a copy of the tree inside some other repository
            return commit_file(repo)
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no",
                                 "--", ".", ":(exclude)bench/results"],
                                capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
        return commit_file(repo)
    return f"{head}-dirty" if status else head


def commit_file(repo: Path = REPO_ROOT) -> str:
    """The commit written into repo/COMMIT (a short or full hash, "-dirty" allowed), or "unknown"."""
    try:
        text = (repo / "COMMIT").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text if re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", text) else "unknown"


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bench_env(device: torch.device | None = None) -> BenchEnv:
    device = default_device() if device is None else torch.device(device)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return BenchEnv(device=device, gpu_name=gpu_name, date=date, git_commit=git_commit())


def op_backend(device: torch.device) -> str:
    """What kernels.zero_init_attention runs on this device: "triton" (CUDA), "triton-interpreter"
    (TRITON_INTERPRET=1, how the CPU runs the real kernels) or "torch-fallback" (two SDPA calls,
    kernels/sdpa_fallback.py)."""
    if device.type == "cuda":
        return "triton"
    return "triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch-fallback"


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    warmup_ms: float = 25,
    rep_ms: float = 100,
    cpu_warmup: int = 1,
    cpu_reps: int = 3,
) -> Timing:
    """Median and 20th/80th percentile run time of fn() in milliseconds.

    CUDA: triton.testing.do_bench(fn, warmup_ms, rep_ms, grad_to_none, quantiles=[0.5, 0.2, 0.8]).
    CPU: cpu_warmup untimed calls, then cpu_reps calls timed with time.perf_counter; the gradients in
    grad_to_none are reset before each call, as do_bench does. Create fn's inputs before calling this:
    only fn itself is timed.
    """
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                   grad_to_none=list(grad_to_none) or None,
                                                   quantiles=list(QUANTILES))
        return Timing(float(median), float(p20), float(p80))
    if cpu_reps < 1:
        raise ValueError(f"cpu_reps must be >= 1, got {cpu_reps}")
    for _ in range(cpu_warmup):
        fn()
    times = []
    for _ in range(cpu_reps):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles_ms(times)


def peak_memory_mib(fn: Callable[[], object], device: torch.device,
                    grad_to_none: Sequence[torch.Tensor] = ()) -> float | None:
    """Peak CUDA memory allocated (MiB) while fn() runs once, counting what was allocated before
    (the inputs, a saved autograd graph). None off CUDA: the CPU allocator keeps no such record."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    reset_peak_memory(device)
    fn()
    return peak_memory_since_reset(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory measurement (CUDA; nothing on the CPU). Read it with peak_memory_since_reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_since_reset(device: torch.device) -> float | None:
    """Peak CUDA memory allocated (MiB) since reset_peak_memory; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def quantiles_ms(times_ms: Sequence[float]) -> Timing:
    """Median and 20th/80th percentiles of measured times (ms), as time_fn reports them."""
    if not times_ms:
        raise ValueError("quantiles_ms: no times")
    median, p20, p80 = torch.quantile(torch.tensor(list(times_ms), dtype=torch.float64),
                                      torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return Timing(median, p20, p80)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_device_memory(device: torch.device, *, collect: bool = False) -> None:
    """Hand cached CUDA blocks back; with collect, first collect garbage (after an exception, whose traceback
    may hold tensors: an out-of-memory error). gc.collect takes ~0.2 s with torch loaded, hence optional."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def oom_reason(exc: BaseException) -> str:
    """'out of memory: <the error in one line>' for an out-of-memory error; any other exception is re-raised (a bug).
    The caller then drops exc and what it held, and frees the device's memory."""
    if not is_oom(exc):
        raise exc
    return "out of memory: " + describe_exception(exc)


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """One line naming the exception: 'OutOfMemoryError: CUDA out of memory. Tried to ...'."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Correctness: nothing is timed before its answer is checked
# --------------------------------------------------------------------------------------------------
class CorrectnessError(AssertionError):
    """A provider's results disagree with the oracle: nothing is timed for a wrong answer."""


# Smallest tolerance, relative to max(1, |oracle|): keeps checks from failing on rounding alone.
TOL_FLOOR = {"fp32": 1e-5, "fp16": 1e-4, "bf16": 1e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().to(b.dtype) - b).abs().max().item() if b.numel() else 0.0


@dataclass
class Expected:
    """The oracle of a check, with a tolerance per result in flash-attn's style:
        tol = 2 * |baseline - oracle|  +  2 * rounding of the oracle in the low dtype (at magnitude |x| + 0.3)
              +  TOL_FLOOR * max(1, max |oracle|),
    where the oracle is computed in higher precision (fp32, fp64 for fp32 runs) and the baseline is the
    reference formulation run in the benchmark's own low dtype. baseline_desc names it in messages.
    With normalize, every result is first divided by its oracle's max |x| (scale), so that results of any
    magnitude (gradients of 1e-4) are held to the bar that results of magnitude 1 are; errors are then
    relative to that max."""

    oracle: dict[str, torch.Tensor]
    tol: dict[str, float]
    baseline_err: dict[str, float]
    oracle_desc: str = "fp32 reference"
    baseline_desc: str = "the reference in the benchmark's dtype"
    scale: dict[str, float] = dataclasses.field(default_factory=dict)  # result name -> factor (1 when absent)

    @classmethod
    def from_runs(cls, oracle: Mapping[str, torch.Tensor], baseline: Mapping[str, torch.Tensor], dtype: str, *,
                  oracle_desc: str = "fp32 reference", baseline_desc: str = "the reference in the benchmark's dtype",
                  normalize: bool = False) -> Expected:
        low = DTYPES[dtype]
        tol, base_err, scale = {}, {}, {}
        oracle = dict(oracle)
        for name in oracle:
            if normalize:
                top = oracle[name].abs().max().item() if oracle[name].numel() else 0.0
                scale[name] = 1.0 / top if top > 0 else 1.0
                oracle[name] = oracle[name] * scale[name]
        for name, ref in oracle.items():
            base_err[name] = max_abs_err(baseline[name] * scale.get(name, 1.0), ref)
            if ref.numel():
                r = ref.to(low)
                rounding = ((r + 0.3 - 0.3) - r).abs().max().item()
                magnitude = max(1.0, ref.abs().max().item())
            else:
                rounding, magnitude = 0.0, 1.0
            tol[name] = 2 * base_err[name] + 2 * rounding + TOL_FLOOR[dtype] * magnitude
        return cls(oracle, tol, base_err, oracle_desc, baseline_desc, scale)


def check_results(provider: str, where: str, got: Mapping[str, torch.Tensor | None], expected: Expected,
                  problems: Sequence[str] = ()) -> dict[str, float]:
    """Compare a provider's results (None: a result it failed to produce, e.g. a gradient that never arrived)
    with the oracle. Returns error / tolerance per result; raises CorrectnessError naming every result that
    fails, and the problems found before (missing gradients, wrong shapes)."""
    problems = list(problems)
    ratios = {}
    for name, value in got.items():
        if value is None:
            problems.append(f"{name}: not computed")
            continue
        want = expected.oracle[name]
        if tuple(value.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(value.shape)}, expected {tuple(want.shape)}")
            continue
        err, tol = max_abs_err(value * expected.scale.get(name, 1.0), want), expected.tol[name]
        ratios[name] = err / tol
        if not err <= tol:  # also catches NaN
            relative = " (relative to the oracle's max |x|)" if name in expected.scale else ""
            problems.append(f"{name}: max abs error{relative} {err:.3e} > tolerance {tol:.3e} "
                            f"({expected.baseline_desc} errs by {expected.baseline_err[name]:.3e})")
    if problems:
        raise CorrectnessError(f"provider {provider!r} computes a WRONG answer on {where} (against the "
                               f"{expected.oracle_desc}); it is not timed:\n  " + "\n  ".join(problems))
    return ratios


# --------------------------------------------------------------------------------------------------
# CSV rows
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One measurement; the environment columns are added when it is written."""

    what: str  # the subject: "attention", later "finetune", "decode"
    provider: str  # fused, eager, sdpa2, ...
    mode: str  # fwd, bwd, full; "all" for a fact about every mode, "check" for the correctness check
    shape: str  # e.g. b8-s2048-h32-kv8-d128-p10-bf16; "all" for a fact about every shape
    metric: str  # time_median, tflops, peak_mem, skipped, ...
    value: float | int | str
    unit: str  # ms, TFLOP/s, MiB, ... ("" for text)

    def as_dict(self, env: BenchEnv) -> dict[str, str]:
        value = repr(float(self.value)) if isinstance(self.value, float) else str(self.value)  # round-trips exactly
        return {"what": self.what, "provider": self.provider, "mode": self.mode, "shape": self.shape,
                "metric": self.metric, "value": value, "unit": self.unit, "gpu_name": env.gpu_name,
                "date": env.date, "git_commit": env.git_commit}


def check_csv(path: Path) -> None:
    """Raise ValueError unless path is absent, empty, or a CSV with our header (one we may append to)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    if not path.is_file():
        raise ValueError(f"{path} exists and is not a file")
    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if tuple(header) != CSV_COLUMNS:
        raise ValueError(f"{path} exists with header {header}, not {list(CSV_COLUMNS)}: refusing to append "
                         "to a file that is not ours")


def append_rows(path: Path, rows: Iterable[Row], env: BenchEnv) -> int:
    """Append rows to the CSV at path, creating it with the header when it is new or empty.

    An existing file is never rewritten; one whose header is not CSV_COLUMNS is refused (ValueError)
    and left untouched. Returns the number of rows written."""
    path = Path(path)
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        check_csv(path)
        with path.open("rb") as f:  # a file cut short mid-row still gets its rows on lines of their own
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) not in (b"\n", b"\r")
        if needs_newline:
            with path.open("a", encoding="utf-8") as f:
                f.write("\n")
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict(env))
    return len(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# Where results go
# --------------------------------------------------------------------------------------------------
def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def resolve_out_dir(out: str | os.PathLike | None, env: BenchEnv, *, smoke: bool, name: str) -> Path:
    """The folder a run writes its CSV and plot to.

    - A full run on CUDA without --out: bench/results/ (kept in the repo).
    - Otherwise without --out: a fresh temporary folder (printed by the caller).
    - --out inside bench/results/ on the CPU or in a smoke run: ValueError naming --out, since those
      numbers must never mix with the GPU results."""
    keeps_results = env.is_cuda and not smoke
    if out is None:
        path = RESULTS_DIR if keeps_results else Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    else:
        path = Path(out).expanduser()
        if not keeps_results and _inside(path, RESULTS_DIR):
            why = "a smoke run" if smoke else "a CPU run"
            raise ValueError(f"--out {out}: {why} never writes into {RESULTS_DIR} (the GPU results kept in the "
                             "repo); pass a folder elsewhere")
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def unique_path(folder: Path, stem: str, suffix: str, env: BenchEnv) -> Path:
    """folder/stem_<date>_<commit>suffix, with -1, -2, ... added if a file of that name exists:
    generated files never replace earlier ones."""
    base = f"{stem}_{env.stamp}_{env.git_commit}"
    path = Path(folder) / f"{base}{suffix}"
    n = 1
    while path.exists():
        path = Path(folder) / f"{base}-{n}{suffix}"
        n += 1
    return path


# --------------------------------------------------------------------------------------------------
# Plots and tables
# --------------------------------------------------------------------------------------------------
def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported when a plot is first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write fig as a PNG at path (its folder made), and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


@dataclass
class Panel:
    title: str
    series: dict[str, list[tuple[float, float]]]  # name -> [(x, y), ...]


def plot_panels(panels: Sequence[Panel], path: Path, *, xlabel: str, ylabel: str, title: str,
                ncols: int = 3, logx_base: int | None = 2) -> Path:
    """Write a PNG grid of line plots, one panel each; a series keeps its colour and marker in every
    panel. Panels without data say so rather than vanish."""
    plt = _pyplot()
    if not panels:
        raise ValueError("plot_panels: no panels to draw")
    names: list[str] = []
    for panel in panels:
        names += [n for n in panel.series if n not in names]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    style = {n: (colors[i % len(colors)], markers[i % len(markers)]) for i, n in enumerate(names)}

    ncols = max(1, min(ncols, len(panels)))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        drawn = False
        for name, points in panel.series.items():
            points = sorted(p for p in points if p[1] == p[1])  # drop NaN
            if not points:
                continue
            color, marker = style[name]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name, color=color, marker=marker)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if logx_base and drawn:
            ax.set_xscale("log", base=logx_base)
            xs = sorted({p[0] for pts in panel.series.values() for p in pts})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_bars(groups: Mapping[str, Mapping[str, float]], path: Path, *, ylabel: str, title: str,
              value_format: str = "{:,.0f}") -> Path:
    """Write a PNG bar chart: one cluster per group (e.g. a model or a batch size), one bar per series
    (e.g. a provider, keeping its colour in every cluster), each bar labelled with its value."""
    plt = _pyplot()
    if not groups:
        raise ValueError("plot_bars: no groups to draw")
    names: list[str] = []
    for series in groups.values():
        names += [n for n in series if n not in names]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.9 * len(groups) * len(names)), 4.2))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g, series in enumerate(groups.values()) if name in series]
        ys = [series[name] for series in groups.values() if name in series]
        bars = ax.bar(xs, ys, width, label=name, color=colors[i % len(colors)])
        ax.bar_label(bars, labels=[value_format.format(y) for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table (also valid GitHub markdown)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command-line parsing
# --------------------------------------------------------------------------------------------------
def list_of(parse_item: Callable[[str], object], what: str) -> Callable[[str], tuple]:
    """An argparse `type` for comma-separated lists ("256,512,1024"). A bad item raises
    ArgumentTypeError, which argparse reports with the argument's name."""

    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        out = []
        for item in items:
            try:
                out.append(parse_item(item))
            except (ValueError, KeyError) as exc:
                raise argparse.ArgumentTypeError(f"{item!r} is not a valid {what}: {exc}") from None
        return tuple(out)

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be a positive number, got {value}")
    return value


def yes_no(text: str) -> bool:
    """A boolean option's value: yes / no (true / false, 1 / 0 too)."""
    value = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError("choose yes or no")
    return value


def one_of(choices: Iterable[str]) -> Callable[[str], str]:
    """An item parser (for list_of / argparse_type) that takes one of choices."""
    choices = tuple(choices)

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"choose from {', '.join(choices)}")
        return text

    return parse


dtype_name = one_of(DTYPES)


def argparse_type(parse_item: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a ValueError-raising parser for argparse so that its message reaches the user."""

    def parse(text: str) -> object:
        try:
            return parse_item(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    return parse


def opt(help: str, parse: Callable[[str], object], metavar: str) -> dict:
    """The metadata of a config dataclass field that becomes a command-line option (add_config_arguments)."""
    return {"help": help, "parse": parse, "metavar": metavar}


class ConfigError(ValueError):
    """A configuration that does not hold together, found after parsing; names the option."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument --{argument.replace('_', '-')}: {message}")
        self.argument = argument


def add_config_arguments(parser: argparse.ArgumentParser, defaults: object) -> None:
    """One --option per field of the config dataclass instance defaults (fields carry opt() metadata); every
    option defaults to None, so that config_from_args can tell what was given."""
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=f.metadata["parse"], default=None,
                            metavar=f.metadata["metavar"], help=f"{f.metadata['help']} (default: {shown})")


def config_from_args(args: argparse.Namespace, base: object) -> object:
    """base (a config dataclass instance) with the options given on the command line; lists deduplicated."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(base) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(base, **given)
    return dataclasses.replace(cfg, **{f.name: tuple(dict.fromkeys(getattr(cfg, f.name)))
                                       for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), tuple)})


def check_choices(argument: str, given: Sequence[str], choices: Iterable[str], what: str) -> None:
    """ConfigError naming argument unless every item of given is one of choices."""
    choices = list(choices)
    unknown = [g for g in given if g not in choices]
    if unknown:
        raise ConfigError(argument, f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(choices)}")


# --------------------------------------------------------------------------------------------------
# Random LLaMA models for the end-to-end benchmarks (fine-tuning, decode)
# (model/ is imported inside the functions: importing it imports kernels, and a script must be able to set
# TRITON_INTERPRET before that happens)
# --------------------------------------------------------------------------------------------------
# The smoke runs' model: 2 layers, dim 64, 2 heads of 32 (tiny enough for Triton's interpreter).
SMOKE_MODEL = dict(dim=64, n_layers=2, n_heads=2, vocab_size=512, multiple_of=32, norm_eps=1e-5, max_seq_len=512)


def model_config(name: str):
    """The LLaMAConfig of a model/ preset (llama-7b, llama-13b, llama2-13b, ...) or of "smoke"."""
    from llama_adapter_triton.model.llama import PRESETS, LLaMAConfig

    if name == "smoke":
        return LLaMAConfig(name="smoke", **SMOKE_MODEL)
    if name not in PRESETS:
        raise ValueError(f"use smoke or a preset of model/: {', '.join(PRESETS)}")
    return LLaMAConfig.from_name(name)


def model_name(text: str) -> str:
    """An argparse item parser for model names (model_config checks them)."""
    model_config(text)
    return text


def random_llama(name: str, adapter, *, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 quantize: str | None = None) -> LLaMA:
    """A randomly initialised LLaMA of preset name with an adapter (AdapterConfig), made for benchmarks:

    - the base is built directly in dtype on device (no fp32 copy of a 7B model) with torch's default init,
      and frozen; the adapter is fp32 (prompts N(0, 1));
    - quantize ("nf4" or "int8", model/quantize.py): the model is built on the meta device and made one module at a
      time, each base linear quantized as soon as its weight is drawn (dtype is then the compute dtype), so that
      building a 70B in nf4 never holds more than one bf16 layer;
    - the gates are spread over [-1.5, 1.5] in every adapted layer (as after some training) instead of 0: with
      zero gates the prompts get no gradient and the prompt part adds nothing, so the correctness checks
      would not see it."""
    from llama_adapter_triton.model.adapter import adapter_layers, mark_only_adapter_as_trainable
    from llama_adapter_triton.model.llama import LLaMA

    config = model_config(name)
    if adapter.adapter_layers > config.n_layers:
        raise ConfigError("adapter_layers", f"{adapter.adapter_layers} exceeds the {config.n_layers} layers of {name}")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if quantize else device):
            model = LLaMA(config, adapter)
        if quantize:
            _materialize_quantized(model, quantize, dtype, device)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for m in adapter_layers(model).values():
            m.gate.copy_(torch.linspace(-1.5, 1.5, m.gate.numel()))
    mark_only_adapter_as_trainable(model)
    return model


def _materialize_quantized(model: LLaMA, mode: str, dtype: torch.dtype, device: torch.device) -> None:
    """Give a model built on the meta device its weights on device, one module at a time, with torch's default init
    (RMSNorm weights 1, a fresh adapter), the base linears quantized to mode as they are drawn."""
    from llama_adapter_triton.model.adapter import base_name
    from llama_adapter_triton.model.quantize import check_cpu_nf4, check_quantize, quantized_linear, quantized_names

    check_quantize(mode)
    why = check_cpu_nf4(model.config, device) if mode == "nf4" else None
    if why:
        raise ConfigError("bases", f"nf4 on the CPU: {why}")
    linears = {n.removesuffix(".weight") for n in quantized_names(model)}  # the base's names
    for name, module in list(model.named_modules()):
        # a V2-wrapped linear is its wrapper's .linear (adapter.base_name: its base name is the wrapper's)
        if isinstance(module, torch.nn.Linear) and base_name(f"{name}.weight").removesuffix(".weight") in linears:
            weight = torch.empty(module.weight.shape, dtype=dtype, device=device)
            torch.nn.init.kaiming_uniform_(weight, a=5 ** 0.5)  # nn.Linear's own init
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized_linear(weight, mode, compute_dtype=dtype))
            del weight
        elif any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            reset = getattr(module, "reset_adapter", None) or getattr(module, "reset_parameters", None)
            if reset is not None:
                reset()
            else:  # RMSNorm
                with torch.no_grad():
                    module.weight.fill_(1.0)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def unpatched(model: LLaMA) -> AbstractContextManager:
    """A benchmark provider's default patch: nothing changed while it runs."""
    return nullcontext()


@contextmanager
def base_upcast(model: LLaMA, dtype: torch.dtype = torch.float32) -> Iterator[LLaMA]:
    """The model's base weights in dtype while inside (for an oracle), cast back after. bf16/fp16 -> fp32 ->
    bf16/fp16 is exact, so the model leaves as it came. Costs the base's size in dtype, once."""
    from llama_adapter_triton.model.adapter import cast_base

    low = model.tok_embeddings.weight.dtype
    cast_base(model, dtype)
    try:
        yield model
    finally:
        cast_base(model, low)
        free_device_memory(model.tok_embeddings.weight.device)


@contextmanager
def attention_impl(model: LLaMA, impl: str) -> Iterator[LLaMA]:
    """model computing its attention with impl ("fused" or "eager", model.set_attention_impl) while inside."""
    from llama_adapter_triton.model.llama import set_attention_impl

    before = set_attention_impl(model, impl)
    try:
        yield model
    finally:
        set_attention_impl(model, before)


@contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """No TF32 inside: an fp32 oracle is computed in true fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

