"""bench/memory.py: TensorMemory counts tensor storage as it comes and goes; MemoryPlan's prediction of a fine-tuning
step matches what the process allocates for tensors on the CPU (TensorMemory) within 15%, for fp32 / bf16 / nf4 /
int8 bases, with and without activation checkpointing, chunked or plain loss; checkpointing keeps nothing below the
first adapted block and only the blocks' inputs above it."""

from __future__ import annotations

import pytest
import torch
from model_utils import randomize_

import llama_adapter_triton.model.llama as llama
from llama_adapter_triton import AdapterConfig, LLaMA, LLaMAConfig, cast_base, mark_only_adapter_as_trainable
from llama_adapter_triton.bench.memory import MemoryPlan, TensorMemory, model_tensors
from llama_adapter_triton.model.quantize import quantize_model
from llama_adapter_triton.train.finetune import batch_loss_sum
from llama_adapter_triton.train.optim import param_groups

CONFIG = LLaMAConfig(name="mem", dim=64, n_layers=3, n_heads=2, vocab_size=1000, multiple_of=64, norm_eps=1e-5,
                     max_seq_len=256)


def test_tensor_memory_counts_storages_once_and_their_release():
    kept = torch.zeros(1000)
    with TensorMemory(existing=[kept, kept[10:]]) as mem:
        assert mem.current == 4000  # a view shares its storage
        a = torch.ones(250)
        b = a[5:]  # no new storage
        del a
        assert mem.current == 5000
        del b
        assert mem.current == 4000
        (torch.ones(500) * 2).sum()  # two temporaries of 2000 bytes, one after the other
    assert mem.peak == 4000 + 2000 + 2000 and mem.current == 4000


def _batch(tokens: int, seqs: int, vocab: int) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(0)
    lengths = [tokens // seqs] * seqs
    labels = torch.full((1, tokens), -100)
    for i in range(seqs):  # the second half of each sequence is its response
        end = (i + 1) * lengths[0]
        labels[0, end - lengths[0] // 2:end] = torch.randint(0, vocab, (lengths[0] // 2,), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = dict(tokens=torch.randint(0, vocab, (1, tokens), generator=g), labels=labels, cu_seqlens=cu,
                 max_seqlen=lengths[0], positions=torch.cat([torch.arange(n) for n in lengths]))
    return batch, int((labels != -100).sum())


@pytest.mark.parametrize("base, checkpointing, loss", [("fp32", False, "chunked"), ("bf16", True, "chunked"),
                                                        ("nf4", False, "full"), ("int8", True, "chunked")])
def test_plan_matches_the_measured_peak_within_15_percent(base, checkpointing, loss):
    torch.manual_seed(0)
    model = randomize_(LLaMA(CONFIG, AdapterConfig(adapter_len=10, adapter_layers=2)))
    cast_base(model, torch.float32 if base == "fp32" else torch.bfloat16)
    if base in ("nf4", "int8"):
        quantize_model(model, base)
    mark_only_adapter_as_trainable(model)
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-3)
    batch, targets = _batch(128, 2, CONFIG.vocab_size)
    with TensorMemory(existing=model_tensors(model)) as mem:
        weights = mem.current
        for _ in range(2):  # the second step with AdamW's state
            batch_loss_sum(model, batch, torch.device("cpu"), loss_impl=loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    plan = MemoryPlan(CONFIG, base=base, tokens=128, targets=targets, adapter_layers=2, checkpointing=checkpointing,
                      chunked_loss=loss == "chunked", device="cpu")
    assert plan.weights() == weights
    step = plan.total() - plan.weights()
    assert step == pytest.approx(mem.peak - weights, rel=0.15), plan.parts()
    assert plan.total() == pytest.approx(mem.peak, rel=0.15)


def test_checkpointing_recomputes_the_adapted_blocks_only(monkeypatch):
    calls = []
    real = llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda layer, *args, **kwargs: calls.append(layer) or real(
        layer, *args, **kwargs))
    torch.manual_seed(0)
    model = randomize_(LLaMA(CONFIG, AdapterConfig(adapter_len=4, adapter_layers=2)))
    mark_only_adapter_as_trainable(model)
    model.activation_checkpointing = True
    batch, _ = _batch(64, 2, CONFIG.vocab_size)
    batch_loss_sum(model, batch, torch.device("cpu")).backward()
    assert calls == list(model.layers[1:])  # not layer 0, below the first adapted layer: no activations there
    with torch.no_grad():  # inference: nothing to recompute
        batch_loss_sum(model, batch, torch.device("cpu"))
    assert len(calls) == 2


def test_plan_of_the_issue_targets():
    """The README's numbers: 7B in nf4 on 512-token examples under 8 GB; 70B in nf4 on one H200 with
    checkpointing."""
    seven = MemoryPlan(LLaMAConfig.from_name("llama2-7b"), base="nf4", tokens=512, targets=282)
    assert 3.5 * 2**30 < seven.weights() < 3.7 * 2**30 and seven.total() < 8e9
    seventy = MemoryPlan(LLaMAConfig.from_name("llama2-70b"), base="nf4", tokens=16384, targets=9011,
                         checkpointing=True)
    assert seventy.total() < 141e9 < MemoryPlan(LLaMAConfig.from_name("llama2-70b"), base="nf4").total()
