"""backend="tma": the Hopper forward on tensor descriptors (kernels/zero_init_attn_tma.py), with the existing backward.

Under Triton's interpreter (on a CPU) the descriptors run as TMA would run them (zero fill past the bounds, clipped
stores, TMA's alignment rules); warp specialization is ignored there, so the compiled kernel is checked apart, for
sm_90 (the slow test at the end). Each op test proves it ran the TMA forward (the `tma_forward` fixture) and checks
the output and every gradient against the fp64 reference under tests/test_zero_init_attention.py's bar.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_zero_init_attention import Case, check_against_reference, check_varlen_against_per_sequence_calls, make_inputs

import llama_adapter_triton.kernels.zero_init_attn as zia
import llama_adapter_triton.kernels.zero_init_attn_tma as tma
from llama_adapter_triton import zero_init_attention
from llama_adapter_triton.kernels import block_sizes


@pytest.fixture
def tma_forward(monkeypatch):
    """Counts the TMA forward's launches: a test that should have run it asserts it did."""
    calls = []
    fwd = tma._fwd_tma

    def counted(*args, **kwargs):
        calls.append(args)
        return fwd(*args, **kwargs)

    monkeypatch.setattr(tma, "_fwd_tma", counted)
    return calls


CASES = {
    # seqlen_q < seqlen_k (a chunk after a KV cache), GQA 4 -> 2, odd lengths, a shared prompt of 10
    "causal_gqa_chunk": Case(batch=2, seqlen_q=17, seqlen_k=45, nheads=4, nheads_kv=2, headdim=32),
    # queries past the keys, no prompt (plain layers)
    "noncausal_no_prompt": Case(batch=1, seqlen_q=33, seqlen_k=19, nheads=2, nheads_kv=2, headdim=32, prompt_len=0,
                                causal=False),
    # headdim 80 (the descriptor's block is wider than the matrix), MQA, one prompt per sample, identity gate
    "mqa_hd80_prompt_per_sample": Case(batch=2, seqlen_q=20, seqlen_k=20, nheads=2, nheads_kv=1, headdim=80,
                                       prompt_batch=2, gate_act="identity"),
    # a left-padded batch: 7 pad queries in row 0, none in row 1; a gate per row and head (one adapter per row)
    "leftpad_gate_per_row": Case(batch=2, seqlen_q=9, seqlen_k=40, nheads=2, nheads_kv=2, headdim=32, leftpad=(38, 0),
                                 gate_rows=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_tma_matches_fp64_reference(name, dtype, device, tma_forward):
    check_against_reference(CASES[name], dtype, device, seed=3, backend="tma")
    assert tma_forward, "backend='tma' did not run the TMA forward"


def test_tma_gpu_block_sizes(device, tma_forward, monkeypatch):
    """The policy's GPU blocks (64 x 128 with a prompt) on a ragged shape: one key block past the keys' end."""
    monkeypatch.setattr(block_sizes, "INTERPRET_BLOCKS", "gpu")
    check_against_reference(Case(batch=1, seqlen_q=70, seqlen_k=70, nheads=2, nheads_kv=2, headdim=32),
                            torch.bfloat16, device, backend="tma")
    assert tma_forward


def test_tma_packed(device, tma_forward):
    """Packed sequences (one of them empty, one a single token), each with its own gate, equal per-sequence calls,
    gradients too."""
    check_varlen_against_per_sequence_calls(causal=True, prompt="per_sequence", device=device, gate_rows=True,
                                            backend="tma")
    assert tma_forward


def test_auto_never_picks_tma(device, tma_forward):
    q = torch.randn(1, 8, 2, 32, device=device)
    pk = torch.randn(1, 3, 2, 32, device=device)
    zero_init_attention(q, q, q, pk, pk, torch.zeros(2, device=device))
    assert not tma_forward


def _inputs(d=32, prompt_len=3):
    q = torch.randn(2, 8, 4, d)
    k = torch.randn(2, 8, 2, d)
    pk = torch.randn(1, prompt_len, 2, d)
    return dict(q=q, k=k, v=k.clone(), prompt_k=pk, prompt_v=pk.clone(), gate=torch.zeros(4))


@pytest.mark.parametrize("changes,msg", [
    # a row stride of 34 fp32 (136 bytes): not a multiple of 16
    (dict(q=torch.randn(2, 8, 4, 34)[..., :32]), r"backend='tma' needs q with .* multiples of 16 bytes"),
    (dict(k=torch.randn(2, 8, 32, 2).transpose(-1, -2)), r"backend='tma' needs k with a unit last stride"),
    (dict(prompt_v=torch.randn(1, 3, 2, 34)[..., :32]), "backend='tma' needs prompt_v"),
    (dict(prompt_k=torch.randn(1, 129, 2, 32), prompt_v=torch.randn(1, 129, 2, 32)),
     r"prompts of up to 128 rows .* got prompt_k \(1, 129, 2, 32\)"),
], ids=["q_stride", "k_last_stride", "prompt_v_stride", "prompt_too_long"])
def test_tma_bad_input_is_named(changes, msg, tma_forward):
    with pytest.raises(ValueError, match=msg):
        zero_init_attention(*{**_inputs(), **changes}.values(), backend="tma")
    assert not tma_forward


def test_bad_backend_and_device_are_named(monkeypatch, tma_forward):
    with pytest.raises(ValueError, match="backend must be 'auto' or 'tma', got 'cuda'"):
        zero_init_attention(*_inputs().values(), backend="cuda")
    monkeypatch.setattr(zia, "INTERPRET", False)  # compiled: the TMA forward needs a Hopper GPU
    with pytest.raises(ValueError, match="backend='tma' runs on a Hopper GPU .* got q on cpu"):
        zero_init_attention(*_inputs().values(), backend="tma")
    assert not tma_forward


@pytest.mark.slow
def test_tma_forward_compiles_for_h100_with_tma_and_warp_specialization():
    """Compiled for sm_90 (kernels.compile_check --tma, which fails a TMA launch without TMA copies, without the
    warp specialization it asks for, or with spills in 16 bits): the LLaMA-7B layer's launches use both."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "llama_adapter_triton.kernels.compile_check", "--tma", "--quick"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all kernels compile for sm_90" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if "_zia_tma_fwd_kernel" in line]
    assert len(rows) >= 8, res.stdout  # training and inference launches of several scenarios
    llama = [row for row in res.stdout.splitlines() if row.startswith("bf16 d128 causal") and "_zia_tma" in row]
    assert llama and all(row.split()[-1] == "tma+ws" and row.split()[-3] == "0" for row in llama), res.stdout


def test_bench_provider_fused_tma(device, tma_forward):
    """bench_attention's fused-tma: its check passes (every gradient too); on a CPU it is not timed, saying why."""
    from llama_adapter_triton.bench import bench_attention as ba

    x = ba.make_inputs(ba.Case(batch=1, seqlen=64, nheads=2, nheads_kv=1, headdim=32, prompt_len=10, dtype="bf16"),
                       torch.device(device))
    fwd, info = ba.PROVIDERS["fused-tma"].build(x)
    expected = ba.expected_results(x, adapter=True, need_grad=True)
    ratios = ba.check_provider("fused-tma", fwd, x, expected, adapter=True, need_grad=True)
    assert max(ratios.values()) <= 1 and info["backend"] == "tma" and tma_forward
    if device == "cpu":
        assert "Hopper GPU only" in ba.PROVIDERS["fused-tma"].unavailable(torch.device("cpu"))


def test_tune_blocks_sweeps_tma_when_named(tmp_path, tma_forward):
    """bench.tune_blocks --kernels tma: the TMA forward's candidates, checked against the pointer kernels, then
    timed (the smoke run, under the interpreter); not part of the default sweep."""
    from llama_adapter_triton.bench import common
    from llama_adapter_triton.bench import tune_blocks as tb

    assert "tma" not in tb.TuneConfig().kernels
    rc = tb.main(["--smoke", "--kernels", "tma", "--seqlens", "64", "--candidates", "tma=64,64,4,1 tma=32,32,4,1",
                  "--out", str(tmp_path)])
    assert rc == 0 and tma_forward
    timed = {r["provider"] for r in common.read_rows(tmp_path / "tune_blocks.csv") if r["metric"] == "time_ms"}
    assert timed == {"tma M64 N64 w4 s1 (default)", "tma M32 N32 w4 s1"}


def test_tma_under_torch_compile(device, tma_forward):
    """backend="tma" is one custom op node too (its fake the pointer op's): no graph break, the eager numbers."""
    inputs = make_inputs(Case(seqlen_q=17, seqlen_k=17, nheads=4, nheads_kv=2, headdim=32), torch.float32, device)

    def f(q, k, v, pk, pv, gate):
        return (zero_init_attention(q, k, v, pk, pv, gate, backend="tma") * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = compiled(*inputs)
    grads = torch.autograd.grad(got, inputs)
    want = f(*inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(a, b)
    assert len(tma_forward) == 2  # the compiled call and the eager one
