"""kernels.zero_init_attention against the fp64 eager reference: output and every gradient.

On a CPU the Triton kernels run under Triton's interpreter (tests/conftest.py); on a GPU the same
tests run them compiled. fp16 / bf16 are held to flash-attn's bar: error against the fp64
reference at most twice the error of the same math done by PyTorch in that dtype, plus 1e-5.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kernels.zero_init_attn as zia
from kernels import zero_init_attention, zero_init_attention_ref


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
    # one real key: fp32 only, like "seqlen1" (a single key's dk cancels exactly in fp64, while the backward's
    # Delta comes from the output as stored, rounded to bf16 / fp16: flash-attn's bar does not cover that)
    "leftpad_one_key": Case(seqlen_q=1, seqlen_k=70, nheads=2, nheads_kv=2, headdim=32, leftpad=(69, 0)),
    "leftpad_chunk": Case(seqlen_q=17, seqlen_k=130, nheads=2, nheads_kv=2, headdim=32, leftpad=(120, 3)),
    "leftpad_noncausal_all_pad": Case(seqlen_q=33, seqlen_k=17, nheads=2, nheads_kv=2, headdim=32, causal=False,
                                      leftpad=(17, 5)),
}
LOW_PRECISION_CASES = ["base", "decode_kvcache", "q_shorter_gqa8to2", "mqa_hd80_identity", "noncausal_q_longer",
                       "leftpad_prefill_gqa", "leftpad_decode"]
NAMES = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v", "dgate")


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dt).requires_grad_()

    q = rand(case.batch, case.seqlen_q, case.nheads, case.headdim)
    k = rand(case.batch, case.seqlen_k, case.nheads_kv, case.headdim)
    v = rand(case.batch, case.seqlen_k, case.nheads_kv, case.headdim)
    pk = rand(case.prompt_batch, case.prompt_len, case.nheads_kv, case.headdim)
    pv = rand(case.prompt_batch, case.prompt_len, case.nheads_kv, case.headdim)
    gate = rand(case.nheads if case.gate_per_head else 1, dt=torch.float32)  # the parameter stays fp32
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


def check_against_reference(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> None:
    inputs = make_inputs(case, dtype, device, seed)
    dout = torch.randn(case.batch, case.seqlen_q, case.nheads, case.headdim,
                       generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    got = forward_backward(zero_init_attention, inputs, dout, **kwargs_of(case, device))
    exact = forward_backward(zero_init_attention_ref, as_fp64(inputs), dout.double(), **kwargs_of(case, device))
    # the same math done by PyTorch in the input dtype: the error any implementation may have
    torch_err = forward_backward(zero_init_attention_ref, [x.detach().requires_grad_() for x in inputs], dout,
                                 **kwargs_of(case, device))
    for name, a, ref, low in zip(NAMES, got, exact, torch_err, strict=True):
        assert a.shape == ref.shape and a.dtype == (torch.float32 if name == "dgate" else dtype), name
        err, bar = max_err(a, ref), 2 * max_err(low, ref) + 1e-5
        assert err <= bar, f"{name}: error {err:.3g} against fp64 exceeds {bar:.3g} (2x PyTorch's {dtype} error)"


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_fp64_reference(name, device):
    check_against_reference(CASES[name], torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_low_precision_within_twice_torch_error(name, dtype, device):
    check_against_reference(CASES[name], dtype, device, seed=3)


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


def test_backward_is_deterministic(device):
    case = Case(seqlen_q=97, seqlen_k=97, nheads=4, nheads_kv=2, headdim=32, prompt_len=10)
    inputs = make_inputs(case, torch.bfloat16, device)
    dout = torch.randn_like(inputs[0])
    first = forward_backward(zero_init_attention, inputs, dout)
    second = forward_backward(zero_init_attention, inputs, dout)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


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
    lens_q, lens_k = [5, 70, 1, 0, 33], [5, 80, 1, 0, 40]
    nseq, h, hkv, d, p = len(lens_q), 4, 2, 32, 0 if prompt == "none" else 10
    per_sequence_prompt = prompt == "per_sequence"
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    q, k, v = rand(sum(lens_q), h, d), rand(sum(lens_k), hkv, d), rand(sum(lens_k), hkv, d)
    pk, pv = rand(nseq if per_sequence_prompt else 1, p, hkv, d), rand(nseq if per_sequence_prompt else 1, p, hkv, d)
    gate = rand(h)
    cq, ck = pack(lens_q).to(device), pack(lens_k).to(device)
    inputs = [q, k, v, pk, pv, gate]
    dout = torch.randn(q.shape, generator=g).to(device)
    got = forward_backward(zero_init_attention, inputs, dout, causal=causal, cu_seqlens_q=cq, cu_seqlens_k=ck,
                           max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))

    # the same sequences one call each (the dense op), gradients accumulated
    want = [torch.zeros_like(x) for x in [q] + inputs]
    for i in range(nseq):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if lens_q[i] == 0:
            continue
        j = slice(i, i + 1) if per_sequence_prompt else slice(0, 1)
        parts = [x.detach()[None, s].requires_grad_() for x, s in ((q, sq), (k, sk), (v, sk))]
        parts += [pk.detach()[j].requires_grad_(), pv.detach()[j].requires_grad_(), gate.detach().requires_grad_()]
        res = forward_backward(zero_init_attention, parts, dout[None, sq], causal=causal)
        want[0][sq] = res[0][0]
        want[1][sq] += res[1][0]
        want[2][sk] += res[2][0]
        want[3][sk] += res[3][0]
        want[4][j] += res[4]
        want[5][j] += res[5]
        want[6] += res[6]
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
    monkeypatch.setattr(zia, "zero_init_attention_ref", fail)


@pytest.mark.parametrize("what,changes,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(what, changes, exc, msg, nothing_launched):
    args = {**_base_inputs(), **changes}
    with pytest.raises(exc, match=msg):
        zero_init_attention(*args.values())


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(gate_act="relu"), ValueError, "gate_act"),
    (dict(max_seqlen_q=8), ValueError, "go with cu_seqlens"),
    (dict(leftpad_k=torch.tensor([0, 1])), ValueError, r"leftpad_k must be an int32 tensor of shape \(batch=2,\)"),
    (dict(leftpad_k=torch.tensor([0, 1, 2], dtype=torch.int32)), ValueError, "leftpad_k must be an int32"),
    (dict(leftpad_k=torch.tensor([0, 9], dtype=torch.int32)), ValueError, r"pad keys in \[0, seqlen_k=8\]"),
], ids=["scale", "gate_act", "max_seqlen_alone", "leftpad_int64", "leftpad_shape", "leftpad_range"])
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
