"""Files in and out, for checkpoints, adapters, tokenizers and chat templates: the one error they raise, the safe
readers and the atomic writer.

- CheckpointError: a file that cannot be used; its message names the file and the tensor or key.
- read_json: a JSON object file. torch_load: torch.load(weights_only=True, mmap=True): checkpoints are data, never
  code. read_tensor_file: every tensor of a safetensors or torch file (told apart by their first bytes).
- write_atomic: a temporary name in the same folder, renamed into place, and never over an existing file unless
  asked (overwrite=True), never through or over a link (refuse_link). The checkpoints and adapters this package
  writes go through it.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint, tokenizer or adapter file that cannot be used; the message names the file and the tensor or key.
    .remedy: (argument, value) that gets past it, when the message names one (model/cli.py's cli_message)."""

    def __init__(self, message: str, *, remedy: tuple[str, object] | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy


def read_json(file: Path) -> dict:
    """A JSON object file (config.json, tokenizer_config.json, ...), or a CheckpointError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read as JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def torch_load(file: Path, *, unwrap: bool = False) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (and mmap when the file allows it): a dict of tensors, or an error.
    unwrap: a dict whose "model" entry is the dict of tensors (the official V2 release's {"model", "config"},
    litgpt's fabric.save) gives that entry."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # files of torch's legacy (pre-zip) format cannot be memory-mapped
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors: the file holds something other than plain tensors
        raise CheckpointError(f"{file}: cannot be loaded with weights_only=True: it is not a plain checkpoint of "
                              f"tensors ({load_error(e)})") from e
    if unwrap and isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointError(f"{file}: expected a dict of tensors by name, but a key is {type(odd).__name__} "
                              f"{odd!r}")
    return state


def load_error(e: Exception) -> str:
    """torch.load's error in one line: for weights_only's refusal (whose message runs to several lines of advice)
    the sentence naming what it refused ("UnpicklingError: Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked."), else the message's first line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    line = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    sentence = re.split(r"(?<=\.) ", line.removeprefix("WeightsUnpickler error: "), maxsplit=1)[0]
    return f"{type(e).__name__}: {sentence}"


def read_tensor_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors or torch file, and the safetensors metadata ({} for torch files)."""
    try:
        with open(file, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror})") from e
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e
    return torch_load(file, unwrap=True), {}


def refuse_link(path: Path) -> None:
    """FileExistsError if path is a link (to a file, a folder or nothing): a writer never writes through one, nor
    replaces it, even when asked to overwrite."""
    if path.is_symlink():
        raise FileExistsError(f"{path} is a link to {os.readlink(path)}: never written through or replaced; remove "
                              "the link or give another name")


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write data to path through a temporary file in the same folder, renamed into place (os.replace): a killed
    process never leaves a half-written file, a failed write (a full disk) leaves path as it was and raises an
    OSError naming path. An existing file is replaced only with overwrite=True; a link at path (to anything) is
    refused (FileExistsError), never written through or replaced."""
    path = Path(path)
    refuse_link(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, ...: name the file meant, not the temporary one (which goes)
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path
