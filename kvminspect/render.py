"""Output: rich for people (plain text when piped), JSON for scripts."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from kvminspect.errors import Problem
from kvminspect.fmt import hx as hx  # the one hex formatter, re-exported for the renderers
from kvminspect.layout import Missing, NoValue


def plural(n: int, one: str, many: str) -> str:
    """'1 batch', '2 batches': *n* and the word that goes with it."""
    return f"{n} {one if n == 1 else many}"


def plain(v: Any) -> Any:
    """*v*, or a NoValue's name (for writers without a JSON hook)."""
    return v.name if isinstance(v, NoValue) else v


def _json_default(o: object) -> object:
    """UNKNOWN and UNREADABLE are the strings "unknown" and "unreadable" in JSON."""
    if isinstance(o, NoValue):
        return o.name
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


DEFAULT_WIDTH = 200  # piped or redirected, COLUMNS unset: wide enough that tables fit
MIN_WIDTH = 20  # a narrower COLUMNS is taken as this: a 0x + 16-digit address still fits


def columns_env() -> int | None:
    """$COLUMNS as a width: None when unset, not a number, or not positive."""
    text = os.environ.get("COLUMNS", "").strip()
    try:
        n = int(text)
    except ValueError:
        return None
    return n if n > 0 else None


def console_width(tty: bool) -> int:
    """The output width: $COLUMNS (a bad or non-positive one is ignored), else
    the terminal's (on a terminal) or DEFAULT_WIDTH; never below MIN_WIDTH."""
    cols = columns_env()
    if cols is None:
        cols = shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns if tty else DEFAULT_WIDTH
        if cols <= 0:
            cols = DEFAULT_WIDTH
    return max(cols, MIN_WIDTH)


def console() -> Console:
    """A rich console on the current sys.stdout (which REPL redirects swap).

    On a terminal: colours. Piped or redirected: plain text, no escape codes,
    lines not wrapped. The width is console_width()'s.
    """
    out = sys.stdout
    tty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, force_terminal=tty, no_color=not tty, highlight=False,
                   width=console_width(tty), soft_wrap=not tty, emoji=False)


@dataclass
class _Column:
    header: str
    justify: str = "left"
    text: bool = False
    carry: bool = False
    cells: list[str] = field(default_factory=list)


class Grid:
    """A table whose values are never cut: rich's Table as it fits, else records.

    Value columns (addresses, ids, numbers, names) are never wrapped or
    shortened; free-text columns (text=True) wrap between words. When the
    width is below what a row needs with every value whole, each row is
    printed as a block of 'HEADER: value' lines instead. No line ends in
    spaces. Built like rich's Table (add_column, add_row) and printed with
    console().print(grid).
    """

    PAD = 2  # rich's box-less table: one space either side of each cell
    TEXT_MIN = 16  # a free-text column is given at least this (or its full text)

    def __init__(self, title: str | None = None) -> None:
        self.title = title
        self.columns: list[_Column] = []
        self.styles: list[str | None] = []

    def add_column(self, header: str, justify: str = "left", text: bool = False,
                   carry: bool = False) -> None:
        """A column: a value column unless *text* (free text, may wrap). With
        *carry*, an empty cell means "as above" (a group's first row holds
        it): records repeat the value above."""
        self.columns.append(_Column(header, justify, text, carry))

    def add_row(self, *cells: str | Text, style: str | None = None) -> None:
        """One row: a cell per column (plain text, never rich markup)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        for col, cell in zip(self.columns, cells, strict=True):
            col.cells.append(cell.plain if isinstance(cell, Text) else str(cell))
        self.styles.append(style)

    def needed_width(self) -> int:
        """The narrowest width a row fits in: every value column as wide as its
        widest cell, every text column as its longest word (at least TEXT_MIN)."""
        total = 0
        for col in self.columns:
            w = cell_len(col.header)
            for cell in col.cells:
                if col.text:
                    word = max((cell_len(x) for x in cell.split()), default=0)
                    w = max(w, word, min(cell_len(cell), self.TEXT_MIN))
                else:
                    w = max(w, cell_len(cell))
            total += w + self.PAD
        return total

    def table(self) -> Table:
        """The rich Table of the rows (value columns no_wrap, text columns fold)."""
        t = Table(box=None, header_style="bold", title=self.title, title_justify="left")
        for col in self.columns:
            t.add_column(col.header, justify=col.justify,  # type: ignore[arg-type]
                         no_wrap=not col.text, overflow="fold")
        for n, style in enumerate(self.styles):
            t.add_row(*(Text(c.cells[n]) for c in self.columns), style=style)
        return t

    def records(self, width: int, fold: bool) -> Iterator[tuple[str, str | None]]:
        """(line, style) of each row as a block of 'HEADER: value' lines after a
        blank line, empty cells left out (a carry column's: the value above).
        A value that does not fit after its header goes on the next line,
        indented; with *fold* (a terminal, which crops), a value wider than
        that is folded, not lost."""
        if self.title:
            yield self.title, None
        above = ["" for _ in self.columns]
        for n, style in enumerate(self.styles):
            yield "", None
            for i, col in enumerate(self.columns):
                value = col.cells[n]
                if col.carry:
                    value = above[i] = value if value.strip() else above[i]
                if not value.strip():
                    continue
                key = f"{col.header}:"
                if cell_len(key) + 1 + cell_len(value) <= width:
                    yield f"{key} {value}", style
                    continue
                yield key, style
                for line in _wrap(value, width - 2, col.text, fold):
                    yield "  " + line, style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        if self.needed_width() <= width:
            for line in console.render_lines(self.table(), options, pad=False):
                yield from _rstrip(line)
                yield Segment.line()
            return
        for text, style in self.records(width, fold=not console.soft_wrap):
            yield Segment(text, console.get_style(style) if style else None)
            yield Segment.line()


def _wrap(value: str, width: int, text: bool, fold: bool) -> list[str]:
    """*value* in lines of at most *width*: free text wrapped between words,
    a value kept whole unless *fold* (then cut into *width*-sized pieces)."""
    if text:
        lines: list[str] = []
        for word in value.split():
            if lines and cell_len(lines[-1]) + 1 + cell_len(word) <= width:
                lines[-1] += " " + word
            else:
                lines.append(word)
    else:
        lines = [value]
    if not fold:
        return lines
    return [line[i:i + width] for line in lines for i in range(0, max(len(line), 1), width)]


def _rstrip(line: list[Segment]) -> list[Segment]:
    """A rendered line without its trailing spaces."""
    line = list(line)
    while line:
        seg = line[-1]
        if seg.control:
            break
        text = seg.text.rstrip(" ")
        if text:
            line[-1] = Segment(text, seg.style, seg.control)
            break
        line.pop()
    return line


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
              missing: tuple[Missing, ...] = ()) -> None:
    """One JSON document on stdout, with an "errors" list of skipped objects.

    A "warnings" list names each member this kernel lacks (those fields are
    "unknown" in the document) and each module type its debug info lacks.
    """
    doc = dict(doc)
    doc["errors"] = [p.to_json() for p in problems]
    doc["warnings"] = [m.to_json() for m in missing]
    _write_json(doc, sys.stdout)
    sys.stdout.write("\n")


def warn_problems(problems: list[Problem], missing: tuple[Missing, ...] = ()) -> None:
    """Each missing member or type, then each skipped or inconsistent object, on stderr."""
    for m in missing:
        print(f"kvminspect: warning: {m}", file=sys.stderr)
    for p in problems:
        print(f"kvminspect: warning: {p}", file=sys.stderr)

