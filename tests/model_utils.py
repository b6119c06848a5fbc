"""Tiny random LLaMA models shared by the model tests (dim 128, 2 layers, head_dim 32).

Weights are re-drawn at a scale where attention is far from uniform (std 0.1 on dim 128),
so a wrong RoPE, permutation or mask changes the logits well beyond the tolerances.
"""

from __future__ import annotations

import torch

from llama_adapter_triton import AdapterConfig, LLaMA, LLaMAConfig, adapter_layers

VOCAB = 96


def tiny_config(*, gqa: bool = False, llama3: bool = False, n_layers: int = 2) -> LLaMAConfig:
    """LLaMA-2-like (MHA), or Llama-3-like (GQA, rope theta 500000 with 3.1 scaling, tied embeddings)."""
    extra = dict(rope_theta=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_seq_len=8192), tie_embeddings=True)
    return LLaMAConfig(name="tiny-test", dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=2 if gqa else 4,
                       vocab_size=VOCAB, multiple_of=32, norm_eps=1e-5, max_seq_len=64, **(extra if llama3 else {}))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every weight: matrices N(0, 0.1), norm weights 1 + N(0, 0.1); adapter parameters untouched."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("adapter_prompt", "gate", "adaption_prompt", "adaption_gate")):
            continue
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.copy_(noise if p.dim() == 2 else 1 + noise)
    return model


@torch.no_grad()
def set_adapter_(model: LLaMA, seed: int = 1, gate_scale: float = 0.5) -> LLaMA:
    """Non-zero gates (and fresh prompts), so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in adapter_layers(model).values():
        m.adapter_prompt.copy_(torch.randn(m.adapter_prompt.shape, generator=g))
        m.gate.copy_(torch.randn(m.gate.shape, generator=g) * gate_scale)
    return model


def tiny_model(adapter: AdapterConfig | None = None, *, seed: int = 0, **config_kwargs) -> LLaMA:
    torch.manual_seed(seed)
    model = randomize_(LLaMA(tiny_config(**config_kwargs), adapter), seed)
    if adapter is not None:
        set_adapter_(model, seed + 1)
    return model.eval()


def copy_base(src: LLaMA, dst: LLaMA) -> LLaMA:
    """dst's base weights := src's (adapter parameters of either side are left alone)."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name in dst_params and not name.endswith(("adapter_prompt", "gate")):
                dst_params[name].copy_(p)
    return dst


def hf_config(config: LLaMAConfig):
    """The transformers LlamaConfig of the same shapes."""
    from transformers import LlamaConfig

    rope = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_seq_len}
    return LlamaConfig(hidden_size=config.dim, intermediate_size=config.hidden_dim, num_hidden_layers=config.n_layers,
                       num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                       vocab_size=config.vocab_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
                       rope_scaling=rope, max_position_embeddings=config.max_seq_len,
                       tie_word_embeddings=config.tie_embeddings)


def hf_model(config: LLaMAConfig, seed: int = 0):
    """A random transformers LlamaForCausalLM (fp32, eval) of the config's shapes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(hf_config(config)), seed).eval()


def peft_adaption_prompt(hf, *, adapter_len: int = 4, adapter_layers: int = 1, gate: float = 0.7):
    """PEFT's adaption prompt (its own get_peft_model) on a transformers model, every gate set to `gate`: PEFT's zero
    init would hide the prompts from a comparison."""
    import peft

    model = peft.get_peft_model(hf, peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                              task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(gate)
    return model
