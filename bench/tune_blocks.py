"""Block-size sweep for the fused op's Triton kernels: which (BLOCK_M, BLOCK_N, num_warps, num_stages) should
kernels/block_sizes.py's policy choose? Its choices compile without spills (kernels.compile_check) but have
never been timed on a GPU; this tool times the alternatives and suggests changes. It never changes the policy.

    llama-adapter bench tune-blocks --out runs/tune                # one GPU, ~3 minutes: the LLaMA-7B shape
    llama-adapter bench tune-blocks --shapes gqa --out runs/tune   # 32 query heads, 8 kv heads: a second call
    llama-adapter bench tune-blocks --kernels dq --candidates "dq=128,64,8,3 dq=64,64,4,3"   # chosen blocks only
    llama-adapter bench tune-blocks --smoke --out /tmp/tune-smoke  # CPU: under the interpreter, a tiny shape
    llama-adapter bench tune-blocks --kernels tma --out runs/tune  # H100 / H200: the opt-in TMA forward's blocks

One kernel at a time (fwd timed by the op's forward, dkdv and dq by its backward; tma, the opt-in Hopper forward,
only when --kernels names it, by backend="tma"'s forward, checked against the pointer kernels), the others keeping
the policy's choice (kernels.block_sizes.override_blocks), over a curated list per kernel (CANDIDATES: what compiles
for sm_90 without spills, the policy's choice first). Each candidate is checked against the default blocks' results
before it is timed, |got - default| <= RTOL * (|default| + its row's rms), RTOL 2^-5 for bf16 and 2^-8 for fp16: one
outside it gets a "FAILED correctness" row and is not timed, and the sweep exits with status 1 at the end; one that
needs more shared memory than the GPU has gets a "skipped" row. The best candidate is timed again against the default
(default, candidate, candidate, default at every seqlen), and only these confirmed speed-ups, above 3% at more than
half of the seqlens, are suggested. Rows go to OUT/tune_blocks.csv (bench/common.py's format). The details:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_adapter_triton.bench import bench_attention as ba
from llama_adapter_triton.bench.common import (
    CPU_NOTICE,
    BenchEnv,
    ConfigError,
    CorrectnessError,
    Row,
    Timing,
    add_config_arguments,
    append_rows,
    argparse_type,
    check_choices,
    config_from_args,
    describe_exception,
    format_table,
    free_device_memory,
    is_oom,
    list_of,
    one_of,
    op_backend,
    opt,
    positive_float,
    positive_int,
    time_fn,
)
from llama_adapter_triton.bench.harness import bench_main, start_run
from llama_adapter_triton.kernels import block_sizes

WHAT = "tune_blocks"
KERNELS = ("fwd", "dkdv", "dq")  # swept by default
# swept when --kernels names them: tma, the opt-in Hopper forward (backend="tma"; bench_attention's fused-tma)
OPT_IN_KERNELS = ("tma",)
SWEEPABLE = KERNELS + OPT_IN_KERNELS
TIMED_MODE = {"fwd": "fwd", "dkdv": "bwd", "dq": "bwd", "tma": "fwd"}  # what runs each kernel: forward or backward
PROVIDER = {"tma": "fused-tma"}  # bench_attention's provider that runs a kernel, where it is not "fused"
TUNE_DTYPES = ("bf16", "fp16")  # the lists are for 16-bit tensor-core dots; fp32 runs IEEE dots on smaller tiles
RTOL = {"bf16": 2.0**-5, "fp16": 2.0**-8}  # 8 units of rounding (2^-8 and 2^-11) of each dtype
WIN = 0.03  # a candidate must be faster than the default by more than this to count as a win at a seqlen

# Estimates for the plan printed up front (CUDA): kernels.compile_check compiled these candidates for sm_90 in
# 1-7 s each (2.5 s typical, more with spills) on one CPU core; a measurement is the check (one forward, plus a
# backward and six comparisons for dkdv / dq) and do_bench's 5 estimating calls, warm-up and repetitions.
COMPILE_S = 2.5
MEASURE_OVERHEAD_S = 0.15
CASE_SETUP_S = 1.0  # inputs and the default blocks' reference results, per shape


def _grid(ms: Sequence[int], ns: Sequence[int], warps: int, stages: Sequence[int]) -> list[tuple[int, ...]]:
    return [(m, n, warps, s) for m in ms for n in ns for s in stages]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Left out: what spills registers for bf16 at head dim 128 on sm_90
# (4 warps with 128-row fwd / dq tiles or 128-key dkdv tiles) and what exceeds the H100's shared memory
# (fwd M128 N128 or M64 N128 in 4 stages, dq M128 N64 in 4 stages), both per kernels.compile_check.
CANDIDATES: dict[str, list[tuple[int, ...]]] = {
    # one program per 64/128-query block; loops over key blocks of N
    "fwd": (_grid([128], [32, 64], 8, [2, 3, 4]) + _grid([128], [128], 8, [2, 3])
            + _grid([64], [32], 4, [3, 4]) + _grid([64], [64], 4, [2, 3, 4])
            + _grid([64], [64], 8, [3]) + _grid([64], [128], 8, [2, 3])),
    # one program per key block of N (k, v and their gradients held); loops over query blocks of M
    "dkdv": (_grid([16, 32], [128], 8, [2, 3]) + _grid([32], [128], 8, [4]) + _grid([64], [128], 8, [3])
             + _grid([16, 32], [64], 4, [2, 3]) + _grid([32], [64], 8, [3]) + _grid([64], [64], 8, [2, 3])),
    # one program per query block of M (q, dout, dq held, and one prompt-gradient partial per block: M also sets
    # how many partials the host sums); loops over key blocks of N
    "dq": (_grid([128], [16], 8, [2, 3]) + _grid([128], [32], 8, [2, 3, 4]) + _grid([128], [64], 8, [2, 3])
           + _grid([64], [32, 64], 4, [2, 3]) + _grid([64], [16, 32, 64], 8, [3])),
    # the TMA forward: 4 warps are warp-specialized (64-row blocks: 128 crashes Triton 3.6 with a prompt), 8 warps
    # are TMA alone (does the specialization pay?); M64 N128 in 3 stages exceeds the H100's shared memory
    "tma": _grid([64], [128], 4, [2]) + _grid([64], [64], 4, [2, 3]) + _grid([64, 128], [128], 8, [2])
           + _grid([128], [64], 8, [2]),
}
# the smoke run's: two per kernel, block sizes that split its 64- and 128-token sequences differently
# (the interpreter's _blocks choose 64 x 64, which is the first of each)
SMOKE_CANDIDATES = {"fwd": [(64, 64, 4, 1), (32, 32, 4, 1)], "dkdv": [(64, 64, 4, 1), (16, 32, 4, 1)],
                    "dq": [(64, 64, 4, 1), (32, 16, 4, 1)]}


def _pairs(lists: dict[str, list[tuple[int, ...]]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((k, b) for k, blocks in lists.items() for b in blocks)


# --------------------------------------------------------------------------------------------------
# Candidates and their correctness check
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    kernel: str  # fwd, dkdv or dq
    blocks: tuple[int, ...]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

    @property
    def name(self) -> str:
        m, n, w, s = self.blocks
        return f"{self.kernel} M{m} N{n} w{w} s{s}"


def default_blocks(case: ba.Case, device: torch.device) -> dict:
    """What block_sizes.choose gives for a case on this device (the launchers' own call)."""
    import triton

    head_dim_pad = max(16, triton.next_power_of_2(case.headdim))
    return block_sizes.choose(case.torch_dtype, head_dim_pad, case.seqlen, case.prompt_len,
                              block_sizes.shared_memory(device))


def candidates_for(kernel: str, case: ba.Case, device: torch.device, cfg: TuneConfig) -> tuple[Candidate, list]:
    """(the default, the candidates to time for this kernel and case): the default first, then the kernel's
    list from the configuration (cfg.candidates where it names the kernel, else CANDIDATES)."""
    default = Candidate(kernel, tuple(default_blocks(case, device)[kernel]))
    given = [b for k, b in cfg.candidates if k == kernel] or CANDIDATES[kernel]
    others = [Candidate(kernel, tuple(b)) for b in dict.fromkeys(map(tuple, given)) if tuple(b) != default.blocks]
    return default, [default] + others


def deviation(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> float:
    """Largest |got - ref| / (rtol * (|ref| + rms of ref's row over the last dimension)) over all elements: at
    most 1 where got agrees with ref as two correct runs in a 16-bit dtype do. NaN counts as a failure
    (the ratio is NaN). A tiny floor (1e-6 of the largest |ref|) keeps rows of exact zeros comparable."""
    g, r = got.detach().float(), ref.detach().float()
    if r.numel() == 0:
        return 0.0
    scale = r.abs() + r.pow(2).mean(dim=-1, keepdim=True).sqrt()
    floor = 1e-6 * r.abs().max() + torch.finfo(torch.float32).tiny
    return ((g - r).abs() / (rtol * scale + floor)).max().item()


def _results(fwd: Callable[[], torch.Tensor], x: ba.Inputs, backward: bool) -> dict[str, torch.Tensor]:
    """The forward's output and (backward) the six gradients of x.dout through it."""
    out = fwd()
    results = {"out": out.detach()}
    if backward:
        grads = torch.autograd.grad(out, x.leaves(), x.dout)
        results.update(zip(ba.GRAD_NAMES, (g.detach() for g in grads), strict=True))
    return results


def is_out_of_resources(exc: BaseException) -> bool:
    """Triton's launch-time refusal (OutOfResources: the kernel needs more shared memory than the GPU has), or the
    driver's (too many registers for the launch): the candidate cannot run here, nothing is broken."""
    from triton.runtime.errors import OutOfResources

    text = str(exc).lower()
    return isinstance(exc, OutOfResources) or "out of resource" in text or "too many resources" in text


# CUDA errors after which the context is lost (every later call fails): a kernel that read or wrote out of bounds
FATAL_CUDA_ERRORS = ("illegal memory access", "illegal address", "misaligned address", "unspecified launch failure",
                     "device-side assert")


def is_fatal_cuda_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(e in text for e in FATAL_CUDA_ERRORS)


# --------------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------------
_kernel = one_of(SWEEPABLE)


def _tune_dtype(text: str) -> str:
    if text not in TUNE_DTYPES:
        why = " (the candidate lists are for 16-bit dots; fp32 runs IEEE dots on its own smaller tiles)" \
            if text == "fp32" else ""
        raise ValueError(f"choose from {', '.join(TUNE_DTYPES)}{why}")
    return text


def _candidate_list(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """'fwd=128,64,8,3 dq=64,32,4,3' (space- or ;-separated KERNEL=M,N,WARPS,STAGES, kernels.block_sizes'
    parse_blocks form) -> (("fwd", (128, 64, 8, 3)), ("dq", (64, 32, 4, 3)))."""
    items = text.replace(";", " ").split()
    if not items:
        raise ValueError("expected KERNEL=M,N,WARPS,STAGES items separated by spaces")
    pairs = []
    for item in items:
        kernel, blocks = block_sizes.parse_blocks(item)
        if kernel not in SWEEPABLE:
            raise ValueError(f"{item!r}: only {', '.join(SWEEPABLE)} are swept")
        pairs.append((kernel, blocks))
    return tuple(pairs)


@dataclass(frozen=True)
class TuneConfig:
    """The GPU sweep's defaults, in one place: the command line is generated from these fields."""

    seqlens: tuple[int, ...] = field(default=(512, 1024, 2048, 4096), metadata=opt(
        "sequence lengths", list_of(positive_int, "sequence length"), "S,S,..."))
    headdims: tuple[int, ...] = field(default=(128,), metadata=opt(
        "head dims", list_of(ba._headdim, "head dim"), "D,D,..."))
    dtypes: tuple[str, ...] = field(default=("bf16",), metadata=opt(
        "dtypes of q, k, v and prompts", list_of(_tune_dtype, "dtype"), "bf16,fp16"))
    shapes: tuple[str, ...] = field(default=("7b",), metadata=opt(
        "head shapes: 7b (32:32), gqa (32:8) or NHEADS:NHEADS_KV; each compiles every kernel anew",
        list_of(ba._shape_name, "shape"), "NAME,..."))
    kernels: tuple[str, ...] = field(default=KERNELS, metadata=opt(
        "kernels to sweep, one at a time (the others keep _blocks' choice); tma (the opt-in Hopper forward) only "
        "when named", list_of(_kernel, "kernel"), "K,K,..."))
    candidates: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), metadata=opt(
        "blocks to time instead of a kernel's curated list, e.g. 'dq=128,64,8,3 dq=64,64,4,3' (the kernels it "
        "does not name keep their lists; the default blocks are always timed too)",
        argparse_type(_candidate_list), "'KERNEL=M,N,WARPS,STAGES ...'"))
    prompt_len: int = field(default=10, metadata=opt(
        "adapter prompt length K (one prompt shared by the batch)", argparse_type(positive_int), "K"))
    tokens: int = field(default=16384, metadata=opt(
        "tokens per step: batch = max(1, tokens // seqlen)", argparse_type(positive_int), "N"))
    warmup_ms: float = field(default=25.0, metadata=opt(
        "do_bench warm-up time per measurement (CUDA)", argparse_type(positive_float), "MS"))
    rep_ms: float = field(default=100.0, metadata=opt(
        "do_bench repetition time per measurement (CUDA)", argparse_type(positive_float), "MS"))
    cpu_reps: int = field(default=3, metadata=opt(
        "timed repetitions per measurement on a CPU", argparse_type(positive_int), "N"))
    time_budget: float = field(default=420.0, metadata=opt(
        "seconds the sweep may take (from its start, after imports): past it, no new measurement starts; "
        "what was measured is written and reported", argparse_type(positive_float), "S"))
    seed: int = field(default=0, metadata=opt("seed of the random inputs", argparse_type(int), "N"))
    out: str | None = field(default=None, metadata=opt(
        "folder for tune_blocks.csv (default: bench/results/ for a full CUDA run, else a temporary folder; CPU and "
        "smoke runs never write into bench/results/)", str, "DIR"))


# --smoke, and the default on a CPU: tiny enough for Triton's interpreter (batch 1, 2 heads, head dim 32)
SMOKE = dict(seqlens=(64, 128), headdims=(32,), dtypes=("bf16",), shapes=("tiny",), tokens=64, warmup_ms=5.0,
             rep_ms=20.0, cpu_reps=1, candidates=_pairs(SMOKE_CANDIDATES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-adapter bench tune-blocks",
        description="Time other block sizes for the fused op's Triton kernels and suggest changes to _blocks.",
        epilog="Lists are comma-separated. Without a GPU the run is the smoke configuration under Triton's "
               "interpreter and its times mean nothing for the GPU.")
    shown = ", ".join(f"{k}={v}" for k, v in SMOKE.items() if k != "candidates")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the tiny smoke configuration ({shown}, 2 candidates per kernel); implied without a "
                             "GPU; other flags still narrow it")
    add_config_arguments(parser, TuneConfig())
    return parser


def make_config(args: argparse.Namespace, *, smoke: bool) -> TuneConfig:
    base = dataclasses.replace(TuneConfig(), **SMOKE) if smoke else TuneConfig()
    cfg = config_from_args(args, base)
    if args.candidates is not None:  # replaces the lists of the kernels it names only
        named = {k for k, _ in args.candidates}
        unswept = sorted(named - set(cfg.kernels))
        if unswept:
            raise ConfigError("candidates", f"names {', '.join(unswept)}, which --kernels does not sweep "
                                            f"({', '.join(cfg.kernels)})")
        cfg = dataclasses.replace(cfg, candidates=tuple(c for c in base.candidates if c[0] not in named)
                                  + tuple(dict.fromkeys(args.candidates)))
    check_choices("kernels", cfg.kernels, SWEEPABLE, "kernel")
    return cfg


def cases_of(cfg: TuneConfig) -> list[ba.Case]:
    """bench_attention's cases for these settings (same batch rule and shape names): causal, tanh gate."""
    bench = ba.BenchConfig(seqlens=cfg.seqlens, headdims=cfg.headdims, dtypes=cfg.dtypes, shapes=cfg.shapes,
                           prompt_len=cfg.prompt_len, tokens=cfg.tokens)
    return ba.cases_of(bench)


# --------------------------------------------------------------------------------------------------
# The plan and its estimate
# --------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Per kernel, in order: (case, default, candidates to time)."""

    steps: dict[str, list[tuple[ba.Case, Candidate, list[Candidate]]]]
    compiles: int  # distinct kernel compilations the sweep triggers (CUDA)

    @property
    def measurements(self) -> int:
        return sum(len(cands) for steps in self.steps.values() for _, _, cands in steps)

    def per_kernel(self) -> str:
        return ", ".join(f"{k} {sum(len(c) for _, _, c in s) // max(1, len(s))} x {len(s)} shapes"
                         for k, s in self.steps.items())


def make_plan(cfg: TuneConfig, cases: list[ba.Case], device: torch.device) -> Plan:
    steps = {k: [(case, *candidates_for(k, case, device, cfg)) for case in cases] for k in cfg.kernels}
    # Triton compiles once per constexpr set: dtype, head dim and whether the kv groups are 1 (an int equal to 1
    # is specialised) vary it; seqlens and batch (multiples of 16, or grid sizes) do not
    launched = set()
    backward = any(TIMED_MODE[k] == "bwd" for k in cfg.kernels)
    for case in cases:
        spec = (case.dtype, case.headdim, case.nheads == case.nheads_kv)
        d = default_blocks(case, device)
        launched.add((spec, "fwd", tuple(d["fwd"])))
        if backward:
            launched |= {(spec, k, tuple(d[k])) for k in ("pre", "dkdv", "dq")}
        for k in cfg.kernels:
            launched |= {(spec, k, c.blocks) for c in candidates_for(k, case, device, cfg)[1]}
    return Plan(steps, len(launched))


def estimate_s(plan: Plan, cfg: TuneConfig, cases: list[ba.Case]) -> tuple[float, int]:
    """(estimated seconds on a GPU, confirmation timings at most) for the plan: compiles x COMPILE_S, each
    measurement its do_bench time plus the check, confirmations (4 per shape of each kernel that has a
    suggestion) counted as if every kernel had one."""
    per_measure = (cfg.warmup_ms + cfg.rep_ms) / 1e3 + MEASURE_OVERHEAD_S
    confirms = 4 * len(cases) * len(cfg.kernels)
    seconds = (plan.compiles * COMPILE_S + (plan.measurements + confirms) * per_measure
               + len(cases) * CASE_SETUP_S)
    return seconds, confirms


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One candidate on one case."""

    candidate: Candidate
    case: ba.Case
    is_default: bool
    status: str  # "timed", "skipped" or "failed"
    timing: Timing | None = None
    detail: str = ""  # the check's worst err/tol (timed), the reason (skipped), what was wrong (failed)
    fatal: bool = False  # failed with a CUDA error that loses the context: nothing more can run

    @property
    def label(self) -> str:
        return self.candidate.name + (" (default)" if self.is_default else "")

    def row(self) -> Row:
        mode = TIMED_MODE[self.candidate.kernel]
        if self.status == "timed":
            return Row(WHAT, self.label, mode, self.case.shape, "time_ms", self.timing.median_ms, "ms")
        if self.status == "skipped":
            return Row(WHAT, self.label, mode, self.case.shape, "skipped", self.detail, "")
        return Row(WHAT, self.label, mode, self.case.shape, "failed", f"FAILED correctness: {self.detail}", "")


@dataclass
class Suggestion:
    kernel: str
    family: str  # bench_attention's Case.family: h32-kv32-d128-p10-bf16
    default: tuple[int, ...]  # the default blocks (of the family's last case, should they differ)
    candidate: Candidate
    speedups: dict[int, float]  # seqlen -> default time / candidate time
    confirmed: set[int]  # the seqlens whose speed-up comes from the confirmation timings
    seqlens: int  # how many seqlens the default was timed at

    @property
    def wins(self) -> int:
        return sum(s > 1 + WIN for s in self.speedups.values())

    @property
    def holds(self) -> bool:
        """A win at most seqlens: more than half of those measured."""
        return 2 * self.wins > self.seqlens

    def line(self) -> str:
        cells = " ".join(f"s{s} x{v:.3f}{'' if s in self.confirmed else '?'}" for s, v in sorted(self.speedups.items()))
        return (f"{self.kernel} [{self.family}]: {self.default} -> {self.candidate.blocks}: speed-up {cells} "
                f"(wins > {WIN:.0%} at {self.wins} of {self.seqlens} seqlens)")


@dataclass
class TuneResult:
    env: BenchEnv
    out_dir: Path
    csv_path: Path
    config: TuneConfig
    records: list[Record] = field(default_factory=list)
    # (kernel, shape) -> (candidate, default's confirmed ms, candidate's confirmed ms)
    confirmed: dict[tuple[str, str], tuple[Candidate, float, float]] = field(default_factory=dict)
    stopped: str | None = None  # why the sweep stopped early
    context_lost: bool = False  # a CUDA error that poisons the context happened: no more GPU calls
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.status == "failed"]


class _Stop(Exception):
    """Ends the sweep early (the time budget, or a lost CUDA context); the message says why."""


def run(cfg: TuneConfig, env: BenchEnv, out_dir: Path, *, log: Callable[[str], None] = print) -> TuneResult:
    """Check, then time, every candidate of every kernel on every case; append the rows to
    out_dir/tune_blocks.csv as they come, then print the tables and the suggestions. Raises CorrectnessError at
    the end (after everything is written) if a candidate computed a wrong answer."""
    device = env.device
    for kernel in cfg.kernels:  # tma on a GPU without TMA: say so before anything runs
        why = ba.PROVIDERS[PROVIDER[kernel]].unavailable(device) if kernel in PROVIDER and env.is_cuda else None
        if why:
            raise ConfigError("kernels", f"{kernel}: {why}")
    started = time.monotonic()
    cases = cases_of(cfg)
    result = TuneResult(env=env, out_dir=out_dir, csv_path=out_dir / f"{WHAT}.csv", config=cfg)
    write = lambda rows: append_rows(result.csv_path, rows, env)

    smem = f", {block_sizes.shared_memory(device) // 1024} KB shared memory per block" if env.is_cuda else ""
    start_run("tune_blocks", env, result.csv_path, log, fused=f"{op_backend(device)}{smem}")
    plan = make_plan(cfg, cases, device)
    log(f"plan: {plan.measurements} candidate measurements ({plan.per_kernel()}) over {len(cases)} shapes")
    if env.is_cuda:
        seconds, confirms = estimate_s(plan, cfg, cases)
        log(f"      {plan.compiles} kernel compiles; estimated {seconds:.0f} s: {plan.compiles} compiles x "
            f"~{COMPILE_S} s + {plan.measurements} measurements (+ up to {confirms} confirmation timings) x "
            f"~{(cfg.warmup_ms + cfg.rep_ms) / 1e3 + MEASURE_OVERHEAD_S:.2f} s; time budget {cfg.time_budget:g} s")
        if seconds > cfg.time_budget:
            log(f"WARNING: the estimate exceeds --time-budget {cfg.time_budget:g} s: the sweep will stop early "
                "(narrow --kernels / --seqlens / --shapes, or raise the budget)")
    else:
        log("      interpreted: nothing is compiled, and the times only show that the sweep works")

    def check_budget() -> None:
        if time.monotonic() - started > cfg.time_budget:
            raise _Stop(f"time budget {cfg.time_budget:g} s exceeded after {time.monotonic() - started:.0f} s")

    prepared: dict[ba.Case, tuple[ba.Inputs, dict[str, torch.Tensor]]] = {}
    backward = any(TIMED_MODE[k] == "bwd" for k in cfg.kernels)

    def prepare(case: ba.Case) -> tuple[ba.Inputs, dict[str, torch.Tensor]]:
        """The case's inputs and the default blocks' results on them (kept for every kernel's sweep)."""
        if case not in prepared:
            x = ba.make_inputs(case, device, cfg.seed)
            fwd, _ = ba.PROVIDERS["fused"].build(x)
            prepared[case] = (x, _results(fwd, x, backward=backward))
        return prepared[case]

    done = 0
    try:
        for kernel in cfg.kernels:
            mode = TIMED_MODE[kernel]
            log(f"\n== {kernel} (timed: the op's {'forward' if mode == 'fwd' else 'backward'}) ==")
            for case, default, cands in plan.steps[kernel]:
                check_budget()
                case_started = time.perf_counter()
                log(f"  {case.shape}  (default {default.blocks})")
                x, ref = prepare(case)
                for cand in cands:
                    check_budget()
                    rec = measure(cand, cand == default, case, x, ref, cfg, device)
                    result.records.append(rec)
                    write([rec.row()])
                    done += 1
                    log("    " + _record_line(rec, result.records))
                    if rec.fatal:
                        result.context_lost = True
                        raise _Stop(f"{rec.label} crashed the GPU's context (a kernel bug for these blocks)")
                log(f"    ({time.perf_counter() - case_started:.1f} s)")
            confirm(kernel, result, cfg, device, prepare, check_budget, write, log)
    except _Stop as stop:
        result.stopped = f"{stop}: {done} of {plan.measurements} candidate measurements done"
        write([Row(WHAT, "all", "all", "all", "stopped", result.stopped, "")])
        log(f"\nSTOPPED: {result.stopped}; what was measured is written and reported below")
    prepared.clear()
    if not result.context_lost:
        free_device_memory(device, collect=True)

    result.suggestions = suggestions(result)
    log("")
    report(result, log=log)
    log(f"\nCSV rows appended to {result.csv_path} ({time.monotonic() - started:.0f} s)")
    if result.failures:
        lines = [f"{r.label} on {r.case.shape}: {r.detail}" for r in result.failures]
        raise CorrectnessError(f"{len(lines)} candidate(s) computed a WRONG answer against the default blocks' "
                               "results (a kernel bug for those blocks); they were not timed:\n  "
                               + "\n  ".join(lines))
    return result


def measure(cand: Candidate, is_default: bool, case: ba.Case, x: ba.Inputs, ref: dict[str, torch.Tensor],
            cfg: TuneConfig, device: torch.device) -> Record:
    """Check one candidate against the default blocks' results, then time it (if right): a Record."""
    mode = TIMED_MODE[cand.kernel]
    fwd, _ = ba.PROVIDERS[PROVIDER.get(cand.kernel, "fused")].build(x)
    timed = None
    try:
        with block_sizes.override_blocks({cand.kernel: cand.blocks}):
            got = _results(fwd, x, backward=mode == "bwd")
            ratios = {name: deviation(t, ref[name], RTOL[case.dtype]) for name, t in got.items()}
            del got
            wrong = [f"{name} deviates by {r:.3g} x the tolerance" for name, r in ratios.items() if not r <= 1]
            if wrong:
                record = Record(cand, case, is_default, "failed", detail="; ".join(wrong))
            else:
                timed = ba.mode_closure(fwd, mode, x)
                timing = time_fn(timed, device, grad_to_none=x.leaves() if mode == "bwd" else (),
                                 warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, cpu_warmup=0, cpu_reps=cfg.cpu_reps)
                record = Record(cand, case, is_default, "timed", timing=timing,
                                detail=f"err/tol {max(ratios.values()):.2f}")
    except Exception as exc:  # out of shared memory (or of device memory), a compile error: recorded, not fatal
        record = _error_record(cand, case, is_default, exc)
        del exc
    del timed
    for t in x.leaves():
        t.grad = None
    if not record.fatal:  # after a lost context, even freeing memory raises
        free_device_memory(device)
    return record


def _error_record(cand: Candidate, case: ba.Case, is_default: bool, exc: BaseException) -> Record:
    if is_fatal_cuda_error(exc):
        return Record(cand, case, is_default, "failed", detail=f"crashed: {describe_exception(exc, 200)}", fatal=True)
    if is_out_of_resources(exc):
        reason = f"out of resources ({describe_exception(exc, 160)})"
    elif is_oom(exc):
        reason = f"out of memory ({describe_exception(exc, 160)})"
    else:
        reason = f"error ({describe_exception(exc, 200)})"
    return Record(cand, case, is_default, "skipped", detail=reason)


def _record_line(rec: Record, records: list[Record]) -> str:
    if rec.status == "failed":
        return f"{rec.label:<36} !!! FAILED correctness: {rec.detail} - a kernel bug for these blocks"
    if rec.status == "skipped":
        return f"{rec.label:<36} skipped: {rec.detail}"
    t = rec.timing
    default = _default_record(records, rec.candidate.kernel, rec.case)
    vs = ""
    if not rec.is_default and default is not None and default.status == "timed":
        vs = f"  speed-up x{default.timing.median_ms / t.median_ms:.3f}"
    return f"{rec.label:<36} {t.median_ms:9.4f} ms [{t.p20_ms:.4f}-{t.p80_ms:.4f}]  {rec.detail}{vs}"


def _default_record(records: Sequence[Record], kernel: str, case: ba.Case) -> Record | None:
    return next((r for r in records if r.is_default and r.candidate.kernel == kernel and r.case == case), None)


def confirm(kernel: str, result: TuneResult, cfg: TuneConfig, device: torch.device,
            prepare: Callable[[ba.Case], tuple[ba.Inputs, dict[str, torch.Tensor]]], check_budget: Callable[[], None],
            write: Callable[[list[Row]], int], log: Callable[[str], None]) -> None:
    """Time the sweep's suggestion for this kernel again against the default, at every shape of its family, in
    the order default, candidate, candidate, default; the mean of each pair's medians is the confirmed time."""
    for sug in suggestions(result, kernels=(kernel,)):
        if not sug.holds:
            continue
        log(f"  confirming {sug.candidate.name} against the default [{sug.family}]:")
        for rec in result.records:
            if not (rec.is_default and rec.candidate.kernel == kernel and rec.case.family == sug.family
                    and rec.status == "timed" and rec.case.seqlen in sug.speedups):
                continue
            default, case = rec.candidate, rec.case
            x, _ = prepare(case)
            fwd, _ = ba.PROVIDERS[PROVIDER.get(kernel, "fused")].build(x)
            mode = TIMED_MODE[kernel]
            times: dict[Candidate, list[float]] = {default: [], sug.candidate: []}
            try:
                for cand in (default, sug.candidate, sug.candidate, default):
                    check_budget()
                    with block_sizes.override_blocks({kernel: cand.blocks}):
                        timed = ba.mode_closure(fwd, mode, x)
                        times[cand].append(time_fn(
                            timed, device, grad_to_none=x.leaves() if mode == "bwd" else (), warmup_ms=cfg.warmup_ms,
                            rep_ms=cfg.rep_ms, cpu_warmup=0, cpu_reps=cfg.cpu_reps).median_ms)
                        del timed
            except _Stop:
                raise
            except Exception as exc:  # it ran in the sweep, so this is unexpected: the sweep's numbers stand
                log(f"    {case.shape}: the confirmation failed ({describe_exception(exc)})")
                if is_fatal_cuda_error(exc):
                    result.context_lost = True
                    raise _Stop(f"{sug.candidate.name} crashed the GPU's context while being confirmed") from None
                continue
            finally:
                for t in x.leaves():
                    t.grad = None
            free_device_memory(device)
            d_ms, c_ms = (sum(times[c]) / 2 for c in (default, sug.candidate))
            result.confirmed[(kernel, case.shape)] = (sug.candidate, d_ms, c_ms)
            write([Row(WHAT, f"{default.name} (default)", mode, case.shape, "confirm_time_ms", d_ms, "ms"),
                   Row(WHAT, sug.candidate.name, mode, case.shape, "confirm_time_ms", c_ms, "ms")])
            log(f"    {case.shape}: default {d_ms:.4f} ms, {sug.candidate.name} {c_ms:.4f} ms: x{d_ms / c_ms:.3f}")


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------
def _families(records: Sequence[Record], kernels: Sequence[str]) -> dict[tuple[str, str], list[Record]]:
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        if r.candidate.kernel in kernels:
            groups.setdefault((r.candidate.kernel, r.case.family), []).append(r)
    return groups


def suggestions(result: TuneResult, kernels: Sequence[str] = SWEEPABLE) -> list[Suggestion]:
    """Per kernel and family (everything but seqlen and batch), the non-default candidate that beats the default
    by more than WIN at the most seqlens (ties: the larger geometric-mean speed-up), with its speed-ups; the
    confirmation timings replace the sweep's where there are some. One per family whose default was timed and
    that has a non-default candidate timed; see Suggestion.holds for whether it is one to act on."""
    out = []
    for (kernel, family), recs in _families(result.records, kernels).items():
        default_ms = {r.case.seqlen: r.timing.median_ms for r in recs if r.is_default and r.status == "timed"}
        if not default_ms:
            continue
        by_candidate: dict[tuple[int, ...], dict[int, float]] = {}
        for r in recs:
            if not r.is_default and r.status == "timed" and r.case.seqlen in default_ms:
                by_candidate.setdefault(r.candidate.blocks, {})[r.case.seqlen] = default_ms[r.case.seqlen] / \
                    r.timing.median_ms
        best = None
        for blocks, speedups in by_candidate.items():
            confirmed = set()
            for r in recs:
                c = result.confirmed.get((kernel, r.case.shape))
                if r.is_default and c is not None and c[0].blocks == blocks and r.case.seqlen in speedups:
                    speedups[r.case.seqlen] = c[1] / c[2]
                    confirmed.add(r.case.seqlen)
            default = next(r.candidate.blocks for r in reversed(recs) if r.is_default)
            sug = Suggestion(kernel, family, default, Candidate(kernel, blocks), speedups, confirmed, len(default_ms))
            geomean = math.exp(sum(math.log(v) for v in speedups.values()) / len(speedups))
            key = (sug.wins, geomean)
            if best is None or key > best[0]:
                best = (key, sug)
        if best is not None:
            out.append(best[1])
    return out


def kernel_table(result: TuneResult) -> str:
    """Per kernel and shape: the default's time, the best timed candidate, its speed-up over the default."""
    lines = []
    for (kernel, _family), recs in _families(result.records, SWEEPABLE).items():
        for shape in dict.fromkeys(r.case.shape for r in recs):
            here = [r for r in recs if r.case.shape == shape]
            default = next((r for r in here if r.is_default), None)
            timed = [r for r in here if r.status == "timed"]
            counts = "/".join(str(sum(r.status == s for r in here)) for s in ("timed", "skipped", "failed"))
            best = min(timed, key=lambda r: r.timing.median_ms, default=None)
            d_ms = default.timing.median_ms if default is not None and default.status == "timed" else None
            cells = [kernel, shape, default.candidate.blocks if default else "-",
                     f"{d_ms:.4f}" if d_ms else (default.status if default else "-")]
            if best is None:
                cells += ["-", "-", "-"]
            else:
                cells += ["(default)" if best.is_default else best.candidate.blocks, f"{best.timing.median_ms:.4f}",
                          f"x{d_ms / best.timing.median_ms:.3f}" if d_ms else "-"]
            lines.append(cells + [counts])
    if not lines:
        return "Nothing was measured."
    title = "Per kernel and shape: the default blocks' time, the best candidate's, its speed-up (sweep medians, ms)"
    if not result.env.is_cuda:
        title += " - CPU smoke run: these times mean nothing for the GPU"
    header = ["kernel", "shape", "default (M, N, warps, stages)", "default ms", "best", "best ms", "speed-up",
              "timed/skipped/failed"]
    return title + "\n" + format_table(header, lines)


def report(result: TuneResult, *, log: Callable[[str], None] = print) -> None:
    log(kernel_table(result))
    env = result.env
    where = (f"{env.gpu_name}, {block_sizes.shared_memory(env.device) // 1024} KB shared memory per block"
             if env.is_cuda else "the CPU's interpreter")
    log(f"\nSuggested _blocks changes ({where}): a candidate faster than the default by more than {WIN:.0%} at "
        "most seqlens, confirmed by re-timing (speed-ups marked ? were not confirmed)")
    holding = [s for s in result.suggestions if s.holds]
    for s in holding:
        log(f"  SUGGEST {s.line()}")
    for s in result.suggestions:
        if not s.holds:
            log(f"  none for {s.kernel} [{s.family}]: the defaults stand (closest: {s.line()})")
    if not result.suggestions:
        log("  none: nothing to compare (no default and candidate timed together)")
    if holding:
        log("  (kernels/block_sizes.py's default_blocks is not changed by this tool: these await a person's decision)")
    if not env.is_cuda:
        log("  " + CPU_NOTICE)
    if result.stopped:
        log(f"  (incomplete: {result.stopped})")
    skipped = [r for r in result.records if r.status == "skipped"]
    if skipped:
        log(f"\nSkipped ({len(skipped)}):")
        for r in skipped:
            log(f"  {r.label} on {r.case.shape}: {r.detail}")
    if result.failures:
        log(f"\n!!! {len(result.failures)} candidate(s) FAILED correctness (kernel bugs for those blocks):")
        for r in result.failures:
            log(f"  {r.label} on {r.case.shape}: {r.detail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return bench_main(parser, args, WHAT, lambda smoke: make_config(args, smoke=smoke), run)


if __name__ == "__main__":
    sys.exit(main())
