"""Checkpoints: HF and Meta base models against transformers' logits; adapters in our, the official v1 and
PEFT's formats; errors that name the file and the tensor."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch
from model_utils import VOCAB, copy_base, hf_model, peft_adaption_prompt, set_adapter_, tiny_config, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from llama_adapter_triton import (
    AdapterConfig,
    CheckpointError,
    LLaMA,
    adapter_state_dict,
    load_adapter,
    load_checkpoint,
    load_config,
    read_adapter_config,
    save_adapter,
    save_checkpoint,
)
from llama_adapter_triton.model.checkpoint import permute_hf, unpermute_hf
from llama_adapter_triton.model.io import torch_load

TOKENS = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
CONFIGS = {"llama2": dict(), "llama3-gqa-tied": dict(gqa=True, llama3=True)}


def logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out).float()


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(folder written by transformers' save_pretrained, its logits on TOKENS, our config)."""
    config = tiny_config(**CONFIGS[request.param])
    hf = hf_model(config)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return folder, logits(hf), config


# ---------------------------------------------------------------------------------------------------------------
# Base models


def test_hf_checkpoint_gives_transformers_logits(hf_checkpoint):
    folder, expected, config = hf_checkpoint
    # hidden_dim comes from config.json, so multiple_of plays no part
    assert dataclasses.replace(load_config(folder), name=config.name, multiple_of=config.multiple_of) == config
    model = load_checkpoint(folder)
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 1.0  # the logits are far from flat: the comparison has teeth


def test_hf_rope_permutation_matters(hf_checkpoint):
    """Without undoing HF's q/k permutation the logits differ: the test above checks the permutation."""
    folder, expected, config = hf_checkpoint
    model = load_checkpoint(folder)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.copy_(_permute_hf(layer.attention.wq.weight, config.n_heads))
    assert (logits(model) - expected).abs().max() > 1e-2


def _permute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permutation (convert_llama_weights_to_hf.py), the inverse of unpermute_hf."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_checkpoint_is_read_by_transformers_and_load_checkpoint(tmp_path, name):
    from transformers import LlamaForCausalLM

    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1), **CONFIGS[name])  # the adapter is left out
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    base = copy_base(model, LLaMA(model.config)).eval()
    torch.testing.assert_close(logits(LlamaForCausalLM.from_pretrained(folder)), logits(base), atol=1e-4, rtol=1e-4)
    loaded = load_checkpoint(folder)
    assert loaded.config == dataclasses.replace(model.config, name="ckpt", multiple_of=256)  # hidden_dim is stored
    for (n, p), (m, q) in zip(loaded.state_dict().items(), base.state_dict().items(), strict=True):
        assert n == m and torch.equal(p, q), n
    with pytest.raises(FileExistsError, match=r"config.json|model.safetensors"):
        save_checkpoint(model, folder)
    other = LLaMA(model.config).to(torch.bfloat16)
    save_checkpoint(other, folder, overwrite=True)
    assert torch.equal(load_checkpoint(folder).output.weight, other.output.weight)  # bf16, as written


def test_permute_hf_is_hf_permutation():
    w = torch.randn(4 * 8, 5)
    torch.testing.assert_close(permute_hf(w, 4), _permute_hf(w, 4), atol=0, rtol=0)


def test_unpermute_inverts_hf_permutation():
    w = torch.randn(4 * 32, 128)
    torch.testing.assert_close(unpermute_hf(_permute_hf(w, 4), 4), w, atol=0, rtol=0)


def test_hf_sharded_safetensors_and_bin(tmp_path):
    config = tiny_config(gqa=True)
    hf = hf_model(config, seed=3)
    expected = logits(hf)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "sharded")), expected, atol=1e-4, rtol=1e-4)

    # pytorch_model-*.bin shards with their index, as older transformers wrote them
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(logits(load_checkpoint(folder)), expected, atol=1e-4, rtol=1e-4)


def _write_meta(model: LLaMA, folder, *, mp: int, vocab_parallel: bool, params: dict) -> None:
    """Meta's format: consolidated.NN.pth model-parallel shards (fairscale's splits) and params.json."""
    folder.mkdir()
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
                 "tok_embeddings": 0 if vocab_parallel else 1}
    state = model.state_dict()
    if model.config.tie_embeddings:  # Meta's files hold output.weight even when it equals the embedding
        state["output.weight"] = state["tok_embeddings.weight"]
    shards = [{"rope.freqs": torch.randn(16)} for _ in range(mp)]  # LLaMA-1's buffer, skipped on load
    for name, t in state.items():
        dim = split_dim.get(name.split(".")[-2])
        for rank in range(mp):
            shards[rank][name] = t.chunk(mp, dim=dim)[rank].clone() if dim is not None else t.clone()
    for rank, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_checkpoint_gives_transformers_logits(hf_checkpoint, tmp_path, mp):
    folder, expected, config = hf_checkpoint
    model = load_checkpoint(folder)
    llama3 = config.rope_scaling is not None
    params = {"dim": 128, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": VOCAB if llama3 else -1}
    if llama3:
        params.update(n_kv_heads=2, rope_theta=500000.0, use_scaled_rope=True)
    _write_meta(model, tmp_path / "meta", mp=mp, vocab_parallel=llama3, params=params)
    if llama3:  # Meta's Llama-3.2 files hold output.weight; loaded untied, it equals the embedding
        config = tiny_config(gqa=True, llama3=True)
    meta = load_checkpoint(tmp_path / "meta")
    assert meta.config.vocab_size == VOCAB and meta.config.hidden_dim == config.hidden_dim
    assert meta.config.rope_scaling == config.rope_scaling and meta.config.n_kv_heads == config.n_kv_heads
    torch.testing.assert_close(logits(meta), expected, atol=1e-4, rtol=1e-4)


def test_load_checkpoint_dtype_and_device(hf_checkpoint):
    folder, expected, _ = hf_checkpoint
    model = load_checkpoint(folder, adapter=AdapterConfig(adapter_len=4, adapter_layers=1), dtype=torch.bfloat16)
    adapter = adapter_state_dict(model)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == (torch.float32 if name in adapter else torch.bfloat16), name
    assert all(p.abs().sum() > 0 for n, p in adapter.items() if n.endswith("adapter_prompt"))
    assert all((p == 0).all() for n, p in adapter.items() if n.endswith("gate"))
    if model.config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


def _copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_checkpoint_errors_name_file_and_tensor(hf_checkpoint, tmp_path):
    folder, _, config = hf_checkpoint
    with safe_open(folder / "model.safetensors", "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}

    def write(name, tensors):
        bad = tmp_path / name
        _copy_folder(folder, bad)
        save_file(tensors, bad / "model.safetensors")
        return bad

    missing = write("missing", {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.feed_forward\.w3\.weight"):
        load_checkpoint(missing)

    extra = write("extra", {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn"
                                              r"\.q_norm"):
        load_checkpoint(extra)

    wrong = dict(state)
    wrong["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(config.n_kv_heads * 32 + 8, 128)
    rows = config.n_kv_heads * 32
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\."
                                              rf"weight' \(our layers\.0\.attention\.wk\.weight\) is torch\.float32 "
                                              rf"\({rows + 8}, 128\), the model .* needs a floating-point "
                                              rf"\({rows}, 128\)"):
        load_checkpoint(write("wrong", wrong))

    with pytest.raises(CheckpointError, match="neither a Meta checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(folder / "config.json")

    broken = tmp_path / "broken"
    _copy_folder(folder, broken)
    (broken / "config.json").write_text('{"hidden_size": 128,')
    with pytest.raises(CheckpointError, match=r"broken/config\.json: cannot be read as JSON"):
        load_checkpoint(broken)

    truncated = tmp_path / "truncated"
    _copy_folder(folder, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_checkpoint(truncated)


def test_meta_checkpoint_errors(tmp_path):
    model = tiny_model()
    params = {"dim": 128, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
    _write_meta(model, tmp_path / "meta", mp=2, vocab_parallel=False, params=params)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.attention.wo.weight"]
    torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: tensor 'layers\.1\.attention\.wo\.weight'"):
        load_checkpoint(tmp_path / "meta")

    # a pickled reference to code: weights_only refuses it
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "hook": os.system},
               tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: cannot be loaded with weights_only=True"):
        load_checkpoint(tmp_path / "meta")


def test_non_finite_base_weights_are_named_and_a_refused_pickle_is_one_line(tmp_path):
    """NaN weights once loaded unnoticed (generate printed "⁇ ⁇ ⁇" with exit 0; finetune blamed the learning rate):
    each base tensor is checked as it is read. The refusal of a pickled reference to code ran to six lines."""
    model = tiny_model()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[3, :2] = float("nan")
    save_checkpoint(model, tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
                                              r"\(our layers\.1\.feed_forward\.w2\.weight\) holds 2 non-finite "
                                              r"value\(s\) \(NaN or Inf\) of \d+"):
        load_checkpoint(tmp_path / "nan")
    big = tiny_model()
    with torch.no_grad():
        big.norm.weight[0] = 1e6  # finite in fp32, not in fp16
    save_checkpoint(big, tmp_path / "big")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' \(our norm\.weight\) overflows "
                                              r"torch\.float16"):
        load_checkpoint(tmp_path / "big", dtype=torch.float16)

    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "hook": os.system}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError) as e:
        torch_load(tmp_path / "code.pth")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value), str(e.value)
    assert re.search(r"code\.pth: cannot be loaded with weights_only=True: it is not a plain checkpoint of tensors "
                     r"\(UnpicklingError: [^()]*GLOBAL posix\.system[^()]*\)$", str(e.value))


# ---------------------------------------------------------------------------------------------------------------
# Adapters

ADAPTER = AdapterConfig(adapter_len=4, adapter_layers=1)


def test_save_load_adapter_round_trip(tmp_path):
    model = tiny_model(ADAPTER, seed=5)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == {"layers.1.attention.adapter_prompt", "layers.1.attention.gate"}
        assert set(f.keys()) == set(adapter_state_dict(model))
        assert json.loads(f.metadata()["adapter_config"]) == ADAPTER.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left behind
    assert read_adapter_config(path) == ADAPTER

    other = copy_base(model, LLaMA(model.config, ADAPTER)).eval()  # fresh adapter: prompt random, gate 0
    assert not torch.equal(other.layers[1].attention.gate, model.layers[1].attention.gate)
    load_adapter(other, path)
    for name, t in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(other)[name], t), name
    torch.testing.assert_close(logits(other), logits(model), atol=0, rtol=0)


def test_save_adapter_never_overwrites_by_accident(tmp_path):
    model = tiny_model(ADAPTER)
    path = tmp_path / "adapter.safetensors"
    path.write_text("the user's file")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, path)
    assert path.read_text() == "the user's file"
    save_adapter(model, path, overwrite=True)
    assert read_adapter_config(path) == ADAPTER
    with pytest.raises(ValueError, match="no adapter"):
        save_adapter(tiny_model(), tmp_path / "base.safetensors")


def test_save_adapter_from_given_state(tmp_path):
    """state= writes given tensors (e.g. gathered from FSDP shards) in the model's adapter format."""
    model = tiny_model(ADAPTER, seed=5)
    state = {k: torch.randn(v.shape) for k, v in adapter_state_dict(model).items()}
    path = save_adapter(model, tmp_path / "adapter.safetensors", state=state)
    other = copy_base(model, LLaMA(model.config, ADAPTER))
    load_adapter(other, path)
    for name, t in adapter_state_dict(other).items():
        assert torch.equal(t, state[name]), name
    with pytest.raises(ValueError, match="state must hold the adapter's tensors"):
        save_adapter(model, tmp_path / "other.safetensors", state={k: v[:1] for k, v in state.items()})


def test_save_adapter_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    model = tiny_model(ADAPTER)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "adapter.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_adapter_mismatches_name_file_and_tensor(tmp_path):
    model = tiny_model(ADAPTER)
    path = save_adapter(model, tmp_path / "adapter.safetensors")

    wide = LLaMA(tiny_config(), AdapterConfig(adapter_len=4, adapter_layers=1, gate="layer"))
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: the adapter has gate='head' \(tensor "
                                              r"'layers\.1\.attention\.gate'\) but the model was built with "
                                              r"gate='layer'"):
        load_adapter(wide, path)
    with pytest.raises(CheckpointError, match=r"adapter_layers=1 .* adapter_layers=2"):
        load_adapter(LLaMA(tiny_config(), AdapterConfig(adapter_len=4, adapter_layers=2)), path)
    with pytest.raises(CheckpointError, match=r"trained on a model with n_layers=2, this model has 3"):
        load_adapter(LLaMA(tiny_config(n_layers=3), ADAPTER), path)
    with pytest.raises(CheckpointError, match="uses gate_act='tanh', not 'identity'"):
        load_adapter(model, path, gate_act="identity")
    with pytest.raises(ValueError, match="no adapter"):
        load_adapter(tiny_model(), path)

    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del tensors["layers.1.attention.gate"]
    save_file(tensors, tmp_path / "partial.safetensors", metadata)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: layer 1 has 'layers\.1\.attention\."
                                              r"adapter_prompt' but no gate tensor"):
        load_adapter(model, tmp_path / "partial.safetensors")

    tensors["layers.1.attention.gate"] = torch.zeros(4)
    tensors["layers.1.attention.adapter_prompt"] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / "narrow.safetensors", metadata)
    with pytest.raises(CheckpointError, match=r"narrow\.safetensors: tensor 'layers\.1\.attention\.adapter_prompt' has "
                                              r"shape \(4, 64\), but its metadata \('adapter_config', 'model'\) makes "
                                              r"it \(4, 128\)"):  # refused as it is read, before any model is built
        load_adapter(model, tmp_path / "narrow.safetensors")
    torch.save({"transformer.h.1.attn.adapter_wte.weight": torch.zeros(4, 64),  # a format without metadata
                "transformer.h.1.attn.gating_factor": torch.zeros(1, 1, 4, 1)}, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=r"narrow\.pth: tensor 'transformer\.h\.1\.attn\.adapter_wte\.weight' "
                                              r"has shape \(4, 64\), the model \(dim 128, 4 heads\) needs \(4, 128\)"):
        load_adapter(LLaMA(tiny_config(), AdapterConfig(adapter_len=4, adapter_layers=1, gate_act="identity")),
                     tmp_path / "narrow.pth")


def _official_v1(model: LLaMA) -> dict[str, torch.Tensor]:
    """The official v1 release's layout: adapter_query.weight (layers * len, dim), a (1, nh, 1, 1) gate per layer."""
    adapted = list(adapter_state_dict(model).items())
    prompts = [t for n, t in adapted if n.endswith("adapter_prompt")]
    state = {"adapter_query.weight": torch.cat(prompts).half()}  # the release is fp16
    for n in range(model.config.n_layers):
        state[f"layers.{n}.attention.gate"] = torch.zeros(1, model.config.n_heads, 1, 1)
    for n, t in adapted:
        if n.endswith("gate"):
            state[n] = t.detach().view(1, -1, 1, 1).clone()
    return state


@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_official_v1_import_equals_our_format(tmp_path, gate_act, caplog):
    adapter = AdapterConfig(adapter_len=4, adapter_layers=1, gate="head", gate_act=gate_act)
    ours = tiny_model(adapter, seed=7)
    with torch.no_grad():  # prompts that survive the release's fp16 unchanged
        for n, t in adapter_state_dict(ours).items():
            if n.endswith("adapter_prompt"):
                t.copy_(t.half().float())
    torch.save(_official_v1(ours), tmp_path / "llama_adapter_len4_layer1_release.pth")
    path = tmp_path / "llama_adapter_len4_layer1_release.pth"

    with pytest.raises(CheckpointError, match=r"release\.pth: an official LLaMA-Adapter v1 adapter needs gate_act"):
        read_adapter_config(path)
    assert read_adapter_config(path, gate_act=gate_act, adapter_len=4) == adapter
    imported = copy_base(ours, LLaMA(ours.config, adapter)).eval()
    with caplog.at_level("WARNING"):
        assert load_adapter(imported, path, gate_act=gate_act) == adapter
    assert f"gate_act='{gate_act}'" in caplog.text
    torch.testing.assert_close(logits(imported), logits(ours), atol=0, rtol=0)

    with pytest.raises(CheckpointError, match="gate_act='tanh'.*gate_act='identity'|gate_act='identity'.*'tanh'"):
        load_adapter(imported, path, gate_act="identity" if gate_act == "tanh" else "tanh")
    two_layers = LLaMA(ours.config, AdapterConfig(adapter_len=4, adapter_layers=2, gate_act=gate_act))
    with pytest.raises(CheckpointError, match=r"release\.pth: the adapter has adapter_layers=1 but the model was built "
                                              r"with adapter_layers=2"):
        load_adapter(two_layers, path, gate_act=gate_act)


def test_official_v1_per_layer_gates_load_as_gate_layer(tmp_path):
    """Files of the official code before its per-head gates: a gate of shape (1,) per layer; imported as gate="layer",
    the logits those of a model whose per-layer gates were set by hand."""
    adapter = AdapterConfig(adapter_len=4, adapter_layers=2, gate="layer", gate_act="tanh")
    want = tiny_model(adapter, seed=5)
    gates = {1: 0.8, 0: -0.6}
    g = torch.Generator().manual_seed(3)
    state = {"adapter_query.weight": torch.randn(8, 128, generator=g)}  # layers 0 then 1, bottom up
    with torch.no_grad():
        for n in (0, 1):
            want.layers[n].attention.adapter_prompt.copy_(state["adapter_query.weight"][4 * n:4 * (n + 1)])
            want.layers[n].attention.gate.fill_(gates[n])
            state[f"layers.{n}.attention.gate"] = torch.tensor([gates[n]])
    torch.save(state, tmp_path / "per_layer.pth")

    assert read_adapter_config(tmp_path / "per_layer.pth", gate_act="tanh", adapter_len=4) == adapter
    imported = copy_base(want, LLaMA(want.config, adapter)).eval()
    load_adapter(imported, tmp_path / "per_layer.pth", gate_act="tanh")
    torch.testing.assert_close(logits(imported), logits(want), atol=0, rtol=0)
    assert (logits(want) - logits(copy_base(want, LLaMA(want.config)).eval())).abs().max() > 1e-2

    state["layers.0.attention.gate"] = torch.zeros(1, 4, 1, 1)  # the two forms mixed
    torch.save(state, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed\.pth: tensor 'layers\.1\.attention\.gate' has shape \(1,\), "
                                              r"expected \(1, n_heads, 1, 1\)"):
        read_adapter_config(tmp_path / "mixed.pth", gate_act="tanh", adapter_len=4)


def test_litgpt_adapter_v1_file_loads(tmp_path):
    """litgpt's lit_model.pth.adapter as its save_adapter_checkpoint writes it ({"model": ...} of adapter_filter's
    names, gating_factor (1, 1, n_head, 1)): a gate per head, its raw value (identity); the same logits as the model
    it was written from."""
    adapter = AdapterConfig(adapter_len=4, adapter_layers=1, gate="head", gate_act="identity")
    want = tiny_model(adapter, seed=9)
    attn = want.layers[1].attention
    lit = {"transformer.h.1.attn.adapter_wte.weight": attn.adapter_prompt.detach().clone(),
           "transformer.h.1.attn.gating_factor": attn.gate.detach().view(1, 1, -1, 1).clone()}
    torch.save({"model": lit}, tmp_path / "lit_model.pth.adapter")
    assert read_adapter_config(tmp_path / "lit_model.pth.adapter") == adapter
    imported = copy_base(want, LLaMA(want.config, adapter)).eval()
    load_adapter(imported, tmp_path / "lit_model.pth.adapter")
    torch.testing.assert_close(logits(imported), logits(want), atol=0, rtol=0)


def test_peft_adaption_prompt_import(tmp_path):
    """A real PEFT adaption-prompt adapter: our import gives PEFT's own logits, and our format's after a round trip."""
    pytest.importorskip("peft")
    config = tiny_config(gqa=True)
    hf = hf_model(config, seed=11)
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft_adaption_prompt(hf)
    expected = logits(peft_model.eval())
    assert (expected - logits(hf_model(config, seed=11))).abs().max() > 1e-2  # the adapter does something
    peft_model.save_pretrained(tmp_path / "peft")

    adapter = read_adapter_config(tmp_path / "peft")
    assert adapter == AdapterConfig(adapter_len=4, adapter_layers=1, gate="layer", gate_act="identity")
    model = load_checkpoint(tmp_path / "base", adapter=adapter)
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)

    weights = next((tmp_path / "peft").glob("adapter_model.*"))  # the weights file alone works too
    other = load_checkpoint(tmp_path / "base", adapter=adapter)
    load_adapter(other, weights)
    torch.testing.assert_close(logits(other), expected, atol=1e-4, rtol=1e-4)

    save_adapter(model, tmp_path / "ours.safetensors")
    again = load_checkpoint(tmp_path / "base", adapter=read_adapter_config(tmp_path / "ours.safetensors"))
    load_adapter(again, tmp_path / "ours.safetensors")
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)

    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: the adapter has gate='layer' \(tensor "
                                              r"'.*layers\.1\.self_attn\.adaption_gate'\)"):
        load_adapter(load_checkpoint(tmp_path / "base", adapter=AdapterConfig(adapter_len=4, adapter_layers=1,
                                                                               gate_act="identity")), weights)


def test_save_adapter_peft_format_loads_in_peft(tmp_path):
    """save_adapter(format="peft"): a folder PEFT's own PeftModel.from_pretrained loads onto the HF base, giving our
    logits (a trained-looking adapter: nonzero per-layer gates in two layers of a GQA model); load_adapter reads it
    back exactly; adapters PEFT cannot express are refused before anything is written; never over a folder by
    accident."""
    peft = pytest.importorskip("peft")
    config = tiny_config(gqa=True)
    hf_model(config, seed=12).save_pretrained(tmp_path / "base")
    adapter = AdapterConfig(adapter_len=4, adapter_layers=2, gate="layer", gate_act="identity")
    model = load_checkpoint(tmp_path / "base", adapter=adapter).eval()
    set_adapter_(model, seed=3, gate_scale=1.0)
    assert all(abs(float(m.attention.gate.detach())) > 0.1 for m in model.layers)
    folder = save_adapter(model, tmp_path / "out" / "peft", format="peft", base_model_name_or_path="tiny/base")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.loads((folder / "adapter_config.json").read_text())
    assert {k: written[k] for k in ("peft_type", "adapter_len", "adapter_layers", "target_modules", "task_type",
                                    "base_model_name_or_path")} == {
        "peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 2, "target_modules": "self_attn",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny/base"}

    theirs = peft.PeftModel.from_pretrained(hf_model(config, seed=12), folder).eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-4, rtol=1e-4)
    base = logits(hf_model(config, seed=12))
    assert (logits(theirs) - base).abs().max() > 1e-2  # PEFT did load the adapter
    again = load_checkpoint(tmp_path / "base", adapter=read_adapter_config(folder))
    load_adapter(again, folder)
    torch.testing.assert_close(logits(again), logits(model), atol=0, rtol=0)

    with pytest.raises(FileExistsError, match=r"peft exists; pass overwrite=True"):
        save_adapter(model, folder, format="peft")
    (folder / "README.md").write_text("mine")
    with torch.no_grad():
        model.layers[1].attention.gate.fill_(0.25)
    save_adapter(model, folder, format="peft", overwrite=True)
    assert (folder / "README.md").read_text() == "mine"  # the user's other files stay
    assert float(next(v for k, v in peft.utils.load_peft_weights(str(folder)).items() if "1.self_attn.adaption_gate"
                      in k)) == 0.25
    for bad in (dict(gate="head"), dict(gate="layer", gate_act="tanh"),
                dict(gate="layer", gate_act="identity", version=2)):
        key = next(k for k in ("version", "gate_act", "gate") if k in bad and bad[k] != getattr(adapter, k))
        other = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1, **bad))
        with pytest.raises(ValueError, match=rf"not written in PEFT's format: the adapter has {key}="):
            save_adapter(other, tmp_path / "refused", format="peft")
        assert not (tmp_path / "refused").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_peft_format_file_checks(tmp_path):
    """PEFT's layout written by hand: wrong layers and a lying adapter_config.json are named."""
    model = tiny_model(AdapterConfig(adapter_len=4, adapter_layers=1, gate="layer", gate_act="identity"))
    prefix = "base_model.model.model.layers"
    good = {f"{prefix}.1.self_attn.adaption_prompt": torch.randn(1, 4, 128),
            f"{prefix}.1.self_attn.adaption_gate": torch.tensor([0.3])}
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(good, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_len": 4,
                                                            "adapter_layers": 1}))
    load_adapter(model, folder)
    prompt = good[f"{prefix}.1.self_attn.adaption_prompt"][0]
    torch.testing.assert_close(model.layers[1].attention.adapter_prompt, prompt)

    save_file({k.replace(".1.", ".0."): v for k, v in good.items()}, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: the adapter is for layers \[0\]"):
        load_adapter(model, folder)

    save_file(good, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_len": 10,
                                                            "adapter_layers": 1}))
    with pytest.raises(CheckpointError, match="adapter_config.json says adapter_len=10 but the weights hold 4"):
        load_adapter(model, folder)

    save_file({"lora_A.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match=r"lora\.safetensors: not a LLaMA-Adapter file"):
        load_adapter(model, tmp_path / "lora.safetensors")


def test_model_fresh_adapter_set_adapter_changes_logits():
    """set_adapter_ (used throughout) really changes the model: loads below are not trivially equal."""
    model = tiny_model(ADAPTER)
    base = copy_base(model, LLaMA(model.config)).eval()
    assert (logits(model) - logits(base)).abs().max() > 1e-2
    set_adapter_(model, gate_scale=0.0)
    torch.testing.assert_close(logits(model), logits(base), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Untrusted values: every parsed config value and adapter tensor is checked


def _hf_config_json(**changes) -> dict:
    config = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": False}
    config.update(changes)
    return config


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "'num_attention_heads': LLaMAConfig.n_heads must be an integer >= 1, got 0"),
    ({"num_key_value_heads": 3}, "'num_key_value_heads': LLaMAConfig.n_heads (4) must be a multiple of n_kv_heads (3)"),
    ({"hidden_size": 130}, "'hidden_size': LLaMAConfig.dim (130) must be n_heads (4) times an even head_dim"),
    ({"rms_norm_eps": -1}, "'rms_norm_eps': LLaMAConfig.norm_eps must be a finite number > 0, got -1"),
    ({"rope_theta": 0}, "'rope_theta': LLaMAConfig.rope_theta must be a finite number > 0, got 0"),
    ({"rope_theta": float("nan")}, "'rope_theta': LLaMAConfig.rope_theta must be a finite number > 0, got nan"),
    ({"rope_parameters": {"rope_theta": float("inf")}}, "'rope_parameters.rope_theta': LLaMAConfig.rope_theta"),
    ({"hidden_size": "128"}, "'hidden_size': LLaMAConfig.dim must be an integer >= 1, got '128'"),
    ({"vocab_size": 96.0}, "'vocab_size': LLaMAConfig.vocab_size must be an integer >= 1, got 96.0"),
    ({"max_position_embeddings": True}, "'max_position_embeddings': LLaMAConfig.max_seq_len must be an integer"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings': LLaMAConfig.tie_embeddings must be True or False"),
    ({"rope_scaling": "yes"}, "'rope_scaling' must be a JSON object or null, got 'yes'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}},
     "'rope_scaling.factor': RopeScaling.factor must be a finite number > 0, got '8'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}},
     "'rope_scaling.high_freq_factor': RopeScaling.high_freq_factor must be a finite number > 4, got 4.0"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2}}, "rope_scaling.rope_type='dynamic' is not supported"),
])
def test_hf_config_values_are_checked_and_named_by_their_key(tmp_path, changes, message):
    """Zero heads once gave a ZeroDivisionError, a negative eps NaN logits, strings a TypeError without the file."""
    (tmp_path / "config.json").write_text(json.dumps(_hf_config_json(**changes)))
    with pytest.raises(CheckpointError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ") and message in str(info.value)


@pytest.mark.parametrize("changes, message", [
    ({"multiple_of": 0}, "'multiple_of': LLaMAConfig.multiple_of must be an integer >= 1, got 0"),
    ({"n_heads": 0}, "'n_heads': LLaMAConfig.n_heads must be an integer >= 1, got 0"),
    ({"norm_eps": "1e-5"}, "'norm_eps': LLaMAConfig.norm_eps must be a finite number > 0, got '1e-5'"),
    ({"ffn_dim_multiplier": -1.3}, "'ffn_dim_multiplier': LLaMAConfig.ffn_dim_multiplier must be a finite number"),
    ({"use_scaled_rope": "yes"}, "'use_scaled_rope' must be true or false, got 'yes'"),
    ({"use_scaled_rope": True, "rope_scaling_factor": float("nan")},
     "'rope_scaling_factor': RopeScaling.factor must be a finite number > 0, got nan"),
])
def test_meta_params_values_are_checked_and_named_by_their_key(tmp_path, changes, message):
    params = {"dim": 128, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps({**params, **changes}))
    torch.save({"tok_embeddings.weight": torch.zeros(VOCAB, 128)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'params.json'}: ") and message in str(info.value)
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert load_config(tmp_path).vocab_size == VOCAB  # the file without the change loads


def test_adapter_metadata_and_tensors_are_checked(tmp_path):
    """Bad metadata once gave an AttributeError; NaN, Inf or integer tensors loaded (and generated token 0)."""
    model = tiny_model(ADAPTER)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def write(name: str, tensors: dict = tensors, **meta: str):
        save_file(tensors, tmp_path / name, {**metadata, **meta})
        return tmp_path / name

    for meta, message in ((dict(model="[1,2]"), r"metadata 'model' must be a JSON object, got '\[1,2\]'"),
                          (dict(model='{"dim": "128"}'), r"metadata 'model' must give dim as an integer >= 1, got "
                                                         r"'128'"),
                          (dict(model="{"), r"metadata has no valid JSON 'model' entry"),
                          (dict(adapter_config="[4]"), r"metadata 'adapter_config' must be a JSON object"),
                          (dict(adapter_config='{"adapter_len": 0}'),
                           r"metadata .adapter_config. is not valid \(AdapterConfig\.adapter_len must be a positive")):
        bad = write("meta.safetensors", **meta)
        for read in (read_adapter_config, lambda p: load_adapter(model, p)):
            with pytest.raises(CheckpointError, match=rf"meta\.safetensors: its {message}"):
                read(bad)

    gate = "layers.1.attention.gate"
    for value, message in ((torch.tensor([0.1, float("nan"), 0.2, float("inf")]),
                            r"holds 2 non-finite value\(s\) \(NaN or Inf\) of 4"),
                           (torch.zeros(4, dtype=torch.int32), "is torch.int32; an adapter's tensors are floating")):
        bad = write("bad.safetensors", {**tensors, gate: value})
        with pytest.raises(CheckpointError, match=rf"bad\.safetensors: tensor '{gate}' {message}"):
            load_adapter(model, bad)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with pytest.raises(CheckpointError, match="non-finite"):  # the official release's layout too
        official = _official_v1(model)
        official["adapter_query.weight"][0, 0] = float("nan")
        torch.save(official, tmp_path / "release.pth")
        load_adapter(model, tmp_path / "release.pth", gate_act="tanh")
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(model).items())  # nothing half-loaded

    # and save_adapter writes no file that load_adapter would refuse
    with torch.no_grad():
        model.layers[1].attention.gate[0] = float("inf")
    with pytest.raises(ValueError, match=rf"not written: tensor '{gate}' holds 1 non-finite"):
        save_adapter(model, tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()


def test_shards_named_outside_the_checkpoint_folder_are_refused(tmp_path):
    """A shard index may name only files in its folder (links there, as in the Hugging Face cache, are followed)."""
    from llama_adapter_triton.model.cli import cli_message

    model = tiny_model()
    save_checkpoint(model, tmp_path / "elsewhere")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "elsewhere" / "config.json").read_text())
    with safe_open(tmp_path / "elsewhere" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    for shard in ("../elsewhere/model.safetensors", str(tmp_path / "elsewhere" / "model.safetensors")):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
        with pytest.raises(CheckpointError, match=rf"index\.json: lists shard '{shard}', outside the checkpoint "
                                                  r"folder .*ckpt; refused unless you pass allow_external_files=True"
                                   ) as info:
            load_config(folder)
        assert cli_message(info.value).endswith("refused unless you pass --allow-external-files")
        loaded = load_checkpoint(folder, allow_external_files=True)
        torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, "model.safetensors")}))
    torch.testing.assert_close(logits(load_checkpoint(folder)), logits(model), atol=0, rtol=0)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, 7)}))
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor names to shard files, got 7"):
        load_config(folder)


def test_adapter_metadata_meets_the_tensors_and_the_model_before_anything_is_allocated(tmp_path):
    """adapter_len=10**9 in a 21 KB file once made generate allocate 512 GB, n_layers=10**6 built a meta model for
    113 s: every metadata number is checked against the file's tensors as it is read, and against the model
    (read_adapter_config(model=)) before the model is built."""
    model = tiny_model(ADAPTER)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def write(entry: str, **changes) -> os.PathLike:
        save_file(tensors, tmp_path / "bad.safetensors",
                  {**metadata, entry: json.dumps({**json.loads(metadata[entry]), **changes})})
        return tmp_path / "bad.safetensors"

    for entry, changes, message in (
            ("adapter_config", dict(adapter_len=10**9), r"tensor 'layers\.1\.attention\.adapter_prompt' has shape "
                                                        r"\(4, 128\), but its metadata .* it \(1000000000, 128\)"),
            ("model", dict(dim=2**20), r"tensor '.*' has shape \(4, 128\), but its metadata .* it \(4, 1048576\)"),
            ("model", dict(n_layers=10**6), r"its metadata 'model' says n_layers=1000000, but its tensors name 1 "
                                            r"layers, 1\.\.1")):
        with pytest.raises(CheckpointError, match=rf"bad\.safetensors: {message}"):
            read_adapter_config(write(entry, **changes))
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors: the adapter was trained on a model with "
                                              r"n_layers=2, this model has 3"):
        read_adapter_config(path, model=tiny_config(n_layers=3))
    assert read_adapter_config(path, model=tiny_config()) == ADAPTER


def test_malformed_adapter_files_are_named_not_crashes(tmp_path):
    """Each of these once crashed an importer (ValueError, ZeroDivisionError, KeyError, TypeError,
    NotImplementedError) or loaded silently; each is now a CheckpointError naming the file and what is wrong."""
    lit_gate = torch.zeros(1, 1, 4, 1)
    v2 = {f"transformer.h.0.{linear}.adapter_{kind}": torch.zeros(24) for kind in ("bias", "scale")
          for linear in ("attn.qkv", "attn.proj", "mlp.fc_1", "mlp.fc_2", "mlp.proj")}
    v2 |= {"transformer.h.0.norm_1.weight": torch.ones(8), "transformer.h.0.norm_2.weight": torch.ones(8),
           "transformer.h.0.attn.adapter_wte.weight": torch.zeros(4, 8),
           "transformer.h.0.attn.gating_factor": torch.zeros(1, 1, 16, 1)}
    layer = {f"llama.layers.0.{name}": torch.zeros(8) for name in (
        "attention_norm.weight", "ffn_norm.weight", "attention.wq.bias", "attention.wo.bias", "feed_forward.w1.bias",
        "feed_forward.w2.bias", "feed_forward.w3.bias")} | {"llama.layers.0.attention.gate": torch.zeros(1, 2, 1, 1)}
    official = {"adapter_query.weight": torch.zeros(2, 8), "visual_query.weight": torch.zeros(2, 8),
                "llama.norm.weight": torch.ones(8)}
    wte = r"tensor 'transformer\.h\.[01]\.attn\.adapter_wte\.weight' has shape \(%s\); it must be \(adapter_len, "
    cases = [
        ({"model": {"transformer.h.1.attn.adapter_wte.weight": torch.zeros(4), "transformer.h.1.attn.gating_factor":
                    lit_gate}}, wte % "4,"),
        ({"model": {"transformer.h.1.attn.adapter_wte.weight": torch.zeros(1, 4, 128),
                    "transformer.h.1.attn.gating_factor": lit_gate}}, wte % "1, 4, 128"),
        ({"model": v2}, wte % "4, 8" + r"n_embd\), n_embd a multiple of the gating factor.s 16 heads"),  # > dim
        ({"model": {**official, "visual_query.weight": torch.zeros(0, 8)}, "config": {}},
         r"an official V2 file needs adapter_query\.weight .* got \(2, 8\) and \(0, 8\)"),
        ({"model": {**official, "adapter_query.weight": torch.zeros(0, 8)}, "config": {}},
         r"an official V2 file needs adapter_query\.weight .* got \(0, 8\) and \(2, 8\)"),
        ({"model": official, "config": {}}, r"an official V2 file needs llama\.norm\.weight and 1 adapted layers of 0"),
        ({"model": {**official, **layer, "clip_proj.weight": torch.zeros(8, 4),
                    "visual_blocks.x.norm1.weight": torch.ones(8)}, "config": {}},
         r"unexpected tensor 'visual_blocks\.x\.norm1\.weight'"),
        ({1: torch.zeros(2)}, r"expected a dict of tensors by name, but a key is int 1"),
    ]
    for i, (blob, message) in enumerate(cases):
        torch.save(blob, tmp_path / f"case{i}.pth")
        with pytest.raises(CheckpointError, match=rf"case{i}\.pth: {message}"):
            read_adapter_config(tmp_path / f"case{i}.pth", gate_act="identity")

    prefix = "base_model.model.model.layers"
    save_file({f"{prefix}.1.self_attn.adaption_prompt": torch.randn(1, 4, 128).to(torch.float8_e4m3fn),
               f"{prefix}.1.self_attn.adaption_gate": torch.tensor([0.3])}, tmp_path / "f8.safetensors")
    with pytest.raises(CheckpointError, match=r"f8\.safetensors: tensor '.*adaption_prompt' is torch\.float8_e4m3fn; "
                                              r"an adapter's tensors are floating point \(float16, bfloat16, float32"):
        read_adapter_config(tmp_path / "f8.safetensors")
    deep = {f"{prefix}.{n}.self_attn.adaption_{kind}": torch.randn(shape) for n in range(5)
            for kind, shape in (("prompt", (1, 4, 128)), ("gate", (1,)))}
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(deep, folder / "adapter_model.safetensors")
    peft_config = {"peft_type": "ADAPTION_PROMPT", "adapter_len": 4, "adapter_layers": 5, "target_modules": "self_attn",
                   "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: the adapter has 5 adapted layers; this "
                                              r"model has 2 layers"):
        read_adapter_config(folder, model=tiny_config())
    for key, value in (("target_modules", "mlp"), ("target_modules", 5), ("task_type", "SEQ_CLS")):
        (folder / "adapter_config.json").write_text(json.dumps({**peft_config, key: value}))
        with pytest.raises(CheckpointError, match=rf"adapter_config\.json has {key} {re.escape(repr(value))}; a "
                                                  "LLaMA's adaption prompt has"):
            read_adapter_config(folder)
