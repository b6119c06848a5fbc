"""Zero-init attention (LLaMA-Adapter, arXiv 2303.16199) as one fused Triton op, forward and backward.

For query i of head h in row b (a batch row, or a packed sequence), with s the softmax scale, gamma_bh = act(gate)
of row b and head h (a 1-D gate: the same for every row) and the token keys j that i may see (causal, bottom-right
aligned):

    out_i = softmax_j(s q_i.k_j) V  +  gamma_bh * softmax_p(s q_i.pk_p) PV

Two separate softmaxes, so with gate = 0 the op is exactly causal attention; their sum equals the paper's
concatenated form. Forward: one program per (query block, batch, head): the prompt's statistics, the token keys'
online softmax, then the prompt values added straight into the normalised output; lse_w, lse_p (base 2) and, for a
backward, the token part O_w (fp32) are kept. Backward: preprocess (Delta_w, Delta_p), dK/dV per key block, dQ with
the prompt's per-block partials, then their sum in a fixed order: deterministic (deterministic=False: dq with
atomics in the dK/dV pass). Nothing of size seqlen x seqlen; one-dimensional grids (up to 2**31 - 1 programs).
This file: the kernels, the host launchers, the torch.library ops, the checks and the public op (block sizes:
kernels/block_sizes.py). Backends: compiled on CUDA tensors; the same kernels under TRITON_INTERPRET=1 (CI, on a
CPU, 16-bit inputs in fp32 with the GPU's roundings); two SDPA calls (kernels/sdpa_fallback.py) otherwise.
Limits: head dims multiples of 8 from 16 to 128; fp32 uses IEEE dots, not TF32; cu_seqlens / leftpad_k values are
checked on CPU tensors outside torch.compile only (elsewhere the kernels clamp every offset: a sequence out of range,
and a packed row no sequence covers, gets NaN in the output and in dq).
The backward's math, the memory kept and the scratch: docs/op.md.
"""

from __future__ import annotations

import math

import torch

from llama_adapter_triton.kernels import block_sizes
from llama_adapter_triton.kernels.block_sizes import INTERPRET  # read once, at import, as triton.jit does
from llama_adapter_triton.kernels.checks import check_int
from llama_adapter_triton.kernels.sdpa_fallback import zero_init_attention_sdpa

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no Triton wheel on this platform: the SDPA fallback serves
    HAS_TRITON = False

# float64 is for verification (gradcheck): the kernels then accumulate in float64 too
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEADDIM = 128
LOG2E = 1.4426950408889634
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on a grid's x axis (the kernels' grids are one-dimensional)
# The kernels' int arguments that change from step to step: token counts, the longest sequence, the KV cache's length,
# and the lse / Delta strides (lengths too). Triton would otherwise compile a variant for each "equal to 1 / divisible
# by 16 or not" of each: a new compile on most packed fine-tuning steps and decode steps. Still specialised, for the
# vectorised loads: the head dim (a constexpr) and the tensors' strides, set by the model's widths (nheads * headdim,
# headdim, 1; a dense batch stride, seqlen * nheads * headdim, divides by 16 whenever the width does, as every
# LLaMA's does), lse's unit stride along the rows, and nheads, groups. A kernel ignores the names it does not take.
RUNTIME_LENGTHS = ("stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "total_q", "total_k", "prompt_len", "num_parts",
                   "num_seqs", "num_m")

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _seq_bounds(CU_Q, CU_K, LEFTPAD, off_b, seqlen_q, seqlen_k, total_q, total_k, VARLEN: tl.constexpr,
                    HAS_LEFTPAD: tl.constexpr):
        """(first row of this sequence in q, in k; seqlen_q; seqlen_k; ok) for dense or packed inputs.

        Packed: the offsets come from CU_Q / CU_K, and seqlen_q / seqlen_k hold max_seqlen_q / max_seqlen_k.
        Left padding (LEFTPAD[b] pad keys first, dense only) moves the keys' start past the pad: the bottom-right
        causal alignment is unchanged, and queries before the first key (pad queries) see no key at all.
        These values are not checked on the host for CUDA tensors, so every one is clamped here: no value can
        make a kernel read or write outside its tensors. ok is False when this sequence's own values are out of
        range (the forward then writes NaN)."""
        if VARLEN:
            q0 = tl.load(CU_Q + off_b).to(tl.int64)
            q1 = tl.load(CU_Q + off_b + 1).to(tl.int64)
            k0 = tl.load(CU_K + off_b).to(tl.int64)
            k1 = tl.load(CU_K + off_b + 1).to(tl.int64)
            ok = ((q0 >= 0) & (q1 >= q0) & (q1 <= total_q) & (q1 - q0 <= seqlen_q)
                  & (k0 >= 0) & (k1 >= k0) & (k1 <= total_k) & (k1 - k0 <= seqlen_k))
            q_start = tl.minimum(tl.maximum(q0, 0), total_q)
            k_start = tl.minimum(tl.maximum(k0, 0), total_k)
            seqlen_q = tl.minimum(tl.maximum(q1 - q_start, 0), tl.minimum(total_q - q_start, seqlen_q)).to(tl.int32)
            seqlen_k = tl.minimum(tl.maximum(k1 - k_start, 0), tl.minimum(total_k - k_start, seqlen_k)).to(tl.int32)
        else:
            q_start = tl.zeros((), dtype=tl.int64)
            k_start = tl.zeros((), dtype=tl.int64)
            if HAS_LEFTPAD:
                pad = tl.load(LEFTPAD + off_b)
                ok = (pad >= 0) & (pad <= seqlen_k)
                pad = tl.minimum(tl.maximum(pad, 0), seqlen_k)
                k_start += pad.to(tl.int64)
                seqlen_k = seqlen_k - pad
            else:
                ok = True
        return q_start, k_start, seqlen_q, seqlen_k, ok

    @triton.jit
    def _program(CU_Q, CU_K, LEFTPAD, nheads, groups, seqlen_q, seqlen_k, total_q, total_k, BLOCK: tl.constexpr,
                 KEY_BLOCKS: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFTPAD: tl.constexpr):
        """Where this program works: (pid_blk, num_blk, b64, h64, hk64, q_start, k_start, seqlen_q, seqlen_k, ok).

        The grid is one axis of (block, batch, head), the blocks of one (batch, head) neighbours: num_blk blocks
        of BLOCK query rows (of BLOCK keys when KEY_BLOCKS: then nheads counts kv heads and groups is 1), counted
        over seqlen_q / seqlen_k as passed (the longest sequence when packed). b64, h64, hk64: the batch, the
        head and the kv head it reads (GQA / MQA), in int64 for the pointer offsets; then _seq_bounds' values.
        The kernel returns at once when pid_blk * BLOCK is past its own sequence's length."""
        pid = tl.program_id(0)
        if KEY_BLOCKS:
            num_blk = tl.cdiv(seqlen_k, BLOCK)
        else:
            num_blk = tl.cdiv(seqlen_q, BLOCK)
        pid_blk = pid % num_blk
        off_bh = pid // num_blk
        off_b = off_bh // nheads
        off_h = off_bh % nheads
        off_hk = off_h // groups
        q_start, k_start, seqlen_q, seqlen_k, ok = _seq_bounds(CU_Q, CU_K, LEFTPAD, off_b, seqlen_q, seqlen_k,
                                                               total_q, total_k, VARLEN, HAS_LEFTPAD)
        return (pid_blk, num_blk, off_b.to(tl.int64), off_h.to(tl.int64), off_hk.to(tl.int64), q_start, k_start,
                seqlen_q, seqlen_k, ok)

    @triton.jit
    def _load_tile(base, rows, stride_row, offs_d, stride_d, row_limit, HEAD_DIM: tl.constexpr,
                   UPCAST: tl.constexpr, ACC: tl.constexpr):
        """A (rows, HEAD_DIM_PAD) tile; rows >= row_limit and padded columns read as 0."""
        mask = (rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        if UPCAST:  # the interpreter computes bf16/fp16 wrongly: work in fp32 there
            x = x.to(ACC)
        return x

    @triton.jit
    def _round_to_bf16(x):
        """x (fp32) rounded to the nearest bf16 value, ties to even, as the GPU's conversion does (the
        interpreter's truncates), and kept in fp32, where it is exact. NaN stays NaN."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)

    @triton.jit
    def _cast_out(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """x cast to DTYPE, rounded to nearest even."""
        if UPCAST and DTYPE == tl.bfloat16:
            x = _round_to_bf16(x)  # the interpreter's own conversion then only drops zero bits
        return x.to(DTYPE)

    @triton.jit
    def _operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
        """x (fp32) as an operand of a matrix product with tiles of the input dtype DTYPE: rounded to DTYPE (to
        nearest even), as the GPU does before its tensor-core products. Under the interpreter the rounded value
        stays in fp32 (its own bf16 arithmetic is wrong), so the CPU sees the GPU's rounding."""
        if UPCAST:
            if DTYPE == tl.bfloat16:
                return _round_to_bf16(x)
            return x.to(DTYPE).to(tl.float32)
        return x.to(DTYPE)

    @triton.jit
    def _token_fwd_block(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                         start_n, offs_m, offs_d, seqlen_k, diag, qk_scale,
                         BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, BLIND_ROWS: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
        """One step of the token online softmax over keys [start_n, start_n + BLOCK_N). BLIND_ROWS: some rows
        may have seen no key yet (left padding), whose max is still -inf: they must add 0, not NaN."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, offs_n, stride_kn, offs_d, stride_kd, seqlen_k, HEAD_DIM, UPCAST, ACC)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale  # log2 units
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if IS_CAUSAL:  # query i sees key j <= i + seqlen_k - seqlen_q
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
        if BLIND_ROWS:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)  # rescales what was accumulated under the old max
        p = tl.math.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_base, offs_n, stride_vn, offs_d, stride_vd, seqlen_k, HEAD_DIM, UPCAST, ACC)
        acc = tl.dot(_operand(p, DTYPE, UPCAST), v, acc * alpha[:, None], input_precision=DOT_PRECISION,
                     out_dtype=ACC)
        return acc, l_i, m_new

    @triton.jit
    def _prompt_scores(q, PK_base, stride_pkn, stride_pkd, start_p, offs_d, prompt_len, qk_scale,
                       BLOCK_P: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
        """Scaled scores (log2 units) of the q block against prompt keys [start_p, start_p + BLOCK_P)."""
        offs_p = start_p + tl.arange(0, BLOCK_P)
        pk = _load_tile(PK_base, offs_p, stride_pkn, offs_d, stride_pkd, prompt_len, HEAD_DIM, UPCAST, ACC)
        t = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale
        return tl.where(offs_p[None, :] < prompt_len, t, float("-inf")), pk, offs_p

    @triton.jit(do_not_specialize=RUNTIME_LENGTHS)
    def _zia_fwd_kernel(
        Q, K, V, PK, PV, GAMMA, OUT, O_W, LSE_W, LSE_P, CU_Q, CU_K, LEFTPAD,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_pkb, stride_pkn, stride_pkh, stride_pkd,
        stride_pvb, stride_pvn, stride_pvh, stride_pvd,
        stride_ob, stride_om, stride_oh, stride_od,
        stride_wb, stride_wm, stride_wh, stride_wd,
        stride_lb, stride_lh, stride_lm,
        nheads, groups, seqlen_q, seqlen_k, total_q, total_k, prompt_len, qk_scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_PROMPT: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
        SAVE_O_W: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):
        DTYPE: tl.constexpr = Q.dtype.element_ty
        pid_m, _num_m, b64, h64, hk64, q_start, k_start, seqlen_q, seqlen_k, ok = _program(
            CU_Q, CU_K, LEFTPAD, nheads, groups, seqlen_q, seqlen_k, total_q, total_k, BLOCK_M, False, VARLEN,
            HAS_LEFTPAD)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen_q:  # packed sequences shorter than the longest one
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)

        # load q: it stays in SRAM for both parts
        Q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        q = _load_tile(Q_base, offs_m, stride_qm, offs_d, stride_qd, seqlen_q, HEAD_DIM, UPCAST, ACC)

        # prompt statistics first: row max m_p and sum l_p of exp2 over the prompt keys
        if HAS_PROMPT:
            PK_base = PK + b64 * stride_pkb + hk64 * stride_pkh
            m_p = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
            l_p = tl.zeros([BLOCK_M], dtype=ACC)
            for start_p in range(0, prompt_len, BLOCK_P):
                t, _pk, _offs_p = _prompt_scores(q, PK_base, stride_pkn, stride_pkd, start_p, offs_d, prompt_len,
                                                 qk_scale, BLOCK_P, HEAD_DIM, UPCAST, DOT_PRECISION, ACC)
                m_new = tl.maximum(m_p, tl.max(t, 1))
                l_p = l_p * tl.math.exp2(m_p - m_new) + tl.sum(tl.math.exp2(t - m_new[:, None]), 1)
                m_p = m_new
            lse_p = m_p + tl.math.log2(l_p)

        # token keys: online softmax. Blocks wholly visible to every row of this q block need no
        # mask; the blocks crossing the causal diagonal or the end of the keys do.
        K_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
        V_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
        diag = seqlen_k - seqlen_q  # bottom-right alignment: row i sees keys j <= i + diag (< 0: left padding)
        if IS_CAUSAL:
            full_hi = (tl.maximum(tl.minimum(start_m + diag + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
            hi = tl.minimum(start_m + BLOCK_M + diag, seqlen_k)
        else:
            full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
            hi = seqlen_k
        m_w = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        l_w = tl.zeros([BLOCK_M], dtype=ACC)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC)
        for start_n in range(0, full_hi, BLOCK_N):
            acc, l_w, m_w = _token_fwd_block(acc, l_w, m_w, q, K_base, V_base, stride_kn, stride_kd, stride_vn,
                                             stride_vd, start_n, offs_m, offs_d, seqlen_k, diag, qk_scale,
                                             BLOCK_N, HEAD_DIM, False, IS_CAUSAL, HAS_LEFTPAD, DTYPE, UPCAST,
                                             DOT_PRECISION, ACC)
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, l_w, m_w = _token_fwd_block(acc, l_w, m_w, q, K_base, V_base, stride_kn, stride_kd, stride_vn,
                                             stride_vd, start_n, offs_m, offs_d, seqlen_k, diag, qk_scale,
                                             BLOCK_N, HEAD_DIM, True, IS_CAUSAL, HAS_LEFTPAD, DTYPE, UPCAST,
                                             DOT_PRECISION, ACC)
        if HAS_LEFTPAD:
            # a pad query sees no token key: its token part is 0, and lse_w = +inf makes every
            # probability the backward recomputes for it exp2(-inf) = 0
            seen = l_w > 0
            l_w = tl.where(seen, l_w, 1.0)
            lse_w = tl.where(seen, m_w + tl.math.log2(l_w), float("inf"))
        else:
            lse_w = m_w + tl.math.log2(l_w)
        acc = acc / l_w[:, None]
        if VARLEN or HAS_LEFTPAD:  # offsets out of range (unchecked on a GPU): NaN, never a plausible answer
            acc = tl.where(ok, acc, float("nan"))
            lse_w = tl.where(ok, lse_w, float("nan"))
        row_ok = offs_m < seqlen_q
        o_off = offs_m[:, None].to(tl.int64)
        o_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        if SAVE_O_W:  # the token part alone (fp32), for the backward's Delta_w = dout . O_w
            W_base = O_W + b64 * stride_wb + h64 * stride_wh + q_start * stride_wm
            tl.store(W_base + o_off * stride_wm + offs_d[None, :] * stride_wd,
                     _cast_out(acc, O_W.dtype.element_ty, UPCAST), mask=o_mask)

        # prompt values, accumulated straight into the normalised output with weights
        # gamma * softmax_p: with gamma = 0 they add exactly zero
        if HAS_PROMPT:
            gamma = tl.load(GAMMA + b64 * nheads + h64)  # (rows, nheads): this row's (sequence's) gate
            PV_base = PV + b64 * stride_pvb + hk64 * stride_pvh
            for start_p in range(0, prompt_len, BLOCK_P):
                t, _pk, offs_p = _prompt_scores(q, PK_base, stride_pkn, stride_pkd, start_p, offs_d, prompt_len,
                                                qk_scale, BLOCK_P, HEAD_DIM, UPCAST, DOT_PRECISION, ACC)
                a = tl.math.exp2(t - lse_p[:, None]) * gamma
                pv = _load_tile(PV_base, offs_p, stride_pvn, offs_d, stride_pvd, prompt_len, HEAD_DIM, UPCAST, ACC)
                acc = tl.dot(_operand(a, DTYPE, UPCAST), pv, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

        L_off = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m) * stride_lm
        tl.store(LSE_W + L_off, lse_w, mask=row_ok)
        if HAS_PROMPT:
            tl.store(LSE_P + L_off, lse_p, mask=row_ok)
        O_base = OUT + b64 * stride_ob + h64 * stride_oh + q_start * stride_om
        tl.store(O_base + o_off * stride_om + offs_d[None, :] * stride_od, _cast_out(acc, OUT.dtype.element_ty, UPCAST),
                 mask=o_mask)

    @triton.jit(do_not_specialize=RUNTIME_LENGTHS)
    def _zia_bwd_preprocess_kernel(
        Q, PK, PV, O_W, DOUT, LSE_P, DELTA_W, DELTA_P, CU_Q, CU_K,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_pkb, stride_pkn, stride_pkh, stride_pkd,
        stride_pvb, stride_pvn, stride_pvh, stride_pvd,
        stride_wb, stride_wm, stride_wh, stride_wd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_lb, stride_lh, stride_lm,
        nheads, groups, seqlen_q, seqlen_k, total_q, total_k, prompt_len, qk_scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
        HAS_PROMPT: tl.constexpr, VARLEN: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):
        """Delta_w = dout . O_w (the forward's token part, saved apart in fp32: not out - gamma O_p, whose 16-bit
        rounding error, proportional to the prompt part, would swamp it) and Delta_p = dout . O_p =
        rowsum(A * (dout PV^T)) (A from lse_p, kept in fp32)."""
        pid_m, _num_m, b64, h64, hk64, q_start, _k_start, seqlen_q, _seqlen_k, _ok = _program(
            CU_Q, CU_K, CU_K, nheads, groups, seqlen_q, seqlen_k, total_q, total_k, BLOCK_M, False, VARLEN, False)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen_q:
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        o = _load_tile(O_W + b64 * stride_wb + h64 * stride_wh + q_start * stride_wm, offs_m, stride_wm, offs_d,
                       stride_wd, seqlen_q, HEAD_DIM, True, ACC)
        do = _load_tile(DOUT + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom, offs_m, stride_dom, offs_d,
                        stride_dod, seqlen_q, HEAD_DIM, UPCAST, ACC)
        delta_w = tl.sum(o * do.to(ACC), 1)
        row_ok = offs_m < seqlen_q
        L_off = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m) * stride_lm
        if HAS_PROMPT:
            q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm, offs_m, stride_qm, offs_d,
                           stride_qd, seqlen_q, HEAD_DIM, UPCAST, ACC)
            lse_p = tl.load(LSE_P + L_off, mask=row_ok, other=0.0)
            PK_base = PK + b64 * stride_pkb + hk64 * stride_pkh
            PV_base = PV + b64 * stride_pvb + hk64 * stride_pvh
            delta_p = tl.zeros([BLOCK_M], dtype=ACC)
            for start_p in range(0, prompt_len, BLOCK_P):
                t, _pk, offs_p = _prompt_scores(q, PK_base, stride_pkn, stride_pkd, start_p, offs_d, prompt_len,
                                                qk_scale, BLOCK_P, HEAD_DIM, UPCAST, DOT_PRECISION, ACC)
                a = tl.math.exp2(t - lse_p[:, None])
                pv = _load_tile(PV_base, offs_p, stride_pvn, offs_d, stride_pvd, prompt_len, HEAD_DIM, UPCAST, ACC)
                dp = tl.dot(do, tl.trans(pv), input_precision=DOT_PRECISION, out_dtype=ACC)  # exact products
                delta_p += tl.sum(a * dp, 1)
            tl.store(DELTA_P + L_off, delta_p, mask=row_ok)
        tl.store(DELTA_W + L_off, delta_w, mask=row_ok)

    @triton.jit
    def _dkdv_block(dk, dv, k, v, Q_base, DO_base, DQA_base, LSE_base, DELTA_base, stride_qm, stride_qd, stride_dom,
                    stride_dod, stride_dqam, stride_dqad, stride_lm, start_m, offs_n, offs_d, seqlen_q, diag, qk_scale,
                    sm_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    ATOMIC_DQ: tl.constexpr, TRANSPOSED_DQ: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
        """Contribution of query rows [start_m, start_m + BLOCK_M) to dk, dv of one key block (transposed); with
        ATOMIC_DQ also their dq from this key block, added to the fp32 dq with atomics, as the product dq^T = K^T dS^T
        (TRANSPOSED_DQ: M = head dim, a warpgroup MMA on sm_90) or dS K (M = BLOCK_M: mma.sync)."""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        q = _load_tile(Q_base, offs_m, stride_qm, offs_d, stride_qd, seqlen_q, HEAD_DIM, UPCAST, ACC)
        do = _load_tile(DO_base, offs_m, stride_dom, offs_d, stride_dod, seqlen_q, HEAD_DIM, UPCAST, ACC)
        # rows past the end read q = dout = 0 and lse = Delta = 0: they add exactly nothing
        lse = tl.load(LSE_base + offs_m * stride_lm, mask=row_ok, other=0.0)
        delta = tl.load(DELTA_base + offs_m * stride_lm, mask=row_ok, other=0.0)
        kq = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale  # (BLOCK_N, BLOCK_M)
        if MASKED:
            kq = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, kq, float("-inf"))
        p_t = tl.math.exp2(kq - lse[None, :])  # P^T from the saved log-sum-exp
        dv = tl.dot(_operand(p_t, DTYPE, UPCAST), do, dv, input_precision=DOT_PRECISION, out_dtype=ACC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC)
        ds_t = _operand(p_t * (dp_t - delta[None, :]), DTYPE, UPCAST)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION, out_dtype=ACC)
        if ATOMIC_DQ:
            if TRANSPOSED_DQ:
                dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION, out_dtype=ACC)  # (HEAD_DIM_PAD, M)
            else:
                dq_t = tl.trans(tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION, out_dtype=ACC))
            dq_ptrs = DQA_base + offs_m[None, :].to(tl.int64) * stride_dqam + offs_d[:, None] * stride_dqad
            tl.atomic_add(dq_ptrs, dq_t * sm_scale, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), sem="relaxed")
        return dk, dv

    @triton.jit(do_not_specialize=RUNTIME_LENGTHS)
    def _zia_bwd_dkdv_kernel(
        Q, K, V, DOUT, DK, DV, DQ_ACC, LSE_W, DELTA_W, CU_Q, CU_K, LEFTPAD,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_dkb, stride_dkn, stride_dkh, stride_dkd,
        stride_dvb, stride_dvn, stride_dvh, stride_dvd,
        stride_dqab, stride_dqam, stride_dqah, stride_dqad,
        stride_lb, stride_lh, stride_lm,
        nheads_kv, groups, seqlen_q, seqlen_k, total_q, total_k, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFTPAD: tl.constexpr, ATOMIC_DQ: tl.constexpr,
        TRANSPOSED_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):
        DTYPE: tl.constexpr = Q.dtype.element_ty
        # one program per key block of a kv head. With left padding the pad keys are never visited: their
        # gradients stay the zeros DK / DV start as
        pid_n, _num_n, b64, hk64, _hk64, q_start, k_start, seqlen_q, seqlen_k, _ok = _program(
            CU_Q, CU_K, LEFTPAD, nheads_kv, 1, seqlen_q, seqlen_k, total_q, total_k, BLOCK_N, True, VARLEN,
            HAS_LEFTPAD)
        start_n = pid_n * BLOCK_N
        if start_n >= seqlen_k:
            return
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        # k and v of this block stay in SRAM while every query that sees them streams past
        k = _load_tile(K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn, offs_n, stride_kn, offs_d,
                       stride_kd, seqlen_k, HEAD_DIM, UPCAST, ACC)
        v = _load_tile(V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn, offs_n, stride_vn, offs_d,
                       stride_vd, seqlen_k, HEAD_DIM, UPCAST, ACC)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC)
        diag = seqlen_k - seqlen_q
        if IS_CAUSAL:
            # rows i >= start_n - diag see some key of the block; rows i >= start_n + BLOCK_N - 1 - diag see all
            lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, seqlen_q)
        else:
            lo = 0
            full_lo = 0
        # the query heads of this kv group, each summed in a fixed order
        for g in range(0, groups):
            h64 = hk64 * groups + g
            Q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
            DO_base = DOUT + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
            DQA_base = DQ_ACC + b64 * stride_dqab + h64 * stride_dqah + q_start * stride_dqam
            L_off = b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
            for start_m in range(lo, full_lo, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, Q_base, DO_base, DQA_base, LSE_W + L_off, DELTA_W + L_off,
                                     stride_qm, stride_qd, stride_dom, stride_dod, stride_dqam, stride_dqad, stride_lm,
                                     start_m, offs_n, offs_d, seqlen_q, diag, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                     True, ATOMIC_DQ, TRANSPOSED_DQ, DTYPE, UPCAST, DOT_PRECISION, ACC)
            for start_m in range(full_lo, seqlen_q, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, Q_base, DO_base, DQA_base, LSE_W + L_off, DELTA_W + L_off,
                                     stride_qm, stride_qd, stride_dom, stride_dod, stride_dqam, stride_dqad, stride_lm,
                                     start_m, offs_n, offs_d, seqlen_q, diag, qk_scale, sm_scale, BLOCK_M, HEAD_DIM,
                                     False, ATOMIC_DQ, TRANSPOSED_DQ, DTYPE, UPCAST, DOT_PRECISION, ACC)
        mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        rows = (k_start + offs_n)[:, None]
        tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + rows * stride_dkn + offs_d[None, :] * stride_dkd,
                 _cast_out(dk * sm_scale, DK.dtype.element_ty, UPCAST), mask=mask)
        tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + rows * stride_dvn + offs_d[None, :] * stride_dvd,
                 _cast_out(dv, DV.dtype.element_ty, UPCAST), mask=mask)

    @triton.jit
    def _dq_block(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, offs_m,
                  offs_d, seqlen_k, diag, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
        """Contribution of token keys [start_n, start_n + BLOCK_N) to dq (unscaled)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base, offs_n, stride_kn, offs_d, stride_kd, seqlen_k, HEAD_DIM, UPCAST, ACC)
        v = _load_tile(V_base, offs_n, stride_vn, offs_d, stride_vd, seqlen_k, HEAD_DIM, UPCAST, ACC)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale
        if MASKED:
            visible = offs_n[None, :] < seqlen_k
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        return tl.dot(_operand(ds, DTYPE, UPCAST), k, dq, input_precision=DOT_PRECISION, out_dtype=ACC)

    @triton.jit(do_not_specialize=RUNTIME_LENGTHS)
    def _zia_bwd_dq_kernel(
        Q, K, V, PK, PV, GAMMA, DOUT, DQ, DQ_ACC, DPK_PART, DPV_PART, BLK_OFF, LSE_W, LSE_P, DELTA_W, DELTA_P,
        CU_Q, CU_K, LEFTPAD,
        stride_qb, stride_qm, stride_qh, stride_qd,
        stride_kb, stride_kn, stride_kh, stride_kd,
        stride_vb, stride_vn, stride_vh, stride_vd,
        stride_pkb, stride_pkn, stride_pkh, stride_pkd,
        stride_pvb, stride_pvn, stride_pvh, stride_pvd,
        stride_dob, stride_dom, stride_doh, stride_dod,
        stride_dqb, stride_dqm, stride_dqh, stride_dqd,
        stride_dqab, stride_dqam, stride_dqah, stride_dqad,
        stride_lb, stride_lh, stride_lm,
        nheads, groups, seqlen_q, seqlen_k, total_q, total_k, prompt_len, num_parts, qk_scale, sm_scale,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_PROMPT: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
        COMPUTE_DQ: tl.constexpr, ATOMIC_DQ: tl.constexpr, COMPUTE_DPROMPT: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    ):
        DTYPE: tl.constexpr = Q.dtype.element_ty
        pid_m, num_m, b64, h64, hk64, q_start, k_start, seqlen_q, seqlen_k, _ok = _program(
            CU_Q, CU_K, LEFTPAD, nheads, groups, seqlen_q, seqlen_k, total_q, total_k, BLOCK_M, False, VARLEN,
            HAS_LEFTPAD)
        start_m = pid_m * BLOCK_M
        if start_m >= seqlen_q:
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        row_ok = offs_m < seqlen_q
        q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm, offs_m, stride_qm, offs_d,
                       stride_qd, seqlen_q, HEAD_DIM, UPCAST, ACC)
        do = _load_tile(DOUT + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom, offs_m, stride_dom, offs_d,
                        stride_dod, seqlen_q, HEAD_DIM, UPCAST, ACC)
        L_off = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m) * stride_lm
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC)

        # token part: flash-style, with Delta_w in place of the usual rowsum(dout * out) (with ATOMIC_DQ the
        # dK/dV pass has added it to DQ_ACC already)
        if COMPUTE_DQ and not ATOMIC_DQ:
            lse = tl.load(LSE_W + L_off, mask=row_ok, other=0.0)
            delta = tl.load(DELTA_W + L_off, mask=row_ok, other=0.0)
            K_base = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
            V_base = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
            diag = seqlen_k - seqlen_q
            if IS_CAUSAL:  # pad queries (left padding) have lse_w = +inf: they add exactly 0
                full_hi = (tl.maximum(tl.minimum(start_m + diag + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
                hi = tl.minimum(start_m + BLOCK_M + diag, seqlen_k)
            else:
                full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
                hi = seqlen_k
            for start_n in range(0, full_hi, BLOCK_N):
                dq = _dq_block(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               start_n, offs_m, offs_d, seqlen_k, diag, qk_scale, BLOCK_N, HEAD_DIM, False, IS_CAUSAL,
                               DTYPE, UPCAST, DOT_PRECISION, ACC)
            for start_n in range(full_hi, hi, BLOCK_N):
                dq = _dq_block(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               start_n, offs_m, offs_d, seqlen_k, diag, qk_scale, BLOCK_N, HEAD_DIM, True, IS_CAUSAL,
                               DTYPE, UPCAST, DOT_PRECISION, ACC)

        # prompt part: dT = gamma * A * (dout PV^T - Delta_p), A recomputed from lse_p
        if HAS_PROMPT:
            gamma = tl.load(GAMMA + b64 * nheads + h64)  # (rows, nheads): this row's (sequence's) gate
            lse_p = tl.load(LSE_P + L_off, mask=row_ok, other=0.0)
            delta_p = tl.load(DELTA_P + L_off, mask=row_ok, other=0.0)
            PK_base = PK + b64 * stride_pkb + hk64 * stride_pkh
            PV_base = PV + b64 * stride_pvb + hk64 * stride_pvh
            # this block's partial prompt gradients: DPK_PART[h, j, p, d], contiguous, j this block's index among
            # the query blocks present (packed: BLK_OFF[b] + pid_m; never past num_parts, whatever CU_Q holds)
            if VARLEN:
                part_j = tl.load(BLK_OFF + b64) + pid_m
            else:
                part_j = b64 * num_m + pid_m
            part_off = (h64 * num_parts + part_j) * prompt_len * HEAD_DIM
            for start_p in range(0, prompt_len, BLOCK_P):
                t, pk, offs_p = _prompt_scores(q, PK_base, stride_pkn, stride_pkd, start_p, offs_d, prompt_len,
                                               qk_scale, BLOCK_P, HEAD_DIM, UPCAST, DOT_PRECISION, ACC)
                a = tl.math.exp2(t - lse_p[:, None]) * gamma  # gamma * A, zero on padded prompt columns
                pv = _load_tile(PV_base, offs_p, stride_pvn, offs_d, stride_pvd, prompt_len, HEAD_DIM, UPCAST, ACC)
                dt = _operand(a * (tl.dot(do, tl.trans(pv), input_precision=DOT_PRECISION, out_dtype=ACC)
                                   - delta_p[:, None]), DTYPE, UPCAST)
                if COMPUTE_DQ:
                    dq = tl.dot(dt, pk, dq, input_precision=DOT_PRECISION, out_dtype=ACC)
                if COMPUTE_DPROMPT:
                    dpk = tl.dot(tl.trans(dt), q, input_precision=DOT_PRECISION, out_dtype=ACC) * sm_scale
                    dpv = tl.dot(tl.trans(_operand(a, DTYPE, UPCAST)), do, input_precision=DOT_PRECISION,
                                 out_dtype=ACC)
                    p_ptrs = part_off + offs_p[:, None] * HEAD_DIM + offs_d[None, :]
                    p_mask = (offs_p[:, None] < prompt_len) & (offs_d[None, :] < HEAD_DIM) & (part_j < num_parts)
                    tl.store(DPK_PART + p_ptrs, dpk, mask=p_mask)
                    tl.store(DPV_PART + p_ptrs, dpv, mask=p_mask)

        if COMPUTE_DQ:
            dq = dq * sm_scale
            d_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
            if ATOMIC_DQ:  # the token part, summed by the dK/dV pass (already scaled)
                dqa_ptrs = (DQ_ACC + b64 * stride_dqab + h64 * stride_dqah + (q_start + offs_m)[:, None] * stride_dqam
                            + offs_d[None, :] * stride_dqad)
                dq += tl.load(dqa_ptrs, mask=d_ok, other=0.0)
            dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh + (q_start + offs_m)[:, None] * stride_dqm
                       + offs_d[None, :] * stride_dqd)
            tl.store(dq_ptrs, _cast_out(dq, DQ.dtype.element_ty, UPCAST), mask=d_ok)

    @triton.jit(do_not_specialize=RUNTIME_LENGTHS)
    def _zia_prompt_grad_kernel(
        DPK_PART, DPV_PART, DPK, DPV, BLK_OFF,
        stride_pkb, stride_pkn, stride_pkh, stride_pkd,
        stride_pvb, stride_pvn, stride_pvh, stride_pvd,
        num_seqs, num_m, num_parts, nheads_kv, groups, prompt_len,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SHARED: tl.constexpr, VARLEN: tl.constexpr,
        UPCAST: tl.constexpr, ACC: tl.constexpr,
    ):
        """d prompt_k, d prompt_v: the dQ pass's per-block partials summed, one program per (prompt, kv head,
        BLOCK elements of its prompt_len x HEAD_DIM), in a fixed order: the sequences that read the prompt (all of
        them when it is SHARED), the query heads of the kv group, the query blocks of the sequence. No atomics:
        the same inputs give the same bits."""
        pid = tl.program_id(0)
        size = prompt_len * HEAD_DIM
        num_c = tl.cdiv(size, BLOCK)
        c = pid % num_c
        off_hk = (pid // num_c) % nheads_kv
        off_pb = pid // (num_c * nheads_kv)  # which prompt: 0 when SHARED
        offs = c * BLOCK + tl.arange(0, BLOCK)
        mask = offs < size
        acc_k = tl.zeros([BLOCK], dtype=ACC)
        acc_v = tl.zeros([BLOCK], dtype=ACC)
        if SHARED:
            s_lo = 0
            s_hi = num_seqs
        else:
            s_lo = off_pb
            s_hi = off_pb + 1
        for s in range(s_lo, s_hi):
            if VARLEN:
                j_lo = tl.load(BLK_OFF + s)
                j_hi = tl.minimum(tl.load(BLK_OFF + s + 1), num_parts)
            else:
                j_lo = s * num_m  # < num_parts: int32 is enough
                j_hi = j_lo + num_m
            for g in range(0, groups):
                head_base = (off_hk * groups + g).to(tl.int64) * num_parts
                for j in range(j_lo, j_hi):
                    ptrs = (head_base + j) * size + offs
                    acc_k += tl.load(DPK_PART + ptrs, mask=mask, other=0.0)
                    acc_v += tl.load(DPV_PART + ptrs, mask=mask, other=0.0)
        p = (offs // HEAD_DIM).to(tl.int64)
        d = offs % HEAD_DIM
        pb64 = off_pb.to(tl.int64)
        hk64 = off_hk.to(tl.int64)
        tl.store(DPK + pb64 * stride_pkb + p * stride_pkn + hk64 * stride_pkh + d * stride_pkd,
                 _cast_out(acc_k, DPK.dtype.element_ty, UPCAST), mask=mask)
        tl.store(DPV + pb64 * stride_pvb + p * stride_pvn + hk64 * stride_pvh + d * stride_pvd,
                 _cast_out(acc_v, DPV.dtype.element_ty, UPCAST), mask=mask)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """(batch, seq, head, dim) strides; a packed (total, head, dim) tensor has batch stride 0."""
    return (0, *x.stride()) if varlen else x.stride()


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """lse / Delta strides (batch, head, row); packed sequences share one (1, nheads, total_q) row."""
    return (0, *lse.stride()[1:]) if varlen else lse.stride()


def _prompt_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Prompt strides, batch stride 0 when one prompt is shared by the whole batch (no copy)."""
    return (0 if x.shape[0] == 1 else x.stride(0), *x.stride()[1:])


def launch_grid(blocks: int, rows: int, what: str) -> tuple[int]:
    """The one-dimensional grid of a kernel that runs `blocks` programs for each of `rows` (batch x heads):
    (blocks * rows,), within CUDA's limit on the x axis (2**31 - 1); ValueError naming the sizes past it."""
    programs = blocks * rows
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{what} would launch {programs:,} programs ({blocks:,} blocks x {rows:,} batch x heads), "
                         f"past CUDA's grid limit of {MAX_PROGRAMS:,}: split the batch")
    return (programs,)


def _geometry(q, k, prompt_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        nheads, headdim = q.shape[1], q.shape[2]
        nheads_kv = k.shape[1]
    else:
        batch, seqlen_q, nheads, headdim = q.shape
        seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    return varlen, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, prompt_k.shape[1]


def _totals(q, k, varlen) -> tuple[int, int]:
    """Rows of packed q and k (what the kernels clamp the offsets to); unused for dense inputs."""
    return (q.shape[0], k.shape[0]) if varlen else (0, 0)


def _lse_shape(q, varlen, batch, nheads, seqlen_q):
    # (batch, nheads, seqlen_q); packed: (1, nheads, total_q)
    return (1, nheads, q.shape[0]) if varlen else (batch, nheads, seqlen_q)


def _fwd(q, k, v, prompt_k, prompt_v, gamma, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
         max_seqlen_k, leftpad_k, save_o_w):
    """(out, o_w, lse_w, lse_p); o_w (the token part in fp32, for the backward) is empty unless save_o_w. gamma:
    act(gate) in the accumulator dtype, contiguous (rows, nheads), rows = batch or num_seqs (the kernels read row b,
    head h at gamma + b * nheads + h); the backward's d gamma has its shape."""
    varlen, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, prompt_len = _geometry(
        q, k, prompt_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    # packed: NaN first, so that a row no sequence covers (cu_seqlens_q[-1] < total_q, a sequence longer than
    # max_seqlen_q: offsets nobody checked, on a GPU or under torch.compile) is NaN, never memory no kernel wrote
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device) if varlen else \
        torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o_w = torch.empty(q.shape if save_o_w else (0,), dtype=_acc_dtype(q.dtype), device=q.device)
    lse_shape = _lse_shape(q, varlen, batch, nheads, seqlen_q)
    lse_w = torch.empty(lse_shape, dtype=_acc_dtype(q.dtype), device=q.device)
    lse_p = torch.full(lse_shape, float("-inf"), dtype=_acc_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, o_w, lse_w, lse_p
    head_dim_pad = max(16, triton.next_power_of_2(headdim))
    cfg = block_sizes.choose(q.dtype, head_dim_pad, seqlen_q, prompt_len, block_sizes.shared_memory(q.device))
    block_m, block_n, num_warps, num_stages = cfg["fwd"]
    pk, pv = prompt_k, prompt_v  # (batch or 1, prompt_len, nheads_kv, headdim); unread when prompt_len is 0
    grid = launch_grid(triton.cdiv(seqlen_q, block_m), batch * nheads, "the forward")
    _zia_fwd_kernel[grid](
        q, k, v, pk, pv, gamma, out, o_w if save_o_w else out, lse_w, lse_p, cu_seqlens_q, cu_seqlens_k, leftpad_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
        *_prompt_strides(pk), *_prompt_strides(pv), *_strides(out, varlen),
        *_strides(o_w if save_o_w else out, varlen), *_lse_strides(lse_w, varlen),
        nheads, nheads // nheads_kv, seqlen_q, seqlen_k, *_totals(q, k, varlen), prompt_len, softmax_scale * LOG2E,
        HEAD_DIM=headdim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=cfg["BLOCK_P"],
        IS_CAUSAL=causal, HAS_PROMPT=prompt_len > 0, VARLEN=varlen, HAS_LEFTPAD=leftpad_k is not None,
        SAVE_O_W=save_o_w, **_dtype_flags(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, o_w, lse_w, lse_p


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dtype_flags(dtype: torch.dtype) -> dict:
    """The kernels' dtype switches: accumulator type, dot precision, and the interpreter's upcast."""
    return dict(
        # the interpreter computes bf16 / fp16 wrongly (triton #11584): upcast there, never on the GPU
        UPCAST=INTERPRET and dtype in (torch.float16, torch.bfloat16),
        # fp32 inputs get fp32 accuracy (IEEE dots, not TF32); 16-bit operands are exact in any mode
        DOT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
    )


def prompt_grad_blocks(cu_seqlens_q: torch.Tensor | None, batch: int, seqlen_q: int, total_q: int,
                       block_m: int) -> tuple[int, torch.Tensor | None]:
    """(num_parts, blk_off): the query blocks whose prompt-gradient partials the backward keeps, and, packed,
    the index of each sequence's first one (num_seqs + 1,) int64, computed on the device without a
    synchronisation. Dense: batch x cdiv(seqlen_q, block_m). Packed (seqlen_q = max_seqlen_q): at most
    cdiv(total_q, block_m) + num_seqs, bounded by the tokens whatever the longest sequence."""
    dense = batch * triton.cdiv(seqlen_q, block_m)
    if cu_seqlens_q is None:
        return dense, None
    lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long().clamp(0, seqlen_q)
    blk_off = torch.nn.functional.pad(((lens + block_m - 1) // block_m).cumsum(0), (1, 0))
    return min(dense, triton.cdiv(total_q, block_m) + batch), blk_off


def _bwd(dout, q, k, v, prompt_k, prompt_v, gamma, o_w, lse_w, lse_p, causal, softmax_scale, cu_seqlens_q,
         cu_seqlens_k, max_seqlen_q, max_seqlen_k, leftpad_k, deterministic, need_dq, need_dkv, need_dprompt):
    varlen, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, prompt_len = _geometry(
        q, k, prompt_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    groups = nheads // nheads_kv
    dev, acc = q.device, _acc_dtype(q.dtype)

    def grad(x, needed, alloc=torch.empty_like):
        return alloc(x) if needed else x.new_empty(0)

    if dout.numel() == 0:  # no query: every gradient is zero
        return (grad(q, need_dq), grad(k, need_dkv, torch.zeros_like), grad(v, need_dkv, torch.zeros_like),
                grad(prompt_k, need_dprompt, torch.zeros_like), grad(prompt_v, need_dprompt, torch.zeros_like),
                torch.zeros_like(gamma))
    # every row of dq and of the prompt gradients is written; of dk / dv, all but a left-padded batch's pad keys
    kv_alloc = torch.zeros_like if leftpad_k is not None else torch.empty_like
    # packed: NaN in the rows of dq that no sequence covers, as in the forward's output
    q_alloc = (lambda x: torch.full_like(x, float("nan"))) if varlen else torch.empty_like
    dq, dk, dv = grad(q, need_dq, q_alloc), grad(k, need_dkv, kv_alloc), grad(v, need_dkv, kv_alloc)
    dpk, dpv = grad(prompt_k, need_dprompt), grad(prompt_v, need_dprompt)

    has_prompt = prompt_len > 0
    need_prompt_part = has_prompt and need_dprompt
    atomic_dq = not deterministic and need_dq and need_dkv  # dq rides on the dK/dV pass
    head_dim_pad = max(16, triton.next_power_of_2(headdim))
    cfg = block_sizes.choose(q.dtype, head_dim_pad, seqlen_q, prompt_len, block_sizes.shared_memory(q.device),
                             atomic_dq)
    pk, pv = prompt_k, prompt_v
    qk_scale = softmax_scale * LOG2E
    totals = _totals(q, k, varlen)
    common = dict(HEAD_DIM=headdim, HEAD_DIM_PAD=head_dim_pad, VARLEN=varlen, **_dtype_flags(q.dtype))
    delta_w = torch.empty_like(lse_w)
    delta_p = torch.empty_like(lse_w) if has_prompt else delta_w  # unread without a prompt

    pre_m, num_warps = cfg["pre"]
    _zia_bwd_preprocess_kernel[launch_grid(triton.cdiv(seqlen_q, pre_m), batch * nheads, "the backward")](
        q, pk, pv, o_w, dout, lse_p, delta_w, delta_p, cu_seqlens_q, cu_seqlens_k,
        *_strides(q, varlen), *_prompt_strides(pk), *_prompt_strides(pv), *_strides(o_w, varlen),
        *_strides(dout, varlen), *_lse_strides(lse_w, varlen),
        nheads, groups, seqlen_q, seqlen_k, *totals, prompt_len, qk_scale,
        BLOCK_M=pre_m, BLOCK_P=cfg["BLOCK_P"], HAS_PROMPT=has_prompt, num_warps=num_warps, **common,
    )

    # deterministic=False: the token part of dq, summed with atomics in fp32 (zeros first)
    dq_acc = torch.zeros(q.shape, dtype=acc, device=dev) if atomic_dq else q  # q: a placeholder, never touched
    if need_dkv:
        block_m, block_n, num_warps, num_stages = cfg["dkdv"]
        _zia_bwd_dkdv_kernel[launch_grid(triton.cdiv(seqlen_k, block_n), batch * nheads_kv, "the backward")](
            q, k, v, dout, dk, dv, dq_acc, lse_w, delta_w, cu_seqlens_q, cu_seqlens_k, leftpad_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen), *_strides(dq_acc, varlen), *_lse_strides(lse_w, varlen),
            nheads_kv, groups, seqlen_q, seqlen_k, *totals, qk_scale, softmax_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=causal, HAS_LEFTPAD=leftpad_k is not None,
            ATOMIC_DQ=atomic_dq, TRANSPOSED_DQ=cfg["TRANSPOSED_DQ"], num_warps=num_warps, num_stages=num_stages,
            **common,
        )

    if need_dq or need_prompt_part:
        block_m, block_n, num_warps, num_stages = cfg["dq"]
        num_m = triton.cdiv(seqlen_q, block_m)
        num_parts, blk_off = prompt_grad_blocks(cu_seqlens_q, batch, seqlen_q, q.shape[0], block_m)
        part_shape = (nheads, num_parts, prompt_len, headdim) if need_prompt_part else (0,)
        dpk_part = torch.empty(part_shape, dtype=acc, device=dev)  # every block present writes its own
        dpv_part = torch.empty(part_shape, dtype=acc, device=dev)
        _zia_bwd_dq_kernel[launch_grid(num_m, batch * nheads, "the backward")](
            q, k, v, pk, pv, gamma, dout, dq if need_dq else q, dq_acc, dpk_part, dpv_part, blk_off, lse_w, lse_p,
            delta_w, delta_p, cu_seqlens_q, cu_seqlens_k, leftpad_k,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_prompt_strides(pk), *_prompt_strides(pv), *_strides(dout, varlen),
            *_strides(dq if need_dq else q, varlen), *_strides(dq_acc, varlen), *_lse_strides(lse_w, varlen),
            nheads, groups, seqlen_q, seqlen_k, *totals, prompt_len, num_parts, qk_scale, softmax_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=cfg["BLOCK_P"], IS_CAUSAL=causal, HAS_PROMPT=has_prompt,
            HAS_LEFTPAD=leftpad_k is not None, COMPUTE_DQ=need_dq, ATOMIC_DQ=atomic_dq,
            COMPUTE_DPROMPT=need_prompt_part, num_warps=num_warps, num_stages=num_stages, **common,
        )
        if need_prompt_part:
            size = prompt_len * headdim
            block = block_sizes.reduce_block(size)
            grid = launch_grid(triton.cdiv(size, block), prompt_k.shape[0] * nheads_kv, "the prompt gradients")
            _zia_prompt_grad_kernel[grid](
                dpk_part, dpv_part, dpk, dpv, blk_off, *dpk.stride(), *dpv.stride(),
                batch, num_m, num_parts, nheads_kv, groups, prompt_len,
                HEAD_DIM=headdim, BLOCK=block, SHARED=prompt_k.shape[0] == 1, VARLEN=varlen,
                UPCAST=common["UPCAST"], ACC=common["ACC"],
            )
    dgamma = _dgamma(delta_p, cu_seqlens_q, seqlen_q) if has_prompt else torch.zeros_like(gamma)
    return dq, dk, dv, dpk, dpv, dgamma


def _dgamma(delta_p: torch.Tensor, cu_seqlens_q: torch.Tensor | None, max_seqlen_q: int) -> torch.Tensor:
    """d gamma (rows, nheads): Delta_p summed over the queries of each batch row, or of each packed sequence.

    Packed, Delta_p is one (1, nheads, total_q) row: each packed row gets, on the device (no synchronisation), the
    sequence whose rows the kernels gave it (the offsets clamped as _seq_bounds clamps them), and the rows that no
    sequence covers (left unwritten: NaN or garbage) go to a spare slot, dropped. index_put_ with accumulate sums
    each sequence's rows in a fixed order (on CUDA too, unlike index_add_), in fp64: the same bits every time."""
    if cu_seqlens_q is None:
        return delta_p.sum(dim=2)  # (batch, nheads, seqlen_q) -> (batch, nheads)
    num_seqs, total_q = cu_seqlens_q.shape[0] - 1, delta_p.shape[2]
    cu = cu_seqlens_q.long()
    start = cu[:-1].clamp(0, total_q)
    end = start + torch.minimum((cu[1:] - start).clamp(min=0), (total_q - start).clamp(max=max_seqlen_q))
    rows = torch.arange(total_q, device=delta_p.device)
    seq = torch.searchsorted(end, rows, right=True).clamp(max=num_seqs)  # the first sequence ending past the row
    s = seq.clamp(max=num_seqs - 1)
    seq = torch.where((seq < num_seqs) & (start[s] <= rows) & (rows < end[s]), seq, num_seqs)
    sums = delta_p.new_zeros(num_seqs + 1, delta_p.shape[1], dtype=torch.float64)
    sums.index_put_((seq,), delta_p[0].t().double(), accumulate=True)
    return sums[:num_seqs].to(delta_p.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops: torch.compile sees one node (with a fake implementation) per direction
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("llama_adapter::zero_init_attention_fwd", mutates_args=())
def _zia_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor,
    gamma: torch.Tensor, causal: bool, softmax_scale: float, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, leftpad_k: torch.Tensor | None,
    deterministic: bool, save_o_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # deterministic is the backward's; it is an input here so that autograd's context keeps it
    return _fwd(q, k, v, prompt_k, prompt_v, gamma, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, leftpad_k, save_o_w)


@_zia_fwd_op.register_fake
def _(q, k, v, prompt_k, prompt_v, gamma, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, leftpad_k, deterministic, save_o_w):
    varlen, batch, seqlen_q, _, nheads, *_ = _geometry(q, k, prompt_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    lse_shape = _lse_shape(q, varlen, batch, nheads, seqlen_q)
    acc = _acc_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape if save_o_w else (0,), dtype=acc), q.new_empty(lse_shape, dtype=acc),
            q.new_empty(lse_shape, dtype=acc))


@torch.library.custom_op("llama_adapter::zero_init_attention_bwd", mutates_args=())
def _zia_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
    prompt_v: torch.Tensor, gamma: torch.Tensor, o_w: torch.Tensor, lse_w: torch.Tensor, lse_p: torch.Tensor,
    causal: bool, softmax_scale: float, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, leftpad_k: torch.Tensor | None, deterministic: bool, need_dq: bool,
    need_dkv: bool, need_dprompt: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dout, q, k, v, prompt_k, prompt_v, gamma, o_w, lse_w, lse_p, causal, softmax_scale, cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k, leftpad_k, deterministic, need_dq, need_dkv, need_dprompt)


@_zia_bwd_op.register_fake
def _(dout, q, k, v, prompt_k, prompt_v, gamma, o_w, lse_w, lse_p, causal, softmax_scale, cu_seqlens_q,
      cu_seqlens_k, max_seqlen_q, max_seqlen_k, leftpad_k, deterministic, need_dq, need_dkv, need_dprompt):
    def grad(x, needed):
        return torch.empty_like(x) if needed else x.new_empty(0)

    return (grad(q, need_dq), grad(k, need_dkv), grad(v, need_dkv), grad(prompt_k, need_dprompt),
            grad(prompt_v, need_dprompt), torch.empty_like(gamma))


def _setup_context(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, gamma, causal, softmax_scale, cu_q, cu_k, max_q, max_k, leftpad_k, det, saved = inputs
    _out, o_w, lse_w, lse_p = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, gamma, o_w, lse_w, lse_p, cu_q, cu_k, leftpad_k)
    ctx.args = (causal, softmax_scale, max_q, max_k, det, saved)
    ctx.mark_non_differentiable(o_w, lse_w, lse_p)


def _backward(ctx, dout, _do_w, _dlse_w, _dlse_p):
    q, k, v, prompt_k, prompt_v, gamma, o_w, lse_w, lse_p, cu_q, cu_k, leftpad_k = ctx.saved_tensors
    causal, softmax_scale, max_q, max_k, deterministic, saved = ctx.args
    if not saved:  # the public op asks for o_w whenever an input requires grad
        raise RuntimeError("zero_init_attention's forward ran without keeping what its backward needs")
    need = ctx.needs_input_grad
    dq, dk, dv, dpk, dpv, dgamma = _zia_bwd_op(
        dout, q, k, v, prompt_k, prompt_v, gamma, o_w, lse_w, lse_p, causal, softmax_scale, cu_q, cu_k, max_q, max_k,
        leftpad_k, deterministic, need[0], need[1] or need[2], need[3] or need[4])
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dpk if need[3] else None, dpv if need[4] else None, dgamma if need[5] else None,
            None, None, None, None, None, None, None, None, None)


_zia_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Validation and the public op
# ----------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_inputs(q, k, v, prompt_k, prompt_v, gate, causal, softmax_scale, gate_act, deterministic,
                  varlen) -> None:
    """Raise ValueError/TypeError naming the argument and the shapes it got; nothing is launched."""
    named = {"q": q, "k": k, "v": v, "prompt_k": prompt_k, "prompt_v": prompt_v, "gate": gate}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    seq_dims = 3 if varlen else 4
    layouts = {"q": "(total_q, nheads, headdim)" if varlen else "(batch, seqlen_q, nheads, headdim)",
               "k": "(total_k, nheads_kv, headdim)" if varlen else "(batch, seqlen_k, nheads_kv, headdim)",
               "prompt_k": "(1 or batch, prompt_len, nheads_kv, headdim)"}
    layouts["v"], layouts["prompt_v"] = layouts["k"], layouts["prompt_k"]
    for name in ("q", "k", "v", "prompt_k", "prompt_v"):
        t = named[name]
        want = 4 if name.startswith("prompt") else seq_dims
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D {layouts[name]}, got shape {_shape(t)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64), got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v, prompt_k and prompt_v "
                            "must share one dtype")
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")

    nheads, headdim = q.shape[-2], q.shape[-1]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    if k.shape[-1] != headdim or (not varlen and k.shape[0] != q.shape[0]):
        what = "(total_k, nheads_kv, headdim" if varlen else f"(batch={q.shape[0]}, seqlen_k, nheads_kv, headdim"
        raise ValueError(f"k must be {what}={headdim}) to match q {_shape(q)}, got {_shape(k)}")
    nheads_kv = k.shape[-2]
    if nheads_kv == 0 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads_kv of k ({nheads_kv}); "
                         f"got q {_shape(q)}, k {_shape(k)}")
    if headdim % 8 != 0 or not 16 <= headdim <= MAX_HEADDIM:
        raise ValueError(f"headdim must be a multiple of 8 from 16 to {MAX_HEADDIM} (32, 64, 80, 96, 128, ...), "
                         f"got q {_shape(q)}")
    if not varlen and k.shape[1] == 0 and q.shape[1] > 0:
        raise ValueError(f"k must hold at least one key (seqlen_k >= 1), got k {_shape(k)}")
    if prompt_k.shape != prompt_v.shape:
        raise ValueError(f"prompt_k and prompt_v must have the same shape, got prompt_k {_shape(prompt_k)} "
                         f"and prompt_v {_shape(prompt_v)}")
    if not varlen and prompt_k.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"prompt_k must have batch 1 (shared) or batch {q.shape[0]}, got {_shape(prompt_k)}")
    if prompt_k.shape[2] != nheads_kv or prompt_k.shape[3] != headdim:
        raise ValueError(f"prompt_k must be (1 or batch, prompt_len, nheads_kv={nheads_kv}, headdim={headdim}), "
                         f"got {_shape(prompt_k)}")
    if not (gate.dim() == 1 and gate.shape[0] in (1, nheads)
            or gate.dim() == 2 and gate.shape[1] == nheads and (varlen or gate.shape[0] == q.shape[0])):
        rows = "num_seqs" if varlen else f"batch={q.shape[0]}"
        raise ValueError(f"gate must have shape ({nheads},) (one per head), (1,) (one for all heads) or ({rows}, "
                         f"{nheads}) (one per {'sequence' if varlen else 'batch row'} and head), got {_shape(gate)}")
    for name, flag in (("causal", causal), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    if not varlen and causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal attention needs seqlen_q <= seqlen_k (bottom-right aligned), got q {_shape(q)} "
                         f"and k {_shape(k)}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not 0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    if gate_act not in GATE_ACTS:
        raise ValueError(f"gate_act must be 'tanh' or 'identity', got {gate_act!r}")


def _check_varlen(q, k, prompt_k, gate, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (with cu_seqlens given, both are needed), "
                            f"got {type(cu).__name__}")
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of num_seqs + 1 >= 2 offsets, "
                             f"got {cu.dtype} of shape {_shape(cu)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{_shape(cu_seqlens_q)} and {_shape(cu_seqlens_k)}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        check_int(name, m, 0, what="a non-negative int")
    if prompt_k.shape[0] not in (1, num_seqs):
        raise ValueError(f"prompt_k must have batch 1 (shared) or one prompt per sequence ({num_seqs}), "
                         f"got {_shape(prompt_k)}")
    if gate.dim() == 2 and gate.shape[0] != num_seqs:
        raise ValueError(f"gate must have shape ({gate.shape[1]},) (one per head), (1,) (one for all heads) or "
                         f"(num_seqs={num_seqs}, {gate.shape[1]}) (one per sequence and head), got {_shape(gate)}")
    # the offsets themselves are checked where that costs no device synchronisation
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, causal)


def check_cu_seqlens(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                     max_seqlen_q: int, max_seqlen_k: int, causal: bool) -> None:
    """The packed offsets' values (host tensors, or device ones at the cost of a synchronisation): each rises
    from 0 to the packed length, no sequence is longer than its max_seqlen, every sequence with queries has a
    key, and causal ones have no more queries than keys. ValueError naming what is wrong."""
    for name, cu, total, m in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                               ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
        cu = cu.cpu()
        lens = cu[1:] - cu[:-1]
        if cu[0].item() != 0 or cu[-1].item() != total or bool((lens < 0).any()):
            raise ValueError(f"{name} must rise from 0 to {total} (the packed length), got {cu.tolist()}")
        if int(lens.max()) > m:
            raise ValueError(f"{name.replace('cu_seqlens', 'max_seqlen')}={m} is less than the longest "
                             f"sequence ({int(lens.max())})")
    cu_q, cu_k = cu_seqlens_q.cpu(), cu_seqlens_k.cpu()
    lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    if bool(((lk == 0) & (lq > 0)).any()):
        raise ValueError("every sequence with queries needs at least one key: cu_seqlens_k has an empty "
                         f"sequence where cu_seqlens_q has not ({cu_q.tolist()}, {cu_k.tolist()})")
    if causal and bool((lq > lk).any()):
        raise ValueError("causal attention needs seqlen_q <= seqlen_k in every sequence, got cu_seqlens_q "
                         f"{cu_q.tolist()} and cu_seqlens_k {cu_k.tolist()}")


def _check_leftpad(q, k, leftpad_k, varlen) -> None:
    if varlen:
        raise ValueError("leftpad_k is for a dense left-padded batch; packed sequences (cu_seqlens) have no padding")
    if not isinstance(leftpad_k, torch.Tensor) or leftpad_k.dtype != torch.int32 or leftpad_k.shape != (q.shape[0],):
        got = f"{leftpad_k.dtype} of shape {_shape(leftpad_k)}" if isinstance(leftpad_k, torch.Tensor) else \
            type(leftpad_k).__name__
        raise ValueError(f"leftpad_k must be an int32 tensor of shape (batch={q.shape[0]},), got {got}")
    if leftpad_k.device != q.device:
        raise ValueError(f"leftpad_k is on {leftpad_k.device} but q is on {q.device}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and leftpad_k.numel() and not (
            0 <= int(leftpad_k.min()) and int(leftpad_k.max()) <= k.shape[1]):
        raise ValueError(f"leftpad_k must count pad keys in [0, seqlen_k={k.shape[1]}], got {leftpad_k.tolist()}")


GATE_ACTS = ("tanh", "identity")


def _gate_act(gate: torch.Tensor, gate_act: str) -> torch.Tensor:
    """act(gate) for the kernels (the eager reference writes its own, so that the tests' oracle shares no code
    with the op)."""
    return torch.tanh(gate) if gate_act == "tanh" else gate


def _use_triton(q: torch.Tensor) -> bool:
    return HAS_TRITON and (q.device.type == "cuda" or INTERPRET)


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
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    leftpad_k: torch.Tensor | None = None,
    deterministic: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Zero-init attention: causal attention over the tokens plus a gated prompt attention with its
    own softmax, fused in one pass (LLaMA-Adapter, arXiv 2303.16199).

        out = softmax(s q k^T + causal mask) v + act(gate) * softmax(s q prompt_k^T) prompt_v

    Arguments:
        q: (batch, seqlen_q, nheads, headdim)
        k, v: (batch, seqlen_k, nheads_kv, headdim); nheads % nheads_kv == 0 (GQA / MQA: query
            head h reads kv head h // (nheads // nheads_kv)).
        prompt_k, prompt_v: (batch or 1, prompt_len, nheads_kv, headdim): the adapter prompt
            through the layer's wk / wv. A batch of 1 is shared by all without a copy.
            prompt_len may be 0 (plain causal attention).
        gate: (nheads,) or (1,): the raw gate; act(gate) scales the prompt part, and its gradient
            flows through act exactly. Or (batch, nheads), packed (num_seqs, nheads): a gate per batch row
            (sequence) and head, row b's prompt part scaled by act(gate[b, h]) (a row's gate shared by the
            heads: expand it to (batch, nheads), a view).
        causal: mask the token keys causally, aligned bottom-right: with seqlen_q < seqlen_k
            (a KV cache) query i sees keys j <= i + seqlen_k - seqlen_q. Prompt keys are never masked.
        softmax_scale: defaults to headdim ** -0.5; applies to both parts.
        gate_act: "tanh" (the paper's training code) or "identity" (PEFT, lit-llama).
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: packed sequences, flash-attn's
            varlen convention: q (total_q, nheads, headdim), k, v (total_k, nheads_kv, headdim),
            cu_seqlens_* (num_seqs + 1,) int32 offsets, max_seqlen_* the longest sequence;
            prompt_k / prompt_v then have batch 1 or num_seqs. Sequences never see each other.
        leftpad_k: (batch,) int32, a left-padded batch (batched generation with a KV cache, as flash-attn's
            leftpad_k / cache_leftpad): row b's first leftpad_k[b] token keys are padding, never attended.
            The causal alignment stays bottom-right; a query before row b's first real key (a pad query)
            sees no token key, and its output is the prompt part alone. Not with packed sequences.
        deterministic: as flash-attn's. True (the default): the backward gives bitwise the same gradients for
            the same inputs. False: dq is summed with atomics during the dK/dV pass (FlashAttention-2's
            backward, 5 block products instead of 7), its last bits varying from run to run; only when k and v
            need gradients too.
        backend: "auto" (the pointer kernels, or the eager reference where Triton cannot run) or "tma": the
            Hopper forward on tensor descriptors with warp specialization (kernels/zero_init_attn_tma.py; sm_90 or
            the interpreter; prompt_len <= 128, TMA-aligned inputs), with the same backward. Opt-in: docs/op.md.
    Returns:
        out: shaped like q, contiguous, dtype of q. Softmax statistics and accumulators in fp32 (fp64 for
            fp64 inputs, which exist for verification).

    Any strides work (a (batch, nheads, seqlen, headdim) tensor viewed with .transpose(1, 2) is
    read in place). Differentiable in q, k, v, prompt_k, prompt_v and gate.

    Caution:
        Bad input raises ValueError / TypeError before anything is launched. The packed offsets
        and leftpad_k's values are checked on CPU tensors only (on a GPU that would need a device
        synchronisation: check_cu_seqlens does it at that cost); on a GPU the kernels clamp every offset,
        so no value reads or writes outside the tensors, and a sequence or row whose own offsets are out of
        range gets NaN outputs.
        Runs the Triton kernels on CUDA tensors (compiled) or anywhere under TRITON_INTERPRET=1
        (read when this module is imported); otherwise two scaled_dot_product_attention calls
        (kernels/sdpa_fallback.py).
    """
    if backend not in ("auto", "tma"):
        raise ValueError(f"backend must be 'auto' or 'tma', got {backend!r}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_inputs(q, k, v, prompt_k, prompt_v, gate, causal, softmax_scale, gate_act, deterministic, varlen)
    if varlen:
        _check_varlen(q, k, prompt_k, gate, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    elif max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError("max_seqlen_q / max_seqlen_k go with cu_seqlens_q / cu_seqlens_k (packed sequences)")
    if leftpad_k is not None:
        _check_leftpad(q, k, leftpad_k, varlen)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)

    fwd_op = _zia_fwd_op
    if backend == "tma":
        from llama_adapter_triton.kernels import zero_init_attn_tma

        zero_init_attn_tma.check_tma(q, k, v, prompt_k, prompt_v)
        fwd_op = zero_init_attn_tma.zia_tma_fwd_op
    elif not _use_triton(q):
        return zero_init_attention_sdpa(q, k, v, prompt_k, prompt_v, gate, causal=causal, softmax_scale=scale,
                                        gate_act=gate_act, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                        leftpad_k=leftpad_k)
    rows, nheads = (cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]), q.shape[-2]
    # (rows, nheads) fp32: one gate per batch row (packed: per sequence) and head, a 1-D gate repeated (tiny);
    # autograd sums its gradient over the rows through the expand
    gamma = _gate_act(gate.to(_acc_dtype(q.dtype)), gate_act).expand(rows, nheads).contiguous()
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prompt_k, prompt_v, gate))
    out, _, _, _ = fwd_op(q, k, v, prompt_k, prompt_v, gamma, causal, scale, cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q or 0, max_seqlen_k or 0, leftpad_k, deterministic, backward)
    return out
