"""The package: one import name of our own (llama_adapter_triton), its console command, its wheel, its pins.

The repository's root is the package; kernels/, model/, train/ and bench/ have no __init__.py, so that from the
root a top-level `import kernels` finds Hugging Face's `kernels` (which transformers imports), never ours. The
test environment installs Hugging Face's `kernels` on purpose (setup.py's dev extra), so that a clash cannot come
back unseen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from pins import normalize, read_pins

ROOT = Path(__file__).resolve().parent.parent
PKG = "llama_adapter_triton"
# every sub-command of `llama-adapter`, as a user types it
COMMANDS = [["finetune"], ["generate"], ["demo"], ["scienceqa"], ["compile-check"], ["bench", "attention"],
            ["bench", "finetune"], ["bench", "decode"], ["bench", "tune-blocks"], ["bench", "kernel-launches"]]


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """`python -c code` in cwd (which `-c` puts first on sys.path, as a user's shell does); its stdout."""
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1", **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def where(tmp_path: Path, place: str) -> Path:
    return ROOT if place == "root" else tmp_path


@pytest.mark.parametrize("place", ["root", "outside"])
def test_the_op_and_transformers_import_from_anywhere(place, tmp_path):
    """From the repository's root and from a folder outside it: our API from the package root, Hugging Face's
    `kernels` as itself, and transformers' modeling_utils (which imports `kernels`)."""
    assert metadata.version("kernels"), "Hugging Face's kernels must be installed for this test (the dev extra)"
    out = run_python(
        "import json, kernels, transformers.modeling_utils, llama_adapter_triton\n"
        "from llama_adapter_triton import zero_init_attention, load_checkpoint, load_adapter, save_adapter\n"
        "from llama_adapter_triton.kernels.zero_init_attn import zero_init_attention as op\n"
        "assert op is zero_init_attention\n"
        "print(json.dumps({'kernels': kernels.__file__, 'ours': llama_adapter_triton.__file__}))",
        where(tmp_path, place))
    files = json.loads(out.strip().splitlines()[-1])
    assert files["kernels"] and Path(files["kernels"]).resolve().parent != ROOT / "kernels", files
    assert Path(files["ours"]).resolve() == ROOT / "__init__.py", files


def test_public_api():
    """Every name in __all__ resolves (lazily), and an unknown one is an AttributeError naming it."""
    import llama_adapter_triton as lat

    for name in ["zero_init_attention", "zero_init_attention_ref", "load_checkpoint", "load_adapter", "save_adapter",
                 "LLaMA", "LLaMAConfig", "AdapterConfig", "Tokenizer", "generate", "use_fused_attention"]:
        assert name in lat.__all__ and name in dir(lat)
    for name in lat.__all__:
        assert name.isupper() or getattr(lat, name).__name__ == name, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lat.nope  # noqa: B018


@pytest.mark.parametrize("place", ["root", "outside"])
def test_every_command_helps(place, tmp_path):
    """`llama-adapter COMMAND --help` for each command, the installed script and `python -m` forms."""
    code = ("import contextlib, io, json, sys\nfrom llama_adapter_triton.__main__ import main\nout = {}\n"
            f"for command in {COMMANDS!r}:\n"
            "    text = io.StringIO()\n"
            "    with contextlib.redirect_stdout(text):\n"
            "        try:\n            code = main([*command, '--help'])\n"
            "        except SystemExit as e:\n            code = e.code\n"
            "    out[' '.join(command)] = [code, text.getvalue()]\n"
            "print(json.dumps(out))")
    helps = json.loads(run_python(code, where(tmp_path, place)).strip().splitlines()[-1])
    for command, (code, text) in helps.items():
        assert code in (0, None) and f"usage: llama-adapter {command}" in " ".join(text.split()), (command, text)

    res = subprocess.run([sys.executable, "-m", f"{PKG}.train.finetune", "--help"], cwd=where(tmp_path, place),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "--checkpoint" in res.stdout, res.stderr[-2000:]
    script = shutil.which("llama-adapter", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the llama-adapter script is not installed beside this python (not a pip-installed package)")
    for argv, expected in ([["--help"], "generate"], [["bench", "--help"], "tune-blocks"]):
        res = subprocess.run([script, *argv], cwd=where(tmp_path, place), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0 and expected in res.stdout, res.stderr
    res = subprocess.run([script, "nope"], cwd=where(tmp_path, place), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown command 'nope'" in res.stderr


@pytest.mark.slow
def test_wheel_holds_one_package_and_runs_outside_the_repo(tmp_path):
    """`pip wheel --no-deps` of the repository: one top-level package, ours, with the demo's data and the console
    script; installed into a scratch folder, a small zero_init_attention call equals the reference, from outside."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".benchmarks", ".whl"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {PKG, f"{PKG}-0.1.0.dist-info"}, sorted(names)
    for expected in ["__init__.py", "__main__.py", "kernels/zero_init_attn.py", "kernels/reference.py",
                     "model/llama.py", "train/finetune.py", "train/demo_data/demo.json", "bench/bench_attention.py"]:
        assert f"{PKG}/{expected}" in names, expected
    assert not [n for n in names if n.startswith((f"{PKG}/tests/", f"{PKG}/setup.py", f"{PKG}/.ci"))], names
    entry_points = zipfile.ZipFile(wheel).read(f"{PKG}-0.1.0.dist-info/entry_points.txt").decode()
    assert f"llama-adapter = {PKG}.__main__:main" in entry_points

    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = run_python(
        "import torch, llama_adapter_triton as lat\n"
        "from llama_adapter_triton import zero_init_attention, zero_init_attention_ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "r = lambda *s: torch.randn(*s, generator=g)\n"
        "q, k, v, pk, pv = r(2, 37, 4, 32), r(2, 37, 4, 32), r(2, 37, 4, 32), r(1, 5, 4, 32), r(1, 5, 4, 32)\n"
        "gate = torch.tensor([0.3, -0.2, 0.1, 0.5])\n"
        "o = zero_init_attention(q, k, v, pk, pv, gate, causal=True)\n"
        "ref = zero_init_attention_ref(q.double(), k.double(), v.double(), pk.double(), pv.double(), "
        "gate.double(), causal=True)\n"
        "print(lat.__file__)\nprint((o.double() - ref).abs().max().item())",
        outside, env={"PYTHONPATH": str(site)})
    file, err = out.strip().splitlines()[-2:]
    assert Path(file).resolve() == (site / PKG / "__init__.py").resolve()
    assert float(err) < 1e-5


def test_constraints_pin_every_requirement():
    """constraints.txt pins every requirement of the package and of its dev extra, each pin inside setup.py's range
    (so `make test` installs exactly what the suite passed with, and setup.py admits it)."""
    from packaging.requirements import Requirement

    pins = read_pins(ROOT / "constraints.txt")
    requirements = [Requirement(r) for r in metadata.requires("llama-adapter-triton")]
    tested = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": "dev"})]
    assert {"torch", "triton", "transformers", "peft", "kernels"} <= {normalize(r.name) for r in tested}
    for r in tested:
        name = normalize(r.name)
        assert name in pins, f"{name} ({r}) has no pin in constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {r}"
