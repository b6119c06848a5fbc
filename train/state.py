"""train_state.pt: the resumable state of a run, what it records of its inputs, and the checks of --resume.

The state holds the adapter, optimizer, scheduler, grad scaler, RNG, position (epoch, step) and resolved config,
and input_digests: size and sha256 of the data file and the tokenizer file. --resume reads it with torch.load
(weights_only=True) and checks each entry before use (the file is untrusted input); settings that change the result
must match (RESUMABLE_CHANGES may differ), and other data is refused (a state written before the digests were kept
resumes with a warning). The data order is a function of (seed, epoch) only, so a resumed run equals an
uninterrupted one (bitwise on a CPU). Adapter and optimizer state are full tensors (gathered under FSDP), so a run
may resume with or without FSDP, on another number of processes.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llama_adapter_triton.model.chat import RENDER_CHARS, RENDER_SECONDS
from llama_adapter_triton.model.io import CheckpointError, load_error, write_atomic
from llama_adapter_triton.model.llama import LLaMA
from llama_adapter_triton.model.tokenizer import Tokenizer
from llama_adapter_triton.train.config import PROG, FinetuneConfig, UsageError, cli_flag
from llama_adapter_triton.train.distributed import Dist, adapter_tensors

STATE_FILE = "train_state.pt"
STATE_FORMAT = "llama-adapter-triton train state"
# settings a resumed run may change: they do not change the result
RESUMABLE_CHANGES = ("out", "resume", "overwrite", "save_every", "stop_after_steps", "device", "tensorboard", "fsdp",
                     "allow_external_files", "activation_checkpointing", "export")
# settings that a state written before they existed ran with (the gates were not decayed before --decay-gates, the
# response was encoded on its own before --tokenization; the chat template's budget, its default)
UNRECORDED_SETTINGS = {"decay_gates": False, "tokenization": "litgpt", "chat_max_seconds": RENDER_SECONDS,
                       "chat_max_chars": RENDER_CHARS}


def _json_config(config: FinetuneConfig) -> dict:
    """The settings as they read back from JSON (paths as strings, tuples as lists), to compare with a saved run's."""
    return json.loads(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}))


def resolved_config(config: FinetuneConfig, micro_batches_per_step: int, dtype: torch.dtype, adapter: dict) -> dict:
    """The settings as the run resolves them (paths absolute; the processes' micro-batches, the dtype, --fusion and
    --visual-len filled in; adapter: adapter_fields'), as JSON reads them back: what train_state.pt keeps."""
    return _json_config(replace(
        config, micro_batches_per_step=micro_batches_per_step, dtype=str(dtype).removeprefix("torch."),
        fusion=adapter.get("fusion"), visual_len=adapter.get("visual_len"),
        **{k: getattr(config, k).resolve() for k in ("checkpoint", "data", "tokenizer", "clip", "image_root")
           if getattr(config, k) is not None}))


def _file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def input_digests(config: FinetuneConfig) -> dict[str, dict]:
    """Size and sha256 of what the run's examples are made of: the data file, the tokenizer file (and the
    tokenizer_config.json that gives a tokenizer.json its special tokens). Kept in the train state: --resume
    refuses to go on with other data."""
    tokenizer = Tokenizer.find(config.tokenizer or config.checkpoint)
    files = {"data file": config.data, "tokenizer": tokenizer}
    if tokenizer.suffix == ".json" and (tokenizer.parent / "tokenizer_config.json").is_file():
        files["tokenizer_config.json"] = tokenizer.parent / "tokenizer_config.json"
    return {name: {"file": str(path), **_file_digest(path)} for name, path in files.items()}


# the train state's entries, and their types; loaded from an untrusted file, each is checked before it is used
_STATE_ENTRIES = {"config": str, "epoch": int, "step": int, "global_step": int, "elapsed": float, "adapter": dict,
                  "optimizer": dict, "scheduler": dict, "scaler": dict, "rng": dict}


def load_state(config: FinetuneConfig, resolved: dict, inputs: dict[str, dict],
               say: Callable[[str], None] = print) -> dict:
    """OUT/train_state.pt, checked against this run's resolved settings and input_digests."""
    path = config.out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded with weights_only=True ({load_error(e)})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state written by {PROG}")
    for key, kind in _STATE_ENTRIES.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool) or \
                (kind is int and state[key] < 0):
            raise CheckpointError(f"{path}: its {key!r} must be {'an int >= 0' if kind is int else kind.__name__}, got "
                                  f"{type(state.get(key)).__name__}")
    try:
        saved = json.loads(state["config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its 'config' is not JSON ({e})") from None
    saved = {**UNRECORDED_SETTINGS, **saved}
    changed = [f"{cli_flag(k)} {saved.get(k)!r} -> {v!r}" for k, v in resolved.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise UsageError(f"--resume: these settings differ from the run in {config.out}: {'; '.join(changed)}. "
                         "Resume with the same settings, or start again with --overwrite")
    saved_inputs = state.get("inputs")
    if saved_inputs is None:  # written before the digests were kept
        say(f"warning: {path} does not record the data's digests (an older version wrote it): resuming on the "
            "assumption that the data file and the tokenizer have not changed")
    elif not isinstance(saved_inputs, dict):
        raise CheckpointError(f"{path}: its 'inputs' must be a dict, got {type(saved_inputs).__name__}")
    else:
        def text(entry: object) -> str:
            if entry is None:
                return "none"
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
                return f"{entry.get('bytes')} bytes, sha256 {entry['sha256'][:12]}..."
            return repr(entry)

        changed = [f"the {name} {inputs[name]['file'] if name in inputs else ''}: {text(saved_inputs.get(name))} -> "
                   f"{text(inputs.get(name))}" for name in sorted(inputs.keys() | saved_inputs.keys())
                   if saved_inputs.get(name) != inputs.get(name)]
        if changed:
            raise UsageError(f"--resume: the data differs from the run in {config.out}: {'; '.join(changed)}. "
                             "Resume with the data it started with, or start again with --overwrite")
    return state



def save_state(path: Path, model: LLaMA, optimizer: torch.optim.Optimizer, scheduler, scaler, d: Dist, *,
               resolved: dict, inputs: dict[str, dict], adapter: dict[str, torch.Tensor], epoch: int, step: int,
               global_step: int, elapsed: float) -> None:
    """Write train_state.pt (rank 0): the run goes on at step `step` of epoch `epoch` (0-based). Call on every rank:
    FSDP gathers the optimizer state. adapter: adapter_tensors(model), checked finite by the caller."""
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if d.main:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None}
        blob = {"format": STATE_FORMAT, "version": 1, "config": json.dumps(resolved), "inputs": inputs,
                "epoch": epoch, "step": step, "global_step": global_step, "elapsed": elapsed,
                "adapter": adapter, "optimizer": optim, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng}
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        write_atomic(path, buffer.getvalue(), overwrite=True)


def restore_state(state: dict, path: Path, model: LLaMA, optimizer: torch.optim.Optimizer, scheduler, scaler,
                  device: torch.device, *, epochs: int, steps_per_epoch: list[int]) -> tuple[int, int, int, float]:
    """Load load_state's state into the model (its adapter), optimizer, scheduler, scaler and RNG, after checking
    that it fits this run; returns its position: (epoch, step of that epoch, global step, elapsed seconds)."""
    names = set(adapter_tensors(model))
    if set(state["adapter"]) != names:
        raise CheckpointError(f"{path}: holds adapter tensors "
                              f"{sorted(state['adapter'])[:2]}..., the model has {sorted(names)[:2]}...")
    epoch, start_step, global_step, elapsed = state["epoch"], state["step"], state["global_step"], state["elapsed"]
    if epoch > epochs or start_step > (steps_per_epoch + [0])[epoch]:
        raise CheckpointError(f"{path}: its position, step {start_step} of epoch {epoch + 1}, "
                              f"lies beyond this run's {epochs} epochs of {steps_per_epoch} steps")
    options = StateDictOptions(full_state_dict=True, strict=False)
    try:
        set_model_state_dict(model, state["adapter"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a damaged or foreign state
        raise CheckpointError(f"{path}: cannot be restored ({type(e).__name__}: {e})") from None
    return epoch, start_step, global_step, elapsed
