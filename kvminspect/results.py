"""What the view commands compute, typed: roots, tree, sp, unsync, stats, export, watch.

Each command makes these from the model (kvminspect.objects) and its graph
(kvminspect.graph), on demand; then both renderers take them: kvminspect.shapes
turns them into the JSON every document uses, and the command's text renderer
(kvminspect/commands/*.py) into rows and lines. Neither reads the other's
output back. vms, vm and vcpus need no view: both renderers take the model's
VM, VmState and VCpu (a vCPU's root hpa: root_hpa()).

A view adds to the model what a command shows of an object and the model
does not hold: a shadow page's obsolete / orphan state and its holders
(PageView), a root's state (RootView, RootState). Views hold the model's
objects, not copies of their fields, and are made per object shown: a
NamedTuple costs a fraction of a microsecond, as the model's ShadowPage does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from kvminspect.graph import Holder, VMGraph
from kvminspect.layout import UNREADABLE, NoValue
from kvminspect.objects import RootRef, ShadowPage, Spte, VCpu, is_obsolete_sp
from kvminspect.spte import INVALID_PAGE
from kvminspect.unsync import Replay

_NO_HOLDERS: tuple[Holder, ...] = ()
_new = tuple.__new__  # a NamedTuple without its Python-level __new__: once per page of a tree
GUEST_MMU = "guest_mmu"  # VCpu.mmu_name, MmuRoots.name: the shadow NPT/EPT MMU of a nested guest


# -- shadow pages ----------------------------------------------------------------


class PageView(NamedTuple):
    """A shadow page as every command shows it: the model's struct kvm_mmu_page
    and what its VM's graph says of it."""

    sp: ShadowPage
    obsolete: bool  # is_obsolete_sp(): role.invalid or an old mmu_valid_gen
    orphan: bool  # on the VM's page lists, reachable from no root
    holders: Sequence[Holder]  # who holds it as a root (VMGraph.roots), in order

    @property
    def smm(self) -> bool:
        """role.smm: built for System Management Mode (address space 1)."""
        return bool(self.sp.role.get("smm"))

    @property
    def guest_mode(self) -> bool:
        """role.guest_mode: a nested guest's (L2) page."""
        return bool(self.sp.role.get("guest_mode"))

    def flags(self) -> list[str]:
        """Its state as words, for every text renderer: direct, tdp, UNSYNC,
        unsync_children=N, invalid or obsolete, root_count=N, ORPHAN, SMM, nested.
        A count this kernel lacks (or that could not be read) shows as such
        (unsync_children=unknown)."""
        sp = self.sp
        role = sp.role
        flags = [w for on, w in ((role.direct, "direct"), (sp.tdp_mmu_page, "tdp"),
                                 (sp.unsync is True, "UNSYNC")) if on is True]
        if sp.unsync_children or isinstance(sp.unsync_children, NoValue):
            flags.append(f"unsync_children={sp.unsync_children}")
        if role.invalid:
            flags.append("invalid")
        elif self.obsolete:
            flags.append("obsolete")
        if sp.root_count or isinstance(sp.root_count, NoValue):
            flags.append(f"root_count={sp.root_count}")
        if self.orphan:
            flags.append("ORPHAN")
        if self.smm:
            flags.append("SMM")
        if self.guest_mode:
            flags.append("nested")
        return flags


def page_view(sp: ShadowPage, g: VMGraph) -> PageView:
    """*sp* as shown: obsolete against *g*'s VM, orphan and holders in *g*."""
    a = sp.addr
    return _new(PageView, (sp, is_obsolete_sp(sp, g.vm), a in g.orphan_set and a in g.nodes,
                           g.roots.get(a, _NO_HOLDERS)))


# -- roots -----------------------------------------------------------------------


class RootState(Enum):
    """What a root reference (mmu->root, prev_roots[i]) holds; the value is its
    JSON "state"."""

    PAGE = "page"  # a shadow page (struct kvm_mmu_page)
    INVALID_PAGE = "invalid_page"  # no root: hpa INVALID_PAGE
    PAE_ROOT = "pae_root"  # a special root, mmu->pae_root: its pae_root[i] pages follow
    # the special roots of older kernels, and of 5-level paging:
    LM_ROOT = "lm_root"  # mmu->lm_root, as the 5.10 fixture's DWARF shows (commit not found)
    PML4_ROOT = "pml4_root"  # renamed from lm_root by 5.15, as the 5.15 DWARF tree shows
    # "KVM: x86/mmu: Support shadowing NPT when 5-level paging is enabled in host" (5.15,
    # cb0f722aff6e)
    PML5_ROOT = "pml5_root"
    # "KVM: x86/mmu: Use dummy root, backed by zero page, for !visible guest roots" (6.6,
    # 0e3223d8d00a)
    DUMMY = "dummy"  # 6.6+: the zero page, no memslot behind the guest's CR3
    UNREADABLE = "unreadable"  # its MMU, or the struct page of its hpa, unreadable

    @property
    def special(self) -> bool:
        """A root with no struct kvm_mmu_page of its own: a special or dummy root."""
        return self not in (RootState.PAGE, RootState.INVALID_PAGE, RootState.UNREADABLE)


def root_hpa(r: RootRef | None) -> int | NoValue | None:
    """A root's hpa: the address, None for INVALID_PAGE (no root), or UNREADABLE
    (*r* is None: its MMU could not be read)."""
    if r is None:
        return UNREADABLE
    return None if r.hpa is None or r.hpa == INVALID_PAGE else r.hpa


@dataclass(frozen=True)
class PaeRoot:
    """A present mmu->pae_root[index] entry of a special root, and its page."""

    index: int
    page: PageView


class RootView(NamedTuple):
    """A root reference (mmu->root or prev_roots[i]) as roots and diff show it."""

    state: RootState
    pgd: int | NoValue  # the guest page table it shadows (UNREADABLE: MMU unreadable)
    hpa: int | NoValue | None  # root_hpa(): None for INVALID_PAGE
    page: PageView | None  # its shadow page (None: none, or not in the graph)
    pae_roots: tuple[PaeRoot, ...]  # a special root's pae_root[i] pages in the graph

    @property
    def empty(self) -> bool:
        """An unused prev_roots[] slot (KVM_MMU_ROOT_INFO_INVALID): pgd and hpa
        both INVALID_PAGE."""
        return self.state is RootState.INVALID_PAGE and self.pgd == INVALID_PAGE


_UNREADABLE_ROOT = RootView(RootState.UNREADABLE, UNREADABLE, UNREADABLE, None, ())


def root_view(r: RootRef | None, g: VMGraph) -> RootView:
    """*r* as shown, its pages from *g* (None: the MMU could not be read)."""
    if r is None:
        return _UNREADABLE_ROOT
    if r.hpa is None:
        state = RootState.INVALID_PAGE
    elif r.sp is not None:
        state = RootState.PAGE
    else:
        state = RootState(r.special.value) if r.special else RootState.UNREADABLE
    page = page_view(r.sp, g) if r.sp is not None and r.sp.addr in g else None
    return RootView(state, r.pgd, root_hpa(r), page,
                    tuple(PaeRoot(i, page_view(g.sp(a), g)) for i, a in r.pae_roots if a in g))


class MmuRootsView(NamedTuple):
    """The roots of a vCPU's struct kvm_mmu that vcpu->arch.mmu does not point at."""

    mmu: str  # guest_mmu, or root_mmu while the vCPU runs its nested guest
    root: RootView
    prev_roots: tuple[RootView, ...]


class VcpuRoots(NamedTuple):
    """One vCPU's roots (roots): mmu->root and prev_roots[], then its other MMU's."""

    vcpu: VCpu
    root: RootView
    prev_roots: tuple[RootView, ...]
    # guest_mmu: "x86/kvm/mmu: introduce guest_mmu" (4.20)
    other_mmu: MmuRootsView | None  # None: no other MMU (before 4.20) or unreadable


def vcpu_roots(v: VCpu, g: VMGraph) -> VcpuRoots:
    """*v*'s roots, their pages from *g*."""
    o = v.other_mmu
    other = None if o is None else MmuRootsView(
        o.name, root_view(o.root, g), tuple(root_view(r, g) for r in o.prev_roots))
    return VcpuRoots(v, root_view(v.root, g), tuple(root_view(r, g) for r in v.prev_roots),
                     other)


# -- tree ------------------------------------------------------------------------


class TreeNode(NamedTuple):
    """One page of a tree (tree), where the walk from a top met it."""

    page: PageView
    slot: int | None  # its index in the parent's spt[] (None: a top)
    ref: bool  # met before: its subtree is shown above, not again
    children_omitted: int  # children cut by --depth
    children: Sequence[TreeNode]


# -- sp --------------------------------------------------------------------------


class SpParent(NamedTuple):
    """A parent of a shadow page and the slots of its spt[] that point at it."""

    sp: int  # the parent struct kvm_mmu_page
    level: int
    indexes: list[int]


class SpteRow(NamedTuple):
    """One present SPTE of spt[] and, for a table entry, the page it points to."""

    spte: Spte
    child: ShadowPage | None


@dataclass(frozen=True)
class SpDetail:
    """Everything sp shows of one shadow page."""

    page: PageView
    on_active_list: bool  # on kvm->arch.active_mmu_pages (or the TDP MMU's lists)
    parents: list[SpParent]
    sptes: list[SpteRow]  # the present entries of spt[], by index
    non_present: int  # and how many are not present


# -- unsync ----------------------------------------------------------------------


@dataclass(frozen=True)
class UnsyncRoot:
    """One page's replay of the unsync walk (unsync), and who holds the page."""

    replay: Replay
    zap: bool  # mmu_zap_unsync_children, not mmu_sync_children
    holders: Sequence[Holder]


# -- export --------------------------------------------------------------------


class Exported(NamedTuple):
    """What export wrote: where, in which format, how many nodes and edges."""

    file: str  # FILE as given ("-": stdout)
    format: str  # dot, graphml, json, svg, png
    nodes: int
    edges: int


# -- stats -----------------------------------------------------------------------


class VcpuStat(NamedTuple):
    """A vCPU and the MMU counters of its vcpu->stat."""

    vcpu: VCpu
    stat: dict[str, int]


class VmStats(NamedTuple):
    """The MMU counters of a VM's kvm->stat and of each of its vCPUs' vcpu->stat."""

    stat: dict[str, int]
    vcpus: list[VcpuStat]


# -- watch -----------------------------------------------------------------------


class VcpuWatch(NamedTuple):
    """What watch saw of one vCPU's roots across its samples."""

    vcpu: VCpu
    switches: int  # samples whose root differs from the sample before
    prev_root_hits: int  # ... whose new root was in the previous sample's prev_roots
    new_roots: int  # ... whose new root was not
    unsettled: int  # samples with no settled root (INVALID_PAGE, unreadable)
    cr3s: tuple[int, ...]  # root pgds, in the order first seen


# struct kvm_vm_stat (arch/x86/include/asm/kvm_host.h) and its generic part;
# lpages, then pages_4k/2m/1g from "KVM: x86/mmu: Add detailed page size stats" (5.15)
VM_PREFIXES = ("mmu_", "nx_", "pages_", "lpages", "max_mmu_", "remote_tlb_flush")
# struct kvm_vcpu_stat: page faults (pf_*), guest TLB flushes, INVLPG
VCPU_PREFIXES = ("pf_",)
VCPU_NAMES = ("tlb_flush", "invlpg")


def vm_mmu_stat(stat: dict[str, int]) -> dict[str, int]:
    """The MMU counters of kvm->stat (struct kvm_vm_stat), in the kernel's order."""
    return {k: v for k, v in stat.items() if k.startswith(VM_PREFIXES)}


def vcpu_mmu_stat(stat: dict[str, int]) -> dict[str, int]:
    """The MMU counters of vcpu->stat (struct kvm_vcpu_stat), in the kernel's order."""
    return {k: v for k, v in stat.items() if k.startswith(VCPU_PREFIXES) or k in VCPU_NAMES}
