"""What the tests of bench/'s scripts share: the CSV rows indexed, bench/results/ watched, a bad flag's exit, the GPU
mark, a wrong provider's run and patch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
import torch

from llama_adapter_triton import adapter_layers
from llama_adapter_triton.bench import common

ON_CUDA = torch.cuda.is_available()


def gpu_only(test: Callable) -> Callable:
    """A test that needs a CUDA GPU: marked gpu (bench/gpu_session.sh selects them), skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")(test))


def index(rows: list[dict[str, str]]) -> dict[tuple[str, str, str, str], str]:
    """A CSV's rows by (provider, mode, shape, metric) -> value."""
    return {(r["provider"], r["mode"], r["shape"], r["metric"]): r["value"] for r in rows}


def results_snapshot() -> dict[str, float]:
    """bench/results/'s files and their times: a smoke run must leave them as they were."""
    if not common.RESULTS_DIR.exists():
        return {}
    return {str(p): p.stat().st_mtime for p in common.RESULTS_DIR.rglob("*")}


def assert_names_the_argument(main: Callable[[Sequence[str]], int], argv: Sequence[str], flag: str, capsys) -> None:
    """A smoke run with a bad argv exits 2 (argparse's error) naming flag, and writes nothing into bench/results/."""
    with pytest.raises(SystemExit) as exc:
        main(["--smoke", *argv])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (common.RESULTS_DIR / "smoke").exists()


def assert_stops_before_timing(main: Callable[..., int], argv: Sequence[str], providers: dict, wrong: str, tmp_path,
                               what: str, capsys) -> tuple[str, list[dict[str, str]]]:
    """A run with the wrong provider exits 1 with the correctness failure naming it, records nothing of it and draws
    no plot; returns (stderr, the CSV rows) for the script's own assertions."""
    assert main(argv, providers=providers) == 1
    err = capsys.readouterr().err
    assert "CORRECTNESS CHECK FAILED" in err and repr(wrong) in err
    rows = common.read_rows(tmp_path / f"{what}.csv")
    assert not any(r["provider"] == wrong for r in rows)  # nothing recorded for a wrong answer
    assert not list(tmp_path.glob("*.png"))
    return err, rows


def gpu_rows(main: Callable[[Sequence[str]], int], tmp_path, what: str,
             argv: Sequence[str]) -> dict[tuple[str, str, str, str], str]:
    """A small real run on the GPU into tmp_path: it must succeed; its CSV rows, indexed."""
    assert main(["--out", str(tmp_path), *argv]) == 0
    return index(common.read_rows(tmp_path / f"{what}.csv"))


@contextlib.contextmanager
def raw_gate(model):
    """A wrong provider's patch, the official release's ambiguity: the raw gate instead of tanh(gate)."""
    layers = list(adapter_layers(model).values())
    for m in layers:
        m.gate_act = "identity"
    try:
        yield
    finally:
        for m in layers:
            m.gate_act = "tanh"
