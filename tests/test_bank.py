"""The adapter bank (model/bank.py): a batch mixing adapters (V1 and V2, several gate modes and prompt lengths) and
rows with none equals each row run alone with its own adapter, at the prefill and every decode step; bad ids,
missing adapters, adapters for another base: clear errors."""

from __future__ import annotations

import pytest
import torch
from model_utils import VOCAB, randomize_, tiny_config

from llama_adapter_triton import AdapterConfig, CheckpointError, LLaMA, save_adapter, set_attention_impl
from llama_adapter_triton.model.adapter import adapter_state_dict, base_name
from llama_adapter_triton.model.bank import AdapterBank

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32: the op's bar against the reference (tests/test_llama.py)
ADAPTERS = {  # adapter_len 4 but "short" (3): two prompt lengths in one batch
    "v1": AdapterConfig(adapter_len=4, adapter_layers=1),
    "v1-layer-gate": AdapterConfig(adapter_len=4, adapter_layers=2, gate="layer", gate_act="identity"),
    "v2": AdapterConfig(adapter_len=4, adapter_layers=1, version=2, output_bias_scale=True),
    "v2-input": AdapterConfig(adapter_len=4, adapter_layers=2, version=2, scale="input"),
    "short": AdapterConfig(adapter_len=3, adapter_layers=2),
}


@torch.no_grad()
def adapted(base: LLaMA, config: AdapterConfig, seed: int) -> LLaMA:
    """The base with an adapter whose every parameter is random (gates, V2's biases, scales and norms)."""
    model = LLaMA(base.config, config).eval()
    own = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if base_name(name) in own:
            p.copy_(own[base_name(name)])
    g = torch.Generator().manual_seed(seed)
    for name, p in adapter_state_dict(model).items():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(noise if name.endswith("adapter_prompt") else
                noise * 0.5 if name.endswith("gate") else
                noise * 0.1 if name.endswith(".bias") else p + noise * 0.1)  # scales and norms near theirs
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bank")
    base = randomize_(LLaMA(tiny_config(gqa=True)), 0).eval()
    models, files = {}, {}
    for seed, (name, config) in enumerate(ADAPTERS.items(), 1):
        models[name] = adapted(base, config, seed)
        set_attention_impl(models[name], "eager")  # the references: the official formulation, the op's oracle
        files[name] = save_adapter(models[name], tmp / f"{name}.safetensors")
    bank = AdapterBank(base, files)
    return base, bank, models, files


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def logits_per_step(model: LLaMA, prompts: list[list[int]], steps: list[list[int]]) -> list[torch.Tensor]:
    """Last-position logits (B, vocab) of a left-padded prefill, then of a decode step per list of next tokens."""
    longest = max(len(p) for p in prompts)
    left_pad = [longest - len(p) for p in prompts]
    model.setup_cache(len(prompts), longest + len(steps))
    try:
        out = [model(torch.tensor([[0] * n + p for n, p in zip(left_pad, prompts, strict=True)]), input_pos=0,
                     left_pad=left_pad, logits_at=-1)]
        for i, tokens in enumerate(steps):
            out.append(model(torch.tensor(tokens).unsqueeze(1), input_pos=longest + i, left_pad=left_pad,
                             logits_at=-1))
    finally:
        model.clear_cache()
    return out


def test_mixed_batch_equals_each_row_alone(setup):
    base, bank, models, _ = setup
    ids = ["v1", None, "v2", "v1-layer-gate", "v2-input", "short"]
    prompts = [prompt(3 + b % 3, seed=b) for b in range(len(ids))]
    steps = [prompt(len(ids), seed=100 + i) for i in range(2)]
    with bank.rows(ids):
        batch = logits_per_step(base, prompts, steps)
    for b, name in enumerate(ids):
        alone = logits_per_step(base if name is None else models[name], [prompts[b]], [[s[b]] for s in steps])
        for step, (got, want) in enumerate(zip(batch, alone, strict=True)):
            torch.testing.assert_close(got[b:b + 1], want, **TOL, msg=f"row {b} ({name}), step {step}")
    assert all(layer.attention.row_attend is None for layer in base.layers)  # the base is the base again
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_one_adapter_for_all_rows_and_rows_without(setup):
    base, bank, models, _ = setup
    tokens = torch.tensor([prompt(6, seed=1), prompt(6, seed=2)])
    with torch.no_grad():
        with bank.rows(["v2", "v2"]):
            torch.testing.assert_close(base(tokens), models["v2"](tokens), **TOL)
        alone = base(tokens)
        with bank.rows([None, None]):
            assert torch.equal(base(tokens), alone)
        with bank.rows([1, "v1"]):  # a position in the bank (the order of adding) names an adapter too
            got = base(tokens)
        torch.testing.assert_close(got[:1], models["v1-layer-gate"](tokens[:1]), **TOL)
        torch.testing.assert_close(got[1:], models["v1"](tokens[1:]), **TOL)


def test_prompt_kv_computed_once_per_adapter_and_layer(setup, monkeypatch):
    base, bank, _, _ = setup
    calls = []
    wk = base.layers[1].attention.wk
    monkeypatch.setattr(wk, "forward", lambda x, f=wk.forward: calls.append(x.shape) or f(x))
    bank._kv.clear()
    with torch.no_grad(), bank.rows(["v1", "v1", "short", "v1", None]):
        base(torch.tensor([prompt(4, seed=b) for b in range(5)]))
    with torch.no_grad(), bank.rows(["short", "v1"]):
        base(torch.tensor([prompt(4, seed=b) for b in range(2)]))
    prompt_calls = [s for s in calls if s[1] in (3, 4) and s[0] == 1]
    assert sorted(s[1] for s in prompt_calls) == [3, 4]  # each adapter's prompt once, not per row or per batch


def test_errors_name_the_id_and_the_file(setup, tmp_path):
    base, bank, models, files = setup
    with pytest.raises(ValueError, match=r"adapter id 'nope' is not in the adapter bank"):
        with bank.rows(["v1", "nope"]):
            pass
    with pytest.raises(ValueError, match=r"adapter id 9 is not in the adapter bank"):
        with bank.rows([9]):
            pass
    with pytest.raises(ValueError, match="set for a batch of 2 rows, this forward has 3"), torch.no_grad():
        with bank.rows(["v1", None]):
            base(torch.tensor([prompt(4, seed=b) for b in range(3)]))
    with pytest.raises(CheckpointError, match=r"adapter 'gone': .*missing\.safetensors: cannot be read"):
        AdapterBank(base).add("gone", tmp_path / "missing.safetensors")
    other = LLaMA(tiny_config(gqa=False), AdapterConfig(adapter_len=4, adapter_layers=1))  # 4 kv heads, not 2
    save_adapter(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter 'other': .*other\.safetensors.*n_kv_heads=4"):
        AdapterBank(base).add("other", tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="without an adapter"):
        AdapterBank(models["v1"])


def test_official_release_gate_act_and_prompt_length(setup, tmp_path):
    """The official v1 release's .pth joins a bank with its gate_act; a prompt length that does not divide its
    prompts (or no gate_act) is an error naming the adapter and the file."""
    base, _, models, _ = setup
    state = adapter_state_dict(models["v1"])
    release = {"adapter_query.weight": state["layers.1.attention.adapter_prompt"].detach().clone()}
    for n in range(2):
        release[f"layers.{n}.attention.gate"] = state["layers.1.attention.gate"].detach().view(1, -1, 1, 1).clone()
    torch.save(release, tmp_path / "release.pth")
    bank = AdapterBank(base)
    with pytest.raises(CheckpointError, match=r"adapter 'rel': .*release\.pth: .*needs gate_act"):
        bank.add("rel", tmp_path / "release.pth")
    with pytest.raises(CheckpointError, match=r"adapter 'rel': .*release\.pth: .*adapter_len 3"):
        bank.add("rel", tmp_path / "release.pth", gate_act="tanh", adapter_len=3)
    bank.add("rel", tmp_path / "release.pth", gate_act="tanh", adapter_len=4)
    tokens = torch.tensor([prompt(5, seed=3)])
    with torch.no_grad(), bank.rows(["rel"]):
        torch.testing.assert_close(base(tokens), models["v1"](tokens), **TOL)


def test_remove_and_replace_drop_the_cached_prompts(setup):
    base, _, _, files = setup
    bank = AdapterBank(base, {"a": files["v1"]})
    with torch.no_grad(), bank.rows(["a"]):
        first = base(torch.tensor([prompt(4, seed=0)]))
    bank.add("a", files["short"])  # replaced: its cached keys and values go with it
    with torch.no_grad(), bank.rows(["a"]):
        second = base(torch.tensor([prompt(4, seed=0)]))
    assert not torch.allclose(first, second)
    bank.remove("a")
    assert "a" not in bank and not bank._kv


def test_official_v2_chat_release_in_a_bank(setup, tmp_path):
    """The official V2 chat release (bias, scale and norm tuning, no prompts, no final norm in the file) joins a bank
    beside a V1 adapter: its row equals the release loaded alone, the V1 row its own adapter."""
    from test_adapter_v2 import _official_chat_file

    from llama_adapter_triton import load_adapter, read_adapter_config

    base, _, models, files = setup
    torch.save({"model": _official_chat_file(base)}, tmp_path / "chat.pth")
    bank = AdapterBank(base, {"chat": tmp_path / "chat.pth", "v1": files["v1"]})
    alone = adapted(base, read_adapter_config(tmp_path / "chat.pth"), seed=0)
    with torch.no_grad():
        alone.norm.weight.copy_(base.norm.weight)  # the file has no final norm: the base's stays, as in the bank
    load_adapter(alone, tmp_path / "chat.pth")
    tokens = torch.tensor([prompt(5, seed=3), prompt(5, seed=4)])
    with torch.no_grad(), bank.rows(["chat", "v1"]):
        got = base(tokens)
    with torch.no_grad():
        torch.testing.assert_close(got[:1], alone(tokens[:1]), **TOL)
        torch.testing.assert_close(got[1:], models["v1"](tokens[1:]), **TOL)
