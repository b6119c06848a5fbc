"""LLaMA (1, 2 and 3) in one flat file: config presets, RMSNorm, RoPE, SwiGLU, GQA attention, KV cache.

Meta's layout and parameter names (tok_embeddings, layers.N.attention.wq/wk/wv/wo, layers.N.feed_forward.w1/w2/w3,
attention_norm, ffn_norm, norm, output), so a Meta checkpoint loads by name and a Hugging Face one after renaming
(model/checkpoint.py).

    h   = x + wo(attend(rope(wq norm(x)), rope(wk norm(x)), wv norm(x)))      # attention, causal
    out = h + w2(silu(w1 norm(h)) * w3 norm(h))                              # SwiGLU

- RMSNorm and RoPE compute in fp32 and cast back, as Meta's code does; RoPE rotates interleaved pairs (x[2i],
  x[2i+1]), with Llama-3.1's frequency scaling when the config has one. GQA: query head h reads kv head
  h // (n_heads // n_kv_heads).
- Attention.attend is the one override point (here causal SDPA). This file knows nothing of adapters: an adapter
  (model/adapter.py, which imports this file, never the reverse) is passed as LLaMA(config, adapter) and plugs in
  through the AdapterHooks protocol: each layer's attention, what wraps the linears and norms (V2), the per-sample
  visual input. set_attention_impl(model, "eager") computes as the official code does (the benchmarks' baseline).
- model(tokens) (batch, seqlen) int64 -> logits (batch, seqlen, vocab_size); its keyword arguments (a KV cache, left
  padding, packed sequences, visual input, logits_at) and activation checkpointing: docs/checkpoints.md (The forward).
Families: "llama", "mistral" (a sliding window: exact up to its length, longer sequences refused, since the op has no
window), "qwen2" (q/k/v biases). Limits: head_dim == dim // n_heads; no dropout; biases on wq, wk, wv only. Token ids
are range-checked on the CPU only (on a GPU the check would cost a sync per decode step; the embedding kernel asserts).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llama_adapter_triton.kernels.checks import check_int, is_int
from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention


class ConfigValueError(ValueError):
    """A LLaMAConfig (or RopeScaling) value of the wrong type or out of its range; .field names the field
    ("rope_scaling.factor" for a RopeScaling one), so that a checkpoint reader can name its file's key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check_int(owner: str, field: str, value: object, minimum: int = 1) -> None:
    check_int(f"{owner}.{field.rpartition('.')[2]}", value, minimum, what=f"an integer >= {minimum}",
              error=functools.partial(ConfigValueError, field))


def _check_real(owner: str, field: str, value: object, minimum: float = 0.0) -> float:
    """value as a float: a finite number > minimum (JSON gives ints for some)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not value > minimum:
        raise ConfigValueError(field, f"{owner}.{field.rpartition('.')[2]} must be a finite number > {minimum:g}, "
                                      f"got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's RoPE frequency scaling (Meta's apply_scaling, HF's rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            object.__setattr__(self, name, _check_real("RopeScaling", f"rope_scaling.{name}", getattr(self, name)))
        # rope_frequencies divides by (high - low)
        _check_real("RopeScaling", "rope_scaling.high_freq_factor", self.high_freq_factor, self.low_freq_factor)
        _check_int("RopeScaling", "rope_scaling.original_max_seq_len", self.original_max_seq_len)


# The LLaMA-architecture families (Hugging Face model_type) that LLaMA computes exactly: Mistral is a llama with a
# sliding window, Qwen2 (and Qwen2.5) one with biases on q, k and v
FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class LLaMAConfig:
    """Shapes of a LLaMA model. hidden_dim (SwiGLU width) and n_kv_heads are derived when left unset.

    Every value is checked (type, range, finiteness): a ConfigValueError names the field."""

    name: str = "custom"
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: n_heads (no GQA)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None: Meta's rule from multiple_of and ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048  # the context the model was trained for; generate() stays within it
    tie_embeddings: bool = False  # output shares tok_embeddings' weight (Llama-3.2 1B/3B, the small Qwen2)
    family: str = "llama"  # the Hugging Face model_type it is read from and written as (FAMILIES)
    qkv_bias: bool | None = None  # biases on wq, wk, wv (Qwen2's); None: the family's
    sliding_window: int | None = None  # Mistral's (and Qwen2's use_sliding_window): longer sequences are refused

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigValueError("name", f"LLaMAConfig.name must be a string, got {self.name!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.family not in FAMILIES:
            raise ConfigValueError("family", f"LLaMAConfig.family must be one of {', '.join(FAMILIES)}, got "
                                             f"{self.family!r}")
        if self.qkv_bias is None:
            self.qkv_bias = self.family == "qwen2"
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigValueError(name, f"LLaMAConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.qkv_bias != (self.family == "qwen2"):
            raise ConfigValueError("qkv_bias", f"LLaMAConfig.qkv_bias={self.qkv_bias} does not fit family "
                                               f"{self.family!r}: qwen2 has biases on q, k, v, llama and mistral none")
        if self.sliding_window is not None:
            _check_int("LLaMAConfig", "sliding_window", self.sliding_window)
            if self.family == "llama":
                raise ConfigValueError("sliding_window", "LLaMAConfig.sliding_window is mistral's and qwen2's; a "
                                                         "llama attends over its whole context")
        _check_int("LLaMAConfig", "multiple_of", self.multiple_of)
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = _check_real("LLaMAConfig", "ffn_dim_multiplier", self.ffn_dim_multiplier)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            _check_int("LLaMAConfig", name, getattr(self, name))
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        _check_int("LLaMAConfig", "hidden_dim", self.hidden_dim)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigValueError("dim", f"LLaMAConfig.dim ({self.dim}) must be n_heads ({self.n_heads}) times an "
                                          "even head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigValueError("n_kv_heads", f"LLaMAConfig.n_heads ({self.n_heads}) must be a multiple of "
                                                 f"n_kv_heads ({self.n_kv_heads})")
        self.norm_eps = _check_real("LLaMAConfig", "norm_eps", self.norm_eps)
        self.rope_theta = _check_real("LLaMAConfig", "rope_theta", self.rope_theta)
        if isinstance(self.rope_scaling, dict):
            try:
                self.rope_scaling = RopeScaling(**self.rope_scaling)
            except TypeError as e:  # a key RopeScaling does not have
                raise ConfigValueError("rope_scaling", f"LLaMAConfig.rope_scaling: {e}") from None
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigValueError("rope_scaling", "LLaMAConfig.rope_scaling must be None, a RopeScaling or its "
                                                   f"fields as a dict, got {self.rope_scaling!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> LLaMAConfig:
        """A named preset (see PRESETS), with any field overridden, e.g. from_name("tiny", vocab_size=512)."""
        if name not in PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{"name": name, **PRESETS[name], **overrides})


_LLAMA3_ROPE = {"rope_theta": 500000.0, "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
                "norm_eps": 1e-5}
PRESETS: dict[str, dict] = {
    # LLaMA-1 (2302.13971): vocab 32000, context 2048
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64),
    # Llama-2: norm eps 1e-5, context 4096, GQA for 70B
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
                       norm_eps=1e-5, max_seq_len=4096),
    # Llama-3: vocab 128256, rope theta 500000, GQA; 3.1 adds RoPE frequency scaling and a 128k context
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=8192, **_LLAMA3_ROPE),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, max_seq_len=8192,
                       **{**_LLAMA3_ROPE, "multiple_of": 4096}),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=131072,
                        rope_scaling=RopeScaling(), **_LLAMA3_ROPE),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, max_seq_len=131072,
                         rope_scaling=RopeScaling(), **{**_LLAMA3_ROPE, "multiple_of": 4096}),
    # Llama-3.2: tied embeddings, RoPE scaling by 32
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, max_seq_len=131072,
                        tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0), **_LLAMA3_ROPE),
    # the other families (config.json's values): Mistral-7B v0.1 (sliding window 4096) and v0.3 (none, vocab
    # 32768, rope theta 1e6); Qwen2.5-0.5B (q/k/v biases, tied embeddings)
    "mistral-7b": dict(family="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       norm_eps=1e-5, max_seq_len=32768, sliding_window=4096),
    "mistral-7b-v0.3": dict(family="mistral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                            vocab_size=32768, norm_eps=1e-5, rope_theta=1e6, max_seq_len=32768),
    "qwen2.5-0.5b": dict(family="qwen2", dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                         vocab_size=151936, rope_theta=1e6, max_seq_len=32768, tie_embeddings=True),
    # tiny models for tests and the demo (head_dim 32)
    "tiny": dict(dim=128, n_layers=4, n_heads=4, vocab_size=1024, multiple_of=32, norm_eps=1e-5, max_seq_len=512),
    "tiny-gqa": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32, norm_eps=1e-5,
                     max_seq_len=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in fp32, cast to x's dtype, times the weight; the dtype of x out (also with an fp32 weight
        and a bf16 x: an adapter that trains the norm keeps its weight in fp32)."""
        return (self.normalize(x) * self.weight).type_as(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), computed in fp32, in x's dtype (the forward without the weight: a per-row weight applies it,
        model/bank.py)."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_frequencies(config: LLaMAConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2, fp32, with Llama-3.1's scaling when configured.

    Scaling (Meta's apply_scaling): wavelengths below original_max_seq_len / high_freq_factor are
    kept, those above original_max_seq_len / low_freq_factor divided by factor, the band between
    interpolated smoothly.
    """
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))  # (hd/2,)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > s.original_max_seq_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= s.original_max_seq_len / s.high_freq_factor) & (
        wavelen <= s.original_max_seq_len / s.low_freq_factor)
    return torch.where(medium, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)


def rope_cos_sin(positions: torch.Tensor, config: LLaMAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency: positions (B, T) int -> two (B, T, 1, head_dim/2) fp32 tensors."""
    angles = positions.unsqueeze(-1).float() * rope_frequencies(config, positions.device)  # (B, T, hd/2)
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., 2i], x[..., 2i+1]) of x (B, T, nh, hs) in fp32; dtype of x out."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, nh, hs/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, (batch, max_seq_len, n_kv_heads, head_dim) each.

    Unwritten slots are zeros (finite: a masked key must not turn its weight 0 into NaN).
    prompt_kv holds an adapted layer's prompt keys/values, computed once per generation.
    """

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.zeros(batch, max_seq_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, input_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, nkv, hs) at slots input_pos.. and return all keys/values up to them."""
        end = input_pos + k.shape[1]
        if k.shape[0] != self.k.shape[0] or end > self.k.shape[1]:
            raise ValueError(f"the KV cache holds batch {self.k.shape[0]} x {self.k.shape[1]} slots; tokens of batch "
                             f"{k.shape[0]} at input_pos {input_pos}..{end - 1} do not fit (call setup_cache)")
        self.k[:, input_pos:end] = k
        self.v[:, input_pos:end] = v
        return self.k[:, :end], self.v[:, :end]  # (B, end, nkv, hs)


@dataclass
class AttentionContext:
    """What every layer's attention needs besides its input, built once per forward."""

    input_pos: int  # cache slot of the first query token
    leftpad_k: torch.Tensor | None  # (B,) int32: pad tokens at the start of each row, None when there are none
    visual: torch.Tensor | None = None  # the adapter's visual input (AdapterHooks.visual_input), per row
    visual_mask: torch.Tensor | None = None  # (rows,) bool: rows that have a visual input; None: all of them
    mask: torch.Tensor | None = None  # SDPA boolean mask (T, S) or (B, 1, T, S), True = visible
    is_causal: bool = False  # SDPA's own causal mask (T == S, no padding)
    cu_seqlens: torch.Tensor | None = None  # packed sequences: (num_seqs + 1,) int32 offsets into the one row
    max_seqlen: int | None = None  # packed sequences: the longest


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                     prompt_k: torch.Tensor, prompt_v: torch.Tensor, gate: torch.Tensor,
                     gate_act: str = "tanh") -> torch.Tensor:
    """Causal attention within each packed sequence of q (1, T, nh, hs) over k, v (1, T, nkv, hs), plus the
    gated prompt (1 or num_seqs, prompt_len, nkv, hs; prompt_len 0 for none) -> (1, T, nh, hs)."""
    return zero_init_attention(q[0], k[0], v[0], prompt_k, prompt_v, gate, causal=True, gate_act=gate_act,
                               cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
                               max_seqlen_q=ctx.max_seqlen, max_seqlen_k=ctx.max_seqlen).unsqueeze(0)


ATTENTION_IMPLS = ("fused", "eager")


def set_attention_impl(model: nn.Module, impl: str) -> str:
    """Choose how every attention layer of model computes: "fused" (the default: SDPA in the plain layers,
    kernels.zero_init_attention in the adapted ones and in every layer of a packed batch) or "eager" (the
    official code's formulation: eager_attention in the plain layers, kernels.zero_init_attention_ref in the
    adapted ones; padded batches only). Returns the implementation the model had before."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers")
    before = layers[0].attn_impl
    for m in layers:
        m.attn_impl = impl
    return before


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool) -> torch.Tensor:
    """Attention as the official LLaMA code computes it: every score materialised, masked with -inf, softmax in
    fp32, cast back. q (B, T, nh, hs) over k, v (B, S, nkv, hs) -> (B, T, nh, hs); mask and is_causal as
    attention_mask returns them (True = visible). Kv heads are repeated to nh first (Llama-2's repeat_kv)."""
    T, S, hs = q.shape[1], k.shape[1], q.shape[3]
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, S, hs)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hs)  # (B, nh, T, S)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(probs, v).transpose(1, 2)  # (B, T, nh, hs)


def check_window(config: LLaMAConfig, length: int, what: str = "a sequence") -> None:
    """ValueError if length tokens do not fit config.sliding_window. Within the window a sliding-window model
    (Mistral's: query i sees keys j with i - j < window) attends over every earlier token, as here; a longer
    sequence would need the window in the op (not supported), so it is refused."""
    if config.sliding_window is not None and length > config.sliding_window:
        raise ValueError(f"{what} of {length} tokens is longer than this {config.family} model's sliding_window "
                         f"({config.sliding_window}): attention beyond the window is not supported (sequences up to "
                         "the window are exact); shorten it")


def check_packed_impl(impl: str) -> None:
    if impl != "fused":
        raise ValueError(f"packed sequences (cu_seqlens) need attention impl 'fused'; this model's is {impl!r}, "
                         "which has no varlen mode (pad the batch instead)")


def attention_mask(seqlen_q: int, seqlen_k: int, leftpad_k: torch.Tensor | None,
                   device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """SDPA mask for queries at the last seqlen_q of seqlen_k slots: (mask, is_causal).

    Query i sits at slot i + seqlen_k - seqlen_q and sees slots j up to its own (causal, bottom-right),
    and from leftpad_k[b] on; a pad query sees only itself, so that no row is fully masked (NaN).
    """
    if leftpad_k is None:
        if seqlen_q == 1:
            return None, False
        if seqlen_q == seqlen_k:
            return None, True
    i = torch.arange(seqlen_q, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)  # (T, 1): slot of query i
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)  # (1, S)
    mask = j <= i  # (T, S)
    if leftpad_k is not None:
        pad = leftpad_k.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        mask = mask & ((j >= pad) | (j == i))  # (B, 1, T, S)
    return mask, False


class Attention(nn.Module):
    attn_impl: str = "fused"  # see set_attention_impl; set per module
    # called instead of attend while set: per-row attention for one batch (model/bank.py's adapter bank sets it for
    # its rows, and unsets it after); (q, k, v, ctx) -> (B, T, nh, hs)
    row_attend: Callable[..., torch.Tensor] | None = None

    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(ctx.input_pos, k, v)  # (B, S, nkv, hs), S = input_pos + T
        y = (self.row_attend or self.attend)(q, k, v, ctx)  # (B, T, nh, hs)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Causal attention of q (B, T, nh, hs) over k, v (B, S, nkv, hs) -> (B, T, nh, hs). The override point."""
        if ctx.cu_seqlens is not None:  # packed sequences: SDPA cannot, the op's varlen mode with no prompt can
            check_packed_impl(self.attn_impl)
            no_prompt = k.new_empty(1, 0, self.n_kv_heads, self.head_dim)
            return packed_attention(q, k, v, ctx, no_prompt, no_prompt, q.new_zeros(1))
        if self.attn_impl == "eager":
            return eager_attention(q, k, v, ctx.mask, ctx.is_causal)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, nh, T, hs), (B, nkv, S, hs)
            attn_mask=ctx.mask, is_causal=ctx.is_causal, enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, config: LLaMAConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: LLaMAConfig, attention: Attention) -> None:
        super().__init__()
        self.attention = attention
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class AdapterHooks(Protocol):
    """What LLaMA(config, adapter) asks of an adapter (model/adapter.py's AdapterConfig): the override points.

    attention(config, layer) -> the attention module of block `layer` (Attention itself, or a subclass that
        overrides attend), built in place of the plain one.
    attach(model): called once the base is built: adds what sits outside the attention (modules that wrap
        the frozen linears, trainable norms, a projector) and sets model.first_adapted, the lowest layer the
        adapter changes (the layers below it run without autograd when nothing there is trained).
    visual_input(model, visual, image_features, image_mask, rows, what) -> (visual, mask): the per-sample
        visual input of a forward, checked (rows: its batch or number of packed sequences, named `what`),
        as AttentionContext.visual and .visual_mask.
    """

    def attention(self, config: LLaMAConfig, layer: int) -> Attention: ...

    def attach(self, model: LLaMA) -> None: ...

    def visual_input(self, model: LLaMA, visual: torch.Tensor | None, image_features: torch.Tensor | None,
                     image_mask: torch.Tensor | None, rows: int,
                     what: str) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


class LLaMA(nn.Module):
    """LLaMA, optionally with an adapter (model/adapter.py's AdapterConfig) plugged in through AdapterHooks.

    activation_checkpointing (set per model, default False): each block that runs with gradients (the adapted ones)
    keeps only its input and recomputes the rest in the backward (torch.utils.checkpoint, non-reentrant)."""

    activation_checkpointing: bool = False

    def __init__(self, config: LLaMAConfig, adapter: AdapterHooks | None = None) -> None:
        super().__init__()
        self.config, self.adapter = config, adapter
        self.first_adapted = config.n_layers  # the lowest layer an adapter changes (its attach sets it)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            Block(config, Attention(config) if adapter is None else adapter.attention(config, i))
            for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if adapter is not None:
            adapter.attach(self)

    def setup_cache(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Give every layer a KV cache of max_seq_len slots (dtype and device of the embedding by default)."""
        if max_seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"setup_cache needs a positive batch_size and max_seq_len, got {batch_size}, "
                             f"{max_seq_len}")
        w = self.tok_embeddings.weight  # the activations' dtype (linears may be wrapped or quantized)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.config.n_kv_heads, self.config.head_dim,
                                               dtype=dtype or w.dtype, device=device or w.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(self, tokens: torch.Tensor, *, input_pos: int | None = None, left_pad: Sequence[int] | None = None,
                positions: torch.Tensor | None = None, visual: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                logits_at: int | torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size), or only at logits_at; see the module docstring. head=False:
        the final norm's output (..., dim) instead, for a loss that applies the output layer itself (train/loss.py)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor (batch, seqlen), got {got}")
        B, T = tokens.shape
        if tokens.device.type == "cpu" and tokens.numel() and not (
                0 <= int(tokens.min()) and int(tokens.max()) < self.config.vocab_size):
            raise ValueError(f"tokens must be ids in [0, {self.config.vocab_size}), got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}")
        self._check_logits_at(logits_at, B, T, tokens.device)
        input_pos = input_pos or 0
        cached = self.layers[0].attention.kv_cache is not None
        seqlen_k = input_pos + T if cached else T  # slots the queries attend over
        left_pad = self._check_left_pad(left_pad, B, seqlen_k)
        if cu_seqlens is not None:
            max_seqlen = self._check_packed(tokens, cu_seqlens, max_seqlen, input_pos, left_pad, cached)
        elif max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens (packed sequences)")
        # the longest span from a row's first real key to its last query
        check_window(self.config, max_seqlen if cu_seqlens is not None else seqlen_k - min(left_pad or [0]))
        rows, what = (cu_seqlens.shape[0] - 1, "num_seqs") if cu_seqlens is not None else (B, "batch")
        visual_mask = None
        if visual is not None or image_features is not None or image_mask is not None:
            if self.adapter is None:
                raise ValueError("visual, image_features and image_mask are the adapter's input, but this model has "
                                 "no adapter")
            visual, visual_mask = self.adapter.visual_input(self, visual, image_features, image_mask, rows, what)

        leftpad_k = None if left_pad is None else torch.tensor(left_pad, dtype=torch.int32, device=tokens.device)
        if positions is None and cu_seqlens is not None:  # restart at 0 in each sequence
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            positions = torch.arange(T, device=tokens.device) - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
        elif positions is None:
            positions = torch.arange(input_pos, input_pos + T, device=tokens.device).expand(B, T)
            if leftpad_k is not None:  # each row counts from its first real token; pad tokens sit at 0
                positions = (positions - leftpad_k.unsqueeze(1)).clamp(min=0)
        elif positions.shape not in ((B, T), (T,)):
            raise ValueError(f"positions must be (batch={B}, seqlen={T}) or ({T},), got {tuple(positions.shape)}")
        rope = rope_cos_sin(positions.expand(B, T), self.config)
        mask, is_causal = (None, False) if cu_seqlens is not None else attention_mask(T, seqlen_k, leftpad_k,
                                                                                      tokens.device)
        ctx = AttentionContext(input_pos=input_pos, leftpad_k=leftpad_k, visual=visual, visual_mask=visual_mask,
                               mask=mask, is_causal=is_causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

        x = self.tok_embeddings(tokens)  # (B, T, dim)
        # Below the first adapted layer nothing is trained: no autograd graph, no saved activations.
        frozen_below = self.adapter is not None and not any(
            p.requires_grad for m in (self.tok_embeddings, *self.layers[:self.first_adapted]) for p in m.parameters())
        with torch.no_grad() if frozen_below else nullcontext():
            for layer in self.layers[:self.first_adapted]:
                x = self._block(layer, x, rope, ctx)
        for layer in self.layers[self.first_adapted:]:
            x = self._block(layer, x, rope, ctx)
        if isinstance(logits_at, int):
            x = x[:, logits_at]  # (B, dim)
        elif logits_at is not None:
            x = x.flatten(0, 1).index_select(0, logits_at)  # (N, dim)
        x = self.norm(x)
        return self.output(x) if head else x  # (B, T, vocab), (B, vocab) or (N, vocab); (..., dim) without head

    def _block(self, layer: Block, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               ctx: AttentionContext) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():  # a block the backward passes through
            return checkpoint(layer, x, rope, ctx, use_reentrant=False)
        return layer(x, rope, ctx)

    @staticmethod
    def _check_logits_at(logits_at: int | torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> None:
        if logits_at is None:
            return
        if is_int(logits_at):
            if not -seqlen <= logits_at < seqlen:
                raise ValueError(f"logits_at={logits_at} is not a position of tokens of seqlen {seqlen}")
            return
        if not isinstance(logits_at, torch.Tensor) or logits_at.dim() != 1 or logits_at.is_floating_point() \
                or logits_at.dtype == torch.bool:
            got = f"{logits_at.dtype} {tuple(logits_at.shape)}" if isinstance(logits_at, torch.Tensor) else \
                repr(logits_at)
            raise ValueError(f"logits_at must be an int position or a 1-D integer tensor of flat indices into the "
                             f"batch * seqlen positions, got {got}")
        if logits_at.device != device:
            raise ValueError(f"logits_at is on {logits_at.device} but tokens are on {device}")
        if device.type == "cpu" and logits_at.numel() and not (
                0 <= int(logits_at.min()) and int(logits_at.max()) < batch * seqlen):
            raise ValueError(f"logits_at indices must lie in [0, {batch * seqlen}) (batch {batch} x seqlen {seqlen}), "
                             f"got values from {int(logits_at.min())} to {int(logits_at.max())}")

    @staticmethod
    def _check_packed(tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None, input_pos: int,
                      left_pad: list[int] | None, cached: bool) -> int:
        """Check packed-sequence arguments; returns max_seqlen (the longest sequence when None)."""
        if tokens.shape[0] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) go in one row: tokens must be (1, total), got "
                             f"{tuple(tokens.shape)}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
                or cu_seqlens.shape[0] < 2:
            got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else \
                type(cu_seqlens).__name__
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of num_seqs + 1 >= 2 offsets, got {got}")
        if cu_seqlens.device != tokens.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but tokens are on {tokens.device}")
        if cached or input_pos or left_pad is not None:
            raise ValueError("packed sequences (cu_seqlens) are for training: no KV cache, input_pos or left_pad")
        # checked once per forward, for every layer's op (which checks CUDA offsets only by clamping them): on a
        # GPU this one small copy is the forward's one synchronisation
        cu = cu_seqlens.cpu()
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != tokens.shape[1] or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to {tokens.shape[1]} (the packed length), got {cu.tolist()}")
        longest = int(lengths.max())
        if max_seqlen is None:
            return longest
        return check_int("max_seqlen", max_seqlen, longest, what=f"an int of at least the longest sequence ({longest})")

    @staticmethod
    def _check_left_pad(left_pad: Sequence[int] | None, batch: int, seqlen_k: int) -> list[int] | None:
        if left_pad is None:
            return None
        left_pad = [int(p) for p in left_pad]
        if len(left_pad) != batch or any(not 0 <= p < seqlen_k for p in left_pad):
            raise ValueError(f"left_pad must hold one count per row (batch {batch}), each in [0, {seqlen_k}) so that "
                             f"every row keeps a real token, got {left_pad}")
        return left_pad if any(left_pad) else None
