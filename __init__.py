"""llama_adapter_triton: LLaMA-Adapter (arXiv 2303.16199) and LLaMA-Adapter V2 (arXiv 2304.15010) on one fused
Triton kernel for zero-init attention.

    from llama_adapter_triton import zero_init_attention           # the op: any PyTorch code (kernels/)
    from llama_adapter_triton import load_checkpoint, load_adapter, save_adapter, Tokenizer, generate
    from llama_adapter_triton import LLaMA, LLaMAConfig, AdapterConfig, use_fused_attention

The repository's root is this package: kernels/, model/, train/ and bench/ are its subpackages
(llama_adapter_triton.kernels.zero_init_attn, ...), installed under this one name and no other. None of them has
an __init__.py, so that from the repository's root a top-level `import kernels` still finds Hugging Face's
`kernels` distribution, never ours. The names below load on first use: importing the package imports nothing
heavy, and `import llama_adapter_triton.kernels.zero_init_attn` pulls in torch and triton only.
Command line: `llama-adapter finetune|generate|demo|scienceqa|bench|compile-check ...` (__main__.py).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "zero_init_attention": "kernels.zero_init_attn",
    "zero_init_attention_ref": "kernels.reference",
    **dict.fromkeys(("ATTENTION_IMPLS", "PRESETS", "LLaMA", "LLaMAConfig", "RopeScaling", "set_attention_impl"),
                    "model.llama"),
    **dict.fromkeys(("AdapterAttention", "AdapterConfig", "BiasScaleLinear", "adapter_groups", "adapter_layers",
                     "adapter_state_dict", "cast_base", "mark_only_adapter_as_trainable", "reset_adapter"),
                    "model.adapter"),
    **dict.fromkeys(("checkpoint_format", "load_checkpoint", "load_config", "save_checkpoint"), "model.checkpoint"),
    **dict.fromkeys(("CheckpointError", "write_atomic"), "model.io"),
    **dict.fromkeys(("load_adapter", "read_adapter_config", "save_adapter"), "model.adapters.formats"),
    "AdapterBank": "model.bank",
    "Tokenizer": "model.tokenizer",
    "alpaca_prompt": "model.prompt",
    **dict.fromkeys(("generate", "stream"), "model.generate"),
    **dict.fromkeys(("use_fused_attention", "remove_fused_attention"), "model.hf"),
    **dict.fromkeys(("CLIPImageEncoder", "VisualProjector"), "model.visual"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

