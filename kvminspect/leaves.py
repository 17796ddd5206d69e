"""Every present leaf SPTE of a VM's graph, read once: what the audit, the
invariants and the accounting check.

One pass over every page table of the graph (sp->spt[], a level-1 table read
without being kept): each present leaf SPTE (is_shadow_present_pte() &&
is_last_spte(), kvminspect.spte.present_leaves) with its gfn,
kvm_mmu_page_get_gfn() (kvminspect.read_pages.ShadowPages.leaf_gfns), each
frozen TDP MMU SPTE and each MMIO SPTE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvminspect.check import sp_id
from kvminspect.graph import VMGraph
from kvminspect.model import Kernel
from kvminspect.objects import ShadowPage
from kvminspect.rmap import LEVEL_NAMES, leaf_sptes
from kvminspect.spte import mmio_scanner


@dataclass(frozen=True)
class LeafSpte:
    """One present leaf SPTE of a shadow page."""

    sp: ShadowPage
    index: int
    value: int
    gfn: int | None  # kvm_mmu_page_get_gfn (None: unreadable)
    as_id: int

    @property
    def sptep(self) -> int:
        return self.sp.spt + 8 * self.index

    def where(self) -> str:
        gfn = "gfn ?" if self.gfn is None else f"gfn {self.gfn:#x}"
        return f"{sp_id(self.sp)} spt[{self.index}] ({gfn}, {LEVEL_NAMES.get(self.sp.level, '?')})"


@dataclass
class AuditState:
    """What one VM's audit read: every present leaf SPTE and the frozen ones."""

    leaves: list[LeafSpte] = field(default_factory=list)
    frozen: list[tuple[ShadowPage, int]] = field(default_factory=list)
    unreadable_gfns: int = 0
    unreadable_tables: list[ShadowPage] = field(default_factory=list)  # spt[] not in the dump
    # (page, index, SPTE) of each MMIO SPTE (is_mmio_spte: spte.mmio_scanner), for
    # kvminspect.invariants
    mmio: list[tuple[ShadowPage, int, int]] = field(default_factory=list)


def collect(k: Kernel, vg: VMGraph) -> AuditState:
    """Every present leaf SPTE of every page (and each frozen SPTE of TDP MMU pages,
    each MMIO SPTE), in one pass over the tables."""
    st = AuditState()
    masks = k.spte_masks(vg.vm)
    frozen = masks.layout.frozen
    mmio = mmio_scanner(k.spte_format, masks)  # None: this kernel makes no MMIO SPTEs
    for sp in vg.pages():
        if not 1 <= sp.level <= 5 or sp.role.is_mirror:
            continue
        spt = k.sptes(sp, keep=sp.level > 1)  # level-1 tables: 10^5 x 4 KiB, read once
        if spt is None:
            st.unreadable_tables.append(sp)
            continue
        if frozen is not None and sp.tdp_mmu_page and frozen in spt:
            st.frozen.extend((sp, i) for i, v in enumerate(spt) if v == frozen)
        if mmio is not None and (found_mmio := mmio(spt)):
            st.mmio.extend((sp, i, v) for i, v in found_mmio)
        found = leaf_sptes(k, sp, spt)
        if not found:
            continue
        as_id = 1 if sp.role.get("smm") else 0
        if sp.role.direct:
            step = 9 * (sp.level - 1)
            st.leaves.extend(LeafSpte(sp, i, v, sp.gfn + (i << step), as_id) for i, v in found)
            continue
        gfns = k.leaf_gfns(sp, [i for i, _ in found])
        if gfns is None:
            st.unreadable_gfns += len(found)
            st.leaves.extend(LeafSpte(sp, i, v, None, as_id) for i, v in found)
        else:
            st.leaves.extend(LeafSpte(sp, i, v, g, as_id)
                             for (i, v), g in zip(found, gfns, strict=True))
    return st
