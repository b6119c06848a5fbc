"""constraints.txt's pins against what is installed: `python tests/pins.py constraints.txt` lists the packages
whose installed version is not the pinned one (what `make test-latest` moved), and exits 0."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares them: "Jinja2" and "jinja2", "typing_extensions" and "-"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line; comments and blank lines skipped."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}")
        pins[normalize(name.strip())] = version.strip()
    return pins


def moved(pins: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """(name, pinned, installed or None) for each pin the environment does not hold (a local version such as
    torch's +cpu counts as its public one)."""
    out = []
    for name, pinned in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != pinned:
            out.append((name, pinned, installed))
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "constraints.txt")
    changes = moved(read_pins(path))
    for name, pinned, installed in changes:
        print(f"moved: {name} {pinned} -> {installed or 'not installed'}")
    print(f"{len(changes)} of the pins in {path} moved" if changes else f"every pin in {path} holds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
