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
(kvm->mm) map there. Nothing here renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import drgn

from kvminspect import spte
from kvminspect.layout import PAGE_SHIFT, PT_PRESENT_MASK
from kvminspect.model import VM, Kernel, Memslot, RootRef, ShadowPage, VCpu

ENTRIES = 512
PT32E_ROOT_LEVEL = 3


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

    gfn: int | None
    slot: Memslot | None = None
    hva: int | None = None
    host_pfn: int | None = None
    verdict: str = "not checkable"  # "match" | "mismatch" | "not checkable"
    why: str = ""


@dataclass(frozen=True)
class Walk:
    """One address walked through one root."""

    addr: int
    kind: str  # "gva" (shadow root) or "gpa" (TDP / direct root)
    root: str  # where the walk started: "vcpu0.root", "sp 0x...", ...
    root_addr: int | None  # the top table (struct kvm_mmu_page or pae_root)
    steps: list[Step] = field(default_factory=list)
    stop: str = "leaf"  # leaf | large | not_present | mmio | frozen | reserved |
    #                     no_shadow_page | unreadable | no_root
    why: str = ""
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
    return (addr >> level_shift(level)) & (ENTRIES - 1)


def rsvd_masks(k: Kernel, vcpu: VCpu) -> tuple[tuple[tuple[int, ...], ...], int] | None:
    """The vCPU's MMU reserved-bit masks: mmu->shadow_zero_check (7.x: mmu->fmt),
    struct rsvd_bits_validate / kvm_page_format: (rsvd_bits_mask[2][N], bad_mt_xwr);
    None if this kernel has neither or they cannot be read."""
    try:
        v = drgn.Object(k.prog, "struct kvm_vcpu *", vcpu.addr)
        mmu = v.arch.mmu if k.layout.mmu_is_pointer else v.arch.mmu.address_of_()
        for name in ("shadow_zero_check", "fmt"):
            try:
                zc = mmu.member_(name)
            except LookupError:
                continue
            rows = tuple(tuple(int(x) for x in zc.rsvd_bits_mask[b].read_()) for b in (0, 1))
            return rows, zc.bad_mt_xwr.value_()
    except (drgn.FaultError, LookupError, AttributeError, TypeError):
        pass
    return None


def leaf_gfn(k: Kernel, sp: ShadowPage, index: int) -> int | None:
    """kvm_mmu_page_get_gfn(sp, index): a direct page's sp->gfn + index <<
    9 * (level - 1); an indirect one's sp->shadowed_translation[index] >>
    PAGE_SHIFT (6.1+) or sp->gfns[index] (before); None if unreadable."""
    if sp.role.direct:
        return sp.gfn + (index << (9 * (sp.level - 1)))
    try:
        obj = drgn.Object(k.prog, "struct kvm_mmu_page *", sp.addr)
        for name, shift in (("shadowed_translation", PAGE_SHIFT), ("gfns", 0)):
            try:
                arr = obj.member_(name)
            except LookupError:
                continue
            if not arr:
                return None
            return arr[index].value_() >> shift
    except (drgn.FaultError, LookupError):
        pass
    return None


def memslot_check(k: Kernel, vm: VM, gfn: int | None, pfn: int, as_id: int = 0,
                  mm: drgn.Object | None = None) -> MemslotCheck:
    """gfn -> its memslot (kvm->memslots[as_id]) -> userspace_addr + offset ->
    follow_pfn() in the VMM's mm (kvm->mm, or *mm* when the caller read it): the
    pfn the leaf must map."""
    if gfn is None:
        return MemslotCheck(None, why="the leaf's gfn could not be read")
    slot = next((s for s in vm.memslots if s.as_id == as_id
                 and s.base_gfn <= gfn < s.base_gfn + s.npages), None)
    if slot is None:
        return MemslotCheck(gfn, why=f"no memslot of address space {as_id} holds gfn {gfn:#x}")
    hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
    from drgn.helpers.linux.mm import follow_pfn

    try:
        if mm is None:
            mm = k.kvm_object(vm).mm
        if not mm:
            return MemslotCheck(gfn, slot, hva, why="the VM has no mm (kvm->mm is NULL)")
        host = follow_pfn(mm, hva).value_()
    except drgn.FaultError as e:
        what = str(e)
        if "not mapped" in what:
            why = f"the VMM's page tables do not map {hva:#x} (no page there now)"
        else:
            why = f"the VMM's page tables for {hva:#x} are not in the dump ({what})"
        return MemslotCheck(gfn, slot, hva, why=why)
    except (LookupError, ValueError, NotImplementedError) as e:
        return MemslotCheck(gfn, slot, hva, why=f"cannot translate {hva:#x} ({e})")
    if host == pfn:
        return MemslotCheck(gfn, slot, hva, host, "match", "maps the page the memslot says")
    return MemslotCheck(gfn, slot, hva, host, "mismatch",
                        f"the memslot's page is pfn {host:#x}, the SPTE maps {pfn:#x}")


def walk(k: Kernel, vm: VM, addr: int, root: RootRef | ShadowPage, label: str,
         vcpu: VCpu | None = None, direct: bool | None = None) -> Walk:
    """Walk *addr* from *root* (a vCPU's RootRef, or any shadow page as the top).

    *vcpu*: whose MMU's reserved-bit masks check each present SPTE (None: not
    checked). *direct*: whether the root translates guest physical addresses
    (default: the top shadow page's role.direct).
    """
    rsvd = rsvd_masks(k, vcpu) if vcpu is not None else None
    kind = "gpa" if direct else "gva"
    if isinstance(root, ShadowPage):
        sp = root
    elif root.hpa is None:
        return Walk(addr, kind, label, None, stop="no_root", why="the root is INVALID_PAGE")
    elif root.special == "pae_root":
        return _walk_pae(k, vm, addr, root, label, rsvd, direct)
    elif root.sp is None:
        return Walk(addr, kind, label, root.hpa, stop="no_root",
                    why=f"the root is {root.special or 'unreadable'}: nothing to walk")
    else:
        sp = root.sp
    if direct is None:
        direct = sp.role.direct
    w = Walk(addr, "gpa" if direct else "gva", label, sp.addr, root_invalid=sp.role.invalid)
    return _descend(k, vm, w, sp, rsvd)


def _walk_pae(k: Kernel, vm: VM, addr: int, root: RootRef, label: str, rsvd: tuple | None,
              direct: bool | None) -> Walk:
    """shadow_walk_init_using_root() for a PAE root: pae_root[(addr >> 30) & 3]
    is a level-3 entry (PT_PRESENT_MASK), its child the level-2 shadow page."""
    assert root.hpa is not None
    table = root.hpa + k.layout.page_offset_base
    i = (addr >> 30) & 3
    kind = "gpa" if direct else "gva"
    try:
        value = k.prog.read_u64(table + 8 * i)
    except drgn.FaultError as e:
        return Walk(addr, kind, label, table, stop="unreadable",
                    why=f"pae_root {table:#x} unreadable ({e})")
    child = None
    present = bool(value & PT_PRESENT_MASK)
    if present:
        child = k.page_to_sp((value & k.layout.addr_mask) >> PAGE_SHIFT)
    step = Step(PT32E_ROOT_LEVEL, table, None, i, value, None, None, child)
    w = Walk(addr, kind, f"{label} pae_root[{i}]", table, [step],
             checked_reserved=rsvd is not None)
    if not present:
        return _stopped(w, "not_present",
                        f"pae_root[{i}] is not present (no shadow page for addr bits 31:30)")
    if child is None:
        return _stopped(w, "no_shadow_page", f"pae_root[{i}] points to no shadow page")
    sp = k.shadow_page(child)
    if sp is None:
        return _stopped(w, "unreadable", f"struct kvm_mmu_page {child:#x} unreadable")
    return _descend(k, vm, w, sp, rsvd)


def _stopped(w: Walk, stop: str, why: str, **more: object) -> Walk:
    from dataclasses import replace

    return replace(w, stop=stop, why=why, **more)  # type: ignore[arg-type]


def _descend(k: Kernel, vm: VM, w: Walk, sp: ShadowPage, rsvd: tuple | None) -> Walk:
    """for_each_shadow_entry() from *sp* down; the stop and the memslot check."""
    addr, seen = w.addr, set()
    masks = k.spte_masks(vm)
    w = _stopped(w, w.stop, w.why, checked_reserved=rsvd is not None)
    while True:
        if sp.addr in seen or len(w.steps) > 6:
            return _stopped(w, "unreadable", f"the tables loop at sp {sp.addr:#x}")
        seen.add(sp.addr)
        level = sp.level
        i = spte_index(addr, level)
        spt = k.sptes(sp)
        if spt is None:
            w.steps.append(Step(level, sp.addr, sp.gfn, i, None, None))
            return _stopped(w, "unreadable", f"spt[] of sp {sp.addr:#x} unreadable")
        value = spt[i]
        bits = spte.decode_bits(value, level, k.spte_format, masks)
        reserved = None
        if rsvd is not None and bits.present and 1 <= level <= len(rsvd[0][0]):
            reserved = spte.is_rsvd_spte(value, level, rsvd[0], rsvd[1], masks.layout)
        child = None
        if bits.present and not bits.leaf and not reserved:
            child = k.page_to_sp(bits.pfn)
        w.steps.append(Step(level, sp.addr, sp.gfn, i, value, bits, reserved, child))
        where = f"L{level} index {i}"
        if bits.frozen:
            return _stopped(w, "frozen", f"{where}: frozen (REMOVED/FROZEN_SPTE): a TDP MMU "
                            "update was in progress when the dump was taken")
        if bits.mmio:
            gfn = "" if bits.mmio_gfn is None else f" gfn {bits.mmio_gfn:#x}"
            gen = "" if bits.mmio_gen is None else f", generation {bits.mmio_gen:#x}"
            return _stopped(w, "mmio", f"{where}: MMIO SPTE{gfn}{gen} (emulated, no page)")
        if not bits.present:
            return _stopped(w, "not_present", f"{where}: not present")
        if reserved:
            return _stopped(w, "reserved", f"{where}: reserved bits set (is_rsvd_spte)")
        if bits.leaf:
            size = 1 << level_shift(level)
            offset = addr & (size - 1)
            pfn = bits.pfn + (offset >> PAGE_SHIFT)
            gfn = leaf_gfn(k, sp, i)
            if gfn is not None and bits.large:
                gfn += offset >> PAGE_SHIFT
            as_id = 1 if sp.role.get("smm") else 0
            check = memslot_check(k, vm, gfn, pfn, as_id)
            if bits.large:
                why = (f"{where}: large page ({size >> 20} MiB) at pfn {bits.pfn:#x}, "
                       f"offset {offset:#x}")
                return _stopped(w, "large", why, offset=offset, pfn=pfn, check=check)
            return _stopped(w, "leaf", f"{where}: 4 KiB page pfn {pfn:#x}, offset {offset:#x}",
                            offset=offset, pfn=pfn, check=check)
        if child is None:
            return _stopped(w, "no_shadow_page",
                            f"{where}: points to pfn {bits.pfn:#x}, which has no shadow page")
        nxt = k.shadow_page(child)
        if nxt is None:
            return _stopped(w, "unreadable", f"{where}: struct kvm_mmu_page {child:#x} "
                            "unreadable")
        sp = nxt
