"""Adapters in and out: load_adapter / read_adapter_config detect a file's format and parse it, save_adapter writes
ours or PEFT's.

A format is a module with detect(tensors, metadata) and parse(file, tensors, metadata, *, gate_act, adapter_len)
-> AdapterFile (common.py); FORMATS lists them in the order they are tried (the first whose detect is true
parses). Adding a format is adding its module and one line there. A folder is PEFT's (adapter_config.json beside
the weights). Every format is checked alike here: the gate_act asked for, finite floating-point tensors, and on
load the model's adapter config, dims and adapted layers.
A mismatch (another model size, missing or unexpected tensors, another gate mode or gate_act), bad metadata, or a
tensor that is not floating point or holds NaN / Inf raises CheckpointError naming the file and the tensor or
setting; save_adapter never writes a file that load_adapter would refuse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llama_adapter_triton.model.adapter import AdapterConfig, adapter_layers, adapter_state_dict
from llama_adapter_triton.model.adapters import litgpt, official_v1, official_v2, official_v2_chat, ours, peft
from llama_adapter_triton.model.adapters.common import ADAPTER_DTYPES, ADAPTER_DTYPES_TEXT, AdapterFile, tensor_problem
from llama_adapter_triton.model.adapters.ours import ADAPTER_FORMAT
from llama_adapter_triton.model.adapters.peft import save_peft_adapter
from llama_adapter_triton.model.io import CheckpointError, read_tensor_file
from llama_adapter_triton.model.llama import LLaMA, LLaMAConfig

# detection order: an official V2 file also holds v1's adapter_query.weight, and a V2 chat file may
FORMATS = (official_v2, official_v2_chat, official_v1, peft, litgpt, ours)
ADAPTER_FORMATS = (ADAPTER_FORMAT, "peft")  # what save_adapter writes


def read_adapter(path: str | os.PathLike, gate_act: str | None, adapter_len: int | None) -> AdapterFile:
    """The adapter of a file or PEFT folder, in our terms, its format detected and every tensor checked."""
    path = Path(path)
    if path.is_dir():
        path = peft.folder_weights(path)
    tensors, metadata = read_tensor_file(path)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    for name, t in tensors.items():  # before any parser computes with them (float8 has no isfinite, ...)
        if t.dtype not in ADAPTER_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype}; {ADAPTER_DTYPES_TEXT}")
    fmt = next((fmt for fmt in FORMATS if fmt.detect(tensors, metadata)), None)
    if fmt is None:
        raise CheckpointError(f"{path}: not a LLaMA-Adapter file (ours, the official v1, V2 or V2 chat release, PEFT's "
                              f"adaption prompt, litgpt's adapter or adapter_v2); its tensors start with "
                              f"{sorted(tensors)[:3]}")
    adapter = fmt.parse(path, tensors, metadata, gate_act=gate_act, adapter_len=adapter_len)
    if gate_act is not None and gate_act != adapter.config.gate_act:
        raise CheckpointError(f"{path}: this {adapter.fmt} adapter uses gate_act={adapter.config.gate_act!r}, "
                              f"not {gate_act!r}")
    for name, t in [*adapter.prompts, *adapter.gates, *adapter.extra.values()]:
        problem = t is not None and tensor_problem(t)
        if problem:
            raise CheckpointError(f"{path}: tensor {name!r} {problem}")
    return adapter


def read_adapter_config(path: str | os.PathLike, *, gate_act: str | None = None, adapter_len: int | None = None,
                        model: LLaMAConfig | None = None) -> AdapterConfig:
    """The AdapterConfig of an adapter file or PEFT folder, to build the model it fits:
    `load_checkpoint(ckpt, adapter=read_adapter_config(path, model=load_config(ckpt)))`.

    gate_act is required for the official v1 release (ambiguous, see model/adapters/official_v1.py) and
    checked for the others; adapter_len only matters for the official release (default 10). model: the config of
    the model it is for: the adapter is checked against it (dims, depth, adapted layers, every tensor's shape) before
    anything is allocated, as load_adapter checks it.
    """
    adapter = read_adapter(path, gate_act, adapter_len)
    if model is not None:
        check_fits(adapter, model)
    return adapter.config


def check_fits(adapter: AdapterFile, config: LLaMAConfig) -> None:
    """CheckpointError unless the adapter fits a model of config built with the adapter's own config: the model
    dims it records, its depth and adapted layers, and the shape of every tensor (against a meta model: nothing is
    allocated)."""
    file = adapter.file
    if adapter.model_dims is not None:
        for key in ours.MODEL_DIMS:
            if adapter.model_dims[key] != getattr(config, key):
                raise CheckpointError(f"{file}: the adapter was trained on a model with {key}="
                                      f"{adapter.model_dims[key]}, this model has {getattr(config, key)}")
    if adapter.config.adapter_layers > config.n_layers:
        raise CheckpointError(f"{file}: the adapter has {adapter.config.adapter_layers} adapted layers; this model "
                              f"has {config.n_layers} layers")
    top = list(range(config.n_layers - adapter.config.adapter_layers, config.n_layers))
    if adapter.n_layers not in (None, config.n_layers) or adapter.layers not in (None, top):
        raise CheckpointError(f"{file}: the adapter is for layers {adapter.layers or 'the top'} of a "
                              f"{adapter.n_layers or '?'}-layer model; this model ({config.n_layers} layers) adapts "
                              f"layers {f'{top[0]}..{top[-1]}' if top else 'none with a prompt'}")
    try:
        with torch.device("meta"):
            own = adapter_state_dict(LLaMA(config, adapter.config))
    except ValueError as e:
        raise CheckpointError(f"{file}: the adapter does not fit this model ({e})") from None
    for n, (pname, prompt), (gname, gate) in zip(top, adapter.prompts, adapter.gates, strict=True):
        for name, src, dst in ((pname, prompt, own.pop(f"layers.{n}.attention.adapter_prompt")),
                               (gname, gate, own.pop(f"layers.{n}.attention.gate"))):
            if src.shape != dst.shape:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(src.shape)}, the model "
                                      f"(dim {config.dim}, {config.n_heads} heads) needs {tuple(dst.shape)}")
    for name in sorted(own.keys() ^ adapter.extra.keys())[:1]:
        raise CheckpointError(f"{file}: the model's adapter has tensor {name!r}, the file none" if name in own
                              else f"{file}: tensor {adapter.extra[name][0]!r} has no place in the model's adapter")
    for name, dst in own.items():
        src_name, src = adapter.extra[name]
        if src is not None and src.shape != dst.shape:
            theirs = src_name if src_name == name else f"{src_name} (our {name})"
            raise CheckpointError(f"{file}: tensor {theirs!r} has shape {tuple(src.shape)}, the model needs "
                                  f"{tuple(dst.shape)}")


def load_adapter(model: LLaMA, path: str | os.PathLike, *, gate_act: str | None = None) -> AdapterConfig:
    """Load an adapter (any of FORMATS: ours, the official v1, V2 or V2 chat release, PEFT's, litgpt's; detected by
    its keys) into model's adapter.

    The model must have been built with the same AdapterConfig (read_adapter_config gives it);
    gate_act is required for the official v1 release. Returns the adapter's config.
    """
    if model.adapter is None:
        raise ValueError("the model has no adapter; build it with load_checkpoint(..., adapter=read_adapter_config("
                         f"{str(path)!r}))")
    adapter = read_adapter(path, gate_act, model.adapter.adapter_len)
    file, config = adapter.file, model.config
    keys = ["adapter_len", "adapter_layers", "gate", "gate_act", "visual_dim", "clip_layers", "version"]
    if model.adapter.version == 2:
        keys += ["scale", "output_bias_scale"]
    if model.adapter.visual_dim:
        keys += ["fusion", "visual_len", "projector"] + (["visual_layers"] if model.adapter.early_fusion else []) + (
            ["visual_hidden"] if model.adapter.projector == "mlp" else ["visual_width", "visual_depth", "visual_heads"])
    for key in keys:
        theirs, mine = getattr(adapter.config, key), getattr(model.adapter, key)
        if theirs != mine:
            tensor = f" (tensor {adapter.gates[0][0]!r})" if key == "gate" else ""
            raise CheckpointError(f"{file}: the adapter has {key}={theirs!r}{tensor} but the model was built with "
                                  f"{key}={mine!r}")
    check_fits(adapter, config)
    modules = list(adapter_layers(model).values())
    own = adapter_state_dict(model)
    with torch.no_grad():
        for module, (_, prompt), (_, gate) in zip(modules, adapter.prompts, adapter.gates, strict=True):
            module.adapter_prompt.copy_(prompt)
            module.gate.copy_(gate)
        for name, (_, src) in adapter.extra.items():
            if src is not None:  # None: the model's own value stays
                own[name].copy_(src)
    return adapter.config


def save_adapter(model: LLaMA, path: str | os.PathLike, *, overwrite: bool = False,
                 state: dict[str, torch.Tensor] | None = None, format: str = ADAPTER_FORMAT,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter alone; returns the path.

    format: "llama-adapter-triton" (ours, the default: a safetensors file, see model/adapters/ours.py) or "peft" (a
    folder PEFT's PeftModel.from_pretrained(hf_model, path) loads, see save_peft_adapter; base_model_name_or_path
    goes into its adapter_config.json). Written to a temporary file (folder) beside path, then renamed into place, so
    an interrupted run leaves no half-written adapter. An existing file (folder) is replaced only with
    overwrite=True. state: the adapter's tensors to write instead of the model's own parameters (e.g. gathered from
    FSDP shards), with exactly adapter_state_dict(model)'s names and shapes.
    """
    if model.adapter is None:
        raise ValueError("the model has no adapter to save")
    if format not in ADAPTER_FORMATS:
        raise ValueError(f"format must be one of {ADAPTER_FORMATS}, got {format!r}")
    path = Path(path)
    own = adapter_state_dict(model)
    if state is None:
        state = own
    elif state.keys() != own.keys() or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
        raise ValueError(f"state must hold the adapter's tensors {sorted(own)[:2]}... with their shapes, got "
                         f"{ {k: tuple(v.shape) for k, v in list(state.items())[:2]} }...")
    if format == "peft":
        return save_peft_adapter(model, path, overwrite=overwrite, state=state,
                                 base_model_name_or_path=base_model_name_or_path)
    return ours.save(model, path, state, overwrite=overwrite)
