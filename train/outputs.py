"""A run's files in OUT: which are its own, the checks before a run writes, log.csv, TensorBoard, loss.png.

Only rank 0 writes, and every file goes to a temporary name first and is renamed into place (write_atomic).
The run knows its own files by their content, not only their names: adapters by this project's metadata,
train_state.pt by its format entry, log.csv by its header, loss.png by its PNG Software entry, tensorboard/ by
holding only event files named *.llama-adapter-triton, adapter-peft/ by holding only its two files, marked in the
safetensors metadata. An OUT holding any of them is refused unless --resume or --overwrite; a file or folder of one
of those names that the run did not write, and a link of one of those names (to anything), is never deleted, followed
or written over. Temporary .NAME.XXXXXXXX.tmp files of a killed run are deleted by --resume and --overwrite (a link
of such a name: the link itself); other files in OUT are left alone.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llama_adapter_triton.model.adapters.ours import ADAPTER_FORMAT
from llama_adapter_triton.model.io import write_atomic
from llama_adapter_triton.train.config import PEFT_DIR, PROG, FinetuneConfig, UsageError
from llama_adapter_triton.train.state import STATE_FILE, STATE_FORMAT

ADAPTER_FILE = "adapter.safetensors"
EPOCH_ADAPTER = "adapter-epoch{}.safetensors"  # N = 1, 2, ...: the adapter after epoch N
LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"
TB_DIR = "tensorboard"
TB_SUFFIX = ".llama-adapter-triton"  # the end of the event files' names the run writes in TB_DIR
PLOT_TAG = "llama-adapter-triton python -m train.finetune"  # the PNG's Software entry: a fixed tag (the command's
# name when it was first written), so that --overwrite and --resume know the plots of every version's runs
LOG_COLUMNS = ("step", "epoch", "split", "loss", "lr", "grad_norm", "examples", "tokens", "tokens_computed",
               "tokens_per_s", "step_s", "elapsed_s", "memory_gib")


class OutputError(OSError):
    """A file of the run could not be written (a full disk, ...); the message names it and says what is intact."""


_TEMP_RE = re.compile(r"\.(adapter(-epoch\d+)?\.safetensors|adapter-peft|train_state\.pt|log\.csv|loss\.png)\."
                      r"[0-9a-f]{8}\.tmp")


def _own_file(path: Path) -> str | None:
    """None if path is a file (or event folder) a run of llama-adapter finetune wrote, recognised by its content;
    else why not. path has one of the names the run writes."""
    try:
        if path.is_symlink():  # never followed: what it leads to is not the run's, whatever it holds
            return f"a link to {os.readlink(path)}: never followed"
        if path.name == TB_DIR:
            if not path.is_dir():
                return "not a folder"
            other = [p.name for p in path.iterdir() if not (p.is_file() and not p.is_symlink()
                                                            and p.name.startswith("events.out.tfevents.")
                                                            and p.name.endswith(TB_SUFFIX))]
            return f"holds {other[0]!r}, not an event file of {PROG}'s (*{TB_SUFFIX})" if other else None
        if path.name == PEFT_DIR:  # --export peft: the two files save_adapter(format="peft") writes, nothing else
            if not path.is_dir():
                return "not a folder"
            names = sorted(p.name for p in path.iterdir())
            if names != ["adapter_config.json", "adapter_model.safetensors"]:
                return f"holds {names}, not only the adapter_config.json and adapter_model.safetensors it writes"
            links = [p.name for p in path.iterdir() if p.is_symlink()]
            if links:
                return f"its {links[0]} is a link to {os.readlink(path / links[0])}: never followed"
            with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
                return None if (f.metadata() or {}).get("written_by") == ADAPTER_FORMAT else \
                    f"not a PEFT adapter written by {PROG}"
        if not path.is_file():
            return "not a file"
        if path.name == STATE_FILE:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return None if isinstance(state, dict) and state.get("format") == STATE_FORMAT else \
                f"not a train state of {PROG}'s"
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if path.name == LOG_FILE:
            return None if head.split(b"\r\n", 1)[0] == ",".join(LOG_COLUMNS).encode() else \
                f"its first line is not {PROG}'s header"
        if path.name == PLOT_FILE:
            return None if b"tEXtSoftware\0" + PLOT_TAG.encode() in head else f"not a plot of {PROG}'s"
        with safe_open(path, framework="pt") as f:  # adapter.safetensors, adapter-epochN.safetensors
            return None if (f.metadata() or {}).get("format") == ADAPTER_FORMAT else "not an adapter file of ours"
    except Exception as e:  # unreadable, or not of the format its name says: not ours
        return f"cannot be read as one ({type(e).__name__})"


def earlier_outputs(out: Path) -> tuple[list[Path], list[str], list[Path]]:
    """What out holds under the names a run writes: (the files of an earlier run, recognised by their content;
    "name (why not)" for those that are not ours; temporary .NAME.*.tmp files a killed run left)."""
    if not out.is_dir():
        return [], [], []
    named = [out / n for n in (ADAPTER_FILE, STATE_FILE, LOG_FILE, PLOT_FILE, TB_DIR, PEFT_DIR)
             if os.path.lexists(out / n)]  # a link too, even one that leads nowhere
    named += sorted(out.glob(EPOCH_ADAPTER.format("*")))
    ours, foreign = [], []
    for path in named:
        why = _own_file(path)
        ours.append(path) if why is None else foreign.append(f"{path.name} ({why})")
    return ours, foreign, sorted(p for p in out.iterdir() if _TEMP_RE.fullmatch(p.name))


def check_outputs(config: FinetuneConfig) -> list[Path]:
    """Refuse an out folder this process cannot write, one holding files of the run's names that it did not write,
    or one holding an earlier run's results without --resume / --overwrite. Returns what the run deletes: the
    earlier results (--overwrite) and temporary files a killed run left (--overwrite, --resume)."""
    if config.out.exists() and not config.out.is_dir():
        raise UsageError(f"--out {config.out} is a file; give a folder")
    folder = config.out  # the folder, or the one it would be made in
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {config.out}: {folder} is a file, so the folder cannot be made")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {config.out}: {folder} is not writable by this process")
    ours, foreign, temps = earlier_outputs(config.out)
    if foreign:
        raise FileExistsError(f"{config.out} holds files of the names {PROG} writes that it did not write: "
                              f"{'; '.join(foreign)}. They are never deleted or written over: move them away, or "
                              "choose another --out")
    if config.resume and not (config.out / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {config.out / STATE_FILE} not found, so there is no run to continue "
                                "(start without --resume)")
    found = ours + temps
    if found and not (config.resume or config.overwrite):
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise FileExistsError(f"{config.out} holds the results of an earlier run ({names}); pass --resume to "
                              "continue it, or --overwrite to delete them and start again")
    return temps if config.resume else found


def delete_outputs(paths: list[Path]) -> None:
    """Delete what check_outputs returned: an earlier run's files, a killed run's temporaries (rank 0 only). A link
    is never followed: a temporary's name that is a link goes itself (its target stays); earlier_outputs refuses
    links of the run's own names."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():  # tensorboard/ (our event files only), adapter-peft/ (our two
            for entry in path.iterdir():  # files only), a temporary folder
                entry.unlink()  # (a link inside a temporary folder: the link itself)
            path.rmdir()
        else:
            path.unlink()


class RunLog:
    """log.csv (one row per step and per eval), TensorBoard events when installed; rank 0 only."""

    def __init__(self, out: Path, *, resume_step: int | None, tensorboard: bool):
        self.path = out / LOG_FILE
        if resume_step is not None and self.path.exists():  # drop the rows after the saved step: they are redone
            with open(self.path, newline="") as f:
                # (a row cut short by a full disk or a kill has missing fields: it goes too)
                rows = [r for r in csv.DictReader(f) if None not in r and None not in r.values()
                        and r["step"].isdigit() and int(r["step"]) <= resume_step]
            text = io.StringIO()
            writer = csv.DictWriter(text, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
            write_atomic(self.path, text.getvalue().encode(), overwrite=True)
        else:
            write_atomic(self.path, (",".join(LOG_COLUMNS) + "\r\n").encode(), overwrite=resume_step is not None)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, LOG_COLUMNS)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb = SummaryWriter(str(out / TB_DIR), purge_step=None if resume_step is None else resume_step + 1,
                                        filename_suffix=TB_SUFFIX)

    def write(self, **row: Any) -> None:
        try:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()
        except OSError as e:  # a full disk: name the file (the rows after the last saved step are redone on resume)
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"{row['split']}/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(log_path: Path, png_path: Path) -> Path:
    """The train and eval loss curves of log.csv as a PNG (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == split]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"{split} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(f"LLaMA-Adapter fine-tuning: {log_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": PLOT_TAG})  # how --overwrite knows it
    return write_atomic(png_path, buf.getvalue(), overwrite=True)


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident memory of this process on a CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

