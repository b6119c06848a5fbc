"""The loss without the full logits: the output layer and the cross-entropy over the target tokens, fused or in chunks.

    hidden = model(tokens, logits_at=at, head=False)         # (N, dim): the final norm's output at the targets
    loss_sum = linear_cross_entropy(hidden, model.output, targets)   # fp32 scalar: the summed cross-entropy

The plain formulation, cross_entropy(output(hidden).float(), targets, reduction="sum") (impl="full"), holds the
(N x vocab) logits in the base dtype, their fp32 copy and the fp32 log-probabilities for the backward: for 16k targets
over Llama-3's 128,256 words, 8 GiB per fp32 tensor. Here no (N x vocab) tensor exists:

- "chunked" (CPU, and CUDA without Liger): the targets in chunks of `chunk_rows` rows (by default as many as make a
  chunk's logits about the size of hidden, Liger's rule: ceil(N / ceil(vocab / dim)), and at least 32); each chunk
  computes its logits
  exactly as the plain formulation does (output layer, .float(), cross-entropy summed), keeps nothing for the
  backward, and is recomputed in the backward (torch.utils.checkpoint, non-reentrant). Each row is computed as in
  the plain formulation: the same loss and gradients up to the order of the sum over chunks (tested against it, any
  vocabulary size). Works with any output layer, a quantized one included.
- "liger" (CUDA, when liger-kernel is installed and the output layer is a plain nn.Linear): Liger-Kernel's
  LigerFusedLinearCrossEntropyLoss (chunked matmuls and a fused Triton softmax / cross-entropy kernel, the
  gradient of hidden computed in the forward; logits in the base dtype, the softmax in fp32, as the plain path).
- "auto" (the default): "liger" where it applies, else "chunked".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llama_adapter_triton.kernels.checks import check_int

LOSS_IMPLS = ("auto", "chunked", "liger", "full")


MIN_CHUNK_ROWS = 32  # fewer rows turn the output layer's backward into a matrix-vector product, less exact on a CPU


def default_chunk_rows(rows: int, vocab_size: int, dim: int) -> int:
    """Rows per chunk so that a chunk's logits (rows x vocab) are about the size of hidden (rows x dim), Liger's rule,
    but at least MIN_CHUNK_ROWS."""
    return max(MIN_CHUNK_ROWS, math.ceil(rows / math.ceil(vocab_size / dim)))


def liger_applies(hidden: torch.Tensor, output: nn.Module) -> bool:
    """Whether impl="auto" takes Liger's fused kernel: CUDA, liger-kernel importable, a plain nn.Linear output."""
    if hidden.device.type != "cuda" or type(output) is not nn.Linear or output.bias is not None:
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, output: nn.Module) -> torch.Tensor:
    return F.cross_entropy(output(hidden).float(), targets, reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, output: nn.Module, targets: torch.Tensor, *, impl: str = "auto",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """The summed cross-entropy (fp32 scalar) of output(hidden) against targets, without the (N x vocab) logits.

    Arguments:
        hidden: (N, dim), the model's final-norm output at the target positions (model(..., head=False)).
        output: the output layer, (N, dim) -> (N, vocab): model.output (a plain or quantized linear layer).
        targets: (N,) int64 token ids, every one a real target (no ignore index).
        impl: "auto", "chunked", "liger" or "full" (the plain formulation, for comparison); see the module docstring.
        chunk_rows: "chunked": rows per chunk (default_chunk_rows by default).
    Returns:
        the loss summed over the N targets, fp32, differentiable in hidden (and in the output layer's trained
        parameters, if any).
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(LOSS_IMPLS)}, got {impl!r}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, dim) and targets (N,), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if chunk_rows is not None:
        check_int("chunk_rows", chunk_rows, 1, what="a positive int")
    if impl == "auto":
        impl = "liger" if liger_applies(hidden, output) else "chunked"
    if impl == "full" or hidden.shape[0] == 0:
        return _chunk_loss(hidden, targets, output)
    if impl == "liger":
        if not liger_applies(hidden, output):
            raise ValueError("impl='liger' needs CUDA tensors, a plain nn.Linear output layer without bias, and "
                             "liger-kernel (pip install 'liger-kernel>=0.6')")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(output.weight, hidden, targets).float()
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], output.out_features, hidden.shape[1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(rows), targets.split(rows), strict=True):
        total = total + checkpoint(_chunk_loss, h, t, output, use_reentrant=False)
    return total
