"""Shadow page table entries: presence, size and target, as the kernel decides.

Mirrors arch/x86/kvm/mmu/spte.h: is_shadow_present_pte(), is_large_pte(),
is_last_spte() and the SPTE_BASE_ADDR_MASK pfn. The same rules hold for
every SPTE format KVM writes (EPT on Intel, NPT and shadow paging on AMD and
Intel), because presence is KVM's own software bit, not the hardware's RWX:
an access-tracked EPT SPTE has R, W and X clear and is still present, an MMIO
SPTE has them set and is not. Only the kernel release changes the rules:

* 5.13 (SPTE_MMU_PRESENT_MASK, "KVM: x86/mmu: Use a dedicated bit to track
  shadow/MMU-present SPTEs", edea7c4fc215): present is bit 11. From 6.10 ("KVM:
  x86/mmu: Allow non-zero value for non-present SPTE and removed SPTE",
  7f01cab84928) a non-present SPTE is SHADOW_NONPRESENT_VALUE (bit 63) and a
  frozen one (REMOVED_SPTE, FROZEN_SPTE in 6.12) has bits 63 and 7 set, so
  neither "!= 0" nor bit 7 alone says anything.
* Before 5.13: present is "non-zero and not MMIO", where 5.10 marks MMIO
  SPTEs with SPTE_SPECIAL_MASK (bits 52-53) == SPTE_MMIO_MASK (both set).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used: `vms` never needs it
    import numpy as np
    from numpy.typing import NDArray

# The rule's constants, one home: kvminspect.helpers (the drgn helpers) and
# the code --drgn prints (kvminspect.drgn_code) take them from here.
SPTE_MMU_PRESENT_MASK = 1 << 11  # 5.13+ (edea7c4fc215, see LAYOUT_PRESENT_BIT)
PT_PAGE_SIZE_MASK = 1 << 7  # is_large_pte()
SPTE_SPECIAL_MASK = 3 << 52  # before 5.13: MMIO when both bits are set
SPTE_MMIO_MASK = 3 << 52
PAGE_SHIFT = 12
INVALID_PAGE = (1 << 64) - 1  # mmu.h: (~(hpa_t)0), the hpa of an empty root
PT_PRESENT_MASK = 1  # bit 0: present in pae_root[] entries (and x86 PTEs)
PG_LEVEL_4K = 1  # is_last_spte(): every SPTE of a level-1 table maps memory
SPTE_ENT_PER_PAGE = 512  # u64 SPTEs in a page table (PT64_ENT_PER_PAGE before 6.0)
# 6.0 "KVM: x86/mmu: Use separate namespaces for guest PTEs and shadow PTEs"
# renamed PT64_ENT_PER_PAGE and PT64_BASE_ADDR_MASK to the SPTE_ names.
# SPTE_BASE_ADDR_MASK (PT64_BASE_ADDR_MASK before 6.0) without
# CONFIG_DYNAMIC_PHYSICAL_MASK: physical-address bits 12..51
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)


@dataclass(frozen=True)
class SpteFormat:
    """What a release's SPTE decoding needs (from Layout)."""

    present_bit: bool  # SPTE_MMU_PRESENT_MASK era (5.13+)
    addr_mask: int  # SPTE_BASE_ADDR_MASK: physical_mask & PAGE_MASK


def spte_base_addr_mask(physical_mask: int | None) -> int:
    """SPTE_BASE_ADDR_MASK: ``physical_mask & PAGE_MASK`` with
    CONFIG_DYNAMIC_PHYSICAL_MASK (the vmlinux global physical_mask, which SME
    clears its C-bit from), else bits 12..51 (*physical_mask* None)."""
    if physical_mask is None:
        return SPTE_BASE_ADDR_MASK
    return physical_mask & SPTE_BASE_ADDR_MASK


def is_shadow_present_bit(value: int) -> bool:
    """is_shadow_present_pte() from 5.13: KVM's software bit SPTE_MMU_PRESENT_MASK."""
    return bool(value & SPTE_MMU_PRESENT_MASK)


def is_shadow_present_not_mmio(value: int) -> bool:
    """is_shadow_present_pte() before 5.13: not zero and not an MMIO SPTE
    (SPTE_SPECIAL_MASK bits both set, SPTE_MMIO_MASK)."""
    return value != 0 and value & SPTE_SPECIAL_MASK != SPTE_MMIO_MASK


def is_shadow_present_pte(value: int, fmt: SpteFormat) -> bool:
    """is_shadow_present_pte() of the release *fmt* describes."""
    if fmt.present_bit:
        return is_shadow_present_bit(value)
    return is_shadow_present_not_mmio(value)


def is_large_pte(value: int) -> bool:
    """is_large_pte(): the PS bit (meaningful only for a present SPTE above level 1)."""
    return bool(value & PT_PAGE_SIZE_MASK)


def is_last_spte(value: int, level: int) -> bool:
    """is_last_spte(): an SPTE of a level-*level* table maps memory (level 1, or a
    large page) rather than pointing at a child table (meaningful if present)."""
    return level == PG_LEVEL_4K or is_large_pte(value)


def spte_to_pfn(value: int, addr_mask: int = SPTE_BASE_ADDR_MASK) -> int:
    """spte_to_pfn(): the host pfn an SPTE points at, through SPTE_BASE_ADDR_MASK."""
    return (value & addr_mask) >> PAGE_SHIFT


def present_non_leaf(table: Iterable[int], fmt: SpteFormat) -> list[tuple[int, int]]:
    """(index, SPTE) of each entry of a page table above level 1 that points at
    a child page table: is_shadow_present_pte() && !is_large_pte(), the test
    of for_each_shadow_entry's users and of mmu_page_zap_pte(), over a whole
    table in one comprehension (the same rule as is_shadow_present_pte)."""
    large = PT_PAGE_SIZE_MASK
    if fmt.present_bit:
        bit = SPTE_MMU_PRESENT_MASK
        return [(i, v) for i, v in enumerate(table) if v & bit and not v & large]
    special, mmio = SPTE_SPECIAL_MASK, SPTE_MMIO_MASK
    return [(i, v) for i, v in enumerate(table)
            if v and v & special != mmio and not v & large]


def present_mask(values: NDArray[np.uint64], fmt: SpteFormat) -> NDArray[np.bool_]:
    """is_shadow_present_pte() of many SPTEs at once, by the rule of the release
    *fmt* describes (the present bit, or non-zero and not MMIO), as numpy booleans."""
    import numpy as np

    if fmt.present_bit:
        bit: NDArray[np.bool_] = (values & np.uint64(SPTE_MMU_PRESENT_MASK)) != 0
        return bit
    not_mmio: NDArray[np.bool_] = (values != 0) & (
        (values & np.uint64(SPTE_SPECIAL_MASK)) != np.uint64(SPTE_MMIO_MASK))
    return not_mmio


def present_non_leaf_mask(table: NDArray[np.uint64], fmt: SpteFormat) -> NDArray[np.bool_]:
    """present_non_leaf() of a table (or many SPTEs) at once: True where an entry
    points at a child page table (is_shadow_present_pte() && !is_large_pte())."""
    import numpy as np

    small: NDArray[np.bool_] = (table & np.uint64(PT_PAGE_SIZE_MASK)) == 0
    return present_mask(table, fmt) & small


def present_leaf_mask(values: NDArray[np.uint64], levels: NDArray[np.int64], fmt: SpteFormat
                      ) -> NDArray[np.bool_]:
    """Which of many SPTEs map memory, each of a table of the level in *levels*
    (the same shape): is_shadow_present_pte() && is_last_spte(), by this
    release's rule, as numpy booleans."""
    import numpy as np

    large: NDArray[np.bool_] = (values & np.uint64(PT_PAGE_SIZE_MASK)) != 0
    last: NDArray[np.bool_] = large | (levels == PG_LEVEL_4K)  # is_last_spte()
    return present_mask(values, fmt) & last


@dataclass(frozen=True)
class Decoded:
    """One SPTE as is_shadow_present_pte / is_large_pte / is_last_spte see it."""

    present: bool
    large: bool
    leaf: bool  # is_last_spte(): level 1 or a large page
    pfn: int  # spte_to_pfn(): (value & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def decode(value: int, level: int, fmt: SpteFormat) -> Decoded:
    """An SPTE of a level-*level* page table (the table's real level)."""
    present = is_shadow_present_pte(value, fmt)
    large = present and level > 1 and is_large_pte(value)
    return Decoded(present, large, present and is_last_spte(value, level),
                   spte_to_pfn(value, fmt.addr_mask))


# --- Full decoding from the kernel's own masks ------------------------------
#
# arch/x86/kvm/mmu/spte.c keeps the SPTE format in shadow_*_mask globals, set
# by kvm_mmu_reset_all_pte_masks() (shadow paging and AMD NPT: x86 page-table
# bits, NX in bit 63) or kvm_mmu_set_ept_masks() (Intel EPT: R/W/X in bits 0-2,
# no NX, no U/S). Reading them from the target decodes all three formats by
# one code path. What the globals cannot say (bit positions that are macros:
# the A/D type, saved access-track bits, the MMIO generation, FROZEN_SPTE) is
# an SpteLayout, chosen by probing the target (Kernel.spte_masks), never by
# its version string.

ACC_TRACK_SAVED_R = 1  # VMX_EPT_READABLE_MASK
ACC_TRACK_SAVED_X = 4  # VMX_EPT_EXECUTABLE_MASK
EPT_XU = 1 << 10  # VMX_EPT_USER_EXECUTABLE_MASK (MBEC)
SHADOW_NONPRESENT_OR_RSVD_MASK_LEN = 5


@dataclass(frozen=True)
class SpteLayout:
    """The macro-defined bit positions of one SPTE layout (spte.h)."""

    name: str  # which kernel change this layout is for
    ad_shift: int  # SPTE_TDP_AD_SHIFT (SPTE_SPECIAL_MASK's bits before 5.13)
    saved_shift: int  # SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    saved_mask: int  # SHADOW_ACC_TRACK_SAVED_BITS_MASK
    gen_low: tuple[int, int]  # MMIO_SPTE_GEN_LOW_START, _END
    gen_high: tuple[int, int]  # MMIO_SPTE_GEN_HIGH_START, _END
    frozen: int | None  # REMOVED_SPTE / FROZEN_SPTE (TDP MMU), None: no such value
    nonpresent: int  # SHADOW_NONPRESENT_VALUE (0 before it)
    host_writable: int  # SPTE_HOST_WRITEABLE: the constant before shadow_host_writable_mask
    mmu_writable: int  # SPTE_MMU_WRITEABLE: the constant before shadow_mmu_writable_mask


# 5.10: SPTE_SPECIAL_MASK bits 52-53 (A/D type, 3 = MMIO), generation in bits
# 3-11 and 54-62, SPTE_HOST/MMU_WRITEABLE bits 10/11; no REMOVED_SPTE yet
LAYOUT_SPECIAL = SpteLayout("5.10 (SPTE_SPECIAL_MASK)", 52, 54, 0x5, (3, 11), (54, 62),
                            None, 0, 1 << 10, 1 << 11)
# 5.13 "KVM: x86/mmu: Use a dedicated bit to track shadow/MMU-present SPTEs"
# (edea7c4fc215): bit 11 is SPTE_MMU_PRESENT_MASK; "KVM: x86/mmu: Use MMIO SPTE
# bits 53 and 52 for the MMIO generation" (b0de568018a6): generation 3-10 and
# 52-62; "KVM: x86/mmu: Use low available bits for removed SPTEs" (715f1079eee1):
# REMOVED_SPTE 0x5a0
LAYOUT_PRESENT_BIT = SpteLayout("5.13 (SPTE_MMU_PRESENT_MASK)", 52, 54, 0x5, (3, 10), (52, 62),
                                0x5A0, 0, 1 << 9, 1 << 10)
# 6.10 TDX preparation: SHADOW_NONPRESENT_VALUE (bit 63) in every non-present
# SPTE and a per-VM kvm->arch.shadow_mmio_value; REMOVED_SPTE (later
# FROZEN_SPTE) gains bit 63: "KVM: x86/mmu: Allow non-zero value for non-present
# SPTE and removed SPTE" (7f01cab84928), "KVM: x86/mmu: Track shadow MMIO value
# on a per-VM basis" (949019b98289)
LAYOUT_NONPRESENT = SpteLayout("6.10 (SHADOW_NONPRESENT_VALUE)", 52, 54, 0x5, (3, 10), (52, 62),
                               (1 << 63) | 0x5A0, 1 << 63, 1 << 9, 1 << 10)
# MBEC, 7.3 as its fixture shows (shadow_xs_mask/shadow_xu_mask): bit 10 is EPT's XU, so the A/D
# type moves to bits 60-61, the saved bits to 52/54/62 (R, X, XU), generation
# to 3-9 and 52-62, FROZEN_SPTE to bit 63 | 0x1a0 (the commit was not found in
# the sources read; the 7.3 fixture shows the layout)
LAYOUT_MBEC = SpteLayout("7.x (MBEC: shadow_xs_mask/shadow_xu_mask)", 60, 52, 0x405, (3, 9),
                         (52, 62), (1 << 63) | 0x1A0, 1 << 63, 1 << 9, 1 << 10)

AD_TYPES = ("enabled", "disabled", "wrprot_only", "invalid")  # SPTE_TDP_AD_* by value (3: none)


@dataclass(frozen=True)
class SpteMasks:
    """The target kernel's shadow_*_mask globals (None: this kernel lacks it
    and no per-release fallback applies: decoded as "unknown")."""

    layout: SpteLayout
    nx: int | None = None  # shadow_nx_mask (x86 page tables: bit 63; EPT: 0)
    x: int | None = None  # shadow_x_mask (shadow_xs_mask with MBEC)
    xu: int | None = None  # shadow_xu_mask (MBEC only)
    user: int | None = None  # shadow_user_mask
    accessed: int | None = None  # shadow_accessed_mask
    dirty: int | None = None  # shadow_dirty_mask
    present: int | None = None  # shadow_present_mask
    mmio_value: int | None = None  # shadow_mmio_value (kvm->arch.shadow_mmio_value per VM)
    mmio_mask: int | None = None  # shadow_mmio_mask
    mmio_access: int | None = None  # shadow_mmio_access_mask
    me_value: int | None = None  # shadow_me_value (5.10: shadow_me_mask)
    me_mask: int | None = None  # shadow_me_mask
    acc_track: int | None = None  # shadow_acc_track_mask
    host_writable: int | None = None  # shadow_host_writable_mask
    mmu_writable: int | None = None  # shadow_mmu_writable_mask
    nonpresent_or_rsvd: int | None = None  # shadow_nonpresent_or_rsvd_mask
    lower_gfn: int | None = None  # shadow_nonpresent_or_rsvd_lower_gfn_mask
    phys_bits: int | None = None  # shadow_phys_bits (kvm_host.maxphyaddr: 6.12, 7.3 fixtures)
    mmio_caching: bool = True  # enable_mmio_caching (5.13, b09763da4dd8; 5.10: always)
    sources: tuple[tuple[str, str], ...] = ()  # (field, where it came from) for a reader

    @property
    def format(self) -> str:
        """ "ept" (Intel EPT: no NX bit) or "x86" (shadow paging, AMD NPT), or "unknown"."""
        if self.nx is None:
            return "unknown"
        return "x86" if self.nx else "ept"


@dataclass(frozen=True)
class SpteBits:
    """One SPTE fully decoded; None where the kernel's masks are unknown."""

    present: bool
    leaf: bool
    large: bool
    pfn: int
    mmio: bool
    frozen: bool  # the TDP MMU's REMOVED_SPTE / FROZEN_SPTE
    r: bool | None = None
    w: bool | None = None
    x: bool | None = None
    xu: bool | None = None  # EPT user-execute (MBEC)
    user: bool | None = None  # U/S (EPT has none: None)
    nx: bool | None = None  # the NX bit is set (EPT has none: None)
    ad: str | None = None  # A/D type: enabled / disabled / wrprot_only
    accessed: bool | None = None
    dirty: bool | None = None
    host_writable: bool | None = None
    mmu_writable: bool | None = None
    access_tracked: bool | None = None
    saved: str | None = None  # an access-tracked SPTE's saved R/X(/XU), e.g. "R-X"
    encrypted: bool | None = None  # shadow_me_value set (SME/TDX shared bit)
    mmio_gen: int | None = None
    mmio_gfn: int | None = None
    mmio_access: int | None = None

    def flags(self) -> str:
        """A compact flags column: "RWX U A D hw mw", "MMIO gen 0x3 gfn 0xfee00", ..."""
        if self.frozen:
            return "FROZEN"
        if self.mmio:
            return "MMIO" + ("" if self.mmio_gen is None else f" gen {self.mmio_gen:#x}") + (
                "" if self.mmio_gfn is None else f" gfn {self.mmio_gfn:#x}")
        if not self.present:
            return "-"

        def bit(v: bool | None, c: str) -> str:
            return "?" if v is None else (c if v else "-")

        words = [bit(self.r, "R") + bit(self.w, "W") + bit(self.x, "X")]
        for on, word in ((self.xu, "XU"), (self.user, "U"), (self.nx, "NX"),
                         (self.accessed, "A"), (self.dirty, "D"),
                         (self.host_writable, "hw"), (self.mmu_writable, "mw"),
                         (self.encrypted, "enc")):
            if on:
                words.append(word)
        if self.ad and self.ad != "enabled":
            words.append(f"ad={self.ad}")
        if self.access_tracked:
            words.append(f"acc-track(saved {self.saved})")
        return " ".join(words)


# SpteMasks field -> the kvm.ko globals that hold it, first found wins
GLOBALS_OF: dict[str, tuple[str, ...]] = {
    "nx": ("shadow_nx_mask",), "x": ("shadow_x_mask", "shadow_xs_mask"),
    "xu": ("shadow_xu_mask",), "user": ("shadow_user_mask",),
    "accessed": ("shadow_accessed_mask",), "dirty": ("shadow_dirty_mask",),
    "present": ("shadow_present_mask",), "mmio_value": ("shadow_mmio_value",),
    "mmio_mask": ("shadow_mmio_mask",), "mmio_access": ("shadow_mmio_access_mask",),
    "me_value": ("shadow_me_value",), "me_mask": ("shadow_me_mask",),
    "acc_track": ("shadow_acc_track_mask",),
    "host_writable": ("shadow_host_writable_mask",),
    "mmu_writable": ("shadow_mmu_writable_mask",),
    "nonpresent_or_rsvd": ("shadow_nonpresent_or_rsvd_mask",),
    "lower_gfn": ("shadow_nonpresent_or_rsvd_lower_gfn_mask",),
}
GLOBALS = tuple(n for names in GLOBALS_OF.values() for n in names)  # the u64 ones


def masks_from_globals(found: dict[str, int], layout: SpteLayout) -> SpteMasks:
    """SpteMasks from the globals a kernel has (*found*: name -> value; also
    shadow_phys_bits or kvm_host.maxphyaddr, enable_mmio_caching), with the
    per-release fallbacks for the ones it lacks:

    * 5.10 (SPTE_SPECIAL_MASK layout): no shadow_mmio_mask, is_mmio_spte() is
      (spte & SPTE_SPECIAL_MASK) == SPTE_MMIO_MASK; no shadow_host/mmu_writable_mask,
      the SPTE_HOST_WRITEABLE / SPTE_MMU_WRITEABLE constants (bits 10, 11);
      no shadow_me_value, shadow_me_mask was ORed into every SPTE;
    * no shadow_phys_bits but kvm_host.maxphyaddr (the 6.12 and 7.3 fixtures);
    * MBEC (7.3, as its fixture shows): no shadow_x_mask, but shadow_xs_mask;
    * no enable_mmio_caching (5.10): MMIO SPTEs always cached.

    The writable masks came with 5.13 "KVM: x86/mmu: Make Host-writable and
    MMU-writable bit locations dynamic" (5fc3424f8b85), enable_mmio_caching with
    5.13 "KVM: x86/mmu: Add module param to disable MMIO caching (for testing)"
    (b09763da4dd8).

    Anything else missing stays None ("unknown").
    """
    got: dict[str, int | None] = {}
    sources: list[tuple[str, str]] = []
    for field, names in GLOBALS_OF.items():
        got[field] = None
        for name in names:
            if name in found:
                got[field] = found[name]
                sources.append((field, name))
                break
    if layout is LAYOUT_SPECIAL:
        if got["mmio_mask"] is None:
            got["mmio_mask"] = SPTE_SPECIAL_MASK
            if got["mmio_value"] is None:
                got["mmio_value"] = SPTE_MMIO_MASK
            sources.append(("mmio_mask", "SPTE_SPECIAL_MASK (5.10)"))
        for field, const, name in (("host_writable", layout.host_writable, "SPTE_HOST_WRITEABLE"),
                                   ("mmu_writable", layout.mmu_writable, "SPTE_MMU_WRITEABLE")):
            if got[field] is None:
                got[field] = const
                sources.append((field, f"{name} (5.10)"))
    if got["me_value"] is None and got["me_mask"] is not None:
        got["me_value"] = got["me_mask"]
        sources.append(("me_value", "shadow_me_mask (5.10)"))
    phys = None
    for name in ("shadow_phys_bits", "kvm_host.maxphyaddr"):
        if name in found:
            phys = found[name]
            sources.append(("phys_bits", name))
            break
    caching = found.get("enable_mmio_caching")
    return SpteMasks(layout=layout, phys_bits=phys,
                     mmio_caching=True if caching is None else bool(caching),
                     sources=tuple(sources), **got)


def _bit(value: int, mask: int | None) -> bool | None:
    return None if mask is None else bool(value & mask)


def _field(value: int, lo: int, hi: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def mmio_generation(value: int, layout: SpteLayout) -> int:
    """get_mmio_spte_generation(): the low and high generation fields, joined."""
    (ls, le), (hs, he) = layout.gen_low, layout.gen_high
    return _field(value, ls, le) | (_field(value, hs, he) << (le - ls + 1))


def is_mmio_spte(value: int, m: SpteMasks) -> bool | None:
    """is_mmio_spte(): (spte & shadow_mmio_mask) == shadow_mmio_value, with MMIO
    caching on (5.10: SPTE_SPECIAL_MASK bits both set); None if unknown."""
    if m.mmio_mask is None or m.mmio_value is None:
        return None
    return m.mmio_caching and value & m.mmio_mask == m.mmio_value & m.mmio_mask


# include/linux/kvm_host.h: set in kvm_memslots->generation while install_new_memslots()
# / kvm_swap_active_memslots() swaps the memslots; never part of an MMIO generation
KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS = 1 << 63


def mmio_spte_gen_mask(layout: SpteLayout) -> int:
    """MMIO_SPTE_GEN_MASK: the low bits of the memslot generation an MMIO SPTE holds."""
    (ls, le), (hs, he) = layout.gen_low, layout.gen_high
    return (1 << (le - ls + 1 + he - hs + 1)) - 1


def check_mmio_spte(value: int, generation: int, layout: SpteLayout) -> bool:
    """check_mmio_spte() (mmu.c): whether an MMIO SPTE is of the current memslot
    generation (*generation*: kvm_vcpu_memslots(vcpu)->generation, its address
    space's), i.e. the fault path trusts it; never while the memslots are being
    updated (KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS). A stale one is refaulted."""
    if generation & KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS:
        return False
    return mmio_generation(value, layout) == generation & mmio_spte_gen_mask(layout)


def make_mmio_spte(gfn: int, access: int, generation: int, m: SpteMasks) -> int:
    """make_mmio_spte() (mmu/spte.c): the MMIO SPTE the fault path
    writes for *gfn* (generation_mmio_spte_mask() of the memslot generation, the
    VM's shadow_mmio_value, the access bits, the gpa with its high bits copied above
    shadow_nonpresent_or_rsvd_mask); ValueError where the kernel's masks are unknown."""
    if m.mmio_value is None or m.nonpresent_or_rsvd is None:
        raise ValueError("shadow_mmio_value / shadow_nonpresent_or_rsvd_mask unknown")
    lay = m.layout
    (ls, le), (hs, he) = lay.gen_low, lay.gen_high
    gen = generation & mmio_spte_gen_mask(lay)
    spte = (gen << ls) & (((1 << (le + 1)) - 1) ^ ((1 << ls) - 1))
    spte |= (gen << (hs - (le - ls + 1))) & (((1 << (he + 1)) - 1) ^ ((1 << hs) - 1))
    gpa = gfn << PAGE_SHIFT
    spte |= m.mmio_value | (access & (m.mmio_access or 0))
    spte |= gpa | m.nonpresent_or_rsvd
    spte |= (gpa & m.nonpresent_or_rsvd) << SHADOW_NONPRESENT_OR_RSVD_MASK_LEN
    return spte & (2**64 - 1)


def mmio_mask(values: NDArray[np.uint64], fmt: SpteFormat, m: SpteMasks
              ) -> NDArray[np.bool_] | None:
    """is_mmio_spte() of many SPTEs at once, (spte & shadow_mmio_mask) ==
    shadow_mmio_value, where is_shadow_present_pte() does not hold (decode_bits'
    order): an array of booleans, or None where the kernel makes no MMIO SPTE
    at all (enable_mmio_caching off, a zero shadow_mmio_value: make_mmio_spte()
    WARNs on it, or masks unknown)."""
    import numpy as np

    if not m.mmio_caching or not m.mmio_value or not m.mmio_mask:
        return None
    hit: NDArray[np.bool_] = (values & np.uint64(m.mmio_mask)) == np.uint64(
        m.mmio_value & m.mmio_mask)
    return hit & ~present_mask(values, fmt)  # not is_shadow_present_pte()


def decode_bits(value: int, level: int, fmt: SpteFormat, m: SpteMasks) -> SpteBits:
    """Every bit of one SPTE of a level-*level* table, by the kernel's masks.

    R/W are bits 0/1 in every format (PT_PRESENT_MASK/PT_WRITABLE_MASK are
    ACC_READ/ACC_WRITE, as spte_permission_fault() relies on); X is !NX where
    the kernel has an NX mask (x86 page tables), else the X (XS) bit (EPT).
    """
    lay = m.layout
    present = is_shadow_present_pte(value, fmt)
    frozen = not present and lay.frozen is not None and value == lay.frozen
    mmio = bool(not present and not frozen and is_mmio_spte(value, m))
    pfn = spte_to_pfn(value, fmt.addr_mask)
    if mmio:
        gfn = None
        if m.lower_gfn is not None and m.nonpresent_or_rsvd is not None:
            gpa = value & m.lower_gfn
            gpa |= (value >> SHADOW_NONPRESENT_OR_RSVD_MASK_LEN) & m.nonpresent_or_rsvd
            gfn = gpa >> PAGE_SHIFT
        return SpteBits(False, False, False, pfn, True, False,
                        mmio_gen=mmio_generation(value, lay), mmio_gfn=gfn,
                        mmio_access=None if m.mmio_access is None else value & m.mmio_access)
    if not present:
        return SpteBits(False, False, False, pfn, False, frozen)
    large = level > 1 and is_large_pte(value)
    if m.nx:
        x: bool | None = not value & m.nx
    elif m.x is not None and m.nx is not None:
        x = bool(value & m.x)
    else:
        x = None
    ad_type = (value >> lay.ad_shift) & 3
    ad = AD_TYPES[ad_type]
    ad_on = ad_type == 0
    tracked = None if m.acc_track is None else (not ad_on and not value & m.acc_track)
    accessed: bool | None
    if ad_on:
        accessed = _bit(value, m.accessed)
    else:
        accessed = None if tracked is None else not tracked
    dirty = _bit(value, m.dirty) if ad_on else bool(value & 2)
    saved = None
    if tracked:
        s = (value >> lay.saved_shift) & lay.saved_mask
        saved = (("R" if s & ACC_TRACK_SAVED_R else "-") + "-"
                 + ("X" if s & ACC_TRACK_SAVED_X else "-")
                 + ("U" if s & EPT_XU else "" if lay.saved_mask & EPT_XU == 0 else "-"))
    return SpteBits(
        True, level == 1 or large, large, pfn, False, False,
        r=bool(value & 1), w=bool(value & 2), x=x,
        xu=_bit(value, m.xu) if m.xu else None,
        user=_bit(value, m.user) if m.user else None,
        nx=_bit(value, m.nx) if m.nx else None,
        ad=ad, accessed=accessed, dirty=dirty,
        host_writable=_bit(value, m.host_writable),
        mmu_writable=_bit(value, m.mmu_writable),
        access_tracked=tracked, saved=saved,
        encrypted=bool(value & m.me_value) if m.me_value else None,
    )


def is_rsvd_spte(value: int, level: int, rsvd: tuple[tuple[int, ...], ...], bad_mt_xwr: int,
                 layout: SpteLayout) -> bool:
    """is_rsvd_spte() against an MMU's shadow_zero_check (mmu->fmt in 7.3, as its fixture shows):
    rsvd_bits_mask[bit 7][level - 1], and bad_mt_xwr for EPT's memtype/XWR
    (with MBEC, __is_bad_mt_xwr() counts XU as X)."""
    bit7 = (value >> 7) & 1
    if rsvd[bit7][level - 1] & value:
        return True
    low = value
    if layout is LAYOUT_MBEC and low & EPT_XU:
        low |= ACC_TRACK_SAVED_X
    return bool(bad_mt_xwr & (1 << (low & 0x3F)))
