"""struct kvm on vm_list: VMs, their owners, counters and memslots.

Vms is the model's part for virt/kvm/kvm_main.c's VM list: every struct kvm
on the global vm_list, its owner task, its kvm->stat and kvm->arch counters
and its memslots (include/linux/kvm_host.h), read through Memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import drgn
from drgn.helpers.linux.pid import find_task

from kvminspect.errors import LookupFailed
from kvminspect.layout import (
    UNKNOWN,
    UNREADABLE,
    Int,
    Layout,
    NoValue,
    bare_type,
    has_member,
    known,
)
from kvminspect.memory import PAGE_MASK, Memory
from kvminspect.modsyms import listed_modules
from kvminspect.objects import (
    VENDOR_MODULES,
    VM,
    VM_TYPES,
    Memslot,
    stat_counters,
)
from kvminspect.spte import PAGE_SHIFT

if TYPE_CHECKING:  # numpy is imported where it is used: `vms` never needs it
    import numpy as np
    from numpy.typing import NDArray

# Vms.hva_to_pfns() outcomes
HVA_MAPPED, HVA_NOT_MAPPED, HVA_NOT_IN_DUMP = 0, 1, 2
X86_ADDRESS_MASK = 0xFFFFFFFFFF000  # bits 12-51 of an x86-64 page-table entry (as drgn's)
SHRT_MAX = 32767  # KVM_MEM_SLOTS_NUM from 5.12 (Vms.user_memslots)
X86_INTERNAL_MEMSLOTS = 3  # KVM_PRIVATE_MEM_SLOTS, later KVM_INTERNAL_MEM_SLOTS (x86)


def read_counters(mem: Memory, obj: drgn.Object, kind: str, addr: int) -> dict[str, int]:
    """The integer members of a stats struct (kvm->stat, vcpu->stat), flattened;
    {} and a problem naming *kind* at *addr* when it cannot be read."""
    try:
        return stat_counters(obj)
    except drgn.FaultError as e:
        mem.problem(kind, addr, f"unreadable ({e})")
        return {}


class Vms:
    """struct kvm on vm_list: VMs, their owners, counters and memslots.

    Reads through *mem* by *layout*; owns the list of VMs read (reset()).
    """

    def __init__(self, mem: Memory, layout: Layout) -> None:
        self.mem = mem
        self.layout = layout
        self._vms: list[VM] | None = None
        self._vendor: str | None = None
        self._vendor_read = False
        self._listed: dict[int, int] = {}  # tdp_mmu_pages_listed() by struct kvm
        self._has_stats_id: bool | None = None

    def reset(self) -> None:
        """Forget the VMs read (the next vms() walks vm_list again)."""
        self._vms = None
        self._listed.clear()

    def tdp_enabled(self) -> bool:
        """kvm.ko's tdp_enabled: NPT/EPT in use for the guest's own MMU."""
        return bool(self.mem.global_int("tdp_enabled", 1))

    def vendor(self) -> str | None:
        """The vendor module loaded (kvm_amd or kvm_intel) as the kernel's
        ``modules`` list (struct module.name) says; None if neither."""
        if not self._vendor_read:
            self._vendor_read = True
            # the kernel's modules list: drgn may have skipped a module of a filtered dump
            self._vendor = next((name for name, _ in listed_modules(self.mem.prog)
                                 if name in VENDOR_MODULES), None)
        return self._vendor

    def _vm_type(self, kvm: drgn.Object) -> str | None:
        """kvm->arch.vm_type by name; None before "KVM: x86: Add support for "protected
        VMs" that can utilize private memory" (6.8, 89ea60c2c7b5)."""
        if not self.layout.vm_type:
            return None
        t = int(kvm.arch.vm_type.value_())
        return VM_TYPES.get(t, str(t))

    def _stats_id(self, kvm: drgn.Object) -> str | None:
        """kvm->stats_id, "kvm-PID" (a char array); None on older kernels.
        "KVM: stats: Add fd-based API to read binary stats data" (5.14, cb082bfab59a)"""
        if self._has_stats_id is None:
            self._has_stats_id = has_member(self.mem.type("struct kvm"), "stats_id")
        if not self._has_stats_id:
            return None
        return kvm.stats_id.string_().decode(errors="replace") or None

    def _guest_name(self, task: drgn.Object) -> str | None:
        """QEMU's guest name: -name in the owner task's command line (its mm's
        arg_start..arg_end, read through drgn); None if absent or unreadable."""
        from drgn.helpers.linux.mm import cmdline

        try:
            argv = cmdline(task)
        except (drgn.FaultError, LookupError, ValueError, NotImplementedError):
            return None
        return qemu_guest_name([a.decode(errors="replace") for a in argv or []])

    def _used_pages(self, kvm: drgn.Object) -> Int:
        """MMU pages in use: kvm->arch.n_used_mmu_pages, kvm->stat.mmu_shadow_pages in
        7.3, as the 7.3 fixture's DWARF shows (commit not found)."""
        path = self.layout.used_pages_path
        if path is None:
            return UNKNOWN
        outer, inner = path.split(".")
        return int(kvm.member_(outer).member_(inner).value_())

    def _mmu_kind(self, kvm: drgn.Object) -> str:
        """shadow, tdp_mmu or tdp_legacy for one struct kvm."""
        if not self.tdp_enabled():
            return "shadow"
        # "KVM: x86/mmu: Change tdp_mmu to a read-only parameter" (6.3, 3af15ff47c4d)
        if self.layout.tdp_mmu_per_vm:
            on = bool(kvm.arch.tdp_mmu_enabled.value_())
        else:
            on = bool(self.mem.global_int("tdp_mmu_enabled", 1))
        return "tdp_mmu" if on else "tdp_legacy"

    def vms(self) -> list[VM]:
        """Every struct kvm on the global vm_list, in list order."""
        if self._vms is None:
            mem = self.mem
            head = mem.symbol_address("vm_list")
            off = drgn.offsetof(mem.type("struct kvm"), "vm_list")
            vms = []  # cached only when complete (Ctrl-C may interrupt the walk)
            for i, node in enumerate(mem.list_nodes(head, "vm_list")):
                with mem.reading(node - off):
                    vm = self._read_vm(i, node - off)
                if vm is None:  # shown by no document as a VM: its problems are the list's
                    mem.problems.disown(node - off)
                if vm is not None:
                    vms.append(vm)
            self._vms = vms
        return self._vms

    def vms_if_read(self) -> list[VM] | None:
        """The VMs vms() read, or None when it has not read them (or was interrupted)."""
        return self._vms

    def kvm_object(self, vm: VM) -> drgn.Object:
        """The struct kvm * of *vm*."""
        return self.mem.object("struct kvm *", vm.addr)

    def _read_vm(self, index: int, addr: int) -> VM | None:
        """One struct kvm; None (and a problem) when it cannot be read."""
        kvm = self.mem.object("struct kvm *", addr)
        v = self.layout.value
        try:
            pid = v(kvm, "struct kvm", "userspace_pid")
            comm: str | NoValue | None = None
            state: str | NoValue | None = None
            guest = None
            try:
                task = find_task(self.mem.prog, pid) if known(pid) else None
                if task:
                    comm = task.comm.string_().decode(errors="replace")
                    from drgn.helpers.linux.sched import task_state_to_char
                    state = task_state_to_char(task)
                    guest = self._guest_name(task)
            except (LookupError, drgn.FaultError, ValueError) as e:
                # a filtered dump (makedumpfile -d 31 drops the slab pages of tasks and
                # pids): the owner is named unreadable, never shown as if it had none
                comm = state = UNREADABLE
                self.mem.problem("struct task_struct", None,
                                 f"owner of the VM (pid {pid}) unreadable ({e})")
            arch = kvm.arch
            online = (UNKNOWN if self.layout.lacks("struct kvm", "online_vcpus")
                      else kvm.online_vcpus.counter.value_())
            return VM(
                index=index, addr=addr, pid=pid, comm=comm, task_state=state,
                online_vcpus=online,
                created_vcpus=v(kvm, "struct kvm", "created_vcpus"),
                mmu=self._mmu_kind(kvm),
                n_used_mmu_pages=self._used_pages(kvm),
                n_requested_mmu_pages=v(arch, "struct kvm_arch", "n_requested_mmu_pages"),
                n_max_mmu_pages=v(arch, "struct kvm_arch", "n_max_mmu_pages"),
                mmu_valid_gen=v(arch, "struct kvm_arch", "mmu_valid_gen"),
                indirect_shadow_pages=v(arch, "struct kvm_arch", "indirect_shadow_pages"),
                memslots=self._memslots(kvm),
                stat=({} if self.layout.lacks("struct kvm", "stat")
                      else read_counters(self.mem, kvm.stat, "kvm->stat", addr)),
                vendor=self.vendor(),
                vm_type=self._vm_type(kvm),
                stats_id=self._stats_id(kvm),
                guest_name=guest,
            )
        except drgn.FaultError as e:
            self.mem.problem("struct kvm", addr, f"unreadable ({e})")
            return None

    def _memslots(self, kvm: drgn.Object) -> list[Memslot]:
        """The memslots of every address space of one VM."""
        out: list[Memslot] = []
        for as_id, s in self.memslot_objects(kvm):
            try:
                out.append(Memslot(as_id, s.id.value_(), s.base_gfn.value_(), s.npages.value_(),
                                   s.userspace_addr.value_(), s.flags.value_()))
            except drgn.FaultError as e:
                self.mem.problem("struct kvm_memory_slot", kvm.value_(),
                                 f"memslot of address space {as_id} unreadable ({e})")
        return out

    def memslot_objects(self, kvm: drgn.Object) -> list[tuple[int, drgn.Object]]:
        """(address space, struct kvm_memory_slot) of every memslot of a struct
        kvm *, by address space; an unreadable struct kvm_memslots is a problem."""
        out: list[tuple[int, drgn.Object]] = []
        t = bare_type(kvm.type_.type)
        if t.member("memslots").type.kind != drgn.TypeKind.ARRAY:
            return out
        for as_id, slots in enumerate(kvm.memslots):
            try:
                if not slots:
                    continue
                out.extend((as_id, s) for s in self._slots_of(slots))
            except (drgn.FaultError, LookupError, ValueError) as e:
                self.mem.problem("struct kvm_memslots", slots.value_(), f"unreadable ({e})")
        return out

    def memslots_generation(self, vm: VM) -> dict[int, int]:
        """kvm_memslots(kvm)->generation of each address space of *vm* (as_id ->
        kvm->memslots[as_id]->generation), what check_mmio_spte() compares an MMIO
        SPTE's generation with; an unreadable one is left out (and a problem)."""
        out: dict[int, int] = {}
        kvm = self.kvm_object(vm)
        if bare_type(kvm.type_.type).member("memslots").type.kind != drgn.TypeKind.ARRAY:
            return out
        for as_id, slots in enumerate(kvm.memslots):
            try:
                if slots:
                    out[as_id] = int(slots.generation.value_())
            except (drgn.FaultError, LookupError, AttributeError) as e:
                self.mem.problem("struct kvm_memslots", vm.addr,
                                 f"memslots of address space {as_id} unreadable ({e})")
        return out

    def user_memslots(self) -> int:
        """KVM_USER_MEM_SLOTS: memslot ids from it up are x86's internal memslots
        (KVM_PRIVATE_MEM_SLOTS / KVM_INTERNAL_MEM_SLOTS, 3: APIC access page,
        identity page table, TSS), which kvm_is_visible_memslot() hides from L2.
        KVM_MEM_SLOTS_NUM is the length of kvm_memslots.id_to_index[] where it has
        one, SHRT_MAX after "KVM: Keep memslots in tree-based structures instead of
        array-based ones" (5.17, a54d806688fe) dropped it; it was 512 (509 user
        slots) before "KVM: Raise the maximum number of user memslots" (5.12,
        4fc096a99e01)."""
        try:
            t = self.mem.type("struct kvm_memslots")
            length = bare_type(t.member("id_to_index").type).length
        except LookupError:
            length = None
        return (length if length else SHRT_MAX) - X86_INTERNAL_MEMSLOTS

    def memslot_rmaps(self, vm: VM, levels: int
                      ) -> list[tuple[int, int, int, int, int, tuple[int, ...]]]:
        """(address space, id, struct kvm_memory_slot address, base_gfn, npages,
        slot->arch.rmap[0..levels-1]) of every memslot of *vm*: the rmap arrays'
        addresses (all 0 when the VM never allocated rmaps: TDP MMU only)."""
        out = []
        for as_id, s in self.memslot_objects(self.kvm_object(vm)):
            try:
                heads = tuple(int(s.arch.rmap[i].value_()) for i in range(levels))
                out.append((as_id, int(s.id.value_()), int(s.address_ or 0),
                            int(s.base_gfn.value_()), int(s.npages.value_()), heads))
            except (drgn.FaultError, LookupError, AttributeError) as e:
                self.mem.problem("struct kvm_memslots", vm.addr,
                                 f"memslot rmaps unreadable ({e})")
        return out

    def vmm_mm(self, vm: VM) -> drgn.Object | None:
        """kvm->mm, the VMM's struct mm_struct *; None when NULL or unreadable."""
        try:
            mm = self.kvm_object(vm).mm.read_()
        except (drgn.FaultError, LookupError, AttributeError):
            return None
        return mm if mm else None

    def hva_to_pfn(self, mm: drgn.Object, hva: int) -> int:
        """The host pfn the VMM's page tables (*mm*) map at *hva*: follow_pfn().

        FaultError when a page-table entry is not present ("address not
        mapped") or a page-table page is not in the dump; LookupError,
        ValueError or NotImplementedError when the tables cannot be walked.
        """
        from drgn.helpers.linux.mm import follow_pfn

        return int(follow_pfn(mm, hva).value_())

    def hva_to_pfns(self, mm: drgn.Object, hvas: NDArray[np.uint64]
                    ) -> tuple[NDArray[np.uint64], NDArray[np.uint8]] | None:
        """hva_to_pfn() of many addresses at once: (pfn, outcome) of each, the
        outcome HVA_MAPPED, HVA_NOT_MAPPED (an entry not present, as follow_pfn()'s
        "address is not mapped") or HVA_NOT_IN_DUMP (a page-table page the dump
        lacks). None where this walk cannot stand in for follow_pfn(): the
        caller asks it address by address.

        The x86-64 walk drgn's follow_phys() makes (4 or 5 levels, present bit,
        PS at any level above the PTE), level by level for every address at
        once, each page-table page read once (Memory.gather_words): 10^5
        addresses cost a few hundred reads, not 10^5 walks. Checked against
        follow_pfn() on a few of the addresses first.
        """
        import numpy as np

        n = len(hvas)
        pfn = np.zeros(n, dtype=np.uint64)
        outcome = np.full(n, HVA_MAPPED, dtype=np.uint8)
        if not n:
            return pfn, outcome
        try:
            table = int(mm.pgd.value_())
        except (drgn.FaultError, LookupError, AttributeError):
            return None
        levels = 5 if self.mem.global_int("__pgtable_l5_enabled", 1) else 4
        top = PAGE_SHIFT + 9 * levels - 1
        canonical = (hvas < np.uint64(1 << top)) | (hvas >= np.uint64((2**64 - 1) << top
                                                                      & (2**64 - 1)))
        outcome[~canonical] = HVA_NOT_MAPPED
        todo = np.flatnonzero(canonical)
        tables = np.full(len(todo), table, dtype=np.uint64)
        physical = False  # mm->pgd is a kernel address; the entries hold physical ones
        for level in range(levels - 1, -1, -1):
            if not len(todo):
                break
            if tables.size and bool((tables & np.uint64(PAGE_MASK)).any()):
                return None
            shift = np.uint64(PAGE_SHIFT + 9 * level)
            index = ((hvas[todo] >> shift) & np.uint64(511)).astype(np.intp)
            entry, read = self.mem.gather_words(tables, index, physical)
            outcome[todo[~read]] = HVA_NOT_IN_DUMP
            present = read & (entry & np.uint64(1) != 0)
            outcome[todo[read & ~present]] = HVA_NOT_MAPPED
            last = present & ((entry & np.uint64(0x80) != 0) | (level == 0))
            mask = np.uint64((1 << (PAGE_SHIFT + 9 * level)) - 1)
            phys = (entry[last] & np.uint64(X86_ADDRESS_MASK) & ~mask) | (hvas[todo[last]] & mask)
            pfn[todo[last]] = phys >> np.uint64(PAGE_SHIFT)
            deeper = present & ~last
            todo, tables = todo[deeper], entry[deeper] & np.uint64(X86_ADDRESS_MASK)
            physical = True
        for j in sorted({0, n // 2, n - 1}):  # the same answers as follow_pfn()
            try:
                if outcome[j] != HVA_MAPPED or self.hva_to_pfn(mm, int(hvas[j])) != int(pfn[j]):
                    return None
            except drgn.FaultError as e:
                want = HVA_NOT_MAPPED if "not mapped" in e.message else HVA_NOT_IN_DUMP
                if outcome[j] != want:
                    return None
            except (LookupError, ValueError, NotImplementedError):
                return None
        return pfn, outcome

    def tdp_mmu_pages_count(self, vm: VM) -> int | None:
        """kvm->arch.tdp_mmu_pages as a count (atomic64_t; "KVM: x86/mmu: Track the
        number of TDP MMU pages, but not the actual pages" (6.2, d25ceb926436));
        None where it is a list (5.10-6.1), absent or unreadable."""
        try:
            return int(self.kvm_object(vm).arch.tdp_mmu_pages.counter.value_())
        except (LookupError, AttributeError, drgn.FaultError):
            return None

    def tdp_mmu_pages_listed(self, vm: VM) -> int | None:
        """The nodes of the kvm->arch.tdp_mmu_pages list (5.10-6.1, before the count
        above), walked without decoding a page, once per reading (a REPL's next
        'vms' on 10^6 pages does not walk them again); None where the kernel has
        no list."""
        if not self.layout.tdp_mmu_pages_list:
            return None
        if vm.addr not in self._listed:
            head = self.kvm_object(vm).arch.tdp_mmu_pages.address_of_().value_()
            self._listed[vm.addr] = self.mem.count_nodes(head, "kvm->arch.tdp_mmu_pages")
        return self._listed[vm.addr]

    def _slots_of(self, slots: drgn.Object) -> Iterator[drgn.Object]:
        """struct kvm_memory_slot of one struct kvm_memslots."""
        st = bare_type(slots.type_.type)
        names = {m.name for m in st.members or ()}
        # "KVM: Keep memslots in tree-based structures instead of array-based ones"
        # (5.17, a54d806688fe): memslots in an rbtree per node_idx
        if "gfn_tree" in names:
            from drgn.helpers.linux.rbtree import rbtree_inorder_for_each

            idx = slots.node_idx.value_()
            for i, node in enumerate(rbtree_inorder_for_each(slots.gfn_tree.address_of_())):
                if i > 4096:
                    raise ValueError("gfn_tree too large")
                yield drgn.container_of(node, "struct kvm_memory_slot", f"gfn_node[{idx}]")
        # "kvm: optimize GFN to memslot lookup with large slots amount" (before 4.19, 9c1a5d38780e)
        elif "used_slots" in names:  # memslots[0..used_slots): 4.19 to 5.16
            for i in range(min(slots.used_slots.value_(), 4096)):
                yield slots.memslots[i]
        else:  # older than used_slots (before 4.19): fixed array, ends at npages == 0
            for s in slots.memslots:
                if not s.npages:
                    break
                yield s

    def change_marks(self, vm: VM) -> tuple[int, ...]:
        """What moves when a VM's MMU changes, read anew (no cache): mmu_valid_gen,
        the MMU notifier sequence, the heads of active_mmu_pages and tdp_mmu_roots.
        A live reading is torn when these differ before and after it."""
        kvm = self.kvm_object(vm)
        marks = [kvm.arch.mmu_valid_gen.value_(), kvm.arch.active_mmu_pages.next.value_()]
        if self.layout.tdp_mmu_roots:
            marks.append(kvm.arch.tdp_mmu_roots.next.value_())
        # "KVM: Rename mmu_notifier_* to mmu_invalidate_*" (6.0, 20ec3ebd707c)
        for name in ("mmu_invalidate_seq", "mmu_notifier_seq"):
            if has_member(kvm.type_, name):
                marks.append(kvm.member_(name).value_())
                break
        return tuple(marks)

    def vm_by_id(self, ident: str) -> VM:
        """A VM by index (0, 1, ...: decimal), owner pid (pid:N), struct kvm address
        (hex, 0x optional), or name (kvm->stats_id "kvm-PID", or QEMU's guest name).
        A pid or name two VMs share (one VMM process may own several VMs) is a
        LookupFailed naming them, never a silent choice of the first."""
        vms = self.vms()
        ident = ident.strip()
        if ident.startswith("pid:"):
            try:
                pid = int(ident[4:], 0)
            except ValueError:
                raise LookupFailed(f"no VM {ident!r} (pid:PID takes a number)") from None
            found = [v for v in vms if v.pid == pid]
            if len(found) > 1:
                raise LookupFailed(f"VM {ident!r} is ambiguous: pid {pid} owns VMs "
                                   + ", ".join(str(v.index) for v in found) + " (use the index)")
            if not found:
                raise LookupFailed(f"no VM {ident!r}")
            return found[0]
        try:
            n: int | None = int(ident, 0)
        except ValueError:
            n = None
        if n is not None:
            for v in vms:
                if (n < 0x10000 and v.index == n) or v.addr == n:
                    return v
        elif any(ident in v.names for v in vms):
            return self._vm_by_name(ident, vms)
        # a struct kvm address typed without 0x (addresses are hex, 0x optional)
        if ident and all(c in "0123456789abcdefABCDEF" for c in ident):
            for v in vms:
                if v.addr == int(ident, 16):
                    return v
        if n is None:
            return self._vm_by_name(ident, vms)  # no such VM: says what --vm takes
        raise LookupFailed(f"no VM {ident!r} (have {len(vms)})")

    def _vm_by_name(self, name: str, vms: list[VM]) -> VM:
        """The one VM named *name* (VM.names)."""
        found = [v for v in vms if name in v.names]
        if len(found) == 1:
            return found[0]
        if found:
            raise LookupFailed(f"VM name {name!r} is ambiguous: VMs "
                               + ", ".join(str(v.index) for v in found) + " (use the index)")
        raise LookupFailed(f"no VM {name!r} (have {len(vms)}: index, pid:PID, kvm address, "
                           "or name)")


def qemu_guest_name(argv: list[str]) -> str | None:
    """The guest name of a QEMU command line: '-name guest=NAME[,...]' (as libvirt
    starts it) or '-name NAME[,...]' (the implied key is guest; ',,' is a comma);
    the last -name wins, as in QEMU. None without one."""
    name = None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            name = _name_option(argv[i + 1]) or name
    return name


def _name_option(value: str) -> str | None:
    """The guest= value of one -name option's QemuOpts string."""
    parts = value.replace(",,", "\0").split(",")
    for i, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if eq and key == "guest":
            return val.replace("\0", ",") or None
        if i == 0 and not eq:
            return part.replace("\0", ",") or None
    return None
