"""tree: the shadow-page hierarchy from the roots (or one page) down."""

from __future__ import annotations

import argparse
import re
from typing import Any

from drgn import Program
from drgn.commands import argument, command
from rich.tree import Tree

from kvminspect.commands import JSON_ARG, NAMESPACE, VM_ARG, finish, session_of, sp_scope
from kvminspect.graph import VMGraph
from kvminspect.model import ShadowPage
from kvminspect.render import console, hx


def sp_label(sp: ShadowPage, g: VMGraph, index: int | None = None) -> str:
    """One line for a shadow page: slot, address, gfn, level and its state."""
    parts = [f"[{index}]" if index is not None else "",
             f"sp {sp.addr:#x} gfn {sp.gfn:#x} L{sp.level}"]
    if sp.role.direct:
        parts.append("direct")
    if sp.tdp_mmu_page:
        parts.append("tdp")
    if sp.unsync:
        parts.append("UNSYNC")
    if sp.unsync_children:
        parts.append(f"unsync_children={sp.unsync_children}")
    if sp.role.invalid:
        parts.append("invalid")
    elif sp.obsolete:
        parts.append("obsolete")
    if sp.root_count:
        parts.append(f"root_count={sp.root_count}")
    if sp.addr in g.roots:
        parts.append("<- " + ", ".join(g.roots[sp.addr]))
    if g.graph.nodes[sp.addr].get("orphan"):
        parts.append("ORPHAN")
    return " ".join(p for p in parts if p)


def _wanted(g: VMGraph, unsync_only: bool) -> set[int] | None:
    """With --unsync-only: pages that are unsync or lead to one; else None (all)."""
    if not unsync_only:
        return None
    keep = {n for n, d in g.graph.nodes(data=True) if d["sp"].unsync}
    todo = list(keep)
    while todo:
        for p in g.graph.predecessors(todo.pop()):
            if p not in keep:
                keep.add(p)
                todo.append(p)
    return keep


def children_of(g: VMGraph, addr: int) -> list[tuple[int, int]]:
    """(spt index, child) pairs of a page, by index."""
    out = [(i, c) for c in g.graph.successors(addr) for i in g.graph.edges[addr, c]["indexes"]]
    return sorted(out)


def subtree(g: VMGraph, addr: int, index: int | None, depth: int | None,
            keep: set[int] | None, seen: set[int]) -> dict[str, Any]:
    """The JSON tree under *addr* (a page shown twice is a reference)."""
    sp = g.sp(addr)
    node: dict[str, Any] = {"sp": hx(addr), "index": index, "gfn": hx(sp.gfn),
                            "level": sp.level, "direct": sp.role.direct,
                            "unsync": sp.unsync, "unsync_children": sp.unsync_children,
                            "invalid": sp.role.invalid, "obsolete": sp.obsolete,
                            "root_count": sp.root_count, "holders": g.roots.get(addr, [])}
    if addr in seen and g.graph.out_degree(addr):
        node["ref"] = True
        return node
    seen.add(addr)
    kids = [(i, c) for i, c in children_of(g, addr) if keep is None or c in keep]
    if depth is not None and depth <= 0:
        node["children_omitted"] = len(kids)
        return node
    node["children"] = [subtree(g, c, i, None if depth is None else depth - 1, keep, seen)
                        for i, c in kids]
    return node


def to_rich(g: VMGraph, node: dict[str, Any], parent: Tree | None) -> Tree:
    sp = g.sp(int(node["sp"], 16))
    label = sp_label(sp, g, node["index"])
    if node.get("ref"):
        label += " (subtree shown above)"
    if node.get("children_omitted"):
        label += f" (+{node['children_omitted']} below --depth)"
    t = parent.add(label) if parent is not None else Tree(label)
    for c in node.get("children", []):
        to_rich(g, c, t)
    return t


def start_pages(g: VMGraph, sp: int | None) -> list[int]:
    """The tree tops: one page, or every root (held ones first) then orphan tops."""
    if sp is not None:
        return [sp]
    def order(a: int) -> tuple:
        """Current roots by vCPU, then cached (prev) roots, then the rest."""
        held = g.roots[a]
        vcpu = [int(m.group(1)) for h in held if (m := re.match(r"vcpu(\d+)\.root$", h))]
        cached = any("prev_roots" in h for h in held)
        return (0 if vcpu else 1 if cached else 2, min(vcpu, default=0), a)

    roots = sorted(g.roots, key=order)
    orphan_tops = [n for n in g.orphans()
                   if not any(g.graph.nodes[p].get("orphan") for p in g.graph.predecessors(n))]
    return roots + sorted(orphan_tops)


@command(
    description="the shadow-page tree from every root (or from SP) down",
    long_description="Each page: its slot in the parent, struct kvm_mmu_page address, gfn, "
    "level and state (UNSYNC, unsync_children, invalid/obsolete, root_count, who holds it as "
    "a root). A page reached twice is printed once. Orphan pages (on active_mmu_pages, "
    "reachable from no root) follow the roots.",
    arguments=(
        argument("sp", nargs="?", metavar="SP", help="start at this shadow page (address)"),
        argument("--depth", type=int, metavar="N", help="levels to show below the top"),
        argument("--unsync-only", action="store_true",
                 help="only the paths that lead to unsync pages"),
        VM_ARG, JSON_ARG,
    ),
    namespace=NAMESPACE,
)
def _cmd_tree(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    s = session_of(kwargs)
    start = len(s.problems())
    vms, top = sp_scope(s, args.vm, args.sp)
    out = []
    for vm in vms:
        g = s.graph(vm)
        keep = _wanted(g, args.unsync_only)
        seen: set[int] = set()
        trees = [subtree(g, a, None, args.depth, keep, seen)
                 for a in start_pages(g, top) if keep is None or a in keep]
        out.append((vm, g, trees))

    def human() -> None:
        c = console()
        if not vms:
            c.print("no VMs (vm_list is empty)")
        for vm, g, trees in out:
            c.print(f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid}  {vm.mmu}: "
                    f"{len(g.graph)} shadow pages, {len(g.roots)} roots, "
                    f"{len(g.orphans())} orphans")
            if not trees:
                c.print("  (nothing to show)")
            for t in trees:
                c.print(to_rich(g, t, None), markup=False)

    doc = {"vms": [{"kvm": hx(vm.addr), "pid": vm.pid, "mmu": vm.mmu, "trees": trees}
                   for vm, _, trees in out]}
    finish(s, args, doc, human, start)
