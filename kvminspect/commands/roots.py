"""roots: per vCPU, the MMU root and prev_roots[] (the CR3 -> root cache)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from drgn import Program
from drgn.commands import drgn_argument

from kvminspect import shapes
from kvminspect.commands import kvm_command, per_vm, session_of, vm_header
from kvminspect.drgn_code import print_code, roots_code
from kvminspect.fmt import hpa_text, hx
from kvminspect.graph import VMGraph
from kvminspect.model import VM, VCpu
from kvminspect.render import Grid, console
from kvminspect.results import (
    GUEST_MMU,
    MmuRootsView,
    PageView,
    RootState,
    RootView,
    VcpuRoots,
    vcpu_roots,
)
from kvminspect.session import Session

Row = tuple[str, ...]


def flags_cell(words: list[str], page: PageView | None, nested: bool) -> str:
    """The FLAGS cell: *words*, then "nested" for a row of a nested MMU (unless its
    page says so itself: role.guest_mode)."""
    if nested and (page is None or not page.guest_mode):
        words = [*words, "nested"]
    return " ".join(words)


def page_cells(p: PageView | None, shared: Counter[int], nested: bool = False
               ) -> tuple[str, str, str]:
    """(sp, gfn/level, flags) of a root's shadow page for the table; *shared*: how
    many vCPUs have each page as their current root."""
    if p is None:
        return ("-", "-", flags_cell([], None, nested))
    sp = p.sp
    n = shared[sp.addr]
    shared_by = [f"shared x{n}"] if n > 1 else []
    return (hx(sp.addr), f"{hx(sp.gfn)}/L{sp.level}", flags_cell(shared_by + p.flags(), p, nested))


def root_view_rows(r: RootView, shared: Counter[int], nested: bool = False) -> list[Row]:
    """A root as table rows (PGD, HPA, SP, GFN/LVL, FLAGS): the root, then its
    pae_root[i] pages (ROOT in the PGD column). *nested*: a root of guest_mmu (the
    shadow NPT/EPT MMU of a nested guest), each row flagged nested."""
    if r.empty:
        rows: list[Row] = [("-", "-", "-", "-", flags_cell(["empty"], None, nested))]
    elif not r.state.special:  # a page, INVALID_PAGE or unreadable
        rows = [(hx(r.pgd), hpa_text(r.hpa), *page_cells(r.page, shared, nested))]
    else:  # a special root (pae_root, ...) or a dummy root: no struct kvm_mmu_page
        rows = [(hx(r.pgd), hpa_text(r.hpa), r.state.value, "-",
                 flags_cell([r.state.value], None, nested))]
    rows += [(f"pae_root[{e.index}]", "", *page_cells(e.page, shared, nested))
             for e in r.pae_roots]
    return rows


def other_rows(o: MmuRootsView | None) -> list[Row]:
    """The other MMU's roots that are in use (not INVALID_PAGE) as (ROOT, ...) rows:
    "guest_mmu.root", "guest_mmu.prev_roots[i]" (or root_mmu's while in L2)."""
    if o is None:
        return []
    named = [("root", o.root)] + [(f"prev_roots[{i}]", r) for i, r in enumerate(o.prev_roots)]
    out: list[Row] = []
    for label, r in named:
        if r.state is RootState.INVALID_PAGE:
            continue
        for j, row in enumerate(root_view_rows(r, Counter(), o.mmu == GUEST_MMU)):
            out.append((f"{o.mmu}.{label}", *row) if j == 0 else (row[0], "", "", *row[2:]))
    return out


def roots_table(vcpus: list[VcpuRoots]) -> Grid:
    """One block of rows per vCPU: root (with pae_root[i]), then prev_roots[i]."""
    current = Counter(p.sp.addr for v in vcpus
                      for p in [v.root.page, *(e.page for e in v.root.pae_roots)]
                      if p is not None)
    t = Grid()
    for col in ("VCPU", "CR3", "ROOT", "PGD", "HPA", "SP", "GFN/LVL", "FLAGS"):
        # narrow (80 columns): CR3 under VCPU, HPA under PGD, GFN/LVL under SP;
        # narrower (60): PGD and HPA under ROOT, FLAGS under SP's GFN/LVL too
        second = {"PGD": "ROOT", "FLAGS": "SP"}
        t.add_column(col, text=col == "FLAGS", carry=col in ("VCPU", "CR3"),
                     under=second.get(col, col in ("CR3", "HPA", "GFN/LVL")),
                     stage=2 if col in second else 1)
    for v in vcpus:
        vcpu = v.vcpu
        nested = vcpu.mmu_name == GUEST_MMU
        for j, row in enumerate(root_view_rows(v.root, current, nested)):
            if j == 0:
                t.add_row(f"vcpu[{vcpu.vcpu_idx}]", hx(vcpu.cr3), "root", *row)
            else:
                t.add_row("", "", row[0], "", "", *row[2:])
        for i, r in enumerate(v.prev_roots):
            for row in root_view_rows(r, Counter(), nested):
                t.add_row("", "", f"prev_roots[{i}]", *row)
        for row in other_rows(v.other_mmu):
            t.add_row("", "", *row)
    return t


def vcpu_roots_json(v: VCpu, g: VMGraph) -> dict[str, Any]:
    """One vCPU's roots as the roots document has them."""
    return shapes.vcpu_roots_json(vcpu_roots(v, g))


@kvm_command(drgn_argument)
def _cmd_roots(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """per vCPU: mmu->root and prev_roots[], shared roots marked

    The 'vcpu[i] root_hpa' dump: for each vCPU its guest CR3, the current root (hpa,
    pgd, its struct kvm_mmu_page: gfn, level, root_count, unsync_children) and the
    prev_roots[] cache. A root held by several vCPUs (or cached by them) is marked
    shared; INVALID_PAGE roots show as such. A PAE guest's root is mmu->pae_root: its
    present pae_root[i] entries follow, each with its level-2 shadow page. --drgn prints
    the drgn code that reads the same roots.

    Columns: VCPU the vCPU (vcpu[vcpu_idx]); CR3 its guest CR3; ROOT root (mmu->root),
    prev_roots[i] (mmu->prev_roots[i]) or pae_root[i]; PGD the guest page table the root
    shadows (the CR3 it was built for); HPA the root's host physical address; SP its
    struct kvm_mmu_page; GFN/LVL that page's gfn and level (L4: a 4-level table);
    FLAGS shared xN (N vCPUs have it as their current root), direct, tdp, UNSYNC,
    unsync_children=N, invalid, obsolete, root_count=N, ORPHAN, SMM (role.smm: a page
    of System Management Mode, address space 1), nested (role.guest_mode, or a root of
    guest_mmu); empty: an unused prev_roots slot.

    Nested guests: root and prev_roots[i] are those of vcpu->arch.mmu (guest_mmu while
    the vCPU runs L2); the roots of its other MMU (guest_mmu, the shadow NPT/EPT MMU of
    L2, or root_mmu while in L2) follow as guest_mmu.root, guest_mmu.prev_roots[i] (or
    root_mmu.*), when they are not INVALID_PAGE. --drgn reads vcpu->arch.mmu only.
    """
    if args.drgn:
        s = session_of(kwargs)
        vms = s.vms(args.vm)
        print_code(args, lambda: roots_code(prog, s.kernel.layout, vms,
                                                 every=args.vm is None and s.selected is None))
        return

    def collect(s: Session, vm: VM) -> list[VcpuRoots]:
        g = s.graph(vm)
        return [vcpu_roots(v, g) for v in g.vcpus]

    per_vm(kwargs, args, "roots", collect=collect,
           to_json=lambda vm, vcpus: {"vcpus": [shapes.vcpu_roots_json(v) for v in vcpus]},
           header=lambda vm, vcpus: vm_header(vm) + f"  mmu_valid_gen {vm.mmu_valid_gen}",
           show=lambda vm, vcpus: console().print(roots_table(vcpus)))
