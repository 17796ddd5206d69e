"""The kernel model: KVM's VMs, vCPUs, MMU roots and shadow pages, read-only.

Everything here reads the target through drgn and returns the plain, frozen
dataclasses of kvminspect.objects; nothing renders. Kernel is the readers
together: read_vms (struct kvm), read_vcpus (struct kvm_vcpu and its MMU),
read_pages (struct kvm_mmu_page and spt[]). Hot paths read each object as one
block and decode fields by offset. Anything unreadable is recorded as a
Problem (owned by the VM being read) and skipped.
"""

from __future__ import annotations

from kvminspect.objects import (  # noqa: F401 (the model's data, re-exported)
    KERNEL_MIN,
    LIST_POISON,
    MAX_LIST,
    MP_STATES,
    VCPU_MODES,
    VENDOR_MODULES,
    VM,
    VM_TYPES,
    Int,
    Memslot,
    MmuRoots,
    Role,
    RootRef,
    ShadowPage,
    Spte,
    VCpu,
    is_obsolete_sp,
    stat_counters,
    struct_int,
)
from kvminspect.read_pages import PageReader
from kvminspect.read_vcpus import VcpuReader
from kvminspect.read_vms import VmReader
from kvminspect.read_vmstate import VmStateReader


class Kernel(VmReader, VcpuReader, PageReader, VmStateReader):
    """KVM state of one target, read on demand and cached per target."""
