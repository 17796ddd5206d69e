"""The shadow-page graph of one VM, rebuilt from the kernel model.

Nodes are struct kvm_mmu_page addresses, each with its ShadowPage; a link
parent -> child is one present non-leaf SPTE of the parent, spt[index]
(link_shadow_page / to_shadow_page). Roots are every page a vCPU or the VM
holds as a root: mmu->root, its prev_roots[], pae_root[] entries (of both
the vCPU's root_mmu and guest_mmu),
kvm->arch.tdp_mmu_roots, and any page with root_count > 0. Pages on
active_mmu_pages that no root reaches are orphans.

The graph is kept as plain dicts (10^5 pages build in a fraction of a
second); ``VMGraph.graph`` is the same graph as a networkx DiGraph, made on
first use (export, networkx algorithms): networkx alone costs about 1 s and
0.9 KiB per page at that size.
"""

from __future__ import annotations

import contextlib
import gc
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import compress, islice
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, cast

from kvminspect.fmt import spte_text
from kvminspect.layout import known
from kvminspect.model import VM, Kernel, RootRef, ShadowPage, VCpu, is_obsolete_sp

if TYPE_CHECKING:  # networkx (0.1 s to import) only when VMGraph.graph is asked for
    import networkx as nx
    from numpy.typing import NDArray

MAX_PAGES = 1 << 20
BIG_TABLE = 64  # _expand(): a table with this many children is checked by numpy
SORT_COLUMNS_FROM = 4096  # VMGraph.pages(): this many pages are sorted by numpy
LINKS_BATCH = 256  # _expand(): tables whose links are read at once (link_columns_many)
# VMGraph.column(): the ShadowPage fields it makes arrays of, and their numpy types
COLUMNS = {"addr": "u8", "gfn": "u8", "level": "i8", "spt": "u8", "tdp_mmu_page": "?"}
second = itemgetter(1)  # the child of a link (index, child)


@dataclass(frozen=True)
class Holder:
    """Who holds a shadow page as a root.

    *kind*: ``root`` (vcpu->arch.mmu->root), ``prev_root`` (mmu->prev_roots[index]),
    ``tdp_mmu_roots`` (on kvm->arch.tdp_mmu_roots) or ``root_count`` (a page on the VM's
    lists with root_count > 0 that nothing above names). *pae*: the mmu->pae_root[]
    entry of that vCPU root through which the page is held (PAE guests). *mmu*: None
    for the current MMU (vcpu->arch.mmu), else the name of the other struct kvm_mmu
    holding it ("guest_mmu": "vcpu0.guest_mmu.root"; "root_mmu" while in L2).
    """

    kind: str
    # "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd) added vcpu_idx
    vcpu: int | None = None  # vcpu_idx (vcpu_id on kernels without it)
    index: int | None = None  # prev_roots[index]
    pae: int | None = None
    mmu: str | None = None  # the non-current MMU (VCpu.other_mmu) holding it

    KINDS = ("root", "prev_root", "tdp_mmu_roots", "root_count")

    def __str__(self) -> str:
        if self.vcpu is None:
            return self.kind
        s = f"vcpu{self.vcpu}." + (f"{self.mmu}." if self.mmu else "")
        s += "root" if self.kind == "root" else f"prev_roots[{self.index}]"
        return s + (f".pae_root[{self.pae}]" if self.pae is not None else "")

    @property
    def is_vcpu(self) -> bool:
        """A vCPU reference (counted in root_count): root, prev_roots[i], pae_root[i]."""
        return self.vcpu is not None

    def order(self) -> tuple[int, bool, int, int, int]:
        """Current roots by vCPU, then cached ones, then the VM's own references;
        the other MMU's after the current MMU's of the same kind."""
        return (self.KINDS.index(self.kind), self.mmu is not None, self.vcpu or 0,
                self.index or 0, self.pae or 0)

    def to_json(self) -> dict[str, Any]:
        return {"holder": str(self), "kind": self.kind, "vcpu_idx": self.vcpu,
                "index": self.index, "pae_root": self.pae, "mmu": self.mmu}


@dataclass
class VMGraph:
    """One VM's shadow pages, their hierarchy, and who holds which root.

    Everything here is derived from the read-only model: which pages are
    roots (and who holds them), which are obsolete, which are orphans.
    ``nodes``: every page by address; ``links``: each parent's (index, child)
    pairs in spt[] order (only pages with children have an entry).
    """

    vm: VM
    vcpus: list[VCpu]
    nodes: dict[int, ShadowPage] = field(default_factory=dict)
    links: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    roots: dict[int, list[Holder]] = field(default_factory=dict)  # sp -> holders
    active: set[int] = field(default_factory=set)  # on active_mmu_pages / tdp lists
    orphan_set: set[int] = field(default_factory=set)  # see mark_orphans()
    # each parent's (index, child) pairs whose child's level is not the parent's minus
    # one: recorded as problems, kept out of links and not followed (_expand)
    wrong_level: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # build(): how many pages of ``nodes`` come first (the roots), then how many
    # are the listed pages after them (the rest are not on the lists): listed()
    listed_span: tuple[int, int] | None = field(default=None, repr=False)
    _sorted: list[ShadowPage] | None = field(default=None, repr=False)
    _parents: dict[int, list[tuple[int, int]]] | None = field(default=None, repr=False)
    _nx: nx.DiGraph | None = field(default=None, repr=False)
    _columns: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, addr: object) -> bool:
        return addr in self.nodes

    def sp(self, addr: int) -> ShadowPage:
        return self.nodes[addr]

    def pages(self) -> list[ShadowPage]:
        """Every shadow page: the roots in root_order(), then by level (high to
        low), gfn and address (sorted once)."""
        if self._sorted is None:
            self._sorted = self._ordered(list(self.nodes.values()))
        return list(self._sorted)

    def pages_where(self, test: Callable[[ShadowPage], object], among: tuple[str, ...] = ()
                    ) -> list[ShadowPage]:
        """The pages() for which *test* is true, in pages()' order: every page
        tested first, only those sorted (a 10^6-page MMU has few unsync pages,
        and sorting them all costs half a second). *among*: fields (dotted
        names, as attrgetter takes them) one of which is true in every page
        *test* can pass (a NoValue is false): the others are passed over in C,
        the Python test asked of the few left."""
        pages: Iterable[ShadowPage] = (self._sorted if self._sorted is not None
                                       else self.nodes.values())
        if among:
            get = attrgetter(*among)
            pages = compress(pages, map(any, map(get, pages)) if len(among) > 1
                             else map(get, pages))
        found = list(filter(test, pages))
        return found if self._sorted is not None else self._ordered(found)

    def _ordered(self, sps: list[ShadowPage]) -> list[ShadowPage]:
        """*sps* in pages()' order: roots in root_order(), then by level (high
        to low), gfn and address."""
        first = {a: i for i, a in enumerate(self.root_order())}
        rest = _by_level_gfn_addr(sps)
        if first:
            tops = sorted((sp for sp in rest if sp.addr in first), key=lambda sp: first[sp.addr])
            rest = tops + [sp for sp in rest if sp.addr not in first]
        return rest

    def root_order(self) -> list[int]:
        """Every root, in the one order all commands use: by its first holder
        (vCPU roots by vCPU, then prev_roots, then the VM's), then address."""
        return sorted(self.roots, key=lambda a: (min(h.order() for h in self.roots[a]), a))

    def children(self, addr: int) -> list[tuple[int, int]]:
        """(spt index, child) of every link of *addr*, by index."""
        return self.links.get(addr, [])

    def successors(self, addr: int) -> list[int]:
        """Each child of *addr* once, in the order of its first index."""
        return list(dict.fromkeys(c for _, c in self.links.get(addr, ())))

    def parents(self, addr: int) -> list[tuple[int, list[int]]]:
        """(parent, spt indexes) of every parent of *addr*."""
        if self._parents is None:
            inv: dict[int, list[tuple[int, int]]] = {}
            for p, pairs in self.links.items():
                for i, c in pairs:
                    if c in inv:
                        inv[c].append((p, i))
                    else:
                        inv[c] = [(p, i)]
            self._parents = inv
        out: dict[int, list[int]] = {}
        for p, i in self._parents.get(addr, ()):
            out.setdefault(p, []).append(i)
        return list(out.items())

    def predecessors(self, addr: int) -> list[int]:
        return [p for p, _ in self.parents(addr)]

    def edges(self) -> Iterator[tuple[int, int, list[int]]]:
        """(parent, child, spt indexes) of every parent/child pair."""
        for p, pairs in self.links.items():
            grouped: dict[int, list[int]] = {}
            for i, c in pairs:
                grouped.setdefault(c, []).append(i)
            for c, idx in grouped.items():
                yield p, c, idx

    def obsolete(self, sp: ShadowPage) -> bool:
        """is_obsolete_sp() against this VM's mmu_valid_gen."""
        return is_obsolete_sp(sp, self.vm)

    def is_orphan(self, addr: int) -> bool:
        return addr in self.orphan_set

    def orphans(self) -> list[int]:
        """The orphan pages, in the order of ``nodes``."""
        orphans = self.orphan_set
        return [n for n in self.nodes if n in orphans] if orphans else []

    def find_gfn(self, gfn: int) -> list[ShadowPage]:
        return [s for s in self.pages() if s.gfn == gfn]

    def mark_orphans(self, linked: set[int] | NDArray[Any] | None = None) -> None:
        """orphan_set: the pages no root reaches through links.

        A link goes one level down (_expand keeps no other; unlink() only takes
        links away), so following parents up from any page ends at a page with
        none: when every page without a parent is a root, each page is reached
        (the common case, told from the links at once, by counting: the pages
        without a parent are as many as the roots without one); else the walk
        from the roots says which. *linked*: every child of links, if known
        (_expand's: pages of ``nodes``, each once; a set, or a sorted numpy
        array for a big graph).
        """
        nodes = self.nodes
        if linked is None:
            linked = set()
            for pairs in self.links.values():
                linked.update(map(second, pairs))
            linked &= nodes.keys()  # (what-if edits may link a page not in nodes)
        if isinstance(linked, set):
            tops = sum(1 for r in self.roots if r in nodes and r not in linked)
        else:
            tops = sum(1 for r in self.roots if r in nodes and not _in_sorted(linked, r))
        if len(nodes) - len(linked) == tops:
            self.orphan_set = set()
            return
        reach = set(self.roots)
        todo = list(reach)
        links = self.links
        while todo:
            for _, c in links.get(todo.pop(), ()):
                if c not in reach:
                    reach.add(c)
                    todo.append(c)
        self.orphan_set = self.nodes.keys() - reach

    # -- what-if edits (tests, diff) --------------------------------------------

    def set_page(self, sp: ShadowPage) -> None:
        """Put *sp* in place of the page at its address (or add it)."""
        self.nodes[sp.addr] = sp
        self._changed()

    def unlink(self, parent: int, child: int) -> None:
        """Remove every link parent -> child; orphans are marked again."""
        self.links[parent] = [(i, c) for i, c in self.links.get(parent, ()) if c != child]
        self.mark_orphans()
        self._changed()

    def _changed(self) -> None:
        self._sorted = self._parents = self._nx = self.listed_span = None
        self._columns.clear()

    def listed(self) -> NDArray[Any]:
        """Whether each page (in the order of ``nodes``) is on the VM's page lists
        (``active``), as a numpy array of booleans (made once): from the
        build's order where it is known (``listed_span``: the roots, then the
        listed pages, then those only linked), else page by page."""
        import numpy as np

        col = self._columns.get("listed")
        if col is None:
            n = len(self.nodes)
            if self.listed_span is None:
                col = np.fromiter(map(self.active.__contains__, self.nodes), dtype=bool,
                                  count=n)
            else:
                tops, listed = self.listed_span
                col = np.zeros(n, dtype=bool)
                col[tops:tops + listed] = True
                col[:tops] = [a in self.active for a in islice(self.nodes, tops)]
            self._columns["listed"] = col
        return col

    def column(self, name: str) -> NDArray[Any]:
        """One integer field of every page (COLUMNS: addr, gfn, level, spt,
        tdp_mmu_page), in the order of ``nodes``, as a numpy array (made once):
        what the checks of 10^6 pages count with, page by page in C."""
        import numpy as np

        col = self._columns.get(name)
        if col is None:
            col = self._columns[name] = np.fromiter(
                map(attrgetter(name), self.nodes.values()), dtype=COLUMNS[name],
                count=len(self.nodes))
        return col

    @property
    def graph(self) -> nx.DiGraph:
        """The graph as a networkx DiGraph (made on first use): nodes are
        addresses with attributes ``sp`` and ``orphan``, edges carry ``indexes``."""
        if self._nx is None:
            import networkx as nx

            g = nx.DiGraph()
            g.add_nodes_from((a, {"sp": sp, "orphan": a in self.orphan_set})
                             for a, sp in self.nodes.items())
            g.add_edges_from((p, c, {"indexes": idx}) for p, c, idx in self.edges())
            self._nx = g
        return self._nx


def _by_level_gfn_addr(sps: list[ShadowPage]) -> list[ShadowPage]:
    """*sps* by level (high first), then gfn, then address: for many pages by
    numpy (one lexsort of three integer columns: a third of the time of
    sorting 10^6 pages by key), else, or where a field is not a u64 (a
    what-if edit), by Python's sort."""
    if len(sps) >= SORT_COLUMNS_FROM:
        import numpy as np

        n = len(sps)
        try:
            level = np.fromiter(map(attrgetter("level"), sps), dtype=np.int64, count=n)
            gfn = np.fromiter(map(attrgetter("gfn"), sps), dtype=np.uint64, count=n)
            addr = np.fromiter(map(attrgetter("addr"), sps), dtype=np.uint64, count=n)
        except (TypeError, ValueError, OverflowError):
            pass
        else:
            order = np.lexsort((addr, gfn, -level))  # (the last key first)
            return list(map(sps.__getitem__, order.tolist()))
    # by gfn and address, then (stable) by level, high first: keys made in C
    rest = sorted(sps, key=attrgetter("gfn", "addr"))
    rest.sort(key=attrgetter("level"), reverse=True)
    return rest


def _holders(vcpus: list[VCpu]) -> list[tuple[RootRef, Holder]]:
    """Every (root, holder) pair of the vCPUs: root and prev_roots[] of the current
    MMU, then of the other one (guest_mmu or root_mmu, VCpu.other_mmu)."""
    out = []
    for v in vcpus:
        # vcpu_idx: "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd)
        n = v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id if known(v.vcpu_id) else -1
        if v.root is not None:
            out.append((v.root, Holder("root", n)))
        out.extend((r, Holder("prev_root", n, i)) for i, r in enumerate(v.prev_roots))
        o = v.other_mmu
        if o is not None:
            if o.root is not None:
                out.append((o.root, Holder("root", n, mmu=o.name)))
            out.extend((r, Holder("prev_root", n, i, mmu=o.name))
                       for i, r in enumerate(o.prev_roots))
    return out


def _add_page(k: Kernel, vg: VMGraph, addr: int) -> ShadowPage | None:
    """The struct kvm_mmu_page at *addr* as a node of *vg* (None if unreadable)."""
    sp = vg.nodes.get(addr)
    if sp is None:
        sp = k.shadow_page(addr)
        if sp is not None:
            vg.nodes[addr] = sp
    return sp


def _expand(k: Kernel, vg: VMGraph, start: list[int]) -> set[int] | NDArray[Any]:
    """Add every page reachable from *start* through present non-leaf SPTEs;
    every child linked (VMGraph.mark_orphans)."""
    nodes, links = vg.nodes, vg.links
    linked: set[int] = set()
    big = _KnownPages(nodes)  # the children of tables with many (numpy arrays)
    queue = deque(a for a in start if a in nodes and nodes[a].level >= 2)
    done: set[int] = set()
    get, level_of = nodes.get, attrgetter("level")
    ready: dict[int, tuple[list[int], list[int], list[int | None]] | None] = {}
    while queue and len(nodes) < MAX_PAGES:
        addr = queue.popleft()
        if addr in done:
            continue
        done.add(addr)
        parent = nodes[addr]
        if not 2 <= parent.level <= 5:
            continue
        if k.on_progress is not None:
            k.on_progress(len(nodes))
        bad = 0
        pairs = []
        want = parent.level - 1
        if addr not in ready:  # this table and the next ones queued, at once
            ready = _next_links(k, nodes, parent, queue, done)
        cols = ready.pop(addr)
        indexes, values, children = k.link_columns(parent) if cols is None else cols
        if want == 1 and children and None not in children:
            # most links: to level-1 pages read already, all well
            known_children = cast("list[int]", children)
            if len(known_children) >= BIG_TABLE:
                if big.all_level_one(known_children):
                    links[addr] = list(zip(indexes, known_children, strict=True))
                    continue
            else:
                kids = list(map(get, known_children))
                if None not in kids and set(map(level_of, kids)) == {1}:
                    links[addr] = list(zip(indexes, known_children, strict=True))
                    linked.update(known_children)
                    continue
        for index, value, child_addr in zip(indexes, values, children, strict=True):
            if child_addr is None:
                bad += 1
                if bad <= 3:
                    k.problem("struct kvm_mmu_page", addr,
                              f"spt[{index}] = {spte_text(value)} points at a page with no "
                              "shadow page")
                continue
            child = get(child_addr) or _add_page(k, vg, child_addr)
            if child is None:
                continue
            if child.level != want:
                k.problem("struct kvm_mmu_page", addr,
                          f"spt[{index}] child {child_addr:#x} has level {child.level}, "
                          f"expected {want}")
                vg.wrong_level.setdefault(addr, []).append((index, child_addr))
                continue
            pairs.append((index, child_addr))
            if want >= 2 and child_addr not in done:  # level-1 pages link nothing
                queue.append(child_addr)
        if pairs:
            links[addr] = pairs
            linked.update(map(second, pairs))
        if bad > 3:
            k.problem("struct kvm_mmu_page", addr,
                      f"{bad} SPTEs point at no shadow page (garbage page table?)")
    if queue:
        k.problem("VM", vg.vm.addr, f"more than {MAX_PAGES} shadow pages; graph truncated")
    return big.linked_with(linked)


def _next_links(k: Kernel, nodes: dict[int, ShadowPage], parent: ShadowPage,
                queue: deque[int], done: set[int]
                ) -> dict[int, tuple[list[int], list[int], list[int | None]] | None]:
    """link_columns() of *parent* and of the tables queued after it (up to
    LINKS_BATCH), by Kernel.link_columns_many(): None for a table it could not
    read (link_columns() of it then says why, in _expand's order)."""
    batch = [parent]
    for a in queue:
        if len(batch) == LINKS_BATCH:
            break
        if a not in done and 2 <= nodes[a].level <= 5:
            batch.append(nodes[a])
    return dict(zip(map(attrgetter("addr"), batch), k.link_columns_many(batch), strict=True))


def _in_sorted(a: NDArray[Any], x: int) -> bool:
    """Whether *x* is in the sorted numpy array *a*."""
    i = int(a.searchsorted(x))
    return i < len(a) and int(a[i]) == x


class _KnownPages:
    """_expand()'s check of a table with many children (a TDP MMU's level 2:
    up to 512 level-1 pages, 10^6 in all): the graph's pages as sorted numpy
    arrays of addresses and levels (made at the first such table), each
    table's children looked up at once instead of one dict lookup each (a
    cache miss at 10^6 pages), and kept as arrays for mark_orphans()."""

    def __init__(self, nodes: dict[int, ShadowPage]) -> None:
        self.nodes = nodes
        self.addrs: Any = None  # sorted addresses, and the level of each
        self.levels: Any = None
        self.children: list[Any] = []  # each table's children, as checked

    def all_level_one(self, children: list[int]) -> bool:
        """Whether every one of *children* is a page of the graph at level 1
        (pages added to the graph since the arrays were made are not seen:
        the caller then checks them one by one)."""
        import numpy as np

        if self.addrs is None:
            nodes = self.nodes
            addrs = np.fromiter(nodes, dtype=np.uint64, count=len(nodes))
            order = np.argsort(addrs)
            self.addrs = addrs[order]
            self.levels = np.fromiter(map(attrgetter("level"), nodes.values()),
                                      dtype=np.int64, count=len(nodes))[order]
        c = np.array(children, dtype=np.uint64)
        at = np.minimum(self.addrs.searchsorted(c), len(self.addrs) - 1)
        if not ((self.addrs[at] == c).all() and (self.levels[at] == 1).all()):
            return False
        self.children.append(c)
        return True

    def linked_with(self, linked: set[int]) -> set[int] | NDArray[Any]:
        """Every child linked: *linked* (the other tables'), with those of the
        tables checked here as one sorted numpy array of distinct addresses."""
        if not self.children:
            return linked
        import numpy as np

        rest = np.fromiter(linked, dtype=np.uint64, count=len(linked))
        every = np.sort(np.concatenate([*self.children, rest]))
        # np.unique(every), by the sort: numpy 2.4's plain unique() hashes, 10x slower
        first = np.ones(len(every), dtype=bool)
        np.not_equal(every[1:], every[:-1], out=first[1:])
        return every[first]


def build(k: Kernel, vm: VM, freeze: bool = False) -> VMGraph:
    """Rebuild *vm*'s shadow-page graph from its roots and page lists."""
    with k.reading(vm), _gc_paused(freeze):
        return _build(k, vm)


@contextlib.contextmanager
def _gc_paused(freeze: bool) -> Iterator[None]:
    """Python's cyclic GC off while a graph is built; with *freeze*, every object
    then alive frozen out of its way.

    A build makes a few objects per shadow page and no reference cycles, and
    each full collection would walk every one made so far again (a third of
    the build time at 10^5 pages). gc.freeze() keeps later collections (a
    command's output) from walking them too, but whatever is frozen and sits
    in a reference cycle is never freed: only a process that ends after its
    command (the one-shot CLI) may freeze; a REPL, a script or a test suite
    that builds graph after graph must not.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if freeze:
                gc.freeze()
            gc.enable()


def _build(k: Kernel, vm: VM) -> VMGraph:
    """build(), its problems recorded against *vm*."""
    vg = VMGraph(vm, k.vcpus(vm))

    def hold(addr: int, who: Holder) -> None:
        if _add_page(k, vg, addr) is not None:
            vg.roots.setdefault(addr, []).append(who)

    for ref, who in _holders(vg.vcpus):
        if ref.sp is not None:
            hold(ref.sp.addr, who)
        for i, a in ref.pae_roots:
            hold(a, replace(who, pae=i))
    for a in k.tdp_roots(vm):
        hold(a, Holder("tdp_mmu_roots"))
    active, listed = k.listed_pages(vm)
    k.drop_blocks()  # the pages on the lists are decoded: their slab pages are only memory
    vg.active = set(active)
    nodes = vg.nodes
    found: list[ShadowPage] = list(filter(None, listed))  # (readable)
    # in list order after the roots; a page met again keeps its place (and it is
    # the same object: the model decodes a page once)
    tops = len(nodes)
    nodes.update(zip(map(attrgetter("addr"), found), found, strict=True))
    vg.listed_span = (tops, len(nodes) - tops)
    for sp in compress(found, map(attrgetter("root_count"), found)):  # (rc != 0: in C)
        rc = sp.root_count
        if rc and known(rc) and rc > 0 and sp.addr not in vg.roots:
            vg.roots[sp.addr] = [Holder("root_count")]
    # the pages that may link others (levels 2 and up), tested in C
    linked = _expand(k, vg, list(compress(nodes, map((2).__le__, map(
        attrgetter("level"), nodes.values())))))
    vg.mark_orphans(linked)
    k.drop_blocks()  # everything is decoded; the page cache is only memory now
    return vg
