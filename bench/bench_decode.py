"""Benchmark: generation with the KV cache (prefill, then one token per step) of LLaMA-Adapter (arXiv 2303.16199).

A random LLaMA-7B-shaped model (--models), adapter K = 10 in the top L = 30 layers, base bf16, adapter fp32, generates
--new-tokens (512) greedily after random --prompt-len (128) prompts per --batch-sizes (1, 16), through
model/generate.py's stream(). Providers: fused (the model as it is: the fused op in the adapted layers, SDPA in the
plain ones) and eager (the official code's formulation: materialised scores, fp32 softmax; the same KV cache).
Check, before any timing: the cached path's logits (prefill, then --check-tokens - 1 decode steps, every other prompt
left-padded) against a full recompute by the eager model in fp32, within flash-attn's bar (twice the bf16 recompute's
error plus twice bf16's rounding). Metrics per (provider, batch): prefill_ms, prefill and decode tokens/s, decode step
median/p20/p80, peak memory, the attention backends. The long form: docs/benchmarks.md.

    llama-adapter bench decode                                       # one GPU: rows to bench/results/decode.csv
    llama-adapter bench decode --batch-sizes 16 --ragged yes         # uneven prompts, left-padded
    llama-adapter bench decode --smoke --out /tmp/bench-decode       # CPU: the tiny smoke configuration
On a CPU the numbers mean nothing for the GPU: the run only shows that the benchmark works and that every
provider computes the right answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_adapter_triton.bench.common import (
    BenchEnv,
    ConfigError,
    Expected,
    Row,
    Timing,
    argparse_type,
    attention_impl,
    base_upcast,
    check_results,
    exact_fp32_matmuls,
    free_device_memory,
    list_of,
    model_config,
    model_name,
    op_backend,
    opt,
    peak_memory_since_reset,
    positive_int,
    quantiles_ms,
    random_llama,
    reset_peak_memory,
    unpatched,
    yes_no,
)
from llama_adapter_triton.bench.harness import (
    BenchResult,
    bench_config,
    bench_main,
    bench_parser,
    check_rows,
    finish_run,
    metric_rows,
    sdpa_backend,
    skip_reason,
    skipped_row,
    start_run,
    text_report,
    titled_table,
)
from llama_adapter_triton.model.adapter import AdapterConfig, adapter_state_dict
from llama_adapter_triton.model.adapters.formats import save_adapter
from llama_adapter_triton.model.bank import AdapterBank
from llama_adapter_triton.model.generate import stream
from llama_adapter_triton.model.llama import LLaMA

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
    bank_adapters: tuple[int, ...] = field(default=(), metadata=opt(
        "adapter bank rows (model/bank.py): for each batch size, generation through an AdapterBank of N distinct "
        "adapters, row i with adapter i mod N, for each N given (e.g. 1,4,16); none by default",
        list_of(positive_int, "adapter count"), "N,N,..."))
    seed: int = field(default=0, metadata=opt("seed of the weights and the prompts", argparse_type(int), "N"))
    out: str | None = field(default=None, metadata=opt(
        "folder for decode.csv, the plot and the summary (default: bench/results/ for a full CUDA run, else a "
        "temporary folder; CPU and smoke runs never write into bench/results/)", str, "DIR"))


# --smoke, and the default on a CPU: tiny enough for Triton's interpreter (2 layers, dim 64, the top one adapted)
SMOKE = dict(models=("smoke",), batch_sizes=(1, 2), prompt_len=8, new_tokens=4, warmup_tokens=2, check_tokens=3,
             adapter_len=4, adapter_layers=1)


def build_parser() -> argparse.ArgumentParser:
    return bench_parser("llama-adapter bench decode", "Benchmark LLaMA-Adapter generation with the KV cache: the fused "
                        "op against the eager reference.", DecodeBenchConfig(), SMOKE)


def make_config(args: argparse.Namespace, *, smoke: bool, providers: Mapping[str, Provider]) -> DecodeBenchConfig:
    cfg = bench_config(args, DecodeBenchConfig(providers=tuple(providers)), SMOKE, is_smoke=smoke, providers=providers)
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
                   device: torch.device, **stream_kwargs) -> list[float]:
    """Greedy generation through stream() (stream_kwargs: an adapter bank's adapters and adapter_ids); the
    perf_counter time at which each token (all rows) is ready, the start first."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    stamps = [time.perf_counter()]
    for _ in stream(model, prompts, max_new_tokens=new_tokens, **stream_kwargs):
        sync()
        stamps.append(time.perf_counter())
    return stamps


def time_provider(model: LLaMA, provider: Provider, batch: int, cfg: DecodeBenchConfig, device: torch.device,
                  name: str, **stream_kwargs) -> Measurement:
    if cfg.ragged:  # uneven lengths: stream() left-pads them
        prompts = ragged_prompts(batch, cfg.prompt_len, model.config.vocab_size, cfg.seed + batch)
        prompt_tokens = sum(len(p) for p in prompts)
    else:
        prompts = random_tokens(batch, cfg.prompt_len, model.config.vocab_size, cfg.seed + batch, device)
        prompt_tokens = batch * cfg.prompt_len
    with attention_impl(model, provider.impl), provider.patch(model):
        generate_timed(model, prompts, cfg.warmup_tokens, device, **stream_kwargs)
        reset_peak_memory(device)
        stamps = generate_timed(model, prompts, cfg.new_tokens, device, **stream_kwargs)
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
# The adapter bank's rows
# --------------------------------------------------------------------------------------------------
BANK_TARGET = 1.1  # the most decode time the most distinct adapters may cost against one (docs/adapters-bank.md)


@torch.no_grad()
def make_bank(model: LLaMA, count: int, folder: Path, seed: int) -> AdapterBank:
    """An AdapterBank on model's base (its tensors shared, not copied) of count adapters written to folder: "0" the
    model's own adapter (what the check compares against the oracle), the others random."""
    with torch.device("meta"):
        base = LLaMA(model.config)
    own = model.state_dict()
    base.load_state_dict({k: own[k] for k in base.state_dict()}, assign=True)
    state = adapter_state_dict(model)
    g = torch.Generator().manual_seed(seed)
    files = {}
    for i in range(count):
        tensors = state if i == 0 else {k: torch.randn(v.shape, generator=g) * (0.5 if k.endswith("gate") else 1.0)
                                        for k, v in state.items()}
        files[str(i)] = save_adapter(model, folder / f"{i}.safetensors", state=tensors)
    return AdapterBank(base.eval(), files)


def bank_provider(count: int) -> Provider:
    return Provider(f"bank-a{count}", "fused")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class RunResult(BenchResult):
    config: DecodeBenchConfig
    # measurements: Measurement; skipped: (model, provider, batch, reason); checks: (model, provider) -> err / tol

    def get(self, model: str, provider: str, batch: int) -> Measurement | None:
        return next((m for m in self.measurements if (m.model, m.provider, m.batch) == (model, provider, batch)), None)


def shape_of(name: str, batch: int | str, cfg: DecodeBenchConfig) -> str:
    """The CSV's shape column, e.g. llama-7b-K10-L30-bf16-b16-p128-n512."""
    ragged = "-ragged" if cfg.ragged else ""
    return f"{name}-K{cfg.adapter_len}-L{cfg.adapter_layers}-bf16-b{batch}-p{cfg.prompt_len}{ragged}-n{cfg.new_tokens}"


def _measurement_rows(m: Measurement, shape: str) -> list[Row]:
    peak = [("peak_mem", m.peak_mib, "MiB")] if m.peak_mib is not None else []
    return metric_rows(WHAT, m.provider, "generate", shape, [
        ("prefill_ms", m.prefill_ms, "ms"), ("prefill_tokens_per_s", m.prefill_tokens_per_s, "tokens/s"),
        ("decode_tokens_per_s", m.decode_tokens_per_s, "tokens/s"),
        ("decode_step_median", m.decode_step.median_ms, "ms"), ("decode_step_p20", m.decode_step.p20_ms, "ms"),
        ("decode_step_p80", m.decode_step.p80_ms, "ms"), *peak])


def run(cfg: DecodeBenchConfig, env: BenchEnv, out_dir: Path, *, providers: Mapping[str, Provider] | None = None,
        log: Callable[[str], None] = print) -> RunResult:
    """Check, then time, every (model, provider, batch size); append the rows to out_dir/decode.csv as they come,
    then print the table and write the plot and the summary. Raises CorrectnessError as soon as a provider
    computes a wrong answer."""
    providers = PROVIDERS if providers is None else providers
    device = env.device
    result = RunResult(env, out_dir, out_dir / f"{WHAT}.csv", cfg)
    write = result.write
    start_run("bench_decode", env, result.csv_path, log)

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
            model = None
            reason = skip_reason(exc, device)
            log(f"   SKIP {name}: {reason}")
            write([skipped_row(WHAT, p.name, "all", check_shape, reason) for p in active])
            result.skipped += [(name, p.name, "any", reason) for p in active]
            continue
        log(f"   check: {cfg.check_batch} prompts (left padding {left_pad}), {cfg.check_tokens} cached positions "
            "against a full recompute by the eager model in fp32")
        checked = [(prov, model) for prov in active]
        if cfg.bank_adapters:  # the bank's path on the model's own adapter ("0") against the same oracle
            bank_dir = tempfile.TemporaryDirectory(prefix="bench-decode-bank-")
            bank = make_bank(model, max(cfg.bank_adapters), Path(bank_dir.name), cfg.seed)
            checked.append((Provider("bank", "fused", lambda m, bank=bank: bank.rows(["0"] * cfg.check_batch)),
                            bank.model))
        for prov, checked_model in checked:
            ratios = check_results(prov.name, check_shape, {"logits": cached_logits(checked_model, prompts,
                                                                                     continuation, prov, left_pad)},
                                   expected)
            result.checks[(name, prov.name)] = ratios
            write(check_rows(WHAT, prov.name, check_shape, ratios))
            log(f"   {prov.name:<6} check ok (err/tol {max(ratios.values()):.2f})")
        for batch in cfg.batch_sizes:
            shape = shape_of(name, batch, cfg)
            runs = [(prov, model, {}) for prov in active] + [
                (bank_provider(n), bank.model, {"adapters": bank, "adapter_ids": [str(i % n) for i in range(batch)]})
                for n in cfg.bank_adapters]
            for prov, timed_model, stream_kwargs in runs:
                try:
                    m = time_provider(timed_model, prov, batch, cfg, device, name, **stream_kwargs)
                except Exception as exc:  # out of memory; anything else is a bug
                    model.clear_cache()
                    reason = skip_reason(exc, device)
                    log(f"   b{batch:<4} {prov.name:<6} SKIP: {reason}")
                    write([skipped_row(WHAT, prov.name, "generate", shape, reason)])
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
            one = result.get(name, bank_provider(1).name, batch)
            for n in cfg.bank_adapters:
                m = result.get(name, bank_provider(n).name, batch)
                if n > 1 and one is not None and m is not None:  # the target: n distinct cost at most 1.1x one
                    ratio = one.decode_tokens_per_s / m.decode_tokens_per_s
                    write(metric_rows(WHAT, m.provider, "generate", shape, [("decode_time_vs_1_adapter", ratio, "x")]))
                    log(f"   b{batch:<4} {n} distinct adapters: {ratio:.2f}x the decode time of one (target "
                        f"<= {BANK_TARGET}x): {'met' if ratio <= BANK_TARGET else 'NOT met'}")
        if cfg.bank_adapters:
            del bank
            bank_dir.cleanup()
        del model, expected
        free_device_memory(device, collect=True)
        log(f"   ({time.perf_counter() - started:.1f} s)")

    return finish_run(result, report, log)


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
    cfg = result.config
    title = f"Generation with the KV cache: prompts of {cfg.prompt_len} tokens, {cfg.new_tokens} new tokens, greedy"
    header = ["model", "batch", "provider", "prefill ms", "decode ms/step [p20-p80]", "decode tok/s",
              "vs eager", "peak GiB"]
    return titled_table(title, header, lines, result.env)


def report(result: RunResult, *, log: Callable[[str], None] = print) -> RunResult:
    groups: dict[str, dict[str, float]] = {}
    for m in result.measurements:
        groups.setdefault(f"{m.model} b{m.batch}", {})[m.provider] = m.decode_tokens_per_s
    return text_report(result, results_table(result), groups=groups, log=log,
                       skipped=[f"{m} {p} b{b}: {why}" for m, p, b, why in result.skipped],
                       title="LLaMA-Adapter decode tokens/s (KV cache)", ylabel="decode tokens/s",
                       summary_title="Decode benchmark", stem=WHAT)


def main(argv: Sequence[str] | None = None, *, providers: Mapping[str, Provider] | None = None) -> int:
    providers = PROVIDERS if providers is None else providers
    parser = build_parser()
    args = parser.parse_args(argv)
    return bench_main(parser, args, WHAT, lambda smoke: make_config(args, smoke=smoke, providers=providers),
                      lambda cfg, env, out_dir: run(cfg, env, out_dir, providers=providers))


if __name__ == "__main__":
    sys.exit(main())
