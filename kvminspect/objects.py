"""What the model reads, as plain read-only data: VMs, vCPUs, roots, shadow pages.

The readers (read_vms, read_vcpus, read_pages) build these from the kernel;
nothing here reads memory or renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import drgn

from kvminspect.exits import AddressKind, Vendor
from kvminspect.layout import (  # Int: re-exported, the model's integers
    Int,
    NoValue,
    bare_type,
    known,
)
from kvminspect.spte import PAGE_SHIFT, SpteBits

MP_STATES = {  # KVM_MP_STATE_* (include/uapi/linux/kvm.h)
    0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED",
    4: "SIPI_RECEIVED", 5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING",
    8: "LOAD", 9: "AP_RESET_HOLD", 10: "SUSPENDED",
}
VCPU_MODES = ("OUTSIDE_GUEST_MODE", "IN_GUEST_MODE", "EXITING_GUEST_MODE",
              "READING_SHADOW_PAGE_TABLES")
VM_TYPES = {  # kvm->arch.vm_type: KVM_X86_*_VM (arch/x86/include/uapi/asm/kvm.h)
    0: "default", 1: "sw_protected", 2: "sev", 3: "sev_es", 4: "snp", 5: "tdx",
}
VENDOR_MODULES = ("kvm_amd", "kvm_intel")


@dataclass(frozen=True)
class Role:
    """union kvm_mmu_page_role, decoded by its DWARF bitfields."""

    word: int
    fields: dict[str, int]
    widths: dict[str, int] = field(default_factory=dict)  # one dict shared by all pages
    # the bits every check reads, decoded once (the model shares one Role per word)
    level: int = field(init=False, compare=False)
    direct: bool = field(init=False, compare=False)
    invalid: bool = field(init=False, compare=False)
    # "KVM: x86/mmu: Add an is_mirror member for union kvm_mmu_page_role" (6.14)
    is_mirror: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        f = self.fields
        for name, value in (("level", f.get("level", 0)), ("direct", bool(f.get("direct"))),
                            ("invalid", bool(f.get("invalid"))),
                            ("is_mirror", bool(f.get("is_mirror")))):
            object.__setattr__(self, name, value)

    def get(self, name: str, default: int = 0) -> int:
        return self.fields.get(name, default)

    def width(self, name: str) -> int:
        """The bitfield's width in bits (0 if unknown)."""
        return self.widths.get(name, 0)


class ShadowPage(NamedTuple):
    """struct kvm_mmu_page: one shadow (or TDP) page table and its state.

    ``level`` is the page table's level: role.level, except for the child
    pages of the TDP MMU before "KVM: x86/mmu: Fix TDP MMU page table level"
    (5.14, f1b832550832), whose role.level is one too high (see
    Kernel.tdp_child_level_is_parents). A NamedTuple, not a dataclass: the
    model makes one per shadow page (10^5 and more), and a tuple is built
    ten times faster than a frozen dataclass; change one with ``_replace``.
    """

    addr: int
    gfn: int
    level: int
    role: Role
    spt: int
    unsync: bool | NoValue
    unsync_children: Int
    unsync_child_bitmap: Int  # 512 bits, bit i = spt[i]
    root_count: Int
    mmu_valid_gen: Int
    tdp_mmu_page: bool

    def bitmap_indexes(self) -> list[int]:
        """Set bits of unsync_child_bitmap, ascending (none when unknown)."""
        bitmap = self.unsync_child_bitmap
        b = bitmap if known(bitmap) else 0
        out: list[int] = []
        while b:
            low = b & -b
            out.append(low.bit_length() - 1)
            b ^= low
        return out


@dataclass(frozen=True)
class Spte:
    """One entry of a shadow page's spt[] and what it points to."""

    index: int
    value: int
    present: bool
    large: bool
    leaf: bool
    pfn: int
    child: int | None  # struct kvm_mmu_page of a non-leaf entry
    bits: SpteBits | None = None  # every bit, by the kernel's masks (kvminspect.spte)


class RootKind(Enum):
    """What a root hpa is when it is no struct kvm_mmu_page of its own."""

    PAE_ROOT = "pae_root"  # mmu->pae_root: four PDPTEs (PAE and 32-bit guests)
    LM_ROOT = "lm_root"  # mmu->lm_root, a level-4 page above pae_root (before 5.15)
    PML4_ROOT = "pml4_root"  # mmu->pml4_root, its successor
    PML5_ROOT = "pml5_root"  # mmu->pml5_root, 5-level shadow NPT
    # "KVM: x86/mmu: Use dummy root, backed by zero page, for !visible guest roots"
    # (6.6, 0e3223d8d00a)
    DUMMY = "dummy"
    UNREADABLE = "unreadable"  # the hpa has no readable struct page


@dataclass(frozen=True)
class RootRef:
    """A root of a vCPU's MMU: mmu->root or one of mmu->prev_roots[]."""

    hpa: int | None  # None for INVALID_PAGE
    pgd: int
    sp: ShadowPage | None
    special: RootKind | None = None  # None: the root is a shadow page (or INVALID_PAGE)
    # (i, struct kvm_mmu_page) of each present mmu->pae_root[i] under a PAE root
    pae_roots: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class MmuRoots:
    """The roots of one struct kvm_mmu of a vCPU (vcpu->arch.root_mmu or guest_mmu)."""

    name: str  # root_mmu / guest_mmu
    addr: int  # the struct kvm_mmu
    root_level: int
    direct: bool
    root: RootRef | None  # None: the MMU could not be read
    prev_roots: list[RootRef]


@dataclass(frozen=True)
class VCpu:
    """struct kvm_vcpu with its current MMU (vcpu->arch.mmu) and the other one.

    root, prev_roots, root_level and direct are those of the current MMU;
    *other_mmu* holds the roots of the MMU that is not current (guest_mmu, the
    L2 shadow NPT/EPT MMU, while the vCPU runs L1; root_mmu while it runs L2),
    None before "x86/kvm/mmu: introduce guest_mmu" (4.20) or when it cannot be read.
    """

    addr: int
    vcpu_id: Int
    vcpu_idx: int
    tid: int | NoValue | None  # None: no thread (vcpu->pid is NULL)
    comm: str | NoValue | None
    cpu: Int
    mode: str | NoValue
    mp_state: str | NoValue
    cr3: Int
    mmu_name: str  # root_mmu / guest_mmu
    root_level: int
    direct: bool
    root: RootRef | None
    prev_roots: list[RootRef]
    stat: dict[str, int]
    requests: Int = 0  # vcpu->requests, the pending KVM_REQ_* bits (UNKNOWN: no member)
    request_names: tuple[str, ...] = ()  # their names (kvminspect.requests), "bit N" if none
    other_mmu: MmuRoots | None = None


@dataclass(frozen=True)
class LastExit:
    """A vCPU's last VM-exit where the kernel keeps it in memory (kvminspect.exits).

    SVM: the current VMCB's control area (svm->vmcb: vmcb01, or vmcb02 while the
    vCPU runs a nested guest). VMX: what struct vcpu_vmx caches; the VMCS itself is
    not readable from memory. *stale*: the vCPU was in guest mode at the reading
    (vcpu->mode IN_GUEST_MODE or EXITING_GUEST_MODE), so this is the exit before
    the current guest run (or one not handled yet); None when vcpu->mode is unknown.
    """

    vendor: Vendor
    code: int  # SVM: the 64-bit EXITCODE; VMX: exit_reason.full
    name: str | None  # SVM_EXIT_* / EXIT_REASON_* without the prefix; None: unknown code
    info1: int | None  # SVM EXITINFO1; VMX exit_qualification (None: not cached)
    info2: int | None  # SVM EXITINFO2; VMX exit_intr_info (None: not cached)
    int_info: int | None  # SVM EXITINTINFO; VMX idt_vectoring_info (None: not read)
    address: int | None  # the fault address the exit carries (see address_kind)
    address_kind: AddressKind
    stale: bool | None
    source: str  # what it was read from: "svm->vmcb (vmcb01)", "vmx->vt", ...
    nested: bool = False  # the exit of a nested (L2) guest: svm->vmcb is vmcb02
    failed_vmentry: bool = False  # VMX exit_reason bit 31 / VM-Fail; SVM_EXIT_ERR
    detail: tuple[str, ...] = ()  # decoded bits: #PF/#NPF error code, EPT qualification
    exits: int | None = None  # vcpu->stat.exits: 0 means the vCPU never exited

    @property
    def gfn(self) -> int | None:
        """The guest frame of a GPA address (None for any other kind)."""
        if self.address is None or self.address_kind is not AddressKind.GPA:
            return None
        return self.address >> 12


@dataclass(frozen=True)
class Memslot:
    """struct kvm_memory_slot."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int

    def holds(self, gfn: int) -> bool:
        """Whether *gfn* is one of this memslot's pages."""
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def hva_of(self, gfn: int) -> int:
        """__gfn_to_hva_memslot(): the VMM's address of *gfn* (a page of this memslot)."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)


@dataclass(frozen=True)
class VM:
    """struct kvm: one VM, its owner and its MMU-wide state."""

    index: int
    addr: int
    pid: Int
    comm: str | NoValue | None  # None: no owner task (exited); UNREADABLE: not in the dump
    task_state: str | NoValue | None
    online_vcpus: Int
    created_vcpus: Int
    mmu: str  # shadow | tdp_mmu | tdp_legacy
    n_used_mmu_pages: Int
    n_requested_mmu_pages: Int
    n_max_mmu_pages: Int
    mmu_valid_gen: Int
    indirect_shadow_pages: Int
    memslots: list[Memslot]
    stat: dict[str, int]
    vendor: str | None = None  # kvm_amd / kvm_intel: the vendor module loaded
    # kvm->arch.vm_type: default, sev, ..., tdx; from "KVM: x86: Add support for "protected
    # VMs" that can utilize private memory" (6.8, 89ea60c2c7b5)
    vm_type: str | None = None
    # "KVM: stats: Add fd-based API to read binary stats data" (5.14, cb082bfab59a)
    stats_id: str | None = None  # kvm->stats_id, "kvm-PID"; None before
    guest_name: str | None = None  # QEMU's -name guest=NAME in the owner's command line

    def memslot_of(self, gfn: int, as_id: int = 0) -> Memslot | None:
        """The memslot of address space *as_id* holding *gfn* (__gfn_to_memslot), or None."""
        return next((s for s in self.memslots if s.as_id == as_id and s.holds(gfn)), None)

    @property
    def names(self) -> tuple[str, ...]:
        """The names --vm takes for this VM: QEMU's guest name, kvm->stats_id."""
        return tuple(n for n in (self.guest_name, self.stats_id) if n)

    @property
    def unsupported(self) -> str | None:
        """Why kvminspect cannot read this VM's MMU, or None."""
        if self.vm_type == "tdx":
            return "TDX VM (mirror and external roots)"
        return None


def as_id_of(sp: ShadowPage) -> int:
    """kvm_memslots_for_spte_role(): address space 1 for SMM pages (role.smm)."""
    return 1 if sp.role.get("smm") else 0


def is_obsolete_sp(sp: ShadowPage, vm: VM) -> bool:
    """is_obsolete_sp(): role.invalid, or an old mmu_valid_gen (not for TDP MMU pages)."""
    return sp.role.invalid or (
        not sp.tdp_mmu_page and known(sp.mmu_valid_gen) and known(vm.mmu_valid_gen)
        and sp.mmu_valid_gen != vm.mmu_valid_gen)


def struct_int(data: bytes, off: int, size: int, signed: bool = False) -> int:
    return int.from_bytes(data[off:off + size], "little", signed=signed)


def stat_counters(obj: drgn.Object, type_: drgn.Type | None = None) -> dict[str, int]:
    """Integer members of a stats struct (kvm->stat / vcpu->stat), flattened.

    Unnamed structs/unions are looked through ("KVM: x86/mmu: Add detailed page
    size stats" (5.15) put pages_4k/2m/1g in one), and a one-member wrapper such
    as atomic64_t takes the member's name.
    """
    out: dict[str, int] = {}
    for m in bare_type(type_ if type_ is not None else obj.type_).members or ():
        mt = bare_type(m.type)
        if m.name is None:
            if mt.kind in (drgn.TypeKind.STRUCT, drgn.TypeKind.UNION):
                out.update(stat_counters(obj, mt))  # members reachable by name from obj
        elif mt.kind in (drgn.TypeKind.INT, drgn.TypeKind.BOOL):
            out[m.name] = getattr(obj, m.name).value_()
        elif mt.kind == drgn.TypeKind.STRUCT:
            inner = stat_counters(getattr(obj, m.name))
            if len(mt.members or ()) == 1 and len(inner) == 1:
                out[m.name] = next(iter(inner.values()))
            else:
                out.update(inner)
    return out
