"""Names of vcpu->requests bits (KVM_REQ_*), one table per kernel release family.

KVM_REQ_* are preprocessor macros: the DWARF has no trace of them, so unlike
every other layout decision in kvminspect (probed from the DWARF, see
kvminspect.layout) the table is chosen by the kernel's UTS release,
major.minor. Bits 0-7 are generic (include/linux/kvm_host.h); from
KVM_REQUEST_ARCH_BASE (8) on they are x86's KVM_ARCH_REQ(n)
(arch/x86/include/asm/kvm_host.h), bit 8 + n. A release without a table
shows its set bits as raw numbers; so does a bit a table does not name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCH_BASE = 8  # KVM_REQUEST_ARCH_BASE

# x86 KVM_ARCH_REQ(0..) shared by every release here, in bit order from 8
_X86_COMMON = (
    "MIGRATE_TIMER", "REPORT_TPR_ACCESS", "TRIPLE_FAULT", "MMU_SYNC", "CLOCK_UPDATE",
    "LOAD_MMU_PGD", "EVENT", "APF_HALT", "STEAL_UPDATE", "NMI", "PMU", "PMI", "SMI",
    "MASTERCLOCK_UPDATE", "MCLOCK_INPROGRESS", "SCAN_IOAPIC", "GLOBAL_CLOCK_UPDATE",
    "APIC_PAGE_RELOAD", "HV_CRASH", "IOAPIC_EOI_EXIT", "HV_RESET", "HV_EXIT", "HV_STIMER",
    "LOAD_EOI_EXITMAP", "GET_NESTED_STATE_PAGES", "APICV_UPDATE", "TLB_FLUSH_CURRENT",
    "TLB_FLUSH_GUEST", "APF_READY",
)


def _arch(*names: str | None) -> dict[int, str]:
    """{bit: name} of x86's KVM_ARCH_REQ(0..): the common ones, then *names*
    (None skips a number)."""
    return {ARCH_BASE + i: n for i, n in enumerate(_X86_COMMON + names) if n}


@dataclass(frozen=True)
class RequestTable:
    """KVM_REQ_* bit numbers of one release family, and where they were read."""

    release: str  # "6.1": the major.minor it is for
    source: str  # the kernel source files (and tag) the bits were taken from
    names: dict[int, str]  # bit -> name without the KVM_REQ_ prefix


TABLES = {
    t.release: t for t in (
        RequestTable(
            "5.10", "Debian linux-source-5.10 (5.10.y): include/linux/kvm_host.h, "
            "arch/x86/include/asm/kvm_host.h",
            {0: "TLB_FLUSH", 1: "MMU_RELOAD", 2: "PENDING_TIMER", 3: "UNHALT", 4: "VM_BUGGED",
             **_arch("MSR_FILTER_CHANGED")}),
        # 6.1 "KVM: remove KVM_REQ_UNHALT" (c59fb1275838) dropped bit 3 (UNHALT)
        RequestTable(
            "6.1", "Debian linux-headers-6.1.0-56-common (6.1.192): include/linux/kvm_host.h, "
            "arch/x86/include/asm/kvm_host.h (no UNHALT: \"KVM: Remove KVM_REQ_UNHALT\")",
            {0: "TLB_FLUSH", 1: "VM_DEAD", 2: "UNBLOCK",
             **_arch("MSR_FILTER_CHANGED", "UPDATE_CPU_DIRTY_LOGGING",
                     "MMU_FREE_OBSOLETE_ROOTS")}),
        RequestTable(
            "6.12", "Debian linux-source-6.12 (6.12.y): include/linux/kvm_host.h, "
            "arch/x86/include/asm/kvm_host.h",
            {0: "TLB_FLUSH", 1: "VM_DEAD", 2: "UNBLOCK", 3: "DIRTY_RING_SOFT_FULL",
             **_arch("MSR_FILTER_CHANGED", "UPDATE_CPU_DIRTY_LOGGING",
                     "MMU_FREE_OBSOLETE_ROOTS", "HV_TLB_FLUSH", None,
                     "UPDATE_PROTECTED_GUEST_STATE")}),
        RequestTable(
            "7.3", "Debian linux-source-7.3 (7.3.y): include/linux/kvm_host.h, "
            "arch/x86/include/asm/kvm_host.h",
            {0: "TLB_FLUSH", 1: "VM_DEAD", 2: "UNBLOCK", 3: "DIRTY_RING_SOFT_FULL",
             **_arch("RECALC_INTERCEPTS", "UPDATE_CPU_DIRTY_LOGGING",
                     "MMU_FREE_OBSOLETE_ROOTS", "HV_TLB_FLUSH", "VMSA_PAGE_RELOAD",
                     "UPDATE_PROTECTED_GUEST_STATE")}),
    )
}


def table_for(release: str) -> RequestTable | None:
    """The table of a UTS release ("6.1.0-56-amd64" -> "6.1"), None if there is none."""
    m = re.match(r"(\d+)\.(\d+)", release or "")
    return TABLES.get(f"{m.group(1)}.{m.group(2)}") if m else None


def bit_names(requests: int, table: RequestTable | None) -> list[str]:
    """The set bits of vcpu->requests, ascending: the table's name, or "bit N"."""
    out, n = [], 0
    while requests >> n:
        if requests >> n & 1:
            name = table.names.get(n) if table else None
            out.append(name or f"bit {n}")
        n += 1
    return out
