"""Output: rich for people (plain text when piped), JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from kvminspect.errors import Problem
from kvminspect.layout import MissingMember, Unknown


def hx(v: int | Unknown | None) -> str | None:
    """An address-like value as JSON: a "0x…" string (64-bit safe), null, or "unknown"."""
    if v is None or isinstance(v, Unknown):
        return None if v is None else "unknown"
    return hex(v)


def hexs(v: int | Unknown | None) -> str:
    """An address-like value for people: 0x…, "unknown", or "?" when unreadable."""
    if v is None or isinstance(v, Unknown):
        return "?" if v is None else "unknown"
    return hex(v)


def plain(v: Any) -> Any:
    """*v*, or the string "unknown" for UNKNOWN (for writers without a JSON hook)."""
    return "unknown" if isinstance(v, Unknown) else v


def _json_default(o: object) -> object:
    """UNKNOWN (a member this kernel lacks) is the string "unknown" in JSON."""
    if isinstance(o, Unknown):
        return "unknown"
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


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


def dumps(doc: Any) -> str:
    """JSON text of *doc* (indent 1), UNKNOWN as "unknown"."""
    return json.dumps(doc, indent=1, default=_json_default)


def emit_json(doc: dict[str, Any], problems: list[Problem],
              missing: tuple[MissingMember, ...] = ()) -> None:
    """One JSON document on stdout, with an "errors" list of skipped objects.

    With *missing*, a "warnings" list names each member this kernel lacks
    (those fields are "unknown" in the document).
    """
    doc = dict(doc)
    doc["errors"] = [p.to_json() for p in problems]
    if missing:
        doc["warnings"] = [m.to_json() for m in missing]
    sys.stdout.write(dumps(doc) + "\n")


def warn_problems(problems: list[Problem], missing: tuple[MissingMember, ...] = ()) -> None:
    """Each missing member, then each skipped or inconsistent object, on stderr."""
    for m in missing:
        print(f"kvminspect: warning: {m}", file=sys.stderr)
    for p in problems:
        print(f"kvminspect: warning: {p}", file=sys.stderr)


def flag(b: bool, text: str) -> str:
    return text if b else ""
