"""Tables at any width: no address, id or number is ever cut (issue 11, item 1).

Every table command runs on the bundled sample and on fixtures at COLUMNS=200
(the reference), 80, 40, 20, 0 and abc. Whatever the width, the output holds
exactly the words of the reference (a table turned into 'KEY: value' records
adds only its headers), every long address of the JSON document that the
reference shows, no '…', and no line ends in a space. A bad COLUMNS (0, abc)
is the default width; a tiny one is narrow, never an error.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from functools import cache

import pytest
from rich.console import Console

from kvminspect.cli import main, run_one
from kvminspect.commands import diff as diff_cmd
from kvminspect.render import DEFAULT_WIDTH, MIN_WIDTH, Grid, console_width
from kvminspect.session import Session
from kvminspect.target import open_sample
from tests.conftest import open_fixture

WIDTHS = ("80", "40", "20", "0", "abc")
LONG_HEX = re.compile(r"^0x[0-9a-f]{9,}$")  # kernel addresses, hpas, SPTE values


@cache
def session(name: str) -> Session:
    """One session per target for the whole module (graphs are built once)."""
    return Session(open_sample() if name == "sample" else open_fixture(name))


def commands(name: str) -> list[list[str]]:
    """Every table command, with a shadow page of *name* for sp and unsync."""
    s = session(name)
    g = s.graph(s.kernel.vms()[0])
    root = hex(g.root_order()[0])
    leaf = hex(min(a for a, sp in g.nodes.items() if sp.level == 1)) if any(
        sp.level == 1 for sp in g.nodes.values()) else root
    return [["vms"], ["vcpus"], ["roots"], ["stats"], ["check"], ["unsync"], ["unsync", leaf],
            ["sp", root], ["sp", leaf], ["vm"]]


def text(name: str, argv: list[str], columns: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", columns)
    capsys.readouterr()
    run_one(session(name), argv)
    return capsys.readouterr().out


def words(out: str) -> Counter:
    """The words of *out*, a trailing ':' (a record's 'KEY:') dropped, a list
    split into its items (a narrow table wraps a list after its commas)."""
    return Counter(w.rstrip(":") for w in re.split(r"[\s,]+", out) if w.rstrip(":"))


FIT_80 = {"vms", "vcpus", "roots", "stats"}  # issue 18 item 4: a table at 80, no records


def json_hex(doc: object) -> set[str]:
    """Every long hex string of a JSON document."""
    if isinstance(doc, dict):
        return set().union(*(json_hex(v) for v in doc.values())) if doc else set()
    if isinstance(doc, list):
        return set().union(*(json_hex(v) for v in doc)) if doc else set()
    return {doc} if isinstance(doc, str) and LONG_HEX.match(doc) else set()


def headers_of(out: str) -> set[str]:
    """Words of the 'KEY:' of record lines (a table's headers)."""
    return {w for line in out.splitlines() if re.match(r"^[A-Za-z][^:]*: ", line + " ")
            for w in line.split(":")[0].split()}


@pytest.fixture
def headers(monkeypatch) -> set[str]:
    """The words of every column header the commands make (filled as they run)."""
    seen: set[str] = set()
    add = Grid.add_column

    def add_column(self: Grid, header: str, *args, **kwargs) -> None:
        seen.update(header.split())
        add(self, header, *args, **kwargs)

    monkeypatch.setattr(Grid, "add_column", add_column)
    return seen


@pytest.mark.parametrize("name", ["sample", "6.1-shadow-zapped", "7.3-shadow-pae", "6.1-tdp"])
def test_every_table_at_every_width(name: str, headers: set[str], capsys, monkeypatch) -> None:
    for argv in commands(name):
        wide = text(name, argv, "200", capsys, monkeypatch)
        capsys.readouterr()
        run_one(session(name), [*argv, "--json"])
        shown = {h for h in json_hex(json.loads(capsys.readouterr().out))
                 if re.search(rf"(?<![0-9a-fx]){h}(?![0-9a-f])", wide)}
        assert shown or argv == ["check"], argv  # the test looks at real addresses
        for cols in WIDTHS:
            out = text(name, argv, cols, capsys, monkeypatch)
            where = (name, argv, cols)
            assert out.strip(), where
            assert "…" not in out, where
            assert not [line for line in out.splitlines() if line != line.rstrip()], where
            if cols in ("0", "abc"):  # ignored: the default width
                assert out == wide, where
                continue
            extra = set(words(out)) - set(words(wide))  # (carried values repeat)
            assert extra <= headers_of(out) | {"-"}, (where, extra)
            lost = set(words(wide)) - set(words(out)) - headers  # (a column all empty)
            assert not lost, (where, lost)
            tokens = {t.strip(",:()") for t in out.split()}
            assert shown <= tokens, (where, shown - tokens)
            if cols == "80" and argv[0] in FIT_80:  # stacked and wrapped, not records
                assert not headers_of(out), (where, headers_of(out))
                assert max(len(line) for line in out.splitlines()) <= 80, where
            if cols == "20" and argv[0] in FIT_80 and argv[0] != "stats":
                assert headers_of(out), where  # no row fits even stacked: records


def test_roots_at_80_columns_keeps_addresses_and_flags(capsys, monkeypatch) -> None:
    """The issue's case: roots at 80 columns cut SP to '0xffff8b…' and flags to
    'unsync_…'. Now (issue 18 item 4) a table with stacked columns, every value
    whole, no line over 80; at 60 stacked again (PGD and HPA under ROOT, FLAGS
    under SP), still no KEY: value records, no line over 60."""
    out = text("sample", ["roots"], "80", capsys, monkeypatch)
    capsys.readouterr()
    run_one(session("sample"), ["roots", "--json"])
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    lines = out.splitlines()
    assert lines[1].split() == ["VCPU", "ROOT", "PGD", "SP", "FLAGS"]
    assert lines[2].split() == ["CR3", "HPA", "GFN/LVL"]
    assert not headers_of(out) and "SP:" not in out
    tokens = [line.split() for line in lines[3:]]
    for v in vm["vcpus"]:
        page = v["root"]["page"]
        assert any(page["sp"] in t for t in tokens), page["sp"]
        assert any(f"unsync_children={page['unsync_children']}" in t for t in tokens)
    assert max(len(line) for line in lines) <= 80
    narrow = text("sample", ["roots"], "60", capsys, monkeypatch)
    rows = narrow.splitlines()
    assert [r.split() for r in rows[1:4]] == [["VCPU", "ROOT", "SP"],
                                              ["CR3", "PGD", "GFN/LVL"], ["HPA", "FLAGS"]]
    assert "SP:" not in narrow
    words = narrow.split()
    for v in vm["vcpus"]:
        assert v["root"]["page"]["sp"] in words
        assert f"unsync_children={v['root']['page']['unsync_children']}" in words
    assert max(len(line) for line in rows) <= 60


def test_empty_prev_roots_slot(capsys, monkeypatch) -> None:
    """An unused prev_roots[] slot (pgd and hpa INVALID_PAGE) reads as empty, not as
    PGD 0xffffffffffffffff; JSON keeps its shape."""
    out = text("6.1-tdp", ["roots"], "200", capsys, monkeypatch)
    assert "0xffffffffffffffff" not in out
    rows = [line.split() for line in out.splitlines() if "prev_roots[" in line]
    assert rows and all(r[1:] == ["-", "-", "-", "-", "empty"] for r in rows), rows
    run_one(session("6.1-tdp"), ["roots", "--json"])
    prev = json.loads(capsys.readouterr().out)["vms"][0]["vcpus"][0]["prev_roots"][0]
    assert prev["pgd"] == "0xffffffffffffffff" and prev["hpa"] == "INVALID_PAGE"


def test_flags_column_has_a_header(capsys, monkeypatch) -> None:
    out = text("sample", ["roots"], "200", capsys, monkeypatch)
    assert out.splitlines()[1].split() == ["VCPU", "CR3", "ROOT", "PGD", "HPA", "SP",
                                           "GFN/LVL", "FLAGS"]


def test_diff_tables_at_every_width(capsys, monkeypatch) -> None:
    """diff's tables (no committed pair of fixtures differs: made from real roots/pages)."""
    from kvminspect.diff import (
        Change,
        PageChange,
        PageField,
        RootChange,
        RootSlot,
        Status,
        VcpuChange,
    )
    from kvminspect.results import page_view, root_view

    s = session("sample")
    g = s.graph(s.kernel.vms()[0])
    v0, v1 = g.vcpus[:2]
    vcpus = [VcpuChange(Status.CHANGED, v0, v1, (
        RootChange(RootSlot(None), root_view(v0.root, g), root_view(v1.root, g)),
        RootChange(RootSlot(0), root_view(v0.prev_roots[0], g), None)))]
    page = page_view(v0.root.sp, g)
    changed = [PageChange(page, page, {PageField.UNSYNC_CHILDREN: Change(0, 1)})]
    sp = hex(page.sp.addr)
    for grid in (diff_cmd.roots_table(vcpus), diff_cmd.changed_table(changed),
                 diff_cmd.pages_table([page])):
        for cols in ("200", *WIDTHS):
            monkeypatch.setenv("COLUMNS", cols)
            from kvminspect.render import console

            console().print(grid)
            out = capsys.readouterr().out
            assert sp in out.split() and "…" not in out, cols
            assert all(line == line.rstrip() for line in out.splitlines()), cols


@pytest.mark.parametrize("columns, width", [("abc", DEFAULT_WIDTH), ("0", DEFAULT_WIDTH),
                                            ("-3", DEFAULT_WIDTH), ("", DEFAULT_WIDTH),
                                            ("5", MIN_WIDTH), ("80", 80), (" 120 ", 120)])
def test_columns_env(columns: str, width: int, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    assert console_width(tty=False) == width


@pytest.mark.parametrize("columns", ["0", "abc", "20"])
def test_bad_columns_is_no_error(columns: str, capsys, monkeypatch) -> None:
    """COLUMNS=abc was an internal error, COLUMNS=0 printed nothing."""
    monkeypatch.setenv("COLUMNS", columns)
    assert main(["--sample", "vcpus"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "OUTSIDE_GUEST_MODE" in out


def grid() -> Grid:
    g = Grid(title="t")
    g.add_column("A", carry=True)
    g.add_column("ADDR")
    g.add_column("NOTE", text=True)
    g.add_row("x", "0xffff8b86c2c01a10", "some free text that may wrap")
    g.add_row("", "0xffff8b86c2c01508", "")
    return g


def render(g: Grid, width: int, tty: bool = False) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, soft_wrap=not tty, force_terminal=False,
            no_color=True).print(g)
    return buf.getvalue()


def test_grid_table_then_records() -> None:
    g = grid()
    need = g.needed_width()
    assert need == (1 + 2) + (18 + 2) + (16 + 2)
    table = render(g, need)
    assert table.splitlines()[1].split() == ["A", "ADDR", "NOTE"]
    assert "0xffff8b86c2c01a10" in table and "wrap" in table
    # narrower: still a table, the free text wrapped between words, values whole
    assert render(g, need - 1).splitlines() == [
        "t", " A  ADDR                NOTE", " x  0xffff8b86c2c01a10  some free text",
        "                        that may wrap", "    0xffff8b86c2c01508"]
    least = (1 + 2) + (18 + 2) + (4 + 2)  # NOTE as its longest word
    narrow = render(g, least).splitlines()
    assert narrow[:3] == ["t", " A  ADDR                NOTE", " x  0xffff8b86c2c01a10  some"]
    assert [line.strip() for line in narrow[3:-1]] == ["free", "text", "that", "may", "wrap"]
    assert max(len(line) for line in narrow) <= least
    records = render(g, least - 1)  # no row fits: records
    assert records.splitlines() == [
        "t", "", "A: x", "ADDR: 0xffff8b86c2c01a10", "NOTE:", "  some free text that may",
        "  wrap", "", "A: x", "ADDR: 0xffff8b86c2c01508"]  # A carried, the empty NOTE left out


def test_grid_records_on_a_terminal_fold_values_never_cut() -> None:
    """A terminal crops long lines: there a value wider than the screen is folded."""
    g = Grid()
    g.add_column("COUNTER")
    g.add_row("max_mmu_page_hash_collisions")
    piped = render(g, 20)
    assert "  max_mmu_page_hash_collisions" in piped.splitlines()
    tty = render(g, 20, tty=True)
    assert "".join(line.strip() for line in tty.splitlines()[2:]) == \
        "max_mmu_page_hash_collisions"
    assert max(len(line) for line in tty.splitlines()) <= 20
