"""VM-exit codes and what they carry, drgn-free: the vendor's exit names, and
which exits name a guest address (and of which kind).

AMD (SVM, kvm_amd): the VMCB's control area holds the hardware's last
#VMEXIT: EXITCODE, EXITINFO1, EXITINFO2 and EXITINTINFO
(arch/x86/include/asm/svm.h, struct vmcb_control_area). The codes are
arch/x86/include/uapi/asm/svm.h's SVM_EXIT_* (SEV-ES's software-defined
SVM_VMGEXIT_* too). Two exits name an address:

* SVM_EXIT_NPF (0x400), a nested page fault (NPT on): EXITINFO2 is the
  faulting guest physical address, EXITINFO1 the #NPF error code (the #PF
  bits plus PFERR_GUEST_FINAL / PFERR_GUEST_PAGE, arch/x86/include/asm/kvm_host.h);
* SVM_EXIT_EXCP_BASE + PF_VECTOR (0x4e), an intercepted #PF (shadow paging,
  npt=0): EXITINFO2 is the faulting guest linear address (CR2), EXITINFO1 the
  #PF error code.

Intel (VMX, kvm_intel): the exit information lives in the VMCS, which a dump
cannot read (the CPU keeps its cache of the current VMCS, and its in-memory
layout is not architectural). What vmx.h caches in struct vcpu_vmx (struct
vcpu_vt from 6.16) is all kvminspect can show:

* exit_reason, union vmx_exit_reason (a u32 before 5.12): the basic reason
  in bits 15:0, modifiers above, failed_vmentry in bit 31; written after
  every VM-exit by vmx_vcpu_enter_exit() (0xdead when VMLAUNCH/VMRESUME
  itself failed, vmx->fail);
* exit_qualification and exit_intr_info (from 5.8), filled on first use and
  valid only while vcpu->arch.regs_avail has VCPU_EXREG_EXIT_INFO_1 /
  VCPU_EXREG_EXIT_INFO_2 set: vmx_vcpu_enter_exit() clears both bits
  (VMX_REGS_LAZY_LOAD_SET) at every VM-exit;
* idt_vectoring_info, read after every VM-exit that was not a failed entry.

The GPA of an EPT violation or misconfiguration is only in the VMCS
(vmcs_read64(GUEST_PHYSICAL_ADDRESS) in handle_ept_violation()), as is the
guest linear address the violation's GVA-valid bit speaks of: the address
of those exits is UNKNOWN. An intercepted #PF (EXCEPTION_NMI with a
hardware-exception #PF in exit_intr_info, ept=0) has the faulting linear
address in its exit qualification, when that was cached.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Vendor(Enum):
    """Which hardware virtualization the vendor module drives."""

    SVM = "svm"  # kvm_amd
    VMX = "vmx"  # kvm_intel


class AddressKind(Enum):
    """What the address of a last exit is."""

    GPA = "gpa"  # a guest physical address (SVM NPF)
    GVA = "gva"  # a guest linear address (an intercepted #PF)
    NONE = "none"  # the exit names no address
    UNKNOWN = "unknown"  # the exit names one, but memory does not hold it (the VMCS)


class Decoded(NamedTuple):
    """What an exit code and its information words say."""

    name: str | None  # the kernel's macro name without its prefix; None: unknown code
    address: int | None
    kind: AddressKind
    failed_vmentry: bool
    detail: tuple[str, ...]  # decoded bits of the exit's information words


# ---- SVM (arch/x86/include/uapi/asm/svm.h) -------------------------------------------------

SVM_EXIT_EXCP_BASE = 0x040
SVM_EXIT_LAST_EXCP = 0x05F
PF_VECTOR = 14
SVM_EXIT_INTR = 0x060
SVM_EXIT_HLT = 0x078
SVM_EXIT_IOIO = 0x07B
SVM_EXIT_MSR = 0x07C
SVM_EXIT_NPF = 0x400
SVM_EXIT_EXCP_PF = SVM_EXIT_EXCP_BASE + PF_VECTOR  # 0x4e
SVM_EXIT_ERR = (1 << 64) - 1  # -1 as the 64-bit EXITCODE
_U64 = (1 << 64) - 1

SVM_EXIT_NAMES: dict[int, str] = {
    0x000: "READ_CR0", 0x002: "READ_CR2", 0x003: "READ_CR3", 0x004: "READ_CR4",
    0x008: "READ_CR8", 0x010: "WRITE_CR0", 0x012: "WRITE_CR2", 0x013: "WRITE_CR3",
    0x014: "WRITE_CR4", 0x018: "WRITE_CR8",
    **{0x020 + i: f"READ_DR{i}" for i in range(8)},
    **{0x030 + i: f"WRITE_DR{i}" for i in range(8)},
    0x060: "INTR", 0x061: "NMI", 0x062: "SMI", 0x063: "INIT", 0x064: "VINTR",
    0x065: "CR0_SEL_WRITE", 0x066: "IDTR_READ", 0x067: "GDTR_READ", 0x068: "LDTR_READ",
    0x069: "TR_READ", 0x06A: "IDTR_WRITE", 0x06B: "GDTR_WRITE", 0x06C: "LDTR_WRITE",
    0x06D: "TR_WRITE", 0x06E: "RDTSC", 0x06F: "RDPMC", 0x070: "PUSHF", 0x071: "POPF",
    0x072: "CPUID", 0x073: "RSM", 0x074: "IRET", 0x075: "SWINT", 0x076: "INVD",
    0x077: "PAUSE", 0x078: "HLT", 0x079: "INVLPG", 0x07A: "INVLPGA", 0x07B: "IOIO",
    0x07C: "MSR", 0x07D: "TASK_SWITCH", 0x07E: "FERR_FREEZE", 0x07F: "SHUTDOWN",
    0x080: "VMRUN", 0x081: "VMMCALL", 0x082: "VMLOAD", 0x083: "VMSAVE", 0x084: "STGI",
    0x085: "CLGI", 0x086: "SKINIT", 0x087: "RDTSCP", 0x088: "ICEBP", 0x089: "WBINVD",
    0x08A: "MONITOR", 0x08B: "MWAIT", 0x08C: "MWAIT_COND", 0x08D: "XSETBV", 0x08E: "RDPRU",
    0x08F: "EFER_WRITE_TRAP",
    **{0x090 + i: f"CR{i}_WRITE_TRAP" for i in range(16)},
    0x0A2: "INVPCID", 0x0A5: "BUS_LOCK", 0x0A6: "IDLE_HLT",
    0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI", 0x402: "AVIC_UNACCELERATED_ACCESS",
    0x403: "VMGEXIT",
    # SEV-ES software-defined VMGEXIT events (SVM_VMGEXIT_*)
    0x80000001: "VMGEXIT_MMIO_READ", 0x80000002: "VMGEXIT_MMIO_WRITE",
    0x80000003: "VMGEXIT_NMI_COMPLETE", 0x80000004: "VMGEXIT_AP_HLT_LOOP",
    0x80000005: "VMGEXIT_AP_JUMP_TABLE", 0x80000010: "VMGEXIT_PSC",
    0x80000011: "VMGEXIT_GUEST_REQUEST", 0x80000012: "VMGEXIT_EXT_GUEST_REQUEST",
    0x80000013: "VMGEXIT_AP_CREATION", 0x8000FFFD: "VMGEXIT_HV_FEATURES",
    0x8000FFFE: "VMGEXIT_TERM_REQUEST", 0x8000FFFF: "VMGEXIT_UNSUPPORTED_EVENT",
    0xF0000000: "SW",  # SVM_EXIT_SW, reserved for hypervisor/software use
    SVM_EXIT_ERR: "ERR",  # VMEXIT_INVALID: VMRUN found invalid guest state
}
# the exception vectors of SVM_EXIT_EXCP_BASE + vector (the kernel's *_VECTOR names)
EXCEPTION_VECTORS = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM",
                     8: "DF", 10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF",
                     17: "AC", 18: "MC", 19: "XM"}

# #PF / #NPF error code bits (PFERR_*_BIT, arch/x86/include/asm/kvm_host.h)
PFERR_BITS = ((0, "present"), (1, "write"), (2, "user"), (3, "rsvd"), (4, "fetch"), (5, "pk"),
              (15, "sgx"), (31, "guest_rmp"), (32, "guest_final"), (33, "guest_page"),
              (34, "guest_enc"), (35, "guest_sizem"), (36, "guest_vmpl"))


def svm_exit_code(code: int, code_hi: int | None) -> int:
    """The 64-bit EXITCODE: exit_code_hi:exit_code, two u32 until "KVM: SVM: Treat
    exit_code as an unsigned 64-bit value through all of KVM" (7.0, d7507a94a072)
    made exit_code one u64 (*code_hi* None)."""
    if code_hi is None:
        return code & _U64
    return ((code_hi & 0xFFFFFFFF) << 32) | (code & 0xFFFFFFFF)


def svm_exit_name(code: int) -> str | None:
    """SVM_EXIT_* of a 64-bit exit code without its prefix ("NPF", "HLT",
    "EXCP_PF" for SVM_EXIT_EXCP_BASE + PF_VECTOR); None for a code not defined."""
    code &= _U64
    if SVM_EXIT_EXCP_BASE <= code <= SVM_EXIT_LAST_EXCP:
        vector = code - SVM_EXIT_EXCP_BASE
        return f"EXCP_{EXCEPTION_VECTORS.get(vector, str(vector))}"
    name = SVM_EXIT_NAMES.get(code)
    if name is None and code == 0xFFFFFFFF:
        # SVM_EXIT_ERR synthesized with exit_code_hi 0, as KVM did before "KVM: nSVM: Set
        # exit_code_hi to -1 when synthesizing SVM_EXIT_ERR (failed VMRUN)" (6.19,
        # f402ecd7a8b6)
        return "ERR"
    return name


def pf_error_names(error_code: int) -> tuple[str, ...]:
    """The set PFERR_* bits of a #PF or #NPF error code, lowest first."""
    return tuple(name for bit, name in PFERR_BITS if error_code >> bit & 1)


def _ioio_detail(info1: int) -> tuple[str, ...]:
    """EXITINFO1 of SVM_EXIT_IOIO: direction, port, size, string/rep (APM vol. 2, IOIO)."""
    out = ["in" if info1 & 1 else "out", f"port {info1 >> 16 & 0xFFFF:#x}"]
    size = next((n for bit, n in ((4, 1), (5, 2), (6, 4)) if info1 >> bit & 1), None)
    if size:
        out.append(f"size {size}")
    out += [w for bit, w in ((2, "string"), (3, "rep")) if info1 >> bit & 1]
    return tuple(out)


def decode_svm(code: int, info1: int, info2: int) -> Decoded:
    """An SVM exit: its name, and the address NPF (GPA) and an intercepted #PF (GVA) carry."""
    code &= _U64
    name = svm_exit_name(code)
    if code == SVM_EXIT_NPF:
        return Decoded(name, info2 & _U64, AddressKind.GPA, False, pf_error_names(info1))
    if code == SVM_EXIT_EXCP_PF:
        return Decoded(name, info2 & _U64, AddressKind.GVA, False, pf_error_names(info1))
    detail: tuple[str, ...] = ()
    if code == SVM_EXIT_IOIO:
        detail = _ioio_detail(info1)
    elif code == SVM_EXIT_MSR:
        detail = ("wrmsr" if info1 & 1 else "rdmsr",)
    return Decoded(name, None, AddressKind.NONE, name == "ERR", detail)


# ---- VMX (arch/x86/include/uapi/asm/vmx.h, arch/x86/include/asm/vmx.h) ---------------------

EXIT_REASON_EXCEPTION_NMI = 0
EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49
VMX_EXIT_REASONS_FAILED_VMENTRY = 0x80000000
VMX_FAIL = 0xDEAD  # vmx->exit_reason.full when VMLAUNCH/VMRESUME failed (vmx->fail)

VMX_EXIT_NAMES: dict[int, str] = {
    0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 2: "TRIPLE_FAULT", 3: "INIT_SIGNAL",
    7: "INTERRUPT_WINDOW", 8: "NMI_WINDOW", 9: "TASK_SWITCH", 10: "CPUID", 12: "HLT",
    13: "INVD", 14: "INVLPG", 15: "RDPMC", 16: "RDTSC", 18: "VMCALL", 19: "VMCLEAR",
    20: "VMLAUNCH", 21: "VMPTRLD", 22: "VMPTRST", 23: "VMREAD", 24: "VMRESUME",
    25: "VMWRITE", 26: "VMOFF", 27: "VMON", 28: "CR_ACCESS", 29: "DR_ACCESS",
    30: "IO_INSTRUCTION", 31: "MSR_READ", 32: "MSR_WRITE", 33: "INVALID_STATE",
    34: "MSR_LOAD_FAIL", 36: "MWAIT_INSTRUCTION", 37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION", 40: "PAUSE_INSTRUCTION", 41: "MCE_DURING_VMENTRY",
    43: "TPR_BELOW_THRESHOLD", 44: "APIC_ACCESS", 45: "EOI_INDUCED", 46: "GDTR_IDTR",
    47: "LDTR_TR", 48: "EPT_VIOLATION", 49: "EPT_MISCONFIG", 50: "INVEPT", 51: "RDTSCP",
    52: "PREEMPTION_TIMER", 53: "INVVPID", 54: "WBINVD", 55: "XSETBV", 56: "APIC_WRITE",
    57: "RDRAND", 58: "INVPCID", 59: "VMFUNC", 60: "ENCLS", 61: "RDSEED", 62: "PML_FULL",
    63: "XSAVES", 64: "XRSTORS", 67: "UMWAIT", 68: "TPAUSE", 74: "BUS_LOCK", 75: "NOTIFY",
    76: "SEAMCALL", 77: "TDCALL", 84: "MSR_READ_IMM", 85: "MSR_WRITE_IMM",
}
# union vmx_exit_reason's single-bit modifiers above the 16-bit basic reason
VMX_REASON_FLAGS = ((26, "bus_lock_detected"), (27, "enclave_mode"), (28, "smi_pending_mtf"),
                    (29, "smi_from_vmx_root"), (31, "failed_vmentry"))
# EPT violation exit qualification (EPT_VIOLATION_*_BIT, arch/x86/include/asm/vmx.h)
EPT_VIOLATION_BITS = ((0, "read"), (1, "write"), (2, "fetch"), (3, "readable"),
                      (4, "writable"), (5, "executable"), (7, "gva_valid"),
                      (8, "gva_translated"))
# interruption information (VM-exit interruption info, IDT-vectoring info, EXITINTINFO)
INTR_INFO_VALID = 1 << 31
INTR_INFO_DELIVER_CODE = 1 << 11
INTR_TYPE_HARD_EXCEPTION = 3
INTR_TYPES = {0: "external interrupt", 2: "NMI", 3: "hardware exception",
              4: "software interrupt", 5: "privileged software exception",
              6: "software exception", 7: "other event"}


class VmxReason(NamedTuple):
    """union vmx_exit_reason."""

    full: int
    basic: int  # bits 15:0
    failed_vmentry: bool  # bit 31
    flags: tuple[str, ...]  # the modifier bits set, failed_vmentry included


def vmx_reason(full: int) -> VmxReason:
    """Split vmx->exit_reason.full into the basic reason and its modifier bits."""
    full &= 0xFFFFFFFF
    flags = tuple(name for bit, name in VMX_REASON_FLAGS if full >> bit & 1)
    return VmxReason(full, full & 0xFFFF, bool(full & VMX_EXIT_REASONS_FAILED_VMENTRY), flags)


def vmx_exit_name(basic: int) -> str | None:
    """EXIT_REASON_* of a basic exit reason without its prefix; None if not defined."""
    return VMX_EXIT_NAMES.get(basic)


class EptViolation(NamedTuple):
    """The exit qualification of an EPT violation, bit by bit."""

    read: bool  # the access was a data read
    write: bool  # a data write
    fetch: bool  # an instruction fetch
    readable: bool  # the EPT entry allowed reads
    writable: bool
    executable: bool
    gva_valid: bool  # the guest linear address field (VMCS) is valid
    gva_translated: bool  # the access was to the translation of that address

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in self._fields if getattr(self, n))


def ept_violation(qualification: int) -> EptViolation:
    """Decode an EPT violation's exit qualification."""
    return EptViolation(*(bool(qualification >> bit & 1) for bit, _ in EPT_VIOLATION_BITS))


class IntrInfo(NamedTuple):
    """An interruption-information word (VMX exit_intr_info / idt_vectoring_info,
    SVM EXITINTINFO share its layout)."""

    valid: bool  # bit 31
    vector: int  # bits 7:0
    type: int  # bits 10:8
    error_code: bool  # bit 11: an error code was delivered

    @property
    def type_name(self) -> str:
        return INTR_TYPES.get(self.type, f"type {self.type}")


def intr_info(word: int) -> IntrInfo:
    """Decode an interruption-information word."""
    return IntrInfo(bool(word & INTR_INFO_VALID), word & 0xFF, word >> 8 & 7,
                    bool(word & INTR_INFO_DELIVER_CODE))


def decode_vmx(full: int, qualification: int | None, exit_intr: int | None) -> Decoded:
    """A VMX exit from what struct vcpu_vmx caches: the reason, and where cached the
    exit qualification and exit interruption information (None: not valid for
    this exit). The GPA of an EPT violation/misconfig is only in the VMCS: UNKNOWN."""
    if full & 0xFFFFFFFF == VMX_FAIL:
        return Decoded("VMFAIL", None, AddressKind.NONE, True, ("vmx->fail",))
    r = vmx_reason(full)
    name = vmx_exit_name(r.basic)
    detail = tuple(f for f in r.flags if f != "failed_vmentry")
    if r.basic == EXIT_REASON_EPT_VIOLATION:
        bits = ept_violation(qualification).names() if qualification is not None else ()
        return Decoded(name, None, AddressKind.UNKNOWN, r.failed_vmentry, detail + bits)
    if r.basic == EXIT_REASON_EPT_MISCONFIG:
        return Decoded(name, None, AddressKind.UNKNOWN, r.failed_vmentry, detail)
    if r.basic == EXIT_REASON_EXCEPTION_NMI and exit_intr is not None:
        info = intr_info(exit_intr)
        if info.valid and info.type == INTR_TYPE_HARD_EXCEPTION and info.vector == PF_VECTOR:
            # the exit qualification of a #PF is the faulting linear address
            if qualification is None:
                return Decoded(name, None, AddressKind.UNKNOWN, r.failed_vmentry,
                               detail + ("#PF",))
            return Decoded(name, qualification, AddressKind.GVA, r.failed_vmentry,
                           detail + ("#PF",))
        if info.valid:
            vec = EXCEPTION_VECTORS.get(info.vector, str(info.vector))
            detail += (f"{info.type_name} {vec}" if info.type == INTR_TYPE_HARD_EXCEPTION
                       else f"{info.type_name} {info.vector}",)
    return Decoded(name, None, AddressKind.NONE, r.failed_vmentry, detail)
