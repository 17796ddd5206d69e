"""Nested guests: the roots of both root_mmu and guest_mmu, with PLANTED values.

No fixture runs a nested guest (that would need nested SVM/VMX inside the
emulated host), so every test here plants one in memory: on the real 6.1-shadow
fixture, vCPU 0's guest_mmu.root.hpa is set to an existing non-root shadow page
(its root_count to 1, guest_mmu.root_role to that page's role) and, for "L2
running", vcpu->arch.mmu to &vcpu->arch.guest_mmu. The bytes are overlaid on
the vmcore as drgn memory segments (the file is untouched). Everything else is
the fixture's own state.
"""

from __future__ import annotations

import json

import drgn
import pytest

from kvminspect.check import FindingKind, Severity, check_root_counts
from kvminspect.commands.roots import roots_table, vcpu_roots_json
from kvminspect.commands.vcpus import vcpu_table
from kvminspect.graph import build
from kvminspect.render import Grid
from kvminspect.results import vcpu_roots
from kvminspect.shapes import SCHEMA_VERSION, vcpu_json
from kvminspect.target import open_core
from tests.conftest import VMCORES, open_fixture
from tests.test_schema import VALIDATOR

FIXTURE = "6.1-shadow"
L2_PGD = 0x7000  # the planted guest_mmu root's pgd (L1's nCR3/EPTP for L2)


def _overlay(prog: drgn.Program, patches: dict[int, bytes]) -> None:
    """Read each patch's bytes at its kernel virtual address instead of the dump's:
    whole pages are overlaid (kvminspect reads memory page by page), patched copies
    of the dump's own pages."""
    pages: dict[int, bytearray] = {}
    for addr, data in patches.items():
        page = addr & ~0xFFF
        assert (addr + len(data) - 1) & ~0xFFF == page
        buf = pages.setdefault(page, bytearray(prog.read(page, 0x1000)))
        buf[addr - page:addr - page + len(data)] = data
    for page, buf in pages.items():
        b = bytes(buf)
        prog.add_memory_segment(page, len(b),
                                lambda a, count, off, phys, b=b: b[off:off + count], False)


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


@pytest.fixture(scope="module")
def clean():
    """(target, VM, a level-3 shadow page no vCPU holds as a root) of the fixture."""
    t = open_fixture(FIXTURE)
    vm = t.kernel.vms()[0]
    g = build(t.kernel, vm)
    sp = next(s for s in g.pages() if s.level == 3 and s.addr not in g.roots)
    return vm, g, sp


def planted(clean, current: bool, root_count: int = 1):
    """A fresh target on the fixture with a guest_mmu root planted in vCPU 0
    (PLANTED values, see the module docstring): (kernel, vm, graph, the page)."""
    _, _, sp = clean
    k0 = open_fixture(FIXTURE).kernel  # the addresses (the shared target is never patched)
    v = k0.vcpu_objects(k0.vms()[0])[0]
    gm = v.arch.guest_mmu
    lay = k0.layout
    patches = {
        gm.root.hpa.address_of_().value_(): _u64(sp.spt - lay.page_offset_base),
        gm.root.pgd.address_of_().value_(): _u64(L2_PGD),
        gm.root_role.word.address_of_().value_(): sp.role.word.to_bytes(4, "little"),
        sp.addr + lay.sp.root_count: root_count.to_bytes(4, "little"),
    }
    if current:
        patches[v.arch.mmu.address_of_().value_()] = _u64(gm.address_of_().value_())
    k = open_core(str(VMCORES / FIXTURE), []).kernel  # its own program, not the cached one
    _overlay(k.prog, patches)  # before the model reads anything
    vm = k.vms()[0]
    return k, vm, build(k, vm), sp


def _text(grid: Grid) -> str:
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    Console(file=buf, width=250).print(grid)
    return buf.getvalue()


def test_guest_mmu_root_held_while_l1_runs(clean):
    """PLANTED: guest_mmu holds a root, root_mmu is current (the vCPU is back in
    L1). The root is held as vcpu0.guest_mmu.root, counted in root_count (check
    finds nothing), and shown flagged nested by roots and vcpus."""
    _, g0, _ = clean
    k, vm, g, sp = planted(clean, current=False)
    v = g.vcpus[0]
    assert v.mmu_name == "root_mmu" and v.root == g0.vcpus[0].root
    assert v.other_mmu.name == "guest_mmu"
    assert v.other_mmu.root.sp.addr == sp.addr and v.other_mmu.root.pgd == L2_PGD
    assert v.other_mmu.root_level == 3
    assert [str(h) for h in g.roots[sp.addr]] == ["vcpu0.guest_mmu.root"]
    assert check_root_counts(g) == []
    d = vcpu_roots_json(v, g)
    assert d["other_mmu"]["root"]["page"]["holders"][0]["mmu"] == "guest_mmu"
    text = _text(roots_table([vcpu_roots(x, g) for x in g.vcpus]))
    row = next(line for line in text.splitlines() if "guest_mmu.root" in line)
    assert hex(L2_PGD) in row and row.rstrip().endswith("nested")
    assert text.count("guest_mmu.") == 1  # the INVALID_PAGE ones are not shown
    vtext = _text(vcpu_table(g.vcpus))
    assert f"root_mmu (guest_mmu {sp.spt - k.layout.page_offset_base:#x}) nested" in vtext


def test_guest_mmu_current_while_l2_runs(clean):
    """PLANTED: vcpu->arch.mmu points at guest_mmu (the vCPU runs L2). The model
    reports guest_mmu as current with the planted root; root_mmu's root and
    prev_roots are still listed and held (vcpu0.root_mmu.*), so their root_count
    adds up: no root-count finding, where before only "not counted" could be said."""
    _, g0, _ = clean
    k, vm, g, sp = planted(clean, current=True)
    v, v0 = g.vcpus[0], g0.vcpus[0]
    assert v.mmu_name == "guest_mmu" and v.root.sp.addr == sp.addr
    assert v.other_mmu.name == "root_mmu"
    assert v.other_mmu.root == v0.root and v.other_mmu.prev_roots == v0.prev_roots
    assert [str(h) for h in g.roots[sp.addr]] == ["vcpu0.root"]
    held = {str(h) for hs in g.roots.values() for h in hs}
    assert {"vcpu0.root_mmu.root", "vcpu0.root_mmu.prev_roots[0]"} <= held
    assert check_root_counts(g) == []
    assert g.roots.keys() == g0.roots.keys() | {sp.addr}
    text = _text(roots_table([vcpu_roots(x, g) for x in g.vcpus]))
    lines = text.splitlines()
    first = next(line for line in lines if "vcpu[0]" in line)
    assert hex(L2_PGD) in first and first.rstrip().endswith("nested")
    assert any("root_mmu.root" in line for line in lines)
    assert f"guest_mmu (root_mmu {v0.root.hpa:#x}) nested" in _text(vcpu_table(g.vcpus))


def test_extra_reference_on_guest_mmu_root_reported(clean):
    """PLANTED: the guest_mmu root's root_count is 2 with one holder: a root-count
    error naming vcpu0.guest_mmu.root (not the "unheld-root" of a page nobody holds)."""
    _, _, sp = clean
    k, vm, g, _ = planted(clean, current=False, root_count=2)
    found = check_root_counts(g)
    assert [(f.check, f.severity) for f in found] == [(FindingKind.ROOT_COUNT, Severity.ERROR)]
    assert f"{sp.addr:#x}" in found[0].message or found[0].objects == [sp.addr]
    assert "expected 1" in found[0].message and "vcpu0.guest_mmu.root" in found[0].message


@pytest.mark.parametrize("current", [False, True])
def test_planted_nested_json_validates(clean, current):
    """PLANTED: the roots and vcpus documents with a guest_mmu root validate."""
    k, vm, g, _ = planted(clean, current=current)
    for command, vcpus in (("roots", [vcpu_roots_json(v, g) for v in g.vcpus]),
                           ("vcpus", [vcpu_json(v) for v in g.vcpus])):
        doc = {"schema_version": SCHEMA_VERSION, "command": command,
               "vms": [{**_vm_ref(vm), "vcpus": vcpus}], "errors": [], "warnings": []}
        json.dumps(doc)
        VALIDATOR.validate(doc)


def _vm_ref(vm):
    from kvminspect.shapes import vm_ref

    return vm_ref(vm)
