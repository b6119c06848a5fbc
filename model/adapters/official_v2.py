"""The official LLaMA-Adapter V2 multi-modal release (BIAS-7B, CAPTION-7B): llama_adapter_v2_multimodal7b's
extract_adapter_from_checkpoint.py writes {"model": tensors, "config": {"w_bias", "w_lora", "lora_rank"}}:
    adapter_query.weight            (query_layer * query_len, dim), the prompts of the top query_layer layers
    visual_query.weight             (query_len, width)
    llama.layers.N.attention.gate   (1, n_heads, 1, 1), in every layer
    llama.layers.N.{attention.wq, attention.wo, feed_forward.w1, w2, w3}.bias, llama.layers.N.{attention_norm,
        ffn_norm}.weight in every layer; llama.norm.weight
    clip_proj, clip_proj_norm, visual_blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, visual_proj,
        visual_proj_norm (weights and biases): the visual side
Imported as version=2, gate "head" with tanh (the V2 code's, training and inference alike), projector="query"
(model/visual.py's QueryProjector, its 16 heads the release's: the file does not tell them), the query_len visual
queries added to every prompt; wk / wv get zero biases and every linear unit scales (the release has none: the same
model). LoRA files (LORA-BIAS-7B: lora_* tensors, new_gate) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llama_adapter_triton.model.adapter import AdapterConfig
from llama_adapter_triton.model.adapters.common import AdapterFile, split_layers, v2_extra
from llama_adapter_triton.model.io import CheckpointError

OFFICIAL_V2_VISUAL_HEADS = 16  # the release's visual blocks (llama_adapter.load: v_num_heads=16); not in the file
_BIASES = ("attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
# the release's projector names -> ours (model/visual.py's QueryProjector at visual_proj), longest prefix first
_VISUAL = (("clip_proj_norm.", "visual_proj.clip_proj_norm."), ("clip_proj.", "visual_proj.clip_proj."),
           ("visual_proj_norm.", "visual_proj.proj_norm."), ("visual_proj.", "visual_proj.proj."),
           ("visual_blocks.", "visual_proj.blocks."), ("visual_query.weight", "visual_proj.visual_query"))
_LAYER_RE = re.compile(r"llama\.layers\.(\d+)\.(.+)")
_BLOCK_RE = re.compile(r"visual_blocks\.(\d+)\.")


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return "adapter_query.weight" in tensors and any(name.startswith("llama.") for name in tensors)


def parse(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, gate_act: str | None,
          adapter_len: int | None) -> AdapterFile:
    """The release's adapter (gate_act and adapter_len: the file tells them)."""
    lora = sorted(n for n in tensors if "lora" in n or n.endswith("new_gate"))
    if lora:
        raise CheckpointError(f"{file}: an official LLaMA-Adapter V2 file with LoRA tensors ({lora[0]!r}; "
                              "LORA-BIAS-7B): not supported (its BIAS-7B and CAPTION-7B files are)")
    query, visual_query = tensors.get("adapter_query.weight"), tensors.get("visual_query.weight")
    if visual_query is None or visual_query.dim() != 2 or query.dim() != 2 or \
            min(*query.shape, *visual_query.shape) < 1 or query.shape[0] % visual_query.shape[0]:
        raise CheckpointError(f"{file}: an official V2 file needs adapter_query.weight (query_layer * query_len, "
                              "dim) and visual_query.weight (query_len, width), got "
                              f"{tuple(query.shape)} and {None if visual_query is None else tuple(visual_query.shape)}")
    adapter_len, dim = visual_query.shape[0], query.shape[1]
    n_adapted = query.shape[0] // adapter_len
    by_layer, rest = split_layers(tensors, _LAYER_RE)
    extra: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in rest.items():
        if name == "llama.norm.weight":
            extra["norm.weight"] = (name, t)
        elif name != "adapter_query.weight":
            ours = next((o + name[len(prefix):] for prefix, o in _VISUAL if name.startswith(prefix)), None)
            if ours is None or (name.startswith("visual_blocks.") and not _BLOCK_RE.match(name)):
                raise CheckpointError(f"{file}: unexpected tensor {name!r} of shape {tuple(t.shape)} in an official "
                                      "LLaMA-Adapter V2 file")
            extra[ours] = (name, t)
    n_layers = max(by_layer, default=-1) + 1
    expected = {"attention.gate", "attention_norm.weight", "ffn_norm.weight", *(f"{linear}.bias" for linear in _BIASES)}
    for n in range(n_layers):
        got = by_layer.get(n, {})
        odd = sorted(set(got) - expected)
        if odd:
            raise CheckpointError(f"{file}: unexpected tensor {got[odd[0]][0]!r} in an official LLaMA-Adapter V2 file")
        lacking = sorted(expected - set(got))
        if lacking:
            raise CheckpointError(f"{file}: tensor 'llama.layers.{n}.{lacking[0]}' is missing (every layer of an "
                                  "official V2 file has gate, norms and biases)")
    if "norm.weight" not in extra or n_layers < 1 or n_adapted > n_layers:
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
    biases = {n: {linear: got[f"{linear}.bias"] for linear in _BIASES} for n, got in by_layer.items()}
    extra.update(v2_extra(biases, {}, widths, n_layers))
    clip_proj = tensors.get("clip_proj.weight")
    blocks = {int(m.group(1)) for name in tensors if (m := _BLOCK_RE.match(name))}
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
    return AdapterFile("official LLaMA-Adapter V2", file, config, top, n_layers, prompts, gates, None, extra)
