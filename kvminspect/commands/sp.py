"""sp: one shadow page (struct kvm_mmu_page): fields, role, parents, SPTEs."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument, drgn_argument, mutually_exclusive_group

from kvminspect.commands import kvm_command, per_vm, session_of
from kvminspect.drgn_code import print_code, sp_code
from kvminspect.errors import LookupFailed, UsageError
from kvminspect.fmt import hx, spte_text
from kvminspect.graph import VMGraph
from kvminspect.model import VM, Kernel, ShadowPage
from kvminspect.render import Grid, console, plural
from kvminspect.results import SpDetail, SpParent, SpteRow, page_view
from kvminspect.shapes import sp_detail_json


def spte_rows(k: Kernel, sp: ShadowPage) -> tuple[list[SpteRow], int]:
    """Present SPTEs of *sp* with their child pages, and how many entries are not present."""
    spt = k.sptes(sp)
    if spt is None:
        return [], 0
    rows, absent = [], 0
    for i, v in enumerate(spt):
        e = k.decode(sp, i, v)
        if not e.present:
            absent += 1
            continue
        rows.append(SpteRow(e, k.shadow_page(e.child) if e.child else None))
    return rows, absent


def sp_detail(k: Kernel, g: VMGraph, sp: ShadowPage) -> SpDetail:
    """Everything kvminspect knows about one shadow page."""
    sptes, absent = spte_rows(k, sp)
    return SpDetail(page=page_view(sp, g), on_active_list=sp.addr in g.active,
                    parents=[SpParent(p, g.sp(p).level, idx) for p, idx in g.parents(sp.addr)],
                    sptes=sptes, non_present=absent)


def role_text(sp: ShadowPage) -> str:
    """The role word and each field as name=value (1-bit fields 0 or 1)."""
    role = sp.role
    return f"role {hx(role.word)}: " + " ".join(
        f"{name}={int(bool(v)) if role.width(name) == 1 else v}"
        for name, v in role.fields.items())


def render(d: SpDetail) -> None:
    c = console()
    p = d.page
    sp = p.sp
    c.print(f"sp {hx(sp.addr)}  gfn {hx(sp.gfn)}  level {sp.level}", markup=False)
    flags = [w for on, w in ((sp.unsync is True, "unsync"), (p.obsolete, "obsolete"),
                             (sp.tdp_mmu_page, "tdp_mmu_page"), (p.orphan, "orphan")) if on]
    c.print("  ".join([f"  spt {hx(sp.spt)}", f"root_count {sp.root_count}",
                       f"unsync_children {sp.unsync_children}",
                       f"mmu_valid_gen {sp.mmu_valid_gen}", *flags]), markup=False)
    c.print("  " + role_text(sp), markup=False)
    if bitmap := sp.bitmap_indexes():
        c.print(f"  unsync_child_bitmap: {bitmap}", markup=False)
    if p.holders:
        c.print("  root of: " + ", ".join(str(h) for h in p.holders), markup=False)
    for parent in d.parents:
        c.print(f"  parent {hx(parent.sp)} (L{parent.level}) slot {parent.indexes}",
                markup=False)
    t = Grid(title=f"{plural(len(d.sptes), 'present SPTE', 'present SPTEs')}, "
                   f"{d.non_present} not present")
    for col in ("IDX", "SPTE", "KIND", "PFN", "W", "CHILD SP", "CHILD GFN/LVL", "FLAGS"):
        t.add_column(col)
    for e, child in d.sptes:
        kind = "large" if e.large else ("leaf" if e.leaf else "table")
        below = "" if child is None else f"{hx(child.gfn)}/L{child.level}"
        t.add_row(str(e.index), spte_text(e.value), kind, hx(e.pfn), "w" if e.value & 2 else "",
                  hx(e.child) or "", below, "?" if e.bits is None else e.bits.flags())
    c.print(t)


@kvm_command(
    mutually_exclusive_group(
        argument("addr", nargs="?", metavar="ADDR", type="address",
                 help="struct kvm_mmu_page address (hex, 0x optional)"),
        argument("--gfn", metavar="GFN", type="gfn",
                 help="every shadow page of this guest frame (hex, 0x optional)"),
        required=True,
    ),
    drgn_argument,
)
def _cmd_sp(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """one shadow page: fields, decoded role, parents and SPTEs

    Shows struct kvm_mmu_page at ADDR (or every page shadowing GFN): gfn, level, the
    decoded role, root_count, unsync state and bitmap, which vCPUs hold it as a root,
    its parents with the slots that point at it, and every present SPTE (leaf, large or
    a table with its child page). --drgn (with ADDR) prints the drgn code that reads the
    same struct kvm_mmu_page and SPTEs.

    Columns of the SPTE table: IDX the entry's index in spt[] (0-511); SPTE its
    value; KIND leaf (maps a 4 KiB page), large (maps a huge page) or table (points
    to a lower shadow page); PFN the host page frame it points to; W w when the
    SPTE is writable; CHILD SP the child struct kvm_mmu_page of a table entry; CHILD
    GFN/LVL that child's gfn and level; FLAGS the SPTE decoded by the kernel's own
    masks (shadow_*_mask): R/W/X (- when clear), U user, NX, A accessed, D dirty, hw
    host-writable, mw MMU-writable, enc encrypted, ad=disabled/wrprot_only (EPT A/D
    type), acc-track with its saved bits (see also walk).
    """
    s = session_of(kwargs)
    vms = s.vms(args.vm)
    found: dict[int, list[ShadowPage]] = {}
    if args.gfn is not None:
        if args.drgn:
            raise UsageError("sp --drgn takes ADDR (a struct kvm_mmu_page address), not --gfn")
        gfn = args.gfn
        for vm in vms:
            if pages := s.graph(vm).find_gfn(gfn):
                found[vm.addr] = pages
        if not found:
            raise LookupFailed(f"no shadow page shadows gfn {hx(gfn)}")
    elif args.addr is not None:
        vm, sp = s.find_sp(args.addr, vms)
        found[vm.addr] = [sp]
        if args.drgn:
            print_code(args, lambda: sp_code(prog, s.kernel.layout, sp.addr))
            return
    else:
        raise UsageError("sp needs ADDR or --gfn GFN")

    def show(vm: VM, pages: list[SpDetail]) -> None:
        for d in pages:
            render(d)

    per_vm(kwargs, args, "sp", vms=[vm for vm in vms if vm.addr in found],
           collect=lambda s, vm: [sp_detail(s.kernel, s.graph(vm), sp)
                                  for sp in found[vm.addr]],
           to_json=lambda vm, pages: {"pages": [sp_detail_json(d) for d in pages]}, show=show)
