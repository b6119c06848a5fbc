"""The zero-init attention forward on tensor descriptors (TMA) with warp specialization, for Hopper (sm_90).

Opt-in: zero_init_attention(..., backend="tma") runs this forward; the backward stays the pointer kernels' (_bwd in
kernels/zero_init_attn.py), fed the same saved statistics (O_w in fp32, lse_w, lse_p in base 2). backend="auto"
never picks it until a GPU run shows it correct and faster (docs/op.md, "The Hopper forward").

Same math and contract as _zia_fwd_kernel (packed sequences, GQA, leftpad_k, the prompt), one program per (query
block, batch, head). Every tile moves through a device-side descriptor made per program over its own sequence of its
own head, a (seqlen, headdim) matrix with strides (row stride, 1): its bounds are the sequence's, so rows past the end
of a sequence (packed or left-padded) load as zeros and are never stored, and no pointer load is left in the token
loop, which is warp-specialized (the compiler crashes on pointer loads in such a loop). Compiled for sm_90 the loads
are TMA copies (cp.async.bulk.tensor); the interpreter runs descriptors (zero fill, clipped stores, TMA's alignment
rules) and ignores warp specialization.

Inputs: TMA needs each tensor's last stride to be 1 and its address and other strides to be multiples of 16 bytes;
an input that does not qualify is a ValueError naming it (backend="tma" is an explicit choice: it never falls back
silently). Contiguous tensors and (batch, nheads, seqlen, headdim) views qualify whenever headdim is a multiple of 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import llama_adapter_triton.kernels.zero_init_attn as zia
from llama_adapter_triton.kernels import block_sizes
from llama_adapter_triton.kernels.zero_init_attn import LOG2E, RUNTIME_LENGTHS, _cast_out, _operand, _program

TMA_ALIGN = 16  # bytes: TMA's alignment of a global address and of every stride but the last
MAX_PROMPT_LEN = 128  # the prompt is one tile (LLaMA-Adapter's prompts: 10 to 30 rows)


@triton.jit
def _tile(desc, row, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """The descriptor's block at [row, 0]; rows and columns outside its shape read as 0."""
    x = desc.load([row, 0])
    if UPCAST:  # the interpreter computes bf16/fp16 wrongly: work in fp32 there
        x = x.to(ACC)
    return x


@triton.jit
def _matrix(base, rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """A descriptor over the (rows, HEAD_DIM) matrix at base with row stride stride_row, in (BLOCK, HEAD_DIM_PAD)
    blocks."""
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK, HEAD_DIM_PAD])


@triton.jit(do_not_specialize=RUNTIME_LENGTHS)
def _zia_tma_fwd_kernel(
    Q, K, V, PK, PV, GAMMA, OUT, O_W, LSE_W, LSE_P, CU_Q, CU_K, LEFTPAD,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_pkb, stride_pkn, stride_pkh,
    stride_pvb, stride_pvn, stride_pvh,
    stride_ob, stride_om, stride_oh,
    stride_wb, stride_wm, stride_wh,
    stride_lb, stride_lh, stride_lm,
    nheads, groups, seqlen_q, seqlen_k, total_q, total_k, prompt_len, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_PROMPT: tl.constexpr, VARLEN: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    SAVE_O_W: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """_zia_fwd_kernel's math on descriptors, in the one shape Triton 3.6 warp-specializes on sm_90: one loop in
    the kernel and no early return (either makes its NVGPUWarpSpecialization pass crash). So the prompt is one
    tile (BLOCK_P >= prompt_len: the host checks it), every key block is masked, and a program past the end of its
    sequence runs an empty loop and stores nothing. The last strides are 1 (the host checks it). GAMMA is (rows,
    nheads): act(gate) of each (sequence, head)."""
    DTYPE: tl.constexpr = Q.dtype.element_ty
    pid_m, _num_m, b64, h64, hk64, q_start, k_start, seqlen_q, seqlen_k, ok = _program(
        CU_Q, CU_K, LEFTPAD, nheads, groups, seqlen_q, seqlen_k, total_q, total_k, BLOCK_M, False, VARLEN,
        HAS_LEFTPAD)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_desc = _matrix(Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm, seqlen_q, stride_qm,
                     HEAD_DIM, BLOCK_M, HEAD_DIM_PAD)
    q = _tile(q_desc, start_m, UPCAST, ACC)

    # token keys: one online softmax over every visible key block, each masked (keys past the sequence read as 0)
    k_desc = _matrix(K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn, seqlen_k, stride_kn, HEAD_DIM,
                     BLOCK_N, HEAD_DIM_PAD)
    v_desc = _matrix(V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn, seqlen_k, stride_vn, HEAD_DIM,
                     BLOCK_N, HEAD_DIM_PAD)
    diag = seqlen_k - seqlen_q  # bottom-right alignment: row i sees keys j <= i + diag (< 0: left padding)
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M + diag, seqlen_k)
    else:
        hi = seqlen_k
    hi = tl.where(start_m < seqlen_q, hi, 0)  # a block past its (packed) sequence's end: nothing to do
    m_w = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_w = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = _tile(k_desc, start_n, UPCAST, ACC)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale
        offs_n = start_n + tl.arange(0, BLOCK_N)
        visible = offs_n[None, :] < seqlen_k
        if IS_CAUSAL:  # query i sees key j <= i + seqlen_k - seqlen_q
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_w, tl.max(qk, 1))
        # rows that have seen no key yet (causal rows above the diagonal, left padding) add 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_w - m_use)
        p = tl.math.exp2(qk - m_use[:, None])
        l_w = l_w * alpha + tl.sum(p, 1)
        v = _tile(v_desc, start_n, UPCAST, ACC)
        acc = tl.dot(_operand(p, DTYPE, UPCAST), v, acc * alpha[:, None], input_precision=DOT_PRECISION,
                     out_dtype=ACC)
        m_w = m_new
    # a row that saw no token key (a pad query; a row past its sequence, never stored): token part 0, lse_w = +inf
    # (the backward's P is then 0)
    seen = l_w > 0
    l_w = tl.where(seen, l_w, 1.0)
    lse_w = tl.where(seen, m_w + tl.math.log2(l_w), float("inf"))
    acc = acc / l_w[:, None]
    if VARLEN or HAS_LEFTPAD:  # offsets out of range (unchecked on a GPU): NaN, never a plausible answer
        acc = tl.where(ok, acc, float("nan"))
        lse_w = tl.where(ok, lse_w, float("nan"))
    if SAVE_O_W:  # the token part alone (fp32), for the backward's Delta_w = dout . O_w
        w_desc = _matrix(O_W + b64 * stride_wb + h64 * stride_wh + q_start * stride_wm, seqlen_q, stride_wm,
                         HEAD_DIM, BLOCK_M, HEAD_DIM_PAD)
        w_desc.store([start_m, 0], _cast_out(acc, O_W.dtype.element_ty, UPCAST))
    if HAS_PROMPT:  # the prompt's softmax, one tile: its weights gamma * A, added into the normalised output
        pk_desc = _matrix(PK + b64 * stride_pkb + hk64 * stride_pkh, prompt_len, stride_pkn, HEAD_DIM, BLOCK_P,
                          HEAD_DIM_PAD)
        pk = _tile(pk_desc, 0, UPCAST, ACC)
        t = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION, out_dtype=ACC) * qk_scale  # log2 units
        t = tl.where(tl.arange(0, BLOCK_P)[None, :] < prompt_len, t, float("-inf"))
        m_p = tl.max(t, 1)
        l_p = tl.sum(tl.math.exp2(t - m_p[:, None]), 1)
        lse_p = m_p + tl.math.log2(l_p)
        gamma = tl.load(GAMMA + b64 * nheads + h64)
        a = _operand(tl.math.exp2(t - lse_p[:, None]) * gamma, DTYPE, UPCAST)

        pv_desc = _matrix(PV + b64 * stride_pvb + hk64 * stride_pvh, prompt_len, stride_pvn, HEAD_DIM, BLOCK_P,
                          HEAD_DIM_PAD)
        acc = tl.dot(a, _tile(pv_desc, 0, UPCAST, ACC), acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    row_ok = offs_m < seqlen_q
    L_off = b64 * stride_lb + h64 * stride_lh + (q_start + offs_m) * stride_lm
    tl.store(LSE_W + L_off, lse_w, mask=row_ok)
    if HAS_PROMPT:
        tl.store(LSE_P + L_off, lse_p, mask=row_ok)
    o_desc = _matrix(OUT + b64 * stride_ob + h64 * stride_oh + q_start * stride_om, seqlen_q, stride_om, HEAD_DIM,
                     BLOCK_M, HEAD_DIM_PAD)
    o_desc.store([start_m, 0], _cast_out(acc, OUT.dtype.element_ty, UPCAST))


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------


def check_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
              prompt_v: torch.Tensor) -> None:
    """ValueError unless the TMA forward can take these (already checked) inputs: on a Hopper GPU (compute
    capability 9.0+) or under Triton's interpreter; a prompt of at most MAX_PROMPT_LEN rows; each tensor read in
    place by TMA: a unit last stride, and its address and other strides (of dimensions longer than 1) multiples of
    16 bytes (the address is not checked under torch.compile: it has none)."""
    if not zia.INTERPRET:
        if q.device.type != "cuda":
            raise ValueError(f"backend='tma' runs on a Hopper GPU (or under TRITON_INTERPRET=1), got q on {q.device}")
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 9:
            raise ValueError(f"backend='tma' needs a GPU of compute capability 9.0 or more (Hopper: TMA), got "
                             f"{major}.{minor} ({torch.cuda.get_device_name(q.device)}): use backend='auto'")
    prompt_len = prompt_k.shape[1]
    if prompt_len > MAX_PROMPT_LEN:
        raise ValueError(f"backend='tma' takes prompts of up to {MAX_PROMPT_LEN} rows (one tile), got prompt_k "
                         f"{tuple(prompt_k.shape)}: use backend='auto'")
    tensors = dict(q=q, k=k, v=v, prompt_k=prompt_k, prompt_v=prompt_v) if prompt_len else dict(q=q, k=k, v=v)
    check_address = not torch.compiler.is_compiling()
    for name, t in tensors.items():
        size = t.element_size()
        strides = [s for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1]
        if t.numel() and (t.stride(-1) != 1 or any(s * size % TMA_ALIGN for s in strides)
                          or (check_address and t.data_ptr() % TMA_ALIGN)):
            where = f" at address {t.data_ptr():#x}" if check_address else ""
            raise ValueError(f"backend='tma' needs {name} with a unit last stride and its address and strides in "
                             f"multiples of {TMA_ALIGN} bytes (TMA), got strides {tuple(t.stride())} of {t.dtype}"
                             f"{where}: pass {name}.contiguous(), or backend='auto'")


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the kernel's device-side descriptors (128 bytes each, per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors live in scratch memory that the launch asks triton's allocator for; set ours unless
    the caller has set one (the allocator is a context variable: set in this thread, where the forward runs)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def warp_specialize(dtype: torch.dtype, block_m: int, num_warps: int) -> bool:
    """Whether the token loop asks for warp specialization: where Triton 3.6 does it on sm_90, 16-bit tensor-core
    dots in blocks of at least 64 rows with 4 warps (which become 12: a producer and two consumer warp groups).
    Elsewhere it would be dropped silently (8 warps, small blocks) or does not apply (fp32's IEEE dots)."""
    return dtype.itemsize == 2 and block_m >= 64 and num_warps == 4


def _fwd_tma(q, k, v, prompt_k, prompt_v, gamma, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, leftpad_k, save_o_w):
    """(out, o_w, lse_w, lse_p), as zero_init_attn._fwd gives them (what _bwd takes), for inputs check_tma
    passed. gamma: act(gate), contiguous (rows, nheads) (rows: batch, or num_seqs when packed), as _fwd takes it."""
    varlen, batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, prompt_len = zia._geometry(
        q, k, prompt_k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    acc_dtype = zia._acc_dtype(q.dtype)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device) if varlen else \
        torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o_w = torch.empty(q.shape if save_o_w else (0,), dtype=acc_dtype, device=q.device)
    lse_shape = zia._lse_shape(q, varlen, batch, nheads, seqlen_q)
    lse_w = torch.empty(lse_shape, dtype=acc_dtype, device=q.device)
    lse_p = torch.full(lse_shape, float("-inf"), dtype=acc_dtype, device=q.device)
    if out.numel() == 0:
        return out, o_w, lse_w, lse_p
    head_dim_pad = max(16, triton.next_power_of_2(headdim))
    cfg = block_sizes.choose(q.dtype, head_dim_pad, seqlen_q, prompt_len, block_sizes.shared_memory(q.device))
    block_m, block_n, num_warps, num_stages = cfg["tma"]
    if q.device.type == "cuda":
        _ensure_allocator()
    w = o_w if save_o_w else out
    grid = zia.launch_grid(triton.cdiv(seqlen_q, block_m), batch * nheads, "the forward")
    _zia_tma_fwd_kernel[grid](
        q, k, v, prompt_k, prompt_v, gamma, out, w, lse_w, lse_p, cu_seqlens_q, cu_seqlens_k, leftpad_k,
        *zia._strides(q, varlen)[:3], *zia._strides(k, varlen)[:3], *zia._strides(v, varlen)[:3],
        *zia._prompt_strides(prompt_k)[:3], *zia._prompt_strides(prompt_v)[:3], *zia._strides(out, varlen)[:3],
        *zia._strides(w, varlen)[:3], *zia._lse_strides(lse_w, varlen),
        nheads, nheads // nheads_kv, seqlen_q, seqlen_k, *zia._totals(q, k, varlen), prompt_len,
        softmax_scale * LOG2E,
        HEAD_DIM=headdim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_P=max(16, triton.next_power_of_2(prompt_len)), IS_CAUSAL=causal, HAS_PROMPT=prompt_len > 0,
        VARLEN=varlen, HAS_LEFTPAD=leftpad_k is not None,
        SAVE_O_W=save_o_w, WARP_SPECIALIZE=warp_specialize(q.dtype, block_m, num_warps), **zia._dtype_flags(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, o_w, lse_w, lse_p


# the same op as zero_init_attn._zia_fwd_op (same schema, fake and backward), its forward on descriptors
@torch.library.custom_op("llama_adapter::zero_init_attention_tma_fwd", mutates_args=())
def zia_tma_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor,
    gamma: torch.Tensor, causal: bool, softmax_scale: float, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, leftpad_k: torch.Tensor | None,
    deterministic: bool, save_o_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_tma(q, k, v, prompt_k, prompt_v, gamma, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, leftpad_k, save_o_w)


@zia_tma_fwd_op.register_fake
def _(*args):
    return zia._zia_fwd_op(*args)  # on fake tensors: the pointer op's fake, the same shapes


zia_tma_fwd_op.register_autograd(zia._backward, setup_context=zia._setup_context)
