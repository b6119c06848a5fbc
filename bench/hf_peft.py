"""transformers' LlamaForCausalLM with PEFT's adaption prompt (LLaMA-Adapter as PEFT ships it), as bench_finetune's
hf_peft and hf_peft_fused providers run it: the random model, its loss, its fp32 oracle, and the fused op patched in
through model/hf.py. transformers and peft are optional (the dev extra): hf_missing says why they cannot run here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llama_adapter_triton.bench.common import ConfigError, free_device_memory, model_config
from llama_adapter_triton.model.checkpoint import hf_config_dict
from llama_adapter_triton.model.hf import remove_fused_attention, use_fused_attention
from llama_adapter_triton.train.data import IGNORE_INDEX

DTYPE = torch.bfloat16  # the frozen base, as in bench_finetune


def random_peft_llama(name: str, cfg, device: torch.device, dtype: torch.dtype = DTYPE) -> torch.nn.Module:
    """transformers' LlamaForCausalLM of preset name (random, in dtype, on device, SDPA attention) with PEFT's adaption
    prompt (cfg.adapter_len prompts in the top cfg.adapter_layers layers, seed cfg.seed), the gates spread over
    [-1.5, 1.5] across the layers (PEFT's are per layer; with zero gates the check would not see the prompts)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model_config(name)
    if cfg.adapter_layers > config.n_layers:
        raise ConfigError("adapter_layers", f"{cfg.adapter_layers} exceeds the {config.n_layers} layers of {name}")
    torch.manual_seed(cfg.seed)
    hf_config = LlamaConfig(**hf_config_dict(config, dtype))
    hf_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype on the device: no fp32 copy of a 7B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    model = peft.get_peft_model(model, peft.AdaptionPromptConfig(
        adapter_len=cfg.adapter_len, adapter_layers=cfg.adapter_layers, task_type="CAUSAL_LM"))
    gates = [p for n, p in model.named_parameters() if n.endswith(".adaption_gate")]
    with torch.no_grad():
        for g, value in zip(gates, torch.linspace(-1.5, 1.5, len(gates)), strict=True):
            g.fill_(float(value))
    return model


def hf_missing() -> str | None:
    """Why the hf_ providers cannot run here (transformers or peft missing), or None."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"needs transformers and peft (pip install -e '.[dev]'): {e}"
    return None


def hf_loss_sum(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """batch_loss_sum for a transformers model, as its user computes it: the logits of every position (right-padded
    rows, no attention mask: causal attention never reaches the padding of a real token), fp32 cross-entropy summed
    over the targets (labels already shifted)."""
    labels = batch["labels"].flatten()
    at = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    logits = model(input_ids=batch["tokens"].to(device, non_blocking=True)).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1)[at.to(device)].float(),
                                             labels[at].to(device, non_blocking=True), reduction="sum")


@contextmanager
def hf_upcast(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A transformers model (PEFT's prompts and gates included) in fp32 while inside, cast back after (exact)."""
    low = next(model.parameters()).dtype
    model.float()
    try:
        yield model
    finally:
        model.to(low)
        free_device_memory(next(model.parameters()).device)


@contextmanager
def hf_fused(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A transformers model (PEFT's) through the fused op while inside (model.hf)."""
    use_fused_attention(model)
    try:
        yield model
    finally:
        remove_fused_attention(model)
