"""Output: rich for people (plain text when piped), JSON for scripts."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TextIO

from rich.cells import cell_len as cell_len  # (re-exported: what a line measures)
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
    items: bool = False
    under: bool | str = False
    stage: int = 1
    drop: int = 0
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
                   carry: bool = False, items: bool = False, under: bool | str = False,
                   drop: int = 0, stage: int = 1) -> None:
        """A column: a value column unless *text* (free text, may wrap). With
        *carry*, an empty cell means "as above" (a group's first row holds
        it): records repeat the value above. When the table does not fit the
        width (narrow()): an *items* column (a comma-separated list) wraps after
        its commas, never inside an item; an *under* column is stacked under
        the column before it, or under the column headed *under* when that is
        a header (a column before this one; both headers, both values in one
        cell; the wide table keeps the columns' order), at *stage* 1 first,
        then 2 (a second stacking for narrower widths); a *drop* column (1
        first, then 2, ...) is left out."""
        self.columns.append(_Column(header, justify, text, carry, items, under, stage, drop))

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
                lines = (wrap_items(value, width - 2) if col.items
                         else _wrap(value, width - 2, col.text, fold))
                for line in lines:
                    yield "  " + line, style

    def _slots(self, stack: int, dropped: int) -> list[list[int]]:
        """Column indexes per printed column: *stack* puts each under column of
        stage <= *stack* below its column; columns with 0 < drop <= *dropped*
        are left out."""
        slots: list[list[int]] = []
        for i, col in enumerate(self.columns):
            if 0 < col.drop <= dropped:
                continue
            target = None
            stacked = bool(col.under) and col.stage <= stack
            if stacked and isinstance(col.under, str):
                target = next((slot for slot in slots
                               if any(self.columns[j].header == col.under for j in slot)), None)
            elif stacked and slots:
                target = slots[-1]
            if target is not None:
                target.append(i)
            else:
                slots.append([i])
        return slots

    def _cell_lines(self, i: int, n: int, width: int) -> list[str]:
        """Row *n*'s cell of column *i* as lines of at most *width* (a value
        wider stays whole on its line)."""
        col = self.columns[i]
        value = col.cells[n]
        if not value.strip():
            return []
        if col.text:
            return _wrap(value, width, True, False)
        if col.items:
            return wrap_items(value, width)
        return [value]

    def _slot_widths(self, slots: list[list[int]], width: int) -> list[int] | None:
        """Each printed column's width within *width*, or None when it does not fit."""
        mins: list[int] = []
        wants: list[int] = []
        for slot in slots:
            lo = hi = max(cell_len(self.columns[i].header) for i in slot)
            for i in slot:
                col = self.columns[i]
                for cell in col.cells:
                    full = cell_len(cell)
                    if col.text:
                        least = max((cell_len(x) for x in cell.split()), default=0)
                    elif col.items:
                        least = max((cell_len(x) for x in _items(cell)), default=0)
                    else:
                        least = full
                    lo, hi = max(lo, least), max(hi, full)
            mins.append(lo)
            wants.append(hi)
        spare = width - sum(mins) - self.PAD * len(slots)
        if spare < 0:
            return None
        out = list(mins)
        for k, (lo, hi) in enumerate(zip(mins, wants, strict=True)):
            give = min(spare, hi - lo)
            out[k] += give
            spare -= give
        return out

    def narrow(self, width: int) -> list[tuple[str, str | None]] | None:
        """(line, style) of the table in *width* with lists wrapped, then under
        columns stacked, then drop columns left out; None if still too wide."""
        drops = sorted({c.drop for c in self.columns if c.drop})
        stages = max((c.stage for c in self.columns if c.under), default=0)
        tries = [(k, 0) for k in range(stages + 1)] + [(stages, d) for d in drops]
        for stack, dropped in tries:
            slots = self._slots(stack, dropped)
            widths = self._slot_widths(slots, width)
            if widths is not None:
                return self._lines(slots, widths)
        return None

    def _lines(self, slots: list[list[int]], widths: list[int]) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        if self.title:
            out.append((self.title, None))

        def join(cells: list[list[str]], style: str | None) -> None:
            for k in range(max((len(c) for c in cells), default=0)):
                parts = []
                for slot, w, c in zip(slots, widths, cells, strict=True):
                    text = c[k] if k < len(c) else ""
                    pad = " " * max(w - cell_len(text), 0)
                    right = self.columns[slot[0]].justify == "right"
                    parts.append(" " + (pad + text if right else text + pad) + " ")
                out.append(("".join(parts).rstrip(" "), style))

        join([[self.columns[i].header for i in slot] for slot in slots], "bold")
        for n, style in enumerate(self.styles):
            # an empty stacked cell keeps its (blank) line, so each value stays
            # on its header's line
            join([[line for i in slot
                   for line in (self._cell_lines(i, n, w) or ([""] if i != slot[-1] else []))]
                  for slot, w in zip(slots, widths, strict=True)], style)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        if self.needed_width() <= width:
            for line in console.render_lines(self.table(), options, pad=False):
                yield from _rstrip(line)
                yield Segment.line()
            return
        lines = self.narrow(width)
        if lines is not None:
            for text, style in lines:
                yield Segment(text, console.get_style(style) if style else None)
                yield Segment.line()
            return
        for text, style in self.records(width, fold=not console.soft_wrap):
            yield Segment(text, console.get_style(style) if style else None)
            yield Segment.line()


def _items(value: str) -> list[str]:
    """A list cell's items, each with the comma that follows it ("A, B" or "A,B")."""
    out: list[str] = []
    for k, part in enumerate(value.split(",")):
        last = k == len(value.split(",")) - 1
        item = part.strip() + ("" if last else ",")
        if item:
            out.append(item)
    return out


def wrap_items(value: str, width: int, sep: str | None = None) -> list[str]:
    """A comma-separated list in lines of at most *width*, broken after commas,
    never inside an item (an item wider than *width* has a line to itself).
    The items are joined as in *value* (", " or ",")."""
    if sep is None:
        sep = " " if ", " in value else ""
    lines: list[str] = []
    for item in _items(value):
        if lines and cell_len(lines[-1]) + len(sep) + cell_len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def wrap_words(words: list[str], width: int, first: str = "", rest: str = "  ") -> list[str]:
    """*words* (units never split: a value, a list item with its comma) joined by
    spaces in lines of at most *width*: the first line starts with *first*,
    the others with *rest*; a unit wider than a line has a line to itself."""
    whole = first + " ".join(words)
    if cell_len(whole) <= width:  # (most labels of a tree: one measure, not one a unit)
        return [whole]
    return wrap_each(words, width, first, rest)


def wrap_each(words: list[str], width: int, first: str = "", rest: str = "  ") -> list[str]:
    """wrap_words(), measuring unit after unit (for labels that do not fit)."""
    lines = [first]
    bare = True
    for word in words:
        if not bare and cell_len(lines[-1]) + 1 + cell_len(word) > width:
            lines.append(rest)
            bare = True
        lines[-1] += word if bare else " " + word
        bare = False
    return lines


def say(text: str, indent: str = "    ", units: list[str] | None = None,
        style: str | None = None) -> None:
    """Print a line of words at the console's width (in *style*): as it is
    when it fits, else wrapped between words (a word, or each of *units* when
    given, is never cut), continuation lines indented by *indent* more."""
    c = console()
    if cell_len(text) <= c.width:
        c.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
        return
    lead = text[:len(text) - len(text.lstrip(" "))]
    for line in wrap_words(units or text.split(), c.width, lead, lead + indent):
        c.print(line, style=style, markup=False, highlight=False, soft_wrap=True)


class TextLines:
    """Lines printed as they are, each one line of the console (made to fit:
    nothing here wraps or styles them)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield Segment(line)
            yield Segment.line()


def print_lines(c: Console, lines: Iterable[str], batch: int = 4096) -> None:
    """Print *lines* (made at c.width) a batch at a time: rich keeps all that one
    print() renders until it ends, so a tree of 10^6 lines is never held."""
    it = iter(lines)
    while chunk := list(islice(it, batch)):
        c.print(TextLines(chunk))


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

