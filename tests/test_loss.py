"""train/loss.py: the chunked linear + cross-entropy gives the plain formulation's loss and gradients, any vocabulary
size and chunking, through a quantized output layer too, without its (targets x vocab) tensors; Liger on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from model_utils import VOCAB, tiny_model

from llama_adapter_triton.bench.memory import TensorMemory
from llama_adapter_triton.train.loss import default_chunk_rows, linear_cross_entropy


def _case(n: int, dim: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    output = nn.Linear(dim, vocab, bias=False, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        output.weight.copy_(torch.randn(vocab, dim, generator=g) * 0.5)
    hidden = torch.randn(n, dim, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, output, targets


def _loss_and_grad(hidden, output, targets, **kwargs):
    hidden.grad = None
    loss = linear_cross_entropy(hidden, output, targets, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad.clone()


@pytest.mark.parametrize("n, dim, vocab, chunk_rows", [(37, 32, 97, 8), (64, 48, 1000, None), (64, 48, 1000, 7),
                                                        (200, 16, 50257, None), (5, 32, 300, 64), (300, 64, 128, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_the_plain_loss_and_gradients(n, dim, vocab, chunk_rows, dtype):
    """Each row is computed as in the plain formulation; only the order of the sum over the chunks and the matmuls'
    blocking for fewer rows differ: within twice the plain formulation's own error against fp64, plus a roundoff."""
    hidden, output, targets = _case(n, dim, vocab, dtype)
    want_loss, want_grad = _loss_and_grad(hidden, output, targets, impl="full")
    loss, grad = _loss_and_grad(hidden, output, targets, impl="chunked", chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    ref_loss, ref_grad = _loss_and_grad(hidden.detach().double().requires_grad_(), output.double(), targets,
                                        impl="full")
    rows = chunk_rows or default_chunk_rows(n, vocab, dim)
    chunks = -(-n // rows)
    for got, want, ref, sums in ((loss, want_loss, ref_loss, chunks), (grad, want_grad, ref_grad, 1)):
        roundoff = sums * torch.finfo(torch.float32 if got is loss else dtype).eps * ref.abs().max().item()
        plain_err = (want.double() - ref).abs().max().item()
        assert (got.double() - ref).abs().max().item() <= 2 * plain_err + roundoff
    assert default_chunk_rows(n, vocab, dim) == max(32, -(-n // -(-vocab // dim)))


@pytest.mark.parametrize("impl", ["chunked", "full"])
def test_the_loss_is_an_fp32_cross_entropy_of_the_logits(impl):
    """bf16 logits (as the output layer gives them) into a cross-entropy computed in fp32: the summed loss equals an
    independent log-sum-exp of those logits in fp64 to fp32's precision (a bf16 cross-entropy errs by ~1e-3). The
    chunked and the plain formulation share _chunk_loss, so comparing them cannot see this. Planted bug this
    catches: _chunk_loss without its .float() (the cross-entropy in bf16)."""
    hidden, output, targets = _case(64, 48, 1000, torch.bfloat16)
    with torch.no_grad():
        logits = output(hidden).double()
    want = (logits.logsumexp(-1) - logits.gather(1, targets[:, None])[:, 0]).sum().item()
    loss = linear_cross_entropy(hidden, output, targets, impl=impl, chunk_rows=16)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want) <= 1e-5 * want, (loss.item(), want)


def test_chunked_through_a_quantized_output_layer_and_no_targets():
    from llama_adapter_triton.model.quantize import quantized_linear

    hidden, output, targets = _case(24, 64, 300, torch.float32)
    quantized = quantized_linear(output.weight.detach().clone(), "nf4", compute_dtype=torch.float32)
    want_loss, want_grad = _loss_and_grad(hidden, quantized, targets, impl="full")
    loss, grad = _loss_and_grad(hidden, quantized, targets, chunk_rows=5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    empty = linear_cross_entropy(hidden[:0], output, targets[:0])
    assert empty.item() == 0 and empty.dtype == torch.float32


def test_chunked_holds_no_targets_x_vocab_tensor():
    """The plain formulation peaks at 3 fp32 (targets x vocab) tensors in its backward; chunked at one chunk's."""
    hidden, output, targets = _case(1024, 32, 4096, torch.float32)
    full_logits = 1024 * 4096 * 4
    peaks = {}
    for impl in ("full", "chunked"):
        with TensorMemory(existing=[hidden, output.weight]) as mem:
            start = mem.current
            _loss_and_grad(hidden, output, targets, impl=impl)
        peaks[impl] = mem.peak - start
    assert peaks["full"] > 2.5 * full_logits
    assert peaks["chunked"] < 0.2 * full_logits, peaks


def test_bad_arguments():
    hidden, output, targets = _case(4, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(hidden, output, targets, impl="fused")
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, output, targets[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(hidden, output, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="liger-kernel"):  # CPU tensors
        linear_cross_entropy(hidden, output, targets, impl="liger")


def test_model_head_false_gives_the_final_norm_output():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 9))
    at = torch.tensor([3, 8, 17])
    with torch.no_grad():
        torch.testing.assert_close(model.output(model(tokens, logits_at=at, head=False)), model(tokens, logits_at=at))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_fused_linear_cross_entropy_on_cuda():
    pytest.importorskip("liger_kernel")
    hidden, output, targets = _case(4096, 256, 32000, torch.bfloat16)
    hidden, output, targets = hidden.detach().cuda().requires_grad_(), output.cuda(), targets.cuda()
    want_loss, want_grad = _loss_and_grad(hidden.float().detach().requires_grad_(), output.float(), targets,
                                          impl="full")
    got = {impl: _loss_and_grad(hidden, output, targets, impl=impl) for impl in ("full", "liger", "auto")}
    torch.testing.assert_close(got["auto"][0], got["liger"][0], rtol=0, atol=0)
    for impl in ("liger", "full"):  # both within bf16's error of the fp32 formulation
        torch.testing.assert_close(got[impl][0], want_loss, rtol=2e-3, atol=0)
        err = (got[impl][1].float() - want_grad).abs().max().item()
        bf16_err = (got["full"][1].float() - want_grad).abs().max().item()
        assert err <= 2 * bf16_err + 1e-6, (impl, err, bf16_err)
