"""struct kvm on vm_list: VMs, their owners, counters and memslots."""

from __future__ import annotations

from collections.abc import Iterator

import drgn
from drgn.helpers.linux.pid import find_task

from kvminspect.errors import LookupFailed
from kvminspect.layout import (
    UNKNOWN,
    bare_type,
    has_member,
    known,
)
from kvminspect.objects import (
    VENDOR_MODULES,
    VM,
    VM_TYPES,
    Int,
    Memslot,
    stat_counters,
)
from kvminspect.read_base import KernelBase


class VmReader(KernelBase):
    """struct kvm on vm_list: VMs, their owners, counters and memslots."""

    def tdp_enabled(self) -> bool:
        """kvm.ko's tdp_enabled: NPT/EPT in use for the guest's own MMU."""
        try:
            return bool(self.prog.read_u8(self.prog.symbol("tdp_enabled").address))
        except (LookupError, drgn.FaultError):
            return False

    def vendor(self) -> str | None:
        """The vendor module loaded (kvm_amd or kvm_intel), None if neither."""
        if not hasattr(self, "_vendor"):
            self._vendor = None
            try:
                for mod, _ in self.prog.loaded_modules():
                    if mod.name in VENDOR_MODULES:
                        self._vendor = mod.name
                        break
            except (drgn.FaultError, LookupError, ValueError):
                pass
        return self._vendor

    def _vm_type(self, kvm: drgn.Object) -> str | None:
        """kvm->arch.vm_type by name (6.8+), None before."""
        if not self.layout.vm_type:
            return None
        t = kvm.arch.vm_type.value_()
        return VM_TYPES.get(t, str(t))

    def _stats_id(self, kvm: drgn.Object) -> str | None:
        """kvm->stats_id, "kvm-PID" (a char array, 5.14+); None on older kernels."""
        if not hasattr(self, "_has_stats_id"):
            self._has_stats_id = has_member(self.prog.type("struct kvm"), "stats_id")
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
        """MMU pages in use: kvm->arch.n_used_mmu_pages, kvm->stat.mmu_shadow_pages in 7.3."""
        path = self.layout.used_pages_path
        if path is None:
            return UNKNOWN
        outer, inner = path.split(".")
        return kvm.member_(outer).member_(inner).value_()

    def _mmu_kind(self, kvm: drgn.Object) -> str:
        """shadow, tdp_mmu or tdp_legacy for one struct kvm."""
        if not self.tdp_enabled():
            return "shadow"
        if self.layout.tdp_mmu_per_vm:
            on = bool(kvm.arch.tdp_mmu_enabled.value_())
        else:
            try:
                on = bool(self.prog.read_u8(self.prog.symbol("tdp_mmu_enabled").address))
            except (LookupError, drgn.FaultError):
                on = False
        return "tdp_mmu" if on else "tdp_legacy"

    def vms(self) -> list[VM]:
        """Every struct kvm on the global vm_list, in list order."""
        if self._vms is None:
            head = self.prog.symbol("vm_list").address
            off = drgn.offsetof(self.prog.type("struct kvm"), "vm_list")
            vms = []  # cached only when complete (Ctrl-C may interrupt the walk)
            for i, node in enumerate(self.list_nodes(head, "vm_list")):
                with self.reading(node - off):
                    vm = self._read_vm(i, node - off)
                if vm is None:  # shown by no document as a VM: its problems are the list's
                    self.problems.disown(node - off)
                if vm is not None:
                    vms.append(vm)
            self._vms = vms
        return self._vms

    def vms_if_read(self) -> list[VM] | None:
        """The VMs vms() read, or None when it has not read them (or was interrupted)."""
        return self._vms

    def kvm_object(self, vm: VM) -> drgn.Object:
        return drgn.Object(self.prog, "struct kvm *", vm.addr)

    def _read_vm(self, index: int, addr: int) -> VM | None:
        """One struct kvm; None (and a problem) when it cannot be read."""
        kvm = drgn.Object(self.prog, "struct kvm *", addr)
        v = self.value
        try:
            pid = v(kvm, "struct kvm", "userspace_pid")
            comm = state = guest = None
            try:
                task = find_task(self.prog, pid) if known(pid) else None
                if task:
                    comm = task.comm.string_().decode(errors="replace")
                    from drgn.helpers.linux.sched import task_state_to_char
                    state = task_state_to_char(task)
                    guest = self._guest_name(task)
            except (LookupError, drgn.FaultError, ValueError):
                pass
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
                      else self._stat(kvm.stat, "kvm->stat", addr)),
                vendor=self.vendor(),
                vm_type=self._vm_type(kvm),
                stats_id=self._stats_id(kvm),
                guest_name=guest,
            )
        except drgn.FaultError as e:
            self.problem("struct kvm", addr, f"unreadable ({e})")
            return None

    def _stat(self, obj: drgn.Object, kind: str, addr: int) -> dict[str, int]:
        try:
            return stat_counters(obj)
        except drgn.FaultError as e:
            self.problem(kind, addr, f"unreadable ({e})")
            return {}

    def _memslots(self, kvm: drgn.Object) -> list[Memslot]:
        """The memslots of every address space of one VM."""
        out: list[Memslot] = []
        t = bare_type(kvm.type_.type)
        name = "memslots" if t.member("memslots").type.kind == drgn.TypeKind.ARRAY else None
        if name is None:
            return out
        for as_id, slots in enumerate(kvm.memslots):
            try:
                if not slots:
                    continue
                for s in self._slots_of(slots):
                    out.append(Memslot(as_id, s.id.value_(), s.base_gfn.value_(),
                                       s.npages.value_(), s.userspace_addr.value_(),
                                       s.flags.value_()))
            except (drgn.FaultError, LookupError, ValueError) as e:
                self.problem("struct kvm_memslots", slots.value_(), f"unreadable ({e})")
        return out

    def _slots_of(self, slots: drgn.Object) -> Iterator[drgn.Object]:
        """struct kvm_memory_slot of one struct kvm_memslots."""
        st = bare_type(slots.type_.type)
        names = {m.name for m in st.members}
        if "gfn_tree" in names:  # 5.17: memslots in an rbtree per node_idx
            from drgn.helpers.linux.rbtree import rbtree_inorder_for_each

            idx = slots.node_idx.value_()
            for i, node in enumerate(rbtree_inorder_for_each(slots.gfn_tree.address_of_())):
                if i > 4096:
                    raise ValueError("gfn_tree too large")
                yield drgn.container_of(node, "struct kvm_memory_slot", f"gfn_node[{idx}]")
        elif "used_slots" in names:  # 5.8-5.15: memslots[0..used_slots)
            for i in range(min(slots.used_slots.value_(), 4096)):
                yield slots.memslots[i]
        else:  # 4.19/5.4: fixed array, ends at npages == 0
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
        # 6.3 renamed mmu_notifier_seq to mmu_invalidate_seq
        for name in ("mmu_invalidate_seq", "mmu_notifier_seq"):
            if has_member(kvm.type_, name):
                marks.append(kvm.member_(name).value_())
                break
        return tuple(marks)

    def forget(self, vm: VM) -> None:
        """Drop what was read of *vm*'s vCPUs and of every shadow page (a re-read)."""
        self._vcpus.pop(vm.addr, None)
        self._sp_cache.clear()
        self._spt_cache.clear()
        self._by_spt.clear()
        self.drop_blocks()

    def vm_by_id(self, ident: str) -> VM:
        """A VM by index (0, 1, ...), owner pid (pid:N), struct kvm address, or name
        (kvm->stats_id "kvm-PID", or QEMU's guest name); a name two VMs share is
        a LookupFailed naming them."""
        vms = self.vms()
        ident = ident.strip()
        try:
            if ident.startswith("pid:"):
                pid = int(ident[4:], 0)
                return next(v for v in vms if v.pid == pid)
            n = int(ident, 0)
        except StopIteration:
            raise LookupFailed(f"no VM {ident!r}") from None
        except ValueError:
            return self._vm_by_name(ident, vms)
        for v in vms:
            if (n < 0x10000 and v.index == n) or v.addr == n:
                return v
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
