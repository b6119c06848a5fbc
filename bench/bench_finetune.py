"""Benchmark: LLaMA-Adapter fine-tuning steps (arXiv 2303.16199), our stack against the official setup.

Training steps (train/finetune.py's, one process, bf16 base, fp32 adapter K = 10 in the top L = 30 layers, AdamW,
clipping) of a random LLaMA-7B/13B-shaped model (--models) on examples whose lengths are drawn like Alpaca's
(AlpacaLengths; --data/--tokenizer: real ones). Providers: ours_packed (the fused op, packed varlen micro-batches of
--token-budget tokens), ours_padded512 (--batch-size rows padded to --pad-to, the official script's), v2_packed
(LLaMA-Adapter V2), eager_padded512 (the official code's formulation), hf_peft and hf_peft_fused (transformers + PEFT's
adaption prompt; the second through model.hf.use_fused_attention). Check, before any timing: one step's loss and every
adapter gradient against the eager model in fp32, within flash-attn's bar (twice the bf16 eager step's error plus
twice bf16's rounding). Metrics: step time, processed and real tokens/s, peak memory, the projected hours of 5 epochs
of Alpaca-52K next to the paper's 8 A100-hours, issue 5's targets. --memory / --memory-plan: the memory rows (peak
memory per model, base and checkpointing, next to bench/memory.py's prediction). The long form: docs/benchmarks.md.

    llama-adapter bench finetune                                         # one GPU: rows to bench/results/finetune.csv
    llama-adapter bench finetune --data alpaca_data.json --tokenizer llama/tokenizer.model   # real lengths
    llama-adapter bench finetune --memory yes --memory-models llama2-70b --bases nf4
    llama-adapter bench finetune --smoke --out /tmp/bench-finetune      # CPU: the tiny smoke configuration
On a CPU the numbers mean nothing for the GPU. Several GPUs: the benchmark uses the current device.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llama_adapter_triton.bench.alpaca_data import ALPACA_EXAMPLES, DataStats, real_dataset, synthetic_dataset
from llama_adapter_triton.bench.common import (
    CPU_NOTICE,
    BenchEnv,
    ConfigError,
    CorrectnessError,
    Expected,
    Row,
    Timing,
    argparse_type,
    attention_impl,
    base_upcast,
    check_choices,
    check_results,
    exact_fp32_matmuls,
    free_device_memory,
    list_of,
    model_config,
    model_name,
    op_backend,
    opt,
    peak_memory_since_reset,
    positive_float,
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
    targets_text,
    text_report,
    titled_table,
    verdict,
)
from llama_adapter_triton.bench.hf_peft import hf_fused, hf_loss_sum, hf_missing, hf_upcast, random_peft_llama
from llama_adapter_triton.bench.memory import BASES, print_memory_plan, run_memory
from llama_adapter_triton.model.adapter import AdapterConfig, adapter_state_dict
from llama_adapter_triton.model.llama import LLaMA
from llama_adapter_triton.train.data import (
    PackedLoader,
    PaddedLoader,
    Step,
    TokenizedDataset,
)
from llama_adapter_triton.train.finetune import batch_loss_sum
from llama_adapter_triton.train.optim import param_groups

WHAT = "finetune"
DTYPE = torch.bfloat16  # the frozen base; the adapter is fp32
PAPER = "1 h on 8 A100s = 8 A100-hours (5 epochs of Alpaca-52K, LLaMA-7B)"
OFFICIAL_ONE_GPU = "the official script on one GPU was reported at about 2.3 h per epoch (11.5 h for 5)"
TARGET_SPEEDUP = 3.0  # ours_packed / eager_padded512, real tokens/s
TARGET_HOURS = 1.0  # 5 epochs of Alpaca-52K, 7B, one GPU
# the step as train/finetune.py takes it by default (the learning rate does not change the time of a step)
LR, BETAS, WEIGHT_DECAY, CLIP_GRAD = 1e-3, (0.9, 0.95), 0.02, 1.0


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Provider:
    """One way to train: the model, its attention implementation and the batch layout. patch wraps everything
    the provider runs (its check and its timed steps) for anything else it changes (tests inject wrong
    providers through it)."""

    name: str
    impl: str | None  # "fused" or "eager" (model.set_attention_impl); None: the hf_ models' own
    layout: str  # "packed" (PackedLoader), "padded" (PaddedLoader, --pad-to) or "longest" (the oracles)
    patch: Callable[[LLaMA], AbstractContextManager] = unpatched
    version: int = 1  # the adapter: 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter V2)
    family: str = "ours"  # "ours" (model/'s LLaMA) or "hf" (transformers' LlamaForCausalLM with PEFT's adapter)


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("ours_packed", "fused", "packed"),
    Provider("ours_padded512", "fused", "padded"),
    Provider("eager_padded512", "eager", "padded"),
    Provider("v2_packed", "fused", "packed", version=2),
    Provider("hf_peft", None, "padded", family="hf"),
    Provider("hf_peft_fused", None, "padded", hf_fused, family="hf"),
)}
# per family: the baseline (its error sets the check's tolerance) and the oracle (run in fp32, padded to the longest)
BASELINES = {"ours": PROVIDERS["eager_padded512"], "hf": PROVIDERS["hf_peft"]}
ORACLES = {"ours": Provider("oracle", "eager", "longest"), "hf": Provider("hf_oracle", None, "longest", family="hf")}


# --------------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------------
def _file(text: str) -> str:
    if not Path(text).expanduser().is_file():
        raise ValueError("no such file")
    return text


@dataclass(frozen=True)
class FinetuneBenchConfig:
    """The GPU run's defaults, in one place: the command line is generated from these fields."""

    models: tuple[str, ...] = field(default=("llama-7b", "llama-13b"), metadata=opt(
        "model shapes: model/ presets (llama-7b, llama-13b, llama2-13b, ...) or smoke", list_of(model_name, "model"),
        "NAME,..."))
    providers: tuple[str, ...] = field(default=tuple(PROVIDERS), metadata=opt(
        "providers", list_of(str, "provider"), "P,P,..."))
    token_budget: int = field(default=8192, metadata=opt(
        "ours_packed: the most tokens in one packed micro-batch", argparse_type(positive_int), "N"))
    batch_size: int = field(default=4, metadata=opt(
        "padded providers: examples per micro-batch (the official script: 4 per GPU)", argparse_type(positive_int),
        "N"))
    pad_to: int = field(default=512, metadata=opt(
        "padded providers: row length (the official script's 512); also the longest example",
        argparse_type(positive_int), "N"))
    adapter_len: int = field(default=10, metadata=opt("adapter prompts per layer K", argparse_type(positive_int), "K"))
    adapter_layers: int = field(default=30, metadata=opt(
        "adapted layers L, counted from the top", argparse_type(positive_int), "L"))
    examples: int = field(default=ALPACA_EXAMPLES, metadata=opt(
        "synthetic examples (Alpaca-like lengths) the steps are drawn from", argparse_type(positive_int), "N"))
    length_scale: float = field(default=1.0, metadata=opt(
        "synthetic lengths times this (smoke runs shrink them)", argparse_type(positive_float), "X"))
    data: str | None = field(default=None, metadata=opt(
        "an Alpaca JSON / JSONL file: use its real examples (needs --tokenizer) instead of synthetic ones",
        argparse_type(_file), "FILE"))
    tokenizer: str | None = field(default=None, metadata=opt(
        "with --data: the LLaMA tokenizer.model (or tokenizer.json)", argparse_type(_file), "FILE"))
    warmup_steps: int = field(default=2, metadata=opt(
        "untimed steps first (compilation, optimizer state)", argparse_type(positive_int), "N"))
    steps: int = field(default=8, metadata=opt("timed steps per provider", argparse_type(positive_int), "N"))
    epochs: int = field(default=5, metadata=opt(
        "epochs of Alpaca-52K in the projection (the paper's 5)", argparse_type(positive_int), "N"))
    check_examples: int = field(default=4, metadata=opt(
        "examples of the correctness check's step", argparse_type(positive_int), "N"))
    seed: int = field(default=0, metadata=opt("seed of the weights, the data and its order", argparse_type(int), "N"))
    memory: bool = field(default=False, metadata=opt(
        "yes: the memory rows instead of the providers: ours_packed's peak memory and tokens/s per model shape "
        "(--memory-models), base (--bases) and activation checkpointing off / on, on packed micro-batches of "
        "--memory-tokens tokens, each next to bench/memory.py's prediction", argparse_type(yes_no), "yes|no"))
    memory_plan: bool = field(default=False, metadata=opt(
        "yes: print only the predicted memory of those rows (bench/memory.py: from the tensors' shapes and dtypes; "
        "builds no model, needs no GPU)", argparse_type(yes_no), "yes|no"))
    memory_models: tuple[str, ...] = field(default=("llama2-7b", "llama2-13b", "llama2-70b"), metadata=opt(
        "memory rows: model shapes", list_of(model_name, "model"), "NAME,..."))
    bases: tuple[str, ...] = field(default=("bf16", "int8", "nf4"), metadata=opt(
        "memory rows: the frozen base in bf16, or quantized (int8, nf4; bitsandbytes, bf16 compute)",
        list_of(str, "base"), "B,B,..."))
    memory_tokens: tuple[int, ...] = field(default=(16384, 512), metadata=opt(
        "memory rows: tokens per packed micro-batch (512: one Alpaca-length example at a time)",
        list_of(positive_int, "token count"), "N,N,..."))
    out: str | None = field(default=None, metadata=opt(
        "folder for finetune.csv, the plot and the summary (default: bench/results/ for a full CUDA run, else a "
        "temporary folder; CPU and smoke runs never write into bench/results/)", str, "DIR"))


# --smoke, and the default on a CPU: tiny enough for Triton's interpreter (2 layers, dim 64, the top one adapted)
SMOKE = dict(models=("smoke",), token_budget=128, batch_size=2, pad_to=64, adapter_len=4, adapter_layers=1,
             examples=24, length_scale=0.1, warmup_steps=1, steps=2, check_examples=2, memory_models=("smoke",),
             memory_tokens=(128,))


def build_parser() -> argparse.ArgumentParser:
    return bench_parser("llama-adapter bench finetune", "Benchmark LLaMA-Adapter fine-tuning steps: our stack (fused "
                        "op, packing) against the official setup (padded to 512, eager attention).",
                        FinetuneBenchConfig(), SMOKE)


def make_config(args: argparse.Namespace, *, smoke: bool, providers: Mapping[str, Provider]) -> FinetuneBenchConfig:
    smoke_fields = SMOKE
    if smoke and args.memory_plan in (True,):  # the plan builds nothing: the real shapes, not the smoke model
        smoke_fields = {k: v for k, v in SMOKE.items() if k not in (
            "memory_models", "memory_tokens", "adapter_len", "adapter_layers")}
    cfg = bench_config(args, FinetuneBenchConfig(providers=tuple(providers)), smoke_fields, is_smoke=smoke,
                       providers=providers)
    check_choices("bases", cfg.bases, BASES, "base")
    if (cfg.data is None) != (cfg.tokenizer is None):
        raise ConfigError("tokenizer" if cfg.data else "data", "--data and --tokenizer go together (the real "
                          "examples are tokenized to measure their lengths)")
    if cfg.token_budget < cfg.pad_to:
        raise ConfigError("token_budget", f"{cfg.token_budget} is below --pad-to {cfg.pad_to}: a packed micro-batch "
                          "must hold the longest example")
    for name in cfg.memory_models if cfg.memory or cfg.memory_plan else cfg.models:
        n_layers = model_config(name).n_layers
        if cfg.adapter_layers > n_layers:
            raise ConfigError("adapter_layers", f"{cfg.adapter_layers} exceeds the {n_layers} layers of {name}")
    if cfg.data is None and cfg.examples < max(cfg.check_examples, cfg.batch_size):
        raise ConfigError("examples", f"{cfg.examples} is fewer than --check-examples ({cfg.check_examples}) or "
                          f"--batch-size ({cfg.batch_size})")
    return cfg


# --------------------------------------------------------------------------------------------------
# One step, checked; steps, timed
# --------------------------------------------------------------------------------------------------
CHECKED = ("loss", "prompt_grads", "gate_grads")
CHECKED_V2 = (*CHECKED, "v2_grads")  # V2: its biases', scales' and norms' gradients, all of them in one vector


def provider_context(model: torch.nn.Module, provider: Provider) -> ExitStack:
    """What the provider changes while it runs: our model's attention implementation, and its patch."""
    stack = ExitStack()
    if provider.impl is not None:
        stack.enter_context(attention_impl(model, provider.impl))
    stack.enter_context(provider.patch(model))
    return stack


def loss_sum(model: torch.nn.Module, batch: dict, device: torch.device, provider: Provider) -> torch.Tensor:
    return (hf_loss_sum if provider.family == "hf" else batch_loss_sum)(model, batch, device)


_PROMPTS, _GATES = (".adapter_prompt", ".adaption_prompt"), (".attention.gate", ".adaption_gate")  # ours, PEFT's


def step_results(model: torch.nn.Module, batch: dict, provider: Provider,
                 device: torch.device) -> dict[str, torch.Tensor | None]:
    """The loss (mean over the batch's targets) and the adapter's gradients of one training step's
    forward/backward with the provider's attention: {"loss", "prompt_grads" (all adapted layers stacked),
    "gate_grads"} and, for V2, "v2_grads" (every bias, scale and norm, concatenated), fp32; a gradient that did
    not arrive in every layer is None."""
    model.zero_grad(set_to_none=True)
    with provider_context(model, provider):
        loss = loss_sum(model, batch, device, provider) / batch["num_targets"]
        loss.backward()
    params = dict(model.named_parameters())

    def stacked(suffixes: tuple[str, ...]) -> torch.Tensor | None:
        grads = [p.grad for n, p in params.items() if n.endswith(suffixes)]
        return None if any(g is None for g in grads) else torch.stack(grads).float()

    result = {"loss": loss.detach().float(), "prompt_grads": stacked(_PROMPTS), "gate_grads": stacked(_GATES)}
    if getattr(model, "adapter", None) is not None and model.adapter.version == 2:
        grads = [p.grad for n, p in adapter_state_dict(model).items() if not n.endswith(("adapter_prompt", "gate"))]
        result["v2_grads"] = None if any(g is None for g in grads) else torch.cat([g.flatten() for g in grads]).float()
    model.zero_grad(set_to_none=True)
    return result


def check_ids(data: TokenizedDataset, count: int, token_budget: int) -> list[int]:
    """The first examples of the data (at most count) that fit one packed micro-batch together."""
    ids, total = [], 0
    for i in range(min(count, len(data))):
        total += int(data.lengths[i])
        if ids and total > token_budget:
            break
        ids.append(i)
    return ids


def check_batch(provider: Provider, data: TokenizedDataset, ids: list[int], cfg: FinetuneBenchConfig) -> dict:
    """The check's examples in the provider's layout (the oracle's: padded to the longest)."""
    if provider.layout == "longest":  # an oracle
        return PaddedLoader(data, len(ids), pad_to="longest", shuffle=False).collate(ids)
    if provider.layout == "packed":
        return PackedLoader(data, cfg.token_budget, shuffle=False).collate(ids)
    return PaddedLoader(data, len(ids), pad_to=cfg.pad_to, shuffle=False).collate(ids)


# the eager model in bf16 may err by at most this (relative to the oracle's max |x|): a sanity bound on the baseline
BASELINE_BOUND = 0.25


def expected_step(model: torch.nn.Module, data: TokenizedDataset, ids: list[int], cfg: FinetuneBenchConfig,
                  device: torch.device, family: str = "ours") -> tuple[Expected, dict[str, torch.Tensor | None]]:
    """The oracle (the eager model in fp32, padded to the longest; hf: PEFT's model in fp32) and the tolerances from
    the baseline (the eager model in bf16 on eager_padded512's layout; hf: hf_peft's step); returns (expected, the
    baseline's results)."""
    oracle_provider, baseline_provider = ORACLES[family], BASELINES[family]
    with (hf_upcast(model) if family == "hf" else base_upcast(model, torch.float32)), exact_fp32_matmuls():
        oracle = step_results(model, check_batch(oracle_provider, data, ids, cfg), oracle_provider, device)
    baseline = step_results(model, check_batch(baseline_provider, data, ids, cfg), baseline_provider, device)
    if any(v is None for v in (*oracle.values(), *baseline.values())):
        raise CorrectnessError("the eager model computes no gradient for some adapter parameter: nothing to check")
    what = "PEFT's model" if family == "hf" else "the eager model"
    expected = Expected.from_runs(oracle, baseline, "bf16",
                                  oracle_desc=f"{what} in fp32, padded to the longest example",
                                  baseline_desc=f"{what} in bf16 ({baseline_provider.name})", normalize=True)
    for name, err in expected.baseline_err.items():
        if not err <= BASELINE_BOUND:
            raise CorrectnessError(f"the eager model in bf16 errs by {err:.3e} (relative to the max) on {name} against "
                                   f"its fp32 oracle (bound {BASELINE_BOUND}): the baseline itself is broken")
    return expected, baseline


def steps_forever(loader: PackedLoader | PaddedLoader) -> Iterator[Step]:
    """The loader's steps, epoch after epoch (each collated when it is drawn: outside the timed region)."""
    epoch = 0
    while True:
        yield from loader.iter_epoch(epoch)
        epoch += 1


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], step: Step,
               device: torch.device, provider: Provider) -> float:
    """One optimizer step as train/finetune.py's loop takes it on one process (bf16: no loss scaling)."""
    total = torch.zeros((), device=device)
    for batch in step.batches:
        micro = loss_sum(model, batch, device, provider)
        (micro / step.num_targets).backward()
        total += micro.detach()
    torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total) / step.num_targets  # a sync, as the loop's loss logging


@dataclass
class Measurement:
    model: str
    provider: str
    batching: str
    step: Timing  # ms
    processed_tokens_per_s: float  # median over the timed steps
    real_tokens_per_s: float  # over an epoch of this data: processed_tokens_per_s x fill ratio
    projected_hours: float  # cfg.epochs epochs of Alpaca-52K at this data's mean length
    peak_mib: float | None
    timed_steps: int
    timed_real_tokens: int
    timed_processed_tokens: int
    final_loss: float


def batching(provider: Provider, cfg: FinetuneBenchConfig) -> str:
    if provider.layout == "packed":
        return f"packed, <= {cfg.token_budget} tokens per micro-batch, no padding"
    return f"padded, {cfg.batch_size} x {cfg.pad_to} tokens per micro-batch"


def epoch_tokens(provider: Provider, mean_len: float, cfg: FinetuneBenchConfig) -> tuple[float, float]:
    """(real, processed) tokens of one epoch of Alpaca-52K at this mean length in the provider's layout."""
    real = ALPACA_EXAMPLES * mean_len
    return real, (real if provider.layout == "packed" else ALPACA_EXAMPLES * cfg.pad_to)


def time_provider(model: torch.nn.Module, data: TokenizedDataset, provider: Provider, cfg: FinetuneBenchConfig,
                  device: torch.device, model_name: str) -> Measurement:
    """Warm up, then time cfg.steps steps of a fresh AdamW on the adapter; the adapter is restored after."""
    if provider.layout == "packed":
        loader = PackedLoader(data, cfg.token_budget, seed=cfg.seed)
    else:
        loader = PaddedLoader(data, cfg.batch_size, pad_to=cfg.pad_to, seed=cfg.seed)
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}  # the adapter
    saved = {k: v.detach().clone() for k, v in trained.items()}
    params = list(trained.values())
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
    steps = steps_forever(loader)
    times, rates, real, processed = [], [], 0, 0
    try:
        with provider_context(model, provider):
            for _ in range(cfg.warmup_steps):
                train_step(model, optimizer, params, next(steps), device, provider)
            reset_peak_memory(device)
            for _ in range(cfg.steps):
                step = next(steps)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                loss = train_step(model, optimizer, params, step, device, provider)
                seconds = time.perf_counter() - start
                times.append(seconds * 1e3)
                rates.append(step.num_tokens / seconds)
                real, processed = real + step.num_real_tokens, processed + step.num_tokens
            peak = peak_memory_since_reset(device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, p in trained.items():
                p.copy_(saved[k])
        del optimizer
    rate = float(np.median(rates))
    epoch_real, epoch_processed = epoch_tokens(provider, float(data.lengths.mean()), cfg)
    epoch_seconds = epoch_processed / rate
    return Measurement(model_name, provider.name, batching(provider, cfg), quantiles_ms(times), rate,
                       epoch_real / epoch_seconds, cfg.epochs * epoch_seconds / 3600, peak, len(times), real,
                       processed, loss)


def attention_backends(provider: Provider, config, device: torch.device, cfg: FinetuneBenchConfig) -> str:
    """What computes the attention of each kind of layer for this provider, on this device."""
    if provider.family == "hf":
        if provider.name == "hf_peft":
            return "transformers' SDPA attention, then PEFT's prompt attention (eager, materialised scores)"
        return f"every layer: kernels.zero_init_attention ({op_backend(device)}), through model.hf.use_fused_attention"
    if provider.impl == "eager":
        return ("adapted layers: kernels.zero_init_attention_ref; plain layers: eager_attention (both materialise "
                "the scores, fp32 softmax)")
    op = f"kernels.zero_init_attention ({op_backend(device)})"
    if provider.layout == "packed":
        return f"every layer: {op}, varlen (the plain layers with an empty prompt)"
    q = torch.empty(cfg.batch_size, config.n_heads, cfg.pad_to, config.head_dim, dtype=DTYPE, device=device)
    k = torch.empty(cfg.batch_size, config.n_kv_heads, cfg.pad_to, config.head_dim, dtype=DTYPE, device=device)
    sdpa = sdpa_backend(q, k, k, is_causal=True, enable_gqa=config.n_heads != config.n_kv_heads)
    return f"adapted layers: {op}; plain layers: SDPA {sdpa}"


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class RunResult(BenchResult):
    config: FinetuneBenchConfig
    data: dict[str, DataStats] = field(default_factory=dict)  # per model
    targets: list[TargetCheck] = field(default_factory=list)
    # measurements: Measurement; skipped: (model, provider, reason); checks: (model, provider) -> err / tol

    def get(self, model: str, provider: str) -> Measurement | None:
        return next((m for m in self.measurements if m.model == model and m.provider == provider), None)


def shape_of(name: str, cfg: FinetuneBenchConfig) -> str:
    """The CSV's shape column: the model and its adapter, e.g. llama-7b-K10-L30-bf16."""
    return f"{name}-K{cfg.adapter_len}-L{cfg.adapter_layers}-bf16"


def _measurement_rows(m: Measurement, shape: str) -> list[Row]:
    peak = [("peak_mem", m.peak_mib, "MiB")] if m.peak_mib is not None else []
    return metric_rows(WHAT, m.provider, "step", shape, [
        ("step_median", m.step.median_ms, "ms"), ("step_p20", m.step.p20_ms, "ms"), ("step_p80", m.step.p80_ms, "ms"),
        ("processed_tokens_per_s", m.processed_tokens_per_s, "tokens/s"),
        ("real_tokens_per_s", m.real_tokens_per_s, "tokens/s"), ("projected_hours", m.projected_hours, "h"),
        ("timed_steps", m.timed_steps, "steps"), ("timed_real_tokens", m.timed_real_tokens, "tokens"),
        ("timed_processed_tokens", m.timed_processed_tokens, "tokens"), ("final_loss", m.final_loss, ""), *peak])


def _data_for(cfg: FinetuneBenchConfig, vocab_size: int, real: tuple[TokenizedDataset, int] | None
              ) -> tuple[TokenizedDataset, str]:
    if real is not None:
        data, tok_vocab = real
        if tok_vocab > vocab_size:
            raise ConfigError("tokenizer", f"its {tok_vocab} tokens exceed the model's vocabulary of {vocab_size}")
        return data, f"{cfg.data} (tokenized with {cfg.tokenizer})"
    data = synthetic_dataset(cfg.examples, vocab_size, seed=cfg.seed, scale=cfg.length_scale, max_len=cfg.pad_to)
    scaled = f", lengths x {cfg.length_scale:g}" if cfg.length_scale != 1 else ""
    return data, f"synthetic Alpaca-like lengths (an approximation{scaled})"


def run_version(name: str, version: int, active: list[Provider], data: TokenizedDataset, cfg: FinetuneBenchConfig,
                result: RunResult, write: Callable[[list[Row]], None], log: Callable[[str], None],
                family: str = "ours") -> None:
    """Build the model of preset name with a V1 or V2 adapter (family "hf": transformers' with PEFT's), check, then
    time, each of its providers; rows go out as they come ("skipped" rows for what runs out of memory, or cannot
    run here). V2's model rows carry the provider "all-v2", the hf_ model's "all-hf"."""
    device, shape, config = result.env.device, shape_of(name, cfg), model_config(name)
    everyone = "all-hf" if family == "hf" else "all" if version == 1 else "all-v2"
    label = " (transformers + PEFT)" if family == "hf" else " (V2)" if version == 2 else ""
    missing = hf_missing() if family == "hf" else None
    if missing:
        log(f"   SKIP {name}{label}: {missing}")
        write([skipped_row(WHAT, p.name, "all", shape, missing) for p in active])
        result.skipped += [(name, p.name, missing) for p in active]
        return
    model = None
    try:
        if family == "hf":
            model = random_peft_llama(name, cfg, device)
        else:
            model = random_llama(name, AdapterConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers,
                                                     version=version), dtype=DTYPE, device=device, seed=cfg.seed)
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"   model{label}: {weights / 1024:.1f} GiB of weights, {trained:,} trained parameters")
        write(metric_rows(WHAT, everyone, "all", shape, [("weights_mem", weights, "MiB"),
                                                         ("trained_params", trained, "parameters")]))
        ids = check_ids(data, cfg.check_examples, cfg.token_budget)
        expected, baseline = expected_step(model, data, ids, cfg, device, family)
        log(f"   check: one step on {len(ids)} examples ({int(data.lengths[ids].sum())} tokens) against "
            f"{expected.oracle_desc}")
    except Exception as exc:  # out of memory building the model or computing the oracle; anything else is a bug
        model = None
        reason = skip_reason(exc, device)
        log(f"   SKIP {name}{label}: {reason}")
        write([skipped_row(WHAT, p.name, "all", shape, reason) for p in active])
        result.skipped += [(name, p.name, reason) for p in active]
        return

    for prov in active:
        prov_started = time.perf_counter()
        try:
            got = baseline if prov == BASELINES[family] else step_results(
                model, check_batch(prov, data, ids, cfg), prov, device)
            ratios = check_results(prov.name, shape, got, expected)
            result.checks[(name, prov.name)] = ratios
            m = time_provider(model, data, prov, cfg, device, name)
        except Exception as exc:  # out of memory; anything else is a bug
            model.zero_grad(set_to_none=True)
            reason = skip_reason(exc, device)
            log(f"   {prov.name:<16} SKIP: {reason}")
            write([skipped_row(WHAT, prov.name, "all", shape, reason)])
            result.skipped.append((name, prov.name, reason))
            continue
        result.measurements.append(m)
        write(check_rows(WHAT, prov.name, shape, ratios)
              + metric_rows(WHAT, prov.name, "all", shape, [
                  ("attention", attention_backends(prov, config, device, cfg), ""), ("batching", m.batching, "")])
              + _measurement_rows(m, shape))
        mem = f" | peak {m.peak_mib / 1024:.1f} GiB" if m.peak_mib is not None else ""
        log(f"   {prov.name:<16} check ok (err/tol {max(ratios.values()):.2f}) | step {m.step.median_ms:.1f} ms "
            f"[{m.step.p20_ms:.1f}-{m.step.p80_ms:.1f}] | {m.processed_tokens_per_s:,.0f} processed tok/s | "
            f"{m.real_tokens_per_s:,.0f} real tok/s{mem} | {cfg.epochs} epochs: {m.projected_hours:.2f} h "
            f"({time.perf_counter() - prov_started:.1f} s)")
        free_device_memory(device)
    del model, expected, baseline
    free_device_memory(device, collect=True)


def run(cfg: FinetuneBenchConfig, env: BenchEnv, out_dir: Path, *, providers: Mapping[str, Provider] | None = None,
        real: tuple[TokenizedDataset, int] | None = None, log: Callable[[str], None] = print) -> RunResult:
    """Check, then time, every (model, provider); append the rows to out_dir/finetune.csv as they come, then
    print the table, the projection and the targets, and write the plot and the summary. real: cfg.data's
    examples and the tokenizer's vocabulary size (real_dataset; read here when not given). Raises
    CorrectnessError as soon as a provider computes a wrong answer."""
    providers = PROVIDERS if providers is None else providers
    result = RunResult(env, out_dir, out_dir / f"{WHAT}.csv", cfg)
    write = result.write
    start_run("bench_finetune", env, result.csv_path, log)
    if cfg.data and real is None:
        real = real_dataset(cfg.data, cfg.tokenizer, max_len=cfg.pad_to)

    for name in cfg.models:
        started = time.perf_counter()
        shape = shape_of(name, cfg)
        config = model_config(name)
        data, source = _data_for(cfg, config.vocab_size, real)
        stats = result.data[name] = DataStats.of(data, source, cfg.pad_to)
        log(f"\n== {shape}: {config.n_layers} layers, dim {config.dim}, {config.n_heads} heads; adapter K "
            f"{cfg.adapter_len} in the top {cfg.adapter_layers} layers; base bf16, adapter fp32")
        log(f"   data: {stats.line()}")
        write(metric_rows(WHAT, "data", "all", shape, (
            ("source", source, ""), ("examples", stats.examples, "examples"), ("mean_tokens", stats.mean, "tokens"),
            ("p50_tokens", stats.p50, "tokens"), ("p90_tokens", stats.p90, "tokens"),
            ("longest", stats.longest, "tokens"), ("share_at_pad_to", stats.at_max, ""))))
        active = [providers[p] for p in cfg.providers]
        for family, version in sorted({(p.family, p.version) for p in active}, key=lambda fv: (fv[0] != "ours", fv)):
            # one model at a time: V1's, V2's, then transformers' with PEFT's adapter
            run_version(name, version, [p for p in active if (p.family, p.version) == (family, version)], data, cfg,
                        result, write, log, family)
        log(f"   ({time.perf_counter() - started:.1f} s)")
        v1, v2 = result.get(name, "ours_packed"), result.get(name, "v2_packed")
        if v1 and v2:
            write([Row(WHAT, "v2_packed", "vs_v1", shape, "real_tokens_per_s_ratio",
                       v2.real_tokens_per_s / v1.real_tokens_per_s, "ratio")]
                  + ([Row(WHAT, "v2_packed", "vs_v1", shape, "peak_mem_ratio", v2.peak_mib / v1.peak_mib, "ratio")]
                     if v1.peak_mib and v2.peak_mib else []))

    if env.is_cuda:  # a CPU smoke run's numbers say nothing about the targets
        result.targets = check_targets(result)
        write(target_rows(result))
    return finish_run(result, report, log)


# --------------------------------------------------------------------------------------------------
# Reports: table, projection, targets, plot, summary
# --------------------------------------------------------------------------------------------------
@dataclass
class TargetCheck:
    target: str
    model: str
    value: float | None  # None: a side was not measured
    bound: float
    met: bool | None

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.2f}"
        return f"{verdict(self.met):<12} {self.target:<58} {self.model:<12} {shown} (bound {self.bound:g})"


def check_targets(result: RunResult) -> list[TargetCheck]:
    """Issue 5's fine-tuning targets per model: ours_packed >= 3x eager_padded512's real tokens/s, and (7B
    shapes) cfg.epochs epochs of Alpaca-52K under 1 hour on this one GPU."""
    checks = []
    for name in result.config.models:
        ours, eager = result.get(name, "ours_packed"), result.get(name, "eager_padded512")
        ratio = ours.real_tokens_per_s / eager.real_tokens_per_s if ours and eager else None
        checks.append(TargetCheck("ours_packed / eager_padded512 real tokens/s >= 3", name, ratio, TARGET_SPEEDUP,
                                  None if ratio is None else ratio >= TARGET_SPEEDUP))
        if model_config(name).dim == 4096:  # the 7B shapes (LLaMA-1/2 7B, Llama-3 8B)
            hours = ours.projected_hours if ours else None
            checks.append(TargetCheck(f"{result.config.epochs} epochs of Alpaca-52K on 1 GPU < 1 h (ours_packed)",
                                      name, hours, TARGET_HOURS, None if hours is None else hours < TARGET_HOURS))
    return checks


def target_rows(result: RunResult) -> list[Row]:
    rows = []
    for c in result.targets:
        shape = shape_of(c.model, result.config)
        rows.append(Row(WHAT, "all", "target", shape, c.target, verdict(c.met) if c.value is None
                        else f"{verdict(c.met)} ({c.value:.3g}, bound {c.bound:g})", ""))
    return rows


def results_table(result: RunResult) -> str:
    cfg = result.config
    lines = []
    for m in result.measurements:
        eager = result.get(m.model, "eager_padded512")
        vs = f"{m.real_tokens_per_s / eager.real_tokens_per_s:.2f}x" if eager else "-"
        mem = f"{m.peak_mib / 1024:.1f}" if m.peak_mib is not None else "-"
        step = f"{m.step.median_ms:.1f} [{m.step.p20_ms:.1f}-{m.step.p80_ms:.1f}]"
        lines.append([m.model, m.provider, m.batching, step, f"{m.processed_tokens_per_s:,.0f}",
                      f"{m.real_tokens_per_s:,.0f}", vs, mem, f"{m.projected_hours:.2f}"])
    title = (f"Fine-tuning steps ({cfg.steps} timed after {cfg.warmup_steps} warm-up); projected: {cfg.epochs} "
             f"epochs of Alpaca-52K ({ALPACA_EXAMPLES:,} examples at the data's mean length) on this one GPU")
    header = ["model", "provider", "batching", "step ms [p20-p80]", "processed tok/s", "real tok/s",
              "real vs eager_padded512", "peak GiB", f"{cfg.epochs} epochs (h)"]
    return titled_table(title, header, lines, result.env)


def projection_text(result: RunResult) -> str:
    lines = [f"Paper: {PAPER}; {OFFICIAL_ONE_GPU}."]
    for name in result.config.models:
        parts = [f"{m.provider} {m.projected_hours:.2f} h" for m in result.measurements if m.model == name]
        if parts:
            lines.append(f"{name} on 1 x {result.env.gpu_name}: {result.config.epochs} epochs of Alpaca-52K = "
                         + ", ".join(parts) + f" (= {result.env.gpu_name}-hours; the paper: 8 A100-hours)")
        v1, v2 = result.get(name, "ours_packed"), result.get(name, "v2_packed")
        if v1 and v2:
            mem = f", peak memory {v2.peak_mib / v1.peak_mib:.2f}x" if v1.peak_mib and v2.peak_mib else ""
            lines.append(f"{name}: LLaMA-Adapter V2 (v2_packed) at {v2.real_tokens_per_s / v1.real_tokens_per_s:.2f}x "
                         f"V1's real tokens/s (ours_packed){mem}")
    return "\n".join(lines)


def format_targets(result: RunResult) -> str:
    head = "Targets (issue 5: H100, bf16; fine-tuning)"
    if not result.env.is_cuda:
        return head + ": checked on GPU runs only. " + CPU_NOTICE
    return targets_text(head, result.targets, result.env)


def report(result: RunResult, *, log: Callable[[str], None] = print) -> RunResult:
    """Print the table, the projection and the targets; write the bar chart and the summary."""
    groups: dict[str, dict[str, float]] = {}
    for m in result.measurements:
        groups.setdefault(m.model, {})[m.provider] = m.real_tokens_per_s
    text = "\n\n".join([results_table(result), projection_text(result), format_targets(result)])
    return text_report(result, text, groups=groups, log=log,
                       skipped=[f"{m} {p}: {why}" for m, p, why in result.skipped],
                       title="LLaMA-Adapter fine-tuning: real tokens/s per provider", ylabel="real tokens/s",
                       summary_title="Fine-tuning benchmark", stem=WHAT,
                       notes=[f"- data ({m}): {s.line()}" for m, s in result.data.items()])


# --------------------------------------------------------------------------------------------------
# Memory rows (bench/memory.py): ours_packed's steps, timed there next to the plan
# --------------------------------------------------------------------------------------------------
def memory_steps(cfg: FinetuneBenchConfig, device: torch.device) -> Callable[[LLaMA, int], Callable[[], Measurement]]:
    """For memory.run_memory: ours_packed's steps (time_provider) on micro-batches of tokens tokens, the synthetic
    data made now, the steps when called."""
    def prepare(model: LLaMA, tokens: int) -> Callable[[], Measurement]:
        data = synthetic_dataset(cfg.examples, model.config.vocab_size, seed=cfg.seed, scale=cfg.length_scale,
                                 max_len=min(cfg.pad_to, tokens))
        packed = dataclasses.replace(cfg, token_budget=tokens)
        return lambda: time_provider(model, data, PROVIDERS["ours_packed"], packed, device, model.config.name)

    return prepare


def main(argv: Sequence[str] | None = None, *, providers: Mapping[str, Provider] | None = None) -> int:
    providers = PROVIDERS if providers is None else providers
    parser = build_parser()
    args = parser.parse_args(argv)

    def run_on_data(cfg: FinetuneBenchConfig, env: BenchEnv, out_dir: Path) -> None:
        if cfg.memory_plan:
            print_memory_plan(cfg, env, out_dir)
            return
        if cfg.memory:
            run_memory(cfg, env, out_dir, memory_steps(cfg, env.device))
            return
        real = None
        if cfg.data:
            try:
                real = real_dataset(cfg.data, cfg.tokenizer, max_len=cfg.pad_to)
            except (ValueError, OSError) as exc:  # DataError is a ValueError; a tokenizer file that is none
                raise ConfigError("data / --tokenizer", str(exc)) from None
        run(cfg, env, out_dir, providers=providers, real=real)

    return bench_main(parser, args, WHAT, lambda smoke: make_config(args, smoke=smoke, providers=providers),
                      run_on_data)


if __name__ == "__main__":
    sys.exit(main())
