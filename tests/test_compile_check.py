"""The kernels compile for an H100 (sm_90), checked here without a GPU.

kernels.compile_check records the launches the real host launchers make and compiles each for
the target with Triton's compiler and ptxas, checking that it fits the chip's shared memory.
It runs in a subprocess: this test session imports the kernels interpreted.
"""

import os
import subprocess
import sys

import pytest

from llama_adapter_triton.kernels.compile_check import KERNELS


def compile_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "llama_adapter_triton.kernels.compile_check", *args],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_every_kernel_compiles_for_h100():
    res = compile_check("--quick", "--arch", "90")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all kernels compile for sm_90" in res.stdout
    for name in KERNELS:
        assert name in res.stdout, f"{name} was never launched by the scenarios"


@pytest.mark.slow
def test_shared_memory_overflow_is_caught():
    """Blocks too large for the chip fail the check, naming the kernel: flash attention's usual
    128 x 128 tiles in 3 stages need 160 KB, more than a consumer GPU (sm_89) has."""
    res = compile_check("--arch", "89", "--scenario", "bf16 d128 causal", "--blocks", "fwd=128,128,8,3")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "_zia_fwd_kernel needs" in res.stdout and "shared memory" in res.stdout


def test_bad_blocks_argument_is_named():
    res = compile_check("--blocks", "fwd=1,2")
    assert res.returncode == 2 and "--blocks" in res.stderr
    res = compile_check("--scenario", "no such scenario")
    assert res.returncode == 2 and "--scenario" in res.stderr
