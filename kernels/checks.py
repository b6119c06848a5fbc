"""The project's one check of an integer argument: an int (never a bool, which Python counts as one) >= a minimum.

Pure Python, in the lowest layer (kernels/), so that kernels/, model/, train/ and bench/ can all share it.
"""

from __future__ import annotations

from collections.abc import Callable


def is_int(value: object) -> bool:
    """True for an int, False for a bool (an int subclass: True would pass as 1) and everything else."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int, *, what: str | None = None,
              error: Callable[[str], Exception] = ValueError) -> int:
    """value, if it is an int >= minimum and not a bool; else raises error(f"{name} must be {what}, got {value!r}"),
    what defaulting to f"an int >= {minimum}" (callers keep their own wording, e.g. "a positive int"). error: the
    exception to raise, built from the message (ValueError, or e.g. functools.partial(ConfigValueError, field))."""
    if not is_int(value) or value < minimum:
        raise error(f"{name} must be {what or f'an int >= {minimum}'}, got {value!r}")
    return value
