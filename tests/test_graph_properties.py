"""Property tests: the graph builder, unsync replay and checks on random kernel data.

The target is a real fixture; hypothesis replaces what the Kernel read for some
shadow pages (their spt[] contents, counters, bitmaps, levels) with random
values before the graph is built. SPTEs may point at real shadow pages (making
cycles and level mismatches), at random frames, or be garbage. Nothing may raise,
every walk must finish, and the results must stay within bounds.
"""

from __future__ import annotations

import array
import operator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvminspect import graph, read_pages
from kvminspect.check import FindingKind, Severity, check_vm
from kvminspect.commands.unsync import walk_pages, walk_roots
from kvminspect.model import Kernel, Role
from kvminspect.spte import SPTE_ENT_PER_PAGE
from kvminspect.target import open_core
from kvminspect.unsync import replay_sync
from tests.conftest import FIXTURES, MULTI_VM, open_fixture
from tests.corrupt import make

PROG = open_fixture("6.1-shadow").prog
BASE = Kernel(PROG)
VM = BASE.vms()[0]
PAGES = sorted(graph.build(BASE, VM).graph.nodes)
HPAS = [(BASE.shadow_page(a).spt - BASE.layout.page_offset_base) for a in PAGES]

spte = st.one_of(
    st.just(0),
    st.just(1 << 63),  # 6.12's non-present value
    st.sampled_from(HPAS).map(lambda h: h | 0x827),  # a real page table: may make a cycle
    st.integers(0, 2**64 - 1),  # garbage
    st.integers(0, 2**40).map(lambda p: (p << 12) | 0x827),  # a random frame
)


@st.composite
def damage(draw):
    pages = draw(st.lists(st.sampled_from(PAGES), min_size=1, max_size=6, unique=True))
    out = []
    for a in pages:
        slots = draw(st.dictionaries(st.integers(0, 511), spte, max_size=24))
        fields = draw(st.fixed_dictionaries({}, optional={
            "unsync": st.booleans(),
            "unsync_children": st.integers(0, 2**32 - 1),
            "unsync_child_bitmap": st.integers(0, 2**512 - 1),
            "root_count": st.integers(-5, 100),
            "level": st.integers(0, 15),
        }))
        out.append((a, slots, fields))
    return out


def damaged_kernel(changes) -> Kernel:
    k = Kernel(PROG)
    for addr, slots, fields in changes:
        sp = k.shadow_page(addr)
        spt = array.array("Q", k.sptes(sp))
        for i, v in slots.items():
            spt[i] = v
        k.pages._spt_cache[addr] = spt
        level = fields.get("level")
        if level is not None:
            fields["role"] = Role(sp.role.word, {**sp.role.fields, "level": level})
        k.pages._sp_cache[addr] = sp._replace(**fields)
    return k


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damage())
def test_graph_unsync_check_survive_random_state(changes) -> None:
    k = damaged_kernel(changes)
    vm = k.vms()[0]
    g = graph.build(k, vm)
    assert len(g.graph) <= graph.MAX_PAGES
    for p, c in g.graph.edges:  # only level-consistent edges are kept: no cycles
        assert g.sp(c).level == g.sp(p).level - 1
    pages = walk_pages(k, g)
    for root in walk_roots(k, g, None):
        r = replay_sync(root, pages, max_batches=200)
        assert len(r.batches) <= 200
        assert all(len(b.pages) <= 16 for b in r.batches)
        for b in r.batches:
            for leaf in b.leaves:
                assert pages[leaf.sp].level == 1 and pages[leaf.sp].unsync
    findings = check_vm(k, g)
    assert all(isinstance(f.severity, Severity) for f in findings)
    # unsync_children vs the bitmap: a finding exactly for the pages that disagree
    named = {f.objects[0] for f in findings if f.check is FindingKind.UNSYNC_CHILDREN}
    assert named == {s.addr for s in g.pages() if 1 <= s.level <= 5
                     and s.unsync_children != s.unsync_child_bitmap.bit_count()}
    # every model problem met for this VM is an error finding, and only those
    model = {f.message for f in findings if f.check is FindingKind.MODEL}
    assert model == {str(p) for p in k.problems.of([vm.addr])}
    for p in k.problems:
        assert str(p)


@pytest.mark.parametrize("name", ["6.1-tdp-large", "6.1-shadow-large", "6.1-shadow-2vm",
                                  "6.1-shadow-zapped", "7.3-tdp"])
def test_big_table_path_builds_the_same_graph(name: str, monkeypatch) -> None:
    """_expand's numpy check of tables with many children (graph.BIG_TABLE: a
    TDP MMU's level 2 at 10^6 pages) and mark_orphans() on its arrays give
    the graph the dict path gives, with every table on the one path and then
    on the other; listed() from the build's order is the page-by-page one."""
    prog = open_fixture(name).prog

    def built(big: int) -> list[graph.VMGraph]:
        monkeypatch.setattr(graph, "BIG_TABLE", big)
        k = Kernel(prog)
        return [graph.build(k, vm) for vm in k.vms()]

    for a, b in zip(built(1), built(10**9), strict=True):
        assert list(a.nodes) == list(b.nodes) and a.links == b.links
        assert a.orphan_set == b.orphan_set and a.wrong_level == b.wrong_level
        assert a.roots.keys() == b.roots.keys()
        assert a.listed_span is not None
        listed = a.listed().tolist()
        if a.nodes:
            a.set_page(next(iter(a.nodes.values())))  # (the same page: caches dropped)
            assert a.listed_span is None
        assert listed == a.listed().tolist() == [n in a.active for n in a.nodes]


def _links_both_ways(prog, monkeypatch) -> None:
    """A graph built with its tables' links read LINKS_BATCH at a time is the
    one built table by table (nodes, links, orphans, wrong levels), with the
    same problems in the same order; link_columns_many() of every page, on a
    Kernel of its own and all by numpy, is link_columns() of each without
    numpy, None only where that records the table unreadable."""

    def built(batch: int) -> tuple[list[graph.VMGraph], list[str]]:
        monkeypatch.setattr(graph, "LINKS_BATCH", batch)
        k = Kernel(prog)
        return [graph.build(k, vm) for vm in k.vms()], [str(p) for p in k.problems]

    (many, said), (one, said_one) = built(256), built(1)
    assert said == said_one
    for a, b in zip(many, one, strict=True):
        assert list(a.nodes) == list(b.nodes) and a.links == b.links
        assert a.orphan_set == b.orphan_set and a.wrong_level == b.wrong_level
        pages = list(a.nodes.values())
        # every table by numpy at once, then every table alone without numpy
        monkeypatch.setattr(read_pages, "LINKS_COLUMNS_FROM", 0)
        at_once = Kernel(prog).link_columns_many(pages)
        monkeypatch.setattr(read_pages, "LINKS_COLUMNS_FROM", SPTE_ENT_PER_PAGE + 1)
        k = Kernel(prog)
        for sp, cols in zip(pages, at_once, strict=True):
            alone = k.link_columns(sp)
            if cols is None:
                assert alone == ([], [], []) and any(
                    p.addr == sp.addr and "unreadable" in p.what for p in k.problems)
            else:
                assert cols == alone, hex(sp.addr)


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_links_read_at_once_are_the_links_read_one_by_one(name: str, monkeypatch) -> None:
    """_links_both_ways() on every fixture."""
    _links_both_ways(open_fixture(name).prog, monkeypatch)


@pytest.mark.parametrize("case", ["garbage-page-table", "spt-unmapped", "spte-cycle",
                                  "wrong-child-level", "private-mismatch"])
def test_links_read_at_once_on_damaged_tables(case: str, tmp_path, monkeypatch) -> None:
    """_links_both_ways() where tables are garbage, unreadable or misplaced
    (tests/corrupt.py): the problems come out as the one-by-one build says them."""
    fixture = {"wrong-child-level": "6.12-shadow"}.get(case, "6.1-shadow")
    make(fixture, case, tmp_path)
    _links_both_ways(open_core(str(tmp_path), []).prog, monkeypatch)


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_pages_where_among_is_the_plain_filter(name: str) -> None:
    """pages_where(test, among=fields) is pages() filtered by "one of the fields
    is true, and the test", before pages() is sorted and after."""
    prog = open_fixture(name).prog
    k = Kernel(prog)
    found = 0
    for vm in k.vms():
        g = graph.build(k, vm)
        for among in (("unsync_child_bitmap", "unsync", "unsync_children"), ("root_count",),
                      ("role.invalid",)):
            def test(sp, among=among) -> bool:
                return sp.addr % 3 != 1  # (any test: a third of the pages fail it)

            def flagged(sp, among=among) -> bool:
                return any(operator.attrgetter(f)(sp) for f in among)

            unsorted = g.pages_where(test, among)
            want = [sp for sp in g.pages() if flagged(sp) and test(sp)]
            assert unsorted == want == g.pages_where(test, among)
            found += sum(map(flagged, g.nodes.values()))
    assert found or not any(graph.build(k, vm).nodes for vm in k.vms())


@pytest.mark.parametrize("name", ["6.1-shadow", "6.1-tdp", "5.10-tdp", "6.12-shadow", "7.3-tdp",
                                  "6.1-shadow-2vm"])
def test_column_decode_is_the_row_decode(name: str, monkeypatch) -> None:
    """_decode_many() column by column (numpy; a list walk's runs) gives the
    ShadowPages the row decoder gives, and records the same problems in the
    same order, for every page of a fixture with some of them damaged: an
    impossible level (0, 7), unsync_children 1000, both."""
    from kvminspect import read_pages
    from tests.corrupt import _role_word, u32

    prog = open_fixture(name).prog
    k = Kernel(prog)
    lay = k.layout.sp
    pages = [sp for vm in k.vms() for sp in graph.build(k, vm).nodes.values()]
    blocks = [bytearray(k.memory.read(sp.addr, lay.size)) for sp in pages]
    for j, sp in enumerate(pages):
        if j % 5 == 1:
            blocks[j][lay.role:lay.role + 4] = _role_word(k, sp, (0, 7)[j % 2])
        if j % 7 == 2:
            blocks[j][lay.unsync_children:lay.unsync_children + 4] = u32(1000)
    addrs = [sp.addr for sp in pages]
    got = {}
    for columns_from in (1, 10**9):
        monkeypatch.setattr(read_pages, "COLUMNS_FROM", columns_from)
        fresh = Kernel(prog)
        decoded = fresh.pages._decode_many(addrs, [bytes(b) for b in blocks])
        got[columns_from] = decoded, [str(p) for p in fresh.problems]
    (a, said_a), (b, said_b) = got[1], got[10**9]
    assert a == b and said_a == said_b
    assert any("impossible level" in p for p in said_a) == (len(pages) > 1)


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_pages_sorted_by_numpy_is_pages_sorted_by_key(name: str, monkeypatch) -> None:
    """pages()' order (roots, then level high to low, gfn, address) is the same
    sorted by numpy's columns as by Python's keys; a page whose gfn is no u64
    (a what-if edit: -1) sends the sort to Python's keys."""
    k = Kernel(open_fixture(name).prog)
    for vm in k.vms():
        g = graph.build(k, vm)
        orders = []
        for columns_from in (1, 10**9):
            monkeypatch.setattr(graph, "SORT_COLUMNS_FROM", columns_from)
            g.set_page(next(iter(g.nodes.values()))) if g.nodes else None  # (caches dropped)
            orders.append([sp.addr for sp in g.pages()])
        assert orders[0] == orders[1]
        if len(g.nodes) > 1:
            monkeypatch.setattr(graph, "SORT_COLUMNS_FROM", 1)
            last = list(g.nodes.values())[-1]
            g.set_page(last._replace(gfn=-1))
            pages = g.pages()
            level = [sp.level for sp in pages if sp.addr not in g.roots]
            assert level == sorted(level, reverse=True)
            assert [sp for sp in pages if sp.gfn == -1] == [g.nodes[last.addr]]
