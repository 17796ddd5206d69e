"""The shadow-page graph of one VM (networkx), rebuilt from the kernel model.

Nodes are struct kvm_mmu_page addresses (attribute ``sp``: the ShadowPage);
an edge parent -> child carries the spt[] indexes that point at the child.
Roots are every page a vCPU or the VM holds as a root: mmu->root, its
prev_roots[], pae_root[] entries, kvm->arch.tdp_mmu_roots, and any page with
root_count > 0. Pages on active_mmu_pages that no root reaches are orphans.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from kvminspect.layout import known
from kvminspect.model import VM, Kernel, RootRef, ShadowPage, VCpu, is_obsolete_sp

MAX_PAGES = 1 << 20


@dataclass(frozen=True)
class Holder:
    """Who holds a shadow page as a root.

    *kind*: ``root`` (vcpu->arch.mmu->root), ``prev_root`` (mmu->prev_roots[index]),
    ``tdp_mmu_roots`` (on kvm->arch.tdp_mmu_roots) or ``root_count`` (a page on the VM's
    lists with root_count > 0 that nothing above names). *pae*: the mmu->pae_root[]
    entry of that vCPU root through which the page is held (PAE guests).
    """

    kind: str
    vcpu: int | None = None  # vcpu_idx (vcpu_id before 5.11)
    index: int | None = None  # prev_roots[index]
    pae: int | None = None

    KINDS = ("root", "prev_root", "tdp_mmu_roots", "root_count")

    def __str__(self) -> str:
        if self.vcpu is None:
            return self.kind
        s = f"vcpu{self.vcpu}." + ("root" if self.kind == "root" else f"prev_roots[{self.index}]")
        return s + (f".pae_root[{self.pae}]" if self.pae is not None else "")

    @property
    def is_vcpu(self) -> bool:
        """A vCPU reference (counted in root_count): root, prev_roots[i], pae_root[i]."""
        return self.vcpu is not None

    def order(self) -> tuple:
        """Current roots by vCPU, then cached ones, then the VM's own references."""
        return (self.KINDS.index(self.kind), self.vcpu or 0, self.index or 0, self.pae or 0)

    def to_json(self) -> dict[str, Any]:
        return {"holder": str(self), "kind": self.kind, "vcpu_idx": self.vcpu,
                "index": self.index, "pae_root": self.pae}


@dataclass
class VMGraph:
    """One VM's shadow pages, their hierarchy, and who holds which root.

    Everything here is derived from the read-only model: which pages are
    roots (and who holds them), which are obsolete, which are orphans.
    """

    vm: VM
    vcpus: list[VCpu]
    graph: nx.DiGraph
    roots: dict[int, list[Holder]] = field(default_factory=dict)  # sp -> holders
    active: set[int] = field(default_factory=set)  # on active_mmu_pages / tdp lists
    _sorted: tuple[int, list[ShadowPage]] | None = field(default=None, repr=False)

    def sp(self, addr: int) -> ShadowPage:
        return self.graph._node[addr]["sp"]

    def pages(self) -> list[ShadowPage]:
        """Every shadow page: the roots in root_order(), then by level (high to
        low), gfn and address. Sorted once (again if pages were added since)."""
        n = len(self.graph)
        if self._sorted is None or self._sorted[0] != n:
            first = {a: i for i, a in enumerate(self.root_order())}
            rest = len(first)
            pages = sorted((d["sp"] for d in self.graph._node.values()),
                           key=lambda s: (first.get(s.addr, rest), -s.level, s.gfn, s.addr))
            self._sorted = (n, pages)
        return list(self._sorted[1])

    def set_page(self, sp: ShadowPage) -> None:
        """Put *sp* in place of the page at its address (a what-if edit)."""
        self.graph.nodes[sp.addr]["sp"] = sp
        self._sorted = None

    def root_order(self) -> list[int]:
        """Every root, in the one order all commands use: by its first holder
        (vCPU roots by vCPU, then prev_roots, then the VM's), then address."""
        return sorted(self.roots, key=lambda a: (min(h.order() for h in self.roots[a]), a))

    def obsolete(self, sp: ShadowPage) -> bool:
        """is_obsolete_sp() against this VM's mmu_valid_gen."""
        return is_obsolete_sp(sp, self.vm)

    def is_orphan(self, addr: int) -> bool:
        return bool(self.graph.nodes[addr].get("orphan"))

    def orphans(self) -> list[int]:
        return [n for n, d in self.graph._node.items() if d.get("orphan")]

    def parents(self, addr: int) -> list[tuple[int, list[int]]]:
        """(parent sp, spt indexes) of every parent of *addr*."""
        return [(p, self.graph.edges[p, addr]["indexes"]) for p in self.graph.predecessors(addr)]

    def find_gfn(self, gfn: int) -> list[ShadowPage]:
        return [s for s in self.pages() if s.gfn == gfn]


def _holders(vcpus: list[VCpu]) -> list[tuple[RootRef, Holder]]:
    """Every (root, holder) pair of the vCPUs: root and prev_roots[]."""
    out = []
    for v in vcpus:
        n = v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id
        if v.root is not None:
            out.append((v.root, Holder("root", n)))
        out.extend((r, Holder("prev_root", n, i)) for i, r in enumerate(v.prev_roots))
    return out


def _add_page(k: Kernel, g: nx.DiGraph, addr: int) -> ShadowPage | None:
    """The struct kvm_mmu_page at *addr* as a node of *g* (None if unreadable)."""
    if addr in g:
        return g.nodes[addr]["sp"]
    sp = k.shadow_page(addr)
    if sp is None:
        return None
    g.add_node(addr, sp=sp)
    return sp


def _expand(k: Kernel, vm: VM, g: nx.DiGraph, start: list[int]) -> None:
    """Add every page reachable from *start* through present non-leaf SPTEs."""
    queue = deque(a for a in start if a in g)
    done: set[int] = set()
    nodes = g._node  # membership and the "sp" attribute without NodeView's overhead
    while queue and len(g) < MAX_PAGES:
        addr = queue.popleft()
        if addr in done:
            continue
        done.add(addr)
        parent = nodes[addr]["sp"]
        if not 2 <= parent.level <= 5:
            continue
        bad = 0
        edges: dict[int, list[int]] = {}
        for index, value, child_addr in k.links(parent):
            if child_addr is None:
                bad += 1
                if bad <= 3:
                    k.problem("struct kvm_mmu_page", addr,
                              f"spt[{index}] = {value:#x} points at a page with no "
                              "shadow page")
                continue
            known_node = nodes.get(child_addr)
            child = known_node["sp"] if known_node is not None else _add_page(k, g, child_addr)
            if child is None:
                continue
            if child.level != parent.level - 1:
                k.problem("struct kvm_mmu_page", addr,
                          f"spt[{index}] child {child.addr:#x} has level {child.level}, "
                          f"expected {parent.level - 1}")
                continue
            if child_addr in edges:
                edges[child_addr].append(index)
            else:
                edges[child_addr] = [index]
                if child_addr not in done:
                    queue.append(child_addr)
        old = g._succ[addr]
        for c, indexes in edges.items():
            if c in old:
                old[c]["indexes"].extend(indexes)
        g.add_edges_from((addr, c, {"indexes": i}) for c, i in edges.items() if c not in old)
        if bad > 3:
            k.problem("struct kvm_mmu_page", addr,
                      f"{bad} SPTEs point at no shadow page (garbage page table?)")
    if queue:
        k.problem("VM", vm.addr, f"more than {MAX_PAGES} shadow pages; graph truncated")


def build(k: Kernel, vm: VM) -> VMGraph:
    """Rebuild *vm*'s shadow-page graph from its roots and page lists."""
    with k.reading(vm):
        return _build(k, vm)


def _build(k: Kernel, vm: VM) -> VMGraph:
    """build(), its problems recorded against *vm*."""
    vcpus = k.vcpus(vm)
    g: nx.DiGraph = nx.DiGraph()
    vg = VMGraph(vm, vcpus, g)

    def hold(addr: int, who: Holder) -> None:
        if _add_page(k, g, addr) is not None:
            vg.roots.setdefault(addr, []).append(who)

    for ref, who in _holders(vcpus):
        if ref.sp is not None:
            hold(ref.sp.addr, who)
        for i, a in ref.pae_roots:
            hold(a, replace(who, pae=i))
    for a in k.tdp_roots(vm):
        hold(a, Holder("tdp_mmu_roots"))
    active = k.active_pages(vm)
    vg.active = set(active)
    for a in active:
        sp = _add_page(k, g, a)
        if sp is not None and known(sp.root_count) and sp.root_count > 0 \
                and a not in vg.roots:
            vg.roots[a] = [Holder("root_count")]
    _expand(k, vm, g, list(g.nodes))
    reach = set(vg.roots)
    todo = list(reach)
    while todo:
        for c in g.successors(todo.pop()):
            if c not in reach:
                reach.add(c)
                todo.append(c)
    for n in g._node.keys() - reach:
        g.nodes[n]["orphan"] = True
    k.drop_blocks()  # everything is decoded; the page cache is only memory now
    return vg
