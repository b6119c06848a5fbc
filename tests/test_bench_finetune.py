"""bench/bench_finetune.py and the model's attention switch (set_attention_impl) it benchmarks.

- The eager implementation (the official code's formulation) gives the fused path's logits and adapter gradients
  on a tiny model, padded or left-padded, MHA or GQA, with and without a KV cache; it refuses packed batches.
- The smoke configuration runs end to end under pytest-benchmark (providers checked, then timed; CSV rows,
  plot and summary in a temporary folder, never in bench/results/).
- A wrong provider stops the benchmark before it is timed; bad command lines name the argument.
"""

from __future__ import annotations

import pytest
import torch
from model_utils import VOCAB, tiny_model

from model import AdapterConfig, adapter_state_dict, mark_only_adapter_as_trainable, set_attention_impl
from model.llama import eager_attention

ON_CUDA = torch.cuda.is_available()


def tokens(batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The attention switch: eager (official formulation) == fused
# --------------------------------------------------------------------------------------------------
def _loss_and_grads(model, x, impl, **kwargs):
    set_attention_impl(model, impl)
    model.zero_grad(set_to_none=True)
    logits = model(x, **kwargs)
    loss = logits.float().square().mean()
    loss.backward()
    return logits.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}


@pytest.mark.parametrize("gqa", [False, True])
def test_eager_impl_gives_the_fused_logits_and_adapter_gradients(gqa):
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=gqa)  # layer 0 plain, layer 1 adapted
    mark_only_adapter_as_trainable(model)
    x = tokens(2, 21)
    fused, fused_grads = _loss_and_grads(model, x, "fused")
    eager, eager_grads = _loss_and_grads(model, x, "eager")
    assert model.layers[0].attention.attn_impl == model.layers[1].attention.attn_impl == "eager"
    torch.testing.assert_close(eager, fused, atol=1e-4, rtol=1e-4)
    for name, g in fused_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(eager_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert set_attention_impl(model, "fused") == "eager"  # returns the previous implementation


def test_eager_impl_with_kv_cache_and_left_padding_equals_fused():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=True)
    x = tokens(3, 12, seed=1)
    out = {}
    with torch.no_grad():
        for impl in ("fused", "eager"):
            set_attention_impl(model, impl)
            model.setup_cache(3, 16)
            steps = [model(x[:, :9], input_pos=0, left_pad=[0, 3, 5])]  # prefill of left-padded rows
            steps += [model(x[:, t:t + 1], input_pos=t, left_pad=[0, 3, 5]) for t in range(9, 12)]  # decode
            model.clear_cache()
            out[impl] = torch.cat(steps, dim=1)
    assert out["eager"].isfinite().all()
    torch.testing.assert_close(out["eager"], out["fused"], atol=1e-4, rtol=1e-4)


def test_eager_attention_is_the_official_formulation():
    """Against an independent write-up of the official LLaMA code: additive -inf mask, fp32 softmax."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 4, 16, generator=g) for _ in range(3))
    mask = torch.full((7, 7), float("-inf")).triu(1)
    scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / 4.0 + mask
    want = (torch.softmax(scores.float(), -1) @ v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(eager_attention(q, k, v, None, True), want)
    torch.testing.assert_close(eager_attention(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril(), False), want)
    # a decode step (one query over the cache) sees every key
    one = eager_attention(q[:, -1:], k, v, None, False)
    torch.testing.assert_close(one, want[:, -1:])


def test_eager_impl_refuses_packed_batches_and_bad_names():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    set_attention_impl(model, "eager")
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed sequences .* need attention impl 'fused'"):
        model(tokens(1, 9), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="impl must be one of fused, eager, got 'flash'"):
        set_attention_impl(model, "flash")
