"""The registers KVM saved for each vCPU, where the kernel keeps them in memory.

Registers is the model's part for a vCPU's register file as a dump holds it:
what ``KVM_GET_REGS`` / ``KVM_GET_SREGS`` would return if the vCPU thread
could be asked, read from the same places, never from the VMCS.

Both vendors keep the general-purpose registers in vcpu->arch.regs[]
(struct kvm_vcpu_arch, arch/x86/include/asm/kvm_host.h), indexed by enum
kvm_reg (VCPU_REGS_RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15, then
VCPU_REGS_RIP; kvm.ko's DWARF gives the values). In 7.3 regs[] holds the 16
GPRs only and RIP is vcpu->arch.rip, enum kvm_reg's VCPU_REGS_RIP is
VCPU_REG_RIP and VCPU_EXREG_* are VCPU_REG_* (as the 7.3 fixture's DWARF
shows; commit not found). CR0, CR2, CR3, CR4 and EFER are vcpu->arch.cr0,
cr2, cr3, cr4, efer: the guest's own values (the guest CR3 is
vcpu->arch.cr3; under shadow paging the hardware CR3, the VMCB's save.cr3,
is the shadow root).

AMD (kvm_amd, arch/x86/kvm/svm/svm.c): __svm_vcpu_run (vmenter.S) saves
every GPR but RAX and RSP into vcpu->arch.regs[] at #VMEXIT, and
svm_vcpu_run() then copies save.rax, save.rsp and save.rip from the VMCB
into regs[] (``if (!sev_es_guest(...))``): after an exit regs[] is whole,
and it stays the truth until the next VMRUN (an emulated instruction moves
regs[VCPU_REGS_RIP] past itself: the VMCB's save.rip is then the old one).
RFLAGS lives only in the VMCB (svm_get_rflags(): svm->vmcb->save.rflags);
so do the segments (svm_seg(): CS, DS, ES, SS in svm->vmcb->save; FS, GS,
TR, LDTR in svm->vmcb01.ptr->save, where VMSAVE puts them, from "KVM: SVM:
Use a separate vmcb for the nested L2 guest" (5.13, 4995a3685f1b); one
svm->vmcb before). svm_handle_exit() refreshes vcpu->arch.cr3 from the VMCB
under NPT (CR3 writes are not intercepted there) and vcpu->arch.cr0 when
CR0 writes are not intercepted. An SEV-ES guest's registers are encrypted
in its VMSA: regs[] is not updated (the sev_es_guest() checks above).

Intel (kvm_intel, arch/x86/kvm/vmx/vmx.c): the VMCS is not readable from a
dump, so only what vmx.c caches in memory is used, each valid while its
vcpu->arch.regs_avail bit is set (vmx_vcpu_run() clears
VMX_REGS_LAZY_LOAD_SET at every VM-exit; vmx_cache_reg() and the getters
set them when they read the VMCS): RSP and RIP in regs[] (VCPU_REGS_RSP,
VCPU_REGS_RIP bits; __vmx_vcpu_run saves the other GPRs at every exit),
vmx->rflags (VCPU_EXREG_RFLAGS), vmx->segment_cache (VCPU_EXREG_SEGMENTS,
then its bitmask: bit seg * SEG_FIELD_NR + SEG_FIELD_SEL / _BASE), CR0 and
CR4 (VCPU_EXREG_CR0 / _CR4: their guest-owned bits live in the VMCS), CR3
(VCPU_EXREG_CR3; always valid under shadow paging, where CR3 loads exit).
What is not cached is unknown.

A vCPU that was in guest mode at the dump (vcpu->mode IN_GUEST_MODE or
EXITING_GUEST_MODE) has run on since these were saved: its registers are
stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import drgn

from kvminspect.layout import bare_type, has_member, known
from kvminspect.memory import Memory
from kvminspect.objects import VCpu
from kvminspect.read_exits import IN_GUEST
from kvminspect.read_vms import Vms

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15")  # enum kvm_reg's VCPU_REGS_RAX .. VCPU_REGS_R15
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")  # VCPU_SREG_ES .. VCPU_SREG_GS: 0 .. 5
CONTROL = ("cr0", "cr2", "cr3", "cr4", "efer")  # vcpu->arch members
SEG_FIELD_SEL, SEG_FIELD_BASE, SEG_FIELD_NR = 0, 1, 4  # vmx.c's segment cache fields
HF_GUEST_MASK = 1 << 0  # vcpu->arch.hflags: the vCPU runs a nested guest (L2)
# enum kvm_reg's values where kvm.ko's DWARF lacks the enum (kvm_host.h, 5.x-6.x)
DEFAULT_REGS = {**{f"VCPU_REGS_{r.upper()}": i for i, r in enumerate(GPRS)},
                "VCPU_REGS_RIP": 16, "VCPU_EXREG_PDPTR": 17, "VCPU_EXREG_CR0": 18,
                "VCPU_EXREG_CR3": 19, "VCPU_EXREG_CR4": 20, "VCPU_EXREG_RFLAGS": 21,
                "VCPU_EXREG_SEGMENTS": 22}


@dataclass(frozen=True)
class SavedRegs:
    """One vCPU's registers as KVM saved them.

    *values*: register name -> value for what the dump holds (GPRS, rip,
    rflags, the SEGMENTS' selectors, fs_base, gs_base, cr0, cr2, cr3, cr4,
    efer); *sources*: register name -> where it was read; *unknown*: the
    registers the dump does not hold (Intel: only in the VMCS). *stale*: the
    vCPU was in guest mode at the dump (None: vcpu->mode unknown). *notes*:
    what else bears on them (a nested guest's registers, SEV-ES, missing
    vendor debug info).
    """

    vcpu_idx: int
    vendor: str | None
    values: dict[str, int]
    sources: dict[str, str]
    unknown: tuple[str, ...]
    stale: bool | None
    notes: tuple[str, ...] = field(default=())


class _SvmLayout(NamedTuple):
    vcpu_offset: int  # offsetof(struct vcpu_svm, vcpu)
    vmcb01: bool  # svm->vmcb01 (5.13+)


class _VmxLayout(NamedTuple):
    vcpu_offset: int  # offsetof(struct vcpu_vmx, vcpu)
    rflags: bool  # vmx->rflags
    segment_cache: bool  # vmx->segment_cache


class Registers:
    """The saved registers of each vCPU, read through *mem*; *vms* says which vendor
    module is loaded and whether TDP is on. Owns the probed layout (nothing read is
    cached: registers are read anew at each call)."""

    def __init__(self, mem: Memory, vms: Vms) -> None:
        self.mem = mem
        self.vms = vms
        self._probed = False
        self._enum: dict[str, int] = {}
        self._svm: _SvmLayout | None = None
        self._vmx: _VmxLayout | None = None
        self._vendor_note: str | None = None

    def reset(self) -> None:
        """Nothing to forget: the layout is the kernel's, registers are read anew."""

    def _probe(self) -> None:
        if self._probed:
            return
        self._probed = True
        try:
            self._enum = {e.name: int(e.value)
                          for e in self.mem.type("enum kvm_reg").enumerators or ()}
        except LookupError:
            self._enum = dict(DEFAULT_REGS)
        vendor = self.vms.vendor()
        name = {"kvm_amd": "struct vcpu_svm", "kvm_intel": "struct vcpu_vmx"}.get(vendor or "")
        if name is None:
            return
        try:
            t = self.mem.type(name)
        except LookupError:
            ko = "kvm-amd.ko" if vendor == "kvm_amd" else "kvm-intel.ko"
            self._vendor_note = (f"{ko}'s debug info lacks {name}: only vcpu->arch.regs[] "
                                 "and vcpu->arch are read")
            return
        if vendor == "kvm_amd":
            self._svm = _SvmLayout(drgn.offsetof(t, "vcpu"), has_member(t, "vmcb01"))
        else:
            self._vmx = _VmxLayout(drgn.offsetof(t, "vcpu"), has_member(t, "rflags"),
                                   has_member(t, "segment_cache"))

    def _index(self, *names: str) -> int | None:
        """The value of the first of enum kvm_reg's *names* this kernel has."""
        return next((self._enum[n] for n in names if n in self._enum), None)

    def saved(self, vcpu: VCpu) -> SavedRegs | None:
        """*vcpu*'s saved registers; None (and a problem) when they cannot be read."""
        self._probe()
        try:
            return self._read(vcpu)
        except (drgn.FaultError, LookupError, AttributeError, ValueError) as e:
            self.mem.problem("struct kvm_vcpu", vcpu.addr, f"registers unreadable ({e})")
            return None

    def _read(self, vcpu: VCpu) -> SavedRegs:
        v = self.mem.object("struct kvm_vcpu *", vcpu.addr)
        arch = v.arch
        values: dict[str, int] = {}
        sources: dict[str, str] = {}
        notes: list[str] = []
        regs = [int(x) for x in arch.regs.read_()]
        avail_obj = arch.regs_avail
        if bare_type(avail_obj.type_).kind == drgn.TypeKind.ARRAY:  # unsigned long[1] in 7.3
            avail_obj = avail_obj[0]
        avail = int(avail_obj.value_())

        def bit(*names: str) -> bool:
            i = self._index(*names)
            return i is not None and bool(avail >> i & 1)

        vmx = self._vmx is not None
        for name in GPRS:
            i = self._index(f"VCPU_REGS_{name.upper()}")
            if i is None or i >= len(regs):
                continue
            if vmx and name == "rsp" and not bit("VCPU_REGS_RSP"):
                continue  # in the VMCS (GUEST_RSP)
            values[name] = regs[i]
            sources[name] = "vcpu->arch.regs[]"
        if has_member(arch.type_, "rip"):  # 7.3: its own member
            rip: int | None = int(arch.rip.value_())
            where = "vcpu->arch.rip"
        else:
            i = self._index("VCPU_REGS_RIP")
            rip = regs[i] if i is not None and i < len(regs) else None
            where = "vcpu->arch.regs[]"
        if rip is not None and not (vmx and not bit("VCPU_REGS_RIP", "VCPU_REG_RIP")):
            values["rip"] = rip
            sources["rip"] = where
        for name in CONTROL:
            reg = {"cr0": "CR0", "cr3": "CR3", "cr4": "CR4"}.get(name)
            if vmx and reg is not None and not bit(f"VCPU_EXREG_{reg}", f"VCPU_REG_{reg}"):
                if not (name == "cr3" and not self.vms.tdp_enabled()):
                    continue  # guest-owned bits (CR0, CR4) or the guest CR3 in the VMCS
            values[name] = int(arch.member_(name).value_())
            sources[name] = "vcpu->arch"
        if self._svm is not None:
            self._read_svm(vcpu, self._svm, values, sources, notes)
        elif self._vmx is not None:
            self._read_vmx(vcpu, self._vmx, bit("VCPU_EXREG_RFLAGS", "VCPU_REG_RFLAGS"),
                           bit("VCPU_EXREG_SEGMENTS", "VCPU_REG_SEGMENTS"), values, sources)
        if self._vendor_note:
            notes.append(self._vendor_note)
        if has_member(arch.type_, "hflags") and int(arch.hflags.value_()) & HF_GUEST_MASK:
            notes.append("the vCPU runs a nested guest (L2): these are L2's registers")
        every = (*GPRS, "rip", "rflags", *SEGMENTS, "fs_base", "gs_base", *CONTROL)
        return SavedRegs(
            vcpu_idx=vcpu.vcpu_idx, vendor=self.vms.vendor(), values=values, sources=sources,
            unknown=tuple(r for r in every if r not in values),
            stale=vcpu.mode in IN_GUEST if known(vcpu.mode) else None, notes=tuple(notes))

    def _read_svm(self, vcpu: VCpu, lay: _SvmLayout, values: dict[str, int],
                  sources: dict[str, str], notes: list[str]) -> None:
        """RFLAGS and the segments from the VMCB save area (svm_get_rflags(), svm_seg())."""
        svm = self.mem.object("struct vcpu_svm *", vcpu.addr - lay.vcpu_offset)
        if not svm.vmcb.value_():
            notes.append("svm->vmcb is NULL: RFLAGS and segments unknown")
            return
        save = svm.vmcb.save
        here = "svm->vmcb->save"
        save01, there = (svm.vmcb01.ptr.save, "svm->vmcb01.ptr->save") if lay.vmcb01 else (
            save, here)
        values["rflags"] = int(save.rflags.value_())
        sources["rflags"] = here
        for name in SEGMENTS:
            area, where = (save01, there) if name in ("fs", "gs") else (save, here)
            seg = area.member_(name)
            values[name] = int(seg.selector.value_())
            sources[name] = where
            if name in ("fs", "gs"):
                values[f"{name}_base"] = int(seg.base.value_())
                sources[f"{name}_base"] = where
        if self._sev_es(vcpu):
            notes.append("SEV-ES guest: its registers are encrypted in the VMSA; KVM's "
                         "copies are not the guest's")

    def _sev_es(self, vcpu: VCpu) -> bool:
        """sev_es_guest(): to_kvm_svm(kvm)->sev_info.es_active (5.11+)."""
        try:
            t = self.mem.type("struct kvm_svm")
            kvm = self.mem.object("struct kvm_vcpu *", vcpu.addr).kvm.value_()
            ksvm = self.mem.object("struct kvm_svm *", kvm - drgn.offsetof(t, "kvm"))
            return bool(ksvm.sev_info.es_active.value_())
        except (LookupError, AttributeError, drgn.FaultError):
            return False

    def _read_vmx(self, vcpu: VCpu, lay: _VmxLayout, rflags_ok: bool, segs_ok: bool,
                  values: dict[str, int], sources: dict[str, str]) -> None:
        """vmx->rflags and vmx->segment_cache, where their regs_avail bits say valid."""
        vmx = self.mem.object("struct vcpu_vmx *", vcpu.addr - lay.vcpu_offset)
        if lay.rflags and rflags_ok:
            values["rflags"] = int(vmx.rflags.value_())
            sources["rflags"] = "vmx->rflags"
        if not (lay.segment_cache and segs_ok):
            return
        cache = vmx.segment_cache
        mask = int(cache.bitmask.value_())
        for i, name in enumerate(SEGMENTS):
            seg = cache.seg[i]
            if mask >> (i * SEG_FIELD_NR + SEG_FIELD_SEL) & 1:
                values[name] = int(seg.selector.value_())
                sources[name] = "vmx->segment_cache"
            if name in ("fs", "gs") and mask >> (i * SEG_FIELD_NR + SEG_FIELD_BASE) & 1:
                values[f"{name}_base"] = int(seg.base.value_())
                sources[f"{name}_base"] = "vmx->segment_cache"
