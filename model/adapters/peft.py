"""PEFT's adaption prompt (peft_type ADAPTION_PROMPT), read and written: a folder with adapter_config.json
(adapter_len, adapter_layers) and adapter_model.safetensors or adapter_model.bin, or that weights file alone:
    ...layers.N.self_attn.adaption_prompt   (1, adapter_len, dim)   per adapted layer (the top ones)
    ...layers.N.self_attn.adaption_gate     (1,)
gate="layer", gate_act="identity" (PEFT multiplies by the raw gate). PEFT's prompt keys come from HF's permuted
k_proj and meet HF's permuted queries: the same permutation on both sides of every dot product, so the prompts are
used as they are.
Out (save_adapter(model, folder, format="peft")): a folder PEFT's PeftModel.from_pretrained loads onto the
transformers model of the same base, for the adapters PEFT can express (gate="layer", gate_act="identity", V1, text
only; others are refused before anything is written).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from llama_adapter_triton.model.adapter import AdapterConfig, adapter_state_dict
from llama_adapter_triton.model.adapters.common import AdapterFile, by_layer, tensor_problem
from llama_adapter_triton.model.adapters.ours import ADAPTER_FORMAT
from llama_adapter_triton.model.io import CheckpointError, read_json, refuse_link, write_atomic
from llama_adapter_triton.model.llama import LLaMA

_PEFT_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)")
_PEFT_NAME = "base_model.model.model.layers.{}.self_attn.adaption_{}"  # as PEFT saves them; _PEFT_RE reads them


def folder_weights(folder: Path) -> Path:
    """The weights file of a PEFT adapter folder (the one adapter format that is a folder)."""
    config_file = folder / "adapter_config.json"
    weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).exists()]
    if not config_file.exists() or not weights:
        raise CheckpointError(f"{folder}: a PEFT adapter folder needs adapter_config.json and "
                              "adapter_model.safetensors or adapter_model.bin")
    return weights[0]


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(_PEFT_RE.fullmatch(name) for name in tensors)


def parse(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, gate_act: str | None,
          adapter_len: int | None) -> AdapterFile:
    """The file's adapter, checked against the adapter_config.json beside it when there is one (gate_act and
    adapter_len: the file tells them)."""
    config_file = file.parent / "adapter_config.json"
    peft_config = read_json(config_file) if config_file.exists() else None
    layers = by_layer(file, tensors, _PEFT_RE, ("prompt", "gate"))
    for got in layers.values():
        (pname, p), (gname, g) = got["prompt"], got["gate"]
        if p.dim() != 3 or p.shape[0] != 1:
            raise CheckpointError(f"{file}: tensor {pname!r} has shape {tuple(p.shape)}, expected "
                                  "(1, adapter_len, dim)")
        if g.shape != (1,):
            raise CheckpointError(f"{file}: tensor {gname!r} has shape {tuple(g.shape)}, expected (1,)")
    adapter_len = next(iter(layers.values()))["prompt"][1].shape[1]
    if peft_config is not None:
        if peft_config.get("peft_type") != "ADAPTION_PROMPT":
            raise CheckpointError(f"{file}: adapter_config.json has peft_type {peft_config.get('peft_type')!r}, "
                                  "expected 'ADAPTION_PROMPT'")
        for key, value in (("adapter_len", adapter_len), ("adapter_layers", len(layers))):
            if peft_config.get(key) != value:
                raise CheckpointError(f"{file}: adapter_config.json says {key}={peft_config.get(key)!r} but the "
                                      f"weights hold {value}")
        # what PEFT writes for a LLaMA (absent or null: PEFT's defaults, the same); anything else is another model
        for key, want in (("target_modules", "self_attn"), ("task_type", "CAUSAL_LM")):
            if peft_config.get(key) not in (None, want):
                raise CheckpointError(f"{file}: adapter_config.json has {key} {peft_config[key]!r}; a LLaMA's "
                                      f"adaption prompt has {want!r}")
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=len(layers), gate="layer", gate_act="identity")
    return AdapterFile("PEFT adaption-prompt", file, config, list(layers), None,
                       [(got["prompt"][0], got["prompt"][1][0]) for got in layers.values()],
                       [got["gate"] for got in layers.values()])


def peft_export_problem(adapter: AdapterConfig) -> str | None:
    """Why PEFT's adaption prompt cannot express this adapter (a sentence naming the setting), or None when it can.
    PEFT has one raw gate per layer (gate="layer", gate_act="identity"), no V2 and no visual projector; its adapted
    layers are the top adapter_layers ones, as ours."""
    for key, want in (("gate", "layer"), ("gate_act", "identity"), ("version", 1), ("visual_dim", 0)):
        if getattr(adapter, key) != want:
            return (f"the adapter has {key}={getattr(adapter, key)!r}; PEFT's adaption prompt has {key}={want!r} only "
                    "(one raw gate per layer, no V2, no visual projector)")
    return None


def save_peft_adapter(model: LLaMA, path: str | os.PathLike, *, overwrite: bool = False,
                      state: dict[str, torch.Tensor] | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter as a PEFT adaption-prompt folder: adapter_config.json and adapter_model.safetensors, which
    PeftModel.from_pretrained(LlamaForCausalLM of the same base, path) loads (and load_adapter reads back).

    The inverse of the import (parse): layers.N.attention.adapter_prompt (K, dim) becomes
    base_model.model.model.layers.N.self_attn.adaption_prompt (1, K, dim), the gate (1,) ...adaption_gate, fp32, with
    PEFT's config (peft_type ADAPTION_PROMPT, adapter_len, adapter_layers, target_modules "self_attn", task_type
    CAUSAL_LM, base_model_name_or_path). Adapters PEFT cannot express (peft_export_problem) are refused before
    anything is written. The folder is written under a temporary name beside path and renamed into place; an
    existing folder is refused unless overwrite=True, which replaces those two files in it (one by one, each
    atomically) and leaves its other files alone; a link at path is refused (refuse_link). state: as save_adapter's."""
    if model.adapter is None:
        raise ValueError("the model has no adapter to save")
    problem = peft_export_problem(model.adapter)
    if problem:
        raise ValueError(f"{path}: not written in PEFT's format: {problem}")
    folder = Path(path)
    refuse_link(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; the PEFT format is a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace its adapter_config.json and "
                              "adapter_model.safetensors")
    state = adapter_state_dict(model) if state is None else state
    tensors = {}
    for n in range(model.config.n_layers):
        if f"layers.{n}.attention.adapter_prompt" not in state:
            continue
        for ours, theirs in (("adapter_prompt", "prompt"), ("gate", "gate")):
            t = state[f"layers.{n}.attention.{ours}"].detach().to("cpu", torch.float32)
            if not torch.isfinite(t).all():
                raise ValueError(f"{folder}: not written: tensor 'layers.{n}.attention.{ours}' {tensor_problem(t)}")
            tensors[_PEFT_NAME.format(n, theirs)] = (t[None] if ours == "adapter_prompt" else t).contiguous()
    config = {"adapter_layers": model.adapter.adapter_layers, "adapter_len": model.adapter.adapter_len,
              "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
              "peft_type": "ADAPTION_PROMPT", "revision": None, "target_modules": "self_attn",
              "task_type": "CAUSAL_LM"}
    files = {"adapter_model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt",
                                                                                 "written_by": ADAPTER_FORMAT}),
             "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode()}
    if folder.exists():  # (empty, or overwrite=True)
        for name, data in files.items():
            write_atomic(folder / name, data, overwrite=True)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir()
        for name, data in files.items():
            write_atomic(tmp / name, data)
        os.rename(tmp, folder)  # fails if a folder appeared at path meanwhile: nothing is replaced
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(folder)) from e
    finally:
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return folder
