"""The official LLaMA-Adapter v1 release (e.g. llama_adapter_len10_layer30_release.pth, a torch file):
    adapter_query.weight        (adapter_layers * adapter_len, dim), the prompts of the top layers from the lowest up
    layers.N.attention.gate     (1, n_heads, 1, 1) for every layer N (only the top adapter_layers are used)
gate="head". adapter_len is not in the file: the model's (load_adapter) or 10, the release's (read_adapter_config).
Files of the official code before its per-head gates hold a gate of shape (1,) per layer: imported with
gate="layer".
Its gate is ambiguous: the official training code (alpaca_finetuning_v1) scales the prompt attention by tanh(gate),
the official inference code (llama/model.py) by the raw gate. The same weights give different models under the two,
so the import takes gate_act explicitly ("tanh": the model as it was trained; "identity": what the official
inference script computes), has no default, and logs the one it used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from llama_adapter_triton.model.adapter import AdapterConfig
from llama_adapter_triton.model.adapters.common import AdapterFile, by_layer
from llama_adapter_triton.model.io import CheckpointError

logger = logging.getLogger(__name__)

_GATE_RE = re.compile(r"layers\.(\d+)\.attention\.(gate)")


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return "adapter_query.weight" in tensors  # (an official V2 file has it too: formats.py tries V2 first)


def parse(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, gate_act: str | None,
          adapter_len: int | None) -> AdapterFile:
    if gate_act is None:
        raise CheckpointError(
            f"{file}: an official LLaMA-Adapter v1 adapter needs gate_act='tanh' or 'identity': its training code "
            "uses tanh(gate), its inference code the raw gate, and the file does not say which (see "
            "model/adapters/official_v1.py)")
    if adapter_len is None:
        adapter_len = 10
        logger.warning("%s: adapter_len is not stored in official v1 files; using 10, the release's", file)
    query = tensors.pop("adapter_query.weight")
    if query.dim() != 2 or query.shape[0] % adapter_len:
        raise CheckpointError(f"{file}: tensor 'adapter_query.weight' has shape {tuple(query.shape)}; it must be "
                              f"(adapter_layers * adapter_len, dim) with adapter_len {adapter_len}")
    n_adapted = query.shape[0] // adapter_len
    gates = by_layer(file, tensors, _GATE_RE, ("gate",))
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
    return AdapterFile("official LLaMA-Adapter v1", file, config, None, n_layers, prompts,
                       [(gates[n]["gate"][0], gates[n]["gate"][1].flatten()) for n in top])
