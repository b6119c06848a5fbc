"""zero_init_attention against the fp64 eager reference: output and every gradient.

On a CPU the Triton kernels run under Triton's interpreter (tests/conftest.py), every operand that the GPU rounds
to 16 bits before a matrix product rounded the same way; on a GPU the same tests run them compiled. Every test
here fails unless the op ran the Triton kernels (the `triton_kernels_only` fixture: no eager fallback).

The bar (flash-attn's): the error against the fp64 reference is at most twice the error of the same math done by
PyTorch in the input dtype, plus two fp32 roundoffs of the case's largest value (the kernels accumulate in fp32;
where PyTorch's formulation happens to cancel exactly, a few roundoffs of the magnitudes involved remain).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llama_adapter_triton.kernels.zero_init_attn as zia
from llama_adapter_triton import zero_init_attention, zero_init_attention_ref
from llama_adapter_triton.kernels import block_sizes


@pytest.fixture(autouse=True)
def _kernels_ran(triton_kernels_only):
    """Every test in this file proves it ran the Triton kernels: the eager fallback raises."""
    return triton_kernels_only


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    seqlen_q: int = 97
    seqlen_k: int = 97
    nheads: int = 4
    nheads_kv: int = 4
    headdim: int = 64
    prompt_len: int = 10
    prompt_batch: int = 1  # 1: one prompt shared by the batch; batch: one per sample
    causal: bool = True
    gate_act: str = "tanh"
    gate_per_head: bool = True
    gate_rows: bool = False  # a gate per batch row and head, (batch, nheads)
    leftpad: tuple[int, ...] | None = None  # left padding of each row's keys (leftpad_k)


CASES = {
    "base": Case(),
    "seqlen1": Case(batch=1, seqlen_q=1, seqlen_k=1, nheads_kv=2, headdim=32),
    "decode_kvcache": Case(seqlen_q=1, seqlen_k=130, nheads_kv=2, prompt_batch=2),
    "q_shorter_gqa8to2": Case(seqlen_q=17, seqlen_k=130, nheads=8, nheads_kv=2, headdim=32, prompt_len=1,
                              prompt_batch=2),
    "mqa_hd80_identity": Case(batch=1, seqlen_q=130, seqlen_k=130, nheads_kv=1, headdim=80, gate_act="identity"),
    "noncausal_q_longer": Case(seqlen_q=130, seqlen_k=17, nheads=2, nheads_kv=2, headdim=32, causal=False),
    "hd96_prompt64_layer_gate": Case(batch=1, seqlen_q=17, seqlen_k=17, nheads=2, nheads_kv=2, headdim=96,
                                     prompt_len=64, gate_per_head=False),
    "hd128_prompt65": Case(batch=1, seqlen_q=33, seqlen_k=33, nheads=2, nheads_kv=1, headdim=128, prompt_len=65),
    "no_prompt": Case(seqlen_q=17, seqlen_k=17, nheads=2, nheads_kv=2, headdim=32, prompt_len=0),
    "hd16": Case(batch=1, seqlen_q=70, seqlen_k=70, nheads=2, nheads_kv=2, headdim=16, prompt_len=3),
    # left-padded batches (batched generation): a prefill whose rows start with 0, 30 and 96 pad tokens (pad
    # queries see no token key), decode steps, a chunk with 7 pad queries, and a row that is all padding
    "leftpad_prefill_gqa": Case(batch=3, nheads=4, nheads_kv=2, headdim=32, leftpad=(0, 30, 96)),
    "leftpad_decode": Case(batch=3, seqlen_q=1, seqlen_k=130, nheads_kv=2, prompt_batch=3, leftpad=(128, 0, 64)),
    # one real key: its dk cancels exactly in fp64 (the backward's Delta_w comes from the forward's fp32 token
    # part, not from the 16-bit output, so that this holds in bf16 / fp16 too)
    "leftpad_one_key": Case(seqlen_q=1, seqlen_k=70, nheads=2, nheads_kv=2, headdim=32, leftpad=(69, 0)),
    "leftpad_chunk": Case(seqlen_q=17, seqlen_k=130, nheads=2, nheads_kv=2, headdim=32, leftpad=(120, 3)),
    "leftpad_noncausal_all_pad": Case(seqlen_q=33, seqlen_k=17, nheads=2, nheads_kv=2, headdim=32, causal=False,
                                      leftpad=(17, 5)),
}
NAMES = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v", "dgate")
FP32_EPS = torch.finfo(torch.float32).eps


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt).requires_grad_()

    q = rand(case.batch, case.seqlen_q, case.nheads, case.headdim)
    k = rand(case.batch, case.seqlen_k, case.nheads_kv, case.headdim)
    v = rand(case.batch, case.seqlen_k, case.nheads_kv, case.headdim)
    pk = rand(case.prompt_batch, case.prompt_len, case.nheads_kv, case.headdim)
    pv = rand(case.prompt_batch, case.prompt_len, case.nheads_kv, case.headdim)
    per_head = case.nheads if case.gate_per_head else 1
    gate = rand(*((case.batch, per_head) if case.gate_rows else (per_head,)), dt=torch.float32)  # stays fp32
    return [q, k, v, pk, pv, gate]


def kwargs_of(case: Case, device: str) -> dict:
    leftpad = None if case.leftpad is None else torch.tensor(case.leftpad, dtype=torch.int32, device=device)
    return dict(causal=case.causal, gate_act=case.gate_act, leftpad_k=leftpad)


def forward_backward(fn, inputs, dout, **kwargs):
    """Output and the gradients of all six inputs for a given output gradient."""
    out = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads, strict=True)]


def as_fp64(inputs):
    return [x.detach().double().requires_grad_() for x in inputs]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def dot_roundoff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The standard deviation of fp32 roundoff in the dot products of x (batch, len_x, nheads, d) and y (batch,
    len_y, nheads, d), each accumulated in order along d: every addition rounds its partial sum S_k by a uniform
    relative error of at most eps / 2, so the variance is eps^2 / 12 * sum_k S_k^2. (batch, nheads, len_x, len_y)."""
    partial = (x.permute(0, 2, 1, 3)[:, :, :, None, :] * y.permute(0, 2, 1, 3)[:, :, None, :, :]).cumsum(-1)
    return FP32_EPS / math.sqrt(12) * partial.square().sum(-1).sqrt()


def dgate_roundoff(inputs, dout: torch.Tensor, case: Case) -> float:
    """Three standard deviations of the fp32 roundoff of d gate computed as the kernels compute it, from the fp64
    inputs: per query row Delta_p = sum_j A_ij (dout_i . pv_j), A_ij = exp2(t_ij - lse_i) with t the base-2 scores
    q_i . pk_j; each dot's roundoff (dot_roundoff) moves Delta_p through dp_ij and through A_ij (a score error
    e_ij changes Delta_p by ln2 A_ij e_ij (dp_ij - Delta_p)); the rows' errors independent, summed over the batch
    and the rows. PyTorch's own association (dout_i . (A PV)_i) rounds less, so its error alone would be too small
    a bar for this one reduction, and how much the kernels' dots round under the interpreter depends on the
    machine's BLAS (numpy's)."""
    q, _, _, pk, pv, gate = (x.detach().double() for x in inputs)
    dout = dout.double()
    rep = case.nheads // case.nheads_kv
    pk = pk.repeat_interleave(rep, 2).expand(case.batch, -1, -1, -1)
    pv = pv.repeat_interleave(rep, 2).expand(case.batch, -1, -1, -1)
    scale = case.headdim**-0.5 * math.log2(math.e)
    t = torch.einsum("bihd,bjhd->bhij", q, pk) * scale
    a = torch.softmax(t * math.log(2), -1)
    dp = torch.einsum("bihd,bjhd->bhij", dout, pv)
    delta_p = (a * dp).sum(-1, keepdim=True)
    var = (a * dot_roundoff(dout, pv)).square() + (math.log(2) * a * (dp - delta_p) * scale
                                                   * dot_roundoff(q, pk)).square()
    var = var.sum((2, 3) if case.gate_rows else (0, 2, 3))  # (nheads,), or (batch, nheads) for a gate per row
    if not case.gate_per_head:
        var = var.sum(-1, keepdim=True)
    dact = 1 - torch.tanh(gate) ** 2 if case.gate_act == "tanh" else torch.ones_like(gate)
    return 3 * (var.sqrt() * dact).max().item()


def check_against_reference(case: Case, dtype: torch.dtype, device: str, seed: int = 0, **op_kwargs) -> None:
    """The op's output and gradients against the fp64 reference, within the bar (the module docstring)."""
    inputs = make_inputs(case, dtype, device, seed)
    dout = torch.randn(case.batch, case.seqlen_q, case.nheads, case.headdim,
                       generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    got = forward_backward(zero_init_attention, inputs, dout, **kwargs_of(case, device), **op_kwargs)
    exact = forward_backward(zero_init_attention_ref, as_fp64(inputs), dout.double(), **kwargs_of(case, device))
    # the same math done by PyTorch in the input dtype: the error any implementation may have
    torch_err = forward_backward(zero_init_attention_ref, [x.detach().requires_grad_() for x in inputs], dout,
                                 **kwargs_of(case, device))
    scale = max(r.abs().max().item() for r in exact if r.numel())
    for name, a, ref, low in zip(NAMES, got, exact, torch_err, strict=True):
        assert a.shape == ref.shape and a.dtype == (torch.float32 if name == "dgate" else dtype), name
        err, bar = max_err(a, ref), 2 * max_err(low, ref) + 2 * FP32_EPS * scale
        if name == "dgate" and dtype == torch.float32 and case.prompt_len and case.leftpad is None:
            bar += dgate_roundoff(inputs, dout, case)  # (left padding's pad rows see no prompt)
        assert err <= bar, f"{name}: error {err:.3g} against fp64 exceeds {bar:.3g} (2x PyTorch's {dtype} error)"


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_fp64_reference(name, device):
    check_against_reference(CASES[name], torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_low_precision_within_twice_torch_error(name, dtype, device):
    check_against_reference(CASES[name], dtype, device, seed=3)


@pytest.fixture
def gpu_blocks(monkeypatch):
    """Under the interpreter, the block sizes the launchers pick for an H100 / H200 instead of 64 x 64."""
    monkeypatch.setattr(block_sizes, "INTERPRET_BLOCKS", "gpu")


RAGGED = {
    "ragged_gqa": Case(batch=3, seqlen_q=45, seqlen_k=45, nheads=4, nheads_kv=2, headdim=80, prompt_len=10,
                       prompt_batch=3),
    "decode_leftpad": Case(batch=3, seqlen_q=1, seqlen_k=77, nheads=4, nheads_kv=1, headdim=48, prompt_len=7,
                           leftpad=(76, 0, 31)),
    "chunk_noncausal": Case(batch=2, seqlen_q=19, seqlen_k=150, nheads=2, nheads_kv=2, headdim=32, prompt_len=33,
                            causal=False, gate_per_head=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(RAGGED))
def test_gpu_block_sizes_on_ragged_shapes(name, dtype, device, gpu_blocks):
    """The GPU's own block sizes (BLOCK_M 128 / 64 / 32, BLOCK_N 32 / 64 / 128, prompt chunks of 16 and 32) on
    shapes that fill no block: the masks at every edge, under the same bar."""
    check_against_reference(RAGGED[name], dtype, device)


def test_gpu_block_sizes_packed(device, gpu_blocks):
    check_varlen_against_per_sequence_calls(causal=True, prompt="per_sequence", device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["base", "leftpad_prefill_gqa", "noncausal_q_longer", "hd128_prompt65"])
def test_atomic_dq_backward_matches_fp64_reference(name, dtype, device):
    """deterministic=False: dq summed with atomics in the dK/dV pass, under the same bar."""
    check_against_reference(CASES[name], dtype, device, seed=5, deterministic=False)


def test_atomic_dq_backward_packed(device):
    check_varlen_against_per_sequence_calls(causal=True, prompt="shared", device=device, deterministic=False)


def test_atomic_dq_backward_gpu_block_sizes(device, gpu_blocks):
    """deterministic=False with the H100's blocks: the dK/dV pass's dq^T = K^T dS^T tile (head dim 80 padded to 128
    rows, 32 query columns) added with atomics through transposed pointers, masked at both edges. (On a GPU: the
    form and blocks that chip takes.)"""
    transposed = block_sizes.choose(torch.bfloat16, 128, 45, 10, block_sizes.shared_memory(torch.device(device)),
                                    atomic_dq=True)["TRANSPOSED_DQ"]
    assert transposed or not block_sizes.INTERPRET
    check_against_reference(RAGGED["ragged_gqa"], torch.bfloat16, device, seed=5, deterministic=False)


def test_atomic_dq_product_form_follows_the_chip(monkeypatch):
    """The policy: dq^T = K^T dS^T (M = head dim, a warpgroup MMA) on chips with wgmma, which H100 / H200's 227 KB
    of shared memory marks; dS K (M = BLOCK_M = 32: mma.sync, native there; the transposed form would need a second
    copy of K in shared memory) on sm_8x, and for fp32 / fp64 (no wgmma). The interpreter takes the H100's choice,
    so the tests above check both forms against fp64: bf16 the transposed one, fp32 the other."""
    h100, a100, rtx = 232448, 166912, 101376
    for interpret_blocks in ("large", "gpu"):
        monkeypatch.setattr(block_sizes, "INTERPRET_BLOCKS", interpret_blocks)

        def transposed(dtype, smem, atomic_dq=True):
            return block_sizes.choose(dtype, 128, 1024, 10, smem, atomic_dq)["TRANSPOSED_DQ"]

        assert transposed(torch.bfloat16, h100) and transposed(torch.float16, h100)
        assert not transposed(torch.bfloat16, a100) and not transposed(torch.float16, rtx)
        assert not transposed(torch.float32, h100) and not transposed(torch.bfloat16, h100, atomic_dq=False)
    assert block_sizes.shared_memory(torch.device("cpu")) == h100


if zia.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_kernel(X, Y, DTYPE: tl.constexpr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, zia._operand(tl.load(X + offs), DTYPE, True))

    @triton.jit
    def _bounds_kernel(CU_Q, CU_K, LEFTPAD, OUT, seqlen_q, seqlen_k, total_q, total_k, VARLEN: tl.constexpr,
                       HAS_LEFTPAD: tl.constexpr):
        b = tl.program_id(0)
        q_start, k_start, sq, sk, ok = zia._seq_bounds(CU_Q, CU_K, LEFTPAD, b, seqlen_q, seqlen_k, total_q, total_k,
                                                       VARLEN, HAS_LEFTPAD)
        tl.store(OUT + b * 5 + 0, q_start)
        tl.store(OUT + b * 5 + 1, k_start)
        tl.store(OUT + b * 5 + 2, sq.to(tl.int64))
        tl.store(OUT + b * 5 + 3, sk.to(tl.int64))
        tl.store(OUT + b * 5 + 4, ok.to(tl.int64))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3.4e38 -> fp16 inf, on purpose
def test_rounding_emulation_is_the_gpus():
    """Under the interpreter, _operand rounds fp32 to bf16 / fp16 to nearest even, as the GPU's conversion does
    (ties included), and keeps the result in fp32."""
    if not zia.INTERPRET:
        pytest.skip("the emulation exists under the interpreter only")
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0xBF808000, 0x7F7FFFFF, 0x00000001,
                         0x3F800001, 0x38000000, 0x3F801000], dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.randn(118, generator=torch.Generator().manual_seed(0))])
    for dtype, tl_dtype in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        y = torch.empty_like(x)
        _round_kernel[(1,)](x, y, tl_dtype, 128)
        assert torch.equal(y, x.to(dtype).float()), dtype


def emulate_bf16_kernels(q, k, v, pk, pv, gate, dout, rounded: bool):
    """Output and the gradients of q, k, v, prompt_k, prompt_v as the kernels compute them from bf16 inputs (causal,
    seqlen_q = seqlen_k within one 64-key block, one shared prompt, tanh gate): fp32 math, and, when rounded, every
    probability-like operand rounded to bf16 exactly where the kernels round it before a matrix product: the
    forward's unnormalised token probabilities P and its gamma * A, the backward's P, dS and dT. fp32 results."""
    def r16(x):
        return x.to(torch.bfloat16).float() if rounded else x

    q, k, v, pk, pv, dout = (x.detach().float().transpose(1, 2) for x in (q, k, v, pk, pv, dout))  # (b, h, s, d)
    gamma = torch.tanh(gate.detach().float())[None, :, None, None]
    n, scale = q.shape[2], q.shape[3] ** -0.5
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))  # the forward's P: one key block, so the final row max
    o_w = r16(e) @ v / e.sum(-1, keepdim=True)
    a = torch.softmax(q @ pk.transpose(-1, -2) * scale, -1)
    out = o_w + r16(gamma * a) @ pv
    p = torch.softmax(s, -1)  # the backward's P, from the saved log-sum-exp
    ds = r16(p * (dout @ v.transpose(-1, -2) - (dout * o_w).sum(-1, keepdim=True)))
    dp = dout @ pv.transpose(-1, -2)
    dt = r16(gamma * a * (dp - (a * dp).sum(-1, keepdim=True)))
    grads = ((ds @ k + dt @ pk) * scale, ds.transpose(-1, -2) @ q * scale, r16(p).transpose(-1, -2) @ dout,
             (dt.transpose(-1, -2) @ q * scale).sum(0, keepdim=True),
             (r16(gamma * a).transpose(-1, -2) @ dout).sum(0, keepdim=True))
    return [x.transpose(1, 2) for x in (out, *grads)]


def test_interpreted_bf16_kernels_round_where_the_gpu_rounds():
    """From both sides: the interpreted bf16 kernels match an eager fp32 computation that rounds P, dS and the
    prompt's weights to bf16 exactly where the kernels do far more tightly (after the final cast to bf16) than the
    same computation without those roundings. The reference tests only bound the error from above, so a kernel more
    precise than the GPU's passes them. Planted bug this catches: the interpreter's emulation dropped (P and dS no
    longer rounded to bf16 in the forward, dK/dV and dQ blocks): 40% of the elements then differ."""
    if not zia.INTERPRET:
        pytest.skip("the emulation exists under the interpreter only (a GPU rounds as it does)")
    case = Case(batch=2, seqlen_q=48, seqlen_k=48, nheads=2, nheads_kv=2, headdim=32, prompt_len=5)
    inputs = make_inputs(case, torch.bfloat16, "cpu", seed=7)
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    got = forward_backward(zero_init_attention, inputs, dout)[:6]
    rounded = emulate_bf16_kernels(*inputs, dout, rounded=True)
    unrounded = emulate_bf16_kernels(*inputs, dout, rounded=False)
    for name, a, want, other in zip(NAMES[:6], got, rounded, unrounded, strict=True):
        a = a.float()
        err = (a - want.to(torch.bfloat16).float()).norm().item()
        err_unrounded = (a - other.to(torch.bfloat16).float()).norm().item()
        assert err <= err_unrounded / 10, (f"{name}: {err:.3g} from the GPU's rounding, {err_unrounded:.3g} from "
                                           "the unrounded math: the kernels do not round where the GPU does")


def test_output_layout_and_dtype(device):
    case = CASES["base"]
    q, k, v, pk, pv, gate = make_inputs(case, torch.bfloat16, device)
    out = zero_init_attention(q, k, v, pk, pv, gate)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.is_contiguous()


def test_any_strides_read_in_place(device):
    """(batch, nheads, seqlen, headdim) tensors viewed with transpose give the same bits."""
    case = Case(seqlen_q=33, seqlen_k=70, nheads=4, nheads_kv=2, headdim=32, prompt_batch=2)
    inputs = make_inputs(case, torch.float32, device)
    dout = torch.randn_like(inputs[0])
    base = forward_backward(zero_init_attention, inputs, dout)
    strided = [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in inputs[:5]]
    assert not strided[0].is_contiguous()
    dout_strided = dout.transpose(1, 2).contiguous().transpose(1, 2)
    got = forward_backward(zero_init_attention, strided + [inputs[5]], dout_strided)
    for name, a, b in zip(NAMES, got, base, strict=True):
        assert torch.equal(a, b), name


def test_shared_prompt_equals_expanded_prompt(device):
    """A batch-1 prompt acts like the same prompt given to every sample; its gradient is their sum."""
    case = Case(seqlen_q=17, seqlen_k=40, nheads=4, nheads_kv=2, headdim=32)
    q, k, v, pk, pv, gate = make_inputs(case, torch.float32, device)
    dout = torch.randn_like(q)
    shared = forward_backward(zero_init_attention, [q, k, v, pk, pv, gate], dout)
    pk_b = pk.detach().expand(case.batch, -1, -1, -1).clone().requires_grad_()
    pv_b = pv.detach().expand(case.batch, -1, -1, -1).clone().requires_grad_()
    per_sample = forward_backward(zero_init_attention, [q, k, v, pk_b, pv_b, gate], dout)
    for i, name in enumerate(NAMES):
        want = per_sample[i].sum(0, keepdim=True) if name in ("dprompt_k", "dprompt_v") else per_sample[i]
        torch.testing.assert_close(shared[i], want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_zero_gate_is_plain_causal_attention(gate_act, device):
    """gate = 0: output and token gradients are plain causal attention's, bit for bit; the prompt
    gradients are exactly zero; the gate still gets a (non-zero) gradient."""
    case = Case(seqlen_q=70, seqlen_k=70, nheads=4, nheads_kv=2, headdim=32, gate_act=gate_act)
    q, k, v, pk, pv, gate = make_inputs(case, torch.float32, device)
    zero = torch.zeros_like(gate).requires_grad_()
    dout = torch.randn_like(q)
    got = forward_backward(zero_init_attention, [q, k, v, pk, pv, zero], dout, gate_act=gate_act)
    no_prompt = forward_backward(zero_init_attention, [q, k, v, pk[:, :0], pv[:, :0], zero], dout, gate_act=gate_act)
    for i in range(4):  # out, dq, dk, dv
        assert torch.equal(got[i], no_prompt[i]), NAMES[i]
    assert torch.count_nonzero(got[4]) == 0 and torch.count_nonzero(got[5]) == 0
    assert torch.all(got[6] != 0)

    # and that is causal attention: torch's SDPA in fp64 (GQA heads repeated)
    def sdpa(q, k, v):
        rep = case.nheads // case.nheads_kv
        k, v = (x.repeat_interleave(rep, dim=2).transpose(1, 2) for x in (k, v))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)

    exact = forward_backward(sdpa, as_fp64([q, k, v]), dout.double())
    for i in range(4):
        torch.testing.assert_close(got[i].double(), exact[i], rtol=1e-5, atol=1e-5, msg=NAMES[i])
    # the gate gradient is the reference's
    ref = forward_backward(zero_init_attention_ref, as_fp64([q, k, v, pk, pv, zero]), dout.double(),
                           gate_act=gate_act)
    torch.testing.assert_close(got[6].double(), ref[6], rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def programs_in_random_order(seed: int):
    """Under Triton's interpreter, run each launch's programs in a random order instead of one after another, as a
    GPU may schedule them: a result that depends on the order (atomics, a race) then changes bits."""
    from triton.runtime import interpreter

    rng = random.Random(seed)
    call = interpreter.GridExecutor.__call__

    def shuffled(self, *args, **kwargs):
        fn, pending = self.fn, []

        def deferred(**fn_args):  # called once per program, in order: run them all, shuffled, at the last one
            pending.append((tuple(interpreter.interpreter_builder.grid_idx), fn_args))
            if len(pending) == self._programs:
                rng.shuffle(pending)
                for idx, program_args in pending:
                    interpreter.interpreter_builder.set_grid_idx(*idx)
                    fn(**program_args)

        deferred.__signature__ = inspect.signature(fn)  # the executor binds the launch's arguments by it
        self._programs = math.prod(self.grid)
        self.fn = deferred
        try:
            return call(self, *args, **kwargs)
        finally:
            self.fn = fn

    interpreter.GridExecutor.__call__ = shuffled
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = call


DETERMINISM = Case(batch=3, seqlen_q=200, seqlen_k=200, nheads=4, nheads_kv=2, headdim=32, prompt_len=10)


def test_backward_is_deterministic_whatever_the_program_order(device):
    """The same inputs give bitwise the same gradients, even when the programs run in another order. Many
    partials per element (4 query blocks x 2 heads of a kv group x a prompt shared by a batch of 3 for d prompt,
    4 key blocks for dq): a sum whose order followed the programs' (atomics) would change bits; the shuffled
    runs of the atomic dq path below show that it does."""
    if not zia.INTERPRET:
        pytest.skip("the program order is the GPU's own there: see test_gpu_backward_is_bitwise_reproducible")
    inputs = make_inputs(DETERMINISM, torch.float32, device)
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
    first = forward_backward(zero_init_attention, inputs, dout)
    with programs_in_random_order(1):
        again = forward_backward(zero_init_attention, inputs, dout)
    for name, a, b in zip(NAMES, first, again, strict=True):
        assert torch.equal(a, b), f"{name} changed with the programs' order"

    # the harness can see order dependence: deterministic=False sums dq with atomics
    atomic = forward_backward(zero_init_attention, inputs, dout, deterministic=False)
    with programs_in_random_order(3):
        shuffled = forward_backward(zero_init_attention, inputs, dout, deterministic=False)
    assert not torch.equal(atomic[1], shuffled[1]), "atomics in a shuffled order should change dq's last bits"
    torch.testing.assert_close(atomic[1], shuffled[1], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(atomic[2:], shuffled[2:], strict=True))  # the rest stays fixed


def test_only_prompt_gradients(device):
    """The first adapted layer: q, k, v need no gradient (frozen layers below), only the adapter does."""
    case = Case(seqlen_q=33, seqlen_k=33, nheads=4, nheads_kv=2, headdim=32)
    q, k, v, pk, pv, gate = make_inputs(case, torch.float32, device)
    dout = torch.randn_like(q)
    full = forward_backward(zero_init_attention, [q, k, v, pk, pv, gate], dout)
    frozen = [x.detach() for x in (q, k, v)]
    out = zero_init_attention(*frozen, pk, pv, gate)
    dpk, dpv, dgate = torch.autograd.grad(out, (pk, pv, gate), dout)
    for got, want in zip((out, dpk, dpv, dgate), (full[0], full[4], full[5], full[6]), strict=True):
        assert torch.equal(got, want)


def test_gradcheck_fp64(device):
    case = Case(batch=1, seqlen_q=5, seqlen_k=7, nheads=2, nheads_kv=1, headdim=16, prompt_len=3)
    inputs = [x.detach().double().requires_grad_() for x in make_inputs(case, torch.float64, device)]
    # fast mode checks random projections v^T J u of the Jacobian against finite differences (the
    # entry-by-entry mode needs one interpreted call per input element: minutes on a CPU)
    assert torch.autograd.gradcheck(lambda *a: zero_init_attention(*a), inputs, fast_mode=True)


def test_torch_compile_fullgraph(device):
    """One custom op node with a fake implementation: no graph break, same numbers as eager."""
    case = Case(seqlen_q=17, seqlen_k=17, nheads=4, nheads_kv=2, headdim=32)
    inputs = make_inputs(case, torch.float32, device)

    def f(q, k, v, pk, pv, gate):
        return (zero_init_attention(q, k, v, pk, pv, gate) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = compiled(*inputs)
    grads = torch.autograd.grad(got, inputs)
    want = f(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# packed sequences (varlen)
# ----------------------------------------------------------------------------------------------


def pack(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("prompt", ["shared", "per_sequence", "none"])
def test_varlen_matches_per_sequence_calls(causal, prompt, device):
    check_varlen_against_per_sequence_calls(causal, prompt, device)


def check_varlen_against_per_sequence_calls(causal, prompt, device, gate_rows=False, **op_kwargs):
    lens_q, lens_k = [5, 70, 1, 0, 33], [5, 80, 1, 0, 40]
    nseq, h, hkv, d, p = len(lens_q), 4, 2, 32, 0 if prompt == "none" else 10
    per_sequence_prompt = prompt == "per_sequence"
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    q, k, v = rand(sum(lens_q), h, d), rand(sum(lens_k), hkv, d), rand(sum(lens_k), hkv, d)
    pk, pv = rand(nseq if per_sequence_prompt else 1, p, hkv, d), rand(nseq if per_sequence_prompt else 1, p, hkv, d)
    gate = rand(nseq, h) if gate_rows else rand(h)  # gate_rows: one per sequence and head
    cq, ck = pack(lens_q).to(device), pack(lens_k).to(device)
    inputs = [q, k, v, pk, pv, gate]
    dout = torch.randn(q.shape, generator=g).to(device)
    got = forward_backward(zero_init_attention, inputs, dout, causal=causal, cu_seqlens_q=cq, cu_seqlens_k=ck,
                           max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), **op_kwargs)

    # the same sequences one call each (the dense op), gradients accumulated
    want = [torch.zeros_like(x) for x in [q] + inputs]
    for i in range(nseq):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if lens_q[i] == 0:
            continue
        j = slice(i, i + 1) if per_sequence_prompt else slice(0, 1)
        parts = [x.detach()[None, s].requires_grad_() for x, s in ((q, sq), (k, sk), (v, sk))]
        own_gate = gate.detach()[i] if gate_rows else gate.detach()
        parts += [pk.detach()[j].requires_grad_(), pv.detach()[j].requires_grad_(), own_gate.requires_grad_()]
        res = forward_backward(zero_init_attention, parts, dout[None, sq], causal=causal)
        want[0][sq] = res[0][0]
        want[1][sq] += res[1][0]
        want[2][sk] += res[2][0]
        want[3][sk] += res[3][0]
        want[4][j] += res[4]
        want[5][j] += res[5]
        want[6][i if gate_rows else slice(None)] += res[6]
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# left-padded batches (leftpad_k)
# ----------------------------------------------------------------------------------------------


def test_leftpad_rows_equal_their_unpadded_calls(device):
    """Each row of a left-padded batch equals the op on its real keys alone (its queries after the pad); pad
    keys get zero gradients and change nothing; pad queries get the prompt part alone."""
    case = Case(batch=3, seqlen_q=40, seqlen_k=70, nheads=4, nheads_kv=2, headdim=32, prompt_batch=3)
    pads = (0, 45, 65)
    q, k, v, pk, pv, gate = make_inputs(case, torch.float32, device, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(device)
    leftpad = torch.tensor(pads, dtype=torch.int32, device=device)
    got = forward_backward(zero_init_attention, [q, k, v, pk, pv, gate], dout, leftpad_k=leftpad)
    for b, pad in enumerate(pads):
        first_q = max(0, pad - (case.seqlen_k - case.seqlen_q))  # queries before it are pad queries
        row = [x.detach()[b:b + 1].requires_grad_() for x in (q, k, v, pk, pv)]
        alone = forward_backward(zero_init_attention, [row[0][:, first_q:], row[1][:, pad:], row[2][:, pad:],
                                                       row[3], row[4], gate], dout[b:b + 1, first_q:])
        torch.testing.assert_close(got[0][b, first_q:], alone[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2][b, pad:], alone[2][0], rtol=1e-5, atol=1e-5)  # dk of the real keys
        torch.testing.assert_close(got[3][b, pad:], alone[3][0], rtol=1e-5, atol=1e-5)  # dv
        assert not got[2][b, :pad].any() and not got[3][b, :pad].any()  # pad keys: no gradient
        if first_q:  # pad queries: act(gate) * softmax(q pk^T) pv, no token part, finite
            prompt_only = zero_init_attention_ref(q.detach()[b:b + 1, :first_q], k.detach()[b:b + 1, :1] * 0,
                                                  v.detach()[b:b + 1, :1] * 0, pk.detach()[b:b + 1],
                                                  pv.detach()[b:b + 1], gate.detach(), causal=False)
            torch.testing.assert_close(got[0][b, :first_q], prompt_only[0], rtol=1e-5, atol=1e-5)
    assert all(torch.isfinite(x).all() for x in got)


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing launched
# ----------------------------------------------------------------------------------------------


def _base_inputs():
    q = torch.randn(2, 8, 4, 32)
    k = torch.randn(2, 8, 2, 32)
    pk = torch.randn(1, 3, 2, 32)
    return dict(q=q, k=k, v=k.clone(), prompt_k=pk, prompt_v=pk.clone(), gate=torch.zeros(4))


BAD = [
    ("q_rank", dict(q=torch.randn(8, 4, 32)), ValueError, "q must be 4-D"),
    ("k_batch", dict(k=torch.randn(3, 8, 2, 32), v=torch.randn(3, 8, 2, 32)), ValueError, "k must be"),
    ("v_shape", dict(v=torch.randn(2, 9, 2, 32)), ValueError, "k and v must have the same shape"),
    ("k_dtype", dict(k=torch.randn(2, 8, 2, 32, dtype=torch.float16)), TypeError, "k has dtype"),
    ("q_integer", dict(q=torch.ones(2, 8, 4, 32, dtype=torch.int64)), TypeError, "q must be a floating-point"),
    ("gate_integer", dict(gate=torch.zeros(4, dtype=torch.int32)), TypeError, "gate must be a floating-point"),
    ("heads_not_multiple", dict(k=torch.randn(2, 8, 3, 32), v=torch.randn(2, 8, 3, 32),
                                prompt_k=torch.randn(1, 3, 3, 32), prompt_v=torch.randn(1, 3, 3, 32)),
     ValueError, "multiple of nheads_kv"),
    ("headdim_odd", dict(q=torch.randn(2, 8, 4, 20), k=torch.randn(2, 8, 2, 20), v=torch.randn(2, 8, 2, 20),
                         prompt_k=torch.randn(1, 3, 2, 20), prompt_v=torch.randn(1, 3, 2, 20)),
     ValueError, "headdim must be"),
    ("headdim_large", dict(q=torch.randn(2, 8, 4, 256), k=torch.randn(2, 8, 2, 256), v=torch.randn(2, 8, 2, 256),
                           prompt_k=torch.randn(1, 3, 2, 256), prompt_v=torch.randn(1, 3, 2, 256)),
     ValueError, "headdim must be"),
    ("causal_q_longer", dict(q=torch.randn(2, 9, 4, 32)), ValueError, "seqlen_q <= seqlen_k"),
    ("no_keys", dict(k=torch.randn(2, 0, 2, 32), v=torch.randn(2, 0, 2, 32)), ValueError, "at least one key"),
    ("prompt_batch", dict(prompt_k=torch.randn(3, 3, 2, 32), prompt_v=torch.randn(3, 3, 2, 32)),
     ValueError, "prompt_k must have batch 1"),
    ("prompt_heads", dict(prompt_k=torch.randn(1, 3, 4, 32), prompt_v=torch.randn(1, 3, 4, 32)),
     ValueError, "prompt_k must be"),
    ("prompt_v_shape", dict(prompt_v=torch.randn(1, 4, 2, 32)), ValueError, "prompt_k and prompt_v"),
    ("gate_shape", dict(gate=torch.zeros(3)), ValueError, "gate must have shape"),
    ("k_device", dict(k=torch.randn(2, 8, 2, 32, device="meta")), ValueError, "k is on meta"),
    ("not_tensor", dict(v=[[1.0]]), TypeError, "v must be a torch.Tensor"),
]


@pytest.fixture
def nothing_launched(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an invalid input reached a kernel")

    monkeypatch.setattr(zia, "_zia_fwd_op", fail)
    monkeypatch.setattr(zia, "zero_init_attention_sdpa", fail)


@pytest.mark.parametrize("what,changes,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(what, changes, exc, msg, nothing_launched):
    args = {**_base_inputs(), **changes}
    with pytest.raises(exc, match=msg):
        zero_init_attention(*args.values())


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be a positive finite number"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a positive finite number"),
    (dict(causal=1), TypeError, "causal must be a bool, got int"),
    (dict(causal=torch.tensor(True)), TypeError, "causal must be a bool, got Tensor"),
    (dict(deterministic="yes"), TypeError, "deterministic must be a bool, got str"),
    (dict(gate_act="relu"), ValueError, "gate_act"),
    (dict(max_seqlen_q=8), ValueError, "go with cu_seqlens"),
    (dict(leftpad_k=torch.tensor([0, 1])), ValueError, r"leftpad_k must be an int32 tensor of shape \(batch=2,\)"),
    (dict(leftpad_k=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError, "leftpad_k must be an int32"),
    (dict(leftpad_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError, r"pad keys in \[0, seqlen_k=8\]"),
], ids=["scale", "scale_inf", "scale_nan", "causal_int", "causal_tensor", "deterministic_str", "gate_act",
        "max_seqlen_alone", "leftpad_int64", "leftpad_shape", "leftpad_range"])
def test_bad_options_raise(kwargs, exc, msg, nothing_launched):
    with pytest.raises(exc, match=msg):
        zero_init_attention(*_base_inputs().values(), **kwargs)


def _packed(**changes):
    q, k = torch.randn(10, 4, 32), torch.randn(12, 2, 32)
    pk = torch.randn(1, 3, 2, 32)
    args = dict(q=q, k=k, v=k.clone(), prompt_k=pk, prompt_v=pk.clone(), gate=torch.zeros(4))
    opts = dict(cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen_q=6, max_seqlen_k=7)
    for key, val in changes.items():
        (args if key in args else opts)[key] = val
    return args, opts


@pytest.mark.parametrize("changes,exc,msg", [
    (dict(cu_seqlens_k=None), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), ValueError, "cu_seqlens_q must be a 1-D int32"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
          cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=torch.int32)), ValueError, "cu_seqlens_q must rise"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 11], dtype=torch.int32)), ValueError, "cu_seqlens_k must rise from 0 to 12"),
    (dict(max_seqlen_q=5), ValueError, "max_seqlen_q=5 is less than the longest"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 12], dtype=torch.int32), max_seqlen_k=9), ValueError,
     "seqlen_q <= seqlen_k in every sequence"),
    (dict(prompt_k=torch.randn(3, 3, 2, 32), prompt_v=torch.randn(3, 3, 2, 32)), ValueError,
     "one prompt per sequence"),
    (dict(q=torch.randn(2, 10, 4, 32)), ValueError, "q must be 3-D"),
    (dict(leftpad_k=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "packed sequences .* have no padding"),
], ids=["one_cu_only", "int64_offsets", "falling", "wrong_total", "max_too_small", "causal_q_longer",
        "prompt_batch", "q_rank", "leftpad"])
def test_bad_packed_input_raises(changes, exc, msg, nothing_launched):
    args, opts = _packed(**changes)
    with pytest.raises(exc, match=msg):
        zero_init_attention(*args.values(), **opts)


# ----------------------------------------------------------------------------------------------
# launch limits, scratch memory, allocations, offsets the host never checked
# ----------------------------------------------------------------------------------------------


def recorded_launches(scenario):
    from llama_adapter_triton.kernels.compile_check import record_launches

    return record_launches(zia, scenario)


@pytest.mark.parametrize("batch,varlen", [(2048, False), (4096, True)], ids=["batch2048_x32heads", "4096_packed"])
def test_launch_grids_stay_within_cuda_limits(batch, varlen):
    """Batch 2,048 with 32 heads (65,536 (batch, head) pairs), or 4,096 packed sequences: past the 65,535 that
    CUDA allows on a grid's y and z axes. Every launch's grid is one-dimensional and within the x axis' 2**31 - 1
    (recorded from the real launchers; nothing runs)."""
    from llama_adapter_triton.kernels.compile_check import Scenario

    scenario = Scenario("many rows", headdim=32, seqlen_q=16, seqlen_k=16, nheads=32, nheads_kv=8, varlen=varlen,
                        batch=batch)
    launches = recorded_launches(scenario)
    assert {launch.kernel.__name__ for launch in launches} >= {"_zia_fwd_kernel", "_zia_bwd_dkdv_kernel",
                                                               "_zia_bwd_dq_kernel", "_zia_prompt_grad_kernel"}
    for launch in launches:
        assert len(launch.grid) == 1 and 0 < launch.grid[0] <= 2**31 - 1, (launch.kernel.__name__, launch.grid)
    fwd = next(launch for launch in launches if launch.kernel.__name__ == "_zia_fwd_kernel")
    assert fwd.grid[0] >= batch * 32  # one program per (query block, sequence, head) at least
    with pytest.raises(ValueError, match=r"the forward would launch 2,147,483,648 programs .* past CUDA's grid limit"):
        zia.launch_grid(2**16, 2**15, "the forward")


def test_prompt_gradient_scratch_is_bounded_by_the_tokens():
    """2,000 packed sequences of mixed lengths, the longest 2,048: the prompt-gradient partials are kept for the
    query blocks present, at most cdiv(total, BLOCK_M) + num_seqs of them (the module docstring's bound), not
    num_seqs x cdiv(2048, BLOCK_M). Checked on the allocation the real launcher makes (recorded, nothing runs)."""
    from llama_adapter_triton.kernels.compile_check import Scenario

    lens = torch.randint(1, 400, (2000,), generator=torch.Generator().manual_seed(0))
    lens[7] = 2048
    total, heads, prompt_len, headdim = int(lens.sum()), 32, 10, 128
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    block_m = 64
    num_parts, blk_off = zia.prompt_grad_blocks(cu, 2000, 2048, total, block_m)
    present = int(((lens + block_m - 1) // block_m).sum())
    assert num_parts <= -(-total // block_m) + 2000 and num_parts >= present
    assert blk_off.tolist() == [0, *((lens + block_m - 1) // block_m).cumsum(0).tolist()]
    bound_bytes = 2 * heads * (-(-total // block_m) + 2000) * prompt_len * headdim * 4
    old_bytes = 2 * 2000 * heads * (2048 // block_m) * prompt_len * headdim * 4
    assert bound_bytes < old_bytes / 5  # about 1 GB where it was 5.4 GB

    # the launcher allocates exactly that (a small packed batch through the recorded launches)
    scenario = Scenario("packed", headdim=64, seqlen_q=100, seqlen_k=100, nheads=4, nheads_kv=2, varlen=True, batch=5)
    dq = next(launch for launch in recorded_launches(scenario) if launch.kernel.__name__ == "_zia_bwd_dq_kernel")
    names = zia._zia_bwd_dq_kernel.arg_names
    part = dq.args[names.index("DPK_PART")]
    block = dq.kwargs["BLOCK_M"]
    assert part.shape == (4, min(5 * -(-100 // block), -(-500 // block) + 5), 10, 64) and part.dtype == torch.float32


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """torch.empty / empty_like inside the op's launchers hand out NaN-filled memory: whatever the kernels leave
    unwritten shows."""
    def poisoned(alloc):
        def wrapper(*args, **kwargs):
            t = alloc(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper

    monkeypatch.setattr(zia.torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(zia.torch, "empty_like", poisoned(torch.empty_like))


@pytest.mark.parametrize("name", ["base", "leftpad_chunk", "leftpad_decode", "q_shorter_gqa8to2"])
def test_every_output_element_is_written(name, device, poisoned_allocations):
    """Outputs and gradients are allocated without zero-filling: every element must be written by a kernel."""
    inputs = make_inputs(CASES[name], torch.float32, device)
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2)).to(device)
    got = forward_backward(zero_init_attention, inputs, dout, **kwargs_of(CASES[name], device))
    for n, x in zip(NAMES, got, strict=True):
        assert torch.isfinite(x).all(), f"{n} holds memory no kernel wrote"
    frozen = [x.detach() for x in inputs[:3]]
    out = zero_init_attention(*frozen, *inputs[3:], **kwargs_of(CASES[name], device))
    grads = torch.autograd.grad(out, inputs[3:], dout)
    assert all(torch.isfinite(g).all() for g in grads)


def test_every_output_element_is_written_packed(device, poisoned_allocations):
    check_varlen_against_per_sequence_calls(causal=True, prompt="per_sequence", device=device)


def test_seq_bounds_clamp_any_offsets(device):
    """Whatever cu_seqlens or leftpad_k hold (on a GPU nobody checked them), every row a kernel touches lies inside
    the tensors: 0 <= start, start + length <= total, length <= max_seqlen; and ok says whether they were valid."""
    cu_q = torch.tensor([0, 5, 3, -7, 2**31 - 1, -2**31, 40, 41, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 9, 12, 60, 61, -1, 44, 50], dtype=torch.int32)
    out = torch.zeros(8, 5, dtype=torch.int64, device=device)
    _bounds_kernel[(8,)](cu_q.to(device), cu_k.to(device), None, out, 16, 16, 50, 50, True, False)
    out = out.cpu()
    for b in range(8):
        q_start, k_start, sq, sk, ok = out[b].tolist()
        assert 0 <= q_start and q_start + sq <= 50 and 0 <= sq <= 16, (b, out[b])
        assert 0 <= k_start and k_start + sk <= 50 and 0 <= sk <= 16, (b, out[b])
        lq, lk = int(cu_q[b + 1]) - int(cu_q[b]), int(cu_k[b + 1]) - int(cu_k[b])
        valid = (0 <= cu_q[b] <= cu_q[b + 1] <= 50 and lq <= 16 and 0 <= cu_k[b] <= cu_k[b + 1] <= 50 and lk <= 16)
        assert ok == valid, b
        if valid:
            assert (q_start, k_start, sq, sk) == (cu_q[b], cu_k[b], lq, lk)
    pads = torch.tensor([-3, 0, 7, 16, 17, 2**31 - 1], dtype=torch.int32)
    out = torch.zeros(6, 5, dtype=torch.int64, device=device)
    _bounds_kernel[(6,)](None, None, pads.to(device), out, 16, 16, 0, 0, False, True)
    out = out.cpu()
    for b in range(6):
        _, k_start, _, sk, ok = out[b].tolist()
        assert 0 <= k_start and k_start + sk == 16 and ok == (0 <= int(pads[b]) <= 16), (b, out[b])


def test_offsets_out_of_range_give_nan_never_a_plausible_answer(device):
    """Offsets that the host did not check (CUDA tensors): the sequences or rows whose own offsets are out of range
    get NaN, the others their right answer; the backward runs without a fault."""
    h, hkv, d, p = 4, 2, 32, 5
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(40, n, d, generator=g).to(device) for n in (h, hkv, hkv))
    pk, pv = torch.randn(1, p, hkv, d, generator=g).to(device), torch.randn(1, p, hkv, d, generator=g).to(device)
    gamma = torch.full((3, h), 0.5, device=device)  # (rows, nheads): 3 sequences, then 3 batch rows
    cu_good = torch.tensor([0, 10, 25, 40], dtype=torch.int32, device=device)
    cu_bad = torch.tensor([0, 10, 60, 40], dtype=torch.int32, device=device)  # sequence 1 runs past the end
    scale = d**-0.5
    good, *_ = zia._zia_fwd_op(q, k, v, pk, pv, gamma, True, scale, cu_good, cu_good, 15, 15, None, True, False)
    bad, o_w, lse_w, lse_p = zia._zia_fwd_op(q, k, v, pk, pv, gamma, True, scale, cu_bad, cu_bad, 15, 15, None, True,
                                             True)
    assert torch.equal(bad[:10], good[:10]) and torch.isnan(bad[10:25]).all()
    grads = zia._zia_bwd_op(torch.ones_like(q), q, k, v, pk, pv, gamma, o_w, lse_w, lse_p, True, scale, cu_bad,
                            cu_bad, 15, 15, None, True, True, True, True)
    assert [x.shape for x in grads[:3]] == [q.shape, k.shape, v.shape]

    qd, kd = q[:30].view(3, 10, h, d), k[:36].view(3, 12, hkv, d)
    pads = torch.tensor([2, 13, -1], dtype=torch.int32, device=device)  # rows 1 and 2 out of [0, 12]
    out, *_ = zia._zia_fwd_op(qd, kd, kd, pk, pv, gamma, True, scale, None, None, 0, 0, pads, True, False)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


def test_compiled_rows_no_sequence_covers_are_nan(device):
    """Under torch.compile the host skips its offset checks: cu_seqlens_q=[0, 3, 5] for 9 rows once gave rows 5-8 as
    uninitialised memory (finite values), a too-small max_seqlen_q some finite wrong rows. Every row no sequence
    covers, and every row of a sequence out of range, is NaN; the others are eager's."""
    h, hkv, d = 2, 1, 32
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(9, n, d, generator=g).to(device) for n in (h, hkv, hkv))
    pk, pv = (torch.randn(1, 2, hkv, d, generator=g).to(device) for _ in range(2))
    gate = torch.full((h,), 0.3, device=device)

    def f(q, k, v, pk, pv, gate, cu_q, cu_k, max_q, max_k):
        return zero_init_attention(q, k, v, pk, pv, gate, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                   max_seqlen_k=max_k)

    compiled = torch.compile(f, backend="aot_eager" if device == "cpu" else "inductor")
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    want = f(q[:5], k[:5], v[:5], pk, pv, gate, cu, cu, 3, 3)  # eager, checked: the covered rows alone
    got = compiled(q, k, v, pk, pv, gate, cu, cu, 3, 3)
    torch.testing.assert_close(got[:5], want)
    assert torch.isnan(got[5:]).all(), got[5:, 0, :4]
    cu = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)  # the second sequence is 6 rows, not max 4
    got = compiled(q, k, v, pk, pv, gate, cu, cu, 4, 6)
    torch.testing.assert_close(got[:3], want[:3])
    assert torch.isnan(got[3:]).all(), got[3:, 0, :4]


# ----------------------------------------------------------------------------------------------
# the suite's own guards: the kernels ran, the oracle is independent and fp64
# ----------------------------------------------------------------------------------------------


def test_an_op_test_fails_when_the_eager_fallback_runs(monkeypatch):
    """With the kernels switched off (as TRITON_INTERPRET=0 on a CPU would), the op falls back to the eager
    reference, and the op tests then fail instead of comparing the reference with itself."""
    monkeypatch.setattr(zia, "INTERPRET", False)
    monkeypatch.setattr(zia, "HAS_TRITON", zia.HAS_TRITON and torch.cuda.is_available())
    with pytest.raises(AssertionError, match="eager fallback"):
        check_against_reference(CASES["no_prompt"], torch.float32, "cpu")


@pytest.mark.slow
def test_triton_interpret_0_in_the_environment_still_runs_the_kernels():
    """A CPU run with TRITON_INTERPRET=0 set: tests/conftest.py sets it to 1, and the op tests run the kernels."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels run compiled whatever TRITON_INTERPRET says")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_output_layout_and_dtype or test_an_op_test_fails"], env=env,
                         capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout + res.stderr


def test_a_wrong_gate_activation_in_the_op_is_caught(monkeypatch):
    """The oracle writes its own tanh: an op whose activation were wrong (sin for tanh) fails the comparison."""
    monkeypatch.setattr(zia, "_gate_act", lambda gate, act: torch.sin(gate) if act == "tanh" else gate)
    with pytest.raises(AssertionError, match="out: error"):
        check_against_reference(CASES["hd16"], torch.float32, "cpu")


def test_the_fp64_reference_is_fp64_throughout():
    """zero_init_attention_ref on fp64 inputs against the formula written out in fp64 (explicit exp and sums, no
    torch.softmax): equal to 1e-13, output and every gradient. An fp32 softmax anywhere would be 1e-7 off."""
    case = Case(batch=2, seqlen_q=9, seqlen_k=13, nheads=4, nheads_kv=2, headdim=16, prompt_len=5, prompt_batch=2)
    inputs = as_fp64(make_inputs(case, torch.float32, "cpu"))
    dout = torch.randn(2, 9, 4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def by_hand(q, k, v, pk, pv, gate):
        s = 16**-0.5
        k, v, pk, pv = (x.repeat_interleave(2, dim=2) for x in (k, v, pk, pv))  # kv head h // 2 serves head h
        t = torch.einsum("bihd,bjhd->bhij", q, k) * s
        t = t.masked_fill(torch.ones(9, 13, dtype=torch.bool).tril(13 - 9).logical_not(), float("-inf"))
        e = torch.exp(t - t.amax(-1, keepdim=True))
        tok = torch.einsum("bhij,bjhd->bihd", e / e.sum(-1, keepdim=True), v)
        tp = torch.einsum("bihd,bphd->bhip", q, pk) * s
        ep = torch.exp(tp - tp.amax(-1, keepdim=True))
        gamma = (torch.exp(2 * gate) - 1) / (torch.exp(2 * gate) + 1)  # tanh, spelled out
        return tok + gamma[None, None, :, None] * torch.einsum("bhip,bphd->bihd", ep / ep.sum(-1, keepdim=True), pv)

    ref = forward_backward(zero_init_attention_ref, inputs, dout)
    want = forward_backward(by_hand, as_fp64(inputs), dout)
    for name, a, b in zip(NAMES, ref, want, strict=True):
        assert a.dtype == torch.float64 and max_err(a, b) < 1e-13, name


# ----------------------------------------------------------------------------------------------
# GPU only: compiled kernels at a realistic size (skipped without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("headdim", [64, 128])
def test_gpu_llama_shape(dtype, headdim):
    case = Case(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=8, nheads_kv=8, headdim=headdim)
    check_against_reference(case, dtype, "cuda")
    gqa = Case(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=8, nheads_kv=2, headdim=headdim, prompt_batch=2)
    check_against_reference(gqa, dtype, "cuda", seed=5)
    check_against_reference(gqa, dtype, "cuda", seed=6, deterministic=False)
    padded = Case(batch=3, seqlen_q=700, seqlen_k=1030, nheads=8, nheads_kv=2, headdim=headdim, leftpad=(0, 300, 1000))
    check_against_reference(padded, dtype, "cuda", seed=7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_backward_is_bitwise_reproducible():
    """Seqlen 1,024, a prompt shared by a batch of 4, GQA 8:2: thousands of programs that the GPU schedules as it
    likes; three backward passes give the same bits (deterministic=True)."""
    case = Case(batch=4, seqlen_q=1024, seqlen_k=1024, nheads=8, nheads_kv=2, headdim=128, prompt_len=10)
    inputs = make_inputs(case, torch.bfloat16, "cuda")
    dout = torch.randn_like(inputs[0])
    first = forward_backward(zero_init_attention, inputs, dout)
    for _ in range(2):
        again = forward_backward(zero_init_attention, inputs, dout)
        for name, a, b in zip(NAMES, first, again, strict=True):
            assert torch.equal(a, b), name
    check_varlen_against_per_sequence_calls(causal=True, prompt="shared", device="cuda")


# ----------------------------------------------------------------------------------------------
# a gate per batch row (per packed sequence) and head: gate (batch or num_seqs, nheads)
# ----------------------------------------------------------------------------------------------

ROW_GATES = {
    "rows_gqa": Case(batch=3, seqlen_q=33, seqlen_k=33, nheads=4, nheads_kv=2, headdim=32, prompt_batch=3,
                     gate_rows=True),
    # a shared prompt, and rows with 0, 2 and 16 pad queries (the last row sees one real key)
    "rows_leftpad": Case(batch=3, seqlen_q=17, seqlen_k=40, nheads=2, nheads_kv=1, headdim=32, leftpad=(0, 25, 39),
                         gate_rows=True),
}


@pytest.mark.parametrize("name,dtype,deterministic", [
    ("rows_gqa", torch.float32, True), ("rows_gqa", torch.bfloat16, False),
    ("rows_leftpad", torch.float32, False), ("rows_leftpad", torch.bfloat16, True),
], ids=["gqa-fp32", "gqa-bf16-atomic_dq", "leftpad-fp32-atomic_dq", "leftpad-bf16"])
def test_per_row_gate_matches_fp64_reference(name, dtype, deterministic, device):
    """Row b's prompt part scaled by act(gate[b, h]): output and every gradient, d gate (batch, nheads) included,
    against the fp64 reference under the module's bar."""
    check_against_reference(ROW_GATES[name], dtype, device, seed=13, deterministic=deterministic)


def test_reference_per_row_gate_is_each_rows_own_gate():
    """The oracle itself: with a (batch, nheads) gate, each row equals the reference on that row alone with its
    own 1-D gate (so that a reference broadcasting the gate the wrong way cannot pass the op's tests)."""
    case = Case(batch=3, seqlen_q=6, seqlen_k=9, nheads=4, nheads_kv=2, headdim=16, prompt_len=3, prompt_batch=3)
    q, k, v, pk, pv, _ = (x.detach().double() for x in make_inputs(case, torch.float64, "cpu"))
    gate = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = zero_init_attention_ref(q, k, v, pk, pv, gate)
    for b in range(3):
        row = [x[b:b + 1] for x in (q, k, v, pk, pv)]
        torch.testing.assert_close(out[b:b + 1], zero_init_attention_ref(*row, gate[b]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("prompt,deterministic", [("shared", False), ("per_sequence", True)])
def test_per_sequence_gate_packed(prompt, deterministic, device):
    """Packed, gate (num_seqs, nheads): each sequence equals its own dense call with its own row of the gate, every
    gradient included (an empty sequence's gate row gets 0)."""
    check_varlen_against_per_sequence_calls(True, prompt, device, gate_rows=True, deterministic=deterministic)


def test_equal_rows_of_a_per_row_gate_give_the_1d_gates_bits(device):
    """A (batch, nheads) gate whose rows are all equal is the (nheads,) gate: bitwise the same output and token and
    prompt gradients; its d gate summed over the rows is the 1-D gate's. Likewise (1,) against its (batch, nheads)
    repetition."""
    case = Case(batch=2, seqlen_q=17, seqlen_k=30, nheads=4, nheads_kv=2, headdim=32, prompt_len=5)
    inputs = make_inputs(case, torch.float32, device, seed=21)
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(22)).to(device)
    for gate in (inputs[5].detach(), torch.tensor([0.4], device=device)):
        one = forward_backward(zero_init_attention, [*inputs[:5], gate.requires_grad_()], dout)
        rows = gate.detach().expand(case.batch, case.nheads).clone().requires_grad_()
        per_row = forward_backward(zero_init_attention, [*inputs[:5], rows], dout)
        for name, a, b in zip(NAMES[:-1], one[:-1], per_row[:-1], strict=True):
            assert torch.equal(a, b), name
        assert per_row[6].shape == (case.batch, case.nheads)
        torch.testing.assert_close(per_row[6].sum_to_size(gate.shape), one[6])


def test_packed_gate_gradient_ignores_rows_no_sequence_covers(device, poisoned_allocations):
    """Packed rows no sequence covers (cu_seqlens_q ending early, a sequence longer than max_seqlen_q: offsets
    nobody checked, on a GPU or under torch.compile) keep whatever their Delta_p held (here NaN): each sequence's
    d gate sums its own rows alone."""
    h, hkv, d = 2, 1, 32
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(12, n, d, generator=g).to(device) for n in (h, hkv, hkv))
    pk, pv = (torch.randn(1, 3, hkv, d, generator=g).to(device) for _ in range(2))
    dout = torch.randn(q.shape, generator=g).to(device)
    gamma = torch.tensor([[0.3, -0.2], [0.5, 0.1], [-0.4, 0.7]], device=device)  # (num_seqs, nheads)

    def dgamma(cu, max_q, rows):
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
        x = [t[rows] for t in (q, k, v, dout)]
        out, o_w, lse_w, lse_p = zia._zia_fwd_op(*x[:3], pk, pv, gamma, True, d**-0.5, cu, cu, max_q, max_q, None,
                                                 True, True)
        return zia._zia_bwd_op(x[3], *x[:3], pk, pv, gamma, o_w, lse_w, lse_p, True, d**-0.5, cu, cu, max_q, max_q,
                               None, True, True, True, True)[5]

    # three sequences, rows 0-2 and 4-6 of q, the second one empty; every row covered
    want = dgamma([0, 3, 3, 6], 3, [0, 1, 2, 4, 5, 6])
    assert want.shape == (3, h) and torch.isfinite(want).all() and not want[1].any()
    tail = [7, 8, 9, 10, 11]
    torch.testing.assert_close(dgamma([0, 3, 3, 6], 3, [0, 1, 2, 4, 5, 6] + tail), want, rtol=0, atol=0)
    # max_seqlen_q=3: the first sequence's row 3 is nobody's (it lies before the empty second sequence's start)
    torch.testing.assert_close(dgamma([0, 4, 4, 7], 3, list(range(7)) + tail), want, rtol=0, atol=0)


def test_per_row_gate_torch_compile_fullgraph(device):
    """The fake implementations give d gate (batch, nheads): compiled, no graph break, eager's numbers."""
    case = Case(batch=2, seqlen_q=9, seqlen_k=9, nheads=2, nheads_kv=1, headdim=16, prompt_len=3, gate_rows=True)
    inputs = make_inputs(case, torch.float32, device, seed=2)

    def f(q, k, v, pk, pv, gate):
        return (zero_init_attention(q, k, v, pk, pv, gate) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(f(*inputs), inputs)
    assert got[5].shape == (2, 2)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gate,msg", [
    (torch.zeros(3, 4), r"gate must have shape \(4,\) .*\(1,\) .*\(batch=2, 4\) .*got \(3, 4\)"),
    (torch.zeros(2, 2), r"gate must have shape .*\(batch=2, 4\) .*got \(2, 2\)"),
    (torch.zeros(2, 1), r"gate must have shape .*\(batch=2, 4\) .*got \(2, 1\)"),  # expand it: no row-only gate
    (torch.zeros(2, 4, 1), r"gate must have shape .*got \(2, 4, 1\)"),
    (torch.zeros(()), r"gate must have shape .*got \(\)"),
], ids=["rows_not_batch", "heads", "row_shared_by_heads", "3d", "scalar"])
def test_bad_gate_shape_raises(gate, msg, nothing_launched):
    with pytest.raises(ValueError, match=msg):
        zero_init_attention(*{**_base_inputs(), "gate": gate}.values())


@pytest.mark.parametrize("gate", [torch.zeros(3, 4), torch.zeros(10, 4)], ids=["num_seqs_plus_1", "total_q"])
def test_bad_packed_gate_shape_raises(gate, nothing_launched):
    args, opts = _packed(gate=gate)
    with pytest.raises(ValueError, match=r"gate must have shape \(4,\) .*\(num_seqs=2, 4\) .*got \("):
        zero_init_attention(*args.values(), **opts)
