"""bench/gpu_session.sh's one-call plan, and bench/kernel_launches.py (what compute-sanitizer watches there)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from llama_adapter_triton.bench import kernel_launches

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"


def session(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_quick_plan_fits_one_eight_minute_call():
    """--plan quick runs nothing and prints one step a line with its timeout, then the total: at most 480 s."""
    res = session("--plan", "quick")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    steps = [re.match(r"(\S+)\s+timeout\s+(\d+) s\s+\S", line) for line in lines[:-1]]
    assert all(steps), lines
    assert [m.group(1) for m in steps] == ["env", "kernels", "gpu-tests", "attention", "finetune", "sanitizer"]
    total = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert total and int(total.group(1)) == sum(int(m.group(2)) for m in steps) <= 480


@pytest.mark.parametrize("args,message", [((), "usage"), (("--plan",), "usage"), (("quick", "tests"), "alone"),
                                          (("warp",), "unknown stage 'warp'")])
def test_bad_arguments_are_refused(args, message):
    res = session(*args)
    assert res.returncode == 2 and message in res.stderr


@pytest.mark.gpu_leg
def test_kernel_launches_reach_every_kernel(triton_kernels_only, device):
    """One forward and backward through each kernel, finite (interpreted on a CPU, compiled on a GPU)."""
    import torch

    done = kernel_launches.launches(device, torch.bfloat16)
    assert len(done) == 4 and triton_kernels_only.forward == 4 and triton_kernels_only.backward == 4
