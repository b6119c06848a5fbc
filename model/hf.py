"""The fused op as a drop-in for transformers and PEFT: one call, and a Llama-family model (Llama, Mistral) with a PEFT
adaption-prompt adapter runs its attention, the tokens and the prompt in one pass, through
kernels.zero_init_attention, with PEFT's logits and gradients.

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "adapter-folder")
    use_fused_attention(model)      # training, model(...), model.generate(...): as before, through the fused op
    remove_fused_attention(model)   # back to the attention it had (eager, sdpa, ...)

How: use_fused_attention registers FUSED ("llama_adapter_fused") with transformers' AttentionInterface (and
flash-attention's mask convention with AttentionMaskInterface: no 4-D mask is built) and sets it as the model's
attention: transformers still projects q, k, v, applies RoPE and updates the KV cache. PEFT's AdaptedAttention
modules become FusedAdaptedAttention (the same parameters, names and saving), which hand their prompt and gate to
fused_attention instead of adding the prompt part afterwards:

    out = softmax_causal(s q k^T) v + g * softmax(s q pk^T) pv,   pk = k_proj(P), pv = v_proj(P), no RoPE on pk,

PEFT's formulation in one kernel (layers without a prompt get an empty one); PEFT computes it in another order, so
the two agree to rounding. Idempotent; remove_fused_attention restores the implementation and PEFT's classes.
Limits, each refused with a ValueError: model_type llama or mistral; transformers >= 5; padding on the left, or on
the right without a KV cache; no packed sequences, static cache, attention dropout or output_attentions; no forward
over more keys than Mistral's window; the op's head dims. The full list: docs/checkpoints.md (transformers + PEFT).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention

FUSED = "llama_adapter_fused"  # the name registered with transformers' AttentionInterface
MODEL_TYPES = ("llama", "mistral")
_PREVIOUS = "_llama_adapter_previous_attn"  # attribute of the transformers model: the implementation to go back to


def fused_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, adaption_prompt: torch.Tensor | None = None,
                    adaption_gate: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface, through kernels.zero_init_attention.

    Arguments:
        module: the model's attention module (its k_proj / v_proj make the prompt's keys and values).
        query: (batch, nheads, seqlen_q, headdim), RoPE applied; key, value: (batch, nheads_kv, seqlen_k, headdim),
            the KV cache included.
        attention_mask: None (no padding) or (batch, seqlen_k) bool, True for real tokens (flash-attention's
            convention, as registered): left padding, or right padding without a KV cache.
        scaling: the softmax scale; dropout: must be 0; sliding_window: Mistral's, checked against seqlen_k.
        adaption_prompt: (1, adapter_len, hidden) and adaption_gate (1,): PEFT's, passed by FusedAdaptedAttention;
            None in layers without a prompt.
    Returns:
        (out (batch, seqlen_q, nheads, headdim), None): transformers' (attn_output, attn_weights).
    """
    batch, _, seqlen_q, head_dim = query.shape
    n_kv, seqlen_k = key.shape[1], key.shape[2]
    if kwargs.get("output_attentions"):  # the op materialises no attention weights
        raise ValueError(f"{FUSED}: output_attentions is not available")
    if dropout:
        raise ValueError(f"{FUSED}: attention dropout ({dropout}) is not supported; set config.attention_dropout = 0")
    if sliding_window is not None and seqlen_k > sliding_window:
        raise ValueError(f"{FUSED}: {seqlen_k} keys exceed the model's sliding_window ({sliding_window}); the fused "
                         "op has no sliding window: keep sequences (with their cache) within it")
    first = getattr(module, "layer_idx", 0) == 0  # what every layer shares is checked once, in the first
    leftpad = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, seqlen_k):
            raise ValueError(f"{FUSED}: expected a (batch, keys) = {(batch, seqlen_k)} padding mask, got "
                             f"{tuple(attention_mask.shape)}: a custom 4-D mask, or a static (pre-allocated) KV cache "
                             "(more keys than tokens), is not supported; use the default dynamic cache")
        mask = attention_mask.bool()
        if first:
            _check_padding(mask, cached=seqlen_q != seqlen_k)
        # left padding: the op's leftpad_k; right padding needs no mask: a causal query never sees a key after it
        leftpad = mask.int().argmax(1).to(torch.int32)  # the first real key of each row (0 for a row of padding)
    elif first and position_ids is not None:
        if seqlen_q > 1 and bool((position_ids.diff(dim=-1) != 1).any()):
            raise ValueError(f"{FUSED}: position_ids restart inside a row (packed sequences); not supported")
        if bool((position_ids[:, -1] + 1 < seqlen_k).any()):  # keys the tokens have not filled
            raise ValueError(f"{FUSED}: {seqlen_k} keys for tokens up to position {int(position_ids[:, -1].max())}: a "
                             "static (pre-allocated) KV cache is not supported; use the default dynamic cache")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, h, hd) views
    if adaption_prompt is None:  # a layer without a prompt: plain causal attention, through the same op
        pk = pv = k.new_empty(1, 0, n_kv, head_dim)
        gate = q.new_zeros(1)
    else:
        prompt = adaption_prompt.to(q.dtype)  # (1, K, hidden)
        shape = (1, prompt.shape[1], n_kv, head_dim)
        pk, pv = module.k_proj(prompt).view(shape), module.v_proj(prompt).view(shape)
        gate = adaption_gate
    out = zero_init_attention(q, k, v, pk, pv, gate, causal=True, softmax_scale=scaling, gate_act="identity",
                              leftpad_k=leftpad)
    return out, None


def _check_padding(mask: torch.Tensor, cached: bool) -> None:
    """ValueError unless every row of the (batch, keys) mask holds its real tokens in one run: padding on the left
    and, without a KV cache, on the right."""
    keys = mask.shape[1]
    count = mask.sum(1)
    first = mask.int().argmax(1)
    last = keys - 1 - mask.flip(1).int().argmax(1)
    if not bool(((count == 0) | (last - first + 1 == count)).all()):
        raise ValueError(f"{FUSED}: the attention_mask has holes (padding between real tokens; generation after "
                         "right padding makes them: pad on the left, tokenizer.padding_side = 'left'); only padding "
                         "on the left or right is supported")
    if cached and bool(((count > 0) & (last < keys - 1)).any()):
        raise ValueError(f"{FUSED}: padding on the right with a KV cache (generation); pad on the left "
                         "(tokenizer.padding_side = 'left')")


def _adapted_attention_class():
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    return AdaptedAttention


_FUSED_CLASS: type | None = None


def _fused_class() -> type:
    """FusedAdaptedAttention, made once (peft is imported only when a model is converted)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        class FusedAdaptedAttention(_adapted_attention_class()):
            """PEFT's AdaptedAttention, its prompt and gate handed to the wrapped attention (fused_attention)."""

            def forward(self, **kwargs):  # (output_attentions reaches fused_attention, which refuses it)
                return self.model(**kwargs, adaption_prompt=self.adaption_prompt, adaption_gate=self.adaption_gate)

        _FUSED_CLASS = FusedAdaptedAttention
    return _FUSED_CLASS


def _register() -> None:
    import transformers
    from transformers import AttentionInterface

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"model: use_fused_attention needs transformers >= 5 (its attention and mask registries), "
                         f"found {transformers.__version__}")
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FUSED, fused_attention)
    AttentionMaskInterface.register(FUSED, flash_attention_mask)  # None without padding, else the 2-D mask


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside model (a PeftModel, PEFT's AdaptionPromptModel, or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "model", inner) if type(inner).__name__ == "AdaptionPromptModel" else inner
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "set_attn_implementation"):
        raise ValueError(f"model: expected a transformers model (or a PEFT model of one), got {type(model).__name__}")
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"model: model_type {config.model_type!r} is not supported (the fused attention serves "
                         f"{', '.join(MODEL_TYPES)})")
    return inner


def _adapted_modules(model: nn.Module) -> list[nn.Module]:
    """PEFT's adapted attention modules: those in the model and the cached ones of inactive adapters."""
    found = list(model.modules())
    for m in list(found):
        for cached in getattr(m, "_cached_adapters", {}).values():  # AdaptionPromptModel's inactive adapters
            found.extend(cached)
    return [m for m in found if isinstance(m, _adapted_attention_class())]


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Make model (a transformers Llama / Mistral, or a PEFT model of one with adaption prompts) run every attention
    layer, its prompt included, through kernels.zero_init_attention (see the module docstring); returns model.
    Calling it again changes nothing; remove_fused_attention undoes it."""
    hf = _hf_model(model)
    _register()
    if hf.config._attn_implementation != FUSED:
        setattr(hf, _PREVIOUS, hf.config._attn_implementation)
        hf.set_attn_implementation(FUSED)
    if hf.config._attn_implementation != FUSED:
        raise ValueError(f"model: {type(hf).__name__} does not take a registered attention function "
                         f"(set_attn_implementation({FUSED!r}) left it at {hf.config._attn_implementation!r})")
    fused = _fused_class()
    for m in _adapted_modules(model):
        m.__class__ = fused
    return model


def remove_fused_attention(model: nn.Module) -> nn.Module:
    """Undo use_fused_attention: the attention implementation model had before, PEFT's own AdaptedAttention; returns
    model. A model that was not converted is left as it is."""
    hf = _hf_model(model)
    previous = getattr(hf, _PREVIOUS, None)
    if previous is not None and hf.config._attn_implementation == FUSED:
        hf.set_attn_implementation(previous)
        delattr(hf, _PREVIOUS)
    original = _adapted_attention_class()
    for m in _adapted_modules(model):
        if type(m) is _fused_class():
            m.__class__ = original
    return model
