"""Eager reference for zero-init attention: the formulation of the LLaMA-Adapter paper's code.

LLaMA-Adapter (arXiv 2303.16199), the official training code's attention::

    scores         = softmax(q k^T * s + causal_mask)            # fp32 softmax
    adapter_scores = tanh(gate) * softmax(q prompt_k^T * s)      # its own fp32 softmax
    out            = scores @ v + adapter_scores @ prompt_v

written here as the paper writes it: prompt keys/values concatenated in front of the token
keys/values (repeated over the batch when shared), one (seqlen_q x (prompt_len + seqlen_k))
score matrix, two separate softmaxes over its two slices. It materialises every score, so it
is the test oracle (call it on fp64 inputs) and the fallback on machines without Triton, not
a fast path. Matmuls run in the input dtype, softmaxes in fp32 (in fp64 for fp64 inputs: then every step is
fp64), like the paper's code. It shares no code with the Triton op (kernels/zero_init_attn.py), its gate
activation included, so that the tests' oracle cannot inherit the op's mistakes.
"""

from __future__ import annotations

import torch


def zero_init_attention_ref(
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
    leftpad_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-init attention computed eagerly, every score materialised.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim)
        k, v: (batch, seqlen_k, nheads_kv, headdim), nheads % nheads_kv == 0
        prompt_k, prompt_v: (batch or 1, prompt_len, nheads_kv, headdim)
        gate: (nheads,) or (1,), the raw gate; act(gate) scales the prompt part. Or (batch, nheads): row b's
            prompt part scaled by act(gate[b, h]).
        causal: bottom-right aligned causal mask on the token keys (prompt keys are never masked).
        softmax_scale: defaults to headdim ** -0.5, applies to both parts.
        gate_act: "tanh" or "identity".
        leftpad_k: (batch,) int, optional: row b's token keys j < leftpad_k[b] are padding, never seen. A
            query that sees no token key (a pad query) gets the prompt part alone.
    Returns:
        out: (batch, seqlen_q, nheads, headdim), dtype of q.
    """
    if gate_act not in ("tanh", "identity"):
        raise ValueError(f"gate_act must be 'tanh' or 'identity', got {gate_act!r}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    prompt_len = prompt_k.shape[1]
    groups = nheads // nheads_kv
    scale = headdim**-0.5 if softmax_scale is None else softmax_scale
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # (B, T, nh_kv, hs) -> (B, nh, T, hs): kv head h // groups serves query head h
        return x.expand(batch, -1, -1, -1).transpose(1, 2).repeat_interleave(groups, dim=1)

    keys = torch.cat([heads_first(prompt_k), heads_first(k)], dim=2)  # (B, nh, P + Tk, hs)
    values = torch.cat([heads_first(prompt_v), heads_first(v)], dim=2)
    scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) * scale  # (B, nh, Tq, P + Tk)

    token_scores = scores[..., prompt_len:].to(softmax_dtype)
    i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
    # query i sees key j <= i + seqlen_k - seqlen_q (bottom-right alignment), and no left padding
    hidden = j > i + (seqlen_k - seqlen_q) if causal else torch.zeros_like(j > i)  # (Tq, Tk)
    if leftpad_k is not None:
        hidden = hidden | (j < leftpad_k.to(q.device).view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    token_scores = token_scores.masked_fill(hidden, float("-inf"))
    # a query that sees no key at all: its token part is 0 (finite scores first, so that no NaN reaches
    # the softmax's backward)
    blind = hidden.all(dim=-1, keepdim=True)
    token_probs = torch.softmax(token_scores.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0).type_as(q)

    gamma = (torch.tanh(gate) if gate_act == "tanh" else gate).to(q.dtype)  # act(gate)
    if gamma.dim() == 2:  # (B, nh, 1, 1): one gate per sample and head
        gamma = gamma.reshape(batch, nheads, 1, 1)
    else:  # (nh, 1, 1): one gate per head or one for all
        gamma = gamma.reshape(-1, 1, 1).expand(nheads, 1, 1)
    prompt_probs = gamma * torch.softmax(scores[..., :prompt_len].to(softmax_dtype), dim=-1).type_as(q)

    probs = torch.cat([prompt_probs, token_probs], dim=-1)  # two softmaxes, side by side
    out = torch.matmul(probs, values)  # (B, nh, Tq, hs)
    return out.transpose(1, 2).contiguous()
