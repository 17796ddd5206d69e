"""The kernel model: KVM's VMs, vCPUs, MMU roots and shadow pages, read-only.

Everything here reads the target through drgn and returns the plain, frozen
data of kvminspect.objects; nothing renders. The model is parts, each owning
its caches and its reset(), passed to each other explicitly:

* Memory (memory.py): reads, a page cache, bounded list walks, problems;
* SpteReader (read_spte.py): the SPTE format, kvm.ko's shadow_*_mask globals;
* ShadowPages (read_pages.py): struct kvm_mmu_page, spt[], the page lists;
* Vms (read_vms.py): struct kvm on vm_list, owners, counters, memslots;
* Vcpus (read_vcpus.py): struct kvm_vcpu, its MMUs' roots and prev_roots;
* VmStates (read_vmstate.py): MMU notifier, NX huge pages, the page hash;
* Exits (read_exits.py): each vCPU's last VM-exit, from the vendor module;
* Registers (read_regs.py): each vCPU's saved registers (regs[], the VMCB);
* CorePages (read_core.py): which host pages the dump holds, by its own tables.

Kernel is the thin front that builds them for one target, so that commands
read ``k.vms()``, ``k.vcpus(vm)``, ``k.shadow_page(addr)`` as before; analyses
read through these parts, never through the drgn Program.
"""

from __future__ import annotations

import array
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import drgn

from kvminspect import spte
from kvminspect.errors import Problems
from kvminspect.layout import Layout, Missing, probe
from kvminspect.memory import Memory
from kvminspect.objects import (
    MP_STATES,
    VCPU_MODES,
    VENDOR_MODULES,
    VM,
    VM_TYPES,
    LastExit,
    Memslot,
    MmuRoots,
    Role,
    RootRef,
    ShadowPage,
    Spte,
    VCpu,
    as_id_of,
    is_obsolete_sp,
)
from kvminspect.read_core import CoreKind, CorePages
from kvminspect.read_exits import Exits
from kvminspect.read_pages import ShadowPages
from kvminspect.read_regs import Registers, SavedRegs
from kvminspect.read_spte import SpteReader
from kvminspect.read_vcpus import MmuRootWords, RsvdMasks, Vcpus
from kvminspect.read_vms import Vms
from kvminspect.read_vmstate import VmState, VmStates

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

# the model's data (kvminspect.objects), re-exported beside Kernel
__all__ = ["MP_STATES", "VCPU_MODES", "VENDOR_MODULES", "VM", "VM_TYPES", "Kernel", "LastExit",
           "Memslot", "MmuRoots", "Role", "RootRef", "ShadowPage", "Spte", "VCpu",
           "as_id_of", "is_obsolete_sp"]


class Kernel:
    """KVM state of one target, read on demand by its parts and cached per target.

    ``prog`` is the drgn Program, for the parts and for the user's own drgn
    code (``py``); analyses read through the parts only.
    """

    def __init__(self, prog: drgn.Program, release: str | None = None,
                 layout: Layout | None = None) -> None:
        self.prog = prog
        self.layout: Layout = layout if layout is not None else probe(prog, release)
        self.memory = Memory(prog)
        self.spte = SpteReader(self.memory, self.layout)
        self.pages = ShadowPages(self.memory, self.layout, self.spte)
        self.vm_reader = Vms(self.memory, self.layout)
        self.vcpu_reader = Vcpus(self.memory, self.layout, self.vm_reader, self.pages)
        self.vm_states = VmStates(self.memory)
        self.exits = Exits(self.memory, self.vm_reader)
        self.registers = Registers(self.memory, self.vm_reader)
        self.core_pages = CorePages(self.memory)

    # what was met while reading

    @property
    def problems(self) -> Problems:
        """The problems met so far (Memory's, each owned by a VM or none)."""
        return self.memory.problems

    @property
    def missing(self) -> tuple[Missing, ...]:
        """Members the model reads that this kernel lacks (shown as unknown), then
        the vendor module's types or members its debug info lacks (Exits.warnings)."""
        return self.layout.missing + self.exits.warnings()

    def problem(self, kind: str, addr: int | None, what: str) -> None:
        """Record a problem owned by the VM being read (Memory.problem)."""
        self.memory.problem(kind, addr, what)

    def reading(self, vm: VM | int | None) -> contextlib.AbstractContextManager[None]:
        """Problems met inside belong to *vm* (a VM or its struct kvm address)."""
        return self.memory.reading(vm.addr if isinstance(vm, VM) else vm)

    @property
    def on_progress(self) -> Callable[[int], None] | None:
        """Called with the pages read so far during long list walks."""
        return self.memory.on_progress

    @on_progress.setter
    def on_progress(self, f: Callable[[int], None] | None) -> None:
        self.memory.on_progress = f

    def drop_blocks(self) -> None:
        """Forget Memory's page cache (what it held is decoded by now)."""
        self.memory.reset()

    def forget(self, vm: VM) -> None:
        """Drop what was read of *vm*'s vCPUs and of every shadow page (a re-read)."""
        self.vcpu_reader.reset(vm)
        self.pages.reset()
        self.memory.reset()

    # VMs (Vms)

    def vms(self) -> list[VM]:
        """Every struct kvm on the global vm_list, in list order."""
        return self.vm_reader.vms()

    def vms_if_read(self) -> list[VM] | None:
        """The VMs vms() read, or None when it has not read them."""
        return self.vm_reader.vms_if_read()

    def vm_by_id(self, ident: str) -> VM:
        """A VM by index, pid:N, struct kvm address or name (Vms.vm_by_id)."""
        return self.vm_reader.vm_by_id(ident)

    def kvm_object(self, vm: VM) -> drgn.Object:
        """The struct kvm * of *vm*."""
        return self.vm_reader.kvm_object(vm)

    def change_marks(self, vm: VM) -> tuple[int, ...]:
        """What moves when *vm*'s MMU changes, read anew (Vms.change_marks)."""
        return self.vm_reader.change_marks(vm)

    def vm_state(self, vm: VM, hash_chains: bool = True) -> VmState:
        """*vm*'s invalidation, NX huge page and hash state (VmStates.vm_state)."""
        return self.vm_states.vm_state(vm, hash_chains)

    # vCPUs (Vcpus)

    def vcpus(self, vm: VM) -> list[VCpu]:
        """Every online vCPU of *vm*, with its MMU roots."""
        return self.vcpu_reader.vcpus(vm)

    def vcpu_objects(self, vm: VM) -> list[drgn.Object]:
        """struct kvm_vcpu * of *vm* for index 0..online_vcpus-1."""
        return self.vcpu_reader.vcpu_objects(vm)

    def mmu_roots(self, v: VCpu) -> MmuRootWords | None:
        """A vCPU's current root and prev_roots[] read as one block (Vcpus.mmu_roots)."""
        return self.vcpu_reader.mmu_roots(v)

    def rsvd_masks(self, v: VCpu) -> RsvdMasks | None:
        """A vCPU's MMU reserved-bit masks (Vcpus.rsvd_masks)."""
        return self.vcpu_reader.rsvd_masks(v)

    def last_exit(self, v: VCpu) -> LastExit | None:
        """A vCPU's last VM-exit from the vendor module's structures (Exits.last_exit):
        None when its debug info lacks them (a warning in missing) or when they are
        unreadable (a problem)."""
        return self.exits.last_exit(v)

    def saved_registers(self, v: VCpu) -> SavedRegs | None:
        """A vCPU's registers as KVM saved them (Registers.saved): None (and a
        problem) when they cannot be read."""
        return self.registers.saved(v)

    # the host's pages in the dump (CorePages)

    def host_page_present(self, pfn: int) -> bool:
        """Whether host page *pfn* is in the dump, by the core's own table
        (CorePages.present; a live target: always, the read decides)."""
        return self.core_pages.present(pfn)

    def core_kind(self) -> CoreKind:
        """What host page presence is read from (CorePages.kind)."""
        return self.core_pages.kind()

    # shadow pages (ShadowPages) and SPTEs (SpteReader)

    def shadow_page(self, addr: int) -> ShadowPage | None:
        """struct kvm_mmu_page at *addr*; None if unreadable (a problem)."""
        return self.pages.shadow_page(addr)

    def shadow_pages(self, addrs: list[int]) -> list[ShadowPage | None]:
        """shadow_page() of each address."""
        return self.pages.shadow_pages(addrs)

    def to_shadow_page(self, pfn: int) -> int | None:
        """to_shadow_page(): page_private(pfn_to_page(pfn)), or None."""
        return self.pages.to_shadow_page(pfn)

    def sptes(self, sp: ShadowPage, keep: bool = True) -> array.array[int] | None:
        """sp->spt[0..511]; None if unreadable (ShadowPages.sptes)."""
        return self.pages.sptes(sp, keep)

    def table_runs(self, sps: list[ShadowPage]
                   ) -> Iterator[tuple[NDArray[np.intp], NDArray[np.uint64] | None]]:
        """sp->spt[] of many pages, by runs of neighbours (ShadowPages.table_runs)."""
        return self.pages.table_runs(sps)

    def leaf_gfns_of(self, sps: list[ShadowPage], table: NDArray[np.intp],
                     index: NDArray[np.int64]) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """kvm_mmu_page_get_gfn() of many leaves of indirect pages
        (ShadowPages.leaf_gfns_of)."""
        return self.pages.leaf_gfns_of(sps, table, index)

    def links(self, sp: ShadowPage) -> list[tuple[int, int, int | None]]:
        """(index, SPTE, child) of each present non-leaf SPTE of *sp*."""
        return self.pages.links(sp)

    def link_columns(self, sp: ShadowPage) -> tuple[list[int], list[int], list[int | None]]:
        """links() as three lists: indexes, SPTEs, children (ShadowPages.link_columns)."""
        return self.pages.link_columns(sp)

    def link_columns_many(self, sps: list[ShadowPage]
                          ) -> list[tuple[list[int], list[int], list[int | None]] | None]:
        """link_columns() of many pages at once, None for a table not readable
        (ShadowPages.link_columns_many)."""
        return self.pages.link_columns_many(sps)

    def children(self, sp: ShadowPage) -> list[Spte]:
        """Present non-leaf SPTEs of *sp* with their child shadow pages."""
        return self.pages.children(sp)

    def decode(self, sp: ShadowPage, index: int, value: int, resolve: bool = True) -> Spte:
        """One SPTE of *sp*: presence, leaf-ness and the child shadow page."""
        return self.pages.decode(sp, index, value, resolve)

    def leaf_gfns(self, sp: ShadowPage, indexes: list[int]) -> list[int] | None:
        """kvm_mmu_page_get_gfn() of each index (ShadowPages.leaf_gfns)."""
        return self.pages.leaf_gfns(sp, indexes)

    def active_pages(self, vm: VM) -> list[int]:
        """Shadow pages on kvm->arch.active_mmu_pages (and the tdp_mmu_pages list, 5.10-6.1)."""
        return self.pages.active_pages(vm)

    def listed_pages(self, vm: VM) -> tuple[list[int], list[ShadowPage | None]]:
        """active_pages() and the ShadowPage of each (None: unreadable), in order."""
        return self.pages.listed_pages(vm)

    def tdp_roots(self, vm: VM) -> list[int]:
        """TDP MMU roots on kvm->arch.tdp_mmu_roots."""
        return self.pages.tdp_roots(vm)

    @property
    def spte_format(self) -> spte.SpteFormat:
        """This release's SPTE decoding rules (kvminspect.spte)."""
        return self.spte.format

    def spte_masks(self, vm: VM | None = None) -> spte.SpteMasks:
        """kvm.ko's SPTE masks, with *vm*'s own MMIO value where kept (SpteReader.masks)."""
        return self.spte.masks(None if vm is None else vm.addr)

    def spte_present(self, value: int) -> bool:
        """is_shadow_present_pte() of this release."""
        return self.spte.present(value)

    def spte_bits(self, sp: ShadowPage, value: int, vm: VM | None = None) -> spte.SpteBits:
        """One SPTE of *sp*, every bit decoded."""
        return self.pages.spte_bits(sp, value, vm)


