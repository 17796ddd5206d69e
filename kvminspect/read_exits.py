"""A vCPU's last VM-exit, where the vendor module keeps it in memory.

Exits is the model's part for the vendor half of a vCPU: to_svm(vcpu) /
to_vmx(vcpu), container_of(vcpu, struct vcpu_svm / struct vcpu_vmx, vcpu),
typed by kvm-amd.ko's / kvm-intel.ko's DWARF. kvminspect.exits decodes what
is read (the names, which exits carry an address, and why the VMX GPA is
unknown). Without the vendor module's debug info the exit reasons are lost:
warnings() names the missing type (a MissingType, shown with the missing
members), and last_exit() answers None.
"""

from __future__ import annotations

from typing import NamedTuple

import drgn

from kvminspect.exits import Vendor, decode_svm, decode_vmx, svm_exit_code
from kvminspect.layout import (
    Missing,
    MissingMember,
    MissingType,
    bare_type,
    has_member,
    kernel_release,
    known,
)
from kvminspect.memory import Memory
from kvminspect.objects import LastExit, VCpu
from kvminspect.read_vms import Vms

IN_GUEST = ("IN_GUEST_MODE", "EXITING_GUEST_MODE")  # vcpu->mode: still (or just) in the guest
EFFECT = "vCPU last exits (exit reasons) shown as unknown"
KVM_X86_TDX_VM = 5  # kvm->arch.vm_type (arch/x86/include/uapi/asm/kvm.h)


class SvmLayout(NamedTuple):
    """What kvm-amd.ko's DWARF says about struct vcpu_svm and the VMCB."""

    vcpu_offset: int  # offsetof(struct vcpu_svm, vcpu)
    vmcb01: bool  # svm->vmcb01: svm->vmcb may be vmcb02 (L2)
    code_hi: bool  # control.exit_code_hi beside a u32 exit_code


class VmxLayout(NamedTuple):
    """What kvm-intel.ko's DWARF says about struct vcpu_vmx (never read from a dump
    in kvminspect's tests: no fixture has kvm_intel; kvminspect.exits is tested)."""

    vcpu_offset: int  # offsetof(struct vcpu_vmx, vcpu)
    vt: bool  # the exit fields are in vmx->vt (struct vcpu_vt)
    union: bool  # exit_reason is union vmx_exit_reason (.full), not a u32
    cached: bool  # exit_qualification / exit_intr_info are cached
    idt: bool  # vmx->idt_vectoring_info
    info1_bit: int | None  # VCPU_EXREG_EXIT_INFO_1 in vcpu->arch.regs_avail
    info2_bit: int | None  # VCPU_EXREG_EXIT_INFO_2


class Exits:
    """The last VM-exit of each vCPU, read through *mem*; *vms* says which vendor
    module is loaded. Owns the vendor layout, probed once (nothing read is cached:
    an exit is read anew at each call, as a live vCPU moves on)."""

    def __init__(self, mem: Memory, vms: Vms) -> None:
        self.mem = mem
        self.vms = vms
        self._probed = False
        self._svm: SvmLayout | None = None
        self._vmx: VmxLayout | None = None
        self._warnings: tuple[Missing, ...] = ()

    def reset(self) -> None:
        """Nothing to forget: the layout is the kernel's, every exit is read anew."""

    def warnings(self) -> tuple[Missing, ...]:
        """The vendor type or members this kernel's debug info lacks (probed once)."""
        self._probe()
        return self._warnings

    def last_exit(self, vcpu: VCpu) -> LastExit | None:
        """*vcpu*'s last VM-exit; None when the vendor module's debug info lacks it
        (a warning says so) or it cannot be read (a problem says why)."""
        self._probe()
        try:
            if self._svm is not None:
                return self._read_svm(vcpu, self._svm)
            if self._vmx is not None:
                return self._read_vmx(vcpu, self._vmx)
        except (drgn.FaultError, LookupError, AttributeError) as e:
            self.mem.problem("struct kvm_vcpu", vcpu.addr, f"last exit unreadable ({e})")
        return None

    # probing

    def _probe(self) -> None:
        if self._probed:
            return
        self._probed = True
        vendor = self.vms.vendor()
        if vendor is None:
            return
        release = kernel_release(self.mem.prog)
        warnings: list[Missing] = []
        if vendor == "kvm_amd":
            self._svm = self._probe_svm(release, warnings)
        elif vendor == "kvm_intel":
            self._vmx = self._probe_vmx(release, warnings)
        self._warnings = tuple(warnings)

    def _type(self, name: str, module: str, debug_file: str, release: str,
              warnings: list[Missing]) -> drgn.Type | None:
        try:
            return self.mem.type(name)
        except LookupError:
            warnings.append(MissingType(name, module, debug_file, release, EFFECT))
            return None

    @staticmethod
    def _lacks(t: drgn.Type, struct: str, members: tuple[str, ...], release: str,
               warnings: list[Missing]) -> bool:
        """Whether *t* lacks any of *members* (each one a MissingMember)."""
        gone = [m for m in members if not has_member(t, m)]
        warnings.extend(MissingMember(struct, m, release, EFFECT) for m in gone)
        return bool(gone)

    def _probe_svm(self, release: str, warnings: list[Missing]) -> SvmLayout | None:
        """struct vcpu_svm (arch/x86/kvm/svm/svm.h) and struct vmcb_control_area."""
        t = self._type("struct vcpu_svm", "kvm_amd", "kvm-amd.ko", release, warnings)
        if t is None or self._lacks(t, "struct vcpu_svm", ("vcpu", "vmcb"), release, warnings):
            return None
        control = bare_type(bare_type(bare_type(t.member("vmcb").type).type)
                            .member("control").type)
        if self._lacks(control, "struct vmcb_control_area",
                       ("exit_code", "exit_info_1", "exit_info_2", "exit_int_info"),
                       release, warnings):
            return None
        return SvmLayout(
            vcpu_offset=drgn.offsetof(t, "vcpu"),
            # "KVM: SVM: Use a separate vmcb for the nested L2 guest" (5.13, 4995a3685f1b)
            vmcb01=has_member(t, "vmcb01"),
            # "KVM: SVM: Treat exit_code as an unsigned 64-bit value through all of KVM"
            # (7.0, d7507a94a072) dropped exit_code_hi
            code_hi=has_member(control, "exit_code_hi"),
        )

    def _probe_vmx(self, release: str, warnings: list[Missing]) -> VmxLayout | None:
        """struct vcpu_vmx (arch/x86/kvm/vmx/vmx.h) and, from 6.16, struct vcpu_vt
        (arch/x86/kvm/vmx/common.h)."""
        t = self._type("struct vcpu_vmx", "kvm_intel", "kvm-intel.ko", release, warnings)
        if t is None or self._lacks(t, "struct vcpu_vmx", ("vcpu",), release, warnings):
            return None
        # "KVM: VMX: Move common fields of struct vcpu_{vmx,tdx} to a struct" (6.16,
        # 7172c753c26a): exit_reason, exit_qualification, exit_intr_info in vmx->vt
        vt = has_member(t, "vt")
        base = bare_type(t.member("vt").type) if vt else t
        where = "struct vcpu_vt" if vt else "struct vcpu_vmx"
        if self._lacks(base, where, ("exit_reason",), release, warnings):
            return None
        bits = self._reg_bits()
        return VmxLayout(
            vcpu_offset=drgn.offsetof(t, "vcpu"),
            vt=vt,
            # "KVM: VMX: Convert vcpu_vmx.exit_reason to a union" (5.12, 8e5332402164)
            union=has_member(bare_type(base.member("exit_reason").type), "full"),
            # "KVM: VMX: Cache vmcs.EXIT_QUALIFICATION using arch avail_reg flags" (5.8,
            # 5addc235199f), "KVM: VMX: Cache vmcs.EXIT_INTR_INFO using arch avail_reg
            # flags" (5.8, 8791585837f6)
            cached=has_member(base, "exit_qualification") and has_member(base, "exit_intr_info")
            and None not in bits,
            idt=has_member(t, "idt_vectoring_info"),
            info1_bit=bits[0],
            info2_bit=bits[1],
        )

    def _reg_bits(self) -> tuple[int | None, int | None]:
        """VCPU_EXREG_EXIT_INFO_1 and _2 of enum kvm_reg (kvm.ko's DWARF): the
        vcpu->arch.regs_avail bits that say the cached exit fields are valid."""
        try:
            enum = {e.name: e.value for e in self.mem.type("enum kvm_reg").enumerators or ()}
        except LookupError:
            return None, None

        def bit(i: int) -> int | None:
            # VCPU_REG_*: "KVM: x86: Drop the "EX" part of "EXREG" to avoid collision
            # with APX" (posted 2026; its release not confirmed)
            for name in (f"VCPU_EXREG_EXIT_INFO_{i}", f"VCPU_REG_EXIT_INFO_{i}"):
                if name in enum:
                    return int(enum[name])
            return None

        return bit(1), bit(2)

    # reading

    @staticmethod
    def _stale(vcpu: VCpu) -> bool | None:
        return vcpu.mode in IN_GUEST if known(vcpu.mode) else None

    def _read_svm(self, vcpu: VCpu, lay: SvmLayout) -> LastExit | None:
        """svm->vmcb->control: the hardware's last #VMEXIT of the current VMCB."""
        svm = self.mem.object("struct vcpu_svm *", vcpu.addr - lay.vcpu_offset)
        vmcb = svm.vmcb
        ptr = vmcb.value_()
        if not ptr:
            self.mem.problem("struct vcpu_svm", svm.value_(), "svm->vmcb is NULL")
            return None
        nested = lay.vmcb01 and ptr != svm.vmcb01.ptr.value_()
        c = vmcb.control
        code = svm_exit_code(c.exit_code.value_(),
                             c.exit_code_hi.value_() if lay.code_hi else None)
        info1, info2 = c.exit_info_1.value_(), c.exit_info_2.value_()
        d = decode_svm(code, info1, info2)
        which = "" if not lay.vmcb01 else " (vmcb02)" if nested else " (vmcb01)"
        return LastExit(Vendor.SVM, code, d.name, info1, info2, c.exit_int_info.value_(),
                        d.address, d.kind, self._stale(vcpu), f"svm->vmcb{which}",
                        nested=nested, failed_vmentry=d.failed_vmentry, detail=d.detail,
                        exits=vcpu.stat.get("exits"))

    def _read_vmx(self, vcpu: VCpu, lay: VmxLayout) -> LastExit | None:
        """What struct vcpu_vmx caches of the last VM-exit (kvminspect.exits)."""
        vmx = self.mem.object("struct vcpu_vmx *", vcpu.addr - lay.vcpu_offset)
        base = vmx.vt if lay.vt else vmx
        reason = base.exit_reason
        full = (reason.full if lay.union else reason).value_()
        qual = intr = None
        if lay.cached:
            avail = self.mem.object("struct kvm_vcpu *", vcpu.addr).arch.regs_avail
            if bare_type(avail.type_).kind == drgn.TypeKind.ARRAY:
                avail = avail[0]
            bits = avail.value_()
            if lay.info1_bit is not None and bits >> lay.info1_bit & 1:
                qual = base.exit_qualification.value_()
            if lay.info2_bit is not None and bits >> lay.info2_bit & 1:
                intr = base.exit_intr_info.value_()
        idt = None
        if lay.idt and not self._is_td(vcpu):  # a TD's vCPU is a struct vcpu_tdx past vt
            idt = vmx.idt_vectoring_info.value_()
        d = decode_vmx(full, qual, intr)
        return LastExit(Vendor.VMX, full, d.name, qual, intr, idt, d.address, d.kind,
                        self._stale(vcpu), "vmx->vt" if lay.vt else "vmx",
                        failed_vmentry=d.failed_vmentry, detail=d.detail,
                        exits=vcpu.stat.get("exits"))

    def _is_td(self, vcpu: VCpu) -> bool:
        """Whether *vcpu*'s VM is a TDX VM (kvm->arch.vm_type): struct vcpu_tdx shares
        only struct vcpu_vt with struct vcpu_vmx (main.c's static_assert on its offset)."""
        arch = self.mem.object("struct kvm_vcpu *", vcpu.addr).kvm.arch
        return has_member(arch.type_, "vm_type") and arch.vm_type.value_() == KVM_X86_TDX_VM
