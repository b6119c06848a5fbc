"""What the adapter formats share: AdapterFile, an adapter read from any format in our terms, and the small helpers
of their parsers (tensors by layer, V2's fresh biases and scales, the check every adapter tensor passes).

Each format (ours.py, official_v1.py, official_v2.py, official_v2_chat.py, peft.py, litgpt.py) turns a file's
tensors into an AdapterFile; formats.py picks the format and loads the AdapterFile into a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_adapter_triton.model.adapter import AdapterConfig
from llama_adapter_triton.model.io import CheckpointError

# our names of the prompts and gates (adapter_state_dict's); every other adapter tensor is an AdapterFile.extra
PROMPT_OR_GATE_RE = re.compile(r"layers\.(\d+)\.attention\.(adapter_prompt|gate)")


@dataclass
class AdapterFile:
    """An adapter read from a file of any supported format, in our terms."""

    fmt: str  # "llama-adapter-triton" (ours), "official LLaMA-Adapter v1" or "PEFT adaption-prompt", ...
    file: Path
    config: AdapterConfig
    layers: list[int] | None  # absolute layer indices, bottom to top, when the file names them
    n_layers: int | None  # the model's depth, when the file tells it
    prompts: list[tuple[str, torch.Tensor]]  # (name in the file, (adapter_len, dim)), bottom to top
    gates: list[tuple[str, torch.Tensor]]  # (name in the file, (n_gates,))
    model_dims: dict | None = None  # ours: the dims of the model it was trained on
    # every other tensor, by our name (adapter_state_dict's): (name in the file, tensor): V2's biases, scales and
    # norms, the early-fusion gates, the projector; tensor None: the file has none and the model's own (the base
    # checkpoint's) value stays (the official V2 chat release's final norm, which it did not train)
    extra: dict[str, tuple[str, torch.Tensor | None]] = field(default_factory=dict)


def split_layers(tensors: dict[str, torch.Tensor], pattern: re.Pattern) -> tuple[
        dict[int, dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """({layer: {kind: (name, tensor)}} for the names pattern matches (its groups: the layer, the kind), {name:
    tensor} of the other names), in the file's order."""
    layers: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = pattern.fullmatch(name)
        if m is None:
            rest[name] = t
        else:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = (name, t)
    return layers, rest


def by_layer(file: Path, tensors: dict[str, torch.Tensor], pattern: re.Pattern, kinds: tuple[str, ...]):
    """{layer: {kind: (name, tensor)}} for the names matching pattern; any other name is an error."""
    layers, rest = split_layers(tensors, pattern)
    if rest:
        name, t = next(iter(rest.items()))
        raise CheckpointError(f"{file}: unexpected tensor {name!r} of shape {tuple(t.shape)} in a "
                              "LLaMA-Adapter file")
    for layer, got in sorted(layers.items()):
        for kind in kinds:
            if kind not in got:
                other = next(iter(got.values()))[0]
                raise CheckpointError(f"{file}: layer {layer} has {other!r} but no {kind} tensor")
    return dict(sorted(layers.items()))


def v2_extra(biases: dict[int, dict[str, tuple[str, torch.Tensor]]],
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


# the dtypes an adapter's tensors may have (read_adapter refuses others, float8 among them, before parsing)
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ADAPTER_DTYPES_TEXT = "an adapter's tensors are floating point (float16, bfloat16, float32 or float64)"


def tensor_problem(t: torch.Tensor) -> str | None:
    """What makes t unusable as an adapter tensor (not of ADAPTER_DTYPES, NaN or Inf in it), or None."""
    if t.dtype not in ADAPTER_DTYPES:
        return f"is {t.dtype}; {ADAPTER_DTYPES_TEXT}"
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        return f"holds {bad} non-finite value(s) (NaN or Inf) of {t.numel()}"
    return None
