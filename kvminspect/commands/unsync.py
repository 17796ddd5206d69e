"""unsync: replay the kernel's unsync walk (mmu_sync_children) offline."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import kvm_command, per_vm, session_of, sp_scope
from kvminspect.fmt import hx
from kvminspect.graph import VMGraph
from kvminspect.layout import known
from kvminspect.model import VM, Kernel, ShadowPage
from kvminspect.render import Grid, console, plural, say
from kvminspect.results import UnsyncRoot
from kvminspect.session import Session
from kvminspect.shapes import replay_json
from kvminspect.unsync import Slot, WalkPage, replay_sync, replay_zap


class WalkPages(Mapping[int, WalkPage]):
    """The walk's snapshot of each page of the graph, made when the walk asks.

    A WalkPage carries the slots the walk can visit: only the spt[] entries
    whose unsync_child_bitmap bit is set are decoded, as __mmu_unsync_walk
    looks at nothing else. Made on demand (and kept), since a walk visits
    the pages under set bits only: a few out of 10^5.
    """

    def __init__(self, k: Kernel, g: VMGraph) -> None:
        self.k, self.g = k, g
        self._made: dict[int, WalkPage] = {}

    def __getitem__(self, addr: int) -> WalkPage:
        page = self._made.get(addr)
        if page is None:
            page = self._made[addr] = self._snapshot(self.g.sp(addr))  # KeyError: not a page
        return page

    def __iter__(self) -> Iterator[int]:
        return iter(self.g.nodes)

    def __len__(self) -> int:
        return len(self.g)

    def _snapshot(self, sp: ShadowPage) -> WalkPage:
        slots: dict[int, Slot] = {}
        idx = sp.bitmap_indexes()
        spt = self.k.sptes(sp) if idx else None
        if spt is not None:
            for i in idx:
                e = self.k.decode(sp, i, spt[i])
                slots[i] = Slot(present=e.present, large=e.large, child=e.child)
        # unsync_known: the walk runs only where the kernel has all three members
        return WalkPage(sp=sp.addr, level=sp.level, gfn=sp.gfn, unsync=sp.unsync is True,
                        unsync_children=sp.unsync_children if known(sp.unsync_children) else 0,
                        bitmap=sp.unsync_child_bitmap if known(sp.unsync_child_bitmap) else 0,
                        slots=slots)


def walk_pages(k: Kernel, g: VMGraph) -> WalkPages:
    """Snapshots of every page of the graph, as the walk needs them (WalkPages)."""
    return WalkPages(k, g)


def walk_roots(k: Kernel, g: VMGraph, top: int | None) -> list[int]:
    """Pages to replay from: SP, or every root with unsync_children.

    None when this kernel lacks a member the walk reads (a MissingMember
    warning says which): the walk is not guessed.
    """
    if not k.layout.unsync_known:
        return []
    if top is not None:
        return [top]
    return [a for a in g.root_order() if g.sp(a).unsync_children]


def why_nothing(g: VMGraph, addr: int) -> str:
    """Why the walk from *addr* found nothing: the page is an unsync leaf itself (the
    walk starts above it), or has no unsync_children."""
    sp = g.sp(addr)
    if sp.unsync:
        parents = ", ".join(hx(p) for p, _ in g.parents(addr))
        return ("this page is itself unsync, a leaf of the walk: mmu_unsync_walk starts "
                "at a page with unsync_children above it"
                + (f" (its parents: {parents}; or 'unsync' with no SP)" if parents else ""))
    return "no unsync_children: nothing below this page is unsync"


def render_replay(u: UnsyncRoot) -> None:
    """One page's replay: a line for the page, then per batch its entries and a
    line per unsync leaf with its parents, then the walk's errors."""
    c = console()
    r = u.replay
    verb = "zap" if u.zap else "sync"
    nleaves = sum(len(b.leaves) for b in r.batches)
    what = f"root sp {hx(r.root)} ({', '.join(str(h) for h in u.holders)})" \
        if u.holders else f"sp {hx(r.root)}"
    say(f"{what}: {plural(len(r.batches), 'batch', 'batches')}, "
        f"{plural(nleaves, 'unsync leaf', 'unsync leaves')}")
    for n, b in enumerate(r.batches, 1):
        t = Grid(title=f"batch {n}: {plural(len(b.pages), 'entry', 'entries')}")
        # the systemtap script's words: SP Index is the position in the kvm_mmu_pages
        # vector (pages->page[i]); the slot in the parent is the entry's idx
        t.add_column("SP Index", justify="right")
        t.add_column("SP Level", justify="right")
        t.add_column("Slot in Parent", justify="right")
        t.add_column("SP")
        for i, e in enumerate(b.pages):
            t.add_row(str(i), str(e.level), str(e.idx), hx(e.sp))
        c.print(t)
        for leaf in b.leaves:
            levels = [f"L{lvl} {hx(p)}" for p, lvl in leaf.parents]
            pos = "" if leaf.pos < 0 else f"[{leaf.pos}] "
            line = f"{verb} sp {pos}{hx(leaf.sp)} gfn {hx(leaf.gfn)}"
            # a parent's level and address stay together when the line wraps
            say(f"  {line}  parents: {'  '.join(levels)}",
                units=[*line.split(), "parents:", *levels])
    for err in r.errors:
        c.print(f"  walk error: {err}", markup=False)


@kvm_command(
    argument("sp", nargs="?", metavar="SP", type="address",
             help="replay from this shadow page (struct kvm_mmu_page address, hex)"),
    argument("--zap", action="store_true",
             help="replay mmu_zap_unsync_children (the leaves are zapped, not synced)"),
)
def _cmd_unsync(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """replay mmu_sync_children's unsync walk offline, in the kernel's order

    For SP, or every root with unsync_children (vCPU roots, prev_roots, pages with
    root_count > 0): mmu_unsync_walk fills 16-entry kvm_mmu_pages batches, for_each_sp
    visits each unsync leaf with its mmu_page_path parents, and mmu_pages_clear_parents
    updates a copy of the bitmaps.
    Each root is replayed on its own copy of the current state; the target is never
    modified. --zap replays mmu_zap_unsync_children instead (kvm_mmu_prepare_zap_page on
    each leaf; a level-1 SP has nothing to zap).

    Columns of a batch: SP Index the entry's position in the kvm_mmu_pages vector
    (pages->page[i], 0-15); SP Level its page's level (both as the systemtap script
    this replaces prints them); Slot in Parent the entry's idx, the page's slot in its
    parent's spt[] (-1: the root the walk starts at); SP its struct kvm_mmu_page. Then
    one line per leaf synced (zapped), its vector position first ("sync sp [3] 0x...",
    the script's "Current sp : [3]..."), and its mmu_page_path parents with their
    levels (the script's "Level in Parents"). A "root sp" line is a root (held by the
    vCPUs named); a plain "sp" line, a page below the roots.
    """
    s = session_of(kwargs)
    vms, top = sp_scope(s, args.vm, args.sp)

    def collect(s: Session, vm: VM) -> list[UnsyncRoot]:
        g = s.graph(vm)
        pages = walk_pages(s.kernel, g)
        replay = replay_zap if args.zap else replay_sync
        return [UnsyncRoot(replay(a, pages), args.zap, g.roots.get(a, []))
                for a in walk_roots(s.kernel, g, top)]

    def show(vm: VM, replays: list[UnsyncRoot]) -> None:
        if not replays:
            console().print("  no root has unsync children")
        for u in replays:
            render_replay(u)
            if not u.replay.batches and not u.replay.errors:
                console().print(f"  {why_nothing(s.graph(vm), u.replay.root)}", markup=False)

    per_vm(kwargs, args, "unsync", vms=vms, collect=collect, show=show,
           to_json=lambda vm, replays: {"roots": [replay_json(u) for u in replays]})
