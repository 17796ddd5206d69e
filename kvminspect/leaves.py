"""Every present leaf SPTE of a VM's graph, read once: what the audit, the
invariants and the accounting check.

One pass over every page table of the graph (sp->spt[], level-1 tables read by
runs of neighbours and not kept): each present leaf SPTE (is_shadow_present_pte()
&& is_last_spte(), kvminspect.spte.present_leaf_mask) with its gfn,
kvm_mmu_page_get_gfn() (kvminspect.read_pages.ShadowPages.leaf_gfns_of), each
frozen TDP MMU SPTE and each MMIO SPTE.

A 10^6-page MMU has as many leaves: they are kept column by column
(LeafColumns: numpy arrays of each leaf's table, index, SPTE and gfn), and a
LeafSpte is made only for a leaf a finding names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from kvminspect.check import sp_id
from kvminspect.graph import VMGraph
from kvminspect.model import Kernel
from kvminspect.objects import ShadowPage, as_id_of
from kvminspect.rmap import LEVEL_NAMES
from kvminspect.spte import SPTE_ENT_PER_PAGE, mmio_mask, present_leaf_mask

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

CANDIDATES = 1 << 20  # collect(): non-empty entries looked at together, at most
LEVEL, TDP, GFN = attrgetter("level"), attrgetter("tdp_mmu_page"), attrgetter("gfn")
ROLE_WORD, DIRECT = attrgetter("role.word"), attrgetter("role.direct")


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


class LeafColumns:
    """Present leaf SPTEs, column by column, in the order of their tables, then index.

    ``tables``: the pages the leaves are in; per leaf, ``table`` (a position in
    ``tables``), ``index``, ``value``, ``gfn`` and ``has_gfn`` (False: the gfn
    could not be read); per table, ``table_level``, ``table_as`` (address
    space), ``table_tdp``. A sequence of LeafSpte too (each made when asked for).
    """

    def __init__(self, tables: list[ShadowPage], table: NDArray[np.intp],
                 index: NDArray[np.int64], value: NDArray[np.uint64],
                 gfn: NDArray[np.uint64], has_gfn: NDArray[np.bool_]) -> None:
        import numpy as np

        self.tables = tables
        self.table = table
        self.index = index
        self.value = value
        self.gfn = gfn
        self.has_gfn = has_gfn
        n = len(tables)
        self.table_level = np.fromiter(map(LEVEL, tables), dtype=np.int64, count=n)
        words = list(map(ROLE_WORD, tables))
        smm = {w: as_id_of(tables[words.index(w)]) for w in set(words)}  # one per role
        self.table_as = (np.fromiter(map(smm.__getitem__, words), dtype=np.int64, count=n)
                         if any(smm.values()) else np.zeros(n, dtype=np.int64))
        self.table_tdp = np.fromiter(map(TDP, tables), dtype=bool, count=n)

    @classmethod
    def of(cls, leaves: list[LeafSpte]) -> LeafColumns:
        """The columns of some LeafSpte (made by hand: tests, what-ifs)."""
        import numpy as np

        tables: list[ShadowPage] = []
        pos: dict[tuple[int, int], int] = {}  # (id of the page, address space): position
        table, table_as = [], []
        for x in leaves:
            key = (id(x.sp), x.as_id)
            if key not in pos:
                pos[key] = len(tables)
                tables.append(x.sp)
                table_as.append(x.as_id)
            table.append(pos[key])
        out = cls(tables, np.array(table, dtype=np.intp),
                  np.array([x.index for x in leaves], dtype=np.int64),
                  np.array([x.value for x in leaves], dtype=np.uint64),
                  np.array([x.gfn or 0 for x in leaves], dtype=np.uint64),
                  np.array([x.gfn is not None for x in leaves], dtype=bool))
        out.table_as = np.array(table_as, dtype=np.int64)
        return out

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> LeafSpte:
        t = int(self.table[i])
        return LeafSpte(self.tables[t], int(self.index[i]), int(self.value[i]),
                        int(self.gfn[i]) if self.has_gfn[i] else None, int(self.table_as[t]))

    def __iter__(self) -> Iterator[LeafSpte]:
        return (self[i] for i in range(len(self)))

    @property
    def level(self) -> NDArray[np.int64]:
        """Each leaf's table level."""
        return self.table_level[self.table]

    @property
    def as_id(self) -> NDArray[np.int64]:
        """Each leaf's address space."""
        return self.table_as[self.table]


@dataclass
class AuditState:
    """What one VM's audit read: every present leaf SPTE and the frozen ones."""

    # LeafColumns from collect(); a list when made by hand
    leaves: list[LeafSpte] | LeafColumns = field(default_factory=list)
    frozen: list[tuple[ShadowPage, int]] = field(default_factory=list)
    unreadable_gfns: int = 0
    unreadable_tables: list[ShadowPage] = field(default_factory=list)  # spt[] not in the dump
    # (page, index, SPTE) of each MMIO SPTE (is_mmio_spte: spte.mmio_mask), for
    # kvminspect.invariants
    mmio: list[tuple[ShadowPage, int, int]] = field(default_factory=list)

    def columns(self) -> LeafColumns:
        """The leaves as LeafColumns."""
        if isinstance(self.leaves, LeafColumns):
            return self.leaves
        return LeafColumns.of(self.leaves)


def collect(k: Kernel, vg: VMGraph, gfns: bool = True) -> AuditState:
    """Every present leaf SPTE of every page (and each frozen SPTE of TDP MMU pages,
    each MMIO SPTE), in one pass over the tables; *gfns*: False leaves the leaves'
    gfns unread (has_gfn False), for who only counts them.

    The tables are read by runs of neighbours (Kernel.table_runs); in each, only
    the entries that are not SHADOW_NONPRESENT_VALUE (0 before 6.10: most of a
    sparse table) are looked at further.
    """
    import numpy as np

    st = AuditState()
    masks = k.spte_masks(vg.vm)
    fmt = k.spte_format
    frozen_value = masks.layout.frozen
    empty = np.uint64(masks.layout.nonpresent)
    tables = [sp for sp in vg.pages() if 1 <= sp.level <= 5 and not sp.role.is_mirror]
    cols = LeafColumns(tables, np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.int64),
                       np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64),
                       np.zeros(0, dtype=bool))
    levels, tdp = cols.table_level, cols.table_tdp
    # an entry equal to the empty value is neither a leaf, MMIO nor frozen (checked,
    # not assumed: else every entry is looked at)
    one = np.array([empty], dtype=np.uint64)
    mm = mmio_mask(one, fmt, masks)
    skip_empty = not (present_leaf_mask(one, np.ones(1, dtype=np.int64), fmt)[0]
                      or present_leaf_mask(one, np.full(1, 2, dtype=np.int64), fmt)[0]
                      or (mm is not None and mm[0])
                      or (frozen_value is not None and int(empty) == frozen_value))
    # the entries that are not empty, run by run; every CANDIDATES of them kept
    # only if leaf, MMIO or frozen (a dense MMU's tables are mostly leaves)
    cand: list[tuple[NDArray[np.intp], NDArray[np.int64], NDArray[np.uint64]]] = []
    kept: list[tuple[NDArray[np.intp], NDArray[np.int64], NDArray[np.uint64]]] = []
    pending = 0

    def keep() -> None:
        t, i, v = (np.concatenate(c) for c in zip(*cand, strict=True))
        wanted = present_leaf_mask(v, levels[t], fmt)
        mm = mmio_mask(v, fmt, masks)
        if mm is not None:
            wanted |= mm
        if frozen_value is not None:
            wanted |= (v == np.uint64(frozen_value)) & tdp[t]
        kept.append((t[wanted], i[wanted], v[wanted]))
        cand.clear()

    unreadable = []
    for at, rows in k.table_runs(tables):
        if rows is None:
            unreadable.append(at)
            continue
        flat = rows.reshape(-1)
        found = np.flatnonzero(flat != empty) if skip_empty else np.arange(len(flat))
        if len(found):
            cand.append((at[found >> 9], found & (SPTE_ENT_PER_PAGE - 1), flat[found]))
            pending += len(found)
            if pending > CANDIDATES:
                keep()
                pending = 0
    if cand:
        keep()
    if unreadable:
        st.unreadable_tables = [tables[j] for j in sorted(np.concatenate(unreadable).tolist())]
    if not kept:
        st.leaves = cols
        return st
    t, i, v = (np.concatenate(c) for c in zip(*kept, strict=True))
    order = np.lexsort((i, t))  # by table (in pages() order), then index
    t, i, v = t[order], i[order], v[order]
    mm = mmio_mask(v, fmt, masks)
    if mm is not None and mm.any():
        st.mmio = [(tables[a], b, c) for a, b, c in zip(
            t[mm].tolist(), i[mm].tolist(), v[mm].tolist(), strict=True)]
    if frozen_value is not None:
        fz = (v == np.uint64(frozen_value)) & tdp[t]
        if fz.any():
            st.frozen = [(tables[a], b) for a, b in zip(t[fz].tolist(), i[fz].tolist(),
                                                        strict=True)]
    leaf = present_leaf_mask(v, levels[t], fmt)
    cols.table, cols.index, cols.value = t[leaf], i[leaf].astype(np.int64), v[leaf]
    if gfns:
        cols.gfn, cols.has_gfn = _gfns(k, cols)
        st.unreadable_gfns = int((~cols.has_gfn).sum())
    else:
        cols.gfn = np.zeros(len(cols.table), dtype=np.uint64)
        cols.has_gfn = np.zeros(len(cols.table), dtype=bool)
    st.leaves = cols
    return st


def _gfns(k: Kernel, cols: LeafColumns) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
    """kvm_mmu_page_get_gfn() of each leaf, and whether it could be read: from its
    table's gfn for a direct page, from the page's shadowed_translation (gfns)
    array for an indirect one."""
    import numpy as np

    tables, t, index = cols.tables, cols.table, cols.index
    n = len(tables)
    direct = np.fromiter(map(DIRECT, tables), dtype=bool, count=n)
    base = np.fromiter(map(GFN, tables), dtype=np.uint64, count=n)
    gfn = base[t] + (index.astype(np.uint64) << (
        np.uint64(9) * (cols.table_level[t] - 1).astype(np.uint64)))
    ok = np.ones(len(t), dtype=bool)
    indirect = ~direct[t]
    if indirect.any():
        which, row = np.unique(t[indirect], return_inverse=True)  # the indirect tables
        gfn[indirect], ok[indirect] = k.leaf_gfns_of([tables[j] for j in which.tolist()],
                                                     row.reshape(-1), index[indirect])
    return gfn, ok
