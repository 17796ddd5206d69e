"""The path an address takes through a root: the model behind ``walk``.

Replays what KVM's for_each_shadow_entry() does (shadow_walk_init_using_root,
shadow_walk_okay, shadow_walk_next in arch/x86/kvm/mmu/mmu.c): from a root,
at each level the SPTE at SPTE_INDEX(addr, level) of the shadow page's spt[],
down to a leaf, a non-present or MMIO SPTE, a frozen one, reserved bits, a
pointer to no shadow page or an unreadable table. A shadow (indirect) root
translates a guest virtual address, a TDP or direct root a guest physical
one. A PAE root (mmu->pae_root[], 32-bit guests) starts at pae_root[addr
bits 31:30]. The leaf's host pfn is then checked against the memslot: gfn ->
struct kvm_memory_slot -> userspace address -> the pfn the VMM's page tables
(kvm->mm) map there. The results are typed (Walk, Step, Stop, MemslotCheck,
MemslotOutcome); nothing here prints: memslot_why() words a memslot check for
the renderers (text and JSON alike).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

import drgn

from kvminspect import spte
from kvminspect.model import Kernel
from kvminspect.objects import VM, Memslot, RootKind, RootRef, ShadowPage, VCpu, as_id_of
from kvminspect.spte import PAGE_SHIFT, PT_PRESENT_MASK, SPTE_ENT_PER_PAGE

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

PT32E_ROOT_LEVEL = 3
# mmu->shadow_zero_check (struct rsvd_bits_validate): (rsvd_bits_mask[2][N], bad_mt_xwr);
# mmu->fmt (struct kvm_page_format) in 7.3, as the 7.3 fixture's DWARF shows (commit not found)
RsvdMasks = tuple[tuple[tuple[int, ...], ...], int]


class AddressKind(Enum):
    """What a root translates, so what kind of address a walk takes (JSON "kind")."""

    GVA = "gva"  # a shadow (indirect) root: guest virtual addresses
    GPA = "gpa"  # a TDP or direct root: guest physical addresses


class Stop(Enum):
    """Where for_each_shadow_entry() ends, or why the walk cannot go on (JSON "stop")."""

    LEAF = "leaf"  # is_last_spte() at level 1: a 4 KiB page
    LARGE = "large"  # is_last_spte() above level 1: is_large_pte()
    NOT_PRESENT = "not_present"  # !is_shadow_present_pte()
    MMIO = "mmio"  # is_mmio_spte(): emulated, no page
    FROZEN = "frozen"  # is_removed_spte() / is_frozen_spte(): a TDP MMU update under way
    RESERVED = "reserved"  # is_rsvd_spte() by the vCPU's shadow_zero_check
    NO_SHADOW_PAGE = "no_shadow_page"  # a non-leaf SPTE to a page with no kvm_mmu_page
    UNREADABLE = "unreadable"  # a table or struct kvm_mmu_page the dump lacks, or a loop
    NO_ROOT = "no_root"  # INVALID_PAGE, or a special root with nothing to walk

    @property
    def maps(self) -> bool:
        """Whether the walk ended at a page the address maps to (LEAF, LARGE)."""
        return self in (Stop.LEAF, Stop.LARGE)


class Verdict(Enum):
    """The memslot check's answer (JSON "verdict")."""

    MATCH = "match"
    MISMATCH = "mismatch"
    NOT_CHECKABLE = "not checkable"


class MemslotOutcome(Enum):
    """How memslot_check() ended: a verdict, and for NOT_CHECKABLE what was missing
    (memslot_why() words it; check --audit counts leaves by it: kvminspect.audit)."""

    MATCH = "match"  # the VMM maps the SPTE's page at the memslot's hva
    MISMATCH = "mismatch"  # the VMM maps another page there
    CANNOT_TRANSLATE = "cannot_translate"  # follow_pfn() cannot walk these page tables
    NO_MEMSLOT = "no_memslot"  # no memslot of the address space holds the gfn
    NO_MM = "no_mm"  # kvm->mm is NULL
    NOT_IN_DUMP = "not_in_dump"  # the VMM's page tables there are not in the dump
    NOT_MAPPED = "not_mapped"  # the VMM's page tables map nothing at the hva
    NO_GFN = "no_gfn"  # kvm_mmu_page_get_gfn() could not be read

    @property
    def verdict(self) -> Verdict:
        if self is MemslotOutcome.MATCH:
            return Verdict.MATCH
        if self is MemslotOutcome.MISMATCH:
            return Verdict.MISMATCH
        return Verdict.NOT_CHECKABLE


@dataclass(frozen=True)
class Step:
    """One level of a walk: the table, the index into it and its SPTE."""

    level: int
    table: int  # struct kvm_mmu_page, or the pae_root's kernel address
    table_gfn: int | None  # the shadow page's gfn (None for pae_root)
    index: int
    value: int | None  # None: the table could not be read
    bits: spte.SpteBits | None
    reserved: bool | None = None  # is_rsvd_spte() by the vCPU's MMU; None: not checked
    child: int | None = None  # struct kvm_mmu_page the SPTE points to


@dataclass(frozen=True)
class MemslotCheck:
    """The leaf's pfn against gfn -> memslot -> userspace address -> host pfn."""

    gfn: int | None  # the leaf's gfn (None: unreadable)
    pfn: int  # the host pfn the SPTE maps
    outcome: MemslotOutcome
    as_id: int = 0  # the address space searched (1: SMM)
    slot: Memslot | None = None
    hva: int | None = None
    host_pfn: int | None = None  # what the VMM's page tables map at hva
    error: str | None = None  # drgn's words, for NOT_IN_DUMP and CANNOT_TRANSLATE

    @property
    def verdict(self) -> Verdict:
        return self.outcome.verdict


def memslot_why(c: MemslotCheck) -> str:
    """A memslot check's outcome in words (the text's "check:" line, JSON "why")."""
    o, hva = c.outcome, f"{c.hva:#x}" if c.hva is not None else "?"
    if o is MemslotOutcome.MATCH:
        return "maps the page the memslot says"
    if o is MemslotOutcome.MISMATCH:
        return f"the memslot's page is pfn {c.host_pfn or 0:#x}, the SPTE maps {c.pfn:#x}"
    if o is MemslotOutcome.NO_GFN:
        return "the leaf's gfn could not be read"
    if o is MemslotOutcome.NO_MEMSLOT:
        return f"no memslot of address space {c.as_id} holds gfn {c.gfn or 0:#x}"
    if o is MemslotOutcome.NO_MM:
        return "the VM has no mm (kvm->mm is NULL)"
    if o is MemslotOutcome.NOT_MAPPED:
        return f"the VMM's page tables do not map {hva} (no page there now)"
    if o is MemslotOutcome.NOT_IN_DUMP:
        return f"the VMM's page tables for {hva} are not in the dump ({c.error})"
    return f"cannot translate {hva} ({c.error})"


@dataclass(frozen=True)
class Walk:
    """One address walked through one root."""

    addr: int
    kind: AddressKind
    root: str  # where the walk started: "vcpu0.root", "sp 0x...", ...
    root_addr: int | None  # the top table (struct kvm_mmu_page or pae_root)
    steps: list[Step] = field(default_factory=list)
    stop: Stop = Stop.LEAF
    why: str = ""  # the stop in words: the level and index, what the SPTE holds
    offset: int | None = None  # offset of addr in the mapped page (4 KiB or large)
    pfn: int | None = None  # the host pfn of addr's page (a large page's pfn + offset)
    check: MemslotCheck | None = None
    checked_reserved: bool = False  # whether the vCPU's rsvd masks were read
    root_invalid: bool = False  # the top page's role.invalid (zapped: on its way out)


def level_shift(level: int) -> int:
    """SPTE_LEVEL_SHIFT(level): 12 + 9 * (level - 1)."""
    return PAGE_SHIFT + 9 * (level - 1)


def spte_index(addr: int, level: int) -> int:
    """SPTE_INDEX(addr, level)."""
    return (addr >> level_shift(level)) & (SPTE_ENT_PER_PAGE - 1)


# memslot_checks()' outcomes: TRANSLATED (the host pfn is known), then by MemslotOutcome
TRANSLATED = 0
CHECK_OUTCOMES = (MemslotOutcome.MATCH, MemslotOutcome.NO_MEMSLOT, MemslotOutcome.NO_MM,
                  MemslotOutcome.NOT_MAPPED, MemslotOutcome.NOT_IN_DUMP,
                  MemslotOutcome.CANNOT_TRANSLATE)
_CODE = {o: i for i, o in enumerate(CHECK_OUTCOMES)}


def memslot_checks(k: Kernel, vm: VM, gfns: NDArray[np.uint64], as_ids: NDArray[np.int64],
                   mm: drgn.Object | None
                   ) -> tuple[NDArray[np.uint8], NDArray[np.uint64], NDArray[np.uint64]]:
    """memslot_check() of many gfns at once (*as_ids*: each one's address space;
    *mm*: kvm->mm, read by the caller): (outcome, hva, host pfn) of each, the
    outcome a position in CHECK_OUTCOMES, TRANSLATED where the host pfn is
    known (MATCH or MISMATCH: the caller compares it with the SPTE's). The
    VMM's page tables are walked for all of them at once (Vms.hva_to_pfns),
    else gfn by gfn as memslot_check() does."""
    import numpy as np

    from kvminspect.read_vms import HVA_NOT_IN_DUMP, HVA_NOT_MAPPED

    n = len(gfns)
    code = np.full(n, _CODE[MemslotOutcome.NO_MEMSLOT], dtype=np.uint8)
    hva = np.zeros(n, dtype=np.uint64)
    host = np.zeros(n, dtype=np.uint64)
    found = np.zeros(n, dtype=bool)
    for slot in vm.memslots:  # __gfn_to_memslot(): the first memslot that holds it
        if slot.npages <= 0:
            continue
        mine = (~found & (as_ids == slot.as_id) & (gfns >= np.uint64(slot.base_gfn))
                & (gfns < np.uint64(slot.base_gfn + slot.npages)))
        hva[mine] = np.uint64(slot.userspace_addr) + (
            (gfns[mine] - np.uint64(slot.base_gfn)) << np.uint64(PAGE_SHIFT))
        found |= mine
    at = np.flatnonzero(found)
    if mm is None:
        code[at] = _CODE[MemslotOutcome.NO_MM]
        return code, hva, host
    got = k.vm_reader.hva_to_pfns(mm, hva[at])
    if got is None:  # address by address, as memslot_check()
        for j in at.tolist():
            c = memslot_check(k, vm, int(gfns[j]), 0, int(as_ids[j]), mm)
            code[j] = _CODE.get(c.outcome, TRANSLATED)
            host[j] = c.host_pfn or 0
        return code, hva, host
    pfns, outcome = got
    host[at] = pfns
    code[at] = np.where(outcome == HVA_NOT_MAPPED, _CODE[MemslotOutcome.NOT_MAPPED],
                        np.where(outcome == HVA_NOT_IN_DUMP, _CODE[MemslotOutcome.NOT_IN_DUMP],
                                 TRANSLATED))
    return code, hva, host


def memslot_check(k: Kernel, vm: VM, gfn: int | None, pfn: int, as_id: int = 0,
                  mm: drgn.Object | None = None) -> MemslotCheck:
    """gfn -> its memslot (kvm->memslots[as_id]) -> userspace_addr + offset ->
    follow_pfn() in the VMM's mm (kvm->mm, or *mm* when the caller read it): the
    pfn the leaf must map (*pfn*: the one it maps)."""
    if gfn is None:
        return MemslotCheck(None, pfn, MemslotOutcome.NO_GFN, as_id)
    slot = vm.memslot_of(gfn, as_id)
    if slot is None:
        return MemslotCheck(gfn, pfn, MemslotOutcome.NO_MEMSLOT, as_id)
    hva = slot.hva_of(gfn)
    try:
        if mm is None:
            mm = k.vm_reader.vmm_mm(vm)
        if mm is None:
            return MemslotCheck(gfn, pfn, MemslotOutcome.NO_MM, as_id, slot, hva)
        host = k.vm_reader.hva_to_pfn(mm, hva)
    except drgn.FaultError as e:
        # drgn says which: a page-table entry not present ("address not mapped"),
        # or a page-table page the dump lacks
        outcome = (MemslotOutcome.NOT_MAPPED if "not mapped" in e.message
                   else MemslotOutcome.NOT_IN_DUMP)
        return MemslotCheck(gfn, pfn, outcome, as_id, slot, hva, error=str(e))
    except (LookupError, ValueError, NotImplementedError) as e:
        return MemslotCheck(gfn, pfn, MemslotOutcome.CANNOT_TRANSLATE, as_id, slot, hva,
                            error=str(e))
    outcome = MemslotOutcome.MATCH if host == pfn else MemslotOutcome.MISMATCH
    return MemslotCheck(gfn, pfn, outcome, as_id, slot, hva, host)


def walk(k: Kernel, vm: VM, addr: int, root: RootRef | ShadowPage, label: str,
         vcpu: VCpu | None = None, direct: bool | None = None) -> Walk:
    """Walk *addr* from *root* (a vCPU's RootRef, or any shadow page as the top).

    *vcpu*: whose MMU's reserved-bit masks check each present SPTE (None: not
    checked). *direct*: whether the root translates guest physical addresses
    (default: the top shadow page's role.direct).
    """
    rsvd = k.rsvd_masks(vcpu) if vcpu is not None else None
    kind = _kind(direct)
    if isinstance(root, ShadowPage):
        sp = root
    elif root.hpa is None:
        return Walk(addr, kind, label, None, stop=Stop.NO_ROOT, why="the root is INVALID_PAGE")
    elif root.special is RootKind.PAE_ROOT:
        return _walk_pae(k, vm, addr, root, label, rsvd, direct)
    elif root.sp is None:
        return Walk(addr, kind, label, root.hpa, stop=Stop.NO_ROOT,
                    why=f"the root is {root.special.value if root.special else 'unreadable'}: "
                    "nothing to walk")
    else:
        sp = root.sp
    if direct is None:
        direct = sp.role.direct
    w = Walk(addr, _kind(direct), label, sp.addr, root_invalid=sp.role.invalid)
    return _descend(k, vm, w, sp, rsvd)


def _kind(direct: bool | None) -> AddressKind:
    return AddressKind.GPA if direct else AddressKind.GVA


def _walk_pae(k: Kernel, vm: VM, addr: int, root: RootRef, label: str,
              rsvd: RsvdMasks | None, direct: bool | None) -> Walk:
    """shadow_walk_init_using_root() for a PAE root: pae_root[(addr >> 30) & 3]
    is a level-3 entry (PT_PRESENT_MASK), its child the level-2 shadow page."""
    assert root.hpa is not None
    table = root.hpa + k.layout.page_offset_base
    i = (addr >> 30) & 3
    kind = _kind(direct)
    try:
        value = k.memory.read_u64(table + 8 * i)
    except drgn.FaultError as e:
        return Walk(addr, kind, label, table, stop=Stop.UNREADABLE,
                    why=f"pae_root {table:#x} unreadable ({e})")
    child = None
    present = bool(value & PT_PRESENT_MASK)
    if present:
        child = k.to_shadow_page((value & k.layout.addr_mask) >> PAGE_SHIFT)
    step = Step(PT32E_ROOT_LEVEL, table, None, i, value, None, None, child)
    w = Walk(addr, kind, f"{label} pae_root[{i}]", table, [step],
             checked_reserved=rsvd is not None)
    if not present:
        return _stopped(w, Stop.NOT_PRESENT,
                        f"pae_root[{i}] is not present (no shadow page for addr bits 31:30)")
    if child is None:
        return _stopped(w, Stop.NO_SHADOW_PAGE, f"pae_root[{i}] points to no shadow page")
    sp = k.shadow_page(child)
    if sp is None:
        return _stopped(w, Stop.UNREADABLE, f"struct kvm_mmu_page {child:#x} unreadable")
    return _descend(k, vm, w, sp, rsvd)


def _stopped(w: Walk, stop: Stop, why: str, offset: int | None = None,
             pfn: int | None = None, check: MemslotCheck | None = None) -> Walk:
    """*w* ended at *stop* (*why* in words); a leaf's offset, pfn and memslot check."""
    return replace(w, stop=stop, why=why, offset=offset, pfn=pfn, check=check)


def _descend(k: Kernel, vm: VM, w: Walk, sp: ShadowPage, rsvd: RsvdMasks | None) -> Walk:
    """for_each_shadow_entry() from *sp* down; the stop and the memslot check."""
    addr, seen = w.addr, set()
    masks = k.spte_masks(vm)
    w = replace(w, checked_reserved=rsvd is not None)
    while True:
        if sp.addr in seen or len(w.steps) > 6:
            return _stopped(w, Stop.UNREADABLE, f"the tables loop at sp {sp.addr:#x}")
        seen.add(sp.addr)
        level = sp.level
        i = spte_index(addr, level)
        spt = k.sptes(sp)
        if spt is None:
            w.steps.append(Step(level, sp.addr, sp.gfn, i, None, None))
            return _stopped(w, Stop.UNREADABLE, f"spt[] of sp {sp.addr:#x} unreadable")
        value = spt[i]
        bits = spte.decode_bits(value, level, k.spte_format, masks)
        reserved = None
        if rsvd is not None and bits.present and 1 <= level <= len(rsvd[0][0]):
            reserved = spte.is_rsvd_spte(value, level, rsvd[0], rsvd[1], masks.layout)
        child = None
        if bits.present and not bits.leaf and not reserved:
            child = k.to_shadow_page(bits.pfn)
        w.steps.append(Step(level, sp.addr, sp.gfn, i, value, bits, reserved, child))
        where = f"L{level} index {i}"
        if bits.frozen:
            return _stopped(w, Stop.FROZEN, f"{where}: frozen (REMOVED/FROZEN_SPTE): a TDP MMU "
                            "update was in progress when the dump was taken")
        if bits.mmio:
            mgfn = "" if bits.mmio_gfn is None else f" gfn {bits.mmio_gfn:#x}"
            gen = "" if bits.mmio_gen is None else f", generation {bits.mmio_gen:#x}"
            return _stopped(w, Stop.MMIO, f"{where}: MMIO SPTE{mgfn}{gen} (emulated, no page)")
        if not bits.present:
            return _stopped(w, Stop.NOT_PRESENT, f"{where}: not present")
        if reserved:
            return _stopped(w, Stop.RESERVED, f"{where}: reserved bits set (is_rsvd_spte)")
        if bits.leaf:
            size = 1 << level_shift(level)
            offset = addr & (size - 1)
            pfn = bits.pfn + (offset >> PAGE_SHIFT)
            gfns = k.leaf_gfns(sp, [i])
            gfn = None if gfns is None else gfns[0]
            if gfn is not None and bits.large:
                gfn += offset >> PAGE_SHIFT
            as_id = as_id_of(sp)
            check = memslot_check(k, vm, gfn, pfn, as_id)
            if bits.large:
                why = (f"{where}: large page ({size >> 20} MiB) at pfn {bits.pfn:#x}, "
                       f"offset {offset:#x}")
                return _stopped(w, Stop.LARGE, why, offset=offset, pfn=pfn, check=check)
            return _stopped(w, Stop.LEAF, f"{where}: 4 KiB page pfn {pfn:#x}, offset {offset:#x}",
                            offset=offset, pfn=pfn, check=check)
        if child is None:
            return _stopped(w, Stop.NO_SHADOW_PAGE,
                            f"{where}: points to pfn {bits.pfn:#x}, which has no shadow page")
        nxt = k.shadow_page(child)
        if nxt is None:
            return _stopped(w, Stop.UNREADABLE, f"{where}: struct kvm_mmu_page {child:#x} "
                            "unreadable")
        sp = nxt
