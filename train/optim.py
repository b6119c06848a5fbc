"""The optimization of a fine-tuning run: AdamW's parameter groups, the learning rate, its schedule, fp16's scaler.

lr = --lr, or --blr x effective batch / 256 (the paper's rule, blr 9e-3), the effective batch being the number of
EXAMPLES per optimizer step: batch_size x micro_batches_per_step when padded; when packed, where it varies from step
to step, the train examples divided by the steps of the first epoch (the mean). AdamW, betas (0.9, 0.95), weight
decay on the prompts, the projector's weights and the gates (param_groups); linear warmup over --warmup-epochs
(default 0.4 x --epochs, the paper's 2 of 5), then cosine decay to --min-lr. fp16 uses loss scaling
(torch.amp.GradScaler; ShardedGradScaler under FSDP).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llama_adapter_triton.model.llama import LLaMA
from llama_adapter_triton.train.config import FinetuneConfig, UsageError
from llama_adapter_triton.train.data import PackedLoader, PaddedLoader
from llama_adapter_triton.train.distributed import Dist


def param_groups(model: torch.nn.Module, weight_decay: float, *, decay_gates: bool = True) -> list[dict]:
    """AdamW groups [decay, no decay]: weight decay on the trained parameters of 2 or more dims (prompts, the
    projector's weights) and, with decay_gates, on the gates (gate, visual_gate: (nheads,) or (1,) here); none on
    the biases, V2's scales and the norms. decay_gates=True is the official scripts' rule (timm's
    param_groups_weight_decay in alpaca_finetuning_v1, misc.add_weight_decay in V2: every parameter of more than
    one dimension, their gates being (1, H, 1, 1))."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            gate = name.rsplit(".", 1)[-1] in ("gate", "visual_gate")
            (decay if p.dim() >= 2 or (decay_gates and gate) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at step (0-based): linear warmup to 1, then cosine decay to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def setup_optimizer(config: FinetuneConfig, model: LLaMA, loader: PackedLoader | PaddedLoader, mbs: int,
                    dtype: torch.dtype, d: Dist, num_eval: int | None) -> tuple[torch.optim.Optimizer, Any, Any,
                                                                                 list[int]]:
    """(AdamW, its warmup + cosine schedule, the fp16 loss scaler, the steps of each epoch), the lr by the
    paper's rule: blr x effective batch / 256, the effective batch being the examples per step (the mean when
    packed)."""
    steps_per_epoch = [loader.num_steps(e) for e in range(config.epochs)]
    total_steps = sum(steps_per_epoch)
    if config.padded:
        effective = config.batch_size * mbs
        batch_text = (f"padded, {config.batch_size} examples x {config.pad_to} tokens per micro-batch x {mbs} "
                      "micro-batches per step")
    else:
        effective = len(loader.data) / steps_per_epoch[0]
        batch_text = (f"packed, up to {config.token_budget} tokens per micro-batch x {mbs} micro-batches per step "
                      f"(no padding)")
    lr = config.lr if config.lr is not None else config.blr * effective / 256
    if lr / (1 - config.beta1) > torch.finfo(torch.float32).max:  # AdamW's first update would overflow
        raise UsageError(f"--lr {lr:g}{'' if config.lr is not None else ' (from --blr)'} is too large: AdamW's first "
                         "step, lr / (1 - beta1), overflows float32")
    warmup_epochs = 0.4 * config.epochs if config.warmup_epochs is None else config.warmup_epochs
    warmup_steps = round(warmup_epochs / config.epochs * total_steps)
    min_ratio = min(1.0, config.min_lr / lr)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, decay_gates=config.decay_gates), lr=lr,
                                  betas=(config.beta1, config.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio))
    if config.fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # agrees on inf/NaN across shards

        scaler = ShardedGradScaler(d.device.type, enabled=dtype == torch.float16)
    else:
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    eval_text = f", eval {num_eval}" if num_eval is not None else ", no eval split"
    d.say(f"batches: {batch_text}; {d.world_size} process(es){' (FSDP2)' if config.fsdp else ''} on {d.device}; "
          f"train {len(loader.data)} examples{eval_text}")
    d.say(f"schedule: {total_steps} steps in {config.epochs} epochs ({', '.join(map(str, steps_per_epoch))}); "
          f"effective batch {effective:.1f} examples per step; lr {lr:.3g}"
          + ("" if config.lr is not None else f" = blr {config.blr:g} x {effective:.1f} / 256")
          + f"; warmup {warmup_steps} steps, then cosine to {config.min_lr:g}")
    return optimizer, scheduler, scaler, steps_per_epoch
