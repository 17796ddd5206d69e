"""Output: rich for people (plain text when piped), JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from kvminspect.errors import Problem


def hx(v: int | None) -> str | None:
    """An address-like value as JSON: a "0x…" string (64-bit safe), or null."""
    return None if v is None else hex(v)


def console() -> Console:
    """A rich console on the current sys.stdout (which REPL redirects swap).

    On a terminal: colours. Piped or redirected: plain text, no escape codes,
    and wide enough that tables do not wrap.
    """
    out = sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    width = None if tty else int(os.environ.get("COLUMNS", "200"))
    return Console(file=out, force_terminal=tty, no_color=not tty, highlight=False,
                   width=width, soft_wrap=not tty, emoji=False)


def emit_json(doc: dict[str, Any], problems: list[Problem]) -> None:
    """One JSON document on stdout, with an "errors" list of skipped objects."""
    doc = dict(doc)
    doc["errors"] = [p.to_json() for p in problems]
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")


def warn_problems(problems: list[Problem]) -> None:
    """Each skipped or inconsistent object as one warning line on stderr."""
    for p in problems:
        print(f"kvminspect: warning: {p}", file=sys.stderr)


def flag(b: bool, text: str) -> str:
    return text if b else ""
