"""An adapter bank: many LLaMA-Adapters on one copy of the base model, in one batch, each row its own adapter or none
(as vLLM and S-LoRA / Punica serve LoRA adapters).

    bank = AdapterBank(model)                     # the base alone: LLaMA(config) / load_checkpoint(path), no adapter
    bank.add("fr", "fr.safetensors")              # any format load_adapter reads, V1 or V2, checked against the base
    bank.add("release", "release.pth", gate_act="tanh")
    generate(model, prompts, adapters=bank, adapter_ids=["fr", None, "release"], max_new_tokens=64)
    with bank.rows(["fr", None, "release"]):      # or any forward of a batch of 3 rows
        logits = model(tokens)

The base model is never changed: bank.rows(ids) sets per-row state on its layers for the batches inside the `with`
(and takes it off after): the attention of each layer that some row's adapter adapts gets Attention.row_attend, the
V2 adapters' linears and norms get forward hooks that apply each row's bias, scale and norm weight ((batch, 1, width)
tensors gathered by adapter). A row with no adapter gets gate 0 and no bias or scale: it is the base model.
Each adapter's prompt keys and values go through the layer's wk / wv once per layer and dtype (cached in the bank;
add or remove drops an adapter's cache), then are gathered per batch into a (batch, prompt_len, nkv, hs) tensor,
or shared as batch 1 when every row of the batch uses one adapter. Gates go to the op as act(gate) per row and head
(each adapter keeps its own gate_act and gate mode). Adapters of different prompt lengths in one batch: the rows are
grouped by prompt length in each layer and the op runs once per group (exact; a batch of one length runs once).
Limits: inference only (no gradients reach the bank's adapters), no multi-modal adapters, no packed sequences
(cu_seqlens), and logits_at as flat indices is refused (an int position works). More: docs/adapters-bank.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_adapter_triton.kernels.reference import zero_init_attention_ref
from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention
from llama_adapter_triton.model.adapter import V2_LINEARS, AdapterConfig
from llama_adapter_triton.model.io import CheckpointError
from llama_adapter_triton.model.llama import LLaMA, RMSNorm

_LINEAR_RE = re.compile(r"(?P<path>(layers\.\d+\.(" + "|".join(re.escape(p) for p in V2_LINEARS) +
                        r"))|output)\.(?P<kind>bias|scale)")
_NORM_RE = re.compile(r"(?P<path>layers\.\d+\.(attention|ffn)_norm|norm)\.weight")


@dataclass
class BankAdapter:
    """One adapter of a bank, in the base's terms, every tensor fp32 on the base's device."""

    name: str
    file: Path
    config: AdapterConfig
    prompts: dict[int, torch.Tensor]  # layer -> (adapter_len, dim)
    gammas: dict[int, torch.Tensor]  # layer -> act(gate), (n_heads,)
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]]  # V2: "layers.N.attention.wq" / "output" -> (bias, scale)
    norms: dict[str, torch.Tensor]  # V2: "layers.N.attention_norm" / "norm" -> weight (dim,)


class AdapterBank:
    """Named adapters for one base model (the module docstring). Ids in a batch: an adapter's name, its position in
    the bank (the order of adding, for the adapters=[files] form), or None for the base alone."""

    def __init__(self, model: LLaMA, adapters: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] = (),
                 *, gate_act: str | None = None) -> None:
        if not isinstance(model, LLaMA):
            raise ValueError(f"AdapterBank needs a LLaMA model, got {type(model).__name__}")
        if model.adapter is not None:
            raise ValueError("AdapterBank needs the base model without an adapter (LLaMA(config) or "
                             "load_checkpoint(path) without adapter=...): the bank's adapters are applied per row")
        self.model = model
        self.adapters: dict[str, BankAdapter] = {}
        self._kv: dict[tuple[str, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        items = adapters.items() if isinstance(adapters, Mapping) else ((str(i), f) for i, f in enumerate(adapters))
        for name, file in items:
            self.add(name, file, gate_act=gate_act)

    def __len__(self) -> int:
        return len(self.adapters)

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, path: str | os.PathLike, *, gate_act: str | None = None,
            adapter_len: int | None = None) -> AdapterConfig:
        """Read the adapter at path (any format load_adapter reads; gate_act for the official v1 release, adapter_len
        for the official releases), check it against the base (CheckpointError naming the adapter and the file) and
        keep it as name (replacing an adapter of that name). Returns its config."""
        from llama_adapter_triton.model.adapters.formats import check_fits, read_adapter

        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter's name must be a non-empty string, got {name!r}")
        try:
            adapter = read_adapter(path, gate_act, adapter_len)
            check_fits(adapter, self.model.config)
        except CheckpointError as e:
            raise CheckpointError(f"adapter {name!r}: {e}") from None
        self._drop_cache(name)
        self.adapters[name] = self._convert(name, adapter)
        return adapter.config

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"the adapter bank has no adapter {name!r}; it has {self.names}")
        del self.adapters[name]
        self._drop_cache(name)

    def _drop_cache(self, name: str) -> None:
        for key in [k for k in self._kv if k[0] == name]:
            del self._kv[key]

    def _convert(self, name: str, adapter) -> BankAdapter:
        config, file, c = adapter.config, adapter.file, self.model.config
        if config.visual_dim or config.early_fusion:
            raise CheckpointError(f"adapter {name!r}: {file}: a multi-modal adapter cannot join an adapter bank (its "
                                  "visual input is per model); load it alone with load_adapter")
        device = self.model.tok_embeddings.weight.device

        def fp32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device, torch.float32)

        top = range(c.n_layers - config.adapter_layers, c.n_layers)
        act = torch.tanh if config.gate_act == "tanh" else (lambda g: g)
        prompts = {n: fp32(p) for n, (_, p) in zip(top, adapter.prompts, strict=True)}
        gammas = {n: act(fp32(g)).expand(c.n_heads).contiguous() for n, (_, g) in zip(top, adapter.gates, strict=True)}
        biases, scales, norms = {}, {}, {}
        for ours, (theirs, t) in adapter.extra.items():
            if t is None:  # the file has none (the official V2 chat release's final norm): the base's stays
                continue
            if m := _LINEAR_RE.fullmatch(ours):
                (biases if m["kind"] == "bias" else scales)[m["path"]] = fp32(t)
            elif m := _NORM_RE.fullmatch(ours):
                norms[m["path"]] = fp32(t)
            else:
                raise CheckpointError(f"adapter {name!r}: {file}: tensor {theirs!r} has no place in an adapter bank")
        if biases.keys() != scales.keys():
            path = sorted(biases.keys() ^ scales.keys())[0]
            raise CheckpointError(f"adapter {name!r}: {file}: {path} has a bias or a scale, not both")
        linears = {path: (biases[path], scales[path]) for path in biases}
        return BankAdapter(name, Path(file), config, prompts, gammas, linears, norms)

    def resolve(self, adapter_id: str | int | None) -> str | None:
        """The name of an id: a name, a position in the bank, or None (the base)."""
        if adapter_id is None or (isinstance(adapter_id, str) and adapter_id in self.adapters):
            return adapter_id
        if isinstance(adapter_id, int) and not isinstance(adapter_id, bool) and 0 <= adapter_id < len(self.adapters):
            return self.names[adapter_id]
        raise ValueError(f"adapter id {adapter_id!r} is not in the adapter bank (its adapters: {self.names}; ids are "
                         f"names, positions 0..{len(self.adapters) - 1}, or None for the base alone)")

    @torch.no_grad()
    def prompt_kv(self, name: str, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter name's prompt keys and values at layer, (1, adapter_len, nkv, hs) each in dtype: its prompt
        through the layer's wk / wv (with the adapter's V2 bias and scale there), computed once and cached."""
        key = (name, layer, dtype)
        if key not in self._kv:
            adapter, attention = self.adapters[name], self.model.layers[layer].attention
            prompt = adapter.prompts[layer].unsqueeze(0).to(dtype)  # (1, K, dim), as AdapterAttention.prompt_kv
            shape = (1, prompt.shape[1], attention.n_kv_heads, attention.head_dim)
            kv = []
            for linear in ("wk", "wv"):
                x = prompt
                bias, scale = adapter.linears.get(f"layers.{layer}.attention.{linear}", (None, None))
                if bias is not None and adapter.config.scale == "input":  # as BiasScaleLinear.forward
                    x = x * scale.to(x.dtype)
                y = getattr(attention, linear)(x)
                if bias is not None:
                    y = y + bias.to(y.dtype)
                    if adapter.config.scale == "output":
                        y = y * scale.to(y.dtype)
                kv.append(y.view(shape))
            self._kv[key] = (kv[0], kv[1])
        return self._kv[key]

    @contextmanager
    def rows(self, adapter_ids: Sequence[str | int | None]) -> Iterator[None]:
        """Within the `with`, every forward of the model is of a batch of len(adapter_ids) rows, row b with the
        adapter adapter_ids[b] (None: the base alone). The prompts' keys and values and the per-row tensors are made
        here, once, for every forward inside (a prefill and its decode steps)."""
        if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Sequence) or not adapter_ids:
            raise ValueError(f"adapter_ids must be a non-empty list, one id per row, got {adapter_ids!r}")
        names = [self.resolve(i) for i in adapter_ids]
        model = self.model
        if any(layer.attention.row_attend is not None for layer in model.layers):
            raise ValueError("this model is already inside an adapter bank's rows(): one batch at a time")
        dtype = model.tok_embeddings.weight.dtype
        device = model.tok_embeddings.weight.device
        batch = len(names)
        used = [self.adapters[n] for n in dict.fromkeys(n for n in names if n is not None)]
        slot = {a.name: i + 1 for i, a in enumerate(used)}  # 0: the base
        index = torch.tensor([slot.get(n, 0) for n in names], device=device)

        def gather(tables: list[torch.Tensor]) -> torch.Tensor:
            """(batch, width) of one tensor per slot (the base's first)."""
            return torch.stack(tables).index_select(0, index)

        handles = []
        try:
            for n, layer in enumerate(model.layers):
                groups = self._groups(names, n, dtype, device)
                if groups:
                    layer.attention.row_attend = _RowAttention(layer.attention, groups, batch)
            for path in dict.fromkeys(p for a in used for p in a.linears):
                module = model.get_submodule(path)
                out = module.out_features
                bias = gather([torch.zeros(out, device=device)] + [
                    a.linears[path][0] if path in a.linears else torch.zeros(out, device=device) for a in used])
                scale_in = scale_out = None
                for at, width in (("input", module.in_features), ("output", out)):
                    if any(path in a.linears and a.config.scale == at for a in used):
                        ones = torch.ones(width, device=device)
                        scale = gather([ones] + [a.linears[path][1] if path in a.linears and a.config.scale == at
                                                 else ones for a in used])
                        scale_in, scale_out = (scale, scale_out) if at == "input" else (scale_in, scale)
                if scale_in is not None:
                    handles.append(module.register_forward_pre_hook(_ScaleInput(scale_in, path)))
                handles.append(module.register_forward_hook(_BiasScaleOutput(bias, scale_out, path)))
            for path in dict.fromkeys(p for a in used for p in a.norms):
                module = model.get_submodule(path)
                if not isinstance(module, RMSNorm):
                    raise ValueError(f"{path} is a {type(module).__name__}, not the RMSNorm a V2 adapter tunes")
                base = module.weight.detach().float()
                weight = gather([base] + [a.norms.get(path, base) for a in used])
                handles.append(module.register_forward_hook(_RowNorm(weight, path)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer in model.layers:
                layer.attention.row_attend = None

    def _groups(self, names: list[str | None], layer: int, dtype: torch.dtype,
                device: torch.device) -> list[_Group]:
        """Layer's per-row prompts: one group per prompt length (rows without a prompt here join the first), or none
        when no row has a prompt in this layer."""
        lengths: dict[int, list[int]] = {}
        bare = []
        for b, name in enumerate(names):
            prompt = None if name is None else self.adapters[name].prompts.get(layer)
            if prompt is None:
                bare.append(b)
            else:
                lengths.setdefault(prompt.shape[0], []).append(b)
        if not lengths:
            return []
        groups = []
        for i, (_, members) in enumerate(sorted(lengths.items())):
            rows = sorted(members + bare) if i == 0 else members
            used = list(dict.fromkeys(names[b] for b in rows if b not in bare))
            whole = len(rows) == len(names)
            if len(used) == 1 and len(rows) == len(members):  # one adapter: its prompt and gate, shared
                pk, pv = self.prompt_kv(used[0], layer, dtype)
                gamma = self.adapters[used[0]].gammas[layer]
            else:
                kvs = [self.prompt_kv(n, layer, dtype) for n in used]
                zero = torch.zeros_like(kvs[0][0])
                slot = {n: i + 1 for i, n in enumerate(used)}
                index = torch.tensor([0 if b in bare else slot[names[b]] for b in rows], device=device)
                pk = torch.cat([zero] + [k for k, _ in kvs]).index_select(0, index)
                pv = torch.cat([zero] + [v for _, v in kvs]).index_select(0, index)
                gammas = [self.adapters[n].gammas[layer] for n in used]
                gamma = torch.stack([torch.zeros_like(gammas[0])] + gammas).index_select(0, index)
            groups.append(_Group(None if whole else torch.tensor(rows, device=device), pk, pv, gamma))
        return groups


@dataclass
class _Group:
    rows: torch.Tensor | None  # the batch rows of the group; None: all of them
    pk: torch.Tensor  # (rows or 1, prompt_len, nkv, hs)
    pv: torch.Tensor
    gamma: torch.Tensor  # act(gate): (n_heads,) shared, or (rows, n_heads)


def _check_batch(x: torch.Tensor, batch: int, what: str) -> None:
    if x.shape[0] != batch:
        raise ValueError(f"{what}: the adapter bank's rows() were set for a batch of {batch} rows, this forward has "
                         f"{x.shape[0]}")


def _per_row(t: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """A (batch, width) per-row tensor shaped to broadcast over x: (batch, T, width) or (batch, width)."""
    _check_batch(x, t.shape[0], what)
    if x.dim() == 3:
        return t.unsqueeze(1)
    if x.dim() == 2:  # logits_at=int: one position per row
        return t
    raise ValueError(f"{what}: per-row adapters need activations (batch, seqlen, width) or (batch, width), got "
                     f"{tuple(x.shape)} (logits_at as flat indices is not supported with an adapter bank)")


class _ScaleInput:
    """V2 scale_at="input", per row: x -> x * scale[row] before the frozen linear."""

    def __init__(self, scale: torch.Tensor, path: str) -> None:
        self.scale, self.path = scale, path

    def __call__(self, module, args):
        x = args[0]
        return (x * _per_row(self.scale, x, self.path).to(x.dtype), *args[1:])


class _BiasScaleOutput:
    """V2, per row: y -> y + bias[row], then times scale[row] for the adapters that scale the output."""

    def __init__(self, bias: torch.Tensor, scale: torch.Tensor | None, path: str) -> None:
        self.bias, self.scale, self.path = bias, scale, path

    def __call__(self, module, args, y):
        y = y + _per_row(self.bias, y, self.path).to(y.dtype)
        if self.scale is not None:
            y = y * _per_row(self.scale, y, self.path).to(y.dtype)
        return y


class _RowNorm:
    """V2's tuned norms, per row: RMSNorm with weight[row] (the base's own weight for the other rows)."""

    def __init__(self, weight: torch.Tensor, path: str) -> None:
        self.weight, self.path = weight, path

    def __call__(self, module: RMSNorm, args, y):
        x = args[0]
        return (module.normalize(x) * _per_row(self.weight, x, self.path)).type_as(x)


class _RowAttention:
    """Attention.row_attend of one layer: the token attention plus each row's gated prompt, through the op."""

    def __init__(self, attention, groups: list[_Group], batch: int) -> None:
        self.attention, self.groups, self.batch = attention, groups, batch

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        if ctx.cu_seqlens is not None:
            raise ValueError("packed sequences (cu_seqlens) are not supported with an adapter bank: pad the batch")
        _check_batch(q, self.batch, "attention")
        op = zero_init_attention if self.attention.attn_impl == "fused" else zero_init_attention_ref
        leftpad = ctx.leftpad_k
        if len(self.groups) == 1 and self.groups[0].rows is None:
            g = self.groups[0]  # gamma: act(gate), (n_heads,) shared or (batch, n_heads), the op's per-row gate
            return op(q, k, v, g.pk, g.pv, g.gamma, causal=True, gate_act="identity", leftpad_k=leftpad)
        out = torch.empty_like(q)
        for g in self.groups:  # several prompt lengths: each group's rows apart
            q_g, k_g, v_g = (t.index_select(0, g.rows) for t in (q, k, v))
            leftpad_g = None if leftpad is None else leftpad.index_select(0, g.rows)
            out.index_copy_(0, g.rows, op(q_g, k_g, v_g, g.pk, g.pv, g.gamma, causal=True, gate_act="identity",
                                          leftpad_k=leftpad_g))
        return out

