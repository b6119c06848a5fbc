"""LLaMA-Adapter V2 (model/adapter.py, version=2): bias and scale tuning, trainable norms, early fusion; its
parameter count, zero-init, gradients against an eager write-up of the paper's math, its file round trip, and the
official V2 release's and litgpt's adapter_v2 files imported by logits.

The references here share no code with model/: they compute from the parameters (or the peers' files) by name.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_utils import VOCAB, randomize_, tiny_config

from model import (
    AdapterConfig,
    LLaMA,
    LLaMAConfig,
    adapter_state_dict,
    load_adapter,
    load_checkpoint,
    mark_only_adapter_as_trainable,
    read_adapter_config,
    save_adapter,
    save_checkpoint,
)
from model.adapter import base_name

V2 = AdapterConfig(adapter_len=4, adapter_layers=1, version=2)


@torch.no_grad()
def set_v2_(model: LLaMA, seed: int = 1) -> LLaMA:
    """Every adapter parameter away from its fresh value: prompts N(0, 1), gates N(0, 0.5), biases N(0, 0.1), scales
    and norms 1 + N(0, 0.1), the projector N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in adapter_state_dict(model).items():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith(("scale", "norm.weight")):
            p.copy_(1 + 0.1 * noise)
        elif name.endswith("gate"):
            p.copy_(0.5 * noise)
        elif name.endswith("adapter_prompt"):
            p.copy_(noise)
        else:
            p.copy_(0.1 * noise)
    return model


def v2_model(adapter: AdapterConfig = V2, seed: int = 0, **config) -> LLaMA:
    torch.manual_seed(seed)
    return set_v2_(randomize_(LLaMA(tiny_config(**config), adapter), seed), seed + 1).eval()


# ---------------------------------------------------------------------------------------------------------------
# The eager formulation: LLaMA-Adapter V2 as the paper and the official code write it, from the parameters by name


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's RoPE: (x[2i], x[2i+1]) as a complex number times exp(i t theta^(-2i/hd)); x (B, T, h, hd)."""
    T, hd = x.shape[1], x.shape[3]
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), theta ** (-torch.arange(0, hd, 2, dtype=torch.float64)
                                                                          / hd))
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous()) * torch.polar(
        torch.ones_like(freqs), freqs)[None, :, None]
    return torch.view_as_real(z).flatten(3)


def _attention(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with materialised scores; q (B, T, h, hd), k / v (B, S, hkv, hd)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.repeat_interleave(groups, 2).transpose(1, 2), \
        v.repeat_interleave(groups, 2).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, h, hd)


def reference_logits(model: LLaMA, tokens: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
    """The V2 model in fp64, eager: y = s * (W x + b) (or W (s * x) + b), fp32 norms, each adapted layer's prompt
    through its wk / wv with its own softmax times tanh(gate); early fusion's visual prompts in the first layers.
    visual: (B, n, dim) tokens. Differentiable in the model's parameters."""
    P = {base_name(n): p.double() for n, p in model.named_parameters()}
    P.setdefault("output.weight", P["tok_embeddings.weight"])
    a, c = model.adapter, model.config
    B, T = tokens.shape
    hd = c.head_dim

    def linear(x, name):
        W, b, s = P[f"{name}.weight"], P.get(f"{name}.bias"), P.get(f"{name}.scale")
        if b is None:
            return x @ W.T
        return s * (x @ W.T + b) if a.scale == "output" else (s * x) @ W.T + b

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def heads(x, n):
        return x.view(x.shape[0], x.shape[1], n, hd)

    h = P["tok_embeddings.weight"][tokens]
    for i in range(c.n_layers):
        pre = f"layers.{i}."
        x = rms(h, P[pre + "attention_norm.weight"])
        q = _rope(heads(linear(x, pre + "attention.wq"), c.n_heads), c.rope_theta)
        k = _rope(heads(linear(x, pre + "attention.wk"), c.n_kv_heads), c.rope_theta)
        out = _attention(q, k, heads(linear(x, pre + "attention.wv"), c.n_kv_heads), causal=True)
        prompt, gate = None, None
        if pre + "attention.adapter_prompt" in P:
            prompt, gate = P[pre + "attention.adapter_prompt"][None].expand(B, -1, -1), P[pre + "attention.gate"]
            if visual is not None and a.fusion == "prompts":
                prompt = prompt + visual.double()
        elif pre + "attention.visual_gate" in P and visual is not None:
            prompt, gate = visual.double(), P[pre + "attention.visual_gate"]
        if prompt is not None:
            pk = heads(linear(prompt, pre + "attention.wk"), c.n_kv_heads)
            pv = heads(linear(prompt, pre + "attention.wv"), c.n_kv_heads)
            act = gate.tanh() if a.gate_act == "tanh" else gate
            out = out + act.view(1, 1, -1, 1) * _attention(q, pk, pv, causal=False)
        h = h + linear(out.flatten(2), pre + "attention.wo")
        x = rms(h, P[pre + "ffn_norm.weight"])
        h = h + linear(F.silu(linear(x, pre + "feed_forward.w1")) * linear(x, pre + "feed_forward.w3"),
                       pre + "feed_forward.w2")
    return linear(rms(h, P["norm.weight"]), "output")


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_7b_v2_trainable_parameters():
    """V1's 1,229,760 plus the biases and scales of the seven linears of all 32 layers and the 65 norms."""
    config = LLaMAConfig.from_name("llama-7b")
    counts = {}
    for scale in ("output", "input"):
        with torch.device("meta"):
            model = LLaMA(config, AdapterConfig(adapter_len=10, adapter_layers=30, version=2, scale=scale))
        mark_only_adapter_as_trainable(model)
        counts[scale] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts[scale] == sum(t.numel() for t in adapter_state_dict(model).values())
        assert all(t.dtype == torch.float32 for t in adapter_state_dict(model).values())
    per_layer_biases = 5 * 4096 + 2 * 11008  # wq wk wv wo w2: dim; w1 w3: hidden
    assert counts["output"] == 1_229_760 + 32 * (2 * per_layer_biases + 2 * 4096) + 4096 == 4_215_744
    assert counts["input"] == 1_229_760 + 32 * (per_layer_biases + 6 * 4096 + 11008 + 2 * 4096) + 4096 == 3_994_560
    state = adapter_state_dict(model)
    assert state["layers.0.feed_forward.w2.scale"].shape == (11008,)  # input scale: w2's input width
    assert state["layers.0.feed_forward.w2.bias"].shape == (4096,) and "layers.0.attention.gate" not in state
    assert {"layers.31.attention.adapter_prompt", "norm.weight", "layers.0.ffn_norm.weight"} <= state.keys()


@pytest.mark.gpu_leg
@pytest.mark.parametrize("adapter", [V2, AdapterConfig(adapter_len=4, adapter_layers=2, version=2, scale="input",
                                                       output_bias_scale=True, gate="layer", gate_act="identity")],
                         ids=["output-scale", "input-scale-output-layer"])
def test_a_fresh_v2_adapter_is_the_base_model_bit_for_bit(adapter, tmp_path, device, triton_kernels_only):
    """Zero biases, unit scales, zero gates, the checkpoint's norms: the base model's logits, every bit (packed, as
    training runs), and a trained V2 adapter does change them."""
    torch.manual_seed(0)
    save_checkpoint(randomize_(LLaMA(tiny_config(gqa=True))), tmp_path)
    base = load_checkpoint(tmp_path, device=device)
    fresh = load_checkpoint(tmp_path, adapter=adapter, device=device)
    assert fresh.layers[0].attention.wq.linear.weight.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(1)).to(device)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32, device=device)
    with torch.no_grad():
        want = base(tokens, cu_seqlens=cu)
        assert torch.equal(fresh(tokens, cu_seqlens=cu), want)
        set_v2_(fresh)
        assert (fresh(tokens, cu_seqlens=cu) - want).abs().max() > 1e-2
    assert triton_kernels_only.forward > 0


@pytest.mark.gpu_leg
@pytest.mark.parametrize("adapter, gqa", [
    (AdapterConfig(adapter_len=4, adapter_layers=1, version=2, output_bias_scale=True), False),
    (AdapterConfig(adapter_len=4, adapter_layers=1, version=2, scale="input"), True),
], ids=["output-scale", "input-scale-gqa"])
def test_v2_gradients_equal_the_eager_formulation(adapter, gqa, device, triton_kernels_only):
    """Packed sequences through the fused op: the loss and the gradient of every V2 parameter (prompts, gates,
    biases, scales, norms) against the eager fp64 formulation, sequence by sequence."""
    model = v2_model(adapter, gqa=gqa).to(device)
    mark_only_adapter_as_trainable(model)
    lengths = [9, 14]
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2)).to(device)
    weights = torch.randn(1, sum(lengths), VOCAB, generator=torch.Generator().manual_seed(3)).to(device)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32, device=device)
    params = adapter_state_dict(model)
    loss = (model(tokens, cu_seqlens=cu) * weights).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    want = sum((reference_logits(model, tokens[:, s:e]) * weights[:, s:e]).sum() for s, e in ((0, 9), (9, 23)))
    want_grads = torch.autograd.grad(want, list(params.values()))
    torch.testing.assert_close(loss.double(), want, atol=1e-3, rtol=1e-5)
    for name, g, w in zip(params, grads, want_grads, strict=True):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, atol=1e-4 * w.abs().max().item(), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert triton_kernels_only.forward > 0 and triton_kernels_only.backward > 0


def test_v2_file_round_trip_and_its_checks(tmp_path):
    model = v2_model(AdapterConfig(adapter_len=4, adapter_layers=1, version=2, scale="input"))
    path = save_adapter(model, tmp_path / "v2.safetensors")
    config = read_adapter_config(path)
    assert config == model.adapter and config.version == 2
    other = LLaMA(model.config, config)
    for name, p in model.named_parameters():  # the same base
        if name not in adapter_state_dict(model):
            other.get_parameter(name).data.copy_(p)
    load_adapter(other, path)
    with torch.no_grad():
        x = torch.randint(0, VOCAB, (2, 7))
        assert torch.equal(other(x), model(x))
    from model import CheckpointError

    for built, message in ((AdapterConfig(adapter_len=4, adapter_layers=1), "version=2 .* built with version=1"),
                           (AdapterConfig(adapter_len=4, adapter_layers=1, version=2),
                            "scale='input' .* built with scale='output'")):
        with pytest.raises(CheckpointError, match=message):
            load_adapter(LLaMA(model.config, built), path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({k: v for k, v in tensors.items() if k != "layers.0.feed_forward.w2.scale"}, tmp_path / "p.safetensors",
              metadata)
    with pytest.raises(CheckpointError, match=r"p\.safetensors: tensor 'layers\.0\.feed_forward\.w2\.scale' is "
                                              "missing"):
        read_adapter_config(tmp_path / "p.safetensors")
    save_file({**tensors, "layers.0.attention.wq.lora": torch.zeros(2)}, tmp_path / "u.safetensors", metadata)
    with pytest.raises(CheckpointError, match=r"u\.safetensors: unexpected tensor 'layers\.0\.attention\.wq\.lora'"):
        read_adapter_config(tmp_path / "u.safetensors")


def test_v2_config_errors():
    with pytest.raises(ValueError, match=r"AdapterConfig.version must be one of \(1, 2\), got 3"):
        AdapterConfig(version=3)
    with pytest.raises(ValueError, match="scale and output_bias_scale are V2's .* need version=2"):
        AdapterConfig(scale="input")
    with pytest.raises(ValueError, match=r"AdapterConfig.scale must be one of \('output', 'input'\)"):
        AdapterConfig(version=2, scale="both")
    with pytest.raises(ValueError, match=r"early fusion .* visual_layers \(1\) .* adapter_layers \(2\); the model's 2"):
        LLaMA(tiny_config(), AdapterConfig(adapter_len=4, adapter_layers=2, version=2, visual_dim=8, clip_layers=(1,),
                                           fusion="early"))
    with pytest.raises(ValueError, match=r"visual_len \(3\) must be 1 or adapter_len \(4\) with fusion='prompts'"):
        AdapterConfig(adapter_len=4, visual_dim=8, clip_layers=(1,), visual_len=3)
