"""bench/gpu_session.sh's one-call plan, and bench/kernel_launches.py (what compute-sanitizer watches there)."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llama_adapter_triton.bench import kernel_launches
from llama_adapter_triton.bench.common import git_commit

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"


def session(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


QUICK_ORDER = ["env", "attention", "finetune", "bank", "kernels", "sanitizer-warm", "sanitizer"]
OVERHEADS = ["kill-after", "packing", "installs"]


def quick_plan(*extra: str) -> tuple[dict[str, int], int]:
    """--plan quick's lines (name -> seconds, steps then overheads) and its total."""
    res = session("--plan", "quick", *extra)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    rows = [re.fullmatch(r"(\S+)\s+(\d+) s\s+\S.*", line) for line in lines[:-1]]
    assert all(rows), lines
    total = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert total, lines
    return {m.group(1): int(m.group(2)) for m in rows}, int(total.group(1))


def test_the_quick_plan_fits_one_eight_minute_call():
    """--plan quick runs nothing: one step a line in the order of value (the attention ratios right after the
    environment, the sanitizer last), then every overhead (SIGKILL grace, packing, installs); the total is their
    whole sum, at most 480 s, and the script's header gives the same numbers."""
    plan, total = quick_plan()
    assert list(plan) == QUICK_ORDER + OVERHEADS
    assert total == sum(plan.values()) <= 480
    assert plan["env"] >= 30 and plan["sanitizer"] >= 90 and plan["installs"] == 0
    assert plan["env"] + plan["attention"] <= 240  # the first 4 minutes hold the attention ratios
    header = SCRIPT.read_text().split("\nset -uo pipefail")[0]
    for name in QUICK_ORDER:
        assert re.search(rf"^#\s+(\d\.\s+)?{name}\s+{plan[name]} s\s", header, re.M), (name, plan[name])
    assert f"total {total} s" in header and f"overheads        {total - sum(plan[n] for n in QUICK_ORDER)} s" in header
    changed, changed_total = quick_plan("--timeout", "kernels=200")
    assert changed["kernels"] == 200 and changed_total == total + 200 - plan["kernels"]


@pytest.mark.parametrize("args,message", [((), "usage"), (("--plan",), "usage"), (("quick", "tests"), "alone"),
                                          (("warp",), "unknown stage 'warp'"),
                                          (("quick", "--timeout", "warp=3"), "no quick step 'warp'"),
                                          (("--plan", "quick", "--timeout", "kernels"), "STEP=SECONDS"),
                                          (("--plan", "quick", "--timeout", "kernels=0"), "SECONDS >= 1"),
                                          (("--plan", "quick", "--dry-run-cpu"), "goes with quick")])
def test_bad_arguments_are_refused(args, message):
    res = session(*args)
    assert res.returncode == 2 and message in res.stderr


def test_quick_refuses_an_out_folder_holding_a_quick_run(tmp_path):
    """A second run into the same folder would append to the first run's logs: refused before any step runs."""
    (tmp_path / "quick-1-env.log").write_text("gpu: NVIDIA H100\n")
    res = subprocess.run(["bash", str(SCRIPT), "quick", "--dry-run-cpu"], env=dict(os.environ, OUT=str(tmp_path)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "already holds the files of a quick run" in res.stderr, res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["quick-1-env.log"]
    assert (tmp_path / "quick-1-env.log").read_text() == "gpu: NVIDIA H100\n"


@pytest.mark.gpu_leg
def test_kernel_launches_reach_every_kernel(triton_kernels_only, device):
    """One forward and backward through each kernel, finite (interpreted on a CPU, compiled on a GPU)."""
    import torch

    done = kernel_launches.launches(device, torch.bfloat16)
    assert len(done) == 4 and triton_kernels_only.forward == 4 and triton_kernels_only.backward == 4


def test_commit_falls_back_to_the_commit_file(tmp_path):
    """A device machine gets a copy of the working tree, perhaps without .git: the rows' commit then comes from the
    COMMIT file that `gpu_session.sh --write-commit` wrote before the call; a malformed one is not believed."""
    assert git_commit(tmp_path) == "unknown"
    (tmp_path / "COMMIT").write_text("a3bfb24-dirty\n")
    assert git_commit(tmp_path) == "a3bfb24-dirty"
    (tmp_path / "COMMIT").write_text("<html>\n")
    assert git_commit(tmp_path) == "unknown"


def test_the_commit_file_travels_with_the_tree():
    """The device tool copies untracked files that git does not ignore: COMMIT must not be ignored."""
    root = SCRIPT.parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    assert subprocess.run(["git", "-C", str(root), "check-ignore", "-q", "COMMIT"]).returncode == 1


def test_quick_rehearsal_on_the_cpu_keeps_what_a_killed_step_printed(tmp_path):
    """`quick --dry-run-cpu`: every step's command on the CPU (the interpreter, the smallest options) through the plan's
    own plumbing, with fine-tuning killed mid-way by its timeout (3 s: it needs 6 s or more even alone on the
    machine, so the kill is certain). $OUT then holds at most the 8 files the device tool brings back: the
    earlier steps' logs and results (attention rows stamped with the GPU's name and the commit), the killed
    step's log with what it printed before its SIGINT, and the later steps' logs."""
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT), "quick", "--dry-run-cpu", "--timeout", "finetune=3"],
                         env=dict(os.environ, OUT=str(out), PYTHON=sys.executable), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 124, res.stdout[-3000:] + res.stderr[-3000:]  # the killed step's status
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= {"quick-1-env.log", "quick-2-attention.log", "quick-2-attention.tar.gz",
                          "quick-3-finetune.log", "quick-3-finetune.tar.gz", "quick-3b-bank.log",
                          "quick-4-kernels.log", "quick-5-sanitizer.log"} and len(files) >= 7, files
    commit = git_commit()
    env = (out / "quick-1-env.log").read_text()
    assert "gpu: none" in env and f"commit {commit}\n" in env and "=== quick env: exit 0" in env
    with tarfile.open(out / "quick-2-attention.tar.gz") as tar:
        rows = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("attention/attention.csv"), encoding="utf-8")))
    assert {r["provider"] for r in rows} >= {"fused", "fused_atomic", "sdpa_causal", "sdpa2", "eager"}
    assert {(r["gpu_name"], r["git_commit"]) for r in rows} == {("cpu", commit)}
    assert "=== quick attention: exit 0" in (out / "quick-2-attention.log").read_text()
    finetune = (out / "quick-3-finetune.log").read_text()
    assert "=== quick finetune (timeout 3 s" in finetune and "TIMED OUT after 3 s" in finetune
    assert "KeyboardInterrupt" in finetune  # SIGINT first: Python unwound and said so, no silent SIGKILL
    bank = (out / "quick-3b-bank.log").read_text()  # the adapter bank's rows, after the headline steps
    assert "bank-a2" in bank and "2 distinct adapters:" in bank and "=== quick bank: exit 0" in bank
    kernels = (out / "quick-4-kernels.log").read_text()
    assert "1 passed" in kernels and "=== quick kernels: exit 0" in kernels
    assert "sanitizer" in (out / "quick-5-sanitizer.log").read_text()
    assert re.search(r"^finetune\s+exit 124", res.stdout, re.M) and re.search(r"^kernels\s+exit\s+0", res.stdout, re.M)
