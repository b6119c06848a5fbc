"""litgpt's adapter (lit_model.pth.adapter) and adapter_v2 (lit_model.pth.adapter_v2) files: {"model": ...} of its
adapter_filter, torch files:
    transformer.h.N.attn.adapter_wte.weight   (adapter_len, n_embd)   in the adapted layers
    transformer.h.N.attn.gating_factor        (1, 1, n_head, 1)       (an older (1, n_head, 1, 1) too)
adapter_v2 adds in every layer AdapterV2Linear's adapter_bias / adapter_scale (output scales) of attn.qkv (q, k and
v concatenated: split into wq, wk, wv, the q and k parts taken from HF's rotate-half row order back to Meta's rows),
attn.proj (wo), mlp.fc_1 (w1), mlp.fc_2 (w3), mlp.proj (w2), the norms norm_1, norm_2 and transformer.ln_f, and
lm_head's (output_bias_scale=True). gate="head", gate_act="identity" (litgpt multiplies by the raw gating factor).
The prompt's keys and values go through the key and value projections, as in the paper and litgpt before its QKV
layout change (PR #1013): litgpt's code since then (v0.5.13 checked) takes them from other rows of its qkv output,
so its own logits differ; the import says so in a warning.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from llama_adapter_triton.model.adapter import AdapterConfig
from llama_adapter_triton.model.adapters.common import AdapterFile, split_layers, v2_extra
from llama_adapter_triton.model.checkpoint import unpermute_hf
from llama_adapter_triton.model.io import CheckpointError

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# litgpt's names in a block -> ours (its fc_1 is LLaMA's gate projection w1, fc_2 the up projection w3)
_LINEARS = {"attn.proj": "attention.wo", "mlp.fc_1": "feed_forward.w1", "mlp.fc_2": "feed_forward.w3",
            "mlp.proj": "feed_forward.w2"}
_NORMS = {"norm_1.weight": "attention_norm.weight", "norm_2.weight": "ffn_norm.weight"}


def detect(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    return any(name.startswith(("transformer.h.", "transformer.ln_f.", "lm_head.")) for name in tensors)


def parse(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, gate_act: str | None,
          adapter_len: int | None) -> AdapterFile:
    """The file's adapter, V1 or V2 (gate_act and adapter_len: the file tells them)."""
    by_layer, rest = split_layers(tensors, _LAYER_RE)
    extra: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in rest.items():
        if name == "transformer.ln_f.weight":
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
    width = by_layer[prompt_layers[0]]["attn.adapter_wte.weight"][1].shape
    for n in prompt_layers:
        got = by_layer[n]
        for key in ("attn.adapter_wte.weight", "attn.gating_factor"):
            if key not in got:
                raise CheckpointError(f"{file}: layer {n} has 'transformer.h.{n}.attn.adapter_wte.weight' or a gate "
                                      f"but no 'transformer.h.{n}.{key}'")
        name, p = got.pop("attn.adapter_wte.weight")
        if p.dim() != 2 or p.shape != width or p.shape[0] < 1 or p.shape[1] % n_heads:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(p.shape)}; it must be (adapter_len, "
                                  f"n_embd), n_embd a multiple of the gating factor's {n_heads} heads, in every layer")
        prompts.append((name, p))
        name, g = got.pop("attn.gating_factor")
        gates.append((name, g.flatten()))  # (1, 1, nh, 1), or an older file's (1, nh, 1, 1): the same order
    adapter_len, dim = prompts[0][1].shape
    head_dim = dim // n_heads
    v2 = any(got for got in by_layer.values())
    config_fields = {}
    if v2:
        n_layers = max(by_layer) + 1
        expected = {f"{lin}.adapter_{kind}" for lin in ("attn.qkv", *_LINEARS) for kind in ("bias", "scale")}
        expected |= set(_NORMS)
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
            for ours, theirs in _NORMS.items():
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
                into[n].update({ours: got[f"{theirs}.adapter_{kind}"] for theirs, ours in _LINEARS.items()})
        extra.update(v2_extra(biases, scales, widths, n_layers))
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
    return AdapterFile(f"litgpt adapter{'_v2' if v2 else ''}", file, config, prompt_layers,
                       max(by_layer) + 1 if v2 else None, prompts, gates, None, extra)
