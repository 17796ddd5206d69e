"""Shadow page table entries: presence, size and target, as the kernel decides.

Mirrors arch/x86/kvm/mmu/spte.h: is_shadow_present_pte(), is_large_pte(),
is_last_spte() and the SPTE_BASE_ADDR_MASK pfn. The same rules hold for
every SPTE format KVM writes (EPT on Intel, NPT and shadow paging on AMD and
Intel), because presence is KVM's own software bit, not the hardware's RWX:
an access-tracked EPT SPTE has R, W and X clear and is still present, an MMIO
SPTE has them set and is not. Only the kernel release changes the rules:

* 5.13 (SPTE_MMU_PRESENT_MASK): present is bit 11. From 6.12 a non-present
  SPTE is SHADOW_NONPRESENT_VALUE (bit 63) and a frozen one (FROZEN_SPTE)
  has bits 63 and 7 set, so neither "!= 0" nor bit 7 alone says anything.
* Before 5.13: present is "non-zero and not MMIO", where 5.10 marks MMIO
  SPTEs with SPTE_SPECIAL_MASK (bits 52-53) == SPTE_MMIO_MASK (both set).
"""

from __future__ import annotations

from dataclasses import dataclass

SPTE_MMU_PRESENT_MASK = 1 << 11  # 5.13+
PT_PAGE_SIZE_MASK = 1 << 7  # is_large_pte()
SPTE_SPECIAL_MASK = 3 << 52  # before 5.13: MMIO when both bits are set
SPTE_MMIO_MASK = 3 << 52
PAGE_SHIFT = 12


@dataclass(frozen=True)
class SpteFormat:
    """What a release's SPTE decoding needs (from Layout)."""

    present_bit: bool  # SPTE_MMU_PRESENT_MASK era (5.13+)
    addr_mask: int  # SPTE_BASE_ADDR_MASK: physical_mask & PAGE_MASK


def is_shadow_present_pte(value: int, fmt: SpteFormat) -> bool:
    """is_shadow_present_pte() of the release *fmt* describes."""
    if fmt.present_bit:
        return bool(value & SPTE_MMU_PRESENT_MASK)
    return value != 0 and (value & SPTE_SPECIAL_MASK) != SPTE_MMIO_MASK


def is_large_pte(value: int) -> bool:
    """is_large_pte(): the PS bit (meaningful only for a present SPTE above level 1)."""
    return bool(value & PT_PAGE_SIZE_MASK)


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
    return Decoded(present, large, present and (level == 1 or large),
                   (value & fmt.addr_mask) >> PAGE_SHIFT)
