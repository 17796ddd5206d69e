"""rmap: every SPTE that maps a gfn, from the memslots' rmaps and the TDP MMU's roots."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import kvm_command, parse_gfn, per_vm, session_of
from kvminspect.objects import VM
from kvminspect.render import Grid, console
from kvminspect.rmap import LEVEL_NAMES, GfnSptes, RmapReader, sptes_of_gfn
from kvminspect.session import Session
from kvminspect.shapes import rmap_entry_json, skipped_json


def render(s: Session, vm: VM, gfn: int, found: GfnSptes) -> None:
    """One VM's SPTEs of *gfn*: a row each, then what was skipped."""
    c = console()
    entries, skipped = found
    if not entries:
        c.print(f"  no SPTE maps gfn {gfn:#x}", markup=False)
    else:
        smm = any(e.as_id for e in entries)
        t = Grid()
        for col in ("AS", "LVL", "SP", "SP GFN", "IDX", "SPTE", "FLAGS", "FROM")[not smm:]:
            t.add_column(col)
        for e in entries:
            sp = s.kernel.shadow_page(e.sp) if e.sp else None
            row = [LEVEL_NAMES.get(e.level, str(e.level)),
                   "-" if e.sp is None else hex(e.sp), "-" if sp is None else hex(sp.gfn),
                   str(e.index), "unreadable" if e.value is None else f"{e.value:#018x}",
                   e.bits.flags() if e.bits else "-",
                   "rmap" if e.tdp_root is None else f"root {e.tdp_root:#x}"]
            t.add_row(*([str(e.as_id)] if smm else []), *row)
        c.print(t)
    for where, why in skipped:
        c.print(f"  skipped {where:#x}: {why}", markup=False)


@kvm_command(
    argument("gfn", metavar="GFN", help="the guest frame number (hex, with or without 0x)"),
)
def _cmd_rmap(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """every SPTE that maps a gfn: its shadow page, index and bits

    For the shadow MMU (and the legacy TDP MMU), from the memslot's reverse maps:
    slot->arch.rmap[level - 1] at the gfn's index, for 4K, 2M and 1G mappings, each
    struct kvm_rmap_head holding one sptep or a struct pte_list_desc chain of them;
    each sptep is resolved to its shadow page (the page_private of the spt page it
    points into) and index. The TDP MMU keeps no rmaps: its SPTEs are found by
    walking each root on kvm->arch.tdp_mmu_roots to the gfn's address. A chain that
    loops, or an sptep into memory the dump lacks, is named and skipped.

    Columns: AS the address space (shown when one is 1: SMM); LVL the mapping size
    (4K, 2M, 1G); SP the struct kvm_mmu_page holding the SPTE; SP GFN that page's gfn;
    IDX the index in its spt[]; SPTE the value; FLAGS decoded by the kernel's own masks
    (as walk shows them); FROM "rmap", or "root SP": the TDP MMU root walked. JSON
    adds each SPTE's kernel address (sptep).
    """
    s = session_of(kwargs)
    gfn = parse_gfn(args.gfn)
    reader = RmapReader(s.kernel)
    per_vm(kwargs, args, "rmap",
           collect=lambda s, vm: sptes_of_gfn(s.kernel, vm, gfn, reader),
           to_json=lambda vm, found: {
               "gfn": hex(gfn),
               "sptes": [rmap_entry_json(e, s.kernel.shadow_page(e.sp) if e.sp else None)
                         for e in found.entries],
               "skipped": [skipped_json(x) for x in found.skipped]},
           show=lambda vm, found: render(s, vm, gfn, found))
