"""Issue 18, items 1 and 4: no value is cut at any width, and the main tables fit
80 columns without the KEY: value fallback."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from functools import cache

import pytest

from kvminspect import render
from kvminspect.cli import run_one
from kvminspect.render import wrap_each, wrap_words
from kvminspect.session import Session
from tests.conftest import FIXTURES, MULTI_VM, VMCORES, open_fixture

COMMANDS = [["vms"], ["vcpus"], ["roots"], ["tree"], ["walk", "0x200000"], ["rmap", "0x10"],
            ["stats"], ["check"], ["unsync"], ["diagnose"]]
FIT_80 = {"vms", "vcpus", "roots", "walk", "stats", "rmap"}  # tables, no KEY: value at 80
FIT_60 = {"roots"}  # ... and at 60
WIDTHS = [60, 80, 100, 130]
HEX = re.compile(r"^0x[0-9a-f]+$")


@cache
def _session(name: str) -> Session:
    return Session(open_fixture(name))


def _run(name: str, argv: list[str]) -> tuple[str, bool]:
    """(stdout, whether a Grid fell back to KEY: value records)."""
    used: list[int] = []
    orig = render.Grid.records

    def records(self, *a, **k):
        used.append(1)
        return orig(self, *a, **k)

    buf = io.StringIO()
    render.Grid.records = records  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(buf):
            run_one(_session(name), argv)
    finally:
        render.Grid.records = orig  # type: ignore[method-assign]
    return buf.getvalue(), bool(used)


def _values(doc: object) -> set[str]:
    """The hex values and holder names of a JSON document."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "holder" and isinstance(v, str):
                out.add(v)
            else:
                out |= _values(v)
    elif isinstance(doc, list):
        for v in doc:
            out |= _values(v)
    elif isinstance(doc, str) and HEX.match(doc):
        out.add(doc)
    return out


def _whole(v: str, text: str) -> bool:
    """*v* in *text* (whitespace normalised) as a whole value, not part of one."""
    flat = " ".join(text.split())
    return re.search(rf"(?<![0-9a-zA-Z_.\[]){re.escape(v)}(?![0-9a-zA-Z_\[])", flat) is not None


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_values_whole_and_80_columns(name: str, monkeypatch) -> None:
    for argv in COMMANDS:
        monkeypatch.delenv("COLUMNS", raising=False)
        out, _ = _run(name, [*argv, "--json"])
        wide, _ = _run(name, argv)  # piped, COLUMNS unset: 200 columns
        # the JSON's values the table shows at all (vms leaves out the memslots)
        values = {v for v in _values(json.loads(out)) if _whole(v, wide)}
        for width in WIDTHS:
            monkeypatch.setenv("COLUMNS", str(width))
            text, fell_back = _run(name, argv)
            for v in values:
                assert _whole(v, text), f"{name} {argv} at {width}: {v} cut or missing"
            if argv[0] in (FIT_80 if width == 80 else FIT_60 if width == 60 else ()):
                assert not fell_back, f"{name} {argv}: KEY: value fallback at {width}"
            if width >= 80:  # headers and prose lines wrap between words too
                long = [line for line in text.splitlines() if len(line) > width]
                assert not long, f"{name} {argv} at {width}: {long[0]!r}"


def test_tree_holders_wrap_at_commas(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text, _ = _run("6.1-tdp", ["tree", "--depth", "0"])
    assert "(+1 below --depth)" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "vcpu3.root," in " ".join(text.split())


def test_list_column_wraps_at_commas() -> None:
    assert render.wrap_items("CLOCK_UPDATE,STEAL_UPDATE,GLOBAL_CLOCK_UPDATE", 26) == [
        "CLOCK_UPDATE,STEAL_UPDATE,", "GLOBAL_CLOCK_UPDATE"]
    assert render.wrap_items("a, b, c", 5) == ["a, b,", "c"]


@pytest.mark.parametrize("width", WIDTHS)
def test_diff_of_the_pair_at_every_width(width: int, monkeypatch) -> None:
    """diff on the same-boot pair (tests/vmcores/6.1-shadow-pair): every hex value of
    its JSON whole in the text, no KEY: value fallback, no line wider than asked."""
    after = str(VMCORES / "6.1-shadow-pair" / "after")
    monkeypatch.delenv("COLUMNS", raising=False)
    out, _ = _run("6.1-shadow-pair/before", ["diff", after, "--json"])
    wide, _ = _run("6.1-shadow-pair/before", ["diff", after])
    values = {v for v in _values(json.loads(out)) if _whole(v, wide)}
    assert len(values) > 20
    monkeypatch.setenv("COLUMNS", str(width))
    text, fell_back = _run("6.1-shadow-pair/before", ["diff", after])
    for v in values:
        assert _whole(v, text), f"diff at {width}: {v} cut or missing"
    assert not fell_back
    long = [line for line in text.splitlines() if len(line) > width]
    assert not long, long[0]


def test_wrap_words_is_the_unit_by_unit_wrap() -> None:
    """wrap_words() measures a label once when it fits: the same lines as
    wrap_each() (unit by unit) at every width, tree guides and wide units
    included."""
    rng = random.Random(7)
    units = ["[3]", "sp 0xffff888103a4c000", "gfn 0x1f2", "L1", "UNSYNC", "<- vcpu0.root,",
             "vcpu1.prev_roots[2]", "(subtree shown above)", "x" * 90, "", "│"]
    for _ in range(3000):
        words = rng.sample(units, rng.randrange(0, 6))
        width = rng.randrange(1, 100)
        first = rng.choice(["", "├── ", "│   └── "])
        assert wrap_words(words, width, first, first[:2] + "  ") == wrap_each(
            words, width, first, first[:2] + "  ")
