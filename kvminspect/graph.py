"""The shadow-page graph of one VM (networkx), rebuilt from the kernel model.

Nodes are struct kvm_mmu_page addresses (attribute ``sp``: the ShadowPage);
an edge parent -> child carries the spt[] indexes that point at the child.
Roots are every page a vCPU or the VM holds as a root: mmu->root, its
prev_roots[], pae_root[] entries, kvm->arch.tdp_mmu_roots, and any page with
root_count > 0. Pages on active_mmu_pages that no root reaches are orphans.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import networkx as nx

from kvminspect.layout import known
from kvminspect.model import VM, Kernel, RootRef, ShadowPage, VCpu

MAX_PAGES = 1 << 20


@dataclass
class VMGraph:
    """One VM's shadow pages, their hierarchy, and who holds which root."""

    vm: VM
    vcpus: list[VCpu]
    graph: nx.DiGraph
    roots: dict[int, list[str]] = field(default_factory=dict)  # sp -> holders
    active: set[int] = field(default_factory=set)  # on active_mmu_pages / tdp lists

    def sp(self, addr: int) -> ShadowPage:
        return self.graph.nodes[addr]["sp"]

    def pages(self) -> list[ShadowPage]:
        """Every shadow page, roots first then by level (high to low) and gfn."""
        return sorted((d["sp"] for _, d in self.graph.nodes(data=True)),
                      key=lambda s: (s.addr not in self.roots, -s.level, s.gfn, s.addr))

    def orphans(self) -> list[int]:
        return [n for n, d in self.graph.nodes(data=True) if d.get("orphan")]

    def parents(self, addr: int) -> list[tuple[int, list[int]]]:
        """(parent sp, spt indexes) of every parent of *addr*."""
        return [(p, self.graph.edges[p, addr]["indexes"]) for p in self.graph.predecessors(addr)]

    def find_gfn(self, gfn: int) -> list[ShadowPage]:
        return [s for s in self.pages() if s.gfn == gfn]


def _holders(vcpus: list[VCpu]) -> list[tuple[RootRef, str]]:
    """Every (root, holder) pair of the vCPUs: root and prev_roots[]."""
    out = []
    for v in vcpus:
        if v.root is not None:
            out.append((v.root, f"vcpu{v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id}.root"))
        for i, r in enumerate(v.prev_roots):
            out.append((r, f"vcpu{v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id}.prev_roots[{i}]"))
    return out


def _add_page(k: Kernel, vm: VM, g: nx.DiGraph, addr: int) -> ShadowPage | None:
    if addr in g:
        return g.nodes[addr]["sp"]
    sp = k.shadow_page(addr)
    if sp is None:
        return None
    k.mark_obsolete(sp, vm)
    g.add_node(addr, sp=sp, orphan=False)
    return sp


def _expand(k: Kernel, vm: VM, g: nx.DiGraph, start: list[int]) -> None:
    """Add every page reachable from *start* through present non-leaf SPTEs."""
    queue = deque(a for a in start if a in g)
    done: set[int] = set()
    while queue and len(g) < MAX_PAGES:
        addr = queue.popleft()
        if addr in done:
            continue
        done.add(addr)
        parent = g.nodes[addr]["sp"]
        if not 2 <= parent.level <= 5:
            continue
        bad = 0
        for e in k.children(parent):
            if e.child is None:
                bad += 1
                if bad <= 3:
                    k.problem("struct kvm_mmu_page", addr,
                              f"spt[{e.index}] = {e.value:#x} points at a page with no "
                              "shadow page")
                continue
            child = _add_page(k, vm, g, e.child)
            if child is None:
                continue
            if child.level != parent.level - 1:
                k.problem("struct kvm_mmu_page", addr,
                          f"spt[{e.index}] child {child.addr:#x} has level {child.level}, "
                          f"expected {parent.level - 1}")
                continue
            if g.has_edge(addr, child.addr):
                g.edges[addr, child.addr]["indexes"].append(e.index)
            else:
                g.add_edge(addr, child.addr, indexes=[e.index])
            if child.addr not in done:
                queue.append(child.addr)
        if bad > 3:
            k.problem("struct kvm_mmu_page", addr,
                      f"{bad} SPTEs point at no shadow page (garbage page table?)")
    if queue:
        k.problem("VM", vm.addr, f"more than {MAX_PAGES} shadow pages; graph truncated")


def build(k: Kernel, vm: VM) -> VMGraph:
    """Rebuild *vm*'s shadow-page graph from its roots and page lists."""
    vcpus = k.vcpus(vm)
    g: nx.DiGraph = nx.DiGraph()
    vg = VMGraph(vm, vcpus, g)

    def hold(addr: int, who: str) -> None:
        if _add_page(k, vm, g, addr) is not None:
            vg.roots.setdefault(addr, []).append(who)

    for ref, who in _holders(vcpus):
        if ref.sp is not None:
            hold(ref.sp.addr, who)
        for i, a in ref.pae_roots:
            hold(a, f"{who}.pae_root[{i}]")
    for a in k.tdp_roots(vm):
        hold(a, "tdp_mmu_roots")
    active = k.active_pages(vm)
    vg.active = set(active)
    for a in active:
        sp = _add_page(k, vm, g, a)
        if sp is not None and known(sp.root_count) and sp.root_count > 0 \
                and a not in vg.roots:
            vg.roots[a] = ["root_count"]
    _expand(k, vm, g, list(g.nodes))
    reach = set(vg.roots)
    todo = list(reach)
    while todo:
        for c in g.successors(todo.pop()):
            if c not in reach:
                reach.add(c)
                todo.append(c)
    for n in g.nodes:
        g.nodes[n]["orphan"] = n not in reach
    return vg
