"""Benchmark: zero-init attention (LLaMA-Adapter, arXiv 2303.16199), the fused op against its peers.

    out_i = softmax_{j <= i}(s q_i.k_j) V  +  act(g_h) * softmax_p(s q_i.pk_p) PV

Providers (PROVIDERS): fused, fused_atomic (deterministic=False), eager (kernels.zero_init_attention_ref), sdpa2 /
xformers2 / flex2 (two attention calls summed, as litgpt and LLaMA-Adapter V2 do), sdpa_causal and sdpa_causal_flash
(one causal call without adapter: the floor). Modes: fwd, bwd (backward alone), full. Metrics: time median/p20/p80,
tflops by flash-attn's causal count (4*b*h*s*s*d/2 forward, x2.5 backward, x3.5 full; the same for every provider),
gflop, prompt_gflop (4*b*h*s*K*d, reported apart), peak memory, the SDPA backend, the check. Check, before any
timing: output and every gradient within flash-attn's bar of the eager reference in fp32 (fp64 for fp32 cases):
twice the eager reference's own error in the case's dtype plus twice its rounding; a wrong provider stops the run
(exit 1), one that cannot run a case gets a "skipped" row. The long form: docs/benchmarks.md.

    llama-adapter bench attention                                    # one GPU: the sweep, bench/results/attention.csv
    llama-adapter bench attention --dtypes bf16 --headdims 128 --seqlens 512,1024,2048,4096 --modes full
    llama-adapter bench attention --report bench/results/attention.csv   # table, targets, plot from a sweep's pieces
    llama-adapter bench attention --smoke --out /tmp/bench-smoke     # CPU: the tiny smoke configuration
    llama-adapter bench attention --cpu-fallback    # CPU: the op's SDPA fallback vs the eager reference and 2x SDPA
On a CPU the numbers mean nothing for the GPU. Several GPUs: the benchmark uses the current device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_adapter_triton.bench.attention_report import Measurement, RunResult, report, result_from_csv
from llama_adapter_triton.bench.common import (
    DTYPES,
    BenchEnv,
    ConfigError,  # noqa: F401 (part of this module's interface: make_config raises it)
    CorrectnessError,
    Expected,
    Row,
    Timing,
    argparse_type,
    bench_env,
    check_csv,
    check_results,
    describe_exception,
    dtype_name,
    exact_fp32_matmuls,
    format_table,
    free_device_memory,
    list_of,
    one_of,
    op_backend,
    opt,
    peak_memory_mib,
    positive_float,
    positive_int,
    quantiles_ms,
    resolve_out_dir,
    time_fn,
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
    sdpa_enabled_backends,
    skip_reason,
    skipped_row,
    start_run,
    verdict,
)
from llama_adapter_triton.kernels.reference import zero_init_attention_ref
from llama_adapter_triton.kernels.sdpa_fallback import zero_init_attention_sdpa
from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention

WHAT = "attention"
MODES = ("fwd", "bwd", "full")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "full": 3.5}  # flash-attn: backward = 2.5 x forward FLOPs
GATE_ACTS = ("tanh", "identity")
# (query heads, kv heads). 7b: LLaMA-7B's attention; gqa: 32 query heads sharing 8 kv heads (LLaMA-2-70B's ratio).
# tiny, tiny-gqa: the smoke run's (tiny-gqa has two kv heads, so that a wrong head-to-kv-head mapping shows).
SHAPES = {"7b": (32, 32), "gqa": (32, 8), "tiny": (2, 2), "tiny-gqa": (4, 2)}
MAX_HEADDIM = 128  # what the op supports (DESIGN.md: head dims 32, 64, 80, 96, 128)


# --------------------------------------------------------------------------------------------------
# One benchmarked configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    batch: int
    seqlen: int
    nheads: int
    nheads_kv: int
    headdim: int
    prompt_len: int
    dtype: str  # a key of DTYPES
    gate_act: str = "tanh"

    @property
    def family(self) -> str:
        """Everything but batch and seqlen: one line of the plot."""
        act = "" if self.gate_act == "tanh" else f"-{self.gate_act}"
        return f"h{self.nheads}-kv{self.nheads_kv}-d{self.headdim}-p{self.prompt_len}-{self.dtype}{act}"

    @property
    def shape(self) -> str:
        """The CSV's shape column, e.g. b8-s2048-h32-kv8-d128-p10-bf16."""
        return f"b{self.batch}-s{self.seqlen}-{self.family}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


_SHAPE_RE = re.compile(r"b(\d+)-s(\d+)-h(\d+)-kv(\d+)-d(\d+)-p(\d+)-(" + "|".join(DTYPES) + r")(?:-(identity))?")


def case_from_shape(shape: str) -> Case | None:
    """The Case a shape column names (None for "all" or a foreign string): Case.shape read back (--report)."""
    m = _SHAPE_RE.fullmatch(shape)
    if m is None:
        return None
    b, s, h, hkv, d, p = (int(g) for g in m.groups()[:6])
    return Case(batch=b, seqlen=s, nheads=h, nheads_kv=hkv, headdim=d, prompt_len=p, dtype=m.group(7),
                gate_act=m.group(8) or "tanh")


def attention_flops(batch: int, seqlen: int, nheads: int, headdim: int, mode: str) -> float:
    """flash-attn's count for causal attention: 4*b*h*s*s*d/2 forward (two matmuls, half the scores),
    2.5x that backward, 3.5x forward+backward. The same count for every provider, whatever it computes."""
    return 4.0 * batch * nheads * seqlen * seqlen * headdim / 2 * MODE_FACTOR[mode]


def prompt_flops(batch: int, seqlen: int, nheads: int, headdim: int, prompt_len: int, mode: str) -> float:
    """The prompt part apart: every query against prompt_len keys, 4*b*h*s*K*d forward, same mode factors."""
    return 4.0 * batch * nheads * seqlen * prompt_len * headdim * MODE_FACTOR[mode]


# --------------------------------------------------------------------------------------------------
# Inputs (made once per case, outside every timed region)
# --------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    case: Case
    q: torch.Tensor  # (batch, seqlen, nheads, headdim)
    k: torch.Tensor  # (batch, seqlen, nheads_kv, headdim)
    v: torch.Tensor
    prompt_k: torch.Tensor  # (1, prompt_len, nheads_kv, headdim): one prompt shared by the batch (LLaMA-Adapter v1)
    prompt_v: torch.Tensor
    gate: torch.Tensor  # (nheads,) fp32, the raw gate as the model stores it
    dout: torch.Tensor  # (batch, seqlen, nheads, headdim): the gradient fed to backward

    @property
    def device(self) -> torch.device:
        return self.q.device

    def leaves(self, adapter: bool = True) -> list[torch.Tensor]:
        """The tensors whose gradients a provider computes (the plain causal floor has no prompt or gate)."""
        return [self.q, self.k, self.v, self.prompt_k, self.prompt_v, self.gate][: 6 if adapter else 3]

    def detached(self) -> Inputs:
        """The same storage without requires_grad (for providers that cannot run backward here)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update({n: t.detach() for n, t in fields.items() if isinstance(t, torch.Tensor)})
        return Inputs(**fields)


GRAD_NAMES = ("dq", "dk", "dv", "dprompt_k", "dprompt_v", "dgate")


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs (normal q, k, v, prompts and dout; gates spread evenly over [-1.5, 1.5], so that act(gate)
    is well away from 0 for most heads and the prompt part counts), all leaves requiring grad, as in an
    adapted layer of fine-tuning."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    b, s, h, hkv, d, p = case.batch, case.seqlen, case.nheads, case.nheads_kv, case.headdim, case.prompt_len

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)

    leaves = dict(q=randn(b, s, h, d), k=randn(b, s, hkv, d), v=randn(b, s, hkv, d),
                  prompt_k=randn(1, p, hkv, d), prompt_v=randn(1, p, hkv, d),
                  gate=torch.linspace(-1.5, 1.5, h, device=device, dtype=torch.float32))
    dout = randn(b, s, h, d)
    return Inputs(case=case, dout=dout, **{n: t.requires_grad_() for n, t in leaves.items()})


# --------------------------------------------------------------------------------------------------
# The reference and the correctness check
# --------------------------------------------------------------------------------------------------
def _gamma(gate: torch.Tensor, gate_act: str, dtype: torch.dtype, nheads: int) -> torch.Tensor:
    """act(gate) as (nheads,) in the compute dtype (the peers apply the gate themselves)."""
    g = torch.tanh(gate) if gate_act == "tanh" else gate
    return g.to(dtype).expand(nheads)


def _head_chunk(nheads: int, nheads_kv: int, per_head_bytes: int, budget_bytes: int) -> int:
    """The most query heads per reference call that fit the budget: a divisor of the group size (query
    heads of one kv head) or a multiple of it that divides nheads, so that a chunk maps onto whole kv heads."""
    groups = nheads // nheads_kv
    sizes = {c for c in range(1, groups + 1) if groups % c == 0}
    sizes |= {m * groups for m in range(1, nheads_kv + 1) if nheads_kv % m == 0}
    fitting = [c for c in sizes if c * per_head_bytes <= budget_bytes]
    return max(fitting, default=1)


def reference_outputs(x: Inputs, dtype: torch.dtype, *, adapter: bool, need_grad: bool,
                      budget_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """kernels.zero_init_attention_ref on x's inputs cast to dtype (the gate too, unless dtype is the case's
    own low precision, where the gate stays the fp32 parameter it is in training), with its gradients for
    x.dout. adapter=False: the plain causal attention of the floor (prompt_len 0; q, k, v gradients).

    The reference materialises every score, so it runs in chunks of whole samples and query heads that
    keep (seqlen x seqlen) scores under budget_bytes (samples and heads are independent; prompt and gate
    gradients add up over chunks). Returns {"out", "dq", "dk", "dv"[, "dprompt_k", "dprompt_v", "dgate"]}."""
    c = x.case
    dev = x.device
    if budget_bytes is None:
        budget_bytes = 2 * 2**30 if dev.type == "cuda" else 256 * 2**20
    low = dtype == c.torch_dtype
    groups = c.nheads // c.nheads_kv
    q, k, v = (t.detach().to(dtype) for t in (x.q, x.k, x.v))
    if adapter:
        pk, pv = (t.detach().to(dtype) for t in (x.prompt_k, x.prompt_v))
    else:
        pk = pv = torch.zeros(1, 0, c.nheads_kv, c.headdim, dtype=dtype, device=dev)
    gate = x.gate.detach().to(x.gate.dtype if low else dtype)
    dout = x.dout.detach().to(dtype)

    # fp32 scores, their softmax, masks and the saved tensors of backward: ~8 copies of (sq x sk) per head
    per_head = c.seqlen * (c.seqlen + c.prompt_len) * max(4, torch.finfo(dtype).bits // 8) * 8
    hc = _head_chunk(c.nheads, c.nheads_kv, per_head, budget_bytes)
    bc = max(1, min(c.batch, budget_bytes // (hc * per_head)))

    out = torch.empty_like(q)
    n_grads = (6 if adapter else 3) if need_grad else 0
    grads = [torch.zeros_like(t) for t in (q, k, v, pk, pv, gate)[:n_grads]]
    with exact_fp32_matmuls():  # a true fp32 oracle
        for b0 in range(0, c.batch, bc):
            bs = slice(b0, min(b0 + bc, c.batch))
            pbs = bs if pk.shape[0] > 1 else slice(None)
            for h0 in range(0, c.nheads, hc):
                hs = slice(h0, h0 + hc)
                kvs = slice(h0 // groups, (h0 + hc - 1) // groups + 1)
                gs = hs if gate.numel() > 1 else slice(None)
                parts = [q[bs, :, hs], k[bs, :, kvs], v[bs, :, kvs], pk[pbs, :, kvs], pv[pbs, :, kvs], gate[gs]]
                parts = [t.detach().requires_grad_(need_grad) for t in parts]
                with torch.set_grad_enabled(need_grad):
                    o = zero_init_attention_ref(*parts, causal=True, gate_act=c.gate_act)
                out[bs, :, hs] = o.detach()
                if need_grad:
                    got = torch.autograd.grad(o, parts[:n_grads], dout[bs, :, hs])
                    places = [(bs, hs), (bs, kvs), (bs, kvs), (pbs, kvs), (pbs, kvs), (gs,)][:n_grads]
                    for acc, g, where in zip(grads, got, places, strict=True):
                        if len(where) == 1:
                            acc[where[0]] += g
                        else:
                            acc[where[0], :, where[1]] += g
    result = {"out": out}
    if need_grad:
        result.update(zip(GRAD_NAMES[:n_grads], grads, strict=True))
    return result


def expected_results(x: Inputs, *, adapter: bool, need_grad: bool, budget_bytes: int | None = None) -> Expected:
    """The oracle of a case: the eager reference in fp32 (fp64 when the case itself is fp32), with flash-attn's
    tolerances from the same reference run in the case's dtype (common.Expected)."""
    c = x.case
    low = c.torch_dtype
    oracle_dtype = torch.float64 if low == torch.float32 else torch.float32
    oracle = reference_outputs(x, oracle_dtype, adapter=adapter, need_grad=need_grad, budget_bytes=budget_bytes)
    baseline = reference_outputs(x, low, adapter=adapter, need_grad=need_grad, budget_bytes=budget_bytes)
    oracle_name = "fp64" if oracle_dtype == torch.float64 else "fp32"
    return Expected.from_runs(oracle, baseline, c.dtype, oracle_desc=f"{oracle_name} eager reference",
                              baseline_desc=f"the eager reference in {c.dtype}")


def check_provider(name: str, fwd: Callable[[], torch.Tensor], x: Inputs, expected: Expected, *,
                   adapter: bool, need_grad: bool) -> dict[str, float]:
    """Run the provider once and compare its output (and, with need_grad, every gradient) against the
    oracle. Returns error / tolerance per tensor; raises CorrectnessError naming every tensor that fails."""
    c = x.case
    out = fwd()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.q.shape) or out.dtype != x.q.dtype:
        got = f"{type(out).__name__} {tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else repr(out)
        raise CorrectnessError(f"provider {name!r} on {c.shape}: output must be a {tuple(x.q.shape)} {x.q.dtype} "
                               f"tensor, got {got}")
    got = {"out": out}
    problems = []
    if need_grad:
        leaves = x.leaves(adapter)
        if not out.requires_grad:
            raise CorrectnessError(f"provider {name!r} on {c.shape}: its output does not require grad")
        grads = torch.autograd.grad(out, leaves, x.dout, allow_unused=True)
        for gname, g in zip(GRAD_NAMES[: len(leaves)], grads, strict=True):
            if g is None:
                problems.append(f"{gname}: no gradient reaches {gname[1:]}")
            else:
                got[gname] = g
    return check_results(name, c.shape, got, expected, problems)


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------
Forward = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """One way to compute the attention. build(inputs) does the one-time setup outside every timed region
    (imports, block masks, compilation choices) and returns the forward closure and facts worth recording
    (e.g. the SDPA backend); it may raise to skip the case (the reason is recorded)."""

    name: str
    build: Callable[[Inputs], tuple[Forward, dict[str, str]]]
    adapter: bool = True  # False: plain causal attention without prompt or gate (the floor)
    unavailable: Callable[[torch.device], str | None] = lambda device: None  # why it cannot run at all here
    no_backward: Callable[[torch.device], str | None] = lambda device: None  # why it cannot run backward here


def _build_fused(x: Inputs, *, deterministic: bool = True, backend: str = "auto") -> tuple[Forward, dict[str, str]]:
    act = x.case.gate_act
    fwd = lambda: zero_init_attention(x.q, x.k, x.v, x.prompt_k, x.prompt_v, x.gate, causal=True,
                                              gate_act=act, deterministic=deterministic, backend=backend)
    info = {"op_backend": op_backend(x.device), "deterministic": str(deterministic)}
    return fwd, info | ({"backend": backend} if backend != "auto" else {})


def _tma_unavailable(device: torch.device) -> str | None:
    """fused-tma (backend="tma") is timed on Hopper GPUs only; tests/test_tma.py checks it under the interpreter."""
    if device.type != "cuda":
        return "the TMA forward is timed on a Hopper GPU only (tests/test_tma.py checks it on a CPU)"
    major, minor = torch.cuda.get_device_capability(device)
    return None if major >= 9 else f"the TMA forward needs compute capability 9.0 (Hopper), got {major}.{minor}"


def _build_eager(x: Inputs) -> tuple[Forward, dict[str, str]]:
    act = x.case.gate_act
    fwd = lambda: zero_init_attention_ref(x.q, x.k, x.v, x.prompt_k, x.prompt_v, x.gate, causal=True,
                                                  gate_act=act)
    return fwd, {}


def _heads_first(x: Inputs):
    """(B, nh, T, hs) views of q, k, v and the prompts expanded over the batch (no copies)."""
    b = x.case.batch
    q, k, v = (t.transpose(1, 2) for t in (x.q, x.k, x.v))
    pk, pv = (t.transpose(1, 2).expand(b, -1, -1, -1) for t in (x.prompt_k, x.prompt_v))
    return q, k, v, pk, pv


def _sdpa_gqa_strategy(x: Inputs) -> str:
    """"none" for MHA; "enable_gqa" when SDPA's fast backends take grouped kv heads as they are, else
    "repeat_interleave" (copy kv heads up to nheads first, as litgpt does), so that GQA never quietly
    falls back to the math backend on a GPU."""
    if x.case.nheads == x.case.nheads_kv:
        return "none"
    q, k, v, _, _ = _heads_first(x)
    if x.device.type == "cuda" and sdpa_backend(q, k, v, is_causal=True, enable_gqa=True) in ("MATH", "ERROR"):
        return "repeat_interleave"
    return "enable_gqa"


def _flash_unavailable(device: torch.device) -> str | None:
    """Why SDPA's flash backend cannot run here, if it cannot (tried on a tiny causal call)."""
    t = torch.zeros(1, 1, 16, 64, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(t, t, t, is_causal=True)
    except RuntimeError as exc:
        return f"SDPA's flash backend does not run here ({describe_exception(exc, 150)})"
    return None


def _build_sdpa(x: Inputs, *, adapter: bool, backend: str | None = None) -> tuple[Forward, dict[str, str]]:
    """Causal SDPA on the tokens (+ a second call on the prompts with adapter); backend forces one of SDPA's
    backends (an SDPBackend name) instead of letting torch choose."""
    c = x.case
    forced = getattr(torch.nn.attention.SDPBackend, backend) if backend else None
    within = (lambda: torch.nn.attention.sdpa_kernel(forced)) if forced is not None else contextlib.nullcontext
    strategy = _sdpa_gqa_strategy(x)
    groups = c.nheads // c.nheads_kv
    gqa = strategy == "enable_gqa"
    expand_heads = (lambda t: t.repeat_interleave(groups, dim=1)) if strategy == "repeat_interleave" else None

    def fwd() -> torch.Tensor:
        q, k, v, pk, pv = _heads_first(x)  # (B, nh, T, hs); prompts (B, nh_kv, K, hs), expanded over the batch
        if expand_heads is not None:
            k, v, pk, pv = (expand_heads(t) for t in (k, v, pk, pv))
        with within():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            if adapter:
                ay = F.scaled_dot_product_attention(q, pk, pv, enable_gqa=gqa)  # the prompts: no mask, own softmax
                y = y + _gamma(x.gate, c.gate_act, y.dtype, c.nheads).view(1, -1, 1, 1) * ay
        return y.transpose(1, 2).contiguous()  # (B, T, nh, hs), as the op returns it

    q, k, v, pk, pv = _heads_first(x)
    if expand_heads is not None:
        k, v, pk, pv = (expand_heads(t) for t in (k, v, pk, pv))
    chosen = f"{backend} (forced)" if backend else sdpa_backend(q, k, v, is_causal=True, enable_gqa=gqa)
    info = {"sdpa_backend_tokens": chosen, "sdpa_enabled": sdpa_enabled_backends(), "sdpa_gqa": strategy}
    if adapter:
        info["sdpa_backend_prompt"] = sdpa_backend(q, pk, pv, is_causal=False, enable_gqa=gqa)
    return fwd, info


def _xformers_unavailable(device: torch.device) -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a build that does not match this torch
        return f"xformers does not import ({describe_exception(exc, 150)}); it is the optional 'bench' extra"
    if device.type != "cuda":
        return "xformers.ops.memory_efficient_attention has no CPU kernels"
    return None


def _build_xformers2(x: Inputs) -> tuple[Forward, dict[str, str]]:
    import xformers
    import xformers.ops as xops

    c = x.case
    b, s, h, hkv, d, p = c.batch, c.seqlen, c.nheads, c.nheads_kv, c.headdim, c.prompt_len
    groups = h // hkv
    causal = xops.LowerTriangularMask()  # top-left aligned, the same as bottom-right here (seqlen_q == seqlen_k)

    def fwd() -> torch.Tensor:
        if groups == 1:  # xformers' layout is ours: (B, M, H, K)
            q, k, v = x.q, x.k, x.v
            pk, pv = (t.expand(b, -1, -1, -1) for t in (x.prompt_k, x.prompt_v))
        else:  # GQA: (B, M, G, H, K), kv heads expanded over their group without copies
            q = x.q.unflatten(2, (hkv, groups))
            k, v = (t.unsqueeze(3).expand(b, s, hkv, groups, d) for t in (x.k, x.v))
            pk, pv = (t.unsqueeze(3).expand(b, p, hkv, groups, d) for t in (x.prompt_k, x.prompt_v))
        y = xops.memory_efficient_attention(q, k, v, attn_bias=causal)
        ay = xops.memory_efficient_attention(q, pk, pv)
        gamma = _gamma(x.gate, c.gate_act, y.dtype, h).view(*([1, 1, h] if groups == 1 else [1, 1, hkv, groups]), 1)
        return (y + gamma * ay).reshape(b, s, h, d)

    return fwd, {"xformers_version": getattr(xformers, "__version__", "unknown")}


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_compiled_flex = None


def _flex_attention(device: torch.device):
    """torch.compile'd flex_attention on CUDA (compiled once; every shape then recompiles, so the recompile
    limits are raised for the sweep), the eager (unfused) flex_attention on a CPU."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention, "eager"
    if _compiled_flex is None:
        import torch._dynamo

        for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                      "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4096))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex, "torch.compile"


def _build_flex2(x: Inputs) -> tuple[Forward, dict[str, str]]:
    from torch.nn.attention.flex_attention import create_block_mask

    c = x.case
    flex, how = _flex_attention(x.device)
    gqa = c.nheads != c.nheads_kv
    block_mask = create_block_mask(_causal_mask, B=None, H=None, Q_LEN=c.seqlen, KV_LEN=c.seqlen, device=x.device)
    if how == "eager":
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    def fwd() -> torch.Tensor:
        q, k, v, pk, pv = _heads_first(x)
        # the prompts copied over the batch (b x K rows: negligible) rather than handed over with a zero batch
        # stride, which the compiled kernels need not take
        pk, pv = pk.contiguous(), pv.contiguous()
        y = flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        ay = flex(q, pk, pv, enable_gqa=gqa)  # no block mask: every query sees every prompt key
        y = y + _gamma(x.gate, c.gate_act, y.dtype, c.nheads).view(1, -1, 1, 1) * ay
        return y.transpose(1, 2).contiguous()

    return fwd, {"flex": how}


def _flex_no_backward(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "FlexAttention has no backward on the CPU (torch raises NotImplementedError)"
    return None


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("fused", _build_fused),
        Provider("fused_atomic", lambda x: _build_fused(x, deterministic=False)),
        Provider("fused-tma", lambda x: _build_fused(x, backend="tma"), unavailable=_tma_unavailable),
        Provider("eager", _build_eager),
        Provider("sdpa2", lambda x: _build_sdpa(x, adapter=True)),
        Provider("xformers2", _build_xformers2, unavailable=_xformers_unavailable),
        Provider("flex2", _build_flex2, no_backward=_flex_no_backward),
        Provider("sdpa_causal", lambda x: _build_sdpa(x, adapter=False), adapter=False),
        Provider("sdpa_causal_flash", lambda x: _build_sdpa(x, adapter=False, backend="FLASH_ATTENTION"),
                 adapter=False, unavailable=_flash_unavailable),
    )
}


def mode_closure(fwd: Forward, mode: str, x: Inputs) -> Callable[[], object]:
    """What is timed in each mode; everything else (inputs, dout, the forward of bwd) happens here, before."""
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        out = fwd()  # outside the timed region; backward keeps its graph for the next repetition
        return lambda: out.backward(x.dout, retain_graph=True)
    if mode == "full":
        return lambda: fwd().backward(x.dout)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------------
def _shape_name(text: str) -> str:
    """A preset of SHAPES or NHEADS:NHEADS_KV (e.g. 32:8)."""
    if text in SHAPES:
        return text
    try:
        h, hkv = (int(t) for t in text.split(":"))
    except ValueError:
        raise ValueError(f"use one of {', '.join(SHAPES)} or NHEADS:NHEADS_KV such as 32:8") from None
    if h < 1 or hkv < 1 or h % hkv:
        raise ValueError(f"nheads ({h}) must be a positive multiple of nheads_kv ({hkv})")
    return f"{h}:{hkv}"


def shape_heads(name: str) -> tuple[int, int]:
    if name in SHAPES:
        return SHAPES[name]
    h, hkv = (int(t) for t in name.split(":"))
    return h, hkv


def _headdim(text: str) -> int:
    d = int(text)
    if d % 8 or not 16 <= d <= MAX_HEADDIM:
        raise ValueError(f"the op takes head dims that are multiples of 8 from 16 to {MAX_HEADDIM}")
    return d


_mode, _gate_act = one_of(MODES), one_of(GATE_ACTS)


@dataclass(frozen=True)
class BenchConfig:
    """The GPU sweep's defaults, in one place: the command line is generated from these fields."""

    seqlens: tuple[int, ...] = field(default=(256, 512, 1024, 2048, 4096, 8192), metadata=opt(
        "sequence lengths", list_of(positive_int, "sequence length"), "S,S,..."))
    headdims: tuple[int, ...] = field(default=(64, 128), metadata=opt(
        "head dims", list_of(_headdim, "head dim"), "D,D,..."))
    dtypes: tuple[str, ...] = field(default=("bf16", "fp16"), metadata=opt(
        "dtypes of q, k, v and prompts (the gate stays fp32)", list_of(dtype_name, "dtype"), "bf16,fp16,fp32"))
    shapes: tuple[str, ...] = field(default=("7b", "gqa"), metadata=opt(
        f"head shapes: {', '.join(f'{n} ({h}:{kv})' for n, (h, kv) in SHAPES.items())} or NHEADS:NHEADS_KV",
        list_of(_shape_name, "shape"), "NAME,..."))
    providers: tuple[str, ...] = field(default=tuple(PROVIDERS), metadata=opt(
        "providers", list_of(str, "provider"), "P,P,..."))
    modes: tuple[str, ...] = field(default=MODES, metadata=opt(
        "modes: fwd, bwd (backward only), full (forward+backward)", list_of(_mode, "mode"), "M,M,..."))
    prompt_len: int = field(default=10, metadata=opt(
        "adapter prompt length K", argparse_type(positive_int), "K"))
    tokens: int = field(default=16384, metadata=opt(
        "tokens per step: batch = max(1, tokens // seqlen)", argparse_type(positive_int), "N"))
    gate_act: str = field(default="tanh", metadata=opt(
        "gate activation", argparse_type(_gate_act), "tanh|identity"))
    warmup_ms: float = field(default=25.0, metadata=opt(
        "do_bench warm-up time per measurement (CUDA)", argparse_type(positive_float), "MS"))
    rep_ms: float = field(default=100.0, metadata=opt(
        "do_bench repetition time per measurement (CUDA)", argparse_type(positive_float), "MS"))
    cpu_reps: int = field(default=3, metadata=opt(
        "timed repetitions per measurement on a CPU", argparse_type(positive_int), "N"))
    seed: int = field(default=0, metadata=opt("seed of the random inputs", argparse_type(int), "N"))
    out: str | None = field(default=None, metadata=opt(
        "folder for attention.csv, the plot and the summary (default: bench/results/ for a full CUDA run, "
        "else a temporary folder; CPU and smoke runs never write into bench/results/)", str, "DIR"))


# --smoke, and the default on a CPU: tiny enough for Triton's interpreter; bf16, the dtype of the GPU runs
# (--dtypes fp32 checks against an fp64 oracle instead).
SMOKE = dict(seqlens=(64, 128), headdims=(32,), dtypes=("bf16",), shapes=("tiny", "tiny-gqa"),
             tokens=128, warmup_ms=5.0, rep_ms=20.0, cpu_reps=3)


def build_parser() -> argparse.ArgumentParser:
    def report_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--report", metavar="CSV", default=None,
                            help="measure nothing: rebuild the ratio table, targets, plot and summary from the rows "
                                 "of one commit on one GPU in CSV (a sweep run in pieces); written beside CSV or to "
                                 "--out")
        parser.add_argument("--report-commit", metavar="HASH", default=None,
                            help="with --report: the commit whose rows to use (default: that of the last row)")
        parser.add_argument("--cpu-fallback", action="store_true",
                            help="time the op's CPU path (two SDPA calls) against the eager reference and two bare "
                                 "SDPA calls, interleaved, at one LLaMA-7B layer (prefill 512 x 512 and decode 1 x "
                                 "512, fp32; --smoke: tiny shapes); rows to attention_cpu.csv")
        parser.add_argument("--threads", type=argparse_type(positive_int), default=None, metavar="N",
                            help="with --cpu-fallback: torch's CPU threads (default 2)")

    return bench_parser("llama-adapter bench attention", "Benchmark zero-init attention: the fused op against the "
                        "eager reference and the peers.", BenchConfig(), SMOKE, extra=report_flags)


def make_config(args: argparse.Namespace, *, smoke: bool, providers: Mapping[str, Provider]) -> BenchConfig:
    return bench_config(args, BenchConfig(providers=tuple(providers)), SMOKE, is_smoke=smoke, providers=providers)


def cases_of(cfg: BenchConfig) -> list[Case]:
    """The sweep, ordered so that one plot line (dtype, shape, head dim) runs through the seqlens."""
    cases = []
    for dtype in cfg.dtypes:
        for shape in cfg.shapes:
            h, hkv = shape_heads(shape)
            for d in cfg.headdims:
                for s in cfg.seqlens:
                    cases.append(Case(batch=max(1, cfg.tokens // s), seqlen=s, nheads=h, nheads_kv=hkv, headdim=d,
                                      prompt_len=cfg.prompt_len, dtype=dtype, gate_act=cfg.gate_act))
    return cases


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def _mode_rows(case: Case, provider: Provider, mode: str, timing: Timing, peak: float | None) -> list[Row]:
    flops = attention_flops(case.batch, case.seqlen, case.nheads, case.headdim, mode)
    metrics = [("time_median", timing.median_ms, "ms"), ("time_p20", timing.p20_ms, "ms"),
               ("time_p80", timing.p80_ms, "ms"), ("tflops", flops / timing.median_ms / 1e9, "TFLOP/s"),
               ("gflop", flops / 1e9, "GFLOP")]
    if provider.adapter:
        pf = prompt_flops(case.batch, case.seqlen, case.nheads, case.headdim, case.prompt_len, mode)
        metrics.append(("prompt_gflop", pf / 1e9, "GFLOP"))
    if peak is not None:
        metrics.append(("peak_mem", peak, "MiB"))
    return metric_rows(WHAT, provider.name, mode, case.shape, metrics)


def run(cfg: BenchConfig, env: BenchEnv, out_dir: Path, *, providers: Mapping[str, Provider] | None = None,
        log: Callable[[str], None] = print) -> RunResult:
    """Check, then time, every (case, provider, mode); append the rows to out_dir/attention.csv as they come,
    then print the ratio table (and the targets on CUDA) and write the plot and the summary.
    Raises CorrectnessError as soon as a provider computes a wrong answer."""
    providers = PROVIDERS if providers is None else providers
    device = env.device
    cases = cases_of(cfg)
    result = RunResult(env=env, out_dir=out_dir, csv_path=out_dir / f"{WHAT}.csv", cases=cases,
                       providers=cfg.providers, modes=cfg.modes, config=cfg)
    write = result.write
    interp = os.environ.get("TRITON_INTERPRET", "0")
    start_run("bench_attention", env, result.csv_path, log,
              fused="Triton on CUDA" if env.is_cuda else f"TRITON_INTERPRET={interp}")

    active = []
    for name in cfg.providers:
        prov = providers[name]
        reason = prov.unavailable(device)
        if reason:
            log(f"SKIP {name}: {reason}")
            result.skipped.append((name, "all", "all", reason))
            write([skipped_row(WHAT, name, "all", "all", reason)])
        else:
            active.append(prov)

    need_grad = any(m != "fwd" for m in cfg.modes)
    for ci, case in enumerate(cases, 1):
        started = time.perf_counter()
        log(f"[{ci}/{len(cases)}] {case.shape}  (tokens/step {case.batch * case.seqlen})")
        x = make_inputs(case, device, cfg.seed)
        expected: dict[tuple[bool, bool], Expected] = {}
        for prov in active:
            prov_started = time.perf_counter()
            nb = prov.no_backward(device)
            modes = [m for m in cfg.modes if not (nb and m != "fwd")]
            skip_rows = []
            for m in cfg.modes:
                if m not in modes:
                    skip_rows.append(skipped_row(WHAT, prov.name, m, case.shape, nb))
                    result.skipped.append((prov.name, m, case.shape, nb))
            if not modes:
                write(skip_rows)
                log(f"    {prov.name:<12} SKIP all modes: {nb}")
                continue
            px = x.detached() if nb else x
            grads = need_grad and not nb
            key = (prov.adapter, grads)
            if key not in expected:
                expected[key] = expected_results(x, adapter=prov.adapter, need_grad=grads)
            try:
                fwd, info = prov.build(px)
                ratios = check_provider(prov.name, fwd, px, expected[key], adapter=prov.adapter, need_grad=grads)
            except CorrectnessError:
                raise
            except Exception as exc:  # out of memory, a shape or dtype the provider does not take, a compile error
                reason = skip_reason(exc, device, any_error=True)
                log(f"    {prov.name:<12} SKIP: {reason}")
                write(skip_rows + [skipped_row(WHAT, prov.name, m, case.shape, reason) for m in modes])
                result.skipped += [(prov.name, m, case.shape, reason) for m in modes]
                continue
            result.checks[(case.shape, prov.name)] = ratios
            rows = skip_rows + check_rows(WHAT, prov.name, case.shape, ratios)
            rows += metric_rows(WHAT, prov.name, "all", case.shape, [(k, v, "") for k, v in info.items()])
            parts = [f"check ok (err/tol {max(ratios.values()):.2f})"]
            for mode in modes:
                timed = None
                try:
                    timed = mode_closure(fwd, mode, px)
                    leaves = px.leaves(prov.adapter) if grads else []
                    timing = time_fn(timed, device, grad_to_none=leaves, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms,
                                     cpu_warmup=1, cpu_reps=cfg.cpu_reps)
                    peak = peak_memory_mib(timed, device, leaves)
                except Exception as exc:  # out of memory, or the provider fails in this mode
                    reason = skip_reason(exc, device, any_error=True)
                    rows.append(skipped_row(WHAT, prov.name, mode, case.shape, reason))
                    result.skipped.append((prov.name, mode, case.shape, reason))
                    parts.append(f"{mode} SKIP ({reason})")
                    continue
                finally:
                    del timed
                    for t in px.leaves():
                        t.grad = None
                flops = attention_flops(case.batch, case.seqlen, case.nheads, case.headdim, mode)
                tflops = flops / timing.median_ms / 1e9
                result.measurements.append(Measurement(case, prov.name, mode, timing, tflops, peak))
                rows += _mode_rows(case, prov, mode, timing, peak)
                mem = f" {peak:.0f} MiB" if peak is not None else ""
                parts.append(f"{mode} {timing.median_ms:.3f} ms [{timing.p20_ms:.3f}-{timing.p80_ms:.3f}] "
                             f"{tflops:.3g} TFLOP/s{mem}")
            write(rows)
            backend = f" [{info['sdpa_backend_tokens']}]" if "sdpa_backend_tokens" in info else ""
            log(f"    {prov.name:<12}{backend} " + " | ".join(parts) + f" ({time.perf_counter() - prov_started:.1f} s)")
            del fwd
            free_device_memory(device)
        del x, expected
        free_device_memory(device, collect=env.is_cuda)
        log(f"    ({time.perf_counter() - started:.1f} s)")

    return finish_run(result, report, log)


# --------------------------------------------------------------------------------------------------
# --cpu-fallback: the op's CPU path (two SDPA calls) against the eager reference and the two bare calls
# --------------------------------------------------------------------------------------------------
CPU_WHAT = "attention_cpu"
CPU_MODES = ("fwd", "full")  # fwd: generation's forward (no_grad); full: training's forward and backward
CPU_GOAL = 1.1  # the fallback within 1.1x of the two bare SDPA calls
# a timed sample of a short case (decode) repeats the call to last about CPU_SAMPLE_MS, so that the scheduling of
# the CPU threads (one time slice lost on a loaded machine) is averaged over many calls
CPU_SAMPLE_MS, CPU_MAX_CALLS = 20.0, 200
# one LLaMA-7B layer (32 heads of 128, prompt 10, fp32): prefill S x S and decode 1 x S for each S
CPU_FALLBACK = dict(seqlens=(512,), headdims=(128,), dtypes=("fp32",), shapes=("7b",), prompt_len=10,
                    modes=CPU_MODES, cpu_reps=15)
CPU_FALLBACK_SMOKE = dict(seqlens=(48,), headdims=(16,), dtypes=("fp32",), shapes=("tiny-gqa",), prompt_len=3,
                          modes=CPU_MODES, cpu_reps=3)


def _cpu_cases(cfg: BenchConfig) -> list[tuple[str, Inputs]]:
    """(name, inputs) of each CPU case: prefill (seqlen_q = seqlen_k = S) and decode (one query, S keys), batch 1."""
    cases = []
    for case in cases_of(cfg):
        case = dataclasses.replace(case, batch=1)
        x = make_inputs(case, torch.device("cpu"), cfg.seed)
        last = x.q[:, -1:].detach().clone().requires_grad_()
        decode = dataclasses.replace(x, q=last, dout=x.dout[:, -1:].clone())
        cases += [(f"prefill-{case.shape}", x), (f"decode-q1-{case.shape}", decode)]
    return cases


def _cpu_forwards(x: Inputs) -> dict[str, Callable[[], object]]:
    """eager: the reference; fallback: kernels/sdpa_fallback.py, as the op calls it on a CPU; floor: the two bare
    SDPA calls (token part causal, prompt part unmasked), neither gated nor summed."""
    c = x.case
    scale = c.headdim**-0.5
    args = (x.q, x.k, x.v, x.prompt_k, x.prompt_v, x.gate)

    def floor() -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, pk, pv = _heads_first(x)
        gqa = c.nheads != c.nheads_kv
        return (F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa),  # equal lengths
                F.scaled_dot_product_attention(q, pk, pv, enable_gqa=gqa))

    return {"eager": lambda: zero_init_attention_ref(*args, causal=True, gate_act=c.gate_act),
            "fallback": lambda: zero_init_attention_sdpa(*args, causal=True, softmax_scale=scale,
                                                         gate_act=c.gate_act),
            "floor": floor}


def _cpu_timed(provider: str, fwd: Callable[[], object], x: Inputs, mode: str) -> Callable[[], object]:
    """What is timed: fwd, the forward as generation runs it (under torch.no_grad: no graph recorded); full, the
    forward and backward of training (the floor's two outputs each get dout)."""
    if mode == "fwd":
        return torch.no_grad()(fwd)
    if provider == "floor":
        dout = x.dout.transpose(1, 2)
        return lambda: torch.autograd.backward(fwd(), (dout, dout))
    return lambda: fwd().backward(x.dout)


def run_cpu_fallback(cfg: BenchConfig, env: BenchEnv, out_dir: Path, *, threads: int,
                     log: Callable[[str], None] = print) -> dict[tuple[str, str], dict[str, Timing]]:
    """Check the fallback and the eager reference against the oracle, then time the three side by side, interleaved
    (cpu_reps rounds of one sample each, after one untimed round; each sample after one untimed call, since the
    provider before evicted the inputs from the caches; a sample of a short case averages several calls:
    CPU_SAMPLE_MS), on `threads` CPU threads; rows to out_dir/attention_cpu.csv, a table of the medians and ratios
    printed. Returns {(case, mode): {provider: Timing}}."""
    result = BenchResult(env=env, out_dir=out_dir, csv_path=out_dir / f"{CPU_WHAT}.csv")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    log(f"bench_attention --cpu-fallback | {env.describe()} | {threads} CPU threads")
    log(f"rows go to {result.csv_path}")
    timings: dict[tuple[str, str], dict[str, Timing]] = {}
    lines = []
    try:
        for name, x in _cpu_cases(cfg):
            forwards = _cpu_forwards(x)
            expected = expected_results(x, adapter=True, need_grad="full" in cfg.modes)
            rows = []
            for prov in ("eager", "fallback"):
                ratios = check_provider(prov, forwards[prov], x, expected, adapter=True,
                                        need_grad="full" in cfg.modes)
                rows += check_rows(CPU_WHAT, prov, name, ratios)
            for mode in cfg.modes:
                timed = {prov: _cpu_timed(prov, fwd, x, mode) for prov, fwd in forwards.items()}
                times: dict[str, list[float]] = {prov: [] for prov in timed}
                calls = 1  # per timed sample: enough calls of a short case to span CPU_SAMPLE_MS
                for rep in range(cfg.cpu_reps + 1):  # the first round untimed
                    for prov, fn in timed.items():
                        for t in x.leaves():
                            t.grad = None
                        fn()  # untimed: the inputs back in the caches that the provider before evicted
                        start = time.perf_counter()
                        for _ in range(calls):
                            for t in x.leaves():
                                t.grad = None
                            fn()
                        if rep:
                            times[prov].append((time.perf_counter() - start) * 1e3 / calls)
                        elif prov == "floor":
                            once_ms = (time.perf_counter() - start) * 1e3
                            calls = max(1, min(CPU_MAX_CALLS, int(CPU_SAMPLE_MS / once_ms)))
                got = timings[(name, mode)] = {prov: quantiles_ms(t) for prov, t in times.items()}
                over_floor = got["fallback"].median_ms / got["floor"].median_ms
                eager_over = got["eager"].median_ms / got["fallback"].median_ms
                for prov, t in got.items():
                    rows += metric_rows(CPU_WHAT, prov, mode, name, [("time_median", t.median_ms, "ms"),
                                                                     ("time_p20", t.p20_ms, "ms"),
                                                                     ("time_p80", t.p80_ms, "ms")])
                rows += metric_rows(CPU_WHAT, "fallback", mode, name, [("over_floor", over_floor, "x")])
                rows += metric_rows(CPU_WHAT, "eager", mode, name, [("over_fallback", eager_over, "x")])
                lines.append([name, mode] + [f"{got[p].median_ms:.3f}" for p in ("eager", "fallback", "floor")]
                             + [f"{over_floor:.2f}x", f"{eager_over:.2f}x", verdict(over_floor <= CPU_GOAL)])
                log(f"{name} {mode}: eager {got['eager'].median_ms:.3f} ms, fallback {got['fallback'].median_ms:.3f}"
                    f" ms, floor {got['floor'].median_ms:.3f} ms")
            result.write(rows)
    finally:
        torch.set_num_threads(before)
    log("")
    log(format_table(["case", "mode", "eager ms", "fallback ms", "2 SDPA ms", "fallback / 2 SDPA",
                      "eager / fallback", f"goal <= {CPU_GOAL}x"], lines))
    log(f"medians of {cfg.cpu_reps} interleaved rounds; CSV rows appended to {result.csv_path}")
    return timings


def _main_cpu_fallback(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.report is not None or args.report_commit is not None:
        parser.error("argument --cpu-fallback: measures, so --report / --report-commit cannot go with it")
    env = bench_env(torch.device("cpu"))
    try:
        cfg = bench_config(args, BenchConfig(), CPU_FALLBACK_SMOKE if args.smoke else CPU_FALLBACK, is_smoke=True)
        bad = [m for m in cfg.modes if m not in CPU_MODES]
        if bad:
            raise ValueError(f"argument --modes: --cpu-fallback times {', '.join(CPU_MODES)}, got {', '.join(bad)}")
        out_dir = resolve_out_dir(cfg.out, env, smoke=True, name=CPU_WHAT)
        check_csv(out_dir / f"{CPU_WHAT}.csv")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_cpu_fallback(cfg, env, out_dir, threads=args.threads or 2)
    except CorrectnessError as exc:
        print(f"\nCORRECTNESS CHECK FAILED - the benchmark stops here.\n{exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, *, providers: Mapping[str, Provider] | None = None) -> int:
    providers = PROVIDERS if providers is None else providers
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpu_fallback:
        return _main_cpu_fallback(parser, args)
    if args.threads is not None:
        parser.error("argument --threads: only goes with --cpu-fallback")
    if args.report is not None:
        return _main_report(parser, args)
    if args.report_commit is not None:
        parser.error("argument --report-commit: only goes with --report")
    return bench_main(parser, args, WHAT, lambda smoke: make_config(args, smoke=smoke, providers=providers),
                      lambda cfg, env, out_dir: run(cfg, env, out_dir, providers=providers))


def _main_report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    measuring = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(BenchConfig)
                 if f.name != "out" and getattr(args, f.name) is not None] + (["--smoke"] if args.smoke else [])
    if measuring:
        parser.error(f"argument --report: measures nothing, so {', '.join(measuring)} cannot go with it")
    path = Path(args.report)
    try:
        if not path.is_file():
            raise ValueError(f"--report {path}: no such file")
        check_csv(path)
        probe = result_from_csv(path, path.parent, case_of=case_from_shape, providers=tuple(PROVIDERS), modes=MODES,
                                commit=args.report_commit)
        out_dir = resolve_out_dir(args.out or path.parent, probe.env, smoke=False, name=WHAT)
    except ValueError as exc:
        msg = str(exc)
        parser.error(msg if msg.startswith("--") else f"argument --report: {msg}")
    probe.out_dir = out_dir
    print(f"bench_attention report | {probe.source}")
    report(probe, stem=f"{WHAT}_report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
