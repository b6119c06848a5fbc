"""Our adapter format (save_adapter's default): a safetensors file holding exactly the adapter's parameters
(adapter_state_dict), fp32:
    layers.N.attention.adapter_prompt  (adapter_len, dim)
    layers.N.attention.gate            (n_heads,) or (1,)
    layers.N.attention.visual_gate     (n_heads,) or (1,)        (V2 early fusion, the first layers)
    layers.N.attention.wq.bias / .scale, ..., layers.N.feed_forward.w3.bias / .scale, the norms'
        layers.N.attention_norm.weight, layers.N.ffn_norm.weight, norm.weight; output.bias / .scale  (V2)
    visual_proj.*                                                 (multi-modal adapters only)
with metadata "format" = "llama-adapter-triton", "format_version" = "1", "adapter_config" (the AdapterConfig as
JSON) and "model" (dim, n_layers, n_heads, n_kv_heads as JSON, checked against the model on load). Written to a
temporary file in the same folder, then renamed into place; an existing file is replaced only with overwrite=True.
A tensor that is not finite is refused: save never writes a file that load_adapter would refuse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from llama_adapter_triton.kernels.checks import is_int
from llama_adapter_triton.model.adapter import AdapterConfig, adapter_state_dict
from llama_adapter_triton.model.adapters.common import PROMPT_OR_GATE_RE, AdapterFile, by_layer, tensor_problem
from llama_adapter_triton.model.io import CheckpointError, write_atomic
from llama_adapter_triton.model.llama import LLaMA, LLaMAConfig

ADAPTER_FORMAT = "llama-adapter-triton"
ADAPTER_FORMAT_VERSION = "1"
MODEL_DIMS = ("dim", "n_layers", "n_heads", "n_kv_heads")  # what our adapter files record of their model
_LAYER_RE = re.compile(r"layers\.(\d+)\.")  # the layer a tensor's name is in


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return metadata.get("format") == ADAPTER_FORMAT


def parse(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, gate_act: str | None,
          adapter_len: int | None) -> AdapterFile:
    """The file's adapter, checked against its own metadata (gate_act and adapter_len: the file tells them)."""
    def entry(key: str) -> dict:
        try:
            value = json.loads(metadata[key])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{file}: its metadata has no valid JSON {key!r} entry ({type(e).__name__}: "
                                  f"{e})") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{file}: its metadata {key!r} must be a JSON object, got {metadata[key]!r}")
        return value

    try:
        config = AdapterConfig(**entry("adapter_config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: its metadata 'adapter_config' is not valid ({e})") from None
    model_dims = entry("model")
    for key in MODEL_DIMS:
        value = model_dims.get(key)
        if not is_int(value) or value < 1:
            raise CheckpointError(f"{file}: its metadata 'model' must give {key} as an integer >= 1, got {value!r}")
    expected = _expected_tensors(file, tensors, config, {k: model_dims[k] for k in MODEL_DIMS})
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise CheckpointError(f"{file}: unexpected tensor {unexpected[0]!r} of shape "
                              f"{tuple(tensors[unexpected[0]].shape)} for its adapter_config")
    for name, t in tensors.items():  # every number of the metadata meets the tensors: none sizes anything alone
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, but its metadata "
                                  f"('adapter_config', 'model') makes it {tuple(expected[name].shape)}")
    extra = {name: (name, t) for name, t in tensors.items() if not PROMPT_OR_GATE_RE.fullmatch(name)}
    layers = by_layer(file, {k: v for k, v in tensors.items() if k not in extra}, PROMPT_OR_GATE_RE,
                      ("adapter_prompt", "gate"))
    missing = sorted(n for n in expected.keys() - tensors.keys() if not PROMPT_OR_GATE_RE.fullmatch(n))
    if missing:  # (missing prompts and gates: load_adapter names the layers)
        raise CheckpointError(f"{file}: tensor {missing[0]!r} is missing ({len(missing)} missing for its "
                              "adapter_config)")
    return AdapterFile(ADAPTER_FORMAT, file, config, list(layers), None,
                       [got["adapter_prompt"] for got in layers.values()], [got["gate"] for got in layers.values()],
                       model_dims, extra)


def _expected_tensors(file: Path, tensors: dict[str, torch.Tensor], config: AdapterConfig,
                      dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """The adapter tensors (meta: nothing is allocated) that config gives a model of these dims, after checking the
    dims' depth against the layers the file's tensors name (the top one holds a prompt; V2 names every layer). A V1
    model is built without the layers that hold no adapter tensor (their names shifted back): its cost is that of
    the file's layers, never of a depth the metadata merely claims."""
    n_layers = dims["n_layers"]
    named = sorted({int(m.group(1)) for name in tensors if (m := _LAYER_RE.match(name))})
    if not named or named[-1] != n_layers - 1 or (config.version == 2 and len(named) != n_layers):
        every = ", a V2 adapter's every layer its biases and scales" if config.version == 2 else ""
        raise CheckpointError(f"{file}: its metadata 'model' says n_layers={n_layers}, but its tensors name "
                              f"{len(named)} layers, {f'{named[0]}..{named[-1]}' if named else 'none'} (the top layer "
                              f"holds a prompt{every})")
    keep = config.visual_layers if config.early_fusion else 0  # the bottom layers of early fusion's visual prompts
    gap = max(0, n_layers - config.adapter_layers - keep) if config.version == 1 else 0
    # V2's biases of w1 give the SwiGLU width, and those of the output layer the vocabulary, which the metadata does
    # not record (the model's are checked on load)
    widths = {}
    for key, name in (("hidden_dim", f"layers.{n_layers - 1}.feed_forward.w1.bias"), ("vocab_size", "output.bias")):
        t = tensors.get(name)
        if config.version == 2 and t is not None and t.dim() == 1 and t.shape[0] > 0:
            widths[key] = t.shape[0]
    try:
        with torch.device("meta"):
            model = LLaMA(LLaMAConfig(**{**dims, "n_layers": n_layers - gap, **widths}), config)
    except ValueError as e:
        raise CheckpointError(f"{file}: its metadata 'adapter_config' does not fit its 'model' ({e})") from None

    def shifted(name: str) -> str:
        m = _LAYER_RE.match(name)
        return name if m is None or int(m.group(1)) < keep else f"layers.{int(m.group(1)) + gap}.{name[m.end():]}"

    return {shifted(name): t for name, t in adapter_state_dict(model).items()}


def save(model: LLaMA, path: Path, state: dict[str, torch.Tensor], *, overwrite: bool = False) -> Path:
    """Write state (the adapter's tensors, adapter_state_dict(model)'s names and shapes) to path in our format;
    save_adapter (formats.py) checks the model and state first."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give save_adapter a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    c = model.config
    metadata = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
                "adapter_config": json.dumps(model.adapter.to_dict()),
                "model": json.dumps({"name": c.name, "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                                     "n_kv_heads": c.n_kv_heads})}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    for name, t in tensors.items():  # load_adapter would refuse the file
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: not written: tensor {name!r} {tensor_problem(t)}")
    return write_atomic(path, safetensors_bytes(tensors, metadata=metadata), overwrite=overwrite)
