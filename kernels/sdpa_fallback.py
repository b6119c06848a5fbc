"""Zero-init attention without Triton: two scaled_dot_product_attention calls.

The two softmaxes share no statistics, so the op's output is exactly

    out = SDPA(q, k, v, causal bottom-right) + act(gate) * SDPA(q, prompt_k, prompt_v)

and torch's own CPU kernels (fused, flash-style) compute each part; autograd runs through them. This is the path of
zero_init_attention when the Triton kernels do not run (a CPU without TRITON_INTERPRET=1, or no Triton at all);
the eager reference (kernels/reference.py) stays the tests' oracle and shares no code with it.

- Causal masks are aligned bottom-right (query i sees keys j <= i + seqlen_k - seqlen_q): is_causal=True (torch's
  top-left alignment) only where the two agree, seqlen_q == seqlen_k; no mask at all for one query (decode); an
  explicit mask otherwise.
- GQA through enable_gqa (as fast as MHA on a CPU, measured; no copies of the kv heads).
- leftpad_k: a boolean mask per row. A query that sees no token key (a pad query) gets a token part of exactly 0:
  its mask row is opened (finite scores, no NaN) and its token output zeroed, so no gradient flows from it.
- Packed sequences (cu_seqlens): the token part one sequence at a time (sequences never see each other); the prompt
  part in one call when the prompt is shared, else per sequence.
- Numerics: SDPA's CPU kernels keep their softmax statistics and accumulators in fp32 for 16-bit inputs; each part
  is rounded to the input dtype, and the two are added in fp32 (fp64 for fp64 inputs) and rounded once.
- Without a prompt (prompt_len 0) the op is the token part alone: prompt_k, prompt_v and the gate get no gradient
  (None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen, nheads, headdim) -> (batch, nheads, seqlen, headdim), a view."""
    return x.transpose(1, 2)


def _token_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                leftpad_k: torch.Tensor | None) -> torch.Tensor:
    """Attention over the token keys, heads-first tensors in and out; bottom-right causal alignment."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if leftpad_k is None and (not causal or seqlen_q == 1 or seqlen_q == seqlen_k):
        # one query sees every key (bottom-right); equal lengths: top-left and bottom-right agree
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and seqlen_q > 1, scale=scale,
                                              enable_gqa=gqa)
    i = torch.arange(seqlen_q, device=q.device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=q.device).unsqueeze(0)
    seen = j <= i + (seqlen_k - seqlen_q) if causal else torch.ones_like(j > i)  # (Tq, Tk)
    if leftpad_k is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale, enable_gqa=gqa)
    seen = seen & (j >= leftpad_k.view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    blind = ~seen.any(dim=-1, keepdim=True)  # (B, 1, Tq, 1): pad queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen | blind, scale=scale, enable_gqa=gqa)
    return out.masked_fill(blind, 0.0)


def _prompt_part(q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor, scale: float) -> torch.Tensor:
    """The prompt's own softmax, heads-first; no mask (a prompt of batch 1 is broadcast without a copy)."""
    pk, pv = _heads_first(prompt_k), _heads_first(prompt_v)
    if pk.shape[0] != q.shape[0]:
        pk, pv = pk.expand(q.shape[0], -1, -1, -1), pv.expand(q.shape[0], -1, -1, -1)
    return F.scaled_dot_product_attention(q, pk, pv, scale=scale, enable_gqa=q.shape[1] != pk.shape[1])


def _gated_sum(out: torch.Tensor, gamma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """out + gamma * prompt, in gamma's dtype (fp32 or fp64); into out itself where no gradient is recorded
    (generation: no new buffer)."""
    if out.requires_grad or gamma.requires_grad or prompt.requires_grad:
        return torch.addcmul(out, gamma, prompt)
    return out.addcmul_(gamma, prompt)


def zero_init_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    gate_act: str,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """zero_init_attention's result through two SDPA calls; its arguments, already checked by the op, with
    softmax_scale resolved. gate: (nheads,), (1,), or one row per batch row (dense) or per sequence (packed):
    (rows, nheads). Returns (batch, seqlen_q, nheads, headdim) (or (total_q, nheads, headdim) packed), contiguous,
    dtype of q. Differentiable in every tensor argument."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    gamma = gate if gate.dtype == acc else gate.to(acc)
    gamma = torch.tanh(gamma) if gate_act == "tanh" else gamma
    nheads = q.shape[-2]
    prompt_len = prompt_k.shape[1]
    if cu_seqlens_q is None:
        qh = _heads_first(q)
        out = _token_part(qh, _heads_first(k), _heads_first(v), causal=causal, scale=softmax_scale,
                          leftpad_k=leftpad_k)
        if prompt_len:
            gamma = gamma.view(-1, gamma.shape[-1], 1, 1)  # (rows or 1, nheads or 1, 1, 1)
            out = _gated_sum(out, gamma, _prompt_part(qh, prompt_k, prompt_v, softmax_scale))
        return (out if out.dtype == q.dtype else out.to(q.dtype)).transpose(1, 2).contiguous()

    # packed: (total, nheads, headdim) seen as one row of the batch, heads first
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    spans = [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]
    qh, kh, vh = (_heads_first(t.unsqueeze(0)) for t in (q, k, v))  # (1, nheads, total, headdim)
    parts = [_token_part(qh[:, :, q0:q1], kh[:, :, k0:k1], vh[:, :, k0:k1], causal=causal, scale=softmax_scale,
                         leftpad_k=None) for q0, q1, k0, k1 in spans if q1 > q0]
    out = torch.cat(parts, dim=2) if parts else torch.zeros_like(qh)
    if prompt_len:
        if prompt_k.shape[0] == 1:
            prompt = _prompt_part(qh, prompt_k, prompt_v, softmax_scale)
        else:
            prompt = torch.cat([_prompt_part(qh[:, :, q0:q1], prompt_k[s:s + 1], prompt_v[s:s + 1], softmax_scale)
                                for s, (q0, q1, _, _) in enumerate(spans)], dim=2)
        if gamma.dim() == 2:  # one row per sequence: repeated over its queries, (1, nheads, total, 1)
            lens = torch.tensor([q1 - q0 for q0, q1, _, _ in spans], device=q.device)
            gamma = gamma.expand(len(spans), nheads).repeat_interleave(lens, dim=0).t()[None, :, :, None]
        else:
            gamma = gamma.view(1, -1, 1, 1)
        out = _gated_sum(out, gamma, prompt)
    return out.to(q.dtype)[0].transpose(0, 1).contiguous()
