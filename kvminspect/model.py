"""The kernel model: KVM's VMs, vCPUs, MMU roots and shadow pages, read-only.

Everything here reads the target through drgn and returns plain dataclasses;
nothing renders. Hot paths (struct kvm_mmu_page, page tables) read each
object as one block and decode fields by offset. Anything unreadable is
recorded as a Problem on the Kernel and skipped.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import drgn
from drgn.helpers.linux.pid import find_task, pid_task

from kvminspect import spte
from kvminspect.errors import LookupFailed, Problem
from kvminspect.layout import (
    INVALID_PAGE,
    PAGE_SHIFT,
    PT_PRESENT_MASK,
    UNKNOWN,
    Layout,
    MissingMember,
    Unknown,
    _bare,
    known,
    probe,
)

MAX_LIST = 1 << 20  # no kernel list kvminspect walks is this long
KERNEL_MIN = 0xFF00000000000000  # 5-level paging puts the direct map at 0xff11...
LIST_POISON = (0xDEAD000000000100, 0xDEAD000000000122)
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
Int = int | Unknown  # a counter or id that this kernel may lack (UNKNOWN)


@dataclass(frozen=True)
class Role:
    """union kvm_mmu_page_role, decoded by its DWARF bitfields."""

    word: int
    fields: dict[str, int]

    def get(self, name: str, default: int = 0) -> int:
        return self.fields.get(name, default)

    @property
    def level(self) -> int:
        return self.get("level")

    @property
    def direct(self) -> bool:
        return bool(self.get("direct"))

    @property
    def invalid(self) -> bool:
        return bool(self.get("invalid"))


@dataclass
class ShadowPage:
    """struct kvm_mmu_page: one shadow (or TDP) page table and its state.

    ``level`` is the page table's level: role.level, except for the child
    pages of 5.10's TDP MMU, whose role.level is one too high (see
    Kernel.tdp_child_level_is_parents).
    """

    addr: int
    gfn: int
    level: int
    role: Role
    spt: int
    unsync: bool | Unknown
    unsync_children: Int
    unsync_child_bitmap: Int  # 512 bits, bit i = spt[i]
    root_count: Int
    mmu_valid_gen: Int
    tdp_mmu_page: bool
    obsolete: bool = False  # role.invalid or an old mmu_valid_gen (is_obsolete_sp)

    def bitmap_indexes(self) -> list[int]:
        """Set bits of unsync_child_bitmap, ascending (none when unknown)."""
        b, out = self.unsync_child_bitmap or 0, []
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


@dataclass
class RootRef:
    """A root of a vCPU's MMU: mmu->root or one of mmu->prev_roots[]."""

    hpa: int | None  # None for INVALID_PAGE
    pgd: int
    sp: ShadowPage | None
    special: str | None = None  # pae_root / pml4_root / pml5_root / dummy
    # (i, struct kvm_mmu_page) of each present mmu->pae_root[i] under a PAE root
    pae_roots: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class VCpu:
    """struct kvm_vcpu with its current MMU."""

    addr: int
    vcpu_id: Int
    vcpu_idx: int
    tid: int | None
    comm: str | None
    cpu: Int
    mode: str | Unknown
    mp_state: str | Unknown
    cr3: Int
    mmu_name: str  # root_mmu / guest_mmu
    root_level: int
    direct: bool
    root: RootRef | None
    prev_roots: list[RootRef]
    stat: dict[str, int]


@dataclass
class Memslot:
    """struct kvm_memory_slot."""

    as_id: int
    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int


@dataclass
class VM:
    """struct kvm: one VM, its owner and its MMU-wide state."""

    index: int
    addr: int
    pid: Int
    comm: str | None
    task_state: str | None
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
    vm_type: str | None = None  # kvm->arch.vm_type (6.8+): default, sev, ..., tdx

    @property
    def unsupported(self) -> str | None:
        """Why kvminspect cannot read this VM's MMU, or None."""
        if self.vm_type == "tdx":
            return "TDX VM (mirror and external roots)"
        return None


def _struct_int(data: bytes, off: int, size: int, signed: bool = False) -> int:
    return int.from_bytes(data[off:off + size], "little", signed=signed)


def _counters(obj: drgn.Object, type_: drgn.Type | None = None) -> dict[str, int]:
    """Integer members of a stats struct (kvm->stat / vcpu->stat), flattened.

    Unnamed structs/unions are looked through (5.15 put pages_4k/2m/1g in
    one), and a one-member wrapper such as atomic64_t takes the member's name.
    """
    out: dict[str, int] = {}
    for m in _bare(type_ if type_ is not None else obj.type_).members or ():
        mt = _bare(m.type)
        if m.name is None:
            if mt.kind in (drgn.TypeKind.STRUCT, drgn.TypeKind.UNION):
                out.update(_counters(obj, mt))  # members reachable by name from obj
        elif mt.kind in (drgn.TypeKind.INT, drgn.TypeKind.BOOL):
            out[m.name] = getattr(obj, m.name).value_()
        elif mt.kind == drgn.TypeKind.STRUCT:
            inner = _counters(getattr(obj, m.name))
            if len(mt.members) == 1 and len(inner) == 1:
                out[m.name] = next(iter(inner.values()))
            else:
                out.update(inner)
    return out


class Kernel:
    """KVM state of one target, read on demand and cached per target."""

    def __init__(self, prog: drgn.Program, release: str | None = None) -> None:
        self.prog = prog
        self.layout: Layout = probe(prog, release)
        self.problems: list[Problem] = []
        self._sp_cache: dict[int, ShadowPage | None] = {}
        self._spt_cache: dict[int, array.array | None] = {}
        self._vms: list[VM] | None = None
        self._tdp_quirk: bool | None = None
        self._spte_format: spte.SpteFormat | None = None
        self._vcpus: dict[int, list[VCpu]] = {}

    # -- problems -----------------------------------------------------------

    @property
    def missing(self) -> tuple[MissingMember, ...]:
        """Members the model reads that this kernel lacks (shown as unknown)."""
        return self.layout.missing

    def value(self, obj: drgn.Object, struct: str, member: str) -> Int:
        """obj.member's integer value, or UNKNOWN when *struct* lacks *member*."""
        if self.layout.lacks(struct, member):
            return UNKNOWN
        return obj.member_(member).value_()

    def problem(self, kind: str, addr: int | None, what: str) -> None:
        """Record an unreadable or inconsistent object (once)."""
        p = Problem(kind, addr, what)
        if p not in self.problems:
            self.problems.append(p)

    # -- lists --------------------------------------------------------------

    def list_nodes(self, head: int, kind: str) -> Iterator[int]:
        """Addresses of the nodes of a struct list_head list, bounded and cycle-safe."""
        seen = {head}
        try:
            node = self.prog.read_u64(head)
        except drgn.FaultError as e:
            self.problem(kind, head, f"list head unreadable ({e})")
            return
        if node == 0:  # never initialised (e.g. the TDP MMU lists of a shadow VM)
            return
        while node != head:
            if node in LIST_POISON or node < KERNEL_MIN:
                self.problem(kind, node, "list pointer is poisoned or not a kernel address")
                return
            if node in seen or len(seen) > MAX_LIST:
                self.problem(kind, head, f"list loops at {node:#x}")
                return
            seen.add(node)
            yield node
            try:
                node = self.prog.read_u64(node)
            except drgn.FaultError as e:
                self.problem(kind, node, f"list node unreadable ({e})")
                return

    # -- VMs ------------------------------------------------------------------

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
                vm = self._read_vm(i, node - off)
                if vm is not None:
                    vms.append(vm)
            self._vms = vms
        return self._vms

    def kvm_object(self, vm: VM) -> drgn.Object:
        return drgn.Object(self.prog, "struct kvm *", vm.addr)

    def _read_vm(self, index: int, addr: int) -> VM | None:
        """One struct kvm; None (and a problem) when it cannot be read."""
        kvm = drgn.Object(self.prog, "struct kvm *", addr)
        v = self.value
        try:
            pid = v(kvm, "struct kvm", "userspace_pid")
            comm = state = None
            try:
                task = find_task(self.prog, pid) if known(pid) else None
                if task:
                    comm = task.comm.string_().decode(errors="replace")
                    from drgn.helpers.linux.sched import task_state_to_char
                    state = task_state_to_char(task)
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
            )
        except drgn.FaultError as e:
            self.problem("struct kvm", addr, f"unreadable ({e})")
            return None

    def _stat(self, obj: drgn.Object, kind: str, addr: int) -> dict[str, int]:
        try:
            return _counters(obj)
        except drgn.FaultError as e:
            self.problem(kind, addr, f"unreadable ({e})")
            return {}

    def _memslots(self, kvm: drgn.Object) -> list[Memslot]:
        """The memslots of every address space of one VM."""
        out: list[Memslot] = []
        t = _bare(kvm.type_.type)
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
        st = _bare(slots.type_.type)
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

    def vm_by_id(self, ident: str) -> VM:
        """A VM by index (0, 1, ...), owner pid (pid:N) or struct kvm address."""
        vms = self.vms()
        ident = ident.strip()
        try:
            if ident.startswith("pid:"):
                pid = int(ident[4:], 0)
                return next(v for v in vms if v.pid == pid)
            n = int(ident, 0)
        except (ValueError, StopIteration):
            raise LookupFailed(f"no VM {ident!r}") from None
        for v in vms:
            if (n < 0x10000 and v.index == n) or v.addr == n:
                return v
        raise LookupFailed(f"no VM {ident!r} (have {len(vms)})")

    # -- vCPUs --------------------------------------------------------------

    def vcpu_objects(self, vm: VM) -> list[drgn.Object]:
        """struct kvm_vcpu * for index 0..online_vcpus-1."""
        kvm = self.kvm_object(vm)
        if not known(vm.online_vcpus):
            return []
        n = min(vm.online_vcpus, 4096)
        out = []
        for i in range(n):
            try:
                if self.layout.vcpu_array:  # 5.16: vcpu_array xarray
                    from drgn.helpers.linux.xarray import xa_load

                    v = drgn.cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
                else:
                    v = kvm.vcpus[i]
                if not v:
                    self.problem("struct kvm", vm.addr, f"vCPU index {i} missing")
                    continue
                out.append(v)
            except drgn.FaultError as e:
                self.problem("struct kvm", vm.addr, f"vCPU index {i} unreadable ({e})")
        return out

    def vcpus(self, vm: VM) -> list[VCpu]:
        """Every online vCPU of *vm*, with its MMU roots."""
        if vm.addr not in self._vcpus:
            out = []
            for v in self.vcpu_objects(vm):
                vc = self._read_vcpu(vm, v)
                if vc is not None:
                    out.append(vc)
            self._vcpus[vm.addr] = out
        return self._vcpus[vm.addr]

    def _read_vcpu(self, vm: VM, v: drgn.Object) -> VCpu | None:
        addr = v.value_()
        lacks = self.layout.lacks
        try:
            tid = comm = None
            try:
                task = None
                if not lacks("struct kvm_vcpu", "pid") and v.pid:
                    task = pid_task(v.pid.read_(), 0)  # PIDTYPE_PID
                if task:
                    tid = task.pid.value_()
                    comm = task.comm.string_().decode(errors="replace")
            except (drgn.FaultError, LookupError):
                pass
            mode = self.value(v, "struct kvm_vcpu", "mode")
            mp_state = self.value(v.arch, "struct kvm_vcpu_arch", "mp_state")
            arch = v.arch
            mmu = arch.mmu if self.layout.mmu_is_pointer else arch.mmu.address_of_()
            mmu_addr = mmu.value_()
            mmu_name = next((n for n in ("root_mmu", "guest_mmu", "nested_mmu")
                             if self._has(arch, n)
                             and getattr(arch, n).address_of_().value_() == mmu_addr), "mmu")
            root, prev, level, direct = self._read_mmu(vm, mmu)
            return VCpu(
                addr=addr, vcpu_id=self.value(v, "struct kvm_vcpu", "vcpu_id"),
                vcpu_idx=v.vcpu_idx.value_() if self._has(v, "vcpu_idx") else -1,
                tid=tid, comm=comm, cpu=self.value(v, "struct kvm_vcpu", "cpu"),
                mode=UNKNOWN if not known(mode)
                else VCPU_MODES[mode] if 0 <= mode < len(VCPU_MODES) else str(mode),
                mp_state=UNKNOWN if not known(mp_state)
                else MP_STATES.get(mp_state, str(mp_state)),
                cr3=self.value(arch, "struct kvm_vcpu_arch", "cr3"), mmu_name=mmu_name,
                root_level=level, direct=direct, root=root, prev_roots=prev,
                stat=({} if lacks("struct kvm_vcpu", "stat")
                      else self._stat(v.stat, "vcpu->stat", addr)),
            )
        except drgn.FaultError as e:
            self.problem("struct kvm_vcpu", addr, f"unreadable ({e})")
            return None

    @staticmethod
    def _has(obj: drgn.Object, name: str) -> bool:
        try:
            obj.member_(name)
        except LookupError:
            return False
        return True

    def _read_mmu(self, vm: VM, mmu: drgn.Object
                  ) -> tuple[RootRef | None, list[RootRef], int, bool]:
        """struct kvm_mmu: (root, prev_roots, root level, direct)."""
        lay = self.layout
        try:
            if lay.root_info:  # 5.18: struct kvm_mmu_root_info root
                hpa, pgd = mmu.root.hpa.value_(), mmu.root.pgd.value_()
            else:
                hpa = mmu.root_hpa.value_()
                pgd = getattr(mmu, lay.root_pgd_name).value_() if lay.root_pgd_name else 0
            if lay.root_role:  # 5.19: root_role / cpu_role
                level, direct = mmu.root_role.level.value_(), bool(mmu.root_role.direct)
            else:
                level = mmu.shadow_root_level.value_()
                direct = bool(mmu.direct_map)
            root = self.root_ref(mmu, hpa, pgd)
        except drgn.FaultError as e:
            self.problem("struct kvm_mmu", mmu.value_(), f"unreadable ({e})")
            return None, [], 0, False
        prev = []
        for i, pr in enumerate(mmu.prev_roots):
            try:
                prev.append(self.root_ref(mmu, pr.hpa.value_(),
                                          getattr(pr, lay.prev_pgd_name).value_()))
            except drgn.FaultError as e:
                self.problem("struct kvm_mmu", mmu.value_(), f"prev_roots[{i}] unreadable ({e})")
        return root, prev, level, direct

    def root_ref(self, mmu: drgn.Object, hpa: int, pgd: int) -> RootRef:
        """Resolve a root hpa: a shadow page, a special (PAE) root, or invalid."""
        if hpa == INVALID_PAGE:
            return RootRef(None, pgd, None)
        for name in self.layout.special_roots:
            try:
                va = getattr(mmu, name).value_()
            except drgn.FaultError:
                continue
            if va and va - self.layout.page_offset_base == hpa:
                return RootRef(hpa, pgd, None, special=name, pae_roots=self._pae_roots(mmu))
        try:
            sp_addr = self.page_private(hpa >> PAGE_SHIFT)
        except drgn.FaultError as e:
            self.problem("root", hpa, f"pgd {pgd:#x}: hpa has no readable struct page ({e})")
            return RootRef(hpa, pgd, None, special="unreadable")
        if not sp_addr:
            # 6.6: a root may be the zero page ("dummy root", no backing memslot)
            return RootRef(hpa, pgd, None, special="dummy")
        return RootRef(hpa, pgd, self.shadow_page(sp_addr))

    def _pae_roots(self, mmu: drgn.Object) -> list[tuple[int, int]]:
        """(i, shadow page) of each present mmu->pae_root[i], i < 4 (PAE and 32-bit guests)."""
        out = []
        try:
            pae = mmu.pae_root.value_()
            if not pae:
                return out
            for i in range(4):
                e = self.prog.read_u64(pae + 8 * i)
                # empty slots are 0 or INVALID_PAGE to 5.12, 0 from 5.14
                if e in (0, INVALID_PAGE) or not e & PT_PRESENT_MASK:
                    continue
                sp = self.page_to_sp((e & self.layout.addr_mask) >> PAGE_SHIFT)
                if sp:
                    out.append((i, sp))
        except (drgn.FaultError, LookupError) as e:
            self.problem("struct kvm_mmu", mmu.value_(), f"pae_root unreadable ({e})")
        return out

    # -- shadow pages ---------------------------------------------------------

    def page_private(self, pfn: int) -> int:
        """page_private(pfn_to_page(pfn)); FaultError if there is no such struct page."""
        lay = self.layout
        page = lay.vmemmap_base + pfn * lay.page_size + lay.page_private
        if page >= 2**64:
            raise drgn.FaultError("pfn beyond any struct page", pfn)
        return self.prog.read_u64(page)

    def page_to_sp(self, pfn: int) -> int | None:
        """The struct kvm_mmu_page of a page table (to_shadow_page), or None.

        None both when the page has no private pointer and when its struct page
        cannot be read (e.g. an SPTE of a garbage page table): callers say which
        object pointed there.
        """
        try:
            return self.page_private(pfn) or None
        except drgn.FaultError:
            return None

    def shadow_page(self, addr: int, vm: VM | None = None) -> ShadowPage | None:
        """struct kvm_mmu_page at *addr*, read as one block; None if unreadable."""
        if addr in self._sp_cache:
            return self._sp_cache[addr]
        lay = self.layout.sp
        if lay is None:  # a structural member is missing (a MissingMember says which)
            return None
        sp: ShadowPage | None = None
        try:
            if addr < KERNEL_MIN:
                raise drgn.FaultError("not a kernel address", addr)
            d = self.prog.read(addr, lay.size)
            word = _struct_int(d, lay.role, 4)
            role = Role(word, {f.name: f.get(word) for f in lay.role_fields})
            def opt(off: int | None, size: int, signed: bool = False) -> Int:
                return UNKNOWN if off is None else _struct_int(d, off, size, signed)

            unsync = opt(lay.unsync, 1)
            root_count = opt(lay.root_count, 4, signed=True)
            tdp = bool(d[lay.tdp_mmu_page]) if lay.tdp_mmu_page is not None else False
            level = role.level
            if tdp and root_count == 0 and self.tdp_child_level_is_parents():
                level -= 1
            sp = ShadowPage(
                addr=addr,
                gfn=_struct_int(d, lay.gfn, 8),
                level=level,
                role=role,
                spt=_struct_int(d, lay.spt, 8),
                unsync=bool(unsync) if known(unsync) else UNKNOWN,
                unsync_children=opt(lay.unsync_children, 4),
                unsync_child_bitmap=opt(lay.unsync_child_bitmap, lay.bitmap_bytes),
                root_count=root_count,
                mmu_valid_gen=opt(lay.mmu_valid_gen, lay.mmu_valid_gen_size),
                tdp_mmu_page=tdp,
            )
            if not 1 <= role.level <= 5:
                self.problem("struct kvm_mmu_page", addr, f"impossible level {role.level}")
            if known(sp.unsync_children) and sp.unsync_children > 512:
                self.problem("struct kvm_mmu_page", addr,
                             f"impossible unsync_children {sp.unsync_children}")
        except drgn.FaultError as e:
            self.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
        self._sp_cache[addr] = sp
        return sp

    def tdp_child_level_is_parents(self) -> bool:
        """Whether TDP MMU child pages carry their parent's level in role.level.

        5.10's kvm_tdp_mmu_map() allocated each child page table with
        alloc_tdp_mmu_page(vcpu, iter.gfn, iter.level): the level of the SPTE
        pointing at it, one above its own (fixed by "KVM: x86/mmu: Fix TDP MMU
        page table level", 5.13); roots were right. Decided once, from the
        first TDP MMU root with a child: is the child's role.level the root's?
        Read raw, without the shadow-page cache (whose levels depend on it).
        """
        if self._tdp_quirk is None:
            self._tdp_quirk = False  # also while deciding: no recursion
            try:
                self._tdp_quirk = self._first_tdp_child_level_equal()
            except (drgn.FaultError, LookupError, ValueError):
                pass
        return self._tdp_quirk

    def _first_tdp_child_level_equal(self) -> bool:
        """See tdp_child_level_is_parents (struct kvm_mmu_page, raw reads)."""
        lay = self.layout
        if lay.sp is None or lay.sp.tdp_mmu_page is None or not lay.tdp_mmu_roots:
            return False
        level_of = next((f for f in lay.sp.role_fields if f.name == "level"), None)
        if level_of is None:
            return False
        off = drgn.offsetof(self.prog.type("struct kvm"), "arch") + drgn.offsetof(
            self.prog.type("struct kvm_arch"), "tdp_mmu_roots")
        vm_off = drgn.offsetof(self.prog.type("struct kvm"), "vm_list")
        for node in self.list_nodes(self.prog.symbol("vm_list").address, "vm_list"):
            for root in self.list_nodes(node - vm_off + off, "kvm->arch.tdp_mmu_roots"):
                root -= lay.sp.link
                level = level_of.get(self.prog.read_u32(root + lay.sp.role))
                spt = self.prog.read_u64(root + lay.sp.spt)
                for value in array.array("Q", self.prog.read(spt, 4096)):
                    if self.spte_present(value) and not spte.is_large_pte(value):
                        child = self.page_to_sp((value & lay.addr_mask) >> PAGE_SHIFT)
                        if child:
                            return level_of.get(self.prog.read_u32(child + lay.sp.role)) == level
        return False

    def mark_obsolete(self, sp: ShadowPage, vm: VM) -> None:
        """is_obsolete_sp(): role.invalid, or an old generation (not TDP MMU)."""
        sp.obsolete = sp.role.invalid or (
            not sp.tdp_mmu_page and known(sp.mmu_valid_gen) and known(vm.mmu_valid_gen)
            and sp.mmu_valid_gen != vm.mmu_valid_gen)

    def sptes(self, sp: ShadowPage) -> array.array | None:
        """sp->spt[0..511] as one 4 KiB read; None if unreadable."""
        if sp.addr not in self._spt_cache:
            out: array.array | None = array.array("Q")
            try:
                if sp.spt < KERNEL_MIN:
                    raise drgn.FaultError("not a kernel address", sp.spt)
                out.frombytes(self.prog.read(sp.spt, 4096))
                if sys.byteorder != "little":
                    out.byteswap()
            except drgn.FaultError as e:
                self.problem("struct kvm_mmu_page", sp.addr, f"spt {sp.spt:#x} unreadable ({e})")
                out = None
            self._spt_cache[sp.addr] = out
        return self._spt_cache[sp.addr]

    @property
    def spte_format(self) -> spte.SpteFormat:
        """This release's SPTE decoding rules (kvminspect.spte)."""
        if self._spte_format is None:
            self._spte_format = spte.SpteFormat(self.layout.present_bit, self.layout.addr_mask)
        return self._spte_format

    def spte_present(self, value: int) -> bool:
        """is_shadow_present_pte() of this release (kvminspect.spte)."""
        return spte.is_shadow_present_pte(value, self.spte_format)

    def decode(self, sp: ShadowPage, index: int, value: int, resolve: bool = True) -> Spte:
        """One SPTE of *sp*: presence, leaf-ness and the child shadow page."""
        d = spte.decode(value, sp.level, self.spte_format)
        child = None
        if d.present and not d.leaf and resolve:
            child = self.page_to_sp(d.pfn)
        return Spte(index, value, d.present, d.large, d.leaf, d.pfn, child)

    def children(self, sp: ShadowPage) -> list[Spte]:
        """Present non-leaf SPTEs of *sp* with their child shadow pages."""
        if sp.level <= 1:
            return []
        spt = self.sptes(sp)
        if spt is None:
            return []
        fmt, present = self.spte_format, spte.is_shadow_present_pte
        return [self.decode(sp, i, value) for i, value in enumerate(spt)
                if value and present(value, fmt) and not spte.is_large_pte(value)]

    def active_pages(self, vm: VM) -> list[int]:
        """Shadow pages on kvm->arch.active_mmu_pages (and 6.1's tdp_mmu_pages)."""
        if self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        link = self.layout.sp.link
        heads = [("active_mmu_pages", kvm.arch.active_mmu_pages.address_of_().value_())]
        if self.layout.tdp_mmu_pages_list:
            heads.append(("tdp_mmu_pages", kvm.arch.tdp_mmu_pages.address_of_().value_()))
        out = []
        for name, head in heads:
            out.extend(n - link for n in self.list_nodes(head, f"kvm->arch.{name}"))
        return out

    def tdp_roots(self, vm: VM) -> list[int]:
        """TDP MMU roots on kvm->arch.tdp_mmu_roots (invalid roots stay listed)."""
        if not self.layout.tdp_mmu_roots or self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        head = kvm.arch.tdp_mmu_roots.address_of_().value_()
        return [n - self.layout.sp.link for n in self.list_nodes(head, "kvm->arch.tdp_mmu_roots")]
