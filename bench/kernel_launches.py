"""One small forward and backward through every kernel of the fused op: what compute-sanitizer watches.

    llama-adapter bench kernel-launches                                   # on the GPU (or interpreted on a CPU)
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m llama_adapter_triton.bench.kernel_launches

Dense with a shared prompt (deterministic and atomic dq), packed sequences of uneven lengths with one prompt
each, and a left-padded decode step: the forward, the backward's preprocess, dK/dV, dQ and prompt-gradient
kernels all launch, on shapes that fill none of their blocks. Prints one line per launch group and checks
that every result is finite.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

if not torch.cuda.is_available():  # as in tests/conftest.py: the kernels run under Triton's interpreter
    os.environ["TRITON_INTERPRET"] = "1"

from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention  # noqa: E402


def launches(device: str, dtype: torch.dtype) -> list[str]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    done = []

    def run(what: str, *args: torch.Tensor, **kwargs) -> None:
        out = zero_init_attention(*args, **kwargs)
        grads = torch.autograd.grad(out.float().square().sum(), [a for a in args if a.requires_grad])
        if not all(torch.isfinite(t).all() for t in (out, *grads)):
            raise RuntimeError(f"{what}: non-finite result")
        done.append(what)

    q, k, v = rand(2, 100, 4, 64), rand(2, 100, 2, 64), rand(2, 100, 2, 64)
    pk, pv, gate = rand(1, 10, 2, 64), rand(1, 10, 2, 64), torch.full((4,), 0.5, device=device).requires_grad_()
    for deterministic in (True, False):
        run(f"dense, shared prompt, deterministic={deterministic}", q, k, v, pk, pv, gate,
            deterministic=deterministic)
    cu = torch.tensor([0, 30, 31, 100], dtype=torch.int32, device=device)
    run("packed, a prompt per sequence", rand(100, 4, 64), rand(100, 2, 64), rand(100, 2, 64), rand(3, 10, 2, 64),
        rand(3, 10, 2, 64), gate, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=69, max_seqlen_k=69)
    pad = torch.tensor([90, 0], dtype=torch.int32, device=device)
    run("left-padded decode step", rand(2, 1, 4, 64), k, v, pk, pv, gate, leftpad_k=pad)
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-adapter bench kernel-launches", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for what in launches(device, torch.bfloat16):
        print(f"ok: {what} ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
