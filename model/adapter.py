"""LLaMA-Adapter (arXiv 2303.16199) and LLaMA-Adapter V2 (arXiv 2304.15010), as layers on top of model/llama.py.

V1: each of the top adapter_layers layers l gets a prompt P_l (adapter_len, dim) and a gate g_l, one value per head
(gate="head", the paper's) or per layer (gate="layer", PEFT's). The prompt goes through the layer's frozen wk / wv
(no RoPE, no norm) and gets its own softmax, scaled by act(g):

    out_i = softmax_{j <= i}(s q_i . k_j) V  +  act(g_h) * softmax_p(s q_i . pk_p) PV,
    pk = wk(P_l), PV = wv(P_l), s = head_dim ** -0.5, act = tanh or identity (gate_act).

The paper's code writes one score matrix over [prompt keys; token keys] with a softmax per slice: the same sum, which
kernels.zero_init_attention computes in one pass. g starts at 0 (the layer is exactly the pre-trained one, and g still
gets a gradient), P at N(0, 1) (a zero prompt too would leave both gradients at zero for ever).
V2 (version=2) adds in every layer a bias (zero-init) and a scale (one-init) around each frozen linear
(BiasScaleLinear), the scale on the output (scale="output": y = s * (W x + b), the paper's eq. 1 and litgpt's) or the
input ("input": y = W (s * x) + b, the official V2 code's), and trainable fp32 norms: a fresh V2 adapter is the base
bit for bit. With adapter_layers=0 it has no prompts at all (the official chat65b release's bias, scale and norm
tuning).
Multi-modal (visual_dim > 0, model/visual.py): the projector's visual tokens are added to every prompt
(fusion="prompts") or are the prompts of the first visual_layers layers (fusion="early", V2's early fusion).
AdapterConfig implements model/llama.py's AdapterHooks (attention, attach, visual_input); every adapter parameter is
fp32. Parameter names and counts (7B: 1,229,760 for V1, 4,215,744 for V2), fusion, the official V2 release's
projector and joint training's groups: docs/checkpoints.md (The adapter).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from llama_adapter_triton.kernels.checks import check_int, is_int
from llama_adapter_triton.kernels.reference import zero_init_attention_ref
from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention

from .llama import Attention, AttentionContext, LLaMA, LLaMAConfig, check_packed_impl, packed_attention
from .visual import QueryProjector, VisualProjector

GATES = ("head", "layer")
GATE_ACTS = ("tanh", "identity")
VERSIONS = (1, 2)
SCALES = ("output", "input")
FUSIONS = ("prompts", "early")
PROJECTORS = ("mlp", "query")
V2_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
              "feed_forward.w3")  # in every block
_NORM_RE = re.compile(r"(layers\.\d+\.(attention|ffn)_norm|norm)\.weight")


@dataclass(frozen=True)
class AdapterConfig:
    """The adapter: V1's prompts and gates, V2's bias / scale / norm tuning, a multi-modal projector (see the
    module docstring). Passed to LLaMA(config, adapter) and load_checkpoint(..., adapter=...)."""

    adapter_len: int = 10
    adapter_layers: int = 30  # counted from the top; 0 (V2 only): no prompts, bias / scale / norm tuning alone
    gate: str = "head"
    gate_act: str = "tanh"  # "tanh": the paper's training code; "identity": PEFT and lit-llama
    # multi-modal (model/visual.py): a projector of visual_dim image features to visual tokens; 0: text only
    visual_dim: int = 0  # width of the image features (the concatenated CLIP features, or CLIP's token width)
    visual_hidden: int = 128  # the MLP projector's hidden width
    clip_layers: tuple[int, ...] = ()  # the CLIP layers whose global features were concatenated, in order
    # LLaMA-Adapter V2
    version: int = 1
    scale: str = "output"  # V2: "output": y = s * (W x + b) (paper, litgpt); "input": y = W (s * x) + b (official)
    output_bias_scale: bool = False  # V2: bias and scale on the output layer too (litgpt's lm_head)
    fusion: str = "prompts"  # multi-modal: "prompts" (added to the adapted layers' prompts) or "early"
    visual_len: int = 1  # multi-modal: visual tokens per image
    visual_layers: int = 1  # early fusion: the first layers, whose prompts are the visual tokens
    projector: str = "mlp"  # multi-modal: "mlp" (ours) or "query" (the official V2 release's, for its import)
    visual_width: int = 768  # projector "query": the width of its blocks
    visual_depth: int = 8  # projector "query": its blocks
    visual_heads: int = 16  # projector "query": the heads of its blocks

    def __post_init__(self) -> None:
        for name in ("adapter_len", "visual_hidden", "visual_len", "visual_layers", "visual_width", "visual_depth",
                     "visual_heads"):
            check_int(f"AdapterConfig.{name}", getattr(self, name), 1, what="a positive int")
        check_int("AdapterConfig.adapter_layers", self.adapter_layers, 0, what="an int >= 0 (0: V2's bias, scale and "
                  "norm tuning alone)")
        check_int("AdapterConfig.visual_dim", self.visual_dim, 0, what="an int >= 0 (0: text only)")
        layers = self.clip_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (tuple, list)) or any(
                not is_int(x) or x < 1 for x in layers):
            raise ValueError(f"AdapterConfig.clip_layers must be a sequence of layer numbers >= 1, got {layers!r}")
        object.__setattr__(self, "clip_layers", tuple(layers))  # JSON gives a list
        if bool(self.clip_layers) != bool(self.visual_dim and self.projector == "mlp"):
            raise ValueError("AdapterConfig.clip_layers and visual_dim go together (a multi-modal adapter with the "
                             "MLP projector has both, a text-only one neither; the query projector reads CLIP's last "
                             f"layer), got visual_dim={self.visual_dim}, clip_layers={self.clip_layers}, "
                             f"projector={self.projector!r}")
        for name, choices in (("gate", GATES), ("gate_act", GATE_ACTS), ("version", VERSIONS), ("scale", SCALES),
                              ("fusion", FUSIONS), ("projector", PROJECTORS)):
            if getattr(self, name) not in choices or isinstance(getattr(self, name), bool):
                raise ValueError(f"AdapterConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.output_bias_scale, bool):
            raise ValueError(f"AdapterConfig.output_bias_scale must be True or False, got {self.output_bias_scale!r}")
        if self.version == 1 and (self.scale, self.output_bias_scale) != ("output", False):
            raise ValueError("AdapterConfig.scale and output_bias_scale are V2's bias and scale tuning: they need "
                             "version=2")
        if self.adapter_layers == 0 and (self.version == 1 or self.visual_dim and self.fusion == "prompts"):
            raise ValueError("AdapterConfig.adapter_layers=0 (no adaption prompts) is V2's bias, scale and norm tuning "
                             "alone: it needs version=2 (and fusion='early' with a visual projector, whose tokens "
                             "would otherwise go to the prompts)")
        if self.visual_dim and self.fusion == "prompts" and self.visual_len not in (1, self.adapter_len):
            raise ValueError(f"AdapterConfig.visual_len ({self.visual_len}) must be 1 or adapter_len "
                             f"({self.adapter_len}) with fusion='prompts': the visual tokens are added to the prompts")
        if self.visual_dim and self.visual_width % self.visual_heads and self.projector == "query":
            raise ValueError(f"AdapterConfig.visual_width ({self.visual_width}) must be a multiple of visual_heads "
                             f"({self.visual_heads})")

    def to_dict(self) -> dict:
        """The fields as JSON gives them back (clip_layers a list)."""
        return {**asdict(self), "clip_layers": list(self.clip_layers)}

    @property
    def early_fusion(self) -> bool:
        return bool(self.visual_dim) and self.fusion == "early"

    # -- model/llama.py's AdapterHooks

    def check(self, config: LLaMAConfig) -> None:
        """ValueError unless the adapter fits a model of this config."""
        if self.adapter_layers > config.n_layers:
            raise ValueError(f"adapter_layers ({self.adapter_layers}) exceeds the model's n_layers ({config.n_layers})")
        if self.early_fusion and self.visual_layers + self.adapter_layers > config.n_layers:
            raise ValueError(f"early fusion puts the visual prompts in the first visual_layers ({self.visual_layers}) "
                             f"layers and the adaption prompts in the last adapter_layers ({self.adapter_layers}); "
                             f"the model's {config.n_layers} layers cannot hold both apart")

    def attention(self, config: LLaMAConfig, layer: int) -> Attention:
        """Block `layer`'s attention: AdapterAttention in the top adapter_layers layers, VisualPromptAttention in
        the first visual_layers with early fusion, the plain Attention elsewhere."""
        self.check(config)
        if layer >= config.n_layers - self.adapter_layers:
            return AdapterAttention(config, self)
        if self.early_fusion and layer < self.visual_layers:
            return VisualPromptAttention(config, self)
        return Attention(config)

    def attach(self, model: LLaMA) -> None:
        """V2: wrap the linears of every block (and the output layer with output_bias_scale) in BiasScaleLinear and
        keep the norms' weights in fp32; multi-modal: the projector, model.visual_proj."""
        config = model.config
        model.first_adapted = config.n_layers - self.adapter_layers
        if self.version == 2:
            for block in model.layers:
                for path in V2_LINEARS:
                    parent_name, _, name = path.rpartition(".")
                    parent = block.get_submodule(parent_name)
                    setattr(parent, name, BiasScaleLinear(getattr(parent, name), self.scale))
            if self.output_bias_scale:
                model.output = BiasScaleLinear(model.output, self.scale)
            for name, module in model.named_modules():
                if _NORM_RE.fullmatch(f"{name}.weight") and module.weight.dtype != torch.float32:
                    module.weight = nn.Parameter(module.weight.detach().float())
            model.first_adapted = 0
        if self.early_fusion:
            model.first_adapted = 0
        if self.visual_dim:
            if self.projector == "query":
                model.visual_proj = QueryProjector(self.visual_dim, self.visual_width, self.visual_depth,
                                                   self.visual_heads, self.visual_len, config.dim)
            else:
                model.visual_proj = VisualProjector(self.visual_dim, self.visual_hidden, config.dim, self.visual_len)

    def visual_input(self, model: LLaMA, visual: torch.Tensor | None, image_features: torch.Tensor | None,
                     image_mask: torch.Tensor | None, rows: int,
                     what: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(visual tokens (rows, n, dim), mask (rows,) bool or None) from visual tokens (rows, dim) or
        (rows, visual_len, dim), or from image_features through the projector; rows where image_mask is False get
        zero tokens (and, with early fusion, no visual prompt)."""
        dim = model.config.dim
        if image_features is not None:
            if not self.visual_dim:
                raise ValueError("image_features need a multi-modal adapter (AdapterConfig(visual_dim=...)); this "
                                 "model has a text-only one")
            if visual is not None:
                raise ValueError("give visual (the tokens) or image_features (made into tokens), not both")
            want = f"({what}={rows}, visual_dim={self.visual_dim})" if self.projector == "mlp" else \
                f"({what}={rows}, tokens, visual_dim={self.visual_dim})"
            ok = isinstance(image_features, torch.Tensor) and image_features.is_floating_point() and (
                image_features.shape == (rows, self.visual_dim) if self.projector == "mlp" else
                image_features.dim() == 3 and image_features.shape[0] == rows
                and image_features.shape[2] == self.visual_dim)
            if not ok:
                got = f"{image_features.dtype} {tuple(image_features.shape)}" \
                    if isinstance(image_features, torch.Tensor) else type(image_features)
                raise ValueError(f"image_features must be floating-point {want}, got {got}")
            visual = model.visual_proj(image_features)
        elif image_mask is not None:
            raise ValueError("image_mask goes with image_features")
        if visual is None:
            return None, None
        n = self.visual_len if self.visual_dim else 1  # a text-only adapter takes one token per row
        want = (rows, dim) if n == 1 else (rows, n, dim)
        if not isinstance(visual, torch.Tensor) or tuple(visual.shape) not in (want, (rows, n, dim)):
            got = tuple(visual.shape) if isinstance(visual, torch.Tensor) else type(visual).__name__
            shape = f"{what}={rows}, dim={dim}" if n == 1 else f"{what}={rows}, visual_len={n}, dim={dim}"
            raise ValueError(f"visual must be ({shape}), got {got}")
        visual = visual.reshape(rows, -1, dim)
        if image_mask is not None:
            if not isinstance(image_mask, torch.Tensor) or image_mask.dtype != torch.bool or \
                    image_mask.shape != (rows,):
                got = f"{image_mask.dtype} {tuple(image_mask.shape)}" if isinstance(image_mask, torch.Tensor) else \
                    type(image_mask)
                raise ValueError(f"image_mask must be a bool tensor ({what}={rows},), got {got}")
            visual = visual * image_mask.view(rows, 1, 1)  # rows without an image: no visual token
        return visual, image_mask


class BiasScaleLinear(nn.Module):
    """A frozen linear layer with V2's learned bias (zero-init) and scale (one-init):
    y = scale * (linear(x) + bias) (scale_at="output") or y = linear(scale * x) + bias ("input").

    It calls the module it wraps (an nn.Linear, or a quantized replacement), whatever its weight's type, and
    computes the scale and bias in the dtype of the activations; the parameters stay fp32. in_features and
    out_features are the wrapped layer's, as an nn.Linear's (the chunked loss reads them from the output layer)."""

    def __init__(self, linear: nn.Module, scale_at: str = "output") -> None:
        super().__init__()
        if scale_at not in SCALES:
            raise ValueError(f"scale_at must be one of {SCALES}, got {scale_at!r}")
        self.linear, self.scale_at = linear, scale_at
        device = linear.weight.device  # at construction: the model's own nn.Linear (or a meta one)
        self.bias = nn.Parameter(torch.empty(linear.out_features, dtype=torch.float32, device=device))
        width = linear.out_features if scale_at == "output" else linear.in_features
        self.scale = nn.Parameter(torch.empty(width, dtype=torch.float32, device=device))
        self.reset_adapter()

    @property
    def in_features(self) -> int:  # the wrapped linear's: the wrapper stands in for it (train/loss.py reads them)
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Fresh: bias 0, scale 1 (the wrapped linear unchanged, bit for bit)."""
        self.bias.zero_()
        self.scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_at == "input":
            y = self.linear(x * self.scale.to(x.dtype))
            return y + self.bias.to(y.dtype)
        y = self.linear(x)
        return (y + self.bias.to(y.dtype)) * self.scale.to(y.dtype)

    def extra_repr(self) -> str:
        return f"scale_at={self.scale_at!r}"


def base_name(name: str) -> str:
    """The base checkpoint's name of a parameter: the name without the ".linear" of a V2-wrapped linear
    (layers.0.attention.wq.linear.weight -> layers.0.attention.wq.weight)."""
    return re.sub(r"\.linear\.(weight|bias)$", r".\1", name)


class AdapterAttention(Attention):
    """Attention of an adapted layer: the token attention plus the gated prompt attention, through the op."""

    def __init__(self, config: LLaMAConfig, adapter: AdapterConfig) -> None:
        super().__init__(config)
        self.gate_act = adapter.gate_act
        self.takes_visual = adapter.fusion == "prompts"  # early fusion: the visual tokens go to the early layers
        self.adapter_prompt = nn.Parameter(torch.empty(adapter.adapter_len, config.dim, dtype=torch.float32))
        n_gates = config.n_heads if adapter.gate == "head" else 1
        self.gate = nn.Parameter(torch.empty(n_gates, dtype=torch.float32))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Fresh adapter: prompt ~ N(0, 1), gate = 0 (the layer then equals the pre-trained one)."""
        self.adapter_prompt.normal_()
        self.gate.zero_()

    def prompt_kv(self, visual: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys and values in dtype, (1, adapter_len, nkv, hs) each, or (B, ...) with visual tokens
        (B, 1 or adapter_len, dim) added."""
        prompt = self.adapter_prompt.unsqueeze(0)  # (1, K, dim)
        if visual is not None and self.takes_visual:
            prompt = prompt + visual.to(prompt.dtype)  # (B, K, dim)
        prompt = prompt.to(dtype)
        shape = (prompt.shape[0], prompt.shape[1], self.n_kv_heads, self.head_dim)
        return self.wk(prompt).view(shape), self.wv(prompt).view(shape)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cache = self.kv_cache  # with a KV cache: the prompt's keys and values of the prefill (input_pos 0), reused
        if cache is not None and cache.prompt_kv is not None and ctx.input_pos > 0:
            pk, pv = cache.prompt_kv
        else:
            pk, pv = self.prompt_kv(ctx.visual, q.dtype)
            if cache is not None:
                cache.prompt_kv = (pk, pv)
        return gated_attention(self, q, k, v, ctx, pk, pv, self.gate)


class VisualPromptAttention(Attention):
    """An early-fusion layer (V2): its prompts are the visual tokens (B, visual_len, dim) through its wk / wv, scaled
    by act(visual_gate) (zero-init); rows without a visual input get none, and so does a forward without one."""

    def __init__(self, config: LLaMAConfig, adapter: AdapterConfig) -> None:
        super().__init__(config)
        self.gate_act = adapter.gate_act
        n_gates = config.n_heads if adapter.gate == "head" else 1
        self.visual_gate = nn.Parameter(torch.empty(n_gates, dtype=torch.float32))
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Fresh: visual_gate = 0 (the layer equals the pre-trained one, whatever the image)."""
        self.visual_gate.zero_()

    def prompt_kv(self, ctx: AttentionContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The visual prompt's keys and values (B, visual_len, nkv, hs) in dtype, the values of rows without a
        visual input zeroed; None without a visual input."""
        if ctx.visual is None:
            return None
        tokens = ctx.visual.to(dtype)
        shape = (tokens.shape[0], tokens.shape[1], self.n_kv_heads, self.head_dim)
        pk, pv = self.wk(tokens).view(shape), self.wv(tokens).view(shape)
        if ctx.visual_mask is not None:
            pv = pv * ctx.visual_mask.view(-1, 1, 1, 1).to(dtype)
        return pk, pv

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cache = self.kv_cache
        if cache is not None and ctx.input_pos > 0:
            kv = cache.prompt_kv  # computed at the prefill; None if it had no visual input
        else:
            kv = self.prompt_kv(ctx, q.dtype)
            if cache is not None:
                cache.prompt_kv = kv
        if kv is None:
            return super().attend(q, k, v, ctx)
        return gated_attention(self, q, k, v, ctx, kv[0], kv[1], self.visual_gate)


def gated_attention(layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                    pk: torch.Tensor, pv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The layer's token attention plus its gated prompt (pk, pv): packed (varlen), or padded / cached; through the
    fused op, or the official code's eager formulation (set_attention_impl). A left-padded batch (batched
    generation) masks each row's pad keys (leftpad_k)."""
    if ctx.cu_seqlens is not None:  # packed sequences: the prompt (shared, or one per sequence), varlen
        check_packed_impl(layer.attn_impl)
        return packed_attention(q, k, v, ctx, pk, pv, gate, layer.gate_act)
    attention = zero_init_attention if layer.attn_impl == "fused" else zero_init_attention_ref
    return attention(q, k, v, pk, pv, gate, causal=True, gate_act=layer.gate_act, leftpad_k=ctx.leftpad_k)


def adapter_layers(model: LLaMA) -> dict[str, AdapterAttention]:
    """The attention modules with adaption prompts by name ("layers.N.attention"), bottom to top."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterAttention)}


def adapter_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """The adapter's parameters alone, by name (the module docstring lists them): what save_adapter writes,
    mark_only_adapter_as_trainable trains and cast_base leaves in fp32."""
    state = {}
    v2 = getattr(model.adapter, "version", 1) == 2
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, VisualPromptAttention):
            own = ("visual_gate",)
        elif isinstance(module, AdapterAttention):
            own = ("adapter_prompt", "gate")
        elif isinstance(module, BiasScaleLinear):
            own = ("bias", "scale")
        elif v2 and _NORM_RE.fullmatch(f"{prefix}weight"):
            own = ("weight",)
        elif name == "visual_proj":
            state.update({f"visual_proj.{k}": v for k, v in module.named_parameters()})
            continue
        else:
            continue
        state.update({f"{prefix}{p}": getattr(module, p) for p in own})
    return state


def fresh_adapter_parameters(model: LLaMA) -> dict[str, torch.Tensor]:
    """The parameters the adapter adds to the base: adapter_state_dict but for V2's norms (the base checkpoint
    holds those; the adapter trains them)."""
    return {name: p for name, p in adapter_state_dict(model).items() if not _NORM_RE.fullmatch(name)}


def adapter_groups(model: LLaMA) -> dict[str, list[str]]:
    """Joint training's disjoint groups of the adapter's parameters (names): "visual" (the projector, the early
    fusion gates), trained on image records; "language" (the rest), trained on text records."""
    groups: dict[str, list[str]] = {"visual": [], "language": []}
    for name in adapter_state_dict(model):
        visual = name.startswith("visual_proj.") or name.endswith(".visual_gate")
        groups["visual" if visual else "language"].append(name)
    return groups


@torch.no_grad()
def reset_adapter(model: LLaMA, device: torch.device | str | None = None) -> LLaMA:
    """A fresh adapter: every parameter the adapter adds gets its initial value (prompts N(0, 1), gates 0, biases
    0, scales 1, the projector's default init), first allocated on device when given (a model built on the meta
    device). The norms V2 trains keep their (checkpoint) values. Returns model."""
    for name, module in model.named_modules():
        if isinstance(module, (AdapterAttention, VisualPromptAttention, BiasScaleLinear)):
            if device is not None:
                module.to_empty(device=device, recurse=False)
            module.reset_adapter()
        elif name == "visual_proj":
            if device is not None:
                module.to_empty(device=device)
            module.reset_parameters()
    return model


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
