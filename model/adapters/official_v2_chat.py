"""The official LLaMA-Adapter V2 chat release (llama_adapter_v2_chat65b, chat_llama65b_bias_scale_norm_tuning_v1.pth:
bias, scale and norm tuning of LLaMA-65B), a torch file {"model": tensors} that its chat_demo.py loads into its
llama/model.py (add_bias, add_scale, train_norm; adapter_len = adapter_layer = 0):
    layers.N.attention.{wq, wk, wv, wo}_bias, layers.N.feed_forward.{w1, w2, w3}_bias    (the linear's output width)
    layers.N.attention.{wq, wk, wv, wo}_scale, layers.N.feed_forward.{w1, w2, w3}_scale  (its input width)
    layers.N.attention_norm.weight, layers.N.ffn_norm.weight                              (dim,)
in every layer N; norm.weight (dim,) when the file has it (the release's code trains the "_norm." weights only).
Its forward_linear_with_scale_and_bias computes linear(x * scale) + bias on every linear: imported as version=2,
scale="input", adapter_layers=0 (no adaption prompt, no gate; gate_act "tanh", its code's for prompts it does not
have). Without norm.weight the final norm stays the base checkpoint's. A file with the chat code's adaption prompts
(adapter_query.weight, gates: no release has them) or any other tensor is refused, naming it.
Checked once against the release's own llama/model.py (fairscale stubbed for one rank) on a tiny model: logits within
2.7e-6; tests/test_adapter_v2.py checks it against an fp64 re-implementation of that code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llama_adapter_triton.model.adapter import V2_LINEARS, AdapterConfig
from llama_adapter_triton.model.adapters.common import AdapterFile, split_layers
from llama_adapter_triton.model.io import CheckpointError

_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_NORMS = ("attention_norm.weight", "ffn_norm.weight")
# a layer's tensors: the release's name -> ours (its linears' names are ours: V2_LINEARS)
_TENSORS = {**{f"{linear}_{kind}": f"{linear}.{kind}" for linear in V2_LINEARS for kind in ("bias", "scale")},
            **{norm: norm for norm in _NORMS}}


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any((m := _LAYER_RE.fullmatch(name)) and m.group(2).endswith(("_bias", "_scale")) for name in tensors)


def parse(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, gate_act: str | None,
          adapter_len: int | None) -> AdapterFile:
    """The release's bias, scale and norm tuning (gate_act and adapter_len: there are no prompts)."""
    by_layer, rest = split_layers(tensors, _LAYER_RE)
    extra: dict[str, tuple[str, torch.Tensor | None]] = {"norm.weight": ("norm.weight (none: the base's)", None)}
    for name, t in rest.items():
        if name == "norm.weight":
            extra[name] = (name, t)
        elif name == "adapter_query.weight":
            raise CheckpointError(f"{file}: adaption prompts ({name!r}) in an official LLaMA-Adapter V2 chat file: "
                                  "not supported (the chat65b release has none: bias, scale and norm tuning)")
        else:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} of shape {tuple(t.shape)} in an official "
                                  "LLaMA-Adapter V2 chat file")
    n_layers = max(by_layer) + 1  # (detect saw a layer's bias or scale)
    for n in range(n_layers):
        got = by_layer.get(n, {})
        odd = sorted(set(got) - _TENSORS.keys())
        if odd:
            raise CheckpointError(f"{file}: unexpected tensor {got[odd[0]][0]!r} in an official LLaMA-Adapter V2 chat "
                                  "file")
        lacking = sorted(_TENSORS.keys() - set(got))
        if lacking:
            raise CheckpointError(f"{file}: tensor 'layers.{n}.{lacking[0]}' is missing (every layer of an official "
                                  "V2 chat file has the bias and scale of its seven linears and its two norms)")
        extra.update({f"layers.{n}.{ours}": got[theirs] for theirs, ours in _TENSORS.items()})
    config = AdapterConfig(adapter_layers=0, version=2, scale="input")
    return AdapterFile("official LLaMA-Adapter V2 chat", file, config, [], n_layers, [], [], None, extra)
