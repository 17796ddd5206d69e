"""SPTE decoding against each release's own rules, EPT (Intel) and NPT/shadow (AMD).

kvm_intel cannot run under TCG, so Intel hosts are covered here: each value
is built from the constants of that release's kvm_mmu_set_ept_masks()
(5.10: kvm_mmu_set_mask_ptes() from vmx_enable_tdp()) or
kvm_mmu_reset_all_pte_masks() (AMD NPT and shadow paging), with the bits
make_spte(), make_nonleaf_spte(), make_mmio_spte() and
mark_spte_for_access_track() set; "present" is that release's
is_shadow_present_pte(). Example frames: 4K pfn 0x123456, 2M pfn 0x123400, a
child table at 0x10a3b4000, MMIO at gpa 0xfee00000; EPT memtype WB|IPAT.
The real fixtures prove the rules are picked from each kernel's DWARF.
"""

from __future__ import annotations

import pytest

from kvminspect.spte import SpteFormat, decode, is_shadow_present_pte
from tests.conftest import FIXTURES, open_fixture, truth

ADDR = ((1 << 52) - 1) & ~0xFFF  # SPTE_BASE_ADDR_MASK without SME
FMT = {  # release -> rules (5.13 added SPTE_MMU_PRESENT_MASK)
    "5.10": SpteFormat(present_bit=False, addr_mask=ADDR),
    "6.1": SpteFormat(present_bit=True, addr_mask=ADDR),
    "6.12": SpteFormat(present_bit=True, addr_mask=ADDR),
    "7.3": SpteFormat(present_bit=True, addr_mask=ADDR),
}
# (what, level, {release: value}, present, large, leaf, pfn)
CASES = [
    ("EPT 4K leaf RWX, A/D on", 1,
     {"5.10": 0x0000000123456F77, "6.1": 0x0600000123456B77, "6.12": 0x8600000123456B77,
      "7.3": 0x80A0000123456F77}, True, False, True, 0x123456),
    ("EPT 4K leaf RWX, A/D off", 1,
     {"5.10": 0x0010000123456C77, "6.1": 0x0610000123456877, "6.12": 0x8610000123456877,
      "7.3": 0x90A0000123456F77}, True, False, True, 0x123456),
    # RWX (7.3: and XU) cleared, R/X saved in the high bits: still present
    ("EPT access-tracked, RWX clear", 1,
     {"5.10": 0x0150000123456C70, "6.1": 0x0750000123456870, "6.12": 0x8750000123456870,
      "7.3": 0xD0F0000123456A70}, True, False, True, 0x123456),
    ("EPT aged (A cleared), A/D on", 1,
     {"5.10": 0x0000000123456E77, "6.1": 0x0600000123456A77, "6.12": 0x8600000123456A77,
      "7.3": 0x80A0000123456E77}, True, False, True, 0x123456),
    ("EPT 2M leaf", 2,
     {"5.10": 0x0000000123400FF7, "6.1": 0x0600000123400BF7, "6.12": 0x8600000123400BF7,
      "7.3": 0x80A0000123400FF7}, True, True, True, 0x123400),
    ("EPT 2M leaf, nx_huge_pages (X stripped)", 2,
     {"5.10": 0x0000000123400FF3, "6.1": 0x0600000123400BF3, "6.12": 0x8600000123400BF3,
      "7.3": 0x80A0000123400BF3}, True, True, True, 0x123400),
    ("EPT non-leaf", 3,
     {"5.10": 0x000000010A3B4107, "6.1": 0x000000010A3B4907, "6.12": 0x800000010A3B4907,
      "7.3": 0x800000010A3B4D07}, True, False, False, 0x10A3B4),
    ("EPT MMIO, generation 0", 1,
     {"5.10": 0x00300000FEE00006, "6.1": 0x00000000FEE00006, "6.12": 0x00000000FEE00006,
      "7.3": 0x00000000FEE00006}, False, False, False, 0xFEE00),
    # 5.10: generation bit 8 lands on bit 11, yet bits 52-53 say MMIO
    ("5.10 EPT MMIO, generation 0x100", 1, {"5.10": 0x00300000FEE00806},
     False, False, False, 0xFEE00),
    ("7.3 TDX VM MMIO (per-VM value 0)", 1, {"7.3": 0x00000000FEE00000},
     False, False, False, 0xFEE00),
    ("non-present", 1, {"5.10": 0, "6.1": 0, "6.12": 1 << 63, "7.3": 1 << 63},
     False, False, False, 0),
    # REMOVED_SPTE / FROZEN_SPTE: bit 7 set, not present, so not large
    ("TDP MMU REMOVED/FROZEN", 2,
     {"6.1": 0x5A0, "6.12": 0x80000000000005A0, "7.3": 0x80000000000001A0},
     False, False, False, 0),
    ("NPT 4K leaf RWX", 1,
     {"5.10": 0x0000000123456C67, "6.1": 0x0000000123456E67, "6.12": 0x0000000123456E67,
      "7.3": 0x0000000123456E67}, True, False, True, 0x123456),
    ("NPT 2M leaf, NX", 2,
     {"5.10": 0x8000000123400CE7, "6.1": 0x8000000123400EE7, "6.12": 0x8000000123400EE7,
      "7.3": 0x8000000123400EE7}, True, True, True, 0x123400),
    ("NPT non-leaf", 4,
     {"5.10": 0x000000010A3B4027, "6.1": 0x000000010A3B4827, "6.12": 0x000000010A3B4827,
      "7.3": 0x000000010A3B4827}, True, False, False, 0x10A3B4),
    ("NPT MMIO (W|U, generation 0)", 1,
     {"5.10": 0x00380000FEE00007, "6.1": 0x00080000FEE00007, "6.12": 0x00080000FEE00007,
      "7.3": 0x00080000FEE00007}, False, False, False, 0xFEE00),
]
PARAMS = [pytest.param(rel, value, level, present, large, leaf, pfn, id=f"{rel}: {what}")
          for what, level, values, present, large, leaf, pfn in CASES
          for rel, value in values.items()]


@pytest.mark.parametrize("release,value,level,present,large,leaf,pfn", PARAMS)
def test_decode(release: str, value: int, level: int, present: bool, large: bool,
                leaf: bool, pfn: int) -> None:
    d = decode(value, level, FMT[release])
    assert (d.present, d.large, d.leaf) == (present, large, leaf)
    if present:
        assert d.pfn == pfn


def test_rwx_is_not_presence() -> None:
    """An EPT SPTE with R, W and X clear can be present; MMIO with them set is not."""
    tracked, mmio = 0x8750000123456870, 0x00000000FEE00006
    assert not tracked & 0x7 and is_shadow_present_pte(tracked, FMT["6.12"])
    assert mmio & 0x6 and not is_shadow_present_pte(mmio, FMT["6.12"])


def test_sme_c_bit_is_not_pfn() -> None:
    """With SME, physical_mask excludes the C-bit (here 47) from SPTE_BASE_ADDR_MASK."""
    fmt = SpteFormat(present_bit=True, addr_mask=((1 << 47) - 1) & ~0xFFF)
    assert decode(0x0000800123456E67, 1, fmt).pfn == 0x123456


def _series(release: str) -> str:
    return ".".join(release.split(".")[:2]).split("-")[0]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_release_gets_its_rules(name: str) -> None:
    """Each real kernel's DWARF selects that release's rules."""
    k = open_fixture(name).kernel
    series = _series(truth(name)["kernel_release"])
    assert k.spte_format.present_bit == FMT[series].present_bit
