"""model/quantize.py: an NF4 (QLoRA) or int8 (LLM.int8) base through bitsandbytes, on the CPU: the format, the logits
within the quantization's own error, loading tensor by tensor (Meta, sharded HF) at the quantized model's memory
plus about one tensor, the adapter untouched and trained on top, and the errors before anything loads."""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys

import pytest
import torch
from model_utils import VOCAB, hf_model, randomize_, tiny_config, tiny_model

import llama_adapter_triton.model.quantize as quantize
from llama_adapter_triton import (
    AdapterConfig,
    CheckpointError,
    LLaMA,
    LLaMAConfig,
    adapter_state_dict,
    load_checkpoint,
    mark_only_adapter_as_trainable,
    save_checkpoint,
)
from llama_adapter_triton.bench.memory import TensorMemory, model_tensors, nf4_bytes

if os.environ.get("CI") == "true":  # the CI runner installs the dev extra, which has it: a failing import there must
    import bitsandbytes  # noqa: F401  (fail this file, never skip it)
else:  # elsewhere (a GPU machine has it only when its wheel is carried) a skip
    pytest.importorskip("bitsandbytes")

TOKENS = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
LINEARS = [f"layers.{i}.{name}" for i in range(2) for name in quantize.QUANTIZED_LINEARS]


def config(n_layers: int = 2) -> LLaMAConfig:
    """tests/model_utils.py's tiny LLaMA-2 with a SwiGLU width of 384: bitsandbytes' CPU kernel dequantizes NF4
    correctly only for widths that are multiples of 64 (model/quantize.py's check_cpu_nf4), as LLaMA's are."""
    return dataclasses.replace(tiny_config(n_layers=n_layers), hidden_dim=384)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random LLaMA-2-like base (2 layers, dim 128), saved in the HF format."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_checkpoint(randomize_(LLaMA(config())), folder)
    return folder


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(TOKENS, **kwargs).double()


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _dequantized(model, quantized):
    """model (unquantized) with each linear weight replaced by the quantized model's weight as it dequantizes."""
    bnb = quantize._bnb()
    with torch.no_grad():
        for name in LINEARS:
            layer = quantized.get_submodule(name)
            if quantize.quantize_mode(quantized) == "nf4":
                w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            else:
                w = layer.weight.data.float() * layer.weight.SCB.unsqueeze(1) / 127
            model.get_submodule(name).weight.copy_(w)
    return model


def test_nf4_is_qlora_format_and_its_logits_err_by_nf4_alone(checkpoint):
    base = load_checkpoint(checkpoint).eval()
    nf4 = load_checkpoint(checkpoint, quantize="nf4").eval()
    layers = dict(quantize.quantized_layers(nf4))
    assert sorted(layers) == sorted(LINEARS) and quantize.quantize_mode(nf4) == "nf4"
    for layer in layers.values():
        state = layer.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested, state.state2.blocksize) == ("nf4", 64, True, 256)
        assert layer.weight.dtype == torch.uint8 and quantize.layer_compute_dtype(layer) == torch.float32
    # 4.127 bits per weight, as bench/memory.py's plan counts them; the embedding, norms and output layer as they were
    linears = {f"{n}.weight" for n in LINEARS}
    kept = {name: p for name, p in base.named_parameters() if name not in linears}
    quantized_bytes = sum(t.untyped_storage().nbytes() for t in model_tensors(nf4))
    assert quantized_bytes == sum(nf4_bytes(base.get_parameter(n).numel()) for n in linears) + sum(
        p.numel() * 4 for p in kept.values())
    for name, p in kept.items():
        torch.testing.assert_close(nf4.get_parameter(name), p, rtol=0, atol=0, msg=name)
    # the logits are those of the base with NF4's rounding of its weights, computed per matmul
    rounded = _dequantized(load_checkpoint(checkpoint).eval(), nf4)
    torch.testing.assert_close(_logits(nf4), _logits(rounded), rtol=1e-5, atol=1e-5)
    weight_err = max(_rel(rounded.get_parameter(f"{n}.weight").double(), base.get_parameter(f"{n}.weight").double())
                     for n in LINEARS)
    assert 0.07 < weight_err < 0.11  # NF4's error on normal weights (QLoRA: 4-bit NormalFloat, blocks of 64)
    assert _rel(_logits(nf4), _logits(base)) > 0.01  # it is quantized: the test has teeth


def test_nf4_on_a_bf16_base_computes_in_bf16(checkpoint):
    """A bf16 base quantized to NF4 dequantizes to bf16 and multiplies in bf16, as the base would: every quantized
    layer's compute dtype is bf16, and the logits are those of the bf16 base with NF4's rounding of its weights (the
    same computation: equal far more tightly than an fp32 computation of the same rounded weights is). Planted bug
    this catches: the compute dtype forced to fp32 on a bf16 base (the tests above load in fp32 only)."""
    nf4 = load_checkpoint(checkpoint, dtype=torch.bfloat16, quantize="nf4").eval()
    for name, layer in quantize.quantized_layers(nf4):
        assert layer.compute_dtype == torch.bfloat16 and quantize.layer_compute_dtype(layer) == torch.bfloat16, name
    rounded = _dequantized(load_checkpoint(checkpoint, dtype=torch.bfloat16).eval(), nf4)
    assert rounded.layers[0].attention.wq.weight.dtype == torch.bfloat16
    got, want = _logits(nf4), _logits(rounded)
    err, err_fp32 = _rel(got, want), _rel(got, _logits(rounded.float()))  # the same rounded weights in fp32
    assert err <= err_fp32 / 10, f"NF4 on bf16: {err:.3g} from the bf16 computation, {err_fp32:.3g} from fp32's"


_PACK = """
import sys, torch
from llama_adapter_triton.model.quantize import quantized_linear
g = torch.Generator().manual_seed(0)
if sys.argv[1] == "bf16-first":  # a first quantization under a bf16 default dtype, as bench's random_llama does
    torch.set_default_dtype(torch.bfloat16)
    quantized_linear(torch.randn(64, 64), "nf4", compute_dtype=torch.bfloat16)
    torch.set_default_dtype(torch.float32)
layer = quantized_linear(torch.randn(64, 128, generator=g), "nf4", compute_dtype=torch.float32)
print(layer.weight.data.flatten().tolist())
"""


def test_a_bf16_default_dtype_does_not_change_later_nf4_quantization():
    """bitsandbytes makes its NF4 code table in torch's default dtype and keeps it for the process: quantized_linear
    makes it under fp32, so that a first quantization under a bf16 default (bench's random_llama) leaves every later
    one as it would be. Fresh processes: the table is made once per process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    runs = [subprocess.Popen([sys.executable, "-c", _PACK, order], cwd=root, stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.PIPE) for order in ("fresh", "bf16-first")]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0 and out, f"the subprocess failed (exit {run.returncode}):\n{err[-2000:]}"
    assert outputs[0][0] == outputs[1][0]


def test_nf4_width_multiple_of_32_only_takes_blocks_of_32(tmp_path):
    """tests/model_utils.py's tiny model (and the demo's) has a SwiGLU width of 352 = 11 x 32: its w2 gets blocks of
    32, whose NF4 rounding errs as blocks of 64 do elsewhere (bitsandbytes' CPU kernel would get blocks of 64
    wrong)."""
    save_checkpoint(tiny_model(), tmp_path)
    nf4 = load_checkpoint(tmp_path, quantize="nf4").eval()
    base = load_checkpoint(tmp_path).eval()
    w2 = nf4.layers[0].feed_forward.w2
    assert w2.weight.quant_state.blocksize == 32 and nf4.layers[0].feed_forward.w1.weight.quant_state.blocksize == 64
    rounded = _dequantized(load_checkpoint(tmp_path).eval(), nf4)
    torch.testing.assert_close(_logits(nf4), _logits(rounded), rtol=1e-5, atol=1e-5)
    err = _rel(rounded.layers[0].feed_forward.w2.weight.double(), base.layers[0].feed_forward.w2.weight.double())
    assert 0.07 < err < 0.11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_and_logits(checkpoint, dtype):
    base = load_checkpoint(checkpoint, dtype=dtype).eval()
    int8 = load_checkpoint(checkpoint, dtype=dtype, quantize="int8")
    assert quantize.quantize_mode(int8) == "int8"
    for _, layer in quantize.quantized_layers(int8):
        assert layer.weight.dtype == torch.int8 and quantize.layer_compute_dtype(layer) == dtype
    # training (bitsandbytes dequantizes the weight per matmul): the base with int8's rounding of its weights
    rounded = _dequantized(load_checkpoint(checkpoint, dtype=dtype).train(), int8)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(_logits(int8.train()), _logits(rounded), rtol=tol, atol=tol)
    # inference (LLM.int8: int8 activations too, outliers beyond 6 in 16 bits): within a few % of the base
    assert _rel(_logits(int8.eval()), _logits(base)) < 0.08


def test_quantized_base_keeps_the_adapter_and_zero_init(checkpoint):
    adapter = AdapterConfig(adapter_len=4, adapter_layers=1)
    nf4 = load_checkpoint(checkpoint, quantize="nf4").eval()
    with_adapter = load_checkpoint(checkpoint, quantize="nf4", adapter=adapter).eval()
    assert all(t.dtype == torch.float32 for t in adapter_state_dict(with_adapter).values())
    torch.testing.assert_close(_logits(with_adapter), _logits(nf4), rtol=1e-5, atol=1e-5)  # gate 0: the base
    with torch.no_grad():  # an open gate: the prompt's keys and values go through the quantized wk, wv
        with_adapter.layers[1].attention.gate.fill_(0.5)
    rounded = _dequantized(load_checkpoint(checkpoint, adapter=adapter).eval(), with_adapter)
    rounded.load_state_dict(adapter_state_dict(with_adapter), strict=False)
    torch.testing.assert_close(_logits(with_adapter), _logits(rounded), rtol=1e-5, atol=1e-5)
    assert _rel(_logits(with_adapter), _logits(nf4)) > 1e-3
    with_adapter.setup_cache(1, 8)
    assert with_adapter.layers[0].attention.kv_cache.k.dtype == torch.float32  # the compute dtype, not uint8
    with_adapter.clear_cache()


def test_sharded_and_meta_checkpoints_load_at_the_quantized_size_plus_about_one_tensor(tmp_path):
    """Quantized tensor by tensor: the peak of tensor memory while loading a sharded checkpoint is the quantized model
    plus about one tensor, far below the model's full size; Meta's model-parallel shards give the same model. (Meta's
    .pth files are memory-mapped per tensor: TensorMemory would count each mapping as an allocation, so their peak is
    not measured here.)"""
    from test_checkpoint import _write_meta

    hf = hf_model(config(n_layers=4), seed=5)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    full = load_checkpoint(tmp_path / "sharded")
    params = {"dim": 128, "n_layers": 4, "n_heads": 4, "multiple_of": 128, "norm_eps": 1e-5, "vocab_size": -1}
    _write_meta(full, tmp_path / "meta", mp=2, vocab_parallel=False, params=params)
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    largest = max(p.numel() * 4 for p in full.parameters())
    with TensorMemory() as mem:
        model = load_checkpoint(tmp_path / "sharded", quantize="nf4")
    quantized = sum(t.untyped_storage().nbytes() for t in model_tensors(model))
    assert mem.peak <= quantized + 3 * largest, (mem.peak, quantized, largest)
    assert mem.peak < 0.5 * full_bytes, (mem.peak, full_bytes)
    meta = load_checkpoint(tmp_path / "meta", quantize="nf4")
    torch.testing.assert_close(_logits(meta.eval()), _logits(model.eval()), rtol=0, atol=0)


def test_quantize_errors_come_before_anything_loads(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ValueError, match="quantize must be one of nf4, int8, got 'fp4'"):
        load_checkpoint(missing, quantize="fp4")

    def no_bitsandbytes():
        raise ModuleNotFoundError("No module named 'bitsandbytes'")

    odd = tmp_path / "odd"  # SwiGLU width 336: bitsandbytes' CPU kernel would dequantize its w2 wrongly
    save_checkpoint(randomize_(LLaMA(dataclasses.replace(tiny_config(), hidden_dim=336))), odd)
    with pytest.raises(CheckpointError, match="on the CPU: hidden_dim 336 not a multiple of 32"):
        load_checkpoint(odd, quantize="nf4")
    assert quantize.check_cpu_nf4(tiny_config(), "cuda") is None

    monkeypatch.setattr(quantize, "_bnb", no_bitsandbytes)
    with pytest.raises(ValueError, match=r"quantize nf4 needs bitsandbytes.*pip install 'bitsandbytes>=0\.50'"):
        load_checkpoint(missing, quantize="nf4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_base_trains_through_the_fused_op_on_cuda(checkpoint, mode, triton_kernels_only):
    """On a GPU: bitsandbytes' CUDA kernels under the adapter, the fused op compiled, activation checkpointing."""
    from llama_adapter_triton.train.data import PackedLoader, TokenizedDataset
    from llama_adapter_triton.train.finetune import batch_loss_sum

    adapter = AdapterConfig(adapter_len=4, adapter_layers=2)
    model = load_checkpoint(checkpoint, adapter=adapter, dtype=torch.bfloat16, device="cuda", quantize=mode)
    rounded = _dequantized(load_checkpoint(checkpoint, adapter=adapter, dtype=torch.bfloat16, device="cuda"), model)
    for m in (model, rounded):
        with torch.no_grad():
            for layer in m.layers:
                layer.attention.gate.fill_(0.5)
        mark_only_adapter_as_trainable(m)
    model.activation_checkpointing = True
    lengths = torch.tensor([20, 31, 13])
    data = TokenizedDataset(torch.randint(0, VOCAB, (int(lengths.sum()),)), torch.cat([torch.zeros(1, dtype=torch.long),
                            lengths.cumsum(0)]), lengths // 2, torch.arange(3), pad_id=0)
    batch = PackedLoader(data, 128, shuffle=False).collate([0, 1, 2])
    losses = []
    for m in (model, rounded):
        loss = batch_loss_sum(m, batch, torch.device("cuda"))
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_state_dict(m).values())
    assert triton_kernels_only.backward > 0
    if mode == "nf4":  # training, int8 multiplies int8 activations on CUDA: no exact reference
        assert losses[0] == pytest.approx(losses[1], rel=2e-2)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_linears_with_biases_keep_them(tmp_path, mode):
    """Qwen2's q/k/v biases (read before their weights: safetensors sorts the names) stay with the quantized linear,
    loaded or quantized in memory, and the logits are the base's with the quantized weights."""
    torch.manual_seed(0)
    qwen2 = randomize_(LLaMA(dataclasses.replace(config(), family="qwen2", qkv_bias=True)))
    save_checkpoint(qwen2, tmp_path)
    quantized = load_checkpoint(tmp_path, quantize=mode).train()  # int8 trains with dequantized weights
    for name in (f"layers.{i}.attention.{linear}.bias" for i in range(2) for linear in ("wq", "wk", "wv")):
        assert torch.equal(quantized.get_parameter(name), qwen2.get_parameter(name)), name
    rounded = _dequantized(load_checkpoint(tmp_path).train(), quantized)
    torch.testing.assert_close(_logits(quantized), _logits(rounded), rtol=1e-5, atol=1e-5)
    in_memory = quantize.quantize_model(load_checkpoint(tmp_path), mode).train()
    torch.testing.assert_close(_logits(in_memory), _logits(quantized), rtol=0, atol=0)


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "elsewhere"])
def test_a_bitsandbytes_that_fails_to_import_fails_this_file_in_ci(ci, monkeypatch):
    """This file's guard, run again with `import bitsandbytes` failing: in CI (CI=true) it raises, which fails the
    file; elsewhere it skips it. Planted bug this catches: the wholesale importorskip, which skipped in CI too."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the next import of it raises ModuleNotFoundError
    if not ci:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception):
            runpy.run_path(__file__)
        return
    monkeypatch.setenv("CI", "true")
    try:
        runpy.run_path(__file__)
    except ImportError:
        return
    except pytest.skip.Exception:  # uncaught, it would skip this test too: the very thing to catch
        pytest.fail("with CI=true, a bitsandbytes that fails to import skips test_quantize.py instead of failing it")
    pytest.fail("with CI=true, a bitsandbytes that fails to import went unnoticed")
