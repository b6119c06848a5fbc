"""Test setup: without a GPU, the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton.jit runs (when `kernels` is first imported),
so it is set here, before any test module imports the project. Without a GPU it is forced to 1, even when the
environment says 0: the op would otherwise fall back to the eager reference, and the tests that compare the
kernels with that reference would compare it with itself.

`device` is "cuda" when there is a GPU (the tests that take it then run the kernels compiled), else "cpu".
`triton_kernels_only` makes a test fail unless every op call it makes runs the Triton kernels (compiled or
interpreted): the op's fallback (two SDPA calls, kernels/sdpa_fallback.py) raises, and the forward kernel's
launches are counted.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


class KernelLaunches:
    """How many times the op's forward and backward launchers ran during a test."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0


@pytest.fixture
def triton_kernels_only(monkeypatch) -> KernelLaunches:
    import llama_adapter_triton.kernels.zero_init_attn as zia

    def no_fallback(*args, **kwargs):
        raise AssertionError("zero_init_attention ran its eager fallback (two SDPA calls), not the Triton kernels: "
                             "these tests must run the kernels (compiled on a GPU, or with TRITON_INTERPRET=1, which "
                             "conftest.py sets)")

    launches = KernelLaunches()
    fwd, bwd = zia._fwd, zia._bwd

    def counted_fwd(*args, **kwargs):
        launches.forward += 1
        return fwd(*args, **kwargs)

    def counted_bwd(*args, **kwargs):
        launches.backward += 1
        return bwd(*args, **kwargs)

    monkeypatch.setattr(zia, "zero_init_attention_sdpa", no_fallback)
    monkeypatch.setattr(zia, "_fwd", counted_fwd)
    monkeypatch.setattr(zia, "_bwd", counted_bwd)
    return launches
