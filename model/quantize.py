"""A quantized frozen base: the linear weights in NF4 (QLoRA) or int8 (LLM.int8), through bitsandbytes.

    model = load_checkpoint("llama-7b/", adapter=AdapterConfig(), dtype=torch.bfloat16, device="cuda",
                            quantize="nf4")      # or: llama-adapter finetune ... --quantize nf4

- "nf4" (arXiv 2305.14314, bitsandbytes.nn.Linear4bit): 4-bit NormalFloat in blocks of 64 weights (of 32 where
  in_features is a multiple of 32 but not of 64: nf4_blocksize), the absmaxes double-quantized; 4.127 bits per
  weight. The matmul dequantizes the weight to the compute dtype each time, in the forward and the backward.
- "int8" (arXiv 2208.07339, bitsandbytes.nn.Linear8bitLt, threshold 6.0): int8 rows, each with an fp32 absmax;
  inference multiplies int8 activations (outlier columns in 16 bits), training on a CPU dequantizes per matmul.
Which weights: every layer's attention and MLP linears, and the output layer with quantize_output=True (not when it
is tied). The embedding and the norms stay in the base dtype, the adapter in fp32; the fused op only sees the
activations. A quantized layer is an nn.Linear subclass with a packed weight: layer_compute_dtype(layer) is the dtype
it computes in. Loading (model/checkpoint.py) quantizes each weight as it is read and frees its full-precision copy
before the next: the peak is the quantized model plus about one tensor (trim_heap trims the C heap on a CPU).
Limits: a quantized base is frozen (packed integers take no gradient), is not cast by cast_base and cannot be sharded
by FSDP2 (--quantize with --fsdp is refused). On a CPU bitsandbytes (>= 0.50) runs both modes; its AVX512-BF16
repacking for inference is switched off, so that a layer computes the same in training and in inference.
Measurements, errors and the memory table: docs/finetuning.md (Fine-tuning on small memory).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator

import torch
import torch.nn as nn

QUANTIZE_MODES = ("nf4", "int8")
INSTALL = "pip install 'bitsandbytes>=0.50'"  # or the project's "quantize" extra
NF4_BLOCKSIZE = 64  # weights per absmax (QLoRA's); 32 for a layer whose in_features is not a multiple of 64
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)
QUANTIZED_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                     "feed_forward.w2", "feed_forward.w3")


class _Quiet(logging.Filter):
    """Drops bitsandbytes' log lines that say nothing to our users: its CPU backend's look-up of Hugging Face's
    `kernels` package (it finds ours, kernels/, the op, and warns at import), and int8's note, at every matmul,
    that bf16 inputs are cast to fp16 (LLM.int8 computes in fp16 by design)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "kernels-community" not in message and "inputs will be cast from" not in message


def _bnb():
    """bitsandbytes, imported (once) with _Quiet on its two chatty loggers."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in log.filters):
            log.addFilter(_Quiet())
    import bitsandbytes

    return bitsandbytes


def check_quantize(mode: str | None, *, argument: str = "quantize") -> None:
    """ValueError, naming the argument, unless mode is None or one of QUANTIZE_MODES and bitsandbytes imports
    (the message says what to install). Call it before anything loads."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"{argument} must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    try:
        _bnb()
    except ImportError as e:  # missing, or a build that does not load here
        raise ValueError(f"{argument} {mode} needs bitsandbytes, which cannot be imported ({e}): {INSTALL}") \
            from None


def nf4_blocksize(in_features: int) -> int:
    """Weights per absmax: QLoRA's 64, or 32 where in_features is a multiple of 32 but not of 64. bitsandbytes' CPU
    kernel (0.50) dequantizes a weight whose rows are not whole blocks wrongly (its quantization is right); LLaMA's
    widths (4096, 11008, 14336, 28672, ...) are multiples of 64, some tiny models' (the demo's 352) only of 32."""
    return 32 if in_features % NF4_BLOCKSIZE and in_features % 32 == 0 else NF4_BLOCKSIZE


def check_cpu_nf4(config, device: torch.device | str) -> str | None:
    """Why bitsandbytes cannot hold this model's linears in NF4 on device, or None: on a CPU, a layer whose
    in_features is not a multiple of 32 (nf4_blocksize)."""
    if torch.device(device).type != "cpu":
        return None
    odd = [f"{name} {value}" for name, value in (("dim", config.dim), ("hidden_dim", config.hidden_dim)) if value % 32]
    if not odd:
        return None
    return (f"{' and '.join(odd)} not a multiple of 32: bitsandbytes' CPU kernel dequantizes such NF4 weights "
            "wrongly; quantize on a GPU, or use int8")


def quantized_names(model: nn.Module, quantize_output: bool = False) -> set[str]:
    """The names of the weights a quantized load replaces: layers.N.attention.wq.weight, ..., output.weight with
    quantize_output (unless tied to the embedding)."""
    names = {f"layers.{i}.{linear}.weight" for i in range(len(model.layers)) for linear in QUANTIZED_LINEARS}
    if quantize_output and not model.config.tie_embeddings:
        names.add("output.weight")
    return names


def quantized_linear(weight: torch.Tensor, mode: str, *, compute_dtype: torch.dtype,
                     bias: nn.Parameter | None = None) -> nn.Linear:
    """A bitsandbytes linear layer holding weight (out_features, in_features) quantized on its device.

    weight's own storage is not kept: once the caller drops it, only the quantized copy remains. compute_dtype: the
    dtype the layer takes and gives (the base's activations). bias: the linear's own (Qwen2's q, k, v), kept as it is
    (bitsandbytes adds it in the compute dtype); None: none."""
    bnb = _bnb()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # bitsandbytes builds (and caches, for the process) its NF4 code table in
    try:  # the default dtype: under a bf16 default its 16 levels would be rounded to bf16 from then on
        layer = _quantized_linear(bnb, weight, mode, compute_dtype)
    finally:
        torch.set_default_dtype(previous)
    layer.bias = bias
    return layer


def _quantized_linear(bnb, weight: torch.Tensor, mode: str, compute_dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.support_avx512bf16_for_cpu = False  # see the module docstring: one layout for training and inference
        packed = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=nf4_blocksize(in_features),
                                   compress_statistics=True, quant_type="nf4", module=layer)
        layer.weight = packed._quantize(weight.device)
    elif mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.compute_dtype = compute_dtype  # Linear8bitLt gives its input's dtype; layer_compute_dtype reads this
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(weight.device)
    else:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    return layer


def layer_compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes and gives: its weight's, or, for a quantized one (packed integer weights), the
    dtype it dequantizes to."""
    return getattr(linear, "compute_dtype", None) or linear.weight.dtype


def quantize_model(model: nn.Module, mode: str, *, quantize_output: bool = False) -> nn.Module:
    """Quantize the base linears of a LLaMA already in memory, in place, one layer at a time (each full-precision
    weight goes as its quantized layer replaces it, unless something else holds it); their dtype becomes the compute
    dtype. load_checkpoint(..., quantize=) quantizes while reading instead, never holding the full-precision model."""
    check_quantize(mode)
    device = model.tok_embeddings.weight.device
    why = check_cpu_nf4(model.config, device) if mode == "nf4" else None
    if why:
        raise ValueError(f"quantize='nf4' on the CPU: {why}")
    for name in sorted(quantized_names(model, quantize_output)):
        path = name.removesuffix(".weight")
        parent, _, child = path.rpartition(".")
        linear = model.get_submodule(path)
        weight = linear.weight.detach()
        setattr(model.get_submodule(parent), child, quantized_linear(weight, mode, compute_dtype=weight.dtype,
                                                                     bias=linear.bias))
    return model


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere). Quantizing on a CPU
    frees a full-precision weight and its temporaries after each layer while the small quantized tensors stay, and
    glibc keeps the gaps between them: measured on a 7B-shaped checkpoint, trimming after each layer saves about
    0.03 GiB of resident memory per layer."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every bitsandbytes-quantized linear layer of model."""
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


def is_quantized(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes.") and cls.__name__ in ("Linear4bit", "Linear8bitLt")


def quantize_mode(model: nn.Module) -> str | None:
    """"nf4", "int8" or None: how model's base linears are stored."""
    for _, layer in quantized_layers(model):
        return "nf4" if type(layer).__name__ == "Linear4bit" else "int8"
    return None


def logical_numel(p: torch.Tensor) -> int:
    """The number of weights p stands for: a packed NF4 weight holds two per byte (its quant_state knows the
    shape); any other tensor its numel."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()

