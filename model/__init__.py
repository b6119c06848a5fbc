"""LLaMA with LLaMA-Adapter (arXiv 2303.16199) and LLaMA-Adapter V2 (arXiv 2304.15010, AdapterConfig(version=2))
on the fused zero-init attention op.

    from model import LLaMA, LLaMAConfig, AdapterConfig, Tokenizer
    from model import load_checkpoint, save_adapter, load_adapter
    from model.generate import generate, stream      # (not imported here: `python -m model.generate` runs it)
    from model import set_attention_impl
    set_attention_impl(model, "eager")   # the official code's attention formulation (benchmarks); default "fused"
    from model import CLIPImageEncoder   # multi-modal adapters: CLIP features of images (model/visual.py)
    from model import use_fused_attention   # a transformers Llama / Mistral with PEFT's adaption prompt, through
    use_fused_attention(peft_model)         # the fused op (model/hf.py); remove_fused_attention(peft_model) undoes it
"""

from .adapter import (
    AdapterAttention,
    AdapterConfig,
    BiasScaleLinear,
    adapter_groups,
    adapter_layers,
    adapter_state_dict,
    cast_base,
    mark_only_adapter_as_trainable,
    reset_adapter,
)
from .checkpoint import (
    CheckpointError,
    checkpoint_format,
    load_adapter,
    load_checkpoint,
    load_config,
    read_adapter_config,
    save_adapter,
    save_checkpoint,
    write_atomic,
)
from .hf import remove_fused_attention, use_fused_attention
from .llama import ATTENTION_IMPLS, PRESETS, LLaMA, LLaMAConfig, RopeScaling, set_attention_impl
from .prompt import alpaca_prompt
from .tokenizer import Tokenizer
from .visual import CLIPImageEncoder, VisualProjector

__all__ = [
    "ATTENTION_IMPLS", "PRESETS", "AdapterAttention", "AdapterConfig", "BiasScaleLinear", "CLIPImageEncoder",
    "CheckpointError", "LLaMA", "LLaMAConfig", "RopeScaling", "Tokenizer", "VisualProjector", "adapter_groups",
    "adapter_layers", "adapter_state_dict", "alpaca_prompt", "cast_base", "checkpoint_format", "load_adapter",
    "load_checkpoint", "load_config", "mark_only_adapter_as_trainable", "read_adapter_config",
    "remove_fused_attention", "reset_adapter", "save_adapter", "save_checkpoint", "set_attention_impl",
    "use_fused_attention", "write_atomic",
]
