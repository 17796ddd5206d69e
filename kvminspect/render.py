"""Output: rich for people (plain text when piped), JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from rich.console import Console

from kvminspect.errors import Problem
from kvminspect.layout import MissingMember, NoValue


def hx(v: int | NoValue | None) -> str | None:
    """An address-like value as JSON: a "0x…" string (64-bit safe), null (none),
    or the NoValue's name ("unknown", "unreadable")."""
    if v is None or isinstance(v, NoValue):
        return None if v is None else v.name
    return hex(v)


def hexs(v: int | NoValue | None) -> str:
    """An address-like value for people: 0x…, "-" (none), "unknown" or "unreadable"."""
    if v is None or isinstance(v, NoValue):
        return "-" if v is None else v.name
    return hex(v)


def plain(v: Any) -> Any:
    """*v*, or a NoValue's name (for writers without a JSON hook)."""
    return v.name if isinstance(v, NoValue) else v


def _json_default(o: object) -> object:
    """UNKNOWN and UNREADABLE are the strings "unknown" and "unreadable" in JSON."""
    if isinstance(o, NoValue):
        return o.name
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


class Stream:
    """A JSON value written piece by piece: *chunks()* yields its text.

    For values sized by the shadow-page count (tree's 10^5 pages): each piece
    is made by the C encoder and written at once, so the whole value is never
    held in memory, as objects or as text. emit_json() puts the pieces where
    the Stream sits in the document.
    """

    def __init__(self, chunks: Callable[[], Iterator[str]]) -> None:
        self.chunks = chunks


def compact(value: Any) -> str:
    """JSON text of *value* on one line (the C encoder), UNKNOWN as "unknown"."""
    return _COMPACT.encode(value)


_COMPACT = json.JSONEncoder(default=_json_default)


def dumps(doc: Any) -> str:
    """JSON text of *doc* (indent 1), UNKNOWN as "unknown"; Streams are not expanded."""
    return json.dumps(doc, indent=1, default=_json_default)


def _write_json(doc: Any, out: TextIO) -> None:
    """dumps(doc) to *out*, each Stream in it replaced by its pieces."""
    streams: list[Stream] = []

    def default(o: object) -> object:
        if isinstance(o, Stream):
            streams.append(o)
            return _STREAM_MARK
        return _json_default(o)

    text = json.dumps(doc, indent=1, default=default)
    parts = text.split(json.dumps(_STREAM_MARK))
    out.write(parts[0])
    for stream, rest in zip(streams, parts[1:], strict=True):
        buf: list[str] = []
        size = 0
        for chunk in stream.chunks():
            buf.append(chunk)
            size += len(chunk)
            if size >= 1 << 20:  # write about a MiB at a time
                out.write("".join(buf))
                buf.clear()
                size = 0
        out.write("".join(buf))
        out.write(rest)


_STREAM_MARK = "\x00kvminspect-stream\x00"  # never in real data (a NUL in a JSON string)


def emit_json(doc: dict[str, Any], problems: list[Problem],
              missing: tuple[MissingMember, ...] = ()) -> None:
    """One JSON document on stdout, with an "errors" list of skipped objects.

    A "warnings" list names each member this kernel lacks (those fields are
    "unknown" in the document).
    """
    doc = dict(doc)
    doc["errors"] = [p.to_json() for p in problems]
    doc["warnings"] = [m.to_json() for m in missing]
    _write_json(doc, sys.stdout)
    sys.stdout.write("\n")


def warn_problems(problems: list[Problem], missing: tuple[MissingMember, ...] = ()) -> None:
    """Each missing member, then each skipped or inconsistent object, on stderr."""
    for m in missing:
        print(f"kvminspect: warning: {m}", file=sys.stderr)
    for p in problems:
        print(f"kvminspect: warning: {p}", file=sys.stderr)

