"""Reverse maps: every SPTE that maps a gfn, the model behind ``rmap`` and the audit.

The shadow MMU keeps, per memslot and per mapping level, one struct
kvm_rmap_head per gfn (slot->arch.rmap[level - 1][gfn_to_index(gfn,
base_gfn, level)], arch/x86/kvm/mmu/mmu.c): its ``val`` is 0 (no SPTE), one
sptep (a u64 * into some shadow page's spt[]), or, with bit 0 set
(KVM_RMAP_MANY), a struct pte_list_desc * chain of sptep arrays. Each sptep
leads to its shadow page (to_shadow_page of the sptep's page: page_private)
and index ((sptep & 4095) / 8). The TDP MMU keeps no rmaps: its SPTEs for a
gfn are found by walking its roots (kvminspect.walk). ``rmap_histogram``
is the debugfs file mmu_rmaps_stat offline. Nothing here renders.
"""

from __future__ import annotations

import array
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import drgn

from kvminspect import spte
from kvminspect.layout import bare_type
from kvminspect.memory import Memory
from kvminspect.model import Kernel
from kvminspect.objects import VM, as_id_of
from kvminspect.spte import PAGE_SHIFT

LEVELS = (1, 2, 3)  # PG_LEVEL_4K .. PG_LEVEL_1G: KVM_NR_PAGE_SIZES rmap arrays
LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}
KVM_RMAP_MANY = 1  # val bit 0: a pte_list_desc chain
# "KVM: x86/mmu: Add infrastructure to allow walking rmaps outside of mmu_lock" (6.15, 4834eaded91e)
RMAP_PTR_MASK = ~3  # also clears bit 1, KVM_RMAP_LOCKED (6.15)
MAX_CHAIN = 1 << 16  # descs followed in one chain before it is called garbage


def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int:
    """gfn_to_index(): the rmap (and lpage_info) index of *gfn* at *level*."""
    shift = 9 * (level - 1)
    return (gfn >> shift) - (base_gfn >> shift)


@dataclass(frozen=True)
class RmapSlot:
    """One struct kvm_memory_slot's rmap arrays (slot->arch.rmap[0..2])."""

    as_id: int
    id: int
    addr: int  # struct kvm_memory_slot
    base_gfn: int
    npages: int
    rmap: tuple[int, ...]  # slot->arch.rmap[level - 1]: struct kvm_rmap_head * (0: none)

    def holds(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def entries(self, level: int) -> int:
        """How many rmap heads the level's array has (kvm_alloc_memslot_metadata)."""
        return gfn_to_index(self.base_gfn + self.npages - 1, self.base_gfn, level) + 1


@dataclass(frozen=True)
class RmapEntry:
    """One sptep of a gfn's rmap, resolved to its shadow page and index."""

    as_id: int
    gfn: int  # the first gfn the rmap head covers at its level
    level: int
    sptep: int
    sp: int | None  # struct kvm_mmu_page holding the sptep (None: none found)
    index: int  # (sptep & 4095) / 8
    value: int | None  # *sptep (None: unreadable)
    bits: spte.SpteBits | None
    # where it was found: None for the memslot's rmap, else the struct
    # kvm_mmu_page of the root on tdp_mmu_roots walked to the gfn (tdp_of_gfn)
    tdp_root: int | None = None


class RmapHead(NamedTuple):
    """Which rmap head holds an sptep: slot->arch.rmap[level - 1] of this gfn."""

    as_id: int
    gfn: int  # the first gfn the head covers at its level
    level: int


class RmapArray(NamedTuple):
    """One memslot's rmap array of one level (slot->arch.rmap[level - 1])."""

    as_id: int
    base_gfn: int
    npages: int
    level: int


class Skipped(NamedTuple):
    """An rmap object that could not be followed (a loop, an unreadable desc), and why."""

    addr: int  # the rmap head (or its pte_list_desc chain) where it happened
    why: str


class GfnSptes(NamedTuple):
    """Every SPTE that maps one gfn (sptes_of_gfn), and the rmap objects skipped."""

    entries: list[RmapEntry]
    skipped: list[Skipped]


@dataclass
class RmapScan:
    """Every rmap entry of a VM: sptep -> its RmapHead, and what was garbage."""

    entries: dict[int, RmapHead] = field(default_factory=dict)
    problems: list[Skipped] = field(default_factory=list)
    slots: int = 0  # memslots with rmaps
    unreadable: list[RmapArray] = field(default_factory=list)  # not in the dump: unchecked
    # per level: the rmap heads read (empty ones too), and how many hold n sptes (n > 0)
    heads: Counter[int] = field(default_factory=Counter)
    lengths: dict[int, Counter[int]] = field(default_factory=dict)

    def readable(self, as_id: int, gfn: int, level: int) -> bool:
        """Whether the rmap array that would hold (gfn, level) was read."""
        return not any(a == as_id and lv == level and base <= gfn < base + n
                       for a, base, n, lv in self.unreadable)


class DescLayout:
    """struct pte_list_desc as this kernel lays it out, probed from DWARF.

    * before 5.15 (the 5.10 fixture): ``u64 *sptes[PTE_LIST_EXT]`` (3) then
      ``more``; used entries end at the first NULL;
    * from 5.15: ``spte_count``, the used entries of this desc (PTE_LIST_EXT 14);
    * from 6.4: u32 ``spte_count`` and ``tail_count`` (the head's count of the
      descs after it); each desc's own spte_count is what is read.

    "KVM: X86: Optimize pte_list_desc with per-array counter" (5.15, 13236e25ebab)
    "KVM: x86/mmu: Track tail count in pte_list_desc to optimize guest fork()" (6.4, 141705b78381)
    """

    def __init__(self, mem: Memory) -> None:
        t = mem.type("struct pte_list_desc")
        names = {m.name: m for m in t.members or ()}
        self.size = t.size or 0
        self.more = drgn.offsetof(t, "more")
        self.sptes = drgn.offsetof(t, "sptes")
        self.ext = bare_type(names["sptes"].type).length or 0
        self.count: tuple[int, int] | None = None  # (offset, size) of spte_count
        if "spte_count" in names:
            self.count = (drgn.offsetof(t, "spte_count"),
                          bare_type(names["spte_count"].type).size or 4)


class RmapReader:
    """The rmaps of one target: memslots' rmap arrays, pte_list_desc chains."""

    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.mem = k.memory
        self._desc: DescLayout | None = None
        self._slots: dict[int, list[RmapSlot]] = {}
        self._scans: dict[int, RmapScan] = {}

    @property
    def desc(self) -> DescLayout:
        if self._desc is None:
            self._desc = DescLayout(self.mem)
        return self._desc

    def slots(self, vm: VM) -> list[RmapSlot]:
        """struct kvm_memory_slot of every address space with slot->arch.rmap[]
        (all NULL when the VM never allocated rmaps: TDP MMU only)."""
        if vm.addr in self._slots:
            return self._slots[vm.addr]
        out = [RmapSlot(*slot) for slot in self.k.vm_reader.memslot_rmaps(vm, len(LEVELS))]
        self._slots[vm.addr] = out
        return out

    def has_rmaps(self, vm: VM) -> bool:
        """Whether any memslot has rmap arrays (kvm_memslots_have_rmaps)."""
        return any(any(s.rmap) for s in self.slots(vm))

    def head(self, slot: RmapSlot, gfn: int, level: int) -> int:
        """The val of slot->arch.rmap[level - 1][gfn_to_index(...)] (FaultError if unreadable)."""
        base = slot.rmap[level - 1]
        return self.mem.read_u64(base + 8 * gfn_to_index(gfn, slot.base_gfn, level))

    def sptes_of(self, val: int, where: int, problems: list[Skipped]) -> list[int]:
        """The sptep values one rmap head's *val* holds: itself, or its
        pte_list_desc chain's (bounded: a loop, an unreadable desc or a count
        beyond PTE_LIST_EXT is recorded in *problems* and cut there)."""
        if not val:
            return []
        if not val & KVM_RMAP_MANY:
            return [val & RMAP_PTR_MASK]
        d = self.desc
        out: list[int] = []
        desc, seen = val & RMAP_PTR_MASK, set[int]()
        while desc:
            if desc in seen or len(seen) >= MAX_CHAIN:
                problems.append(Skipped(where, f"pte_list_desc chain loops at {desc:#x}"))
                break
            seen.add(desc)
            try:
                data = self.mem.read(desc, d.size)
            except drgn.FaultError as e:
                problems.append(Skipped(where, f"pte_list_desc {desc:#x} unreadable ({e})"))
                break
            ptrs = array.array("Q", data[d.sptes:d.sptes + 8 * d.ext])
            if sys.byteorder != "little":
                ptrs.byteswap()
            if d.count is not None:
                off, size = d.count
                n = int.from_bytes(data[off:off + size], "little")
                if n > d.ext:
                    problems.append(Skipped(where, f"pte_list_desc {desc:#x} spte_count {n} > "
                                     f"PTE_LIST_EXT {d.ext}"))
                    n = d.ext
                out.extend(ptrs[:n])
            else:
                # up to the first NULL, as before
                # "KVM: X86: Optimize pte_list_desc with per-array counter" (5.15, 13236e25ebab)
                out.extend(p for p in ptrs if p)
            desc = int.from_bytes(data[d.more:d.more + 8], "little")
        return out

    def scan(self, vm: VM) -> RmapScan:
        """Every rmap head of every memslot of *vm* (the audit's side of rmap <-> SPTE),
        read once per reader (the audit and the histogram share it)."""
        if vm.addr in self._scans:
            return self._scans[vm.addr]
        out = self._scans[vm.addr] = RmapScan()
        for slot in self.slots(vm):
            if not any(slot.rmap):
                continue
            out.slots += 1
            for level in LEVELS:
                base = slot.rmap[level - 1]
                if not base:
                    continue
                n = slot.entries(level)
                try:
                    heads = array.array("Q", self.mem.read(base, 8 * n))
                except drgn.FaultError:
                    out.unreadable.append(RmapArray(slot.as_id, slot.base_gfn, slot.npages,
                                                    level))
                    continue
                if sys.byteorder != "little":
                    heads.byteswap()
                out.heads[level] += n
                lengths = out.lengths.setdefault(level, Counter())
                first = (slot.base_gfn >> (9 * (level - 1))) << (9 * (level - 1))
                for i in [i for i, v in enumerate(heads) if v]:
                    gfn = max(first + (i << (9 * (level - 1))), slot.base_gfn)
                    sptes = self.sptes_of(heads[i], base + 8 * i, out.problems)
                    lengths[len(sptes)] += 1
                    for p in sptes:
                        out.entries[p] = RmapHead(slot.as_id, gfn, level)
        return out

    def sp_of_sptep(self, sptep: int) -> int | None:
        """to_shadow_page(): the struct kvm_mmu_page whose spt[] page holds *sptep*."""
        k = self.k
        pfn = (sptep - k.layout.page_offset_base) >> PAGE_SHIFT
        if pfn < 0:
            return None
        return k.to_shadow_page(pfn)

    def resolve(self, vm: VM, as_id: int, gfn: int, level: int, sptep: int) -> RmapEntry:
        """One rmap sptep as its shadow page, index and SPTE (None where unreadable)."""
        k = self.k
        index = (sptep & 4095) // 8
        addr = self.sp_of_sptep(sptep)
        sp = k.shadow_page(addr) if addr else None
        value = None
        if sp is not None:
            spt = k.sptes(sp)
            value = None if spt is None else spt[index]
        else:
            try:
                value = self.mem.read_u64(sptep)
            except drgn.FaultError:
                value = None
        bits = None
        if value is not None:
            bits = spte.decode_bits(value, sp.level if sp else level, k.spte_format,
                                    k.spte_masks(vm))
        return RmapEntry(as_id, gfn, level, sptep, addr if sp else None, index, value, bits)

    def of_gfn(self, vm: VM, gfn: int) -> GfnSptes:
        """Every rmap entry covering *gfn*, at each level, in each address space."""
        entries: list[RmapEntry] = []
        problems: list[Skipped] = []
        for slot in self.slots(vm):
            if not slot.holds(gfn):
                continue
            for level in LEVELS:
                if not slot.rmap[level - 1]:
                    continue
                where = slot.rmap[level - 1] + 8 * gfn_to_index(gfn, slot.base_gfn, level)
                try:
                    val = self.head(slot, gfn, level)
                except drgn.FaultError as e:
                    problems.append(Skipped(where, f"rmap head unreadable ({e})"))
                    continue
                shift = 9 * (level - 1)
                first = max((gfn >> shift) << shift, slot.base_gfn)
                for p in self.sptes_of(val, where, problems):
                    entries.append(self.resolve(vm, slot.as_id, first, level, p))
        return GfnSptes(entries, problems)


# -- mmu_rmaps_stat, offline ------------------------------------------------------

# "KVM: X86: Introduce mmu_rmaps_stat per-vm debugfs file" (5.15, 3bcd0662d66f)
RMAP_LOG_SIZE = 11  # buckets of arch/x86/kvm/debugfs.c: "statistics <1024 (11=log(1024)+1)"
# the kernel's column labels, in its order: "0", "1", then "2^(i-1)-(2^i - 1)"
RMAP_BUCKETS = ("0", "1", *(f"{1 << (i - 1)}-{(1 << i) - 1}" for i in range(2, RMAP_LOG_SIZE)))


def rmap_bucket(count: int) -> int:
    """The column kvm_mmu_rmaps_stat_show() counts an rmap of *count* sptes in:
    ffs(count), clamped to RMAP_LOG_SIZE - 1 (its WARN_ON_ONCE). ffs() is the
    lowest set bit, so the kernel files 3 under "1" and 6 under "2-3", whatever
    the labels say; this mirrors it (RmapLevel.lengths has the exact lengths)."""
    return min((count & -count).bit_length(), RMAP_LOG_SIZE - 1) if count > 0 else 0


@dataclass(frozen=True)
class RmapLevel:
    """One row of mmu_rmaps_stat: the rmap heads of one level (slot->arch.rmap[level - 1])
    of every memslot of every address space."""

    level: int  # 1, 2, 3: the mapping level the rmap is for
    heads: int  # heads read: kvm_mmu_slot_lpages() per memslot, empty ones too
    buckets: tuple[int, ...]  # RMAP_LOG_SIZE counts, as the kernel bins them (rmap_bucket)
    lengths: dict[int, int]  # exact: rmap length (sptes) -> heads of that length, 0 excluded

    @property
    def name(self) -> str:
        return LEVEL_NAMES.get(self.level, str(self.level))

    @property
    def entries(self) -> int:
        """Sptes in this level's rmaps: each is one present leaf SPTE."""
        return sum(n * c for n, c in self.lengths.items())

    @property
    def longest(self) -> int:
        return max((n for n, c in self.lengths.items() if c), default=0)


@dataclass(frozen=True)
class RmapHistogram:
    """A VM's rmap lengths per level: what ``cat /sys/kernel/debug/kvm/PID-FD/mmu_rmaps_stat``
    shows live (kvm_mmu_rmaps_stat_show(), arch/x86/kvm/debugfs.c), read offline.

    *has_rmaps*: kvm_memslots_have_rmaps(); without rmaps (a TDP MMU VM that never
    needed the shadow MMU) the kernel's file is empty, and *levels* is too. Before
    "KVM: x86/mmu: Lazily allocate memslot rmaps" (5.14, d501f747ef5c) every memslot
    had them: a TDP MMU VM's are there, empty (the 5.10-tdp fixture).
    *unreadable*: rmap arrays not in the dump, missing from the counts; *skipped*:
    pte_list_desc chains cut short (a loop, an unreadable desc). *max_rmap_size*:
    kvm->stat.max_mmu_rmap_size ("KVM: X86: Add per-vm stat for max rmap list size",
    5.15), the longest rmap pte_list_add() ever met before adding to it (None before
    5.15).
    """

    has_rmaps: bool
    levels: tuple[RmapLevel, ...]
    unreadable: tuple[RmapArray, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    max_rmap_size: int | None = None

    @property
    def entries(self) -> int:
        """Every sptep in every rmap: one per present shadow-MMU leaf SPTE."""
        return sum(lv.entries for lv in self.levels)


def rmap_histogram(k: Kernel, vm: VM, reader: RmapReader | None = None) -> RmapHistogram:
    """The rmap length histogram of *vm*, per level, binned as mmu_rmaps_stat bins it.

    One pass over every rmap head of every memslot (RmapReader.scan, the audit's
    own); each head's length is its sptes, counted along its pte_list_desc chain
    (what pte_list_count() returns on a chain that is whole).
    """
    reader = reader or RmapReader(k)
    if not reader.has_rmaps(vm):
        return RmapHistogram(False, ())
    scan = reader.scan(vm)
    levels = []
    for level in LEVELS:
        lengths = scan.lengths.get(level, Counter())
        buckets = [0] * RMAP_LOG_SIZE
        buckets[0] = scan.heads[level] - sum(lengths.values())
        for n, c in lengths.items():
            buckets[rmap_bucket(n)] += c
        levels.append(RmapLevel(level, scan.heads[level], tuple(buckets),
                                {n: c for n, c in sorted(lengths.items()) if n}))
    peak = vm.stat.get("max_mmu_rmap_size")
    return RmapHistogram(True, tuple(levels), tuple(scan.unreadable), tuple(scan.problems),
                         peak)


def tdp_of_gfn(k: Kernel, vm: VM, gfn: int) -> list[RmapEntry]:
    """The TDP MMU's SPTEs mapping *gfn*: each root on tdp_mmu_roots walked to
    gfn's guest physical address (the TDP MMU keeps no rmaps)."""
    from kvminspect.walk import walk

    out: list[RmapEntry] = []
    for root in k.tdp_roots(vm):
        sp = k.shadow_page(root)
        if sp is None:
            continue
        w = walk(k, vm, gfn << PAGE_SHIFT, sp, f"sp {root:#x}", direct=True)
        if not w.stop.maps:
            continue
        st = w.steps[-1]
        table = k.shadow_page(st.table)
        assert st.value is not None and table is not None  # the walk read both
        shift = 9 * (st.level - 1)
        out.append(RmapEntry(as_id_of(sp), (gfn >> shift) << shift,
                             st.level, table.spt + 8 * st.index, st.table, st.index,
                             st.value, st.bits, tdp_root=root))
    return out


def sptes_of_gfn(k: Kernel, vm: VM, gfn: int, reader: RmapReader | None = None) -> GfnSptes:
    """Every SPTE that maps *gfn*: the rmaps' (shadow MMU), then the TDP MMU roots'."""
    reader = reader or RmapReader(k)
    entries, problems = reader.of_gfn(vm, gfn)
    return GfnSptes(entries + tdp_of_gfn(k, vm, gfn), problems)
