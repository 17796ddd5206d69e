"""The model's parts: explicit, each with its own caches and reset; analyses
read through them; to_shadow_page() as the kernel follows it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvminspect.model import Kernel
from tests.conftest import FIXTURES, open_fixture
from tests.corrupt import make

PKG = Path(__file__).resolve().parent.parent / "kvminspect"
PARTS = ("memory.py", "read_spte.py", "read_pages.py", "read_vms.py", "read_vcpus.py",
         "read_vmstate.py", "read_exits.py", "read_regs.py", "read_core.py", "model.py")
# the analyses: they read the kernel through the model's parts only
ANALYSES = ("check.py", "audit.py", "invariants.py", "rmap.py", "walk.py", "unsync.py",
            "graph.py", "diff.py", "commands/diff.py", "accounting.py", "diagnose.py",
            "guestwalk.py", "guestcore.py")


def _tree(name: str) -> ast.Module:
    return ast.parse((PKG / name).read_text(), name)


@pytest.mark.parametrize("name", PARTS)
def test_parts_are_not_mixins(name: str) -> None:
    """Every class of the model stands alone: parts are passed, never inherited."""
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(b) for b in node.bases]
            assert all(b in ("NamedTuple", "enum.Enum", "Enum") for b in bases), (
                f"{name}: class {node.name}({', '.join(bases)})")


def _prog_uses(tree: ast.Module) -> list[str]:
    """Where a module reaches the drgn Program past the model: `.prog`, a name
    `prog`, drgn.Object()/drgn.cast() of its own, or drgn's helpers."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "prog":
            out.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id == "prog":
            out.append(f"line {node.lineno}: prog")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and ast.unparse(node.func) in ("drgn.Object", "drgn.cast")):
            out.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("drgn.helpers"):
            out.append(f"line {node.lineno}: from {node.module} import ...")
    return out


@pytest.mark.parametrize("name", ANALYSES)
def test_analyses_read_through_the_parts(name: str) -> None:
    assert _prog_uses(_tree(name)) == []


def test_the_prog_rule_finds_a_violation() -> None:
    """The rule above is not vacuous: each kind of reach is found."""
    src = ("import drgn\nfrom drgn.helpers.linux.mm import follow_pfn\n"
           "def f(k):\n    return k.prog.read_u64(0), drgn.Object(k.prog, 'int', 0)\n")
    assert len(_prog_uses(ast.parse(src))) == 4


def test_each_part_owns_its_reset() -> None:
    """forget() resets the vCPUs read, the pages decoded and Memory's cache, and the
    next reading decodes anew (the same answers)."""
    k = Kernel(open_fixture("6.1-shadow").prog)
    vm = k.vms()[0]
    before = [v.root for v in k.vcpus(vm)]
    pages = k.active_pages(vm)
    sp = k.shadow_page(pages[0])
    assert sp is not None and k.sptes(sp) is not None
    k.forget(vm)
    assert k.pages._sp_cache == {} and k.pages._spt_cache == {}
    assert k.memory.cached_page(sp.addr & ~4095) is None
    assert [v.root for v in k.vcpus(vm)] == before
    assert k.shadow_page(pages[0]) == sp


@pytest.mark.parametrize("name", ["6.1-tdp-large", "6.1-shadow-large", "6.1-shadow-2vm",
                                  "6.1-shadow-zapped", "5.10-tdp", "7.3-shadow"])
def test_page_runs_answer_as_the_dict_does(name: str, monkeypatch) -> None:
    """With every plain list walk kept as a PageRun (read_pages.RUN_FROM: from
    10^4 new pages, not a dict entry each), the graphs, the checks and the
    pages listed are those of the dict; a page is decoded once (the graph's
    page is the one shadow_page() gives), and forget() drops the runs."""
    from kvminspect import read_pages
    from kvminspect.check import check_vm
    from kvminspect.graph import build

    prog = open_fixture(name).prog

    def read(run_from: int) -> tuple[Kernel, list]:
        monkeypatch.setattr(read_pages, "RUN_FROM", run_from)
        k = Kernel(prog)
        return k, [(vm, build(k, vm)) for vm in k.vms()]

    (kd, dicts), (kr, runs) = read(1 << 30), read(1)
    assert kd.pages._runs == [] and (kr.pages._runs or name.endswith("-zapped"))  # (no list)
    for (_, a), (vm, b) in zip(dicts, runs, strict=True):
        assert list(a.nodes.items()) == list(b.nodes.items()) and a.links == b.links
        assert a.orphan_set == b.orphan_set and a.active == b.active
        assert check_vm(kd, a) == check_vm(kr, b)
        assert all(kr.shadow_page(addr) is sp for addr, sp in b.nodes.items())
        addrs, pages = kr.listed_pages(vm)
        assert pages == [kr.shadow_page(x) for x in addrs] == kd.shadow_pages(addrs)
    kr.forget(runs[0][0])
    assert kr.pages._runs == [] and kr.pages._sp_cache == {}


@pytest.mark.parametrize("name", FIXTURES)
def test_links_do_not_depend_on_decode_order(name: str) -> None:
    """Children found before any page is decoded are those found after every page
    of the VM's lists is: to_shadow_page() reads page->private, not a map of the
    pages decoded so far."""
    prog = open_fixture(name).prog
    cold = Kernel(prog)
    vm = cold.vms()[0]
    roots = [v.root.sp for v in cold.vcpus(vm) if v.root and v.root.sp]
    first = {sp.addr: cold.links(sp) for sp in roots}
    warm = Kernel(prog)
    warm.active_pages(warm.vms()[0])
    warm.tdp_roots(warm.vms()[0])
    assert {a: warm.links(warm.shadow_page(a)) for a in first} == first


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory) -> tuple[Kernel, int, int]:
    """6.1-shadow with the struct page of vcpu0's root's level-3 table naming
    the level-2 page below it (tests/corrupt.py private-mismatch)."""
    from kvminspect.target import open_core

    out = tmp_path_factory.mktemp("private") / "core"
    (patch,) = make("6.1-shadow", "private-mismatch", out)
    k = Kernel(open_core(str(out), []).prog)
    l3, l2 = (int(x, 16) for x in patch.what.replace("'s spt ->", "").split()[3:5])
    return k, l3, l2


def test_to_shadow_page_follows_page_private(mismatch) -> None:
    """The root's SPTE leads where page->private says (the level-2 page), as the
    kernel's to_shadow_page() would, even once the level-3 page, whose sp->spt
    is that page, has been decoded."""
    k, l3, l2 = mismatch
    vm = k.vms()[0]
    k.active_pages(vm)  # every page decoded first: the old map would answer l3
    root = k.vcpus(vm)[0].root.sp
    assert [c for i, _, c in k.links(root) if i == 0] == [l2]
    pfn = (k.shadow_page(l3).spt - k.layout.page_offset_base) >> 12
    assert k.to_shadow_page(pfn) == l2
    assert (l3, pfn, l2) in k.pages.spt_owner_mismatches([k.shadow_page(l3)])


def test_check_names_both_pages(mismatch) -> None:
    """check: an spt-owner error naming the page and the one page->private names."""
    from kvminspect.check import FindingKind, Severity, check_vm
    from kvminspect.graph import build

    k, l3, l2 = mismatch
    vg = build(k, k.vms()[0])
    (f,) = [f for f in check_vm(k, vg) if f.check is FindingKind.SPT_OWNER]
    assert (f.severity, f.objects) == (Severity.ERROR, [l3, l2])
    assert f"sp {l3:#x}" in f.message and f"sp {l2:#x}" in f.message


def test_no_mismatch_on_real_fixtures() -> None:
    """On every fixture each decoded page's spt[] page names it as its owner."""
    seen = 0
    for name in FIXTURES:
        k = Kernel(open_fixture(name).prog)
        for vm in k.vms():
            pages = [s for s in k.shadow_pages(k.active_pages(vm) + k.tdp_roots(vm)) if s]
            assert k.pages.spt_owner_mismatches(pages) == [], name
            seen += len(pages)
    assert seen > 200


def _memory_over(words: dict[int, int]):
    """A Memory whose read_word reads *words* (FaultError elsewhere)."""
    import drgn

    from kvminspect.memory import Memory

    mem = Memory(open_fixture("6.1-tdp").prog)

    def read_word(addr: int) -> int:
        if addr not in words:
            raise drgn.FaultError("could not read memory", addr)
        return words[addr]

    mem.read_word = read_word  # type: ignore[method-assign]
    return mem


K = 0xFFFF888000000000


@pytest.mark.parametrize("case, words", [
    ("empty", {K: K}),
    ("never initialised", {K: 0}),
    ("one node", {K: K + 8, K + 8: K}),
    ("plain", {K: K + 8, **{K + 8 * i: K + 8 * (i + 1) for i in range(1, 100)}, K + 800: K}),
    ("loop", {K: K + 8, **{K + 8 * i: K + 8 * (i + 1) for i in range(1, 50)}, K + 400: K + 80}),
    ("self loop", {K: K + 8, K + 8: K + 16, K + 16: K + 16}),
    ("poisoned", {K: K + 8, K + 8: 0xDEAD000000000100}),
    ("unreadable", {K: K + 8, K + 8: K + 16}),
    ("head unreadable", {}),
])
def test_count_nodes_counts_and_says_as_list_nodes(case: str, words: dict[int, int]) -> None:
    """Memory.count_nodes (Brent's cycle check, no set) counts what list_nodes yields
    and, for a list that is not plain, records the same problems."""
    a, b = _memory_over(words), _memory_over(words)
    assert a.count_nodes(K, "test list") == sum(1 for _ in b.list_nodes(K, "test list")), case
    assert [str(p) for p in a.problems] == [str(p) for p in b.problems], case
