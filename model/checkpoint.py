"""Base checkpoints: Meta's and Hugging Face's LLaMA weights in (load_checkpoint, load_config; checkpoint_format
tells the two apart by the folder's files), Hugging Face's out (save_checkpoint, hf_config_dict).

- Meta: params.json + consolidated.NN.pth, one file per model-parallel rank, merged here (column-parallel weights
  on dim 0, row-parallel ones on dim 1, the embedding on the dim its shards tell). params.json names no context
  length: max_seq_len is the release's, told apart by its other values.
- Hugging Face: config.json + model.safetensors, an index and its shards (none outside the folder unless
  allow_external_files=True), or pytorch_model.bin (and its index); model_type "llama", "mistral" or "qwen2".
  HF permutes q_proj / k_proj rows (and Qwen2's biases) per head for its rotate-half RoPE: unpermute_hf gives
  Meta's interleaved rows back, permute_hf HF's (save_checkpoint writes them so: transformers reads the folder).
The model is built on the meta device and each tensor goes to its device and dtype (or is quantized) as it is read,
one at a time, memory-mapped: no full-precision copy of the model ever exists. .pth/.bin files load with
weights_only=True. A missing, unexpected, duplicated or mis-shaped tensor, or a bad config value, raises
CheckpointError naming the file and the tensor or key. V2-wrapped linears load and save under the checkpoint's
names. Adapters (load_adapter, save_adapter) are model/adapters/'s.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from llama_adapter_triton.model.adapter import (
    AdapterConfig,
    BiasScaleLinear,
    adapter_state_dict,
    base_name,
    fresh_adapter_parameters,
    reset_adapter,
)
from llama_adapter_triton.model.cli import remedy_text
from llama_adapter_triton.model.io import CheckpointError, read_json, torch_load, write_atomic
from llama_adapter_triton.model.llama import FAMILIES, ConfigValueError, LLaMA, LLaMAConfig
from llama_adapter_triton.model.quantize import (
    check_cpu_nf4,
    check_quantize,
    quantized_linear,
    quantized_names,
    trim_heap,
)

# ----------------------------------------------------------------------------------------------------------------
# Base model: configs


def _config(file: Path, keys: dict[str, str], **fields) -> LLaMAConfig:
    """LLaMAConfig(**fields), every value checked by LLaMAConfig itself; a bad one is a CheckpointError naming
    the file and its key (keys: our field -> the file's key, where they differ)."""
    try:
        return LLaMAConfig(name=file.parent.name, **fields)
    except ConfigValueError as e:
        raise CheckpointError(f"{file}: {keys.get(e.field, e.field)!r}: {e}") from None


def _section(cfg: dict, key: str, file: Path) -> dict:
    """cfg[key] as a dict ({} when absent or null); anything else is a CheckpointError naming the key."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: {key!r} must be a JSON object or null, got {value!r}")
    return value


def _meta_config(params: dict, file: Path, vocab_from_weights: int) -> LLaMAConfig:
    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise CheckpointError(f"{file}: 'use_scaled_rope' must be true or false, got {scaled!r}")
    vocab = params.get("vocab_size", -1)
    try:
        config = _config(
            file, {"rope_scaling.factor": "rope_scaling_factor"},
            dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_from_weights if vocab == -1 else vocab,
            multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta", 10000.0),
            rope_scaling={"factor": params.get("rope_scaling_factor") or 8.0} if scaled else None)
    except KeyError as e:
        raise CheckpointError(f"{file}: missing {e.args[0]!r}") from e
    # params.json names no context length: the release's, told apart by its other values
    config.max_seq_len = 131072 if scaled else 8192 if config.rope_theta >= 500000 else \
        4096 if config.norm_eps == 1e-5 else 2048
    return config


def _hf_config(cfg: dict, file: Path) -> LLaMAConfig:
    def check(key: str, ok: bool, want: str) -> None:
        if not ok:
            raise CheckpointError(f"{file}: {key}={cfg.get(key)!r} is not supported (LLaMA needs {want})")

    family = cfg.get("model_type", "llama")
    check("model_type", family in FAMILIES, " or ".join(map(repr, FAMILIES)))
    check("hidden_act", cfg.get("hidden_act", "silu") == "silu", "'silu'")
    check("attention_bias", cfg.get("attention_bias") in (None, False), "false")
    check("mlp_bias", cfg.get("mlp_bias") in (None, False), "false")
    rope = _section(cfg, "rope_parameters", file)  # transformers 5: theta and scaling together
    scaling_key = "rope_scaling" if cfg.get("rope_scaling") not in (None, {}) else "rope_parameters"
    scaling = _section(cfg, scaling_key, file)  # transformers 4: rope_scaling, or null
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{file}: {scaling_key}.rope_type={rope_type!r} is not supported (LLaMA needs none or "
                              "'llama3')")
    theta_key = "rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta"
    keys = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "rope_theta": theta_key, "max_seq_len": "max_position_embeddings",
            "tie_embeddings": "tie_word_embeddings", "rope_scaling": scaling_key,
            **{f"rope_scaling.{ours}": f"{scaling_key}.{theirs}" for ours, theirs in (
                ("factor", "factor"), ("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                ("original_max_seq_len", "original_max_position_embeddings"))}}
    try:
        n_kv_heads = cfg.get("num_key_value_heads")
        config = _config(
            file, keys, dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg["num_attention_heads"] if n_kv_heads is None else n_kv_heads,
            vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type == "default" else dict(
                factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                high_freq_factor=scaling["high_freq_factor"],
                original_max_seq_len=scaling["original_max_position_embeddings"]),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False), family=family,
            sliding_window=_hf_sliding_window(cfg, family, file))
    except KeyError as e:
        raise CheckpointError(f"{file}: missing {e.args[0]!r}") from e
    check("head_dim", cfg.get("head_dim") in (None, config.head_dim), "hidden_size / num_attention_heads")
    return config


def _hf_sliding_window(cfg: dict, family: str, file: Path) -> int | None:
    """The window of a config.json that has one in effect: Mistral's sliding_window (null in v0.2+); Qwen2's only
    with use_sliding_window (false in its releases) and in some layer (those from max_window_layers on, or named
    "sliding_attention" in layer_types; we then take it for every layer: the same model up to the window's
    length). A llama has none (the key is ignored)."""
    if family == "llama":
        return None
    if family == "qwen2":
        use = cfg.get("use_sliding_window", False)
        if not isinstance(use, bool):
            raise CheckpointError(f"{file}: 'use_sliding_window' must be true or false, got {use!r}")
        layer_types = cfg.get("layer_types")
        if isinstance(layer_types, list):
            sliding = "sliding_attention" in layer_types
        else:
            sliding = cfg.get("max_window_layers", cfg.get("num_hidden_layers")) != cfg.get("num_hidden_layers")
        if not (use and sliding):
            return None
    return cfg.get("sliding_window")


# ----------------------------------------------------------------------------------------------------------------
# Base model: tensors, as (file, name in the file, our name, tensor)

Item = tuple[Path, str, str, torch.Tensor]
_META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
_META_SKIP = {"rope.freqs"}


def _meta_shards(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("consolidated.*.pth"))
    numbers = [s.name.split(".")[1] for s in shards]
    if numbers != [f"{i:02d}" for i in range(len(shards))]:
        raise CheckpointError(f"{folder}: model-parallel shards must be consolidated.00.pth .. consolidated.NN.pth "
                              f"without gaps, found {[s.name for s in shards]}")
    return shards


def _read_meta(folder: Path) -> tuple[LLaMAConfig, Iterator[Item]]:
    params_file = folder / "params.json"
    params = read_json(params_file)
    shards = _meta_shards(folder)
    states = [torch_load(s) for s in shards]  # memory-mapped: nothing is read yet
    for shard, state in zip(shards[1:], states[1:], strict=True):
        if state.keys() != states[0].keys():
            odd = sorted(state.keys() ^ states[0].keys())[0]
            raise CheckpointError(f"{shard}: tensor {odd!r} is in only one of {shard.name} and {shards[0].name}; "
                                  "every model-parallel shard must hold the same tensors")
    emb = states[0].get("tok_embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"{shards[0]}: tensor 'tok_embeddings.weight' is missing or not 2-D")
    vocab = emb.shape[0] * len(shards) if emb.shape[1] == params.get("dim") else emb.shape[0]
    config = _meta_config(params, params_file, vocab)
    names = list(states[0])
    if all(zipfile.is_zipfile(s) for s in shards):  # memory-mapped: each tensor is mapped again when it is read
        states = None

    def items() -> Iterator[Item]:
        for name in names:
            if name in _META_SKIP:
                continue
            pieces = [state[name] for state in states] if states else [torch_load(s)[name] for s in shards]
            kind = name.split(".")[-2] if "." in name else name
            if kind == "tok_embeddings":
                split = 0 if pieces[0].shape[-1] == config.dim else 1
            else:
                split = _META_SPLIT_DIM.get(kind)
            where = shards[0] if len(shards) == 1 else folder / "consolidated.*.pth"
            try:
                merged = torch.cat(pieces, dim=split) if len(pieces) > 1 and split is not None else pieces[0]
            except RuntimeError as e:
                shapes = [tuple(p.shape) for p in pieces]
                raise CheckpointError(f"{where}: the shards of tensor {name!r} do not fit together: {shapes}") from e
            yield where, name, name, merged

    return config, items()


_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_SKIP_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _hf_name(name: str) -> str:
    """Our name for an HF tensor name (the name itself when unknown: then it is reported as unexpected)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _HF_LAYER:
        return f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"
    return name


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's rotate-half permutation of q_proj / k_proj rows: (n_heads * hs, dim) -> Meta's interleaved rows;
    a bias (n_heads * hs,) (Qwen2's) likewise."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def permute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half permutation of q_proj / k_proj rows, or of their biases (the inverse of unpermute_hf)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _hf_files(folder: Path, allow_external_files: bool) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no 'weight_map' (tensor name -> shard file)")
            for name in set(weight_map.values()):
                if not isinstance(name, str) or not name:
                    raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files, got {name!r}")
                # by its name: a shard that is a link (the Hugging Face cache's) may lead anywhere
                if (Path(name).is_absolute() or ".." in Path(name).parts) and not allow_external_files:
                    raise CheckpointError(f"{index}: lists shard {name!r}, outside the checkpoint folder {folder}; "
                                          f"refused unless you pass {remedy_text('allow_external_files', True)}",
                                          remedy=("allow_external_files", True))
            files = sorted({folder / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{index}: lists shard {f.name}, which is missing from {folder}")
            return files
        if (folder / single).exists():
            return [folder / single]
    raise CheckpointError(f"{folder}: no weights found (model.safetensors, model.safetensors.index.json with its "
                          "shards, pytorch_model.bin or pytorch_model.bin.index.json)")


def _read_hf(folder: Path, allow_external_files: bool) -> tuple[LLaMAConfig, Iterator[Item]]:
    config = _hf_config(read_json(folder / "config.json"), folder / "config.json")
    files = _hf_files(folder, allow_external_files)
    q_rows, k_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    permuted = {"attention.wq.weight": ((q_rows, config.dim), config.n_heads), "attention.wq.bias": ((q_rows,),
                config.n_heads), "attention.wk.weight": ((k_rows, config.dim), config.n_kv_heads),
                "attention.wk.bias": ((k_rows,), config.n_kv_heads)}

    def items() -> Iterator[Item]:
        for file in files:
            for src, t in _file_tensors(file):
                if _HF_SKIP_RE.fullmatch(src) or (src == "lm_head.weight" and config.tie_embeddings):
                    continue
                name = _hf_name(src)
                shape, heads = permuted.get(name.split(".", 2)[-1], (None, 0))
                if t.shape == shape:  # a mis-shaped tensor is reported as it is
                    t = unpermute_hf(t, heads)
                yield file, src, name, t

    return config, items()


def _file_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one weights file, one at a time. The file is memory-mapped anew for each tensor, and the mapping
    goes with the tensor: the pages read stay resident only as long as the tensor they hold (a mapping of the whole
    file would keep every page read in the process's resident memory until the file is done)."""
    if file.suffix == ".bin":
        state = torch_load(file)
        if not zipfile.is_zipfile(file):  # torch's legacy format is read whole, not mapped
            yield from state.items()
            return
        names, state = list(state), None
        for name in names:
            yield name, torch_load(file)[name]
        return
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(file, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(name)
            yield name, tensor
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e


# ----------------------------------------------------------------------------------------------------------------
# Base model: loading


def checkpoint_format(path: str | os.PathLike) -> str:
    """"meta" (params.json + consolidated.*.pth) or "hf" (config.json + weights), from the folder's files."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a checkpoint is a folder with params.json or config.json)")
    if (folder / "params.json").exists() and any(folder.glob("consolidated.*.pth")):
        return "meta"
    if (folder / "config.json").exists():
        return "hf"
    raise CheckpointError(f"{folder}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a Hugging Face "
                          "one (config.json + model*.safetensors or pytorch_model*.bin)")


def _read(path: str | os.PathLike, allow_external_files: bool) -> tuple[LLaMAConfig, Iterator[Item]]:
    folder = Path(path)
    return _read_meta(folder) if checkpoint_format(folder) == "meta" else _read_hf(folder, allow_external_files)


def load_config(path: str | os.PathLike, *, allow_external_files: bool = False) -> LLaMAConfig:
    """The LLaMAConfig of a Meta or HF checkpoint folder (no weights are read); allow_external_files as
    load_checkpoint's."""
    return _read(path, allow_external_files)[0]


def load_checkpoint(path: str | os.PathLike, *, adapter: AdapterConfig | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    allow_external_files: bool = False, quantize: str | None = None,
                    quantize_output: bool = False) -> LLaMA:
    """A LLaMA with the weights of a Meta or HF checkpoint folder, and a fresh adapter if one is configured.

    Arguments:
        path: the checkpoint folder (format detected, see the module docstring).
        adapter: AdapterConfig for a fresh adapter (prompt N(0, 1), gate 0: the model equals the base).
        dtype: of the base weights; None keeps the checkpoint's. The adapter is fp32.
        device: where the weights go, one tensor at a time.
        allow_external_files: read shards that a Hugging Face shard index names outside the folder (an absolute
            path or one through ".."); refused by default. Shards that are links (the HF cache's) are read.
        quantize: "nf4" or "int8" (model/quantize.py): the base's linear weights are quantized as they are read,
            one at a time, on device; dtype is then the dtype they compute in. None: as they are.
        quantize_output: quantize the output layer too (unless it is tied to the embedding).
    Returns:
        the model; every tensor of the checkpoint loaded, or a CheckpointError naming the file and tensor.
    """
    check_quantize(quantize)
    config, items = _read(path, allow_external_files)
    cpu_nf4 = check_cpu_nf4(config, device) if quantize == "nf4" else None
    if cpu_nf4:
        raise CheckpointError(f"{path}: quantize='nf4' on the CPU: {cpu_nf4}")
    with torch.device("meta"):
        model = LLaMA(config, adapter)
    device = torch.device(device)
    fresh = {id(p) for p in fresh_adapter_parameters(model).values()}  # not in the checkpoint
    trained = {id(p) for p in adapter_state_dict(model).values()} - fresh  # V2's norms: loaded, and kept in fp32
    # by the checkpoint's names (a V2-wrapped linear's weight: layers.N.attention.wq.linear.weight -> ...wq.weight)
    params = {base_name(name): (name, p) for name, p in model.named_parameters() if id(p) not in fresh}
    quantized = quantized_names(model, quantize_output) if quantize else set()  # checkpoint names
    size = f"{config.n_layers} layers, dim {config.dim}, {config.n_heads} heads ({config.n_kv_heads} kv)"
    loaded: set[str] = set()
    for file, src, name, tensor in items:
        label = repr(src) if src == name else f"{src!r} (our {name})"
        if name not in params:
            raise CheckpointError(f"{file}: unexpected tensor {label} of shape {tuple(tensor.shape)}; not part of "
                                  f"a LLaMA with {size}")
        if name in loaded:
            raise CheckpointError(f"{file}: tensor {label} appears more than once")
        own_name, param = params[name]
        if tensor.shape != param.shape or not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor {label} is {tensor.dtype} {tuple(tensor.shape)}, the model ({size}) "
                                  f"needs a floating-point {tuple(param.shape)}")
        dtype = dtype or tensor.dtype
        module_name, _, leaf = own_name.rpartition(".")
        value = tensor.to(device=device, dtype=torch.float32 if id(param) in trained else dtype, copy=True)
        _check_finite(file, label, tensor, value)
        if name in quantized:  # the full-precision copy lives only until it is quantized
            parent, _, child = module_name.rpartition(".")  # the linear itself (inside a V2 wrapper: its .linear)
            setattr(model.get_submodule(parent), child, quantized_linear(  # its bias (Qwen2's), read or to come, goes
                value, quantize, compute_dtype=dtype, bias=model.get_submodule(module_name).bias))  # along
            if device.type == "cpu":
                trim_heap()
        else:
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(value))
        del tensor, value
        loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]} (our names; a partial "
                              "checkpoint is never loaded)")
    if config.tie_embeddings:
        output = model.output.linear if isinstance(model.output, BiasScaleLinear) else model.output
        output.weight = model.tok_embeddings.weight
    return reset_adapter(model, device)


def _check_finite(file: Path, label: str, tensor: torch.Tensor, value: torch.Tensor) -> None:
    """CheckpointError if value (tensor as loaded: on its device, in its dtype) holds NaN or Inf: the file's own
    (a damaged checkpoint), or values beyond the load dtype's range. One reduction over the loaded copy, on its
    device, with no temporary of its size: its sum in float64 is finite exactly when all of it is (no sum of finite
    float32 values overflows float64)."""
    if value.numel() == 0 or bool(torch.isfinite(value.sum(dtype=torch.float64))) or \
            bool(torch.isfinite(value).all()):  # (float64 weights near its range: the sum may overflow)
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise CheckpointError(f"{file}: tensor {label} holds {bad} non-finite value(s) (NaN or Inf) of "
                              f"{tensor.numel()}: the checkpoint is damaged")
    raise CheckpointError(f"{file}: tensor {label} overflows {value.dtype} (values beyond its range, up to "
                          f"{float(tensor.abs().max()):.3g}): load it in another dtype")


# ----------------------------------------------------------------------------------------------------------------
# Base model: saving


def save_checkpoint(model: LLaMA, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the base model (the adapter left out) as a Hugging Face checkpoint folder; returns the folder.

    config.json (its family's: LlamaForCausalLM's, MistralForCausalLM's or Qwen2ForCausalLM's; a sliding window
    in every layer) and model.safetensors with HF's names and permuted q/k rows (and Qwen2's q/k biases), in
    the weights' dtype, no lm_head.weight when tied: load_checkpoint and transformers both read it. Each file is
    written to a temporary name and renamed into place; existing ones are replaced only with overwrite=True.
    The parameters an adapter adds are left out; the norms a V2 adapter trains are the model's own, and
    are written as they are.
    """
    folder = Path(path)
    existing = [folder / n for n in ("config.json", "model.safetensors") if (folder / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True to replace the checkpoint in {folder}")
    c = model.config
    ours_to_hf = {v: k for k, v in _HF_TOP.items()}
    ours_to_hf.update({f"{v}.{kind}": f"{k}.{kind}" for k, v in _HF_LAYER.items() for kind in ("weight", "bias")})
    adapter = {id(p) for p in fresh_adapter_parameters(model).values()}
    tensors = {}
    for name, p in model.named_parameters():  # a tied output weight is listed once, as tok_embeddings
        if id(p) in adapter:
            continue
        name = base_name(name)  # a V2-wrapped linear's weight
        layer, _, rest = name.removeprefix("layers.").partition(".")
        hf = ours_to_hf[name] if not name.startswith("layers.") else f"model.layers.{layer}.{ours_to_hf[rest]}"
        t = p.detach().to("cpu")
        if rest.startswith(("attention.wq.", "attention.wk.")):  # weights and (Qwen2's) biases
            t = permute_hf(t, c.n_heads if rest.startswith("attention.wq.") else c.n_kv_heads)
        tensors[hf] = t.contiguous()
    config = hf_config_dict(c, next(iter(tensors.values())).dtype)
    write_atomic(folder / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}),
                 overwrite=overwrite)
    write_atomic(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode(), overwrite=overwrite)
    return folder


def hf_config_dict(c: LLaMAConfig, dtype: torch.dtype) -> dict:
    """The config.json of the family's transformers class for this config (what save_checkpoint writes;
    the family's config class, e.g. transformers.LlamaConfig(**it), builds the same model)."""
    config = {"architectures": [_HF_ARCHITECTURES[c.family]], "model_type": c.family, "hidden_act": "silu",
              "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
              "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
              "tie_word_embeddings": c.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
              "rope_scaling": None if c.rope_scaling is None else {
                  "rope_type": "llama3", "factor": c.rope_scaling.factor,
                  "low_freq_factor": c.rope_scaling.low_freq_factor,
                  "high_freq_factor": c.rope_scaling.high_freq_factor,
                  "original_max_position_embeddings": c.rope_scaling.original_max_seq_len}}
    if c.family != "llama":  # a window in every layer (Qwen2's: from layer max_window_layers = 0 on)
        config["sliding_window"] = c.sliding_window
    if c.family == "qwen2":
        config.update(use_sliding_window=c.sliding_window is not None, max_window_layers=0)
    return config
