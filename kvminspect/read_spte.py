"""The SPTE format of one kernel: kvm.ko's shadow_*_mask globals, probed.

arch/x86/kvm/mmu/spte.c keeps the bits of an SPTE in globals that
kvm_mmu_set_me_spte_mask(), kvm_mmu_set_ept_masks() and
kvm_mmu_reset_all_pte_masks() fill at module load (they differ between AMD
and Intel, NPT and EPT); kvminspect.spte holds the rules over them. This part
reads the globals once per kernel, beside the probed Layout, and answers per
VM where the kernel keeps a value per VM (kvm->arch.shadow_mmio_value).
"""

from __future__ import annotations

import dataclasses

import drgn

from kvminspect import spte
from kvminspect.layout import Layout, has_member
from kvminspect.memory import Memory


class SpteReader:
    """The SPTE format of one target: the probed SpteLayout and kvm.ko's masks."""

    def __init__(self, mem: Memory, layout: Layout) -> None:
        self.mem = mem
        self.layout = layout
        self.format = spte.SpteFormat(layout.present_bit, layout.addr_mask)
        self._masks: spte.SpteMasks | None = None
        self._vm_mmio: bool | None = None

    def reset(self) -> None:
        """Nothing to forget: the masks are set at module load and never change."""

    def present(self, value: int) -> bool:
        """is_shadow_present_pte() of this release (kvminspect.spte)."""
        return spte.is_shadow_present_pte(value, self.format)

    def masks(self, vm_addr: int | None = None) -> spte.SpteMasks:
        """The SPTE format as this kernel holds it: kvm.ko's shadow_*_mask
        globals (arch/x86/kvm/mmu/spte.c) and the probed SpteLayout; with
        *vm_addr* (a struct kvm), its own kvm->arch.shadow_mmio_value where the
        kernel keeps one (6.10+, see has_vm_mmio_value).

        A global the kernel lacks is a named fallback (5.10's SPTE_HOST_WRITEABLE
        / SPTE_MMU_WRITEABLE constants, SPTE_SPECIAL_MASK for MMIO,
        shadow_me_mask for shadow_me_value) or None ("unknown"), never an error.
        """
        if self._masks is None:
            self._masks = self._read_masks()
        m = self._masks
        if vm_addr is not None and self.has_vm_mmio_value():
            try:
                kvm = self.mem.object("struct kvm *", vm_addr)
                m = dataclasses.replace(m, mmio_value=kvm.arch.shadow_mmio_value.value_())
            except (drgn.FaultError, LookupError, AttributeError):
                pass
        return m

    def has_vm_mmio_value(self) -> bool:
        """Whether struct kvm_arch has shadow_mmio_value (TDX preparation): "KVM:
        x86/mmu: Track shadow MMIO value on a per-VM basis" (6.10, 949019b98289)."""
        if self._vm_mmio is None:
            try:
                self._vm_mmio = has_member(self.mem.type("struct kvm_arch"), "shadow_mmio_value")
            except LookupError:
                self._vm_mmio = False
        return self._vm_mmio

    def spte_layout(self) -> spte.SpteLayout:
        """The SpteLayout of this kernel, probed, newest first:
        shadow_xu_mask (MBEC): 7.3, as the 7.3 fixture's kvm.ko shows (commit not found);
        kvm->arch.shadow_mmio_value (has_vm_mmio_value): SHADOW_NONPRESENT_VALUE came in
        the same release, "KVM: x86/mmu: Allow non-zero value for non-present SPTE and
        removed SPTE" (6.10, 7f01cab84928); SPTE_MMU_PRESENT_MASK (Layout.present_bit):
        "KVM: x86/mmu: Use a dedicated bit to track shadow/MMU-present SPTEs" (5.13,
        edea7c4fc215)."""
        if self.mem.global_int("shadow_xu_mask") is not None:
            return spte.LAYOUT_MBEC
        if self.has_vm_mmio_value():
            return spte.LAYOUT_NONPRESENT
        if self.layout.present_bit:
            return spte.LAYOUT_PRESENT_BIT
        return spte.LAYOUT_SPECIAL

    def _read_masks(self) -> spte.SpteMasks:
        """See masks(): every global spte.GLOBALS names, then the fallbacks."""
        g = self.mem.global_int
        found = {name: v for name in spte.GLOBALS if (v := g(name)) is not None}
        for name in ("shadow_phys_bits", "enable_mmio_caching"):
            if (v := g(name, 1)) is not None:
                found[name] = v
        if "shadow_phys_bits" not in found:
            # kvm_host.maxphyaddr, as the 6.12 and 7.3 fixtures' kvm.ko show (commit not found)
            try:
                found["kvm_host.maxphyaddr"] = self.mem.variable("kvm_host").maxphyaddr.value_()
            except (LookupError, drgn.FaultError, AttributeError):
                pass
        return spte.masks_from_globals(found, self.spte_layout())

    def bits(self, level: int, value: int, vm_addr: int | None = None) -> spte.SpteBits:
        """One SPTE at *level*, every bit decoded (kvminspect.spte.decode_bits)."""
        return spte.decode_bits(value, level, self.format, self.masks(vm_addr))
