"""LLaMA-Adapter V2 (model/adapter.py, version=2): bias and scale tuning, trainable norms, early fusion; its
parameter count, zero-init, gradients against an eager write-up of the paper's math, its file round trip, and the
official V2 release's, the official V2 chat release's and litgpt's adapter_v2 files imported by logits.

The references here share no code with model/: they compute from the parameters (or the peers' files) by name.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from model_utils import VOCAB, randomize_, tiny_config

from llama_adapter_triton import (
    AdapterConfig,
    CheckpointError,
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
from llama_adapter_triton.model.adapter import base_name

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
    """Zero biases, unit scales, zero gates, the checkpoint's norms: every bit of the fresh V1 adapter's logits with
    the same prompts (the same op calls, so on any device), which on the CPU are the base model's bits too (packed, as
    training runs); and a trained V2 adapter does change them."""
    torch.manual_seed(0)
    save_checkpoint(randomize_(LLaMA(tiny_config(gqa=True))), tmp_path)
    base = load_checkpoint(tmp_path, device=device)
    fresh = load_checkpoint(tmp_path, adapter=adapter, device=device)
    v1 = load_checkpoint(tmp_path, adapter=AdapterConfig(adapter_len=adapter.adapter_len,
                                                         adapter_layers=adapter.adapter_layers, gate=adapter.gate,
                                                         gate_act=adapter.gate_act), device=device)
    for name, p in adapter_state_dict(v1).items():
        p.data.copy_(adapter_state_dict(fresh)[name])
    assert fresh.layers[0].attention.wq.linear.weight.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(1)).to(device)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32, device=device)
    with torch.no_grad():
        want = v1(tokens, cu_seqlens=cu)
        assert torch.equal(fresh(tokens, cu_seqlens=cu), want)
        if device == "cpu":  # the interpreted kernels' token part does not depend on the prompt: the base's bits
            assert torch.equal(base(tokens, cu_seqlens=cu), want)
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


@pytest.mark.parametrize("output_bias_scale", [False, True], ids=["", "output-layer"])
def test_v2_file_round_trip_and_its_checks(output_bias_scale, tmp_path):
    """Saved and read back, with the output layer's bias and scale too (the file does not record the vocabulary:
    the output layer's tensors give it, on a model whose vocabulary is not LLaMA's 32000)."""
    model = v2_model(AdapterConfig(adapter_len=4, adapter_layers=1, version=2, scale="input",
                                   output_bias_scale=output_bias_scale))
    assert model.config.vocab_size != 32000
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


EARLY = AdapterConfig(adapter_len=4, adapter_layers=1, version=2, visual_dim=8, clip_layers=(1,), visual_hidden=16,
                      fusion="early", visual_len=2)


@pytest.mark.parametrize("visual_layers", [1, 2])
def test_early_fusion_gates_exactly_the_first_visual_layers(visual_layers):
    """Early fusion on a model with more layers than visual_layers + adapter_layers: the visual gates are in layers
    0 .. visual_layers - 1 and nowhere else, the adaption prompt in the top layer, the layers between plain. (The
    eager formulation reads the gates by name, so it agrees with a model that has one too many.) Planted bug this
    catches: `layer <= visual_layers` for `<`, one extra visual layer."""
    adapter = dataclasses.replace(EARLY, visual_layers=visual_layers)
    with torch.device("meta"):
        model = LLaMA(tiny_config(n_layers=5), adapter)
    state = adapter_state_dict(model)
    assert sorted(n for n in state if n.endswith(".visual_gate")) == [
        f"layers.{i}.attention.visual_gate" for i in range(visual_layers)]
    assert sorted(n for n in state if n.endswith((".adapter_prompt", ".gate"))) == [
        "layers.4.attention.adapter_prompt", "layers.4.attention.gate"]


def test_early_fusion_row_without_an_image_is_the_text_only_model(device, triton_kernels_only):
    """With non-zero V2 biases (so that a zero visual token still has non-zero keys and values through wk / wv) and
    non-zero visual gates: in a batch where one row has no image (image_mask False), that row's logits are the
    text-only model's, and the other row's are those of the batch where every row has its image. Planted bug this
    catches: the visual prompt's values not zeroed for rows without an image (such a row then differs by 0.18)."""
    model = v2_model(EARLY, n_layers=3).to(device)
    assert all(p.abs().min() > 0 for n, p in adapter_state_dict(model).items()
               if n.endswith((".visual_gate", "attention.wk.bias", "attention.wv.bias")))
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3)).to(device)
    features = torch.randn(2, 8, generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        text_only = model(tokens)
        with_images = model(tokens, image_features=features)
        masked = model(tokens, image_features=features, image_mask=torch.tensor([True, False], device=device))
    assert (with_images[1] - text_only[1]).abs().max() > 1e-2  # the image acts on that row
    torch.testing.assert_close(masked[1], text_only[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[0], with_images[0], atol=1e-5, rtol=1e-5)
    assert triton_kernels_only.forward > 0


# ---------------------------------------------------------------------------------------------------------------
# The official V2 release (BIAS-7B style) and litgpt's adapter_v2 files, by logits against their own math


def _official_v2_file(base: LLaMA, query_len: int, query_layer: int, clip_dim: int, width: int, depth: int,
                      seed: int = 5) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes llama_adapter_v2_multimodal7b's extract_adapter_from_checkpoint.py
    writes for a BIAS model (gates in every layer, biases of wq, wo, w1, w2, w3, norms, the visual side)."""
    g = torch.Generator().manual_seed(seed)
    c = base.config

    def rand(*shape, scale=0.1, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    state = {"adapter_query.weight": rand(query_layer * query_len, c.dim, scale=1.0),
             "visual_query.weight": rand(query_len, width, scale=1.0), "llama.norm.weight": rand(c.dim, mean=1.0)}
    for i in range(c.n_layers):
        pre = f"llama.layers.{i}."
        state[pre + "attention.gate"] = rand(1, c.n_heads, 1, 1, scale=0.5)
        for name, n in (("attention.wq", c.dim), ("attention.wo", c.dim), ("feed_forward.w1", c.hidden_dim),
                        ("feed_forward.w2", c.dim), ("feed_forward.w3", c.hidden_dim)):
            state[f"{pre}{name}.bias"] = rand(n)
        state[pre + "attention_norm.weight"], state[pre + "ffn_norm.weight"] = rand(c.dim, mean=1.0), rand(c.dim,
                                                                                                           mean=1.0)
    for i in range(depth):
        for key, shape in (("norm1", (width,)), ("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                           ("norm2", (width,)), ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
            state[f"visual_blocks.{i}.{key}.weight"] = rand(*shape, mean=1.0 if len(shape) == 1 else 0.0)
            state[f"visual_blocks.{i}.{key}.bias"] = rand(shape[0])
    for key, (n, m) in {"clip_proj": (width, clip_dim), "visual_proj": (c.dim, width)}.items():
        state[f"{key}.weight"], state[f"{key}.bias"] = rand(n, m), rand(n)
        state[f"{key}_norm.weight"], state[f"{key}_norm.bias"] = rand(n, mean=1.0), rand(n)
    return state


def _official_v2_logits(base: LLaMA, state: dict[str, torch.Tensor], tokens: torch.Tensor, clip_tokens: torch.Tensor,
                        heads: int = 16) -> torch.Tensor:
    """The official V2 release's forward (llama_adapter.py's forward_visual and forward, llama.py with w_bias) in
    fp64, from its file's names: the visual queries through the ViT blocks, added to the adaption prompts of the top
    query_layer layers; prompts through wk / wv (no bias there); tanh(gate) times the prompt softmax."""
    S = {k: v.double() for k, v in state.items()}
    W = {n: p.detach().double() for n, p in base.named_parameters()}
    c = base.config
    ln = lambda x, key: F.layer_norm(x, x.shape[-1:], S[f"{key}.weight"], S[f"{key}.bias"])  # noqa: E731
    lin = lambda x, key: x @ S[f"{key}.weight"].T + S[f"{key}.bias"]  # noqa: E731
    # forward_visual
    x = ln(lin(clip_tokens.double(), "clip_proj"), "clip_proj_norm")
    query_len = S["visual_query.weight"].shape[0]
    x = torch.cat([S["visual_query.weight"].expand(len(x), -1, -1), x], dim=1)
    for i in sorted({int(k.split(".")[1]) for k in S if k.startswith("visual_blocks.")}):
        pre = f"visual_blocks.{i}."
        B, N, C = x.shape
        qkv = lin(ln(x, pre + "norm1"), pre + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        x = x + lin((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), pre + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, pre + "norm2"), pre + "mlp.fc1")), pre + "mlp.fc2")
    visual = ln(lin(x[:, :query_len], "visual_proj"), "visual_proj_norm")
    # the LLaMA with w_bias, and the adapter in the top query_layer layers
    query_layer = S["adapter_query.weight"].shape[0] // query_len
    adapter = S["adapter_query.weight"].view(query_layer, query_len, c.dim)
    B, T = tokens.shape
    hd = c.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def linear(x, i, name):
        bias = S.get(f"llama.layers.{i}.{name}.bias")
        return x @ W[f"layers.{i}.{name}.weight"].T + (0 if bias is None else bias)

    h = W["tok_embeddings.weight"][tokens]
    for i in range(c.n_layers):
        x = rms(h, S[f"llama.layers.{i}.attention_norm.weight"])
        q = _rope(linear(x, i, "attention.wq").view(B, T, c.n_heads, hd), c.rope_theta)
        k = _rope(linear(x, i, "attention.wk").view(B, T, c.n_heads, hd), c.rope_theta)
        out = _attention(q, k, linear(x, i, "attention.wv").view(B, T, c.n_heads, hd), causal=True)
        j = i - (c.n_layers - query_layer)
        if j >= 0:
            prompt = adapter[j][None] + visual  # (B, query_len, dim)
            pk = linear(prompt, i, "attention.wk").view(B, query_len, c.n_heads, hd)
            pv = linear(prompt, i, "attention.wv").view(B, query_len, c.n_heads, hd)
            gate = S[f"llama.layers.{i}.attention.gate"].view(1, 1, -1, 1).tanh()
            out = out + gate * _attention(q, pk, pv, causal=False)
        h = h + linear(out.flatten(2), i, "attention.wo")
        x = rms(h, S[f"llama.layers.{i}.ffn_norm.weight"])
        h = h + linear(F.silu(linear(x, i, "feed_forward.w1")) * linear(x, i, "feed_forward.w3"), i,
                       "feed_forward.w2")
    return rms(h, S["llama.norm.weight"]) @ W["output.weight"].T


def test_official_v2_release_import_gives_its_logits(tmp_path, device, triton_kernels_only):
    """A BIAS-7B-style file ({"model": ..., "config": ...}, the release's names and shapes) on a tiny base: read,
    loaded, and run with CLIP token features, our model gives the official formulation's logits. Two adapted layers
    of three, each with its own prompt: adapter_query.weight's first query_len rows are the lowest adapted layer's.
    Planted bug this catches: the prompts imported in reversed layer order (a single adapted layer cannot tell)."""
    torch.manual_seed(0)
    base = randomize_(LLaMA(tiny_config(n_layers=3))).eval()
    save_checkpoint(base, tmp_path / "base")
    state = _official_v2_file(base, query_len=4, query_layer=2, clip_dim=24, width=32, depth=2)
    torch.save({"model": state, "config": {"w_bias": True, "w_lora": False, "lora_rank": 16}}, tmp_path / "BIAS.pth")
    config = read_adapter_config(tmp_path / "BIAS.pth")
    assert config == AdapterConfig(adapter_len=4, adapter_layers=2, version=2, visual_dim=24, visual_len=4,
                                   projector="query", visual_width=32, visual_depth=2, visual_heads=16)
    model = load_checkpoint(tmp_path / "base", adapter=config, device=device)
    load_adapter(model, tmp_path / "BIAS.pth")
    assert torch.equal(model.layers[0].attention.wk.bias, torch.zeros(128, device=device))  # not in the release
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    clip_tokens = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2))
    want = _official_v2_logits(base, state, tokens, clip_tokens)
    with torch.no_grad():
        got = model(tokens.to(device), image_features=clip_tokens.to(device))
    assert (want - _official_v2_logits(base, state, tokens, clip_tokens.flip(0))).abs().max() > 1e-2  # the image acts
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward > 0

    lora = {**state, "llama.layers.0.attention.lora_wq_l1.weight": torch.zeros(2, 128)}
    torch.save({"model": lora, "config": {"w_lora": True}}, tmp_path / "LORA.pth")
    with pytest.raises(CheckpointError, match=r"LORA\.pth: .*LoRA tensors .*LORA-BIAS-7B.*: not supported"):
        read_adapter_config(tmp_path / "LORA.pth")
    del state["llama.layers.1.feed_forward.w2.bias"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth: tensor 'llama\.layers\.1\.feed_forward\.w2\.bias' is "
                                              "missing"):
        read_adapter_config(tmp_path / "partial.pth")


# ---------------------------------------------------------------------------------------------------------------
# The official V2 chat release (llama_adapter_v2_chat65b: bias, scale and norm tuning, no prompts), by logits

_CHAT_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3")


def _official_chat_file(base: LLaMA, seed: int = 6) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of the chat65b release's {"model": ...} (its llama/model.py with
    add_bias, add_scale, train_norm): in every layer a bias (the linear's output width) and an input scale (its input
    width) of each of wq, wk, wv, wo, w1, w2, w3, and the two norms."""
    g = torch.Generator().manual_seed(seed)
    c = base.config
    state = {}
    for i in range(c.n_layers):
        for name in _CHAT_LINEARS:
            out_width, in_width = base.get_submodule(f"layers.{i}.{name}").weight.shape
            state[f"layers.{i}.{name}_bias"] = 0.1 * torch.randn(out_width, generator=g)
            state[f"layers.{i}.{name}_scale"] = 1 + 0.1 * torch.randn(in_width, generator=g)
        for norm in ("attention_norm", "ffn_norm"):
            state[f"layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(c.dim, generator=g)
    return state


def _official_chat_logits(base: LLaMA, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The chat65b release's Transformer (llama/model.py: forward_linear_with_scale_and_bias's x * scale, the
    linear, + bias on every linear; its causal SDPA; no adaption prompt) in fp64, from its file's names over the
    base's weights (its final norm the base's when the file has none)."""
    S = {k: v.double() for k, v in state.items()}
    W = {n: p.detach().double() for n, p in base.named_parameters()}
    c = base.config
    B, T = tokens.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w

    def linear(x, name):
        return (x * S[f"{name}_scale"]) @ W[f"{name}.weight"].T + S[f"{name}_bias"]

    def heads(x):
        return x.view(B, T, c.n_heads, c.head_dim)

    h = W["tok_embeddings.weight"][tokens]
    for i in range(c.n_layers):
        pre = f"layers.{i}."
        x = rms(h, S[pre + "attention_norm.weight"])
        q = _rope(heads(linear(x, pre + "attention.wq")), c.rope_theta)
        k = _rope(heads(linear(x, pre + "attention.wk")), c.rope_theta)
        out = _attention(q, k, heads(linear(x, pre + "attention.wv")), causal=True)
        h = h + linear(out.flatten(2), pre + "attention.wo")
        x = rms(h, S[pre + "ffn_norm.weight"])
        h = h + linear(F.silu(linear(x, pre + "feed_forward.w1")) * linear(x, pre + "feed_forward.w3"),
                       pre + "feed_forward.w2")
    return rms(h, S.get("norm.weight", W["norm.weight"])) @ W["output.weight"].T


def test_official_v2_chat_release_import_gives_its_logits(tmp_path, device):
    """A chat65b-style file ({"model": ...}, the release's names and shapes, no final norm) on a tiny base: read as
    V2 with input scales and no adaption prompt, loaded, our model gives the official formulation's logits; with a
    final norm in the file, that one is loaded; the adapter saves and loads back in our format. Planted bugs this
    catches: the scales applied to the output (scale="output"), a linear's bias and scale swapped, the base's final
    norm overwritten."""
    torch.manual_seed(0)
    base = randomize_(LLaMA(tiny_config())).eval()
    save_checkpoint(base, tmp_path / "base")
    state = _official_chat_file(base)
    torch.save({"model": state}, tmp_path / "chat.pth")
    config = read_adapter_config(tmp_path / "chat.pth")
    assert config == AdapterConfig(adapter_layers=0, version=2, scale="input")  # no prompts, input scales
    model = load_checkpoint(tmp_path / "base", adapter=config, device=device)
    load_adapter(model, tmp_path / "chat.pth")
    assert torch.equal(model.norm.weight, base.norm.weight.to(device))  # the base's: the release did not train it
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens.to(device))
        base_logits = base(tokens)
    want = _official_chat_logits(base, state, tokens)
    assert (want - base_logits.double()).abs().max() > 1e-1  # the adapter acts
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)

    norm = 1 + 0.1 * torch.randn(base.config.dim, generator=torch.Generator().manual_seed(2))
    torch.save({"model": {**state, "norm.weight": norm}}, tmp_path / "chat_norm.pth")
    load_adapter(model, tmp_path / "chat_norm.pth")
    assert torch.equal(model.norm.weight.cpu(), norm)
    path = save_adapter(model, tmp_path / "chat.safetensors")
    assert read_adapter_config(path) == config
    again = load_checkpoint(tmp_path / "base", adapter=config, device=device)
    load_adapter(again, path)
    assert all(torch.equal(p, adapter_state_dict(model)[n]) for n, p in adapter_state_dict(again).items())


def test_official_v2_chat_release_errors(tmp_path):
    """A chat65b file with a tensor missing, one it cannot map (an adaption prompt: not read as a v1 file), one of
    another model size, or cut short: a CheckpointError naming the file and the tensor. A V1 adapter without adapted
    layers is refused."""
    torch.manual_seed(0)
    base = LLaMA(tiny_config())
    state = _official_chat_file(base)
    del state["layers.1.feed_forward.w2_scale"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth: tensor 'layers\.1\.feed_forward\.w2_scale' is missing"):
        read_adapter_config(tmp_path / "partial.pth")
    state = _official_chat_file(base)
    for odd, message in (("adapter_query.weight", "adaption prompts"), ("layers.0.attention.gate", "unexpected"),
                         ("layers.0.attention.wq_lora", "unexpected")):
        torch.save({"model": {**state, odd: torch.zeros(4, 128)}}, tmp_path / "odd.pth")
        with pytest.raises(CheckpointError, match=rf"odd\.pth: .*{message}.*'{re.escape(odd)}'.*V2 chat"):
            read_adapter_config(tmp_path / "odd.pth", gate_act="tanh")
    torch.save({"model": {**state, "layers.0.attention.wo_scale": torch.ones(64)}}, tmp_path / "size.pth")
    model = LLaMA(tiny_config(), read_adapter_config(tmp_path / "size.pth"))
    with pytest.raises(CheckpointError, match=r"size\.pth: tensor 'layers\.0\.attention\.wo_scale \(our "
                                              r"layers\.0\.attention\.wo\.scale\)' has shape \(64,\), the model needs "
                                              r"\(128,\)"):
        load_adapter(model, tmp_path / "size.pth")
    torch.save({"model": state}, tmp_path / "chat.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "chat.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot be loaded"):
        read_adapter_config(tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"adapter_layers=0 .* version=2"):
        AdapterConfig(adapter_layers=0)


def _rotate_half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Hugging Face's (and litgpt's) RoPE on rotate-half rows: x * cos + rotate_half(x) * sin; x (B, h, T, hd)."""
    T, hd = x.shape[2], x.shape[3]
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), theta ** (-torch.arange(0, hd, 2, dtype=torch.float64)
                                                                          / hd))
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    half = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + half * sin


def _litgpt_logits(hf: dict[str, torch.Tensor], lit: dict[str, torch.Tensor], config: LLaMAConfig,
                   tokens: torch.Tensor) -> torch.Tensor:
    """litgpt's adapter_v2 GPT (a LLaMA config) in fp64, from a Hugging Face checkpoint's tensors (the layout litgpt
    converts them to: q, k, v concatenated in HF's rotate-half row order) and its adapter file's names:
    AdapterV2Linear's y = scale * (W x + bias) on qkv, proj, fc_1, fc_2, mlp.proj and lm_head; the prompt's keys and
    values from the k and v parts of qkv(prompt), times the raw gating_factor."""
    S = {k: v.double() for k, v in {**hf, **lit}.items()}
    B, T = tokens.shape
    nh, nkv, hd = config.n_heads, config.n_kv_heads, config.head_dim

    def v2(x, key, weight):
        return S[f"{key}.adapter_scale"] * (x @ weight.T + S[f"{key}.adapter_bias"])

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * w

    def qkv(x, i):  # (B, T, dim) -> q (B, nh, T, hd), k, v (B, nkv, T, hd)
        p = f"model.layers.{i}.self_attn."
        w = torch.cat([S[p + "q_proj.weight"], S[p + "k_proj.weight"], S[p + "v_proj.weight"]])
        q, k, v = v2(x, f"transformer.h.{i}.attn.qkv", w).split((nh * hd, nkv * hd, nkv * hd), dim=-1)
        return (q.view(len(x), -1, nh, hd).transpose(1, 2), k.view(len(x), -1, nkv, hd).transpose(1, 2),
                v.view(len(x), -1, nkv, hd).transpose(1, 2))

    def sdpa(q, k, v, causal):
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    h = S["model.embed_tokens.weight"][tokens]
    for i in range(config.n_layers):
        lit_i, hf_i = f"transformer.h.{i}.", f"model.layers.{i}."
        x = rms(h, S[lit_i + "norm_1.weight"])
        q, k, v = qkv(x, i)
        q = _rotate_half_rope(q, config.rope_theta)
        y = sdpa(q, _rotate_half_rope(k, config.rope_theta), v, causal=True)
        if lit_i + "attn.adapter_wte.weight" in S:  # the prompt keys carry no RoPE
            _, ak, av = qkv(S[lit_i + "attn.adapter_wte.weight"][None], i)
            y = y + S[lit_i + "attn.gating_factor"].view(1, -1, 1, 1) * sdpa(q, ak, av, causal=False)
        h = h + v2(y.transpose(1, 2).reshape(B, T, -1), lit_i + "attn.proj", S[hf_i + "self_attn.o_proj.weight"])
        x = rms(h, S[lit_i + "norm_2.weight"])
        up = F.silu(v2(x, lit_i + "mlp.fc_1", S[hf_i + "mlp.gate_proj.weight"])) * v2(
            x, lit_i + "mlp.fc_2", S[hf_i + "mlp.up_proj.weight"])
        h = h + v2(up, lit_i + "mlp.proj", S[hf_i + "mlp.down_proj.weight"])
    return v2(rms(h, S["transformer.ln_f.weight"]), "lm_head", S.get("lm_head.weight", S["model.embed_tokens.weight"]))


def test_litgpt_adapter_v2_import_gives_its_logits(tmp_path, device, triton_kernels_only):
    """A litgpt adapter_v2 file (lit_model.pth.adapter_v2: {"model": ...} of its adapter_filter's names) on a tiny GQA
    base: our import gives litgpt's formulation's logits (its fused qkv's bias and scale split into wq / wk / wv and
    their q and k rows taken back from HF's rotate-half order; fc_1 is w1, fc_2 w3; its lm_head's bias and scale)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = tiny_config(gqa=True)
    save_checkpoint(randomize_(LLaMA(config)), tmp_path / "base")
    hf = load_file(tmp_path / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(4)
    nh, nkv, hd, hidden = config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim
    lit = {"transformer.ln_f.weight": 1 + 0.1 * torch.randn(config.dim, generator=g)}
    for key, n in (("lm_head", VOCAB), *((f"transformer.h.{i}.{k}", n) for i in range(2) for k, n in (
            ("attn.qkv", (nh + 2 * nkv) * hd), ("attn.proj", config.dim), ("mlp.fc_1", hidden), ("mlp.fc_2", hidden),
            ("mlp.proj", config.dim)))):
        lit[f"{key}.adapter_bias"] = 0.1 * torch.randn(n, generator=g)
        lit[f"{key}.adapter_scale"] = 1 + 0.1 * torch.randn(n, generator=g)
    for i in range(2):
        for norm in ("norm_1", "norm_2"):
            lit[f"transformer.h.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(config.dim, generator=g)
    lit["transformer.h.1.attn.adapter_wte.weight"] = torch.randn(4, config.dim, generator=g)
    lit["transformer.h.1.attn.gating_factor"] = 0.5 * torch.randn(1, 1, nh, 1, generator=g)
    torch.save({"model": lit}, tmp_path / "lit_model.pth.adapter_v2")

    adapter = read_adapter_config(tmp_path / "lit_model.pth.adapter_v2")
    assert adapter == AdapterConfig(adapter_len=4, adapter_layers=1, gate="head", gate_act="identity", version=2,
                                    output_bias_scale=True)
    model = load_checkpoint(tmp_path / "base", adapter=adapter, device=device)
    load_adapter(model, tmp_path / "lit_model.pth.adapter_v2")
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    want = _litgpt_logits(hf, lit, config, tokens)
    with torch.no_grad():
        got = model(tokens.to(device))
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=1e-4)
    assert triton_kernels_only.forward > 0

    del lit["transformer.h.0.mlp.fc_2.adapter_scale"]
    torch.save({"model": lit}, tmp_path / "partial.adapter_v2")
    with pytest.raises(CheckpointError, match=r"partial\.adapter_v2: tensor 'transformer\.h\.0\.mlp\.fc_2\."
                                              r"adapter_scale' is missing"):
        read_adapter_config(tmp_path / "partial.adapter_v2")
