"""Processes of a fine-tuning run: one, or torchrun's ranks (DDP or FSDP2), and the adapter gathered from them.

Under torchrun each rank takes its share of every step's micro-batches; only rank 0 writes files. CPU runs use
gloo (tested with 2 processes), GPUs NCCL. Dist.on_main runs a check or a read on rank 0 and raises its error on
every rank, so that all ranks stop together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from llama_adapter_triton.model.adapter import (
    AdapterConfig,
    adapter_state_dict,
    cast_base,
    mark_only_adapter_as_trainable,
)
from llama_adapter_triton.model.checkpoint import load_checkpoint, load_config
from llama_adapter_triton.model.cli import check_cuda_device
from llama_adapter_triton.model.llama import LLaMA
from llama_adapter_triton.train.config import FinetuneConfig, UsageError


@dataclass
class Dist:
    """This process's place: rank, world_size, device, and whether run() started the process group."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, message: str) -> None:
        """Print on rank 0, through tqdm (the progress bar stays whole)."""
        if self.main:
            tqdm.write(message, file=sys.stdout)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on rank 0 only; its result (or its exception) reaches every rank."""
        if self.world_size == 1:
            return fn()
        payload: list[Any] = [None]
        if self.main:
            try:
                payload = [(True, fn())]
            except Exception as e:  # re-raised on every rank, so that all of them stop together
                payload = [(False, e)]
        dist.broadcast_object_list(payload, src=0)
        ok, value = payload[0]
        if not ok:
            raise value
        return value

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t


def setup_distributed(device: str) -> Dist:
    """One process, or a torchrun rank (WORLD_SIZE > 1): gloo on CPUs, NCCL on GPUs (cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if device.startswith("cuda"):
        try:
            check_cuda_device(device)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if world_size == 1:
        return Dist(0, 1, torch.device(device if device != "auto" else "cuda" if cuda else "cpu"))
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device}: under torchrun every rank takes cuda:LOCAL_RANK; give --device cuda")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return Dist(rank, world_size, dev, owns)


def adapter_tensors(model: LLaMA) -> dict[str, torch.Tensor]:
    """The adapter as full fp32 CPU tensors on every rank (gathered from the shards under FSDP: call on all ranks)."""
    names = adapter_state_dict(model).keys()
    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2: gathered from the shards (its state_dict
        # hooks also put the sharded parameters back in place, where get_optimizer_state_dict looks for them)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    else:  # the parameters themselves: get_model_state_dict walks the whole state dict, whose entries of an int8
        state = adapter_state_dict(model)  # base (Linear8bitLt's SCB) are not attributes of modules: it fails on them
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items() if k in names}


def build_model(config: FinetuneConfig, adapter: AdapterConfig, dtype: torch.dtype,
                d: Dist) -> tuple[LLaMA, torch.nn.Module]:
    """(model, the module to train through): the plain model, the same under DDP, or the FSDP2-sharded model."""
    if not config.fsdp:
        model = load_checkpoint(config.checkpoint, adapter=adapter, dtype=dtype, device=d.device,
                                allow_external_files=config.allow_external_files, quantize=config.quantize,
                                quantize_output=config.quantize_output)
        mark_only_adapter_as_trainable(model)
        model.activation_checkpointing = config.activation_checkpointing
        if d.world_size == 1:
            return model, model
        # the base has requires_grad False: DDP registers (and all-reduces) the adapter's parameters only
        return model, DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = LLaMA(load_config(config.checkpoint, allow_external_files=config.allow_external_files), adapter)
    cast_base(model, dtype)
    mark_only_adapter_as_trainable(model)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=d.device)
    # rank 0 reads the checkpoint (on the CPU) and its fresh, seeded adapter; the others receive their shards
    full = load_checkpoint(config.checkpoint, adapter=adapter, dtype=dtype,
                           allow_external_files=config.allow_external_files).state_dict() if d.main else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.activation_checkpointing = config.activation_checkpointing
    return model, model
