"""Zero-init attention (LLaMA-Adapter, arXiv 2303.16199) as one fused op.

    out_i = softmax_{j visible to i}(s q_i . k_j) V  +  act(g_h) * softmax_p(s q_i . pk_p) PV

Validation and dispatch; the Triton kernels follow.
"""

from __future__ import annotations

import os

import torch

from .reference import gate_activation, zero_init_attention_ref

# triton.jit decides at import time whether kernels are interpreted, so read the switch once, too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADDIM = 128


def _check_inputs(q, k, v, prompt_k, prompt_v, gate, causal, softmax_scale, gate_act) -> None:
    """Raise ValueError/TypeError naming the argument and the shapes it got; nothing is launched."""
    named = {"q": q, "k": k, "v": v, "prompt_k": prompt_k, "prompt_v": prompt_v, "gate": gate}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name in ("q", "k", "v", "prompt_k", "prompt_v"):
        t = named[name]
        if t.dim() != 4:
            layout = "(batch, seqlen_q, nheads, headdim)" if name == "q" else (
                "(batch, seqlen_k, nheads_kv, headdim)" if name in ("k", "v")
                else "(batch or 1, prompt_len, nheads_kv, headdim)")
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all of q, k, v, "
                            "prompt_k, prompt_v must share one dtype")
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")

    batch, seqlen_q, nheads, headdim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != headdim:
        raise ValueError(f"k must be (batch={batch}, seqlen_k, nheads_kv, headdim={headdim}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    if nheads_kv == 0 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads_kv of k ({nheads_kv}); "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if headdim % 8 != 0 or not 16 <= headdim <= MAX_HEADDIM:
        raise ValueError(f"headdim must be a multiple of 8 from 16 to {MAX_HEADDIM} (e.g. 32, 64, 80, 96, 128), "
                         f"got q {tuple(q.shape)}")
    if seqlen_k == 0 and seqlen_q > 0:
        raise ValueError(f"k must hold at least one key (seqlen_k >= 1), got k {tuple(k.shape)}")
    if prompt_k.shape != prompt_v.shape:
        raise ValueError(f"prompt_k and prompt_v must have the same shape, got prompt_k {tuple(prompt_k.shape)} "
                         f"and prompt_v {tuple(prompt_v.shape)}")
    if prompt_k.shape[0] not in (1, batch):
        raise ValueError(f"prompt_k must have batch 1 (shared) or batch {batch}, got {tuple(prompt_k.shape)}")
    if prompt_k.shape[2] != nheads_kv or prompt_k.shape[3] != headdim:
        raise ValueError(f"prompt_k must be (1 or {batch}, prompt_len, nheads_kv={nheads_kv}, headdim={headdim}), "
                         f"got {tuple(prompt_k.shape)}")
    if gate.dim() != 1 or gate.shape[0] not in (1, nheads):
        raise ValueError(f"gate must have shape ({nheads},) (one per head) or (1,), got {tuple(gate.shape)}")
    if causal and seqlen_q > seqlen_k:
        raise ValueError(f"causal attention needs seqlen_q <= seqlen_k (bottom-right aligned), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive number or None, got {softmax_scale!r}")
    if gate_act not in ("tanh", "identity"):
        raise ValueError(f"gate_act must be 'tanh' or 'identity', got {gate_act!r}")


def zero_init_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    gate_act: str = "tanh",
) -> torch.Tensor:
    """Zero-init attention: causal token attention plus a gated prompt attention with its own softmax."""
    _check_inputs(q, k, v, prompt_k, prompt_v, gate, causal, softmax_scale, gate_act)
    gate_activation(gate, gate_act)
    return zero_init_attention_ref(q, k, v, prompt_k, prompt_v, gate, causal=causal,
                                   softmax_scale=softmax_scale, gate_act=gate_act)
