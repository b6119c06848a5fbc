"""Memory of LLaMA-Adapter fine-tuning: predicted from the tensors' shapes and dtypes (MemoryPlan), and measured on
any device by counting tensor storage (TensorMemory).

MemoryPlan(config, base="nf4", tokens=16384, ...) adds up, in bytes, what one training step holds at its peak:
weights (the base in its dtype or in bitsandbytes' packed layout, the adapter in fp32), trainer (the adapter's
gradients and AdamW's two moments), activations (what autograd keeps per adapted block, from what each operation
saves; with activation checkpointing each block's input only), the loss's, and the transient (the most that exists
for a moment on top of that: the loss's backward or one block's). It is a sum over shapes and dtypes, checked
(tests/test_memory.py) against TensorMemory on small random models on the CPU: within 15% of the measured peak.

TensorMemory counts every tensor storage that torch allocates while it is active (a TorchDispatchMode: inside
autograd's backward and checkpoint's recomputation too) and its release (a weakref finalizer on the storage), plus
what was alive when it started if given: torch.cuda.max_memory_allocated for any device. It does not see memory that
bypasses torch (numpy, Triton's interpreter, a library's own buffers).
Below them, `llama-adapter bench finetune`'s memory rows (--memory-plan yes, --memory yes): the plan next to the
peak that ours_packed's steps reach. What each term counts, and the measured errors: docs/benchmarks.md.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_adapter_triton.bench.common import (
    CPU_NOTICE,
    BenchEnv,
    CorrectnessError,
    Row,
    append_rows,
    format_table,
    free_device_memory,
    model_config,
    random_llama,
)
from llama_adapter_triton.bench.harness import metric_rows, skip_reason, skipped_row
from llama_adapter_triton.model.adapter import AdapterConfig
from llama_adapter_triton.model.quantize import nf4_blocksize
from llama_adapter_triton.train.loss import default_chunk_rows

if TYPE_CHECKING:
    from llama_adapter_triton.model.llama import LLaMA


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storage on one device type while active:

        with TensorMemory(existing=model.parameters()) as mem:
            step()
        mem.peak  # bytes: the existing tensors plus the most that the step's allocations held at once

    existing: tensors alive before (each storage counted once, for as long as it lives)."""

    def __init__(self, device: str = "cpu", existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.device = device
        self.live: dict[int, int] = {}  # id(storage) -> bytes
        self.current = self.peak = 0
        for t in existing:
            self._track(t)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type != self.device:
            return
        storage = t.untyped_storage()  # one Python object per storage, alive as long as the storage
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


BASES = ("bf16", "int8", "nf4", "fp32")
_BYTES = {"bf16": 2, "fp32": 4}


def nf4_bytes(numel: int, blocksize: int = 64) -> int:
    """bitsandbytes' NF4 with double quantization: packed data, 8-bit absmax per block, fp32 absmax per 256 of
    those, the 256-entry fp32 code of the absmaxes, its fp32 offset, and the 16-entry fp32 NF4 code."""
    blocks = math.ceil(numel / blocksize)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + 4 * 16


def int8_bytes(rows: int, cols: int) -> int:
    """bitsandbytes' LLM.int8 weight: int8 rows and one fp32 absmax per row."""
    return rows * cols + 4 * rows


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted bytes of one fine-tuning step's peak (see the module docstring). config: a LLaMAConfig."""

    config: object
    base: str = "bf16"  # "bf16", "fp32" (the base's dtype), "int8" or "nf4" (bf16 compute)
    tokens: int = 16384  # one packed micro-batch
    targets: int | None = None  # tokens with a loss (default: all)
    adapter_len: int = 10
    adapter_layers: int = 30
    checkpointing: bool = False
    chunked_loss: bool = True
    chunk_rows: int | None = None  # train/loss.py's default when None
    device: str = "cuda"  # bitsandbytes' int8 layers keep their inputs on a CPU even where no gradient needs them

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"base must be one of {', '.join(BASES)}, got {self.base!r}")

    @property
    def act_bytes(self) -> int:
        """Bytes per element of the activations (the compute dtype: bf16 for the quantized bases)."""
        return 4 if self.base == "fp32" else 2

    def _linears(self) -> list[tuple[int, int]]:
        """(out, in) of one block's linear layers: wq, wk, wv, wo, w1, w2, w3."""
        c = self.config
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        return [(q, c.dim), (kv, c.dim), (kv, c.dim), (c.dim, q), (c.hidden_dim, c.dim), (c.dim, c.hidden_dim),
                (c.hidden_dim, c.dim)]

    def weights(self) -> int:
        c, b = self.config, self.act_bytes
        if self.base == "nf4":
            per_layer = sum(nf4_bytes(r * k, nf4_blocksize(k)) for r, k in self._linears())
        elif self.base == "int8":
            per_layer = sum(int8_bytes(r, k) for r, k in self._linears())
        else:
            per_layer = b * sum(r * k for r, k in self._linears())
        per_layer += 2 * c.dim * b  # the two norms
        embeddings = c.vocab_size * c.dim * b * (1 if c.tie_embeddings else 2)
        return c.n_layers * per_layer + embeddings + c.dim * b + self.adapter_params() * 4

    def adapter_params(self) -> int:
        c = self.config
        return self.adapter_layers * (self.adapter_len * c.dim + c.n_heads)

    def trainer(self) -> int:
        """The adapter's gradients and AdamW's two moments, fp32."""
        return 3 * 4 * self.adapter_params()

    def block_activations(self, first: bool) -> int:
        """What one adapted block keeps for the backward (first: the lowest adapted block, whose input has no
        gradient)."""
        c, b, T = self.config, self.act_bytes, self.tokens
        q = c.n_heads * c.head_dim
        norm = T * c.dim * 4 + T * 4  # fp32 input, reciprocal root
        qkv = T * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * b
        prompt = 2 * self.adapter_len * c.n_kv_heads * c.head_dim * b
        op = T * q * 4 + 2 * c.n_heads * T * 4  # fp32 token output, lse_w and lse_p
        swiglu = 3 * T * c.hidden_dim * b
        return (0 if first else norm) + qkv + prompt + op + norm + swiglu + self._int8_inputs(first)

    def _int8_inputs(self, first: bool) -> int:
        """bitsandbytes' int8 matmuls keep their input (the norms' outputs, wo's and w2's) as an attribute of their
        autograd context, out of reach of activation checkpointing; on a CPU even where no gradient needs it."""
        if self.base != "int8":
            return 0
        c, b, T = self.config, self.act_bytes, self.tokens
        attention_input = 0 if first and self.device != "cpu" else T * c.dim * b
        return attention_input + T * (c.n_heads * c.head_dim + c.dim + c.hidden_dim) * b

    def activations(self) -> int:
        """What the adapted blocks keep for the backward, at the end of the forward."""
        c, T = self.config, self.tokens
        shared = 2 * T * (c.head_dim // 2) * 4 + T * 8  # RoPE's cos and sin (fp32), the positions
        if self.checkpointing:  # each block keeps its input only (and int8's inputs, see _int8_inputs)
            return shared + self.adapter_layers * T * c.dim * self.act_bytes + self._int8_inputs(first=True) + (
                self.adapter_layers - 1) * self._int8_inputs(first=False)
        return shared + self.block_activations(first=True) + (self.adapter_layers - 1) * self.block_activations(False)

    def _loss_rows(self) -> int:
        c, n = self.config, self.targets or self.tokens
        if not self.chunked_loss:
            return n
        return min(n, self.chunk_rows or default_chunk_rows(n, c.vocab_size, c.dim))

    def head(self) -> int:
        """What the final norm and the loss keep: the norm's fp32 input and root and its output at the targets, the
        target indices and ids; plain, the fp32 log-probabilities of every target too."""
        c, n = self.config, self.targets or self.tokens
        kept = n * c.dim * 4 + n * 4 + n * c.dim * self.act_bytes + 2 * n * 8
        return kept + (0 if self.chunked_loss else n * c.vocab_size * 4)

    def transient(self) -> int:
        """The most that exists for a moment on top of what is kept: the loss's backward (the gradient of the
        negative log-likelihood and of the log-softmax, fp32, and for a chunk its recomputed log-probabilities), or
        one block's backward (SwiGLU's: the gradient of its product and of its two inputs; or the attention's: q, k,
        v's and the op's fp32 dq), after recomputing that block's activations with checkpointing."""
        c, b, T = self.config, self.act_bytes, self.tokens
        loss = (3 if self.chunked_loss else 2) * self._loss_rows() * c.vocab_size * 4
        swiglu = 3 * T * c.hidden_dim * b
        attention = T * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * b + T * c.n_heads * c.head_dim * 4
        block = max(swiglu, attention) + (self.block_activations(first=False) if self.checkpointing else 0)
        return max(loss, block)

    def total(self) -> int:
        return self.weights() + self.trainer() + self.activations() + self.head() + self.transient()

    def parts(self) -> dict[str, int]:
        """weights, trainer, activations, loss (head and transient: the larger of the loss's and a block's
        backward), total."""
        return {"weights": self.weights(), "trainer": self.trainer(), "activations": self.activations(),
                "loss": self.head(), "transient": self.transient(), "total": self.total()}


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor a model holds: parameters, buffers, and the quantization state of its bitsandbytes layers."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # nf4: absmax (8-bit), the NF4 code, and the absmaxes' own state
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if scb is not None:  # int8: the rows' absmax
            tensors.append(scb)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------------------------------
# bench_finetune's memory rows (--memory-plan yes, --memory yes): bases x activation checkpointing, the plan next to
# what ours_packed's steps measure. cfg: bench_finetune's FinetuneBenchConfig (memory_models, bases, memory_tokens,
# adapter_len, adapter_layers, seed); the rows go to its finetune.csv.
# --------------------------------------------------------------------------------------------------
WHAT = "finetune"
PACKED = "ours_packed"  # the provider whose steps the memory rows time
DTYPE = torch.bfloat16  # the frozen base (or the compute dtype of a quantized one); the adapter is fp32
GPUS = {"A100-80GB": 80e9, "H200": 141e9}  # for the plan's "fits" columns (bytes)


def memory_cases(cfg) -> Iterator[tuple[str, str, bool, int]]:
    """(model, base, checkpointing, tokens) of every memory row, in order."""
    for name in cfg.memory_models:
        for base in cfg.bases:
            for checkpointing in (False, True):
                for tokens in cfg.memory_tokens:
                    yield name, base, checkpointing, tokens


def memory_shape(name: str, base: str, checkpointing: bool, tokens: int, cfg) -> str:
    """The CSV's shape column of a memory row, e.g. llama2-7b-K10-L30-nf4-ckpt-16384tok."""
    return f"{name}-K{cfg.adapter_len}-L{cfg.adapter_layers}-{base}-{'ckpt' if checkpointing else 'nockpt'}-{tokens}tok"


def memory_plan(name: str, base: str, checkpointing: bool, tokens: int, cfg, device: str,
                targets: int | None = None) -> MemoryPlan:
    """The prediction for a memory row (targets: the response tokens, by default the data's share of them)."""
    share = 0.55  # Alpaca-like data: the response's share of an example's tokens (AlpacaLengths: 85 of 156)
    return MemoryPlan(model_config(name), base=base, tokens=tokens, targets=targets or round(share * tokens),
                      adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers, checkpointing=checkpointing,
                      device=device)


def print_memory_plan(cfg, env: BenchEnv, out_dir: Path, *,
                      log: Callable[[str], None] = print) -> list[Row]:
    """--memory-plan: the predicted peak of every memory row, its parts, and whether it fits an A100-80GB / H200."""
    rows, lines = [], []
    for name, base, checkpointing, tokens in memory_cases(cfg):
        plan = memory_plan(name, base, checkpointing, tokens, cfg, "cuda")
        parts = plan.parts()
        shape = memory_shape(name, base, checkpointing, tokens, cfg)
        rows += metric_rows(WHAT, "plan", "memory", shape,
                            [(f"predicted_{k}", v / 2**20, "MiB") for k, v in parts.items()])
        lines.append([name, base, "yes" if checkpointing else "no", f"{tokens:,}",
                      *(parts[k] for k in ("weights", "activations", "loss", "transient", "total")),
                      *("yes" if parts["total"] <= limit else "no" for limit in GPUS.values())])
    append_rows(out_dir / f"{WHAT}.csv", rows, env)
    unit, scale = ("GiB", 2**30) if max(line[8] for line in lines) >= 2**30 else ("MiB", 2**20)
    lines = [[f"{v / scale:.2f}" if isinstance(v, int) else v for v in line] for line in lines]
    log(f"Predicted peak memory of a fine-tuning step ({unit}; bench/memory.py, from the tensors' shapes and dtypes): "
        f"adapter K {cfg.adapter_len} in the top {cfg.adapter_layers} layers, AdamW, packed micro-batches, "
        "bf16 compute; not measured on a GPU yet")
    log(format_table(["model", "base", "checkpointing", "tokens", "weights", "activations", "loss", "transient",
                      "total", *(f"fits {g}" for g in GPUS)], lines))
    log(f"CSV rows appended to {out_dir / f'{WHAT}.csv'}")
    return rows


def run_memory(cfg, env: BenchEnv, out_dir: Path, steps: Callable[[LLaMA, int], Callable[[], object]], *,
               log: Callable[[str], None] = print) -> list[list[str]]:
    """--memory: ours_packed's steps per memory row (steps(model, tokens): bench_finetune's, ready to run, returning
    its Measurement): peak memory (CUDA's max allocated; on a CPU the tensor storage that TensorMemory counts) and
    tokens/s, next to the prediction. A row the prediction puts beyond the GPU's memory, or one that runs out of it,
    is a row saying so. These rows are not checked against an oracle (an fp32 copy of a 70B base fits nowhere): each
    step's loss must be finite, and the quantized layers are bitsandbytes' own (tests/test_quantize.py checks them
    against the dequantized base)."""
    device = env.device
    capacity = torch.cuda.get_device_properties(device).total_memory if env.is_cuda else None
    csv_path = out_dir / f"{WHAT}.csv"
    log(f"bench_finetune --memory | {env.describe()}")
    if not env.is_cuda:
        log(CPU_NOTICE)
    lines: list[list[str]] = []
    model, built = None, None
    for name, base, checkpointing, tokens in memory_cases(cfg):
        shape = memory_shape(name, base, checkpointing, tokens, cfg)
        predicted = memory_plan(name, base, checkpointing, tokens, cfg, device.type).total()
        line = [name, base, "yes" if checkpointing else "no", f"{tokens:,}"]
        rows = [Row(WHAT, PACKED, "memory", shape, "predicted_peak", predicted / 2**20, "MiB")]
        reason = None
        if capacity is not None and predicted > capacity:
            reason = f"does not fit: predicted {predicted / 2**30:.1f} GiB > {capacity / 2**30:.1f} GiB"
        else:
            try:
                if built != (name, base):
                    model = None
                    free_device_memory(device, collect=True)  # the previous model's, before the next is built
                    adapter = AdapterConfig(adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers)
                    model = random_llama(name, adapter, dtype=DTYPE, device=device, seed=cfg.seed,
                                         quantize=base if base in ("int8", "nf4") else None)
                    built = (name, base)
                m, peak = _memory_step(model, checkpointing, tokens, steps, env)
            except Exception as exc:  # out of memory; anything else is a bug
                model, built = None, None
                reason = skip_reason(exc, device)
        if reason is not None:
            append_rows(csv_path, [*rows, skipped_row(WHAT, PACKED, "memory", shape, reason)], env)
            lines.append([*line, reason, "-", None, predicted])
            log(f"   {shape}: SKIP {reason}")
            continue
        rows += metric_rows(WHAT, PACKED, "memory", shape, (
            ("peak_mem", peak / 2**20, "MiB"), ("real_tokens_per_s", m.real_tokens_per_s, "tokens/s"),
            ("step_median", m.step.median_ms, "ms"), ("final_loss", m.final_loss, "")))
        append_rows(csv_path, rows, env)
        lines.append([*line, f"{m.real_tokens_per_s:,.0f}", f"{m.step.median_ms:.1f}", peak, predicted])
        log(f"   {shape}: {m.real_tokens_per_s:,.0f} real tok/s, peak {peak / 2**20:,.1f} MiB (predicted "
            f"{predicted / 2**20:,.1f}, {peak / predicted:.2f} of it)")
    unit, scale = ("GiB", 2**30) if max((line[-1] for line in lines), default=0) >= 2**30 else ("MiB", 2**20)
    measured = f"peak {unit}" if env.is_cuda else f"peak tensor {unit} (TensorMemory)"
    log(format_table(["model", "base", "checkpointing", "tokens", "real tok/s", "step ms", measured,
                      f"predicted {unit}"],
                     [[*line[:-2], *("-" if v is None else f"{v / scale:,.2f}" for v in line[-2:])] for line in lines]))
    log(f"CSV rows appended to {csv_path}")
    return lines


def _memory_step(model: LLaMA, checkpointing: bool, tokens: int,
                 steps: Callable[[LLaMA, int], Callable[[], object]], env: BenchEnv) -> tuple[object, float]:
    """ours_packed's steps on micro-batches of tokens tokens (their data made before counting starts); (the
    measurement, peak bytes)."""
    model.activation_checkpointing = checkpointing
    run = steps(model, tokens)
    with nullcontext() if env.is_cuda else TensorMemory(existing=model_tensors(model)) as mem:
        m = run()
    if not math.isfinite(m.final_loss):
        raise CorrectnessError(f"{model.config.name}: the loss of the last memory step is {m.final_loss}")
    return m, m.peak_mib * 2**20 if env.is_cuda else mem.peak
