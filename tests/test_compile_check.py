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


@pytest.mark.slow
def test_atomic_dq_product_is_a_warpgroup_mma_on_h100():
    """deterministic=False's dK/dV pass computes dq too: its dq product must compile to wgmma on sm_90 like the
    others, not to mma.sync (dS K has M = BLOCK_M = 32 rows, below wgmma's 64: the kernel computes K^T dS^T,
    M = head dim). compile-check reports each kernel's wgmma.mma_async and mma.sync instructions."""
    res = compile_check("--arch", "90", "--scenario", "atomic dq")
    assert res.returncode == 0, res.stdout + res.stderr
    header = res.stdout.splitlines()[0].split()
    rows = [line for line in res.stdout.splitlines() if "_zia_bwd_dkdv_kernel" in line]
    assert len(rows) == 3, res.stdout  # bf16 d128, bf16 d128 packed, fp16 d64
    for row in rows:
        # the columns from the right: ... wgmma, mma.sync, seconds, uses (empty but for the TMA forward)
        wgmma, mma_sync = (int(x) for x in row.split()[-3:-1])
        assert header[-4:-2] == ["wgmma", "mma.sync"] and wgmma > 0, res.stdout
        assert mma_sync == 0, f"the atomic dK/dV pass has {mma_sync} mma.sync instructions on sm_90:\n{row}"
