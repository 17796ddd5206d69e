"""kvminspect.invariants on the real fixtures: a page against its parent, SPTEs
against the memslots (part of check --audit).

Every fixture with VMs gives no finding of the four kinds. Each damage of
tests/corrupt.py's INVARIANT_CASES planted in a real fixture (a child's role bit
flipped, a child one level too high, a direct child's gfn moved, an MMIO SPTE of
the current generation over a leaf of a memslot page, a leaf for a gfn outside
every memslot) gives exactly one error of its kind, naming the page, its gfn,
its parent and the index. The same damage inside a page the kernel no longer
uses gives none: role.invalid set on the page too (the "-invalid" cases, patched
in the dump; and edited in the model on every damaged copy), the page obsolete
(an old mmu_valid_gen, shadow MMU), or its root invalid (as
kvm_tdp_mmu_invalidate_all_roots leaves a TDP MMU tree); and a stale MMIO SPTE
(an older memslot generation) gives none. The MMIO SPTE rules round-trip on each
SPTE layout, and kvm_mmu_child_role's quadrant and guest PTE size rules for a
32-bit guest (no fixture has one) hold on roles edited in the model.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from kvminspect import spte
from kvminspect.audit import audit_vm
from kvminspect.check import Finding, FindingKind, Severity
from kvminspect.errors import KvmNotFound
from kvminspect.graph import VMGraph, build
from kvminspect.invariants import Link, check_invariants, role_mismatches
from kvminspect.layout import known
from kvminspect.leaves import collect
from kvminspect.model import Kernel
from kvminspect.objects import Role, ShadowPage
from kvminspect.target import open_core
from tests.conftest import ALL, open_fixture
from tests.corrupt import make

NEW = (FindingKind.CHILD_ROLE, FindingKind.CHILD_GFN, FindingKind.MMIO_OVER_RAM,
       FindingKind.LEAF_NO_MEMSLOT)
SHADOW = ["5.10-shadow", "6.1-shadow", "6.12-shadow", "7.3-shadow", "7.3-shadow-pae"]
TDP = ["5.10-tdp", "6.1-tdp", "6.12-tdp", "7.3-tdp"]
# fixtures with direct children: TDP MMU, the shadow MMU's direct pages (tdp_legacy; an
# SMM handler in real mode) and direct children of indirect pages (2 MiB guest pages)
DIRECT = TDP + ["6.1-tdp-legacy", "6.1-shadow-smm", "6.1-shadow-large"]
KIND = {
    "child-role-bit": FindingKind.CHILD_ROLE,
    "child-level-wrong": FindingKind.CHILD_ROLE,
    "child-gfn-moved": FindingKind.CHILD_GFN,
    "mmio-over-ram": FindingKind.MMIO_OVER_RAM,
    "leaf-no-memslot": FindingKind.LEAF_NO_MEMSLOT,
}
PLANTED = [(case, f) for case in KIND for f in (DIRECT if case == "child-gfn-moved"
                                                 else SHADOW + TDP)]
# the "-invalid" cases (role.invalid patched in the dump) and the stale MMIO SPTE
QUIET = [(f"{case}-invalid", f) for case in KIND
         for f in (["6.1-shadow-large", "6.1-tdp"] if case == "child-gfn-moved"
                   else ["6.1-shadow", "6.1-tdp"])] + [
    ("mmio-stale", "6.1-shadow"), ("mmio-stale", "6.1-tdp")]
WHAT = re.compile(r"(?P<page>0x[0-9a-f]+) gfn (?P<gfn>0x[0-9a-f]+) parent (?P<parent>0x[0-9a-f]+)"
                  r" at (?P<index>\d+)(?: spte (?P<spte>\d+))?")


def new_kinds(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.check in NEW]


@pytest.mark.parametrize("name", ALL)
def test_clean_fixtures_break_no_invariant(name: str) -> None:
    """No finding of the four kinds on any fixture with VMs (the zapped ones'
    obsolete pages included)."""
    try:
        k = Kernel(open_fixture(name).prog)
    except KvmNotFound:
        pytest.skip("no kvm module")
    for vm in k.vms():
        vg = build(k, vm)
        assert new_kinds(audit_vm(k, vg)) == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("invariants")


@cache
def damaged(case: str, fixture: str, root: Path) -> tuple[Kernel, VMGraph, dict[str, int]]:
    """The fixture with the damage planted, read, and where its first Patch says
    the damage is (page, gfn, parent, index, spte)."""
    out = root / f"{fixture}-{case}"
    patches = make(fixture, case, out)
    k = Kernel(open_core(str(out), []).prog)
    (vm,) = k.vms()
    m = WHAT.match(patches[0].what)
    assert m, patches[0].what
    where = {n: int(v, 0) for n, v in m.groupdict().items() if v is not None}
    return k, build(k, vm), where


def with_role(k: Kernel, sp: ShadowPage, **fields: int) -> ShadowPage:
    """*sp* with role fields changed (a what-if edit of the model's page)."""
    word = sp.role.word
    for f in k.layout.sp.role_fields:
        if f.name in fields:
            word = (word & ~(((1 << f.width) - 1) << f.shift)) | (fields[f.name] << f.shift)
    return sp._replace(role=Role(word, {**sp.role.fields, **fields}, sp.role.widths))


def parents_of(vg: VMGraph, addr: int) -> dict[int, list[int]]:
    """parent -> the indexes of its SPTEs pointing at *addr* (the graph's links and
    those it kept out for a child of the wrong level)."""
    out = dict(vg.parents(addr))
    for p, pairs in vg.wrong_level.items():
        out.setdefault(p, []).extend(i for i, c in pairs if c == addr)
    return {p: idx for p, idx in out.items() if idx}


def roots_above(vg: VMGraph, addr: int) -> set[int]:
    """The pages without a parent that *addr* hangs from (through the graph's
    links and those it kept out for a child of the wrong level)."""
    above = parents_of(vg, addr)
    if not above:
        return {addr}
    return set().union(*(roots_above(vg, p) for p in above))


def invariants_with(k: Kernel, vg: VMGraph, pages: list[ShadowPage]) -> list[Finding]:
    """check_invariants() with *pages* in place of the graph's (then put back)."""
    old = [vg.sp(p.addr) for p in pages]
    for p in pages:
        vg.set_page(p)
    try:
        return new_kinds(check_invariants(k, vg, collect(k, vg)))
    finally:
        for p in old:
            vg.set_page(p)


@pytest.mark.parametrize(("case", "fixture"), PLANTED)
def test_planted_damage_is_one_error(case: str, fixture: str, workdir: Path) -> None:
    k, vg, where = damaged(case, fixture, workdir)
    findings = audit_vm(k, vg)
    (f,) = new_kinds(findings)
    assert (f.check, f.severity) == (KIND[case], Severity.ERROR), f
    page = where["page"]
    parents = parents_of(vg, page)
    if len(parents) == 1:
        assert parents == {where["parent"]: [where["index"]]}
    assert f.objects[0] == page and f.objects[1:] and f.objects[1] in parents, (f, parents)
    parent = f.objects[1]
    assert f"sp {page:#x} (gfn {where['gfn']:#x} " in f.message, f.message
    assert any(f"at spt[{i}] of sp {parent:#x} (gfn " in f.message for i in parents[parent])
    if "spte" in where:
        assert f"spt[{where['spte']}] = " in f.message, f.message
    if case == "child-gfn-moved" and fixture in TDP:
        # a TDP MMU page off its parent's index: this error and nothing else (the leaves
        # it maps outside every memslot are the leaf-pfn check's info, not errors)
        assert [x for x in findings if x.severity is not Severity.INFO] == [f]


@pytest.mark.parametrize(("case", "fixture"), PLANTED)
def test_planted_damage_in_a_dead_page_is_none(case: str, fixture: str,
                                                workdir: Path) -> None:
    """The same damaged copy, the damaged page made one the kernel no longer uses
    in the model: role.invalid set, an old mmu_valid_gen (shadow MMU pages), or
    role.invalid on the root above it."""
    k, vg, where = damaged(case, fixture, workdir)
    sp = vg.sp(where["page"])
    assert invariants_with(k, vg, [with_role(k, sp, invalid=1)]) == []
    gen = vg.vm.mmu_valid_gen
    if not sp.tdp_mmu_page and known(gen) and known(sp.mmu_valid_gen):
        assert invariants_with(k, vg, [sp._replace(mmu_valid_gen=(gen + 1) & 0xFF)]) == []
    roots = roots_above(vg, sp.addr)
    assert sp.addr not in roots
    assert invariants_with(k, vg, [with_role(k, vg.sp(r), invalid=1) for r in roots]) == []


@pytest.mark.parametrize(("case", "fixture"), QUIET)
def test_exempt_damage_is_none(case: str, fixture: str, workdir: Path) -> None:
    """role.invalid patched on the damaged page, or an MMIO SPTE of an old
    generation (check_mmio_spte refuses it: refaulted, never trusted)."""
    k, vg, _ = damaged(case, fixture, workdir)
    assert new_kinds(audit_vm(k, vg)) == []


# -- the SPTE rules the MMIO check stands on ------------------------------------------


@pytest.mark.parametrize("name", ["5.10-shadow", "6.1-tdp", "6.12-shadow", "7.3-tdp"])
def test_mmio_spte_round_trip(name: str) -> None:
    """make_mmio_spte() decodes back to its gfn and generation, check_mmio_spte()
    trusts the current generation only (never while the memslots are being
    updated), and mmio_mask() finds it, alone, among empty and present SPTEs."""
    k = Kernel(open_fixture(name).prog)
    vm = k.vms()[0]
    m = k.spte_masks(vm)
    gen = k.vm_reader.memslots_generation(vm)[0]
    value = spte.make_mmio_spte(0x12345, 7, gen, m)
    bits = spte.decode_bits(value, 1, k.spte_format, m)
    assert (bits.mmio, bits.present, bits.mmio_gfn) == (True, False, 0x12345)
    assert spte.check_mmio_spte(value, gen, m.layout)
    assert not spte.check_mmio_spte(value, gen + 2, m.layout)
    assert not spte.check_mmio_spte(value, gen | spte.KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS,
                                    m.layout)
    table = np.full(512, m.layout.nonpresent, dtype=np.uint64)
    leaf = next(x for x in collect(k, build(k, vm)).leaves)
    table[3], table[300] = leaf.value, value

    def found() -> list[tuple[int, int]]:
        hit = spte.mmio_mask(table, k.spte_format, m)
        assert hit is not None
        return [(i, int(table[i])) for i in np.flatnonzero(hit).tolist()]

    assert found() == [(300, value)]
    table[300] = m.layout.nonpresent
    assert found() == []


@pytest.mark.parametrize(("name", "user"), [("5.10-shadow", 509), ("6.1-shadow", 32764),
                                            ("7.3-tdp", 32764)])
def test_user_memslots(name: str, user: int) -> None:
    """KVM_USER_MEM_SLOTS: 512 - 3 before "KVM: Raise the maximum number of user
    memslots" (5.12), SHRT_MAX - 3 after."""
    assert Kernel(open_fixture(name).prog).vm_reader.user_memslots() == user


# -- kvm_mmu_child_role's rules no fixture shows (a 32-bit non-PAE guest) ------------


@pytest.mark.parametrize("name", ["5.10-shadow", "6.1-shadow", "7.3-shadow"])
def test_four_byte_gpte_children(name: str) -> None:
    """With 4-byte guest PTEs (has_4_byte_gpte, or gpte_is_8_bytes clear) a level-1
    child's quadrant is its parent SPTE's index & 1, whatever the parent's (a
    pae_root[] root's quadrant is its own); with 8-byte ones it is the parent's.
    A direct child of such a parent keeps has_4_byte_gpte (kvm_mmu_child_role
    copies it), but has gpte_is_8_bytes set before 5.17's has_4_byte_gpte."""
    k = Kernel(open_fixture(name).prog)
    vg = build(k, k.vms()[0])
    parent, pairs = next((vg.sp(p), pairs) for p, pairs in vg.links.items()
                         if vg.sp(p).level == 2)
    child = vg.sp(pairs[0][1])
    old = "gpte_is_8_bytes" in parent.role.fields
    four = {"gpte_is_8_bytes": 0} if old else {"has_4_byte_gpte": 1}
    p32 = with_role(k, parent, quadrant=2, **four)
    for index, quadrant in ((6, 0), (7, 1)):
        ok = with_role(k, child, quadrant=quadrant, **four)
        assert role_mismatches(Link(p32, index, ok)) == []
        wrong = with_role(k, child, quadrant=1 - quadrant, **four)
        assert role_mismatches(Link(p32, index, wrong)) == [
            f"role.quadrant {1 - quadrant}, expected {quadrant} "
            "(spte_index & 1 with 4-byte guest PTEs)"]
    assert role_mismatches(Link(parent, 7, with_role(k, child, quadrant=1))) == [
        "role.quadrant 1, expected 0 (the parent's)"]
    direct = with_role(k, child, quadrant=1, direct=1, **({"gpte_is_8_bytes": 1} if old
                                                          else four))
    assert role_mismatches(Link(p32, 7, direct)) == []
