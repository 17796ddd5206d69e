"""Each vCPU's last VM-exit (kvminspect.read_exits, kvminspect.exits).

The fixtures are AMD hosts (kvm_amd under TCG): the exit is read from the
current VMCB's control area. truth.json does not record the vCPUs' exits
(the VMM keeps a KVM_RUN exit reason only for an unexpected exit, and then
the fixture is not made), so the fixture tests assert what the guest program
makes plausible: a halted vCPU (its final HLT, blocked in KVM_RUN with the
in-kernel irqchip) last exited on SVM_EXIT_HLT; a busy vCPU (a PAUSE loop)
on a host interrupt; the exit is stale exactly when the vCPU is in guest
mode. No fixture's last exit is a page fault, so the NPF (GPA) and #PF (GVA)
decoding is tested with synthetic values, as is every VMX decoding (TCG has
no VMX: no Intel dump is read, only what kvm-intel's vmx.h says it caches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvminspect.exits import (
    AddressKind,
    Vendor,
    decode_svm,
    decode_vmx,
    ept_violation,
    intr_info,
    pf_error_names,
    svm_exit_code,
    svm_exit_name,
    vmx_exit_name,
    vmx_reason,
)
from kvminspect.layout import MissingType
from kvminspect.objects import LastExit
from kvminspect.read_exits import IN_GUEST
from kvminspect.target import open_core
from tests.conftest import ALL, VMCORES, open_fixture, run_main, truth
from tests.test_schema import validate

KVM_FIXTURES = [n for n in ALL if not truth(n).get("special")]


def kernel(name: str):
    return open_fixture(name).kernel


# ---- the fixtures (AMD) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", KVM_FIXTURES)
def test_every_vcpu_last_exit_decodes(name: str) -> None:
    k = kernel(name)
    t = truth(name)
    assert k.exits.warnings() == ()  # kvm-amd.ko's debug info is there
    rel = t["kernel_release"]
    for vm in k.vms():
        busy = any(v.get("busy") for v in t.get("vms", [t]))
        for v in k.vcpus(vm):
            e = k.last_exit(v)
            assert isinstance(e, LastExit), (name, v.vcpu_id)
            assert e.vendor is Vendor.SVM and e.name is not None
            # svm->vmcb01 from 5.13: the current VMCB is vmcb01 (no nested guest)
            assert e.source == ("svm->vmcb" if rel.startswith("5.10") else "svm->vmcb (vmcb01)")
            assert not e.nested and not e.failed_vmentry
            assert e.stale is (v.mode in IN_GUEST)
            assert e.exits is not None and e.exits > 0
            if truth(name).get("vmm") == "qemu":  # a Linux guest: any exit, decoded
                assert e.address_kind in (AddressKind.NONE, AddressKind.GVA), e
                assert (e.address is None) == (e.address_kind is AddressKind.NONE), e
            elif v.mp_state == "HALTED":
                assert e.name == "HLT", (name, v.vcpu_id, e)
                assert e.address is None and e.address_kind is AddressKind.NONE
                assert (e.info1, e.info2, e.int_info) == (0, 0, 0)
            else:  # the busy guest spins on PAUSE; a host interrupt takes it out
                assert busy and v.mp_state == "RUNNABLE"
                assert e.name == "INTR" and e.address_kind is AddressKind.NONE
            # a fault address must be plausible (no fixture has one: see the synthetic tests)
            if e.address_kind is AddressKind.GPA:
                assert any(s.base_gfn <= e.address >> 12 < s.base_gfn + s.npages
                           for s in vm.memslots)
            elif e.address_kind is AddressKind.GVA:
                assert e.address is not None and e.address < 1 << 47


def test_busy_vcpus_in_guest_mode_are_stale() -> None:
    """6.1-shadow-busy: two vCPUs were in guest mode at the dump (their VMCB holds
    the exit before the current run), two were out of it."""
    k = kernel("6.1-shadow-busy")
    vcpus = k.vcpus(k.vms()[0])
    stale = [k.last_exit(v).stale for v in vcpus]
    assert stale.count(True) == 2 and stale.count(False) == 2
    assert [v.mode == "IN_GUEST_MODE" for v in vcpus] == stale


@pytest.mark.parametrize("name", ["5.10-shadow", "6.1-shadow", "6.12-shadow", "7.3-shadow"])
def test_svm_layout_per_release(name: str) -> None:
    """exit_code_hi to 6.19, one u64 exit_code from 7.0; vmcb01 from 5.13."""
    k = kernel(name)
    k.exits.warnings()
    lay = k.exits._svm
    assert lay is not None and lay.vcpu_offset == 0
    assert lay.code_hi == (not name.startswith("7.3"))
    assert lay.vmcb01 == (not name.startswith("5.10"))


def _without_vendor_debug(tmp_path: Path, name: str = "6.1-tdp") -> Path:
    """A copy of fixture *name* (symlinks) without kvm-amd.ko's debug file."""
    d = tmp_path / name
    d.mkdir()
    for f in (VMCORES / name).iterdir():
        if not f.name.startswith("kvm-amd.ko"):
            (d / f.name).symlink_to(f.resolve())
    return d


def test_missing_vendor_debug_info_is_a_warning(tmp_path: Path, capsys) -> None:
    """Without kvm-amd.ko's debug file, struct vcpu_svm is unknown: a named warning
    (stderr and JSON "warnings", as a missing member's), no error, and no exits."""
    d = _without_vendor_debug(tmp_path)
    release = truth("6.1-tdp")["kernel_release"]
    text = (f"struct vcpu_svm is not in the debug info of kernel {release} (no matching "
            "kvm-amd.ko for kvm_amd; give it with -s): vCPU last exits (exit reasons) shown "
            "as unknown")
    status, out, err = run_main(["-c", str(d), "vms"], capsys)
    assert status == 0 and out.strip()
    assert err.strip() == f"kvminspect: warning: {text}"
    status, out, err = run_main(["-c", str(d), "vcpus", "--json"], capsys)
    assert status == 0, err
    doc = json.loads(out)
    validate(doc)
    assert doc["errors"] == []
    assert doc["warnings"] == [{"member": "struct vcpu_svm", "kernel": release, "warning": text}]

    k = open_core(str(d), []).kernel
    assert k.missing == (MissingType("struct vcpu_svm", "kvm_amd", "kvm-amd.ko", release,
                                     "vCPU last exits (exit reasons) shown as unknown"),)
    vm = k.vms()[0]
    assert [k.last_exit(v) for v in k.vcpus(vm)] == [None] * len(truth("6.1-tdp")["vcpus"])
    assert list(k.problems.of([vm.addr])) == []


# ---- SVM decoding (synthetic) -----------------------------------------------------------------

def test_svm_exit_code_halves() -> None:
    assert svm_exit_code(0x400, 0) == 0x400
    assert svm_exit_code(0xFFFFFFFF, 0xFFFFFFFF) == (1 << 64) - 1  # SVM_EXIT_ERR
    assert svm_exit_code(0x78, None) == 0x78  # 7.0+: one u64
    assert svm_exit_code(-1, None) == (1 << 64) - 1


@pytest.mark.parametrize("code, name", [
    (0x78, "HLT"), (0x400, "NPF"), (0x4E, "EXCP_PF"), (0x7B, "IOIO"), (0x7C, "MSR"),
    (0x64, "VINTR"), (0x60, "INTR"), (0x61, "NMI"), (0x81, "VMMCALL"), (0x72, "CPUID"),
    (0x77, "PAUSE"), (0x46, "EXCP_UD"), (0x4D, "EXCP_GP"), (0x403, "VMGEXIT"),
    (0x80000001, "VMGEXIT_MMIO_READ"), ((1 << 64) - 1, "ERR"), (0xFFFFFFFF, "ERR"),
    (0x5F, "EXCP_31"), (0x3FF, None), (0x1_0000_0078, None),
])
def test_svm_exit_names(code: int, name: str | None) -> None:
    assert svm_exit_name(code) == name


def test_svm_npf_carries_the_gpa() -> None:
    err = 1 | 2 | 1 << 32  # present, write, PFERR_GUEST_FINAL
    d = decode_svm(0x400, err, 0x1_2345_6000)
    assert (d.name, d.address, d.kind) == ("NPF", 0x1_2345_6000, AddressKind.GPA)
    assert d.detail == ("present", "write", "guest_final")
    walk = decode_svm(0x400, 1 << 33 | 4, 0x3000).detail  # a fault walking the guest's tables
    assert walk == ("user", "guest_page")


def test_svm_intercepted_pf_carries_the_gva() -> None:
    d = decode_svm(0x4E, 2 | 4 | 16, 0x7F12_3456_7000)
    assert (d.name, d.address, d.kind) == ("EXCP_PF", 0x7F12_3456_7000, AddressKind.GVA)
    assert d.detail == ("write", "user", "fetch")


def test_svm_other_exits_carry_no_address() -> None:
    for code in (0x78, 0x60, 0x72, 0x81):
        d = decode_svm(code, 0x1234, 0x5678)
        assert d.address is None and d.kind is AddressKind.NONE and not d.failed_vmentry
    io = decode_svm(0x7B, 0x10 << 16 | 1 << 6, 0)  # OUT to port 0x10, 4 bytes
    assert io.detail == ("out", "port 0x10", "size 4")
    assert decode_svm(0x7B, 0x3F8 << 16 | 1 << 4 | 1 | 1 << 2 | 1 << 3, 0).detail == (
        "in", "port 0x3f8", "size 1", "string", "rep")
    assert decode_svm(0x7C, 1, 0).detail == ("wrmsr",)
    assert decode_svm(0x7C, 0, 0).detail == ("rdmsr",)
    assert decode_svm((1 << 64) - 1, 0, 0).failed_vmentry


def test_pf_error_bits() -> None:
    assert pf_error_names(0) == ()
    assert pf_error_names(1 | 8 | 32 | 1 << 15) == ("present", "rsvd", "pk", "sgx")


def test_last_exit_gfn() -> None:
    e = LastExit(Vendor.SVM, 0x400, "NPF", 0, 0x12345678, 0, 0x12345678, AddressKind.GPA,
                 False, "svm->vmcb (vmcb01)")
    assert e.gfn == 0x12345
    assert LastExit(Vendor.SVM, 0x4E, "EXCP_PF", 0, 0x1000, 0, 0x1000, AddressKind.GVA,
                    False, "svm->vmcb").gfn is None


# ---- VMX decoding (synthetic: what vcpu_vmx caches) -------------------------------------------

@pytest.mark.parametrize("basic, name", [
    (0, "EXCEPTION_NMI"), (1, "EXTERNAL_INTERRUPT"), (7, "INTERRUPT_WINDOW"), (10, "CPUID"),
    (12, "HLT"), (18, "VMCALL"), (28, "CR_ACCESS"), (30, "IO_INSTRUCTION"), (31, "MSR_READ"),
    (32, "MSR_WRITE"), (33, "INVALID_STATE"), (40, "PAUSE_INSTRUCTION"), (48, "EPT_VIOLATION"),
    (49, "EPT_MISCONFIG"), (52, "PREEMPTION_TIMER"), (62, "PML_FULL"), (74, "BUS_LOCK"),
    (75, "NOTIFY"), (77, "TDCALL"), (5, None), (99, None),
])
def test_vmx_basic_reason_names(basic: int, name: str | None) -> None:
    assert vmx_exit_name(basic) == name


def test_vmx_reason_bits() -> None:
    r = vmx_reason(0x80000021)  # a failed VM-entry: invalid guest state
    assert (r.basic, r.failed_vmentry, r.flags) == (33, True, ("failed_vmentry",))
    assert vmx_reason(48) == (48, 48, False, ())
    assert vmx_reason(1 << 27 | 12).flags == ("enclave_mode",)
    assert vmx_reason(1 << 26 | 1 << 28 | 1 << 29 | 30).flags == (
        "bus_lock_detected", "smi_pending_mtf", "smi_from_vmx_root")
    d = decode_vmx(0x80000021, None, None)
    assert d.name == "INVALID_STATE" and d.failed_vmentry and d.detail == ()
    fail = decode_vmx(0xDEAD, None, None)  # vmx->fail: VMLAUNCH/VMRESUME itself failed
    assert fail.name == "VMFAIL" and fail.failed_vmentry


@pytest.mark.parametrize("bit, field", [
    (0, "read"), (1, "write"), (2, "fetch"), (3, "readable"), (4, "writable"),
    (5, "executable"), (7, "gva_valid"), (8, "gva_translated"),
])
def test_ept_violation_bits(bit: int, field: str) -> None:
    q = ept_violation(1 << bit)
    assert q.names() == (field,) and getattr(q, field)
    assert ept_violation(0).names() == () and ept_violation(1 << 6 | 1 << 12).names() == ()


def test_ept_violation_has_no_gpa_in_memory() -> None:
    """The GPA is vmcs_read64(GUEST_PHYSICAL_ADDRESS): unknown; the qualification's
    bits are decoded when it was cached, omitted when not."""
    d = decode_vmx(48, 1 << 1 | 1 << 7 | 1 << 8, None)
    assert (d.name, d.address, d.kind) == ("EPT_VIOLATION", None, AddressKind.UNKNOWN)
    assert d.detail == ("write", "gva_valid", "gva_translated")
    fetch = decode_vmx(48, 1 << 2 | 1 << 3 | 1 << 4, None).detail
    assert fetch == ("fetch", "readable", "writable")
    assert decode_vmx(48, None, None).detail == ()
    assert decode_vmx(49, None, None).kind is AddressKind.UNKNOWN


def test_vmx_intercepted_pf_carries_the_gva() -> None:
    pf = 1 << 31 | 1 << 11 | 3 << 8 | 14  # valid, error code, hardware exception, #PF
    assert intr_info(pf) == (True, 14, 3, True)
    d = decode_vmx(0, 0x7F00_DEAD_B000, pf)
    assert (d.name, d.address, d.kind) == ("EXCEPTION_NMI", 0x7F00_DEAD_B000, AddressKind.GVA)
    assert d.detail == ("#PF",)
    assert decode_vmx(0, None, pf).kind is AddressKind.UNKNOWN  # qualification not cached
    ud = decode_vmx(0, 0, 1 << 31 | 3 << 8 | 6)
    assert ud.kind is AddressKind.NONE and ud.detail == ("hardware exception UD",)
    nmi = decode_vmx(0, None, 1 << 31 | 2 << 8 | 2)
    assert nmi.detail == ("NMI 2",) and nmi.kind is AddressKind.NONE
    assert decode_vmx(0, None, None).kind is AddressKind.NONE  # intr info not cached
    assert decode_vmx(12, None, None) == ("HLT", None, AddressKind.NONE, False, ())
