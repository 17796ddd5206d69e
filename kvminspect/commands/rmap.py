"""rmap: every SPTE that maps a gfn, from the memslots' rmaps and the TDP MMU's roots; --stats:
the rmap length histogram per level (debugfs mmu_rmaps_stat, offline)."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import kvm_command, per_vm, session_of
from kvminspect.errors import UsageError
from kvminspect.fmt import spte_text
from kvminspect.objects import VM
from kvminspect.render import Grid, console, plural
from kvminspect.rmap import (
    LEVEL_NAMES,
    RMAP_BUCKETS,
    GfnSptes,
    RmapHistogram,
    RmapReader,
    rmap_bucket,
    rmap_histogram,
    sptes_of_gfn,
)
from kvminspect.session import Session
from kvminspect.shapes import rmap_entry_json, rmap_histogram_json, skipped_json


def render(s: Session, vm: VM, gfn: int, found: GfnSptes) -> None:
    """One VM's SPTEs of *gfn*: a row each, then what was skipped."""
    c = console()
    entries, skipped = found
    if not entries:
        c.print(f"  no SPTE maps gfn {gfn:#x}", markup=False)
    else:
        smm = any(e.as_id for e in entries)
        t = Grid()
        # narrow (80 columns): IDX under LVL, SP GFN under SP, FROM under SPTE
        under = {"IDX": "LVL", "SP GFN": "SP", "FROM": "SPTE"}
        for col in ("AS", "LVL", "SP", "SP GFN", "IDX", "SPTE", "FLAGS", "FROM")[not smm:]:
            t.add_column(col, text=col == "FLAGS", under=under.get(col, False))
        for e in entries:
            sp = s.kernel.shadow_page(e.sp) if e.sp else None
            row = [LEVEL_NAMES.get(e.level, str(e.level)),
                   "-" if e.sp is None else hex(e.sp), "-" if sp is None else hex(sp.gfn),
                   str(e.index), "unreadable" if e.value is None else spte_text(e.value),
                   e.bits.flags() if e.bits else "-",
                   "rmap" if e.tdp_root is None else f"root {e.tdp_root:#x}"]
            t.add_row(*([str(e.as_id)] if smm else []), *row)
        c.print(t)
    for where, why in skipped:
        c.print(f"  skipped {where:#x}: {why}", markup=False)


def render_stats(h: RmapHistogram) -> None:
    """One VM's rmap histogram as /sys/kernel/debug/kvm/PID-FD/mmu_rmaps_stat shows
    it (a row per level, a column per bucket), then the entries and what is missing."""
    c = console()
    if not h.has_rmaps:
        c.print("  no rmaps: no memslot has rmap arrays (kvm_memslots_have_rmaps() is "
                "false: the TDP MMU keeps none); the kernel's mmu_rmaps_stat is empty",
                markup=False)
        return
    t = Grid()
    t.add_column("Rmap_Count")
    for label in RMAP_BUCKETS:
        t.add_column(label, justify="right")
    for lv in h.levels:
        t.add_row(f"Level={lv.name}", *map(str, lv.buckets))
    c.print(t)
    per_level = ", ".join(f"{lv.name} {lv.entries}" for lv in h.levels)
    longest = max(h.levels, key=lambda lv: lv.longest)
    line = f"  {plural(h.entries, 'rmap entry', 'rmap entries')} ({per_level})"
    if longest.longest:
        line += f"; longest rmap {longest.longest} ({longest.name})"
    if h.max_rmap_size is not None:
        line += f"; kvm->stat.max_mmu_rmap_size {h.max_rmap_size}"
    c.print(line, markup=False)
    # ffs(), not fls(): a length whose highest and lowest set bits differ is counted
    # under its lowest (see rmap_bucket)
    odd = sorted({n for lv in h.levels for n in lv.lengths
                  if rmap_bucket(n) != min(n.bit_length(), len(RMAP_BUCKETS) - 1)})
    if odd:
        shown = ", ".join(f"{n} under {RMAP_BUCKETS[rmap_bucket(n)]}" for n in odd[:6])
        more = f" and {len(odd) - 6} more" if len(odd) > 6 else ""
        c.print(f"  binned as the kernel bins them, by ffs(length): {shown}{more}",
                markup=False)
    for a in h.unreadable:
        c.print(f"  not in the dump, not counted: the {LEVEL_NAMES.get(a.level, a.level)} rmap "
                f"array of the memslot at gfn {a.base_gfn:#x} ({a.npages} pages, address "
                f"space {a.as_id})", markup=False)
    for where, why in h.skipped:
        c.print(f"  skipped {where:#x}: {why}", markup=False)


@kvm_command(
    argument("gfn", metavar="GFN", nargs="?", type="gfn",
             help="the guest frame number (hex, 0x optional: 16 is 0x16)"),
    argument("--stats", action="store_true",
             help="instead of one gfn's SPTEs, the rmap length histogram per level "
             "(debugfs mmu_rmaps_stat, offline)"),
)
def _cmd_rmap(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """every SPTE that maps a gfn: its shadow page, index and bits (--stats: rmap lengths)

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

    --stats (no GFN) shows instead what the kernel's debugfs file mmu_rmaps_stat
    (kvm_mmu_rmaps_stat_show(), 5.15+) shows live: for each level, how many rmap heads
    of every memslot hold 0, 1, 2-3, 4-7, ... 512-1023 sptes, binned exactly as the
    kernel bins them: by ffs(length), its lowest set bit, so a 3-entry rmap is counted
    under 1 and a 24-entry one under 8-15 (a note lists such lengths; JSON has the
    exact ones). Then the entries (one per present shadow-MMU leaf SPTE), the longest
    rmap and kvm->stat.max_mmu_rmap_size, the longest pte_list_add() ever met before
    adding (5.15+). A VM without rmaps (TDP MMU only) has none: the kernel's file is
    empty. Rmap arrays not in the dump, and chains cut short, are named.
    """
    s = session_of(kwargs)
    reader = RmapReader(s.kernel)
    if args.stats:
        if args.gfn is not None:
            raise UsageError("rmap: give a GFN or --stats, not both")
        per_vm(kwargs, args, "rmap",
               collect=lambda s, vm: rmap_histogram(s.kernel, vm, reader),
               to_json=lambda vm, h: {"rmap_stats": rmap_histogram_json(h)},
               show=lambda vm, h: render_stats(h))
        return
    if args.gfn is None:
        raise UsageError("rmap: a GFN (or --stats) is needed")
    gfn = args.gfn
    per_vm(kwargs, args, "rmap",
           collect=lambda s, vm: sptes_of_gfn(s.kernel, vm, gfn, reader),
           to_json=lambda vm, found: {
               "gfn": hex(gfn),
               "sptes": [rmap_entry_json(e, s.kernel.shadow_page(e.sp) if e.sp else None)
                         for e in found.entries],
               "skipped": [skipped_json(x) for x in found.skipped]},
           show=lambda vm, found: render(s, vm, gfn, found))
