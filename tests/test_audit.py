"""check --audit and rmap GFN on the real fixtures.

Every clean fixture audits clean; each invariant of the kernel's removed
CONFIG_KVM_MMU_AUDIT broken once in a damaged copy of a real fixture
(tests/corrupt.py: a leaf SPTE pointing at the wrong pfn, an rmap entry
removed, an unsync page at level 2, a writable SPTE to a shadowed gfn) is
reported exactly; frozen TDP MMU SPTEs are planted in the model. rmap GFN
finds the SPTE every walk of the VMM's touched addresses ends at. (The kernel's
own counters, tdp_mmu_pages among them: tests/test_accounting.py.)
"""

from __future__ import annotations

import array
import json
from functools import cache
from pathlib import Path

import drgn
import pytest

from kvminspect.accounting import Leaves, check_accounting
from kvminspect.audit import audit_vm
from kvminspect.check import FindingKind, Severity, check_vm
from kvminspect.cli import main
from kvminspect.leaves import collect
from kvminspect.memory import Memory
from kvminspect.rmap import DescLayout, RmapHead, RmapReader, sptes_of_gfn
from kvminspect.session import Session
from kvminspect.walk import Stop, walk
from tests.conftest import FIXTURES, LARGE, MULTI_VM, SMM, open_fixture, truth
from tests.corrupt import UNMAPPED, make
from tests.test_walk import WALKED, touched


def session(name: str) -> Session:
    return Session(open_fixture(name))


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM + LARGE + SMM)
def test_clean_fixtures_audit_clean(name: str) -> None:
    """No error or warning from the audit (nor unsync pages above level 1), every
    present shadow-MMU leaf in the rmaps and every rmap entry a leaf, every leaf's
    pfn confirmed by the memslot."""
    s = session(name)
    k = s.kernel
    for vm in k.vms():
        vg = s.graph(vm)
        findings = check_accounting(k, vg, Leaves.of(collect(k, vg))) + audit_vm(k, vg)
        assert [f for f in findings if f.severity is not Severity.INFO] == [], findings
        unsync = [f for f in check_vm(k, vg) if f.check is FindingKind.UNSYNC_PAGE]
        assert unsync == []
        assert not any(f.check is FindingKind.LEAF_PFN_UNCHECKED for f in findings), findings
        st = collect(k, vg)
        assert st.leaves or truth(name).get("zapped")
        shadow_leaves = {x.sptep for x in st.leaves if not x.sp.tdp_mmu_page}
        assert set(RmapReader(k).scan(vm).entries) == shadow_leaves


@pytest.mark.parametrize("name", LARGE)
def test_large_leaves_audited_on_their_first_4k(name: str) -> None:
    """The large-page fixtures' 2 MiB SPTEs are leaves the audit checks (their
    first 4 KiB against the memslot) and finds right."""
    s = session(name)
    k = s.kernel
    for vm in k.vms():
        st = collect(k, vg := s.graph(vm))
        large = [x for x in st.leaves if x.sp.level > 1]
        assert large, "the fixture's guest maps 2 MiB pages"
        findings = audit_vm(k, vg)
        leaf_pfn = (FindingKind.LEAF_PFN, FindingKind.LEAF_PFN_UNCHECKED)
        assert not [f for f in findings if f.check in leaf_pfn], findings


# case -> (check id, gfn the finding names); all on 6.1-shadow, rmap-removed also
# on 7.3 (pte_list_desc with tail_count, atomic rmap heads)
PLANTED = {
    ("leaf-wrong-pfn", "6.1-shadow"): ("leaf-pfn", 0x200),
    ("rmap-removed", "6.1-shadow"): ("rmap-missing", 0x10),
    ("rmap-removed", "7.3-shadow"): ("rmap-missing", 0x10),
    ("unsync-level2", "6.1-shadow"): ("unsync-page", None),
    ("writable-shadowed", "6.1-shadow"): ("writable-shadowed", 0x10),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


@cache
def damaged(case: str, fixture: str, root: Path) -> tuple[Path, list]:
    out = root / f"{fixture}-{case}"
    return out, make(fixture, case, out)


@pytest.mark.parametrize(("case", "fixture"), sorted(PLANTED))
def test_planted_violation_reported_exactly(case: str, fixture: str, workdir: Path,
                                            capsys) -> None:
    path, patches = damaged(case, fixture, workdir)
    check_id, gfn = PLANTED[(case, fixture)]
    capsys.readouterr()
    assert main(["-c", str(path), "check", "--audit", "--json"]) == 3
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    bad = [f for f in vm["findings"] if f["severity"] != "info"]
    assert [f["check"] for f in bad] == [check_id], bad
    (f,) = bad
    damaged_sp = int(patches[0].what.split()[0], 16)
    assert hex(damaged_sp) in f["objects"], (f, patches)
    if gfn is not None:
        assert f"gfn {gfn:#x}" in f["message"]
    # plain check: the same unsync page, none of the audit's own findings
    capsys.readouterr()
    status = main(["-c", str(path), "check", "--json"])
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    plain = [f["check"] for f in vm["findings"] if f["severity"] != "info"]
    assert plain == (["unsync-page"] if check_id == "unsync-page" else [])
    assert status == (3 if plain else 0)


def test_planted_messages_name_expected_and_found(workdir: Path, capsys) -> None:
    path, _ = damaged("leaf-wrong-pfn", "6.1-shadow", workdir)
    capsys.readouterr()
    main(["-c", str(path), "check", "--audit"])
    out = " ".join(capsys.readouterr().out.split())
    assert "spt[0] (gfn 0x200, 4K) maps pfn 0xaf11 but the memslot translation of gfn " \
        "0x200 (hva 0x7fec0f37e000) is pfn 0xaf10" in out


def planted_frozen(monkeypatch):
    """6.12-tdp with spt[3] of its first level-1 TDP MMU page FROZEN_SPTE (model cache)."""
    s = session("6.12-tdp")
    k = s.kernel
    vg = s.graph(k.vms()[0])
    sp = next(p for p in vg.pages() if p.tdp_mmu_page and p.level == 1)
    new = array.array("Q", k.sptes(sp))
    new[3] = (1 << 63) | 0x5A0
    monkeypatch.setitem(k.pages._spt_cache, sp.addr, new)
    return k, vg, sp


def test_frozen_spte_is_transient_info(monkeypatch) -> None:
    k, vg, sp = planted_frozen(monkeypatch)
    findings = audit_vm(k, vg)
    (f,) = [f for f in findings if f.check is FindingKind.FROZEN_SPTE]
    assert f.severity is Severity.INFO and f.objects == [sp.addr]
    assert f"sp {sp.addr:#x} spt[3]" in f.message
    assert "mmu_lock (a rwlock: no owner recorded) is free" in f.message
    assert [x for x in findings if x.severity is not Severity.INFO] == []


@pytest.mark.parametrize("name", WALKED)
def test_rmap_finds_what_the_walk_finds(name: str) -> None:
    """For each address the VMM's guest touched, the leaf the walk ends at is
    among rmap's SPTEs of the walk's gfn (the rmaps, or the TDP MMU's roots)."""
    k = open_fixture(name).kernel
    vm = k.vms()[0]
    reader = RmapReader(k)
    for i, v in enumerate(k.vcpus(vm)):
        for addr in touched(truth(name), i):
            w = walk(k, vm, addr, v.root, f"vcpu{i}.root", v, direct=v.direct)
            assert w.stop is Stop.LEAF and w.check is not None
            entries, skipped = sptes_of_gfn(k, vm, w.check.gfn, reader)
            assert skipped == []
            found = {(e.sp, e.index): e for e in entries}
            last = w.steps[-1]
            e = found[(last.table, last.index)]
            assert (e.value, e.level) == (last.value, 1)
            assert all(x.bits is not None and x.bits.present and x.bits.leaf for x in entries)


class FakeProg:
    """A drgn.Program stand-in whose reads come from a dict of address -> bytes."""

    def __init__(self, mem: dict[int, bytes]) -> None:
        self.mem = mem

    def read(self, addr: int, size: int) -> bytes:
        if addr not in self.mem:
            raise drgn.FaultError("could not find memory segment", addr)
        return self.mem[addr][:size]


def test_rmap_chains_are_bounded_on_garbage() -> None:
    """A pte_list_desc chain that loops, one into unmapped memory and a count
    beyond PTE_LIST_EXT: named and cut, the entries before kept."""
    k = open_fixture("6.1-shadow").kernel
    r = RmapReader(k)
    d: DescLayout = r.desc
    assert (d.ext, d.count is not None) == (14, True)

    def desc(count: int, more: int, sptes: list[int]) -> bytes:
        b = bytearray(d.size)
        b[d.count[0]:d.count[0] + d.count[1]] = count.to_bytes(d.count[1], "little")
        b[d.more:d.more + 8] = more.to_bytes(8, "little")
        for j, p in enumerate(sptes):
            b[d.sptes + 8 * j:d.sptes + 8 * j + 8] = p.to_bytes(8, "little")
        return bytes(b)

    a, b = 0xFFFF888000100000, 0xFFFF888000200000
    r.mem = Memory(FakeProg({a: desc(2, b, [0x1008, 0x2010]), b: desc(1, a, [0x3018])}))
    problems: list = []
    assert r.sptes_of(a | 1, 0x99, problems) == [0x1008, 0x2010, 0x3018]
    assert problems == [(0x99, f"pte_list_desc chain loops at {a:#x}")]
    problems = []
    assert r.sptes_of(UNMAPPED | 1, 0x99, problems) == []
    assert "unreadable" in problems[0][1] and f"{UNMAPPED:#x}" in problems[0][1]
    r.mem = Memory(FakeProg({a: desc(99, 0, [0x1008] * 14)}))
    problems = []
    assert len(r.sptes_of(a | 1, 0x99, problems)) == 14
    assert "spte_count 99 > PTE_LIST_EXT 14" in problems[0][1]


def test_rmap_sptep_into_unmapped_memory_is_named() -> None:
    k = open_fixture("6.1-shadow").kernel
    vm = k.vms()[0]
    e = RmapReader(k).resolve(vm, 0, 0x10, 1, UNMAPPED + 0x18)
    assert (e.sp, e.value, e.bits, e.index) == (None, None, None, 3)


def test_5_10_desc_layout_ends_at_null() -> None:
    """5.10's pte_list_desc: sptes[3] and more, no count: entries up to the first NULL."""
    k = open_fixture("5.10-shadow").kernel
    d = RmapReader(k).desc
    assert (d.ext, d.count) == (3, None)


def test_rmap_command_text_and_json(capsys) -> None:
    assert main(["--sample", "rmap", "10"]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[1].split() == ["LVL", "SP", "SP", "GFN", "IDX", "SPTE", "FLAGS", "FROM"]
    assert out[2].split()[:4] == ["4K", "0xffff8b86c27ad7e8", "0x100", "16"]
    assert main(["--sample", "rmap", "0x10", "--json"]) == 0
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    (e,) = vm["sptes"]
    assert (e["sptep"], e["sp"], e["index"], e["size"], e["source"]) == (
        "0xffff8b86c2cc5080", "0xffff8b86c27ad7e8", 16, "4K", "rmap")
    assert e["bits"]["w"] is True and vm["skipped"] == []
    assert main(["--sample", "rmap", "0x7ffff"]) == 0
    assert "no SPTE maps gfn 0x7ffff" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["rmap", "zz"], ["rmap"], ["rmap", "-5"]])
def test_rmap_bad_input_is_one_line(argv: list[str], capsys) -> None:
    assert main(["--sample", *argv]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_rmap_array_missing_from_the_dump_is_not_checkable() -> None:
    """A memslot's 4K rmap array the dump lacks: its leaves are not reported as
    missing from the rmaps, one info says what was not checked."""
    from dataclasses import replace

    from kvminspect.audit import check_rmaps

    s = session("6.1-shadow")
    k = s.kernel
    vm = k.vms()[0]
    vg = s.graph(vm)
    reader = RmapReader(k)
    reader._slots[vm.addr] = [replace(sl, rmap=(UNMAPPED, *sl.rmap[1:]))
                              for sl in reader.slots(vm)]
    findings = check_rmaps(k, vg, collect(k, vg), reader)
    assert [(f.check, f.severity) for f in findings] == [
        (FindingKind.RMAP_UNCHECKED, Severity.INFO)]
    assert "1 memslot rmap array not in the dump" in findings[0].message


def test_large_writable_spte_over_a_shadowed_gfn() -> None:
    """A writable 2 MiB leaf whose range holds a shadowed gfn (not its first):
    write protection is checked over the whole range, large pfns on their first 4K."""
    from kvminspect.audit import check_write_protection, shadowed_gfns
    from kvminspect.leaves import AuditState, LeafSpte

    s = session("6.1-shadow")
    k = s.kernel
    vg = s.graph(k.vms()[0])
    gfn = min(g for a, g in shadowed_gfns(vg) if a == 0 and g & 511)
    l2 = next(p for p in vg.pages() if p.level == 2 and not p.role.direct)
    large = LeafSpte(l2, 7, (0x40000 << 12) | 0x80 | 0x7, gfn & ~511, 0)
    (f,) = check_write_protection(vg, AuditState([large]))
    assert f.check is FindingKind.WRITABLE_SHADOWED
    assert f"gfn {gfn:#x} is a guest page table" in f.message
    assert f"spt[7] (gfn {gfn & ~511:#x}, 2M)" in f.message
    read_only = large.__class__(l2, 7, large.value & ~2, gfn & ~511, 0)
    assert check_write_protection(vg, AuditState([read_only])) == []


def test_rmap_entry_at_a_non_present_spte_is_stale() -> None:
    """An rmap entry (added to the real scan) pointing at a non-present spt[]
    slot of a real level-1 page: rmap-stale naming the page, index and gfn."""
    from kvminspect.audit import check_rmaps

    s = session("6.1-shadow")
    k = s.kernel
    vm = k.vms()[0]
    vg = s.graph(vm)
    st = collect(k, vg)
    reader = RmapReader(k)
    scan = reader.scan(vm)
    sp = next(p for p in vg.pages() if p.level == 1 and not k.spte_present(k.sptes(p)[511]))
    scan.entries[sp.spt + 8 * 511] = RmapHead(0, 0x123, 1)
    reader.scan = lambda vm: scan  # type: ignore[method-assign]
    (f,) = check_rmaps(k, vg, st, reader)
    assert (f.check, f.severity, f.objects) == (FindingKind.RMAP_STALE, Severity.ERROR, [sp.addr])
    assert f"the 4K rmap of gfn 0x123 holds sptep {sp.spt + 8 * 511:#x}" in f.message
    assert f"spt[511] = {k.sptes(sp)[511]:#x}" in f.message and "not a present leaf" in f.message
