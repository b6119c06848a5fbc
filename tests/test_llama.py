"""The model: presets, RoPE, zero-init, the adapter's gradients and dtypes, KV cache, padding, visual token,
packed sequences."""

from __future__ import annotations

import copy

import pytest
import torch
from model_utils import VOCAB, copy_base, tiny_config, tiny_model

from llama_adapter_triton import (
    AdapterConfig,
    LLaMA,
    LLaMAConfig,
    adapter_layers,
    adapter_state_dict,
    cast_base,
    mark_only_adapter_as_trainable,
    set_attention_impl,
    zero_init_attention_ref,
)
from llama_adapter_triton.model.llama import rope_frequencies

ADAPTER = AdapterConfig(adapter_len=4, adapter_layers=1)


def tokens(batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def base_of(model: LLaMA) -> LLaMA:
    """The same weights without the adapter."""
    return copy_base(model, LLaMA(model.config)).eval()


@pytest.mark.parametrize("name, params", [("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320),
                                          ("llama2-70b", 68_976_648_192), ("llama3-8b", 8_030_261_248),
                                          ("llama3.1-70b", 70_553_706_496), ("llama3.2-1b", 1_235_814_400),
                                          ("mistral-7b", 7_241_732_096), ("mistral-7b-v0.3", 7_248_023_552),
                                          ("qwen2.5-0.5b", 494_032_768)])
def test_presets_have_the_published_sizes(name, params):
    with torch.device("meta"):
        model = LLaMA(LLaMAConfig.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == params


def test_7b_adapter_has_1_229_760_parameters():
    with torch.device("meta"):
        model = LLaMA(LLaMAConfig.from_name("llama-7b"), AdapterConfig(adapter_len=10, adapter_layers=30))
    adapter = adapter_state_dict(model)
    assert sum(t.numel() for t in adapter.values()) == 1_229_760  # 30 * (10 * 4096 + 32): 4.9 MB in fp32
    assert set(adapter) == {f"layers.{n}.attention.{p}" for n in range(2, 32) for p in ("adapter_prompt", "gate")}
    assert adapter["layers.2.attention.adapter_prompt"].shape == (10, 4096)
    assert adapter["layers.31.attention.gate"].shape == (32,)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    with torch.device("meta"):
        per_layer = LLaMA(LLaMAConfig.from_name("llama-7b"), AdapterConfig(gate="layer"))
    assert sum(t.numel() for t in adapter_state_dict(per_layer).values()) == 30 * (10 * 4096 + 1)


def test_config_and_adapter_config_errors():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        LLaMAConfig(dim=192, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="unknown LLaMA preset 'llama-8b'"):
        LLaMAConfig.from_name("llama-8b")
    with pytest.raises(ValueError, match="AdapterConfig.gate must be one of"):
        AdapterConfig(gate="token")
    with pytest.raises(ValueError, match="AdapterConfig.adapter_len must be a positive int"):
        AdapterConfig(adapter_len=0)
    with pytest.raises(ValueError, match=r"adapter_layers \(3\) exceeds the model's n_layers \(2\)"):
        LLaMA(tiny_config(), AdapterConfig(adapter_layers=3))


def test_rope_frequencies_match_transformers_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = LLaMAConfig.from_name("llama3.1-8b")
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_frequencies(ours), expected, atol=0, rtol=1e-6)
    plain = rope_frequencies(LLaMAConfig.from_name("llama3-8b"))
    assert torch.equal(plain[:10], expected[:10]) and (plain[-10:] > 7.9 * expected[-10:]).all()


def test_rope_is_relative_without_adapter():
    """Shifting every position leaves a plain LLaMA unchanged (RoPE encodes distances), not an adapted one."""
    model = tiny_model(ADAPTER)
    x = tokens(2, 12)
    shifted = torch.arange(7, 19).expand(2, 12)
    with torch.no_grad():
        base = base_of(model)
        torch.testing.assert_close(base(x, positions=shifted), base(x), atol=1e-4, rtol=1e-4)
        assert (model(x, positions=shifted) - model(x)).abs().max() > 1e-3  # prompt keys carry no RoPE


@pytest.mark.gpu_leg
@pytest.mark.parametrize("gate, gate_act", [("head", "tanh"), ("layer", "identity")])
def test_zero_init_gives_the_base_model(gate, gate_act, device, triton_kernels_only):
    adapter = AdapterConfig(adapter_len=4, adapter_layers=2, gate=gate, gate_act=gate_act)
    model = tiny_model(adapter, gqa=True).to(device)
    base = base_of(model).to(device)
    x = tokens(2, 13).to(device)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() > 1e-2  # non-zero gates: the adapter acts
        for m in adapter_layers(model).values():
            m.reset_adapter()  # fresh adapter: random prompt, zero gate
        torch.testing.assert_close(model(x), base(x), atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward > 0


def test_only_the_adapter_trains_and_lower_layers_keep_no_graph():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    for m in adapter_layers(model).values():
        m.reset_adapter()
    mark_only_adapter_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))

    grad_enabled = []
    for layer in model.layers:
        layer.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(tokens(2, 9)).flatten(0, 1), tokens(2, 9, seed=1).flatten())
    loss.backward()
    assert grad_enabled == [False, True]  # layer 0 (below the adapter) ran without autograd
    gate, prompt = model.layers[1].attention.gate, model.layers[1].attention.adapter_prompt
    assert gate.grad.abs().min() > 0  # zero-init: the gate learns from step one...
    assert prompt.grad.abs().max() == 0  # ...and the prompt only once the gate opens
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_bf16_base_with_fp32_adapter(monkeypatch):
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    x = tokens(1, 11)
    with torch.no_grad():
        expected = model(x)
    cast_base(model, torch.bfloat16)
    assert model.layers[1].attention.wk.weight.dtype == torch.bfloat16
    assert model.layers[1].attention.gate.dtype == model.layers[1].attention.adapter_prompt.dtype == torch.float32
    mark_only_adapter_as_trainable(model)
    out = model(x)
    assert out.dtype == torch.bfloat16
    # flash-attn's bar: the error against fp32 is at most twice that of the eager op in bf16
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr("llama_adapter_triton.model.adapter.zero_init_attention", zero_init_attention_ref)
        eager = model(x)
    error, eager_error = (out.float() - expected).abs().max(), (eager.float() - expected).abs().max()
    assert error <= 2 * eager_error + 1e-3 and eager_error < 0.2
    out.float().square().mean().backward()
    assert model.layers[1].attention.gate.grad.dtype == torch.float32
    assert model.layers[1].attention.adapter_prompt.grad.abs().max() > 0


@pytest.mark.gpu_leg
def test_kv_cache_prefill_in_chunks_then_decode_equals_full_forward(device, triton_kernels_only):
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=True).to(device)
    x = tokens(2, 12).to(device)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(2, 16)
        parts = [model(x[:, :5], input_pos=0), model(x[:, 5:10], input_pos=5),  # chunked prefill (q < k)
                 model(x[:, 10:11], input_pos=10), model(x[:, 11:12], input_pos=11)]  # decode steps
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)
        # a new prefill into the same cache recomputes the prompt keys/values (here with a visual token)
        visual = torch.randn(2, 128).to(device)
        again = model(x[:, :6], input_pos=0, visual=visual)
        model.clear_cache()
        torch.testing.assert_close(again, model(x[:, :6], visual=visual), atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward > 0


@pytest.mark.gpu_leg
def test_left_padded_rows_equal_each_row_alone(device, triton_kernels_only):
    """A left-padded batch (pads masked, positions per row), with a per-sample visual token, row by row."""
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=True).to(device)
    lengths = [9, 5, 9]
    x = tokens(3, 9).to(device)
    visual = torch.randn(3, 128, generator=torch.Generator().manual_seed(3)).to(device)
    left_pad = [9 - n for n in lengths]
    with torch.no_grad():
        batch = model(x, left_pad=left_pad, visual=visual)
        assert batch.isfinite().all()
        for b, n in enumerate(lengths):
            alone = model(x[b:b + 1, 9 - n:], visual=visual[b:b + 1])
            torch.testing.assert_close(batch[b:b + 1, 9 - n:], alone, atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward > 0


def test_visual_token_is_added_to_the_prompts():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    x = tokens(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x, visual=torch.zeros(2, 128)), model(x), atol=1e-4, rtol=1e-4)
        visual = torch.randn(2, 128)
        assert (model(x, visual=visual) - model(x)).abs().max() > 1e-3
        # adding v to the visual token equals adding it to every prompt row
        layer = model.layers[1].attention
        with_visual = model(x, visual=visual[:1].expand(2, 128))
        layer.adapter_prompt += visual[0]
        torch.testing.assert_close(model(x), with_visual, atol=1e-4, rtol=1e-4)


def test_forward_rejects_bad_input():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor \(batch, seqlen\), got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=rf"tokens must be ids in \[0, {VOCAB}\), got values from -1 to 3"):
        model(torch.tensor([[1, 3, -1]]))
    with pytest.raises(ValueError, match=r"left_pad must hold one count per row \(batch 2\)"):
        model(tokens(2, 5), left_pad=[1])
    with pytest.raises(ValueError, match=r"left_pad .* \[0, 5\) so that every row keeps a real token"):
        model(tokens(2, 5), left_pad=[0, 5])
    with pytest.raises(ValueError, match=r"visual must be \(batch=2, dim=128\), got \(2, 64\)"):
        model(tokens(2, 5), visual=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="model has no adapter"):
        base_of(model)(tokens(2, 5), visual=torch.zeros(2, 128))
    with pytest.raises(ValueError, match=r"positions must be \(batch=2, seqlen=5\) or \(5,\), got \(4,\)"):
        model(tokens(2, 5), positions=torch.arange(4))
    model.setup_cache(2, 8)
    with pytest.raises(ValueError, match=r"KV cache holds batch 2 x 8 slots; .* input_pos 6\.\.10 do not fit"):
        model(tokens(2, 5), input_pos=6)
    model.clear_cache()
    with pytest.raises(ValueError, match=r"logits_at=5 is not a position of tokens of seqlen 5"):
        model(tokens(2, 5), logits_at=5)
    with pytest.raises(ValueError, match=r"logits_at must be an int position or a 1-D integer tensor .* torch.bool"):
        model(tokens(2, 5), logits_at=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logits_at indices must lie in \[0, 10\) .* got values from 0 to 10"):
        model(tokens(2, 5), logits_at=torch.tensor([0, 10]))


def test_logits_at_selects_positions_of_the_full_logits():
    """An int is every row's position; flat indices pick positions across rows; gradients flow alike."""
    model = tiny_model(ADAPTER)
    mark_only_adapter_as_trainable(model)
    x = tokens(3, 7)
    full = model(x)
    torch.testing.assert_close(model(x, logits_at=-1), full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, logits_at=2), full[:, 2], atol=1e-5, rtol=1e-5)
    at = torch.tensor([20, 0, 8, 9])  # row 2 pos 6, row 0 pos 0, row 1 pos 1 and 2
    picked = model(x, logits_at=at)
    torch.testing.assert_close(picked, full.flatten(0, 1)[at], atol=1e-5, rtol=1e-5)
    assert model(x, logits_at=torch.tensor([], dtype=torch.long)).shape == (0, VOCAB)
    gate = adapter_layers(model)["layers.1.attention"].gate
    (g_full,) = torch.autograd.grad(full.flatten(0, 1)[at].square().sum(), gate)
    (g_picked,) = torch.autograd.grad(picked.square().sum(), gate)
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_picked, g_full, atol=1e-5, rtol=1e-5)


def _packed(lengths: list[int], seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random sequences of these lengths, their packed row (1, T) and cu_seqlens."""
    seqs = [tokens(1, n, seed + i)[0] for i, n in enumerate(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, torch.cat(seqs)[None], cu


@pytest.mark.gpu_leg
@pytest.mark.parametrize("gqa, visual", [(False, False), (True, True)])
def test_packed_sequences_equal_each_sequence_alone(gqa, visual, device, triton_kernels_only):
    """Logits of a packed row equal each sequence run alone (RoPE restarting, no attention across sequences);
    the adapter's gradients equal the sum of the per-sequence gradients. One plain and one adapted layer."""
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=gqa).to(device)
    mark_only_adapter_as_trainable(model)
    lengths = [5, 1, 17, 9]
    seqs, row, cu = _packed(lengths)
    seqs, row, cu = [s.to(device) for s in seqs], row.to(device), cu.to(device)
    vis = torch.randn(len(lengths), 128, generator=torch.Generator().manual_seed(5)).to(device) if visual else None
    weights = torch.randn(1, sum(lengths), VOCAB, generator=torch.Generator().manual_seed(6)).to(device)

    packed = model(row, cu_seqlens=cu, max_seqlen=max(lengths), visual=vis)
    (packed * weights).sum().backward()
    packed_grads = {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}
    model.zero_grad()

    start = 0
    for i, seq in enumerate(seqs):
        alone = model(seq[None], visual=None if vis is None else vis[i:i + 1])
        torch.testing.assert_close(packed[:, start:start + len(seq)], alone, atol=1e-5, rtol=1e-5)
        (alone * weights[:, start:start + len(seq)]).sum().backward()  # grads accumulate over the sequences
        start += len(seq)
    for name, p in adapter_state_dict(model).items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-5)

    # positions derived from cu_seqlens equal the loader's explicit ones; a shared row is not per-sequence
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    with torch.no_grad():
        torch.testing.assert_close(model(row, positions=positions, cu_seqlens=cu, visual=vis), packed.detach())
        assert (model(row, visual=None if vis is None else vis[:1]) - packed).abs().max() > 1e-2
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0


def test_packed_sequences_reject_bad_input():
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1))
    _, row, cu = _packed([3, 4])
    with pytest.raises(ValueError, match=r"tokens must be \(1, total\), got \(2, 7\)"):
        model(row.expand(2, 7), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D int32 tensor .* got torch.int64 \(3,\)"):
        model(row, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to 7 .* got \[0, 3, 6\]"):
        model(row, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"visual must be \(num_seqs=2, dim=128\), got \(1, 128\)"):
        model(row, cu_seqlens=cu, visual=torch.zeros(1, 128))
    with pytest.raises(ValueError, match="max_seqlen goes with cu_seqlens"):
        model(row, max_seqlen=4)
    with pytest.raises(ValueError, match=r"max_seqlen must be an int of at least the longest sequence \(4\), got 3"):
        model(row, cu_seqlens=cu, max_seqlen=3)
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="packed sequences .* no KV cache"):
        model(row, cu_seqlens=cu)
    model.clear_cache()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_base_within_twice_pytorchs_bf16_error(triton_kernels_only):
    """A bf16 base with its fp32 adapter, compiled kernels, against the same model in fp64 (also on the GPU): the
    suite's bar, at most twice the error of PyTorch's own bf16 computation (the eager formulation, in bf16, on the
    same weights) plus two fp32 roundoffs of the logits' scale."""
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), gqa=True)
    x = tokens(2, 12).cuda()
    with torch.no_grad():
        exact = copy.deepcopy(model).double().cuda()(x)
        gpu = cast_base(model.cuda(), torch.bfloat16)
        out = gpu(x)
        set_attention_impl(gpu, "eager")
        eager = gpu(x)
    assert out.dtype == torch.bfloat16 and gpu.layers[1].attention.gate.dtype == torch.float32
    error, eager_error = (out.double() - exact).abs().max(), (eager.double() - exact).abs().max()
    assert error <= 2 * eager_error + 2 * torch.finfo(torch.float32).eps * exact.abs().max(), (error, eager_error)
    assert triton_kernels_only.forward > 0
