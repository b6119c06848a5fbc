"""Test setup: without a GPU, the Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton.jit runs (when `kernels` is first imported),
so it is set here, before any test module imports the project.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
