"""One error type for every input problem a user can fix, and a helper to name the closest valid choice.

The trainer catches `ReproError` at the top level and prints its message alone (no traceback),
so every message must say what was wrong and how to fix it.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable


class ReproError(Exception):
    """A problem with the user's input (config, names, data) that the user can fix."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ' Did you mean ...?' hint (or an empty string) for a misspelt `name`."""
    matches = difflib.get_close_matches(str(name), sorted(choices), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ReproError:
    """Build the standard 'unknown X' error listing the closest and all valid names."""
    choices = sorted(choices)
    return ReproError(
        f"unknown {kind} {name!r}.{closest(name, choices)} Valid {kind} names: {', '.join(choices)}."
    )


def exit_status(action: Callable[[], object]) -> int:
    """Run a command-line action: 0 when it finishes; 2, with its message as one `error:` line on stderr and
    no traceback, when it raises a ReproError (the message says what to fix)."""
    try:
        action()
    except ReproError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
