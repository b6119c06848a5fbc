"""Benchmark: generation with the KV cache (prefill, then one token per step) of LLaMA-Adapter (arXiv 2303.16199).

A randomly initialised LLaMA-7B-shaped model (--models) with the adapter (K = 10 prompts in the top L = 30 layers),
base in bf16, adapter in fp32, generates --new-tokens tokens (512) greedily after random prompts of --prompt-len
tokens (128), for each batch size of --batch-sizes (1 and 16), through model/generate.py's stream(): a prefill
forward that fills the KV cache (and the adapted layers' prompt keys/values), then one forward per token.

Providers (--providers), each checked before it is timed:
    fused   the model as it is: kernels.zero_init_attention in the adapted layers, SDPA in the plain ones
    eager   the official code's formulation (model.set_attention_impl(model, "eager")): adapted layers through
            kernels.zero_init_attention_ref, plain layers through eager_attention (materialised scores, mask,
            fp32 softmax), with the same KV cache

Correctness, before any timing: the cached path's logits (prefill, then --check-tokens - 1 decode steps fed a fixed
random continuation) of each provider are compared with a full recompute of the whole sequence without a cache, by
the eager model in fp32 (its bf16 weights cast up, exactly). Every other check prompt is a quarter shorter,
left-padded as generate() pads a batch of uneven prompts, so that the check covers the padded path (leftpad_k) too.
Tolerance (logits divided by the oracle's max |x| first), flash-attn's bar: twice the error of the same full
recompute by the eager model in bf16, plus twice bf16's rounding. A provider outside it stops the run (exit
status 1) before anything of it is timed.

Timing: a --warmup-tokens generation first (Triton compilation), then one generation of --new-tokens tokens,
synchronised after every token. --ragged yes draws each prompt's length from [prompt_len / 2, prompt_len] (batched
generation of uneven prompts, left-padded; the shape gets "-ragged"). Reported per (provider, batch size), one CSV
row per metric: prefill_ms (time to the first token: cache set-up, the prefill forward, the first greedy pick),
prefill_tokens_per_s (real prompt tokens / prefill time), decode_tokens_per_s (batch x (new tokens - 1) / the time
from the first token to the last), decode step median / p20 / p80 (ms per step, all rows together), peak memory
(CUDA), the attention backends. Out of memory: a "skipped" row with the reason.

Examples:
    # one GPU: rows appended to bench/results/decode.csv, bar chart + summary beside it
    llama-adapter bench decode
    llama-adapter bench decode --batch-sizes 1,4,16,64 --new-tokens 256
    llama-adapter bench decode --batch-sizes 16 --ragged yes        # uneven prompts, left-padded
    # CPU (or anywhere): the tiny smoke configuration, written to a temporary folder or --out
    llama-adapter bench decode --smoke --out /tmp/bench-decode
On a CPU the numbers mean nothing for the GPU: the run only shows that the benchmark works and that every
provider computes the right answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # as in tests/conftest.py: without a GPU the Triton kernels run under Triton's interpreter; it must be
    # set before `kernels` is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llama_adapter_triton.bench.bench_attention import sdpa_backend  # noqa: E402
from llama_adapter_triton.bench.common import (  # noqa: E402
    CPU_NOTICE,
    BenchEnv,
    ConfigError,
    Expected,
    Row,
    Timing,
    add_config_arguments,
    append_rows,
    argparse_type,
    attention_impl,
    base_upcast,
    bench_main,
    check_choices,
    check_results,
    config_from_args,
    exact_fp32_matmuls,
    format_table,
    free_device_memory,
    list_of,
    model_config,
    model_name,
    oom_reason,
    op_backend,
    opt,
    peak_memory_since_reset,
    plot_bars,
    positive_int,
    quantiles_ms,
    random_llama,
    reset_peak_memory,
    unique_path,
    unpatched,
    yes_no,
)
from llama_adapter_triton.model.adapter import AdapterConfig  # noqa: E402
from llama_adapter_triton.model.generate import stream  # noqa: E402
from llama_adapter_triton.model.llama import LLaMA  # noqa: E402

WHAT = "decode"
DTYPE = torch.bfloat16  # the base; the adapter is fp32


@dataclass(frozen=True)
class Provider:
    """The model's attention implementation; patch wraps everything the provider runs (its check and its timed
    generations) for anything else it changes (tests inject wrong providers through it)."""

    name: str
    impl: str  # "fused" or "eager" (model.set_attention_impl)
    patch: Callable[[LLaMA], AbstractContextManager] = unpatched


PROVIDERS: dict[str, Provider] = {p.name: p for p in (Provider("fused", "fused"), Provider("eager", "eager"))}


# --------------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeBenchConfig:
    """The GPU run's defaults, in one place: the command line is generated from these fields."""

    models: tuple[str, ...] = field(default=("llama-7b",), metadata=opt(
        "model shapes: model/ presets (llama-7b, llama-13b, ...) or smoke", list_of(model_name, "model"), "NAME,..."))
    providers: tuple[str, ...] = field(default=tuple(PROVIDERS), metadata=opt(
        "providers", list_of(str, "provider"), "P,P,..."))
    batch_sizes: tuple[int, ...] = field(default=(1, 16), metadata=opt(
        "prompts generated together", list_of(positive_int, "batch size"), "B,B,..."))
    prompt_len: int = field(default=128, metadata=opt("tokens of every prompt", argparse_type(positive_int), "N"))
    new_tokens: int = field(default=512, metadata=opt(
        "tokens generated after each prompt (at least 2: one prefill, then decode steps)",
        argparse_type(positive_int), "N"))
    warmup_tokens: int = field(default=32, metadata=opt(
        "tokens of the untimed generation first (compilation)", argparse_type(positive_int), "N"))
    check_tokens: int = field(default=8, metadata=opt(
        "positions whose cached logits are checked against a full recompute", argparse_type(positive_int), "N"))
    check_batch: int = field(default=2, metadata=opt("prompts of the check", argparse_type(positive_int), "B"))
    ragged: bool = field(default=False, metadata=opt(
        "prompts of uneven lengths, drawn from [prompt_len / 2, prompt_len] and left-padded (batched generation)",
        argparse_type(yes_no), "yes|no"))
    adapter_len: int = field(default=10, metadata=opt("adapter prompts per layer K", argparse_type(positive_int), "K"))
    adapter_layers: int = field(default=30, metadata=opt(
        "adapted layers L, counted from the top", argparse_type(positive_int), "L"))
    seed: int = field(default=0, metadata=opt("seed of the weights and the prompts", argparse_type(int), "N"))
    out: str | None = field(default=None, metadata=opt(
        "folder for decode.csv, the plot and the summary (default: bench/results/ for a full CUDA run, else a "
        "temporary folder; CPU and smoke runs never write into bench/results/)", str, "DIR"))


# --smoke, and the default on a CPU: tiny enough for Triton's interpreter (2 layers, dim 64, the top one adapted)
SMOKE = dict(models=("smoke",), batch_sizes=(1, 2), prompt_len=8, new_tokens=4, warmup_tokens=2, check_tokens=3,
             adapter_len=4, adapter_layers=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-adapter bench decode",
        description="Benchmark LLaMA-Adapter generation with the KV cache: the fused op against the eager reference.",
        epilog="Lists are comma-separated. Without a GPU the run is the smoke configuration and its numbers mean "
               "nothing for the GPU.")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the tiny smoke configuration ({', '.join(f'{k}={v}' for k, v in SMOKE.items())}); "
                             "implied without a GPU; other flags still narrow it")
    add_config_arguments(parser, DecodeBenchConfig())
    return parser


def make_config(args: argparse.Namespace, *, smoke: bool, providers: Mapping[str, Provider]) -> DecodeBenchConfig:
    base = DecodeBenchConfig(providers=tuple(providers))
    cfg = config_from_args(args, dataclasses.replace(base, **SMOKE) if smoke else base)
    check_choices("providers", cfg.providers, providers, "provider")
    if cfg.new_tokens < 2:
        raise ConfigError("new_tokens", f"{cfg.new_tokens}: at least 2 (the first comes from the prefill)")
    if cfg.check_tokens < 2:
        raise ConfigError("check_tokens", f"{cfg.check_tokens}: at least 2 (the prefill's and a decode step's)")
    for name in cfg.models:
        config = model_config(name)
        if cfg.adapter_layers > config.n_layers:
            raise ConfigError("adapter_layers", f"{cfg.adapter_layers} exceeds the {config.n_layers} layers of {name}")
        for flag, tokens in (("new_tokens", cfg.new_tokens), ("check_tokens", cfg.check_tokens)):
            if cfg.prompt_len + tokens > config.max_seq_len:
                raise ConfigError(flag, f"--prompt-len {cfg.prompt_len} + {tokens} exceeds the {config.max_seq_len} "
                                  f"tokens of {name}'s context")
    return cfg


# --------------------------------------------------------------------------------------------------
# The check: cached logits against a full recompute
# --------------------------------------------------------------------------------------------------
def random_tokens(batch: int, length: int, vocab_size: int, seed: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def check_left_pad(batch: int, prompt_len: int) -> list[int]:
    """The check's left padding: every other prompt a quarter shorter (what generate() does to uneven prompts)."""
    return [(prompt_len // 4) * (b % 2) for b in range(batch)]


def ragged_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """batch random prompts of lengths drawn uniformly from [ceil(prompt_len / 2), prompt_len]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint((prompt_len + 1) // 2, prompt_len + 1, (batch,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def cached_logits(model: LLaMA, prompts: torch.Tensor, continuation: torch.Tensor, provider: Provider,
                  left_pad: list[int]) -> torch.Tensor:
    """Next-token logits (B, C, vocab) fp32 of the cached path, as stream() runs it: the prefill's last position,
    then C - 1 decode steps fed continuation[:, :C - 1] (continuation: (B, C)); row b's first left_pad[b] prompt
    tokens are padding."""
    B, P = prompts.shape
    C = continuation.shape[1]
    with attention_impl(model, provider.impl), provider.patch(model):
        model.setup_cache(B, P + C)
        try:
            steps = [model(prompts, input_pos=0, left_pad=left_pad, logits_at=-1)]
            steps += [model(continuation[:, t:t + 1], input_pos=P + t, left_pad=left_pad, logits_at=-1)
                      for t in range(C - 1)]
        finally:
            model.clear_cache()
    return torch.stack(steps, dim=1).float()


@torch.inference_mode()
def recomputed_logits(model: LLaMA, prompts: torch.Tensor, continuation: torch.Tensor, impl: str,
                      left_pad: list[int]) -> torch.Tensor:
    """The same logits from one forward over the whole sequence, no cache."""
    P, C = prompts.shape[1], continuation.shape[1]
    with attention_impl(model, impl):
        logits = model(torch.cat([prompts, continuation[:, :C - 1]], dim=1), left_pad=left_pad)
    return logits[:, P - 1:].float()


def expected_logits(model: LLaMA, prompts: torch.Tensor, continuation: torch.Tensor, left_pad: list[int]) -> Expected:
    """The oracle (a full recompute by the eager model in fp32) and the tolerances from the same recompute by the
    eager model in bf16."""
    with base_upcast(model, torch.float32), exact_fp32_matmuls():
        oracle = recomputed_logits(model, prompts, continuation, "eager", left_pad)
    baseline = recomputed_logits(model, prompts, continuation, "eager", left_pad)
    return Expected.from_runs({"logits": oracle}, {"logits": baseline}, "bf16",
                              oracle_desc="full recompute (no cache) by the eager model in fp32",
                              baseline_desc="the eager model's full recompute in bf16", normalize=True)


# --------------------------------------------------------------------------------------------------
# Timed generation
# --------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    model: str
    provider: str
    batch: int
    prefill_ms: float  # time to the first token
    decode_step: Timing  # ms per decode step
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_mib: float | None


def generate_timed(model: LLaMA, prompts: torch.Tensor | list[list[int]], new_tokens: int,
                   device: torch.device) -> list[float]:
    """Greedy generation through stream(); the perf_counter time at which each token (all rows) is ready, the
    start first."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    stamps = [time.perf_counter()]
    for _ in stream(model, prompts, max_new_tokens=new_tokens):
        sync()
        stamps.append(time.perf_counter())
    return stamps


def time_provider(model: LLaMA, provider: Provider, batch: int, cfg: DecodeBenchConfig, device: torch.device,
                  name: str) -> Measurement:
    if cfg.ragged:  # uneven lengths: stream() left-pads them
        prompts = ragged_prompts(batch, cfg.prompt_len, model.config.vocab_size, cfg.seed + batch)
        prompt_tokens = sum(len(p) for p in prompts)
    else:
        prompts = random_tokens(batch, cfg.prompt_len, model.config.vocab_size, cfg.seed + batch, device)
        prompt_tokens = batch * cfg.prompt_len
    with attention_impl(model, provider.impl), provider.patch(model):
        generate_timed(model, prompts, cfg.warmup_tokens, device)
        reset_peak_memory(device)
        stamps = generate_timed(model, prompts, cfg.new_tokens, device)
        peak = peak_memory_since_reset(device)
    if len(stamps) != cfg.new_tokens + 1:
        raise RuntimeError(f"stream() yielded {len(stamps) - 1} tokens, not {cfg.new_tokens}")
    prefill = stamps[1] - stamps[0]
    steps_ms = [(b - a) * 1e3 for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    decode = stamps[-1] - stamps[1]
    return Measurement(name, provider.name, batch, prefill * 1e3, quantiles_ms(steps_ms),
                       batch * (cfg.new_tokens - 1) / decode, prompt_tokens / prefill, peak)


def attention_backends(provider: Provider, config, batch: int, cfg: DecodeBenchConfig, device: torch.device) -> str:
    if provider.impl == "eager":
        return ("adapted layers: kernels.zero_init_attention_ref; plain layers: eager_attention (both materialise "
                "the scores, fp32 softmax)")
    q = torch.empty(batch, config.n_heads, 1, config.head_dim, dtype=DTYPE, device=device)
    k = torch.empty(batch, config.n_kv_heads, cfg.prompt_len + cfg.new_tokens, config.head_dim, dtype=DTYPE,
                    device=device)
    decode = sdpa_backend(q, k, k, is_causal=False, enable_gqa=config.n_heads != config.n_kv_heads)
    return f"adapted layers: kernels.zero_init_attention ({op_backend(device)}); plain layers: SDPA {decode} (decode)"


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    env: BenchEnv
    out_dir: Path
    csv_path: Path
    config: DecodeBenchConfig
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[tuple[str, str, int | str, str]] = field(default_factory=list)  # (model, provider, batch, reason)
    checks: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (model, provider) -> ratios
    plot_path: Path | None = None
    summary_path: Path | None = None

    def get(self, model: str, provider: str, batch: int) -> Measurement | None:
        return next((m for m in self.measurements if (m.model, m.provider, m.batch) == (model, provider, batch)), None)


def shape_of(name: str, batch: int | str, cfg: DecodeBenchConfig) -> str:
    """The CSV's shape column, e.g. llama-7b-K10-L30-bf16-b16-p128-n512."""
    ragged = "-ragged" if cfg.ragged else ""
    return f"{name}-K{cfg.adapter_len}-L{cfg.adapter_layers}-bf16-b{batch}-p{cfg.prompt_len}{ragged}-n{cfg.new_tokens}"


def _measurement_rows(m: Measurement, shape: str) -> list[Row]:
    row = lambda metric, value, unit: Row(WHAT, m.provider, "generate", shape, metric, value, unit)  # noqa: E731
    rows = [row("prefill_ms", m.prefill_ms, "ms"), row("prefill_tokens_per_s", m.prefill_tokens_per_s, "tokens/s"),
            row("decode_tokens_per_s", m.decode_tokens_per_s, "tokens/s"),
            row("decode_step_median", m.decode_step.median_ms, "ms"),
            row("decode_step_p20", m.decode_step.p20_ms, "ms"), row("decode_step_p80", m.decode_step.p80_ms, "ms")]
    if m.peak_mib is not None:
        rows.append(row("peak_mem", m.peak_mib, "MiB"))
    return rows


def run(cfg: DecodeBenchConfig, env: BenchEnv, out_dir: Path, *, providers: Mapping[str, Provider] | None = None,
        log: Callable[[str], None] = print) -> RunResult:
    """Check, then time, every (model, provider, batch size); append the rows to out_dir/decode.csv as they come,
    then print the table and write the plot and the summary. Raises CorrectnessError as soon as a provider
    computes a wrong answer."""
    providers = PROVIDERS if providers is None else providers
    device = env.device
    result = RunResult(env, out_dir, out_dir / f"{WHAT}.csv", cfg)
    write = lambda rows: append_rows(result.csv_path, rows, env)  # noqa: E731
    log(f"bench_decode | {env.describe()}")
    if not env.is_cuda:
        log(CPU_NOTICE)
    log(f"fused op: {op_backend(device)} | rows go to {result.csv_path}")

    for name in cfg.models:
        started = time.perf_counter()
        config = model_config(name)
        log(f"\n== {name}: {config.n_layers} layers, dim {config.dim}, {config.n_heads} heads; adapter K "
            f"{cfg.adapter_len} in the top {cfg.adapter_layers} layers; base bf16, adapter fp32; prompts of "
            f"{cfg.prompt_len} tokens, {cfg.new_tokens} new tokens")
        active = [providers[p] for p in cfg.providers]
        check_shape = (f"{name}-K{cfg.adapter_len}-L{cfg.adapter_layers}-bf16-check-b{cfg.check_batch}-"
                       f"p{cfg.prompt_len}-c{cfg.check_tokens}")
        try:
            model = random_llama(name, AdapterConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers),
                                 dtype=DTYPE, device=device, seed=cfg.seed).eval()
            prompts = random_tokens(cfg.check_batch, cfg.prompt_len, config.vocab_size, cfg.seed, device)
            continuation = random_tokens(cfg.check_batch, cfg.check_tokens, config.vocab_size, cfg.seed + 1, device)
            left_pad = check_left_pad(cfg.check_batch, cfg.prompt_len)
            expected = expected_logits(model, prompts, continuation, left_pad)
        except Exception as exc:  # out of memory building the model or computing the oracle; anything else is a bug
            reason = oom_reason(exc)
            del exc
            model = None
            free_device_memory(device, collect=True)
            log(f"   SKIP {name}: {reason}")
            write([Row(WHAT, p.name, "all", check_shape, "skipped", reason, "") for p in active])
            result.skipped += [(name, p.name, "any", reason) for p in active]
            continue
        log(f"   check: {cfg.check_batch} prompts (left padding {left_pad}), {cfg.check_tokens} cached positions "
            "against a full recompute by the eager model in fp32")
        for prov in active:
            ratios = check_results(prov.name, check_shape, {"logits": cached_logits(model, prompts, continuation,
                                                                                     prov, left_pad)}, expected)
            result.checks[(name, prov.name)] = ratios
            write([Row(WHAT, prov.name, "check", check_shape, "max_err_over_tol", max(ratios.values()), "ratio"),
                   Row(WHAT, prov.name, "check", check_shape, "checked", " ".join(ratios), "")])
            log(f"   {prov.name:<6} check ok (err/tol {max(ratios.values()):.2f})")
        for batch in cfg.batch_sizes:
            shape = shape_of(name, batch, cfg)
            for prov in active:
                try:
                    m = time_provider(model, prov, batch, cfg, device, name)
                except Exception as exc:  # out of memory; anything else is a bug
                    reason = oom_reason(exc)
                    del exc
                    model.clear_cache()
                    free_device_memory(device, collect=True)
                    log(f"   b{batch:<4} {prov.name:<6} SKIP: {reason}")
                    write([Row(WHAT, prov.name, "generate", shape, "skipped", reason, "")])
                    result.skipped.append((name, prov.name, batch, reason))
                    continue
                result.measurements.append(m)
                write([Row(WHAT, prov.name, "all", shape, "attention",
                           attention_backends(prov, config, batch, cfg, device), "")] + _measurement_rows(m, shape))
                mem = f" | peak {m.peak_mib / 1024:.1f} GiB" if m.peak_mib is not None else ""
                step = m.decode_step
                log(f"   b{batch:<4} {prov.name:<6} prefill {m.prefill_ms:.1f} ms | decode {step.median_ms:.2f} "
                    f"ms/step [{step.p20_ms:.2f}-{step.p80_ms:.2f}] | {m.decode_tokens_per_s:,.0f} tok/s{mem}")
                free_device_memory(device)
        del model, expected
        free_device_memory(device, collect=True)
        log(f"   ({time.perf_counter() - started:.1f} s)")

    log("")
    report(result, log=log)
    log(f"CSV rows appended to {result.csv_path}")
    return result


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------
def results_table(result: RunResult) -> str:
    lines = []
    for m in result.measurements:
        eager = result.get(m.model, "eager", m.batch)
        vs = f"{m.decode_tokens_per_s / eager.decode_tokens_per_s:.2f}x" if eager else "-"
        mem = f"{m.peak_mib / 1024:.1f}" if m.peak_mib is not None else "-"
        step = f"{m.decode_step.median_ms:.2f} [{m.decode_step.p20_ms:.2f}-{m.decode_step.p80_ms:.2f}]"
        lines.append([m.model, m.batch, m.provider, f"{m.prefill_ms:.1f}", step, f"{m.decode_tokens_per_s:,.0f}", vs,
                      mem])
    if not lines:
        return "Nothing was measured."
    cfg = result.config
    title = f"Generation with the KV cache: prompts of {cfg.prompt_len} tokens, {cfg.new_tokens} new tokens, greedy"
    if not result.env.is_cuda:
        title += " - CPU smoke run: these numbers mean nothing for the GPU"
    header = ["model", "batch", "provider", "prefill ms", "decode ms/step [p20-p80]", "decode tok/s",
              "vs eager", "peak GiB"]
    return title + "\n" + format_table(header, lines)


def report(result: RunResult, *, log: Callable[[str], None] = print) -> RunResult:
    text = results_table(result)
    log(text)
    if result.skipped:
        log("Skipped: " + "; ".join(f"{m} {p} b{b}: {why}" for m, p, b, why in result.skipped))
    if result.measurements:
        groups: dict[str, dict[str, float]] = {}
        for m in result.measurements:
            groups.setdefault(f"{m.model} b{m.batch}", {})[m.provider] = m.decode_tokens_per_s
        env = result.env
        title = f"LLaMA-Adapter decode tokens/s (KV cache)\n{env.gpu_name} | {env.date} | {env.git_commit}"
        if not env.is_cuda:
            title += "\nCPU smoke run: these numbers mean nothing for the GPU"
        result.plot_path = plot_bars(groups, unique_path(result.out_dir, WHAT, ".png", env),
                                     ylabel="decode tokens/s", title=title)
    env = result.env
    lines = [f"# Decode benchmark, {env.date}", "", f"- GPU: {env.gpu_name}", f"- date: {env.date}",
             f"- commit: {env.git_commit}", f"- torch {torch.__version__}",
             f"- configuration: {dataclasses.asdict(result.config)}",
             f"- rows: {result.csv_path}; plot: {result.plot_path.name if result.plot_path else 'none'}", ""]
    if not env.is_cuda:
        lines += [f"**{CPU_NOTICE}**", ""]
    lines += ["```", text, "```", ""]
    if result.skipped:
        lines += ["## Skipped", ""] + [f"- {m} {p} b{b}: {why}" for m, p, b, why in result.skipped] + [""]
    result.summary_path = unique_path(result.out_dir, WHAT, ".md", env)
    result.summary_path.write_text("\n".join(lines), encoding="utf-8")
    log(f"plot: {result.plot_path}" if result.plot_path else "plot: nothing measured, no plot")
    log(f"summary: {result.summary_path}")
    return result


def main(argv: Sequence[str] | None = None, *, providers: Mapping[str, Provider] | None = None) -> int:
    providers = PROVIDERS if providers is None else providers
    parser = build_parser()
    args = parser.parse_args(argv)
    return bench_main(parser, args, WHAT, lambda smoke: make_config(args, smoke=smoke, providers=providers),
                      lambda cfg, env, out_dir: run(cfg, env, out_dir, providers=providers))


if __name__ == "__main__":
    sys.exit(main())
