"""The op's fallback without Triton (kernels/sdpa_fallback.py: two scaled_dot_product_attention calls) against the
fp64 eager reference: output and every gradient, for each feature of the op's contract.

The function is called directly (no interpreter: these tests are fast). The bar is flash-attn's, as in
tests/test_zero_init_attention.py: at most twice the error of the reference itself run in the input dtype, plus
two fp32 roundoffs of the largest value involved.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import llama_adapter_triton.kernels.sdpa_fallback as sdpa_fallback
import llama_adapter_triton.kernels.zero_init_attn as zia
from llama_adapter_triton import zero_init_attention, zero_init_attention_ref
from llama_adapter_triton.kernels.sdpa_fallback import zero_init_attention_sdpa

NAMES = ("out", "dq", "dk", "dv", "dprompt_k", "dprompt_v", "dgate")
FP32_EPS = torch.finfo(torch.float32).eps


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    seqlen_q: int = 13
    seqlen_k: int = 13
    nheads: int = 4
    nheads_kv: int = 4
    headdim: int = 16
    prompt_len: int = 5
    prompt_batch: int = 1  # 1: shared by the batch; batch: one per row
    causal: bool = True
    gate_act: str = "tanh"
    gate_shape: str = "head"  # "head" (nheads,), "one" (1,), "row" (batch, nheads)
    leftpad: tuple[int, ...] | None = None


CASES = {
    "causal": Case(),
    "not_causal": Case(causal=False, gate_act="identity"),
    "q_shorter_causal": Case(seqlen_q=5, seqlen_k=17, prompt_batch=2),  # a KV cache: bottom-right alignment
    "q_shorter_not_causal": Case(seqlen_q=5, seqlen_k=17, causal=False),
    "decode": Case(batch=3, seqlen_q=1, seqlen_k=21, prompt_batch=3),
    "gqa": Case(nheads=8, nheads_kv=2, seqlen_q=7, seqlen_k=11),
    "mqa_decode": Case(nheads=4, nheads_kv=1, seqlen_q=1, seqlen_k=9),
    "leftpad": Case(batch=3, seqlen_q=9, seqlen_k=9, leftpad=(4, 0, 9)),  # pad queries; a row all padding
    "leftpad_decode_gqa": Case(batch=3, seqlen_q=1, seqlen_k=12, nheads_kv=2, leftpad=(11, 0, 12)),
    "leftpad_not_causal": Case(batch=2, seqlen_q=4, seqlen_k=10, causal=False, leftpad=(3, 10)),
    "no_prompt": Case(prompt_len=0),
    "gate_one": Case(gate_shape="one", nheads_kv=2),
    "gate_per_row": Case(batch=3, gate_shape="row", prompt_batch=3),
    "gate_per_row_leftpad": Case(batch=2, gate_shape="row", nheads_kv=2, leftpad=(6, 1)),
}


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v, prompt_k, prompt_v (in dtype), the gate (fp32, the parameter) and dout, leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    b, tq, tk, h, hkv, d, p = (case.batch, case.seqlen_q, case.seqlen_k, case.nheads, case.nheads_kv, case.headdim,
                               case.prompt_len)
    tensors = [_rand(gen, b, tq, h, d, dtype=dtype), _rand(gen, b, tk, hkv, d, dtype=dtype),
               _rand(gen, b, tk, hkv, d, dtype=dtype), _rand(gen, case.prompt_batch, p, hkv, d, dtype=dtype),
               _rand(gen, case.prompt_batch, p, hkv, d, dtype=dtype)]
    gate_shape = {"head": (h,), "one": (1,), "row": (b, h)}[case.gate_shape]
    gate = _rand(gen, *gate_shape, dtype=torch.float32)
    return [t.requires_grad_() for t in tensors + [gate]], _rand(gen, b, tq, h, d, dtype=dtype)


def reference(q, k, v, pk, pv, gate, *, causal, gate_act, leftpad_k=None, softmax_scale=None):
    """The eager reference; a per-row gate (rows, nheads) row by row, each row with its own 1-D gate (the rows
    are independent, and autograd through the slices sums the shared tensors' gradients)."""
    if gate.dim() == 1:
        return zero_init_attention_ref(q, k, v, pk, pv, gate, causal=causal, gate_act=gate_act, leftpad_k=leftpad_k,
                                       softmax_scale=softmax_scale)
    rows = []
    for b in range(q.shape[0]):
        p = slice(b, b + 1) if pk.shape[0] > 1 else slice(0, 1)
        lp = None if leftpad_k is None else leftpad_k[b:b + 1]
        rows.append(zero_init_attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk[p], pv[p], gate[b],
                                            causal=causal, gate_act=gate_act, leftpad_k=lp,
                                            softmax_scale=softmax_scale))
    return torch.cat(rows)


def forward_backward(fn, inputs, dout, **kwargs):
    """Output and the six gradients (zeros where a tensor took no part: the prompts and the gate without a
    prompt)."""
    out = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def as_leaves(inputs, dtype=None):
    return [x.detach().to(dtype or x.dtype).requires_grad_() for x in inputs]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def dgate_roundoff(inputs, dout) -> float:
    """d gate is a sum over every row and channel of dout * O_p (O_p, the prompt part, a convex combination of
    prompt_v's rows), times act'(gate): one fp32 roundoff per term bounds the order in which it is summed. The
    reference happens to sum in another order, so its own error alone is too small a bar for this one reduction."""
    *_, pv, gate = inputs
    terms = dout.detach().double().abs().sum(dim=tuple(range(dout.dim() - 2)) + (dout.dim() - 1,))  # (nheads,)
    dact = 1 - torch.tanh(gate.detach().double()) ** 2  # tanh' <= 1: a bound for identity as well
    terms = terms.sum() if gate.numel() == 1 else terms.max()  # one gate for all heads: their sum
    return FP32_EPS * (terms * pv.detach().abs().max() * dact.max()).item() if pv.numel() else 0.0


def assert_within_bar(got, exact, low, dtype, dgate_extra=0.0):
    """flash-attn's bar: twice the error of the reference in the input dtype plus two fp32 roundoffs (and the
    roundoff of d gate's sum)."""
    scale = max(r.abs().max().item() for r in exact if r.numel())
    for name, a, ref, lo in zip(NAMES, got, exact, low, strict=True):
        assert a.shape == ref.shape, (name, a.shape, ref.shape)
        assert torch.isfinite(a).all(), f"{name} is not finite"
        err, bar = max_err(a, ref), 2 * max_err(lo, ref) + 2 * FP32_EPS * scale
        bar += dgate_extra if name == "dgate" else 0.0
        assert err <= bar, f"{name}: error {err:.3g} against fp64 exceeds {bar:.3g} (2x the reference's in {dtype})"


def check_case(case: Case, dtype: torch.dtype, seed: int = 0) -> None:
    inputs, dout = make_inputs(case, dtype, seed)
    leftpad = None if case.leftpad is None else torch.tensor(case.leftpad, dtype=torch.int32)
    kw = dict(causal=case.causal, gate_act=case.gate_act, leftpad_k=leftpad)
    scale = case.headdim**-0.5
    got = forward_backward(zero_init_attention_sdpa, inputs, dout, softmax_scale=scale, **kw)
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[-1].dtype == torch.float32
    exact = forward_backward(reference, as_leaves(inputs, torch.float64), dout.double(), **kw)
    low = forward_backward(reference, as_leaves(inputs), dout, **kw)
    assert_within_bar(got, exact, low, dtype, dgate_roundoff(inputs, dout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["causal", "gate_per_row_leftpad"])
def test_without_autograd_the_same_output(name, dtype):
    """Under no_grad (generation) the prompt part is added into the token part's buffer: the same output,
    bitwise, as with autograd."""
    case = CASES[name]
    inputs, _ = make_inputs(case, dtype)
    leftpad = None if case.leftpad is None else torch.tensor(case.leftpad, dtype=torch.int32)
    kw = dict(causal=case.causal, gate_act=case.gate_act, leftpad_k=leftpad, softmax_scale=0.25)
    with torch.no_grad():
        plain = zero_init_attention_sdpa(*inputs, **kw)
    graphed = zero_init_attention_sdpa(*inputs, **kw)
    assert graphed.requires_grad and not plain.requires_grad and plain.dtype == dtype and plain.is_contiguous()
    assert torch.equal(plain, graphed.detach())


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_fp64_reference(name):
    check_case(CASES[name], torch.float32)


@pytest.mark.parametrize("name", ["causal", "q_shorter_causal", "decode", "gqa", "leftpad", "gate_per_row"])
def test_bf16_within_twice_the_reference_error(name):
    check_case(CASES[name], torch.bfloat16, seed=1)


def test_fp16_and_fp64():
    check_case(CASES["gqa"], torch.float16, seed=2)
    check_case(CASES["leftpad"], torch.float64, seed=2)


class NanForBlindRows:
    """SDPA as some backends and torch versions compute it: a query whose mask row is all False gets NaN, in the
    output and in the backward (a softmax over nothing), whatever gradient reaches it."""

    @staticmethod
    def scaled_dot_product_attention(q, k, v, attn_mask=None, **kwargs):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is None:
            return out
        return out * torch.where(attn_mask.any(-1, keepdim=True), 1.0, float("nan"))


@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION", "nan_for_blind_rows"])
def test_pad_queries_get_the_prompt_part_alone(backend, monkeypatch):
    """A query that sees no token key (left padding): the token part is exactly 0, no NaN, and no gradient
    reaches the token keys from it; with either of SDPA's CPU backends, and with one that gives an all-masked
    row NaN."""
    if backend == "nan_for_blind_rows":
        monkeypatch.setattr(sdpa_fallback, "F", NanForBlindRows)
        return check_pad_queries()
    with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
        check_pad_queries()


def check_pad_queries():
    case = CASES["leftpad"]
    inputs, dout = make_inputs(case, torch.float32)
    q, k, v, pk, pv, gate = inputs
    leftpad = torch.tensor(case.leftpad, dtype=torch.int32)
    out = zero_init_attention_sdpa(q, k, v, pk, pv, gate, causal=True, softmax_scale=0.25, gate_act="tanh",
                                   leftpad_k=leftpad)
    prompt_only = zero_init_attention_sdpa(q, k, v, pk, pv, gate, causal=True, softmax_scale=0.25, gate_act="tanh",
                                           leftpad_k=torch.full_like(leftpad, case.seqlen_k))
    row2 = out[2]  # all padding: every query is a pad query
    torch.testing.assert_close(row2, prompt_only[2], rtol=0, atol=0)
    torch.testing.assert_close(out[0, :4], prompt_only[0, :4], rtol=0, atol=0)  # queries 0..3 see no key >= 4
    out[2].sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(gate.grad).all()
    assert (k.grad[2] == 0).all() and (v.grad[2] == 0).all()


def test_transposed_inputs_give_the_same_result():
    """(batch, nheads, seqlen, headdim).transpose(1, 2) inputs, read as they are: the same output, contiguous."""
    case = CASES["gqa"]
    inputs, _ = make_inputs(case, torch.float32)
    strided = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in inputs[:5]] + [inputs[5].detach()]
    assert not strided[0].is_contiguous()
    kw = dict(causal=True, softmax_scale=0.3, gate_act="tanh")
    got = zero_init_attention_sdpa(*strided, **kw)
    want = zero_init_attention_sdpa(*(t.detach() for t in inputs), **kw)
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# packed sequences (cu_seqlens)
# --------------------------------------------------------------------------------------------------
PACKED = {  # (query lengths, key lengths), prompt per sequence?, gate shape, causal
    "shared_prompt": (([3, 1, 6, 0], [3, 5, 6, 2]), False, "head", True),
    "prompt_per_sequence": (([4, 2, 5], [4, 7, 5]), True, "one", True),
    "gate_per_sequence": (([2, 5, 3], [6, 5, 3]), False, "row", True),
    "gate_and_prompt_per_sequence_not_causal": (([2, 5, 3], [4, 2, 3]), True, "row", False),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_sequences_match_the_reference_one_at_a_time(name):
    """Sequences never see each other: each one's output and the gradients equal the reference run on each
    sequence alone (with its own prompt and gate row)."""
    (lq, lk), per_seq_prompt, gate_shape, causal = PACKED[name]
    n, h, hkv, d, p = len(lq), 4, 2, 16, 3
    gen = torch.Generator().manual_seed(5)
    q, dout = _rand(gen, sum(lq), h, d, dtype=torch.float32), _rand(gen, sum(lq), h, d, dtype=torch.float32)
    k, v = (_rand(gen, sum(lk), hkv, d, dtype=torch.float32) for _ in range(2))
    pk, pv = (_rand(gen, n if per_seq_prompt else 1, p, hkv, d, dtype=torch.float32) for _ in range(2))
    gate = _rand(gen, *{"head": (h,), "one": (1,), "row": (n, h)}[gate_shape], dtype=torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v, pk, pv, gate)]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32) for lens in (lq, lk))

    def one_at_a_time(q, k, v, pk, pv, gate):
        outs = []
        for i in range(n):
            sq, sk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            sp = slice(i, i + 1) if per_seq_prompt else slice(0, 1)
            g = gate[i] if gate.dim() == 2 else gate
            outs.append(zero_init_attention_ref(q[None, sq], k[None, sk], v[None, sk], pk[sp], pv[sp], g,
                                                causal=causal, softmax_scale=0.3)[0])
        return torch.cat(outs)

    got = forward_backward(zero_init_attention_sdpa, inputs, dout, causal=causal, softmax_scale=0.3,
                           gate_act="tanh", cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert got[0].shape == q.shape and got[0].is_contiguous()
    exact = forward_backward(one_at_a_time, as_leaves(inputs, torch.float64), dout.double())
    low = forward_backward(one_at_a_time, as_leaves(inputs), dout)
    assert_within_bar(got, exact, low, torch.float32, dgate_roundoff(inputs, dout))


# --------------------------------------------------------------------------------------------------
# the op's dispatch
# --------------------------------------------------------------------------------------------------
def test_op_without_triton_calls_the_sdpa_fallback(monkeypatch):
    """zero_init_attention with the Triton kernels off (a CPU without TRITON_INTERPRET=1) runs the SDPA fallback,
    with softmax_scale resolved, and never the eager reference."""
    monkeypatch.setattr(zia, "_use_triton", lambda q: False)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return zero_init_attention_sdpa(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("the op ran the eager reference")

    monkeypatch.setattr(zia, "zero_init_attention_sdpa", spy, raising=False)
    monkeypatch.setattr(zia, "zero_init_attention_ref", no_reference, raising=False)
    case = CASES["gqa"]
    inputs, dout = make_inputs(case, torch.float32)
    got = forward_backward(zero_init_attention, inputs, dout)
    assert len(calls) == 1 and calls[0]["softmax_scale"] == case.headdim**-0.5 and calls[0]["causal"] is True
    exact = forward_backward(reference, as_leaves(inputs, torch.float64), dout.double(), causal=True,
                             gate_act="tanh")
    low = forward_backward(reference, as_leaves(inputs), dout, causal=True, gate_act="tanh")
    assert_within_bar(got, exact, low, torch.float32, dgate_roundoff(inputs, dout))
    # packed sequences too
    q, k, v = (t.detach()[0] for t in inputs[:3])
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    zero_init_attention(q, k[:7], v[:7], *inputs[3:], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                        max_seqlen_k=4)
    assert len(calls) == 2 and calls[1]["cu_seqlens_q"] is cu


def test_model_through_the_fallback_generates_as_the_eager_formulation(monkeypatch):
    """The CPU path end to end (the demo's, `generate --device cpu`'s): with the Triton kernels off, an adapted model
    (GQA, V2) gives the eager formulation's logits, and a left-padded batch generates with the KV cache, through the
    fallback, what each row generates alone."""
    from model_utils import VOCAB, tiny_model
    from test_adapter_v2 import set_v2_

    from llama_adapter_triton import AdapterConfig, generate, set_attention_impl

    calls = []
    monkeypatch.setattr(zia, "_use_triton", lambda q: False)
    monkeypatch.setattr(zia, "zero_init_attention_sdpa",
                        lambda *a, **kw: calls.append(1) or zero_init_attention_sdpa(*a, **kw))
    adapter = AdapterConfig(adapter_len=4, adapter_layers=2, version=2)
    model, eager = (set_v2_(tiny_model(adapter, gqa=True, seed=3), seed=4) for _ in range(2))
    set_attention_impl(eager, "eager")  # the official formulation: materialised scores, the eager reference
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), eager(tokens), atol=1e-4, rtol=1e-4)
    assert calls, "the model did not run the SDPA fallback"
    prompts = [tokens[0, :9].tolist(), tokens[1, :4].tolist()]
    batch = generate(model, prompts, max_new_tokens=5)
    assert batch == [generate(eager, [p], max_new_tokens=5)[0] for p in prompts]
