"""LLaMA-Adapter (arXiv 2303.16199): learned prompts with zero-init gated attention in the top layers.

Each of the top adapter_layers layers l gets a prompt P_l (adapter_len, dim) and a gate g_l,
one value per head (gate="head", the paper's) or one per layer (gate="layer", PEFT's). The
prompt becomes extra keys and values through the layer's own frozen wk / wv, with no RoPE
and no norm, and gets its own softmax, scaled by act(g):

    out_i = softmax_{j <= i}(s q_i . k_j) V  +  act(g_h) * softmax_p(s q_i . pk_p) PV,
    pk = wk(P_l), PV = wv(P_l), s = head_dim ** -0.5, act = tanh or identity (gate_act).

The paper's code writes this as one score matrix over [prompt keys; token keys] with two
separate softmaxes over its two slices: the same sum. kernels.zero_init_attention computes it
in one pass. With g = 0 the layer is exactly the pre-trained one, and the gate still gets a
gradient; so the gate starts at 0 and the prompt at N(0, 1) (as the official code's
nn.Embedding, and PEFT): a zero prompt too would leave both gradients at zero for ever.

AdapterAttention overrides Attention.attend, the one override point of model/llama.py; with
set_attention_impl(model, "eager") it calls kernels.zero_init_attention_ref instead of the op.
Parameters, fp32 whatever the base dtype (they are trained; the prompt is cast to the activation
dtype before wk / wv, the raw gate goes to the op, which applies act in fp32):
    layers.N.attention.adapter_prompt  (adapter_len, dim)
    layers.N.attention.gate            (n_heads,) for gate="head", (1,) for gate="layer"
for the adapted layers N >= n_layers - adapter_layers only. 7B with 30 layers of 10 prompts:
30 * (10 * 4096 + 32) = 1,229,760 parameters.

Multi-modal hook: forward(..., visual=(batch, dim)) adds that token to every prompt row of every
adapted layer, so the prompt keys/values become per sample (batch, adapter_len, ...); with packed
sequences (cu_seqlens), visual is (num_seqs, dim) and the op gets one prompt per sequence. A multi-modal
adapter (AdapterConfig.visual_dim > 0, model/visual.py) also has the learned projector model.visual_proj
(fp32, trained with the prompts and gates): forward(..., image_features=(batch, visual_dim)) makes the
visual tokens from CLIP features.

A left-padded batch (batched generation) goes through the op in one call: its leftpad_k masks each
row's pad keys. With a KV cache the prompt keys/values are computed at input_pos 0 and reused until
the cache is set up again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from kernels import zero_init_attention, zero_init_attention_ref

from .llama import Attention, AttentionContext, LLaMA, LLaMAConfig, check_packed_impl, compute_dtype, packed_attention

GATES = ("head", "layer")
GATE_ACTS = ("tanh", "identity")


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_len prompts in each of the top adapter_layers layers; gate per "head" or per "layer"."""

    adapter_len: int = 10
    adapter_layers: int = 30  # counted from the top
    gate: str = "head"
    gate_act: str = "tanh"  # "tanh": the paper's training code; "identity": PEFT and lit-llama
    # multi-modal (model/visual.py): a projector of visual_dim image features to one visual token; 0: text only
    visual_dim: int = 0  # width of the concatenated CLIP features
    visual_hidden: int = 128  # the projector MLP's hidden width
    clip_layers: tuple[int, ...] = ()  # the CLIP layers whose global features were concatenated, in order

    def __post_init__(self) -> None:
        for name in ("adapter_len", "adapter_layers", "visual_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AdapterConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.visual_dim, int) or isinstance(self.visual_dim, bool) or self.visual_dim < 0:
            raise ValueError(f"AdapterConfig.visual_dim must be an int >= 0 (0: text only), got {self.visual_dim!r}")
        layers = self.clip_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (tuple, list)) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in layers):
            raise ValueError(f"AdapterConfig.clip_layers must be a sequence of layer numbers >= 1, got {layers!r}")
        object.__setattr__(self, "clip_layers", tuple(layers))  # JSON gives a list
        if bool(self.clip_layers) != bool(self.visual_dim):
            raise ValueError("AdapterConfig.clip_layers and visual_dim go together (a multi-modal adapter has both, "
                             f"a text-only one neither), got visual_dim={self.visual_dim}, "
                             f"clip_layers={self.clip_layers}")
        if self.gate not in GATES:
            raise ValueError(f"AdapterConfig.gate must be one of {GATES}, got {self.gate!r}")
        if self.gate_act not in GATE_ACTS:
            raise ValueError(f"AdapterConfig.gate_act must be one of {GATE_ACTS}, got {self.gate_act!r}")

    def to_dict(self) -> dict:
        """The fields as JSON gives them back (clip_layers a list)."""
        return {**asdict(self), "clip_layers": list(self.clip_layers)}


class AdapterAttention(Attention):
    """Attention of an adapted layer: the token attention plus the gated prompt attention, through the op."""

    def __init__(self, config: LLaMAConfig, adapter: AdapterConfig) -> None:
        super().__init__(config)
        self.gate_act = adapter.gate_act
        self.adapter_prompt = nn.Parameter(torch.empty(adapter.adapter_len, config.dim, dtype=torch.float32))
        n_gates = config.n_heads if adapter.gate == "head" else 1
        self.gate = nn.Parameter(torch.empty(n_gates, dtype=torch.float32))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Fresh adapter: prompt ~ N(0, 1), gate = 0 (the layer then equals the pre-trained one)."""
        self.adapter_prompt.normal_()
        self.gate.zero_()

    def prompt_kv(self, visual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys and values, (1, adapter_len, nkv, hs) each, or (B, ...) with a visual token (B, dim)."""
        prompt = self.adapter_prompt.unsqueeze(0)  # (1, K, dim)
        if visual is not None:
            prompt = prompt + visual.unsqueeze(1).to(prompt.dtype)  # (B, K, dim)
        prompt = prompt.to(compute_dtype(self.wk))
        shape = (prompt.shape[0], prompt.shape[1], self.n_kv_heads, self.head_dim)
        return self.wk(prompt).view(shape), self.wv(prompt).view(shape)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cache = self.kv_cache
        if cache is not None and cache.prompt_kv is not None and ctx.input_pos > 0:
            pk, pv = cache.prompt_kv
        else:
            pk, pv = self.prompt_kv(ctx.visual)
            if cache is not None:
                cache.prompt_kv = (pk, pv)
        if ctx.cu_seqlens is not None:  # packed sequences: the prompt (shared, or one per sequence), varlen
            check_packed_impl(self.attn_impl)
            return packed_attention(q, k, v, ctx, pk, pv, self.gate, self.gate_act)
        # the fused op, or the official code's eager formulation (set_attention_impl); a left-padded batch
        # (batched generation) masks each row's pad keys (leftpad_k)
        attention = zero_init_attention if self.attn_impl == "fused" else zero_init_attention_ref
        return attention(q, k, v, pk, pv, self.gate, causal=True, gate_act=self.gate_act, leftpad_k=ctx.leftpad_k)


def adapter_layers(model: LLaMA) -> dict[str, AdapterAttention]:
    """The adapted attention modules by name ("layers.N.attention"), bottom to top."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterAttention)}


def adapter_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """The adapter's parameters alone: layers.N.attention.adapter_prompt and layers.N.attention.gate, and
    visual_proj.fc1/fc2.weight/bias for a multi-modal adapter (AdapterConfig.visual_dim > 0)."""
    state = {f"{name}.{p}": getattr(m, p)
             for name, m in adapter_layers(model).items() for p in ("adapter_prompt", "gate")}
    if getattr(model, "visual_proj", None) is not None:
        state.update({f"visual_proj.{k}": v for k, v in model.visual_proj.named_parameters()})
    return state


def mark_only_adapter_as_trainable(model: LLaMA) -> None:
    """requires_grad on the adapter's parameters only; the base model is frozen."""
    adapter = {id(p) for p in adapter_state_dict(model).values()}
    if not adapter:
        raise ValueError("the model has no adapter: build it with LLaMA(config, adapter=AdapterConfig(...))")
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter)


def cast_base(model: LLaMA, dtype: torch.dtype) -> LLaMA:
    """Cast the base model's weights to dtype (bf16, fp16, fp32); the adapter stays fp32. Returns model."""
    adapter = {id(p) for p in adapter_state_dict(model).values()}
    for p in model.parameters():
        if id(p) not in adapter:
            p.data = p.data.to(dtype)
    return model
