"""Checkpoints: Meta's and Hugging Face's LLaMA weights in; adapters in (five formats) and out (ours, PEFT's).

Base models, load_checkpoint(folder), the format detected from the folder:
- Meta: params.json + consolidated.NN.pth, one file per model-parallel rank, merged here:
  column-parallel weights (wq, wk, wv, w1, w3, output) are concatenated on dim 0, row-parallel
  ones (wo, w2) on dim 1, tok_embeddings on dim 1 (LLaMA-1/2's ParallelEmbedding) or dim 0
  (Llama-3's VocabParallelEmbedding: read from the shard shapes), norms are replicated.
  "rope.freqs" (LLaMA-1) is a buffer and is skipped. vocab_size -1 is read from the weights.
  params.json names no context length: max_seq_len is 2048 (LLaMA-1), 4096 (norm_eps 1e-5:
  Llama-2), 8192 (rope_theta 500000: Llama-3) or 131072 (use_scaled_rope: Llama-3.1).
- Hugging Face: config.json + model.safetensors, or shards listed by model.safetensors.index.json,
  or pytorch_model.bin (and its index); an index naming a shard outside the folder (an absolute path,
  or through "..") is refused unless allow_external_files=True. HF stores q_proj / k_proj rows permuted per head for its
  rotate-half RoPE (convert_llama_weights_to_hf.py: view(h, hs/2, 2, dim).transpose(1, 2));
  the inverse permutation gives Meta's interleaved layout. rope_theta, Llama-3.1's "llama3"
  rope scaling, GQA and tied embeddings are read from config.json (transformers 4 and 5 keys).
  model_type "llama", "mistral" or "qwen2" (LLaMAConfig.family): Mistral's sliding_window (null in v0.2+),
  Qwen2's q/k/v biases (q_proj.bias, k_proj.bias permuted as their weights' rows, and un-permuted alike) and its
  use_sliding_window (false in the releases; true: the window of its sliding layers, see _hf_sliding_window).
  With tie_word_embeddings the file needs no lm_head.weight (one there is ignored).
The model is built on the meta device and each tensor is copied to its device and dtype as it is
read, one at a time: no fp32 copy of a bf16 model ever exists. Files are memory-mapped per tensor, so that the
pages of the tensors already read leave the resident memory. With quantize="nf4" or "int8" each linear
weight is quantized as soon as it is read (model/quantize.py): loading peaks at the quantized model plus
about one tensor. .pth/.bin files load with
torch.load(weights_only=True, mmap=True): checkpoints are data, never code. A missing,
unexpected, duplicated or mis-shaped tensor raises CheckpointError naming the file and the tensor;
every config value is checked (type, range, finiteness: LLaMAConfig's own checks) and a bad one
raises CheckpointError naming the file and its key.
save_checkpoint(model, folder) writes a base model in the Hugging Face format (config.json and
model.safetensors, q/k rows permuted back to HF's layout), which both load_checkpoint and transformers read, as
its family's class (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).
Every file this module writes goes through write_atomic: a temporary name in the same folder, renamed
into place, and never over an existing file unless asked (overwrite=True).
With a V2 adapter the linears are wrapped (model/adapter.py's BiasScaleLinear): their weights, e.g.
layers.0.attention.wq.linear.weight, load and save under the checkpoint's names (adapter.base_name), and the
norms the adapter trains load in fp32.

Adapters, load_adapter(model, path), the format detected by the file's keys:
1. Ours (save_adapter): a safetensors file holding exactly the adapter's parameters (adapter_state_dict), fp32,
       layers.N.attention.adapter_prompt  (adapter_len, dim)
       layers.N.attention.gate            (n_heads,) or (1,)
       layers.N.attention.visual_gate     (n_heads,) or (1,)        (V2 early fusion, the first layers)
       layers.N.attention.wq.bias / .scale, ..., layers.N.feed_forward.w3.bias / .scale, the norms'
           layers.N.attention_norm.weight, layers.N.ffn_norm.weight, norm.weight; output.bias / .scale  (V2)
       visual_proj.*                                                 (multi-modal adapters only)
   with metadata "format" = "llama-adapter-triton", "format_version" = "1", "adapter_config"
   (the AdapterConfig as JSON) and "model" (dim, n_layers, n_heads, n_kv_heads as JSON, checked
   against the model on load). Written to a temporary file in the same folder, then renamed into
   place; an existing file is replaced only with overwrite=True.
2. The official LLaMA-Adapter v1 release (e.g. llama_adapter_len10_layer30_release.pth):
   adapter_query.weight (adapter_layers * adapter_len, dim), the prompts of the top layers from
   the lowest up, and layers.N.attention.gate (1, n_heads, 1, 1) for every layer N (only the
   top adapter_layers are used; the others are ignored). gate="head". adapter_len is not in
   the file: the model's (load_adapter) or 10, the release's (read_adapter_config). Files of the official code
   before its per-head gates hold a gate of shape (1,) per layer: imported with gate="layer".
   Its gate is ambiguous: the official training code (alpaca_finetuning_v1) scales the prompt
   attention by tanh(gate), the official inference code (llama/model.py) by the raw gate.
   The same weights give different models under the two, so the import takes gate_act
   explicitly ("tanh": the model as it was trained; "identity": what the official inference
   script computes), has no default, and logs the one it used.
3. PEFT's adaption prompt (peft_type ADAPTION_PROMPT): a folder with adapter_config.json
   (adapter_len, adapter_layers) and adapter_model.safetensors or adapter_model.bin, or that
   weights file alone; ...layers.N.self_attn.adaption_prompt (1, adapter_len, dim) and
   ...adaption_gate (1,) per adapted layer (the top ones). gate="layer", gate_act="identity"
   (PEFT multiplies by the raw gate). PEFT's prompt keys come from HF's permuted k_proj and
   meet HF's permuted queries: the same permutation on both sides of every dot product, so the
   prompts are used as they are.
4. The official LLaMA-Adapter V2 multi-modal release (BIAS-7B, CAPTION-7B: llama_adapter_v2_multimodal7b's
   extract_adapter_from_checkpoint.py writes {"model": tensors, "config": {"w_bias", "w_lora", "lora_rank"}}):
   adapter_query.weight (query_layer * query_len, dim), the prompts of the top query_layer layers;
   visual_query.weight (query_len, width); llama.layers.N.attention.gate (1, n_heads, 1, 1),
   llama.layers.N.{attention.wq, attention.wo, feed_forward.w1, w2, w3}.bias and the norms
   llama.layers.N.{attention_norm, ffn_norm}.weight in every layer, llama.norm.weight; the visual side
   clip_proj, clip_proj_norm, visual_blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
   visual_proj, visual_proj_norm (weights and biases). Imported as version=2, gate "head" with tanh (the V2
   code's, training and inference alike), projector="query" (model/visual.py's QueryProjector, its 16 heads
   the release's: the file does not tell them), the query_len visual queries added to every prompt; wk / wv
   get zero biases and every linear unit scales (the release has none: the same model). LoRA files
   (LORA-BIAS-7B: lora_* tensors, new_gate) are refused.
5. litgpt's adapter (lit_model.pth.adapter) and adapter_v2 (lit_model.pth.adapter_v2) files ({"model": ...}
   of its adapter_filter): transformer.h.N.attn.adapter_wte.weight (adapter_len, n_embd) and
   .attn.gating_factor (1, 1, n_head, 1) (an older (1, n_head, 1, 1) too) in the adapted layers; adapter_v2 adds
   in every layer AdapterV2Linear's adapter_bias / adapter_scale (output scales) of attn.qkv (q, k and v
   concatenated: split into wq, wk, wv, the q and k parts taken from HF's rotate-half row order back to Meta's
   rows), attn.proj (wo), mlp.fc_1 (w1), mlp.fc_2 (w3), mlp.proj (w2), the norms norm_1, norm_2 and
   transformer.ln_f, and lm_head's (output_bias_scale=True). gate="head", gate_act="identity" (litgpt
   multiplies by the raw gating factor). The prompt's keys and values go through the key and value
   projections, as in the paper and litgpt before its QKV layout change (PR #1013): litgpt's code since
   then (v0.5.13 checked) takes them from other rows of its qkv output, so its own logits differ; the import
   says so in a warning.
Out: save_adapter(model, path) writes format 1; save_adapter(model, folder, format="peft") writes format 3 (a folder
PEFT's PeftModel.from_pretrained loads onto the transformers model of the same base), for the adapters PEFT can
express (gate="layer", gate_act="identity", V1, text only; others are refused before anything is written).
A mismatch (another model size, missing or unexpected tensors, another gate mode or gate_act), bad
metadata, or a tensor that is not floating point or holds NaN / Inf raises CheckpointError naming the
file and the tensor or setting; save_adapter never writes a file that load_adapter would refuse.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .adapter import (
    AdapterConfig,
    BiasScaleLinear,
    adapter_layers,
    adapter_state_dict,
    base_name,
    fresh_adapter_parameters,
    reset_adapter,
)
from .cli import remedy_text
from .llama import FAMILIES, ConfigValueError, LLaMA, LLaMAConfig
from .quantize import check_cpu_nf4, check_quantize, quantized_linear, quantized_names, trim_heap

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "llama-adapter-triton"
ADAPTER_FORMAT_VERSION = "1"
ADAPTER_FORMATS = (ADAPTER_FORMAT, "peft")  # what save_adapter writes


class CheckpointError(ValueError):
    """A checkpoint, tokenizer or adapter file that cannot be used; the message names the file and the tensor or key.
    .remedy: (argument, value) that gets past it, when the message names one (model/cli.py's cli_message)."""

    def __init__(self, message: str, *, remedy: tuple[str, object] | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy


# ----------------------------------------------------------------------------------------------------------------
# Reading tensor files


def _read_tensor_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors or torch file, and the safetensors metadata ({} for torch files)."""
    try:
        with open(file, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from e
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e
    return _torch_load(file, unwrap=True), {}


def read_json(file: Path) -> dict:
    """A JSON object file (config.json, tokenizer_config.json, ...), or a CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _torch_load(file: Path, *, unwrap: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (and mmap when the file allows it): a dict of tensors, or an error.
    unwrap: a dict whose "model" entry is the dict of tensors (the official V2 release's {"model", "config"},
    litgpt's fabric.save) gives that entry."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files of torch's legacy (pre-zip) format cannot be memory-mapped
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors: the file holds something other than plain tensors
        raise CheckpointError(f"{file}: cannot be loaded with weights_only=True: it is not a plain checkpoint of "
                              f"tensors ({type(e).__name__}: {e})") from e
    if unwrap and isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


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
    states = [_torch_load(s) for s in shards]  # memory-mapped: nothing is read yet
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
            pieces = [state[name] for state in states] if states else [_torch_load(s)[name] for s in shards]
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
        state = _torch_load(file)
        if not zipfile.is_zipfile(file):  # torch's legacy format is read whole, not mapped
            yield from state.items()
            return
        names, state = list(state), None
        for name in names:
            yield name, _torch_load(file)[name]
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
        if name in quantized:  # the full-precision copy lives only until it is quantized
            parent, _, child = module_name.rpartition(".")  # the linear itself (inside a V2 wrapper: its .linear)
            setattr(model.get_submodule(parent), child, quantized_linear(  # its bias (Qwen2's), read or to come, goes
                tensor.to(device=device, dtype=dtype, copy=True), quantize, compute_dtype=dtype,  # along
                bias=model.get_submodule(module_name).bias))
            if device.type == "cpu":
                trim_heap()
        else:
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor.to(
                device=device, dtype=torch.float32 if id(param) in trained else dtype, copy=True)))
        del tensor
        loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]} (our names; a partial "
                              "checkpoint is never loaded)")
    if config.tie_embeddings:
        output = model.output.linear if isinstance(model.output, BiasScaleLinear) else model.output
        output.weight = model.tok_embeddings.weight
    return reset_adapter(model, device)


# ----------------------------------------------------------------------------------------------------------------
# Adapters


@dataclass
class _AdapterFile:
    """An adapter read from a file of any supported format, in our terms."""

    fmt: str  # "llama-adapter-triton" (ours), "official LLaMA-Adapter v1" or "PEFT adaption-prompt"
    file: Path
    config: AdapterConfig
    layers: list[int] | None  # absolute layer indices, bottom to top, when the file names them
    n_layers: int | None  # the model's depth, when the file tells it
    prompts: list[tuple[str, torch.Tensor]]  # (name in the file, (adapter_len, dim)), bottom to top
    gates: list[tuple[str, torch.Tensor]]  # (name in the file, (n_gates,))
    model_dims: dict | None = None  # ours: the dims of the model it was trained on
    # every other tensor, by our name (adapter_state_dict's): (name in the file, tensor): V2's biases, scales and
    # norms, the early-fusion gates, the projector
    extra: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


_OURS_RE = re.compile(r"layers\.(\d+)\.attention\.(adapter_prompt|gate)")
_OFFICIAL_GATE_RE = re.compile(r"layers\.(\d+)\.attention\.(gate)")
_PEFT_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)")
_PEFT_NAME = "base_model.model.model.layers.{}.self_attn.adaption_{}"  # as PEFT saves them; _PEFT_RE reads them


def _by_layer(file: Path, tensors: dict[str, torch.Tensor], pattern: re.Pattern, kinds: tuple[str, str]):
    """{layer: {kind: (name, tensor)}} for the names matching pattern; any other name is an error."""
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = pattern.fullmatch(name)
        if m is None:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} of shape {tuple(t.shape)} in a "
                                  "LLaMA-Adapter file")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = (name, t)
    for layer, got in sorted(layers.items()):
        for kind in kinds:
            if kind not in got:
                other = next(iter(got.values()))[0]
                raise CheckpointError(f"{file}: layer {layer} has {other!r} but no {kind} tensor")
    return dict(sorted(layers.items()))


_MODEL_DIMS = ("dim", "n_layers", "n_heads", "n_kv_heads")  # what our adapter files record of their model


def _parse_ours(file: Path, tensors: dict, metadata: dict) -> _AdapterFile:
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
    for key in _MODEL_DIMS:
        value = model_dims.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{file}: its metadata 'model' must give {key} as an integer >= 1, got {value!r}")
    # the names this config gives a model of these dims (a meta model: nothing is allocated)
    try:
        with torch.device("meta"):
            expected = adapter_state_dict(LLaMA(LLaMAConfig(**{k: model_dims[k] for k in _MODEL_DIMS}), config))
    except ValueError as e:
        raise CheckpointError(f"{file}: its metadata 'adapter_config' does not fit its 'model' ({e})") from None
    unexpected = sorted(tensors.keys() - expected.keys())
    if unexpected:
        raise CheckpointError(f"{file}: unexpected tensor {unexpected[0]!r} of shape "
                              f"{tuple(tensors[unexpected[0]].shape)} for its adapter_config")
    extra = {name: (name, t) for name, t in tensors.items() if not _OURS_RE.fullmatch(name)}
    layers = _by_layer(file, {k: v for k, v in tensors.items() if k not in extra}, _OURS_RE,
                       ("adapter_prompt", "gate"))
    missing = sorted(n for n in expected.keys() - tensors.keys() if not _OURS_RE.fullmatch(n))
    if missing:  # (missing prompts and gates: load_adapter names the layers)
        raise CheckpointError(f"{file}: tensor {missing[0]!r} is missing ({len(missing)} missing for its "
                              "adapter_config)")
    return _AdapterFile("llama-adapter-triton", file, config, list(layers), None,
                        [got["adapter_prompt"] for got in layers.values()], [got["gate"] for got in layers.values()],
                        model_dims, extra)


def _parse_official(file: Path, tensors: dict, gate_act: str | None, adapter_len: int | None) -> _AdapterFile:
    if gate_act is None:
        raise CheckpointError(
            f"{file}: an official LLaMA-Adapter v1 adapter needs gate_act='tanh' or 'identity': its training code "
            "uses tanh(gate), its inference code the raw gate, and the file does not say which (see "
            "model/checkpoint.py)")
    if adapter_len is None:
        adapter_len = 10
        logger.warning("%s: adapter_len is not stored in official v1 files; using 10, the release's", file)
    query = tensors.pop("adapter_query.weight")
    if query.dim() != 2 or query.shape[0] % adapter_len:
        raise CheckpointError(f"{file}: tensor 'adapter_query.weight' has shape {tuple(query.shape)}; it must be "
                              f"(adapter_layers * adapter_len, dim) with adapter_len {adapter_len}")
    n_adapted = query.shape[0] // adapter_len
    gates = _by_layer(file, tensors, _OFFICIAL_GATE_RE, ("gate",))
    n_layers = max(gates, default=-1) + 1  # the release has a gate in every layer: the top one names the depth
    top = list(range(n_layers - n_adapted, n_layers))
    missing = [f"layers.{n}.attention.gate" for n in top if n not in gates]
    if n_adapted > n_layers or missing:
        raise CheckpointError(f"{file}: adapter_query.weight holds {n_adapted} layers of {adapter_len} prompts, but "
                              f"the gates of the top {n_adapted} layers are missing: {missing[:3] or 'all'}")
    # a gate per head (1, n_heads, 1, 1), or the code's earlier one per layer (1,): one form in all the top layers
    per_layer = bool(top) and gates[top[0]]["gate"][1].shape == (1,)
    for n in top:
        name, g = gates[n]["gate"]
        if per_layer and g.shape != (1,):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(g.shape)}, expected (1,) as "
                                  f"{gates[top[0]]['gate'][0]!r} (a gate per layer)")
        if not per_layer and (g.dim() != 4 or g.shape[0] != 1 or g.shape[2:] != (1, 1)):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(g.shape)}, expected (1, n_heads, 1, 1) "
                                  "(a gate per head) or (1,) (a gate per layer)")
    logger.warning("%s: official LLaMA-Adapter v1 adapter loaded with gate_act=%r (its training code uses tanh, its "
                   "inference code the raw gate)", file, gate_act)
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=n_adapted, gate="layer" if per_layer else "head",
                           gate_act=gate_act)
    prompts = [(f"adapter_query.weight[{i * adapter_len}:{(i + 1) * adapter_len}]", p)
               for i, p in enumerate(query.split(adapter_len))]
    return _AdapterFile("official LLaMA-Adapter v1", file, config, None, n_layers, prompts,
                        [(gates[n]["gate"][0], gates[n]["gate"][1].flatten()) for n in top])


def _parse_peft(file: Path, tensors: dict, peft_config: dict | None) -> _AdapterFile:
    layers = _by_layer(file, tensors, _PEFT_RE, ("prompt", "gate"))
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
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=len(layers), gate="layer", gate_act="identity")
    return _AdapterFile("PEFT adaption-prompt", file, config, list(layers), None,
                        [(got["prompt"][0], got["prompt"][1][0]) for got in layers.values()],
                        [got["gate"] for got in layers.values()])


OFFICIAL_V2_VISUAL_HEADS = 16  # the release's visual blocks (llama_adapter.load: v_num_heads=16); not in the file
_OFFICIAL_V2_BIASES = ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# the release's projector names -> ours (model/visual.py's QueryProjector at visual_proj), longest prefix first
_OFFICIAL_V2_VISUAL = (("clip_proj_norm.", "visual_proj.clip_proj_norm."), ("clip_proj.", "visual_proj.clip_proj."),
                       ("visual_proj_norm.", "visual_proj.proj_norm."), ("visual_proj.", "visual_proj.proj."),
                       ("visual_blocks.", "visual_proj.blocks."), ("visual_query.weight", "visual_proj.visual_query"))


def _v2_extra(biases: dict[int, dict[str, tuple[str, torch.Tensor]]],
              scales: dict[int, dict[str, tuple[str, torch.Tensor]]], widths: dict[str, int],
              n_layers: int) -> dict[str, tuple[str, torch.Tensor]]:
    """Our V2 bias and (output) scale of every linear of every layer: the file's where it has them, else the fresh
    values (zero bias, unit scale: the same model). biases / scales: {layer: {our linear: (name in the file,
    tensor)}}; widths: {our linear: its output's width}."""
    extra = {}
    for n in range(n_layers):
        for linear, out in widths.items():
            ours = f"layers.{n}.{linear}"
            extra[f"{ours}.bias"] = biases.get(n, {}).get(linear, (f"{ours}.bias (none: zero)", torch.zeros(out)))
            extra[f"{ours}.scale"] = scales.get(n, {}).get(linear, (f"{ours}.scale (none: one)", torch.ones(out)))
    return extra


def _parse_official_v2(file: Path, tensors: dict[str, torch.Tensor]) -> _AdapterFile:
    """The official LLaMA-Adapter V2 multi-modal release (BIAS-7B, CAPTION-7B; llama_adapter_v2_multimodal7b's
    extract_adapter_from_checkpoint.py writes {"model": ..., "config": ...}): see the module docstring."""
    lora = sorted(n for n in tensors if "lora" in n or n.endswith("new_gate"))
    if lora:
        raise CheckpointError(f"{file}: an official LLaMA-Adapter V2 file with LoRA tensors ({lora[0]!r}; "
                              "LORA-BIAS-7B): not supported (its BIAS-7B and CAPTION-7B files are)")
    query, visual_query = tensors.get("adapter_query.weight"), tensors.get("visual_query.weight")
    if visual_query is None or visual_query.dim() != 2 or query.dim() != 2 or query.shape[0] % visual_query.shape[0]:
        raise CheckpointError(f"{file}: an official V2 file needs adapter_query.weight (query_layer * query_len, "
                              "dim) and visual_query.weight (query_len, width), got "
                              f"{tuple(query.shape)} and {None if visual_query is None else tuple(visual_query.shape)}")
    adapter_len, dim = visual_query.shape[0], query.shape[1]
    n_adapted = query.shape[0] // adapter_len
    layer_re = re.compile(r"llama\.layers\.(\d+)\.(.+)")
    by_layer: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    extra: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = layer_re.fullmatch(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = (name, t)
        elif name == "llama.norm.weight":
            extra["norm.weight"] = (name, t)
        elif name != "adapter_query.weight":
            ours = next((o + name[len(prefix):] for prefix, o in _OFFICIAL_V2_VISUAL if name.startswith(prefix)), None)
            if ours is None:
                raise CheckpointError(f"{file}: unexpected tensor {name!r} of shape {tuple(t.shape)} in an official "
                                      "LLaMA-Adapter V2 file")
            extra[ours] = (name, t)
    n_layers = max(by_layer, default=-1) + 1
    expected = {"attention.gate", "attention_norm.weight", "ffn_norm.weight",
                *(f"{linear}.bias" for linear in _OFFICIAL_V2_BIASES)}
    for n in range(n_layers):
        got = by_layer.get(n, {})
        odd = sorted(set(got) - expected)
        if odd:
            raise CheckpointError(f"{file}: unexpected tensor {got[odd[0]][0]!r} in an official LLaMA-Adapter V2 file")
        lacking = sorted(expected - set(got))
        if lacking:
            raise CheckpointError(f"{file}: tensor 'llama.layers.{n}.{lacking[0]}' is missing (every layer of an "
                                  "official V2 file has gate, norms and biases)")
    if "norm.weight" not in extra or n_adapted > n_layers:
        raise CheckpointError(f"{file}: an official V2 file needs llama.norm.weight and {n_adapted} adapted layers of "
                              f"{n_layers}")
    for n in range(n_layers):
        g = by_layer[n]["attention.gate"]
        if g[1].dim() != 4 or g[1].shape[0] != 1 or g[1].shape[2:] != (1, 1):
            raise CheckpointError(f"{file}: tensor {g[0]!r} has shape {tuple(g[1].shape)}, expected (1, n_heads, 1, 1)")
        for norm in ("attention_norm", "ffn_norm"):
            extra[f"layers.{n}.{norm}.weight"] = by_layer[n][f"{norm}.weight"]
    hidden = by_layer[0]["feed_forward.w1.bias"][1].shape[0]
    widths = {"attention.wq": dim, "attention.wk": dim, "attention.wv": dim, "attention.wo": dim,
              "feed_forward.w1": hidden, "feed_forward.w2": dim, "feed_forward.w3": hidden}  # MHA, as the release
    biases = {n: {linear: got[f"{linear}.bias"] for linear in _OFFICIAL_V2_BIASES} for n, got in by_layer.items()}
    extra.update(_v2_extra(biases, {}, widths, n_layers))
    clip_proj = tensors.get("clip_proj.weight")
    blocks = {int(name.split(".")[1]) for name in tensors if name.startswith("visual_blocks.")}
    if clip_proj is None or clip_proj.dim() != 2 or blocks != set(range(len(blocks))):
        raise CheckpointError(f"{file}: an official V2 file needs clip_proj.weight and visual_blocks.0 .. N")
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=n_adapted, gate="head", gate_act="tanh", version=2,
                           visual_dim=clip_proj.shape[1], visual_len=adapter_len, projector="query",
                           visual_width=clip_proj.shape[0], visual_depth=len(blocks),
                           visual_heads=OFFICIAL_V2_VISUAL_HEADS)
    top = list(range(n_layers - n_adapted, n_layers))
    prompts = [(f"adapter_query.weight[{i * adapter_len}:{(i + 1) * adapter_len}]", p)
               for i, p in enumerate(query.split(adapter_len))]
    gates = [(by_layer[n]["attention.gate"][0], by_layer[n]["attention.gate"][1].flatten()) for n in top]
    return _AdapterFile("official LLaMA-Adapter V2", file, config, top, n_layers, prompts, gates, None, extra)


_LITGPT_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# litgpt's names in a block -> ours (its fc_1 is LLaMA's gate projection w1, fc_2 the up projection w3)
_LITGPT_LINEARS = {"attn.proj": "attention.wo", "mlp.fc_1": "feed_forward.w1", "mlp.fc_2": "feed_forward.w3",
                   "mlp.proj": "feed_forward.w2"}
_LITGPT_NORMS = {"norm_1.weight": "attention_norm.weight", "norm_2.weight": "ffn_norm.weight"}


def _parse_litgpt(file: Path, tensors: dict[str, torch.Tensor]) -> _AdapterFile:
    """litgpt's adapter (lit_model.pth.adapter) or adapter_v2 (lit_model.pth.adapter_v2) file: see the module
    docstring."""
    by_layer: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    extra: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _LITGPT_RE.fullmatch(name)
        if m:
            by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = (name, t)
        elif name == "transformer.ln_f.weight":
            extra["norm.weight"] = (name, t)
        elif name in ("lm_head.adapter_bias", "lm_head.adapter_scale"):
            extra[f"output.{name.rpartition('_')[2]}"] = (name, t)
        else:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} of shape {tuple(t.shape)} in a litgpt adapter "
                                  "file")
    prompt_layers = sorted(n for n, got in by_layer.items() if "attn.adapter_wte.weight" in got)
    if not prompt_layers:
        raise CheckpointError(f"{file}: a litgpt adapter file needs transformer.h.N.attn.adapter_wte.weight in its "
                              "adapted layers; it has none")
    gate_name, gate = by_layer[prompt_layers[0]].get("attn.gating_factor", ("attn.gating_factor", None))
    if gate is None or gate.dim() != 4 or gate.numel() != max(gate.shape):
        raise CheckpointError(f"{file}: transformer.h.{prompt_layers[0]}.attn.gating_factor must be (1, 1, n_head, "
                              f"1), got {None if gate is None else tuple(gate.shape)}")
    n_heads = gate.numel()
    prompts, gates = [], []
    for n in prompt_layers:
        got = by_layer[n]
        for key in ("attn.adapter_wte.weight", "attn.gating_factor"):
            if key not in got:
                raise CheckpointError(f"{file}: layer {n} has 'transformer.h.{n}.attn.adapter_wte.weight' or a gate "
                                      f"but no 'transformer.h.{n}.{key}'")
        prompts.append(got.pop("attn.adapter_wte.weight"))
        name, g = got.pop("attn.gating_factor")
        gates.append((name, g.flatten()))  # (1, 1, nh, 1), or an older file's (1, nh, 1, 1): the same order
    adapter_len, dim = prompts[0][1].shape
    head_dim = dim // n_heads
    v2 = any(got for got in by_layer.values())
    config_fields = {}
    if v2:
        n_layers = max(by_layer) + 1
        expected = {f"{lin}.adapter_{kind}" for lin in ("attn.qkv", *_LITGPT_LINEARS) for kind in ("bias", "scale")}
        expected |= set(_LITGPT_NORMS)
        for n in range(n_layers):
            got = by_layer.get(n, {})
            odd, lacking = sorted(set(got) - expected), sorted(expected - set(got))
            if odd or lacking:
                what = f"unexpected tensor 'transformer.h.{n}.{odd[0]}'" if odd else \
                    f"tensor 'transformer.h.{n}.{lacking[0]}' is missing"
                raise CheckpointError(f"{file}: {what} (a litgpt adapter_v2 file has the bias, scale and norms of "
                                      "every layer)")
        qkv_rows = by_layer[0]["attn.qkv.adapter_bias"][1].shape[0]
        n_kv_heads = (qkv_rows // head_dim - n_heads) // 2
        if n_kv_heads < 1 or (n_heads + 2 * n_kv_heads) * head_dim != qkv_rows:
            raise CheckpointError(f"{file}: transformer.h.0.attn.qkv.adapter_bias has {qkv_rows} rows, not "
                                  f"(n_head + 2 * n_query_groups) * head_size for {n_heads} heads of {head_dim}")
        hidden = by_layer[0]["mlp.fc_1.adapter_bias"][1].shape[0]
        widths = {"attention.wq": n_heads * head_dim, "attention.wk": n_kv_heads * head_dim,
                  "attention.wv": n_kv_heads * head_dim, "attention.wo": dim, "feed_forward.w1": hidden,
                  "feed_forward.w2": dim, "feed_forward.w3": hidden}
        biases: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
        scales: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
        for n in range(n_layers):
            got = by_layer[n]
            for ours, theirs in _LITGPT_NORMS.items():
                extra[f"layers.{n}.{theirs}"] = got[ours]
            for kind, into in (("bias", biases), ("scale", scales)):
                name, qkv = got[f"attn.qkv.adapter_{kind}"]
                if qkv.shape != (qkv_rows,):
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(qkv.shape)}, expected "
                                          f"({qkv_rows},)")
                q, k, v = qkv.split((n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim))
                # litgpt keeps Hugging Face's rotate-half row order of q and k: back to Meta's interleaved rows
                into[n] = {"attention.wq": (f"{name}[q]", unpermute_hf(q[:, None], n_heads)[:, 0]),
                           "attention.wk": (f"{name}[k]", unpermute_hf(k[:, None], n_kv_heads)[:, 0]),
                           "attention.wv": (f"{name}[v]", v)}
                into[n].update({ours: got[f"{theirs}.adapter_{kind}"] for theirs, ours in _LITGPT_LINEARS.items()})
        extra.update(_v2_extra(biases, scales, widths, n_layers))
        config_fields = dict(version=2, scale="output", output_bias_scale="output.bias" in extra)
    elif extra:
        raise CheckpointError(f"{file}: tensor {next(iter(extra.values()))[0]!r} is V2's, but the file has no "
                              "adapter_bias / adapter_scale of its layers")
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=len(prompt_layers), gate="head",
                           gate_act="identity", **config_fields)
    logger.warning("%s: litgpt's adapter code (since its QKV layout change, PR #1013; seen in v0.5.13) takes the "
                   "adaption prompt's keys and values from other rows of its fused qkv output than the key and value "
                   "projections; this import uses the key and value projections (the paper's, the official code's and "
                   "litgpt's before that change), so the model may differ from what litgpt computes", file)
    return _AdapterFile(f"litgpt adapter{'_v2' if v2 else ''}", file, config, prompt_layers,
                        max(by_layer) + 1 if v2 else None, prompts, gates, None, extra)


def _read_adapter(path: str | os.PathLike, gate_act: str | None, adapter_len: int | None) -> _AdapterFile:
    path = Path(path)
    peft_config = None
    if path.is_dir():
        config_file = path / "adapter_config.json"
        weights = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).exists()]
        if not config_file.exists() or not weights:
            raise CheckpointError(f"{path}: a PEFT adapter folder needs adapter_config.json and "
                                  "adapter_model.safetensors or adapter_model.bin")
        path = weights[0]
    else:
        config_file = path.parent / "adapter_config.json"
    tensors, metadata = _read_tensor_file(path)
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    if "adapter_query.weight" in tensors and any(name.startswith("llama.") for name in tensors):
        adapter = _parse_official_v2(path, tensors)
    elif "adapter_query.weight" in tensors:
        adapter = _parse_official(path, tensors, gate_act, adapter_len)
    elif any(_PEFT_RE.fullmatch(name) for name in tensors):
        if config_file.exists():
            peft_config = read_json(config_file)
        adapter = _parse_peft(path, tensors, peft_config)
    elif any(name.startswith(("transformer.h.", "transformer.ln_f.", "lm_head.")) for name in tensors):
        adapter = _parse_litgpt(path, tensors)
    elif metadata.get("format") == ADAPTER_FORMAT:
        adapter = _parse_ours(path, tensors, metadata)
    else:
        raise CheckpointError(f"{path}: not a LLaMA-Adapter file (ours, the official v1 or V2 release, PEFT's "
                              f"adaption prompt, litgpt's adapter or adapter_v2); its tensors start with "
                              f"{sorted(tensors)[:3]}")
    if gate_act is not None and gate_act != adapter.config.gate_act:
        raise CheckpointError(f"{path}: this {adapter.fmt} adapter uses gate_act={adapter.config.gate_act!r}, "
                              f"not {gate_act!r}")
    for name, t in [*adapter.prompts, *adapter.gates, *adapter.extra.values()]:
        problem = _tensor_problem(t)
        if problem:
            raise CheckpointError(f"{path}: tensor {name!r} {problem}")
    return adapter


def _tensor_problem(t: torch.Tensor) -> str | None:
    """What makes t unusable as an adapter tensor (not floating point, NaN or Inf in it), or None."""
    if not t.is_floating_point():
        return f"is {t.dtype}; an adapter's tensors are floating point"
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        return f"holds {bad} non-finite value(s) (NaN or Inf) of {t.numel()}"
    return None


def read_adapter_config(path: str | os.PathLike, *, gate_act: str | None = None,
                        adapter_len: int | None = None) -> AdapterConfig:
    """The AdapterConfig of an adapter file or PEFT folder, to build the model it fits:
    `load_checkpoint(ckpt, adapter=read_adapter_config(path))`.

    gate_act is required for the official v1 release (ambiguous, see the module docstring) and
    checked for the others; adapter_len only matters for the official release (default 10).
    """
    return _read_adapter(path, gate_act, adapter_len).config


def load_adapter(model: LLaMA, path: str | os.PathLike, *, gate_act: str | None = None) -> AdapterConfig:
    """Load an adapter (ours, the official v1 release, or PEFT's; detected by its keys) into model's adapter.

    The model must have been built with the same AdapterConfig (read_adapter_config gives it);
    gate_act is required for the official v1 release. Returns the adapter's config.
    """
    if model.adapter is None:
        raise ValueError("the model has no adapter; build it with load_checkpoint(..., adapter=read_adapter_config("
                         f"{str(path)!r}))")
    adapter = _read_adapter(path, gate_act, model.adapter.adapter_len)
    file, config = adapter.file, model.config
    keys = ["adapter_len", "adapter_layers", "gate", "gate_act", "visual_dim", "clip_layers", "version"]
    if model.adapter.version == 2:
        keys += ["scale", "output_bias_scale"]
    if model.adapter.visual_dim:
        keys += ["fusion", "visual_len", "projector"] + (["visual_layers"] if model.adapter.early_fusion else []) + (
            ["visual_hidden"] if model.adapter.projector == "mlp" else ["visual_width", "visual_depth", "visual_heads"])
    for key in keys:
        theirs, ours = getattr(adapter.config, key), getattr(model.adapter, key)
        if theirs != ours:
            tensor = f" (tensor {adapter.gates[0][0]!r})" if key == "gate" else ""
            raise CheckpointError(f"{file}: the adapter has {key}={theirs!r}{tensor} but the model was built with "
                                  f"{key}={ours!r}")
    if adapter.model_dims is not None:
        for key in _MODEL_DIMS:
            if adapter.model_dims[key] != getattr(config, key):
                raise CheckpointError(f"{file}: the adapter was trained on a model with {key}="
                                      f"{adapter.model_dims[key]}, this model has {getattr(config, key)}")
    top = list(range(config.n_layers - model.adapter.adapter_layers, config.n_layers))
    if adapter.n_layers not in (None, config.n_layers) or adapter.layers not in (None, top):
        raise CheckpointError(f"{file}: the adapter is for layers {adapter.layers or 'the top'} of a "
                              f"{adapter.n_layers or '?'}-layer model; this model ({config.n_layers} layers) adapts "
                              f"layers {top[0]}..{top[-1]}")
    modules = list(adapter_layers(model).values())
    with torch.no_grad():
        for module, (pname, prompt), (gname, gate) in zip(modules, adapter.prompts, adapter.gates, strict=True):
            for name, src, dst in ((pname, prompt, module.adapter_prompt), (gname, gate, module.gate)):
                if src.shape != dst.shape:
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(src.shape)}, the model "
                                          f"(dim {config.dim}, {config.n_heads} heads) needs {tuple(dst.shape)}")
                dst.copy_(src)
        own = {k: v for k, v in adapter_state_dict(model).items() if not _OURS_RE.fullmatch(k)}
        for name in sorted(own.keys() ^ adapter.extra.keys())[:1]:
            raise CheckpointError(f"{file}: the model's adapter has tensor {name!r}, the file none" if name in own
                                  else f"{file}: tensor {adapter.extra[name][0]!r} has no place in the model's adapter")
        for name, dst in own.items():
            src_name, src = adapter.extra[name]
            if src.shape != dst.shape:
                theirs = src_name if src_name == name else f"{src_name} (our {name})"
                raise CheckpointError(f"{file}: tensor {theirs!r} has shape {tuple(src.shape)}, the model needs "
                                      f"{tuple(dst.shape)}")
            dst.copy_(src)
    return adapter.config


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write data to path through a temporary file in the same folder, renamed into place (os.replace): a killed
    process never leaves a half-written file, a failed write (a full disk) leaves path as it was and raises an
    OSError naming path. An existing file is replaced only with overwrite=True."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, ...: name the file meant, not the temporary one (which goes)
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_adapter(model: LLaMA, path: str | os.PathLike, *, overwrite: bool = False,
                 state: dict[str, torch.Tensor] | None = None, format: str = ADAPTER_FORMAT,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter alone; returns the path.

    format: "llama-adapter-triton" (ours, the default: a safetensors file, see the module docstring) or "peft" (a
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
            raise ValueError(f"{path}: not written: tensor {name!r} {_tensor_problem(t)}")
    return write_atomic(path, safetensors_bytes(tensors, metadata=metadata), overwrite=overwrite)


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

    The inverse of the PEFT import (module docstring, format 3): layers.N.attention.adapter_prompt (K, dim) becomes
    base_model.model.model.layers.N.self_attn.adaption_prompt (1, K, dim), the gate (1,) ...adaption_gate, fp32, with
    PEFT's config (peft_type ADAPTION_PROMPT, adapter_len, adapter_layers, target_modules "self_attn", task_type
    CAUSAL_LM, base_model_name_or_path). Adapters PEFT cannot express (peft_export_problem) are refused before
    anything is written. The folder is written under a temporary name beside path and renamed into place; an
    existing folder is refused unless overwrite=True, which replaces those two files in it (one by one, each
    atomically) and leaves its other files alone. state: as save_adapter's."""
    if model.adapter is None:
        raise ValueError("the model has no adapter to save")
    problem = peft_export_problem(model.adapter)
    if problem:
        raise ValueError(f"{path}: not written in PEFT's format: {problem}")
    folder = Path(path)
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
                raise ValueError(f"{folder}: not written: tensor 'layers.{n}.attention.{ours}' {_tensor_problem(t)}")
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


def permute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half permutation of q_proj / k_proj rows, or of their biases (the inverse of unpermute_hf)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


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
