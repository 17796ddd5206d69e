"""unsync: replay the kernel's unsync walk (mmu_sync_children) offline."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument, command
from rich.table import Table

from kvminspect.commands import JSON_ARG, NAMESPACE, VM_ARG, finish, session_of, sp_scope
from kvminspect.graph import VMGraph
from kvminspect.model import Kernel
from kvminspect.render import console, hx
from kvminspect.unsync import Replay, Slot, WalkPage, replay_sync


def walk_pages(k: Kernel, g: VMGraph) -> dict[int, WalkPage]:
    """Snapshots of every page of the graph, with the slots the walk can visit.

    Only the spt[] entries whose unsync_child_bitmap bit is set are decoded:
    __mmu_unsync_walk looks at nothing else.
    """
    pages: dict[int, WalkPage] = {}
    for sp in g.pages():
        slots: dict[int, Slot] = {}
        idx = sp.bitmap_indexes()
        spt = k.sptes(sp) if idx else None
        if spt is not None:
            for i in idx:
                e = k.decode(sp, i, spt[i])
                slots[i] = Slot(present=e.present, large=e.large, child=e.child)
        pages[sp.addr] = WalkPage(sp=sp.addr, level=sp.level, gfn=sp.gfn, unsync=sp.unsync,
                                  unsync_children=sp.unsync_children,
                                  bitmap=sp.unsync_child_bitmap, slots=slots)
    return pages


def walk_roots(k: Kernel, g: VMGraph, top: int | None) -> list[int]:
    """Pages to replay from: SP, or every root with unsync_children.

    None when this kernel lacks a member the walk reads (a MissingMember
    warning says which): the walk is not guessed.
    """
    if not k.layout.unsync_known:
        return []
    if top is not None:
        return [top]
    return [a for a in sorted(g.roots, key=lambda a: (g.roots[a], a))
            if g.sp(a).unsync_children]


def replay_json(r: Replay, g: VMGraph) -> dict[str, Any]:
    return {
        "sp": hx(r.root), "holders": g.roots.get(r.root, []),
        "batches": [{
            "pages": [{"sp": hx(e.sp), "level": e.level, "idx": e.idx} for e in b.pages],
            "leaves": [{"sp": hx(leaf.sp), "gfn": hx(leaf.gfn),
                        "parents": [{"sp": hx(p), "level": lvl} for p, lvl in leaf.parents]}
                       for leaf in b.leaves],
        } for b in r.batches],
        "errors": list(r.errors),
    }


def render_replay(d: dict[str, Any]) -> None:
    c = console()
    held = ", ".join(d["holders"]) or "no vCPU"
    nleaves = sum(len(b["leaves"]) for b in d["batches"])
    c.print(f"root sp {d['sp']} ({held}): {len(d['batches'])} batch(es), {nleaves} unsync "
            "leaves", markup=False)
    for n, b in enumerate(d["batches"], 1):
        t = Table(box=None, header_style="bold", title=f"batch {n}: {len(b['pages'])} entries",
                  title_justify="left")
        t.add_column("SP Index", justify="right")
        t.add_column("SP Level", justify="right")
        t.add_column("SP")
        for e in b["pages"]:
            t.add_row(str(e["idx"]), str(e["level"]), e["sp"])
        c.print(t)
        for leaf in b["leaves"]:
            parents = "  ".join(f"L{p['level']} {p['sp']}" for p in leaf["parents"])
            c.print(f"  sync sp {leaf['sp']} gfn {leaf['gfn']}  parents: {parents}",
                    markup=False)
    for e in d["errors"]:
        c.print(f"  walk error: {e}", markup=False)


@command(
    description="replay mmu_sync_children's unsync walk offline, in the kernel's order",
    long_description="For SP, or every root with unsync_children (vCPU roots, prev_roots, "
    "pages with root_count > 0): mmu_unsync_walk fills 16-entry kvm_mmu_pages batches "
    "(SP Index = slot in the parent, -1 for the root), for_each_sp visits each unsync leaf "
    "with its mmu_page_path parents, and mmu_pages_clear_parents updates a copy of the "
    "bitmaps. Each root is replayed on its own copy of the current state; the target is "
    "never modified.",
    arguments=(argument("sp", nargs="?", metavar="SP", help="replay from this shadow page"),
               VM_ARG, JSON_ARG),
    namespace=NAMESPACE,
)
def _cmd_unsync(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    s = session_of(kwargs)
    start = len(s.problems())
    vms, top = sp_scope(s, args.vm, args.sp)
    out = []
    for vm in vms:
        g = s.graph(vm)
        pages = walk_pages(s.kernel, g)
        replays = [replay_json(replay_sync(a, pages), g) for a in walk_roots(s.kernel, g, top)]
        out.append((vm, replays))

    def human() -> None:
        c = console()
        if not vms:
            c.print("no VMs (vm_list is empty)")
        for vm, replays in out:
            c.print(f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid}  {vm.mmu}")
            if not replays:
                c.print("  no root has unsync children")
            for d in replays:
                render_replay(d)

    doc = {"vms": [{"kvm": hx(vm.addr), "pid": vm.pid, "mmu": vm.mmu, "roots": replays}
                   for vm, replays in out]}
    finish(s, args, doc, human, start)
