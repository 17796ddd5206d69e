"""tree: the shadow-page hierarchy from the roots (or one page) down."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from drgn import Program
from drgn.commands import argument, drgn_argument

from kvminspect.commands import kvm_command, per_vm, session_of, sp_scope, vm_header
from kvminspect.drgn_code import print_code, tree_code
from kvminspect.errors import UsageError
from kvminspect.fmt import hx
from kvminspect.graph import VMGraph
from kvminspect.model import VM, ShadowPage, is_obsolete_sp
from kvminspect.render import (
    Stream,
    cell_len,
    compact,
    console,
    plural,
    print_lines,
    wrap_words,
)
from kvminspect.results import TreeNode, page_view
from kvminspect.session import Session
from kvminspect.shapes import LeafTexts, plain_siblings, tree_node_json

_new = tuple.__new__


def label_units(n: TreeNode) -> list[str]:
    """A tree page's label as units never split when it wraps: slot, address,
    gfn, level, state, each holder (with its comma), the notes."""
    p = n.page
    sp = p.sp
    parts = [f"[{n.slot}]" if n.slot is not None else "",
             f"sp {hx(sp.addr)}", f"gfn {hx(sp.gfn)}", f"L{sp.level}", *p.flags()]
    if p.holders:
        names = [str(h) for h in p.holders]
        units = [*(h + "," for h in names[:-1]), names[-1]]
        parts += ["<- " + units[0], *units[1:]]
    if n.ref:
        parts.append("(subtree shown above)")
    if n.children_omitted:
        parts.append(f"(+{n.children_omitted} below --depth)")
    return [x for x in parts if x]


def sp_label(n: TreeNode) -> str:
    """One line for a tree's page: slot, address, gfn, level, state, holders."""
    return " ".join(label_units(n))


def unsync_only_pages(g: VMGraph, unsync_only: bool) -> set[int] | None:
    """With --unsync-only: pages that are unsync or lead to one; else None (all)."""
    if not unsync_only:
        return None
    keep = {sp.addr for sp in g.nodes.values() if sp.unsync is True}
    todo = list(keep)
    while todo:
        for p in g.predecessors(todo.pop()):
            if p not in keep:
                keep.add(p)
                todo.append(p)
    return keep


def subtree(g: VMGraph, addr: int, index: int | None, depth: int | None,
            keep: set[int] | None, seen: set[int]) -> TreeNode:
    """The tree under *addr*: a page shown twice is a reference (TreeNode.ref)."""
    page = page_view(g.sp(addr), g)
    if addr in seen and g.children(addr):
        return TreeNode(page, index, True, 0, ())
    seen.add(addr)
    kids = [(i, c) for i, c in g.children(addr) if keep is None or c in keep]
    if depth is not None and depth <= 0:
        return TreeNode(page, index, False, len(kids), ())
    return TreeNode(page, index, False, 0,
                    [subtree(g, c, i, None if depth is None else depth - 1, keep, seen)
                     for i, c in kids])


def _single(g: VMGraph, addr: int, index: int | None, depth: int | None,
            keep: set[int] | None, seen: set[int]) -> TreeNode | None:
    """subtree() of *addr* if it has no children to show (a leaf, a reference
    to a page shown above, or cut by --depth), else None; marks it seen."""
    kids = g.children(addr)
    if addr in seen and kids:
        return TreeNode(page_view(g.sp(addr), g), index, True, 0, ())
    if keep is not None and kids:
        kids = [k for k in kids if k[1] in keep]
    if kids and (depth is None or depth > 0):
        return None
    seen.add(addr)  # the hot path (most pages): g.nodes, and no NamedTuple.__new__
    return _new(TreeNode, (page_view(g.nodes[addr], g), index, False, len(kids), ()))


def leaf_text(n: TreeNode, texts: LeafTexts) -> str:
    """compact(tree_node_json(n)), by shapes' template where the node is plain."""
    text = texts.node(n)
    return compact(tree_node_json(n)) if text is None else text


def plain_children(g: VMGraph, pairs: list[tuple[int, int]]
                   ) -> tuple[tuple[int, ...], list[ShadowPage], bool] | None:
    """(slots, pages, orphan) of the children in *pairs* (spt index, child)
    when each is a leaf without holders and all of them are orphans or none
    (what a renderer may write in one pass: a page without children is never
    a reference, so none is marked seen); else None."""
    slots, kids = zip(*pairs, strict=True)
    orphans = g.orphan_set
    if not (g.links.keys().isdisjoint(kids) and g.roots.keys().isdisjoint(kids)):
        return None
    orphan = bool(orphans) and kids[0] in orphans
    if orphans and (orphan and not orphans.issuperset(kids)
                    or not orphan and not orphans.isdisjoint(kids)):
        return None
    return slots, list(map(g.nodes.__getitem__, kids)), orphan


def _plain_run(g: VMGraph, pairs: list[tuple[int, int]], texts: LeafTexts) -> str | None:
    """The JSON text of every child in *pairs* as one run (LeafTexts.run), when
    they are plain_children(); else None."""
    plain = plain_children(g, pairs)
    if plain is None:
        return None
    slots, sps, orphan = plain
    return texts.run(sps, slots, is_obsolete_sp(sps[0], g.vm), orphan)


def subtree_chunks(g: VMGraph, addr: int, index: int | None, depth: int | None,
                   keep: set[int] | None, seen: set[int], texts: LeafTexts) -> Iterator[str]:
    """subtree() as JSON text (shapes.tree_node_json), piece by piece
    (render.Stream): the same document, never held whole; runs of childless
    pages are encoded together."""
    one = _single(g, addr, index, depth, keep, seen)
    if one is not None:
        yield leaf_text(one, texts)
        return
    seen.add(addr)
    node = tree_node_json(TreeNode(page_view(g.sp(addr), g), index, False, 0, ()))
    del node["children"]  # they follow, piece by piece
    yield compact(node)[:-1] + ', "children": [\n'
    below = None if depth is None else depth - 1
    run: list[str] = []  # a run of childless pages: one line, as compact() of their list
    sep = ""
    links, nodes, roots, orphans, vm = g.links, g.nodes, g.roots, g.orphan_set, g.vm
    pairs = g.children(addr)
    if keep is None and pairs:
        text = _plain_run(g, pairs, texts)
        if text is not None:
            yield text
            yield "]}"
            return
    page = texts.page
    for i, c in pairs:
        if keep is not None and c not in keep:
            continue
        if keep is None and c not in links and c not in roots:  # _single's most common
            # node (childless, no holders), without its PageView and TreeNode; not
            # marked seen: a page without children is never a reference
            sp = nodes[c]
            text = page(sp, is_obsolete_sp(sp, vm), c in orphans, i)
            if text is not None:
                run.append(text)
                continue
        leaf = _single(g, c, i, below, keep, seen)
        if leaf is not None:
            run.append(leaf_text(leaf, texts))
            continue
        if run:
            yield sep + ", ".join(run)
            run, sep = [], ",\n"
        yield sep
        yield from subtree_chunks(g, c, i, below, keep, seen, texts)
        sep = ",\n"
    if run:
        yield sep + ", ".join(run)
    yield "]}"


@dataclass(frozen=True)
class TreePlan:
    """What tree shows of one VM: the graph, the tops, --depth and --unsync-only's pages."""

    g: VMGraph
    tops: list[int]
    depth: int | None
    keep: set[int] | None

    def trees(self) -> list[TreeNode]:
        """Every tree, as nested subtree() nodes."""
        seen: set[int] = set()
        return [subtree(self.g, a, None, self.depth, self.keep, seen) for a in self.tops]

    def text(self, width: int) -> Iterator[str]:
        """Every tree as text lines at *width* (text_lines), one after another."""
        seen: set[int] = set()
        for a in self.tops:
            yield from text_lines(self.g, a, None, self.depth, self.keep, seen, width)

    def chunks(self) -> Iterator[str]:
        """The same list of trees as JSON text, piece by piece."""
        seen: set[int] = set()
        texts = LeafTexts()  # (one per rendering: its role texts are this kernel's)
        yield "["
        for n, a in enumerate(self.tops):
            if n:
                yield ",\n"
            yield from subtree_chunks(self.g, a, None, self.depth, self.keep, seen, texts)
        yield "]"


def plain_lines(g: VMGraph, pairs: list[tuple[int, int]], below: str, width: int
                ) -> list[str] | None:
    """text_lines() of every child in *pairs* (spt index, child), when they are
    plain_children() and differ only in address and gfn (shapes.plain_siblings:
    a TDP MMU's level-1 tables): the state words made once, a line each; None
    otherwise, or if a line would wrap."""
    plain = plain_children(g, pairs)
    if plain is None:
        return None
    slots, sps, _ = plain
    alike = plain_siblings(sps, slots)
    if alike is None:
        return None
    addrs, gfns = alike
    # label_units() of a childless page without holders: slot, address, gfn, then these
    tail = " ".join([f"L{sps[0].level}", *page_view(sps[0], g).flags()])
    labels = [f"[{i}] sp {a:#x} gfn {n:#x} {tail}" for i, a, n in zip(slots, addrs, gfns,
                                                                      strict=True)]
    if not tail.isascii() or cell_len(below + "├── ") + max(map(len, labels)) > width:
        return None
    lines = [below + "├── " + label for label in labels]
    lines[-1] = below + "└── " + labels[-1]
    return lines


def text_lines(g: VMGraph, addr: int, index: int | None, depth: int | None,
               keep: set[int] | None, seen: set[int], width: int, lead: str = "",
               guide: str = "", below: str = "") -> Iterator[str]:
    """subtree() of *addr* drawn as rich's Tree draws it (├── └── │), line by
    line as printed: each label's units (label_units) wrapped to *width*,
    continuation lines under the label, no value cut. The pages are visited
    in subtree()'s order (a page shown twice is a reference where subtree()
    makes it one), but no node outlives its lines. *lead* + *guide* start the
    label's first line, *below* the lines under it."""
    page = page_view(g.sp(addr), g)
    pairs = g.children(addr)
    kids: list[tuple[int, int]] = []
    if addr in seen and pairs:
        node = TreeNode(page, index, True, 0, ())
    else:
        seen.add(addr)
        kids = [(i, c) for i, c in pairs if keep is None or c in keep]
        node = TreeNode(page, index, False, 0, ())
        if depth is not None and depth <= 0:
            node, kids = TreeNode(page, index, False, len(kids), ()), []
    yield from wrap_words(label_units(node), width, lead + guide,
                          below + ("│" if kids else " ") + "   ")
    plain = plain_lines(g, kids, below, width) if kids else None
    if plain is not None:
        yield from plain
        return
    deeper = None if depth is None else depth - 1
    for k, (i, c) in enumerate(kids):
        last = k == len(kids) - 1
        yield from text_lines(g, c, i, deeper, keep, seen, width, below,
                              "└── " if last else "├── ", below + ("    " if last else "│   "))


def start_pages(g: VMGraph, sp: int | None) -> list[int]:
    """The tree tops: one page, or every root (VMGraph.root_order) then orphan tops."""
    if sp is not None:
        return [sp]
    orphan_tops = [n for n in g.orphans()
                   if not any(g.is_orphan(p) for p in g.predecessors(n))]
    return g.root_order() + sorted(orphan_tops)


@kvm_command(
    argument("sp", nargs="?", metavar="SP", type="address",
             help="start at this shadow page (struct kvm_mmu_page address, hex)"),
    argument("--depth", type="count", metavar="N",
             help="levels to show below the top (0 or more)"),
    argument("--unsync-only", action="store_true",
             help="only the paths that lead to unsync pages"),
    drgn_argument,
)
def _cmd_tree(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """the shadow-page tree from every root (or from SP) down

    Each page: its slot in the parent, struct kvm_mmu_page address, gfn, level and state
    (UNSYNC, unsync_children, invalid/obsolete, root_count, who holds it as a root). A
    page reached twice is printed once. Orphan pages (on active_mmu_pages, reachable
    from no root) follow the roots. --drgn prints the drgn code that walks the same pages
    (spt[] down from each root).
    """
    s = session_of(kwargs)
    vms, top = sp_scope(s, args.vm, args.sp)
    if args.drgn:
        if args.unsync_only:
            raise UsageError("tree --drgn walks every page: it does not take --unsync-only")
        every = args.vm is None and s.selected is None and top is None
        print_code(args, lambda: tree_code(prog, s.kernel.layout, vms, every, top, args.depth))
        return

    def collect(s: Session, vm: VM) -> TreePlan:
        g = s.graph(vm)
        keep = unsync_only_pages(g, args.unsync_only)
        return TreePlan(g, [a for a in start_pages(g, top) if keep is None or a in keep],
                        args.depth, keep)

    def show(vm: VM, plan: TreePlan) -> None:
        c = console()
        if not plan.tops:
            c.print("  (nothing to show)")
        print_lines(c, plan.text(c.width))

    def counts(plan: TreePlan) -> str:
        return (f"{plural(len(plan.g), 'shadow page', 'shadow pages')}, "
                f"{plural(len(plan.g.roots), 'root', 'roots')}, "
                f"{plural(len(plan.g.orphans()), 'orphan', 'orphans')}")

    per_vm(kwargs, args, "tree", vms=vms, collect=collect, show=show,
           to_json=lambda vm, plan: {"pages": len(plan.g), "roots": len(plan.g.roots),
                                     "orphans": len(plan.g.orphans()),
                                     "trees": Stream(plan.chunks)},
           header=lambda vm, plan: vm_header(vm, counts(plan)))
