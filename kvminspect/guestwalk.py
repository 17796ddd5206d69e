"""A guest address to a gfn and the VMM's hva: what the fault path would use.

Under TDP (NPF exits) the fault address is a guest physical address; under
shadow paging (#PF intercepts) it is a guest linear address, which the
kernel's FNAME(walk_addr_generic) (arch/x86/kvm/mmu/paging_tmpl.h) translates
through the guest's own page tables. Here a guest linear address goes first
through the vCPU's shadow root (kvminspect.walk: a present shadow leaf names
its gfn), else through the guest's page tables from vcpu->arch.cr3, read from
guest memory (gfn -> memslot -> hva -> the VMM's page tables -> host
physical). Only 4- and 5-level (64-bit) guest paging is walked; a 32-bit or
PAE guest's address says so.
"""

from __future__ import annotations

import drgn

from kvminspect.model import Kernel
from kvminspect.objects import VM, VCpu
from kvminspect.spte import PAGE_SHIFT

PT_PRESENT = 1  # _PAGE_PRESENT
PT_PAGE_SIZE = 1 << 7  # _PAGE_PSE: a large page at levels 2 and 3
PT_ADDR_MASK = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)  # PT64_BASE_ADDR_MASK


def gfn_to_hva(vm: VM, gfn: int, as_id: int = 0) -> int | None:
    """gfn_to_hva(): the VMM's address of *gfn*, None outside every memslot."""
    slot = vm.memslot_of(gfn, as_id)
    return None if slot is None else slot.hva_of(gfn)


def read_guest_u64(k: Kernel, vm: VM, gpa: int, mm: drgn.Object | None) -> int | None:
    """The u64 at guest physical *gpa*, through the memslots and the VMM's page
    tables; None where either does not map it or the dump lacks the page."""
    hva = gfn_to_hva(vm, gpa >> PAGE_SHIFT)
    if hva is None or mm is None:
        return None
    try:
        pfn = k.vm_reader.hva_to_pfn(mm, hva)
        data = k.memory.read_physical((pfn << PAGE_SHIFT) + (gpa & 0xFFF), 8)
    except (drgn.FaultError, LookupError, ValueError, NotImplementedError):
        return None
    return int.from_bytes(data, "little")


def guest_walk(k: Kernel, vm: VM, cr3: int, gva: int, levels: int) -> tuple[int | None, str]:
    """FNAME(walk_addr_generic) for 64-bit paging: (gpa or None, how)."""
    mm = k.vm_reader.vmm_mm(vm)
    table = cr3 & PT_ADDR_MASK
    for level in range(levels, 0, -1):
        shift = PAGE_SHIFT + 9 * (level - 1)
        entry = read_guest_u64(k, vm, table + 8 * ((gva >> shift) & 511), mm)
        if entry is None:
            return None, f"the guest's level-{level} table at gpa {table:#x} is not readable"
        if not entry & PT_PRESENT:
            return None, f"not present in the guest's page tables (level {level})"
        if level == 1 or (level in (2, 3) and entry & PT_PAGE_SIZE):
            base = entry & PT_ADDR_MASK & ~((1 << shift) - 1)
            return base + (gva & ((1 << shift) - 1)), f"guest page tables (cr3 {cr3:#x})"
        table = entry & PT_ADDR_MASK
    return None, "no leaf"


def translate(k: Kernel, vm: VM, v: VCpu, address: int, kind: str
              ) -> tuple[int | None, int | None, str]:
    """(gfn, hva, how) of a fault address of *v*: a "gpa", or a "gva" walked
    through the shadow root, then the guest's page tables."""
    if kind == "gpa":
        gfn = address >> PAGE_SHIFT
        hva = gfn_to_hva(vm, gfn)
        return gfn, hva, "gpa" + ("" if hva is not None else ": no memslot holds it")
    from kvminspect.walk import walk

    if v.root is not None and v.root.sp is not None:
        w = walk(k, vm, address, v.root, f"vcpu{v.vcpu_idx}.root")
        if w.check is not None and w.check.gfn is not None:
            gfn = w.check.gfn  # the 4 KiB gfn of the address (a large leaf's too)
            return gfn, gfn_to_hva(vm, gfn), "the shadow page tables"
    if v.root_level < 4 or not isinstance(v.cr3, int):
        return None, None, "a 32-bit or PAE guest's page tables are not walked"
    gpa, how = guest_walk(k, vm, v.cr3, address, v.root_level)
    if gpa is None:
        return None, None, how
    gfn = gpa >> PAGE_SHIFT
    return gfn, gfn_to_hva(vm, gfn), how
