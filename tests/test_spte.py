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


# --- every bit, by each release's own masks ---------------------------------
#
# The globals each release's kvm_intel (kvm_mmu_set_ept_masks(); 5.10:
# kvm_mmu_set_mask_ptes() and ept_set_mmio_spte_mask() from vmx.c) and its
# kvm_mmu_reset_all_pte_masks() (AMD NPT and shadow paging; 5.10:
# kvm_mmu_set_mask_ptes() from x86.c, svm_adjust_mmio_mask()) set, as
# masks_from_globals() gets them from kvm.ko: what a release lacks is absent
# and takes its fallback. EPT with execute-only support (shadow_present_mask
# without R), no SME, no L1TF (shadow_nonpresent_or_rsvd_mask 0), 46 physical
# address bits (shadow_nonpresent_or_rsvd_lower_gfn_mask).

from kvminspect import spte as S  # noqa: E402

LOWER_GFN = ((1 << 46) - 1) & ~0xFFF
LAYOUT = {"5.10": S.LAYOUT_SPECIAL, "6.1": S.LAYOUT_PRESENT_BIT, "6.12": S.LAYOUT_NONPRESENT,
          "7.3": S.LAYOUT_MBEC}
SVE = 1 << 63  # VMX_EPT_SUPPRESS_VE_BIT


def ept_globals(release: str, ad: bool = True) -> dict[str, int]:
    """kvm.ko's globals after kvm_intel's setup with EPT (A/D bits: *ad*)."""
    common = {"shadow_nx_mask": 0, "shadow_me_mask": 0, "shadow_acc_track_mask": 7,
              "shadow_nonpresent_or_rsvd_mask": 0,
              "shadow_nonpresent_or_rsvd_lower_gfn_mask": LOWER_GFN,
              "shadow_accessed_mask": 0x100 if ad else 0, "shadow_dirty_mask": 0x200 if ad else 0}
    if release == "5.10":  # kvm_mmu_set_mask_ptes(VMX_EPT_READABLE_MASK, ...)
        return {**common, "shadow_user_mask": 1, "shadow_x_mask": 4, "shadow_present_mask": 0,
                "shadow_mmio_value": 6 | S.SPTE_MMIO_MASK, "shadow_mmio_access_mask": 0}
    if release in ("6.1", "6.12"):
        return {**common, "shadow_user_mask": 1, "shadow_x_mask": 4,
                "shadow_present_mask": SVE if release == "6.12" else 0,
                "shadow_me_value": 0, "shadow_host_writable_mask": 1 << 57,
                "shadow_mmu_writable_mask": 1 << 58, "shadow_mmio_value": 6,
                "shadow_mmio_mask": 7 | (SVE if release == "6.12" else 0),
                "shadow_mmio_access_mask": 0, "enable_mmio_caching": 1}
    # 7.3: kvm_mmu_set_ept_masks(has_ad_bits): A/D masks always, XS/XU
    return {**common, "shadow_accessed_mask": 0x100, "shadow_dirty_mask": 0x200,
            "shadow_user_mask": 0, "shadow_xs_mask": 4, "shadow_xu_mask": 0x400,
            "shadow_present_mask": SVE, "shadow_acc_track_mask": 7 | 0x400,
            "shadow_me_value": 0, "shadow_host_writable_mask": 1 << 53,
            "shadow_mmu_writable_mask": 1 << 55, "shadow_mmio_value": 6,
            "shadow_mmio_mask": 7 | SVE, "shadow_mmio_access_mask": 0, "enable_mmio_caching": 1}


def npt_globals(release: str) -> dict[str, int]:
    """kvm.ko's globals after kvm_mmu_reset_all_pte_masks() and kvm_amd's setup
    (MMIO: reserved bit 51 and present)."""
    common = {"shadow_user_mask": 4, "shadow_accessed_mask": 0x20, "shadow_dirty_mask": 0x40,
              "shadow_nx_mask": 1 << 63, "shadow_x_mask": 0, "shadow_present_mask": 1,
              "shadow_acc_track_mask": 0, "shadow_me_mask": 0,
              "shadow_nonpresent_or_rsvd_mask": 0,
              "shadow_nonpresent_or_rsvd_lower_gfn_mask": LOWER_GFN,
              "shadow_mmio_access_mask": 6}
    if release == "5.10":  # kvm_mmu_set_mmio_spte_mask() adds SPTE_MMIO_MASK
        return {**common, "shadow_mmio_value": (1 << 51) | 1 | S.SPTE_MMIO_MASK}
    out = {**common, "shadow_me_value": 0, "shadow_host_writable_mask": 1 << 9,
           "shadow_mmu_writable_mask": 1 << 10, "shadow_mmio_value": (1 << 51) | 1,
           "shadow_mmio_mask": (1 << 51) | 1, "enable_mmio_caching": 1}
    if release == "7.3":
        out["shadow_xs_mask"] = out.pop("shadow_x_mask")
        out["shadow_xu_mask"] = 0
    return out


def masks(kind: str, release: str) -> S.SpteMasks:
    g = {"ept": ept_globals(release), "ept-noad": ept_globals(release, ad=False),
         "npt": npt_globals(release)}[kind]
    return S.masks_from_globals(g, LAYOUT[release])


# (what, level, masks kind, {release: (value, flags)}): the CASES values above
FLAGS = [
    ("EPT 4K leaf RWX, A/D on", 1, "ept",
     {"5.10": (0x0000000123456F77, "RWX U A D hw mw"),
      "6.1": (0x0600000123456B77, "RWX U A D hw mw"),
      "6.12": (0x8600000123456B77, "RWX U A D hw mw"),
      "7.3": (0x80A0000123456F77, "RWX XU A D hw mw")}),
    # A/D type "disabled": accessed is "not access-tracked", dirty is W
    ("EPT 4K leaf RWX, A/D off", 1, "ept-noad",
     {"5.10": (0x0010000123456C77, "RWX U A D hw mw ad=disabled"),
      "6.1": (0x0610000123456877, "RWX U A D hw mw ad=disabled"),
      "6.12": (0x8610000123456877, "RWX U A D hw mw ad=disabled"),
      "7.3": (0x90A0000123456F77, "RWX XU A D hw mw ad=disabled")}),
    ("EPT access-tracked, RWX clear", 1, "ept-noad",
     {"5.10": (0x0150000123456C70, "--- hw mw ad=disabled acc-track(saved R-X)"),
      "6.1": (0x0750000123456870, "--- hw mw ad=disabled acc-track(saved R-X)"),
      "6.12": (0x8750000123456870, "--- hw mw ad=disabled acc-track(saved R-X)"),
      "7.3": (0xD0F0000123456A70, "--- hw mw ad=disabled acc-track(saved R-XU)")}),
    ("EPT aged (A cleared), A/D on", 1, "ept",
     {"5.10": (0x0000000123456E77, "RWX U D hw mw"),
      "6.1": (0x0600000123456A77, "RWX U D hw mw"),
      "6.12": (0x8600000123456A77, "RWX U D hw mw"),
      "7.3": (0x80A0000123456E77, "RWX XU D hw mw")}),
    ("EPT 2M leaf, nx_huge_pages (X stripped)", 2, "ept",
     {"5.10": (0x0000000123400FF3, "RW- U A D hw mw"),
      "6.1": (0x0600000123400BF3, "RW- U A D hw mw"),
      "6.12": (0x8600000123400BF3, "RW- U A D hw mw"),
      "7.3": (0x80A0000123400BF3, "RW- A D hw mw")}),
    ("EPT non-leaf", 3, "ept",
     {"5.10": (0x000000010A3B4107, "RWX U A"), "6.1": (0x000000010A3B4907, "RWX U A"),
      "6.12": (0x800000010A3B4907, "RWX U A"), "7.3": (0x800000010A3B4D07, "RWX XU A")}),
    ("EPT MMIO, generation 0", 1, "ept",
     {"5.10": (0x00300000FEE00006, "MMIO gen 0x0 gfn 0xfee00"),
      "6.1": (0x00000000FEE00006, "MMIO gen 0x0 gfn 0xfee00"),
      "6.12": (0x00000000FEE00006, "MMIO gen 0x0 gfn 0xfee00"),
      "7.3": (0x00000000FEE00006, "MMIO gen 0x0 gfn 0xfee00")}),
    # generation bit 7 or 8: the low field is 9 bits (5.10), 8 (5.13), 7 (MBEC)
    ("EPT MMIO, generation 0x100 / 0x80", 1, "ept",
     {"5.10": (0x00300000FEE00806, "MMIO gen 0x100 gfn 0xfee00"),
      "6.1": (0x00000000FEE00406, "MMIO gen 0x80 gfn 0xfee00"),
      "6.12": (0x00100000FEE00006, "MMIO gen 0x100 gfn 0xfee00"),
      "7.3": (0x00100000FEE00006, "MMIO gen 0x80 gfn 0xfee00")}),
    ("non-present", 1, "ept",
     {"5.10": (0, "-"), "6.1": (0, "-"), "6.12": (1 << 63, "-"), "7.3": (1 << 63, "-")}),
    ("TDP MMU REMOVED/FROZEN", 2, "ept",
     {"6.1": (0x5A0, "FROZEN"), "6.12": (0x80000000000005A0, "FROZEN"),
      "7.3": (0x80000000000001A0, "FROZEN")}),
    ("NPT 4K leaf RWX", 1, "npt",
     {"5.10": (0x0000000123456C67, "RWX U A D hw mw"),
      "6.1": (0x0000000123456E67, "RWX U A D hw mw"),
      "6.12": (0x0000000123456E67, "RWX U A D hw mw"),
      "7.3": (0x0000000123456E67, "RWX U A D hw mw")}),
    ("NPT 2M leaf, NX", 2, "npt",
     {"5.10": (0x8000000123400CE7, "RW- U NX A D hw mw"),
      "6.1": (0x8000000123400EE7, "RW- U NX A D hw mw"),
      "6.12": (0x8000000123400EE7, "RW- U NX A D hw mw"),
      "7.3": (0x8000000123400EE7, "RW- U NX A D hw mw")}),
    # shadow paging: a read-only mapping the guest only read (host-writable, not MMU-writable)
    ("shadow 4K leaf, write-protected", 1, "npt",
     {"6.1": (0x0000000123456A25, "R-X U A hw"), "6.12": (0x0000000123456A25, "R-X U A hw"),
      "7.3": (0x0000000123456A25, "R-X U A hw")}),
    ("NPT non-leaf", 4, "npt",
     {"5.10": (0x000000010A3B4027, "RWX U A"), "6.1": (0x000000010A3B4827, "RWX U A"),
      "6.12": (0x000000010A3B4827, "RWX U A"), "7.3": (0x000000010A3B4827, "RWX U A")}),
    ("NPT MMIO (W|U, generation 0)", 1, "npt",
     {"5.10": (0x00380000FEE00007, "MMIO gen 0x0 gfn 0xfee00"),
      "6.1": (0x00080000FEE00007, "MMIO gen 0x0 gfn 0xfee00"),
      "6.12": (0x00080000FEE00007, "MMIO gen 0x0 gfn 0xfee00"),
      "7.3": (0x00080000FEE00007, "MMIO gen 0x0 gfn 0xfee00")}),
]
FLAG_PARAMS = [pytest.param(rel, kind, level, value, flags, id=f"{rel}: {what}")
               for what, level, kind, values in FLAGS
               for rel, (value, flags) in values.items()]


@pytest.mark.parametrize("release,kind,level,value,flags", FLAG_PARAMS)
def test_every_bit(release: str, kind: str, level: int, value: int, flags: str) -> None:
    """Each release's masks (EPT as kvm_intel sets them, NPT/shadow as
    kvm_mmu_reset_all_pte_masks does) decode its SPTEs through one code path."""
    b = S.decode_bits(value, level, FMT[release], masks(kind, release))
    assert b.flags() == flags
    assert b.present == is_shadow_present_pte(value, FMT[release])
    if b.mmio:
        assert not b.present and b.mmio_access == (6 if kind == "npt" else 0)


def test_formats_are_told_apart_by_masks() -> None:
    """EPT has no NX mask (X is a bit, no U/S); x86 page tables have one."""
    for rel in LAYOUT:
        assert masks("ept", rel).format == "ept" and masks("npt", rel).format == "x86"
        ept = S.decode_bits(0x0000000123456E67 if rel != "5.10" else 0x123456C67, 1,
                            FMT[rel], masks("npt", rel))
        assert ept.nx is False and ept.user is True
    b = S.decode_bits(0x0600000123456B77, 1, FMT["6.1"], masks("ept", "6.1"))
    assert b.nx is None and b.x is True and b.xu is None


def test_missing_globals_fall_back_by_name() -> None:
    """5.10 has no shadow_mmu_writable_mask, shadow_mmio_mask or shadow_me_value:
    its constants stand in, and say so; a mask nobody has is None (unknown)."""
    m = masks("npt", "5.10")
    src = dict(m.sources)
    assert (m.host_writable, m.mmu_writable) == (1 << 10, 1 << 11)
    assert src["mmu_writable"] == "SPTE_MMU_WRITEABLE (5.10)"
    assert m.mmio_mask == S.SPTE_SPECIAL_MASK and "SPTE_SPECIAL_MASK" in src["mmio_mask"]
    assert src["me_value"] == "shadow_me_mask (5.10)"
    bare = S.masks_from_globals({}, S.LAYOUT_MBEC)
    assert bare.nx is None and bare.format == "unknown"
    b = S.decode_bits(0x0000000123456E67, 1, FMT["7.3"], bare)
    assert b.present and b.x is None and b.accessed is None and b.flags() == "RW?"


def test_frozen_value_is_the_layouts_own() -> None:
    """0x5a0 is REMOVED_SPTE to 6.9; from 6.10 FROZEN_SPTE carries bit 63, and
    with MBEC (bit 10 is XU) it is bit 63 | 0x1a0: another layout's value is not frozen."""
    assert not S.decode_bits(0x5A0, 2, FMT["6.12"], masks("ept", "6.12")).frozen
    assert not S.decode_bits((1 << 63) | 0x5A0, 2, FMT["7.3"], masks("ept", "7.3")).frozen
    assert S.decode_bits((1 << 63) | 0x1A0, 2, FMT["7.3"], masks("ept", "7.3")).frozen


def test_mmio_needs_mmio_caching() -> None:
    """With enable_mmio_caching off the kernel makes no MMIO SPTEs (is_mmio_spte() false)."""
    g = {**ept_globals("6.1"), "enable_mmio_caching": 0}
    m = S.masks_from_globals(g, S.LAYOUT_PRESENT_BIT)
    assert not S.decode_bits(0xFEE00006, 1, FMT["6.1"], m).mmio


def test_reserved_bits() -> None:
    """is_rsvd_spte(): rsvd_bits_mask[bit 7][level - 1], and EPT's bad_mt_xwr
    (write-only, 0b010, is never valid; with MBEC XU counts as X)."""
    rsvd = ((0xF << 40,) * 5, (0xF << 40,) * 5)
    bad = 1 << 2  # XWR 010: write-only
    assert S.is_rsvd_spte(1 << 41 | 0x7, 1, rsvd, 0, S.LAYOUT_PRESENT_BIT)
    assert not S.is_rsvd_spte(0x7, 1, rsvd, bad, S.LAYOUT_PRESENT_BIT)
    assert S.is_rsvd_spte(0x2, 1, rsvd, bad, S.LAYOUT_PRESENT_BIT)
    mbec_bad = 1 << 0x6  # X|W without R, 110
    assert S.is_rsvd_spte(0x402, 1, rsvd, mbec_bad, S.LAYOUT_MBEC)
    assert not S.is_rsvd_spte(0x402, 1, rsvd, mbec_bad, S.LAYOUT_PRESENT_BIT)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_masks_are_the_kernels(name: str) -> None:
    """Each fixture's kvm.ko globals are those kvm_mmu_reset_all_pte_masks()
    sets (AMD hosts, shadow paging or NPT), and the layout probed is its release's."""
    k = open_fixture(name).kernel
    series = _series(truth(name)["kernel_release"])
    m = k.spte_masks()
    assert m.layout is LAYOUT[series]
    assert m.format == "x86"
    assert (m.nx, m.user, m.accessed, m.dirty, m.present, m.acc_track) == (
        1 << 63, 4, 0x20, 0x40, 1, 0)
    assert (m.host_writable, m.mmu_writable) == (
        (1 << 10, 1 << 11) if series == "5.10" else (1 << 9, 1 << 10))
    assert m.mmio_value is not None and m.mmio_value & 1 and m.phys_bits
