"""No recompiles inside timed steps: the kernels' compile keys do not depend on how many tokens a step has.

Triton compiles a kernel once per key of its launches (JITFunction.run): every argument specialised by Triton's own
binder (a runtime int by whether it is 1 and whether it divides by 16, a pointer by its alignment), the constexprs
and the launch options. A length that changes from step to step (a packed batch's totals and longest sequence, the
KV cache's length in generation) must be do_not_specialize, or a fine-tuning run compiles up to 16 variants of each
kernel during its first epoch (1-3 s each on a GPU), inside a benchmark's timed steps.

The launches are recorded, not run (kernels.compile_check.recording: fast, and the same on a GPU), and keyed as a
GPU's JIT cache would key them for sm_90 (compile_check.launch_key), with the block sizes an H100 gets. The sequences
are at least 128 tokens long at their longest: below that the policy picks smaller query blocks by powers of two
(block_sizes.default_blocks), a handful of variants by design, not one per length.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from llama_adapter_triton import AdapterConfig, LLaMA, LLaMAConfig
from llama_adapter_triton.kernels import block_sizes
from llama_adapter_triton.kernels import zero_init_attn as zia
from llama_adapter_triton.kernels.compile_check import KERNELS, launch_key, recording
from llama_adapter_triton.model.adapter import mark_only_adapter_as_trainable


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The block sizes the launchers choose on an H100, not the interpreter's large ones."""
    monkeypatch.setattr(block_sizes, "INTERPRET_BLOCKS", "gpu")


def model() -> LLaMA:
    """Two adapted layers of three (the lower one needs only the prompt's gradients), GQA, bf16."""
    torch.manual_seed(0)
    config = LLaMAConfig(name="recompiles", dim=32, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=32,
                         multiple_of=16, max_seq_len=2048)
    m = LLaMA(config, AdapterConfig(adapter_len=3, adapter_layers=2)).to(torch.bfloat16)
    mark_only_adapter_as_trainable(m)
    return m


def keys(launches) -> dict[str, set[str]]:
    """kernel name -> the compile keys its launches had."""
    out = defaultdict(set)
    for launch in launches:
        out[launch.kernel.__name__].add(launch_key(launch))
    return out


def new_compiles(warm: dict[str, set[str]], later: dict[str, set[str]]) -> dict[str, int]:
    return {name: len(k - warm.get(name, set())) for name, k in later.items() if k - warm.get(name, set())}


def test_packed_batches_of_any_total_compile_nothing_after_warmup(gpu_blocks):
    """Fine-tuning on packed batches: after one warm-up step, 20 steps of random totals and longest sequences add
    no compile to any kernel (before do_not_specialize, each of fwd, pre, dkdv, dq and the prompt-gradient sum got
    a new one whenever a length crossed a multiple of 16)."""
    m = model()
    g = torch.Generator().manual_seed(0)

    def step():
        lengths = torch.randint(1, 193, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        lengths[0] = torch.randint(128, 193, (1,), generator=g)  # the longest: >= 128 (see the module docstring)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        tokens = torch.randint(0, 32, (1, int(cu[-1])), generator=g)
        m(tokens, cu_seqlens=cu, max_seqlen=int(lengths.max())).float().sum().backward()
        return int(cu[-1])

    with recording(zia) as launches:
        step()
        warm = keys(launches)
        launches.clear()
        totals = {step() for _ in range(20)}
        later = keys(launches)
    assert set(warm) == set(KERNELS) == set(later), (sorted(warm), sorted(later))
    assert len({t % 16 for t in totals}) > 1, totals  # the totals do cross multiples of 16
    assert not new_compiles(warm, later), f"new compiles after warm-up, per kernel: {new_compiles(warm, later)}"


def test_decode_steps_compile_nothing_after_the_first(gpu_blocks):
    """Generation: a left-padded batch of two prompts, then 20 decode steps with the KV cache's length growing from
    31 to 51 tokens add no compile after the prefill and the first decode step."""
    m = model().eval()
    g = torch.Generator().manual_seed(1)
    m.setup_cache(2, 128)
    with torch.no_grad(), recording(zia) as launches:
        m(torch.randint(0, 32, (2, 30), generator=g), input_pos=0, left_pad=[0, 7], logits_at=-1)
        m(torch.randint(0, 32, (2, 1), generator=g), input_pos=30, left_pad=[0, 7], logits_at=-1)
        warm = keys(launches)
        launches.clear()
        for pos in range(31, 51):
            m(torch.randint(0, 32, (2, 1), generator=g), input_pos=pos, left_pad=[0, 7], logits_at=-1)
        later = keys(launches)
    assert set(later) == {"_zia_fwd_kernel"}, sorted(later)
    assert not new_compiles(warm, later), f"new compiles after warm-up, per kernel: {new_compiles(warm, later)}"
