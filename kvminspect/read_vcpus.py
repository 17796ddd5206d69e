"""struct kvm_vcpu: vCPUs, their MMU (struct kvm_mmu), roots and prev_roots.

Vcpus is the model's part for a VM's vCPUs (include/linux/kvm_host.h's struct
kvm_vcpu, arch/x86/include/asm/kvm_host.h's struct kvm_vcpu_arch and struct
kvm_mmu): each vCPU's thread and states, and the roots of its MMUs resolved to
shadow pages as to_shadow_page() does (arch/x86/kvm/mmu/mmu_internal.h).
"""

from __future__ import annotations

import drgn
from drgn.helpers.linux.pid import pid_task

from kvminspect.layout import (
    UNKNOWN,
    UNREADABLE,
    Layout,
    NoValue,
    has_member,
    kernel_release,
    known,
)
from kvminspect.memory import Memory
from kvminspect.objects import (
    MP_STATES,
    VCPU_MODES,
    VM,
    MmuRoots,
    RootKind,
    RootRef,
    VCpu,
    struct_int,
)
from kvminspect.read_pages import ShadowPages
from kvminspect.read_vms import Vms, read_counters
from kvminspect.requests import RequestTable, bit_names, table_for
from kvminspect.spte import INVALID_PAGE, PAGE_SHIFT, PT_PRESENT_MASK

# (root, prev_roots[]) of one struct kvm_mmu as (hpa or None, pgd) pairs: mmu_roots()
RootPair = tuple[int | None, int]
MmuRootWords = tuple[RootPair, tuple[RootPair, ...]]
# (rsvd_bits_mask[2][N], bad_mt_xwr) of struct rsvd_bits_validate: rsvd_masks()
RsvdMasks = tuple[tuple[tuple[int, ...], ...], int]


class Vcpus:
    """struct kvm_vcpu of each VM: vCPUs, their MMU (struct kvm_mmu), roots and prev_roots.

    Reads through *mem* by *layout*, finds each VM's struct kvm through *vms*
    and resolves roots to shadow pages through *pages*. Owns the vCPUs read per
    VM (reset()).
    """

    def __init__(self, mem: Memory, layout: Layout, vms: Vms, pages: ShadowPages) -> None:
        self.mem = mem
        self.layout = layout
        self.vms = vms
        self.pages = pages
        self._vcpus: dict[int, list[VCpu]] = {}
        self._mmu_offsets: tuple[int, ...] | None = None
        self._request_table: RequestTable | None = None
        self._request_table_read = False

    def reset(self, vm: VM | None = None) -> None:
        """Forget the vCPUs read of *vm* (of every VM when None)."""
        if vm is None:
            self._vcpus.clear()
        else:
            self._vcpus.pop(vm.addr, None)

    def vcpu_objects(self, vm: VM) -> list[drgn.Object]:
        """struct kvm_vcpu * for index 0..online_vcpus-1."""
        kvm = self.vms.kvm_object(vm)
        if not known(vm.online_vcpus):
            return []
        n = min(vm.online_vcpus, 4096)
        out = []
        for i in range(n):
            try:
                # "KVM: Convert the kvm->vcpus array to a xarray" (5.17, c5b077549136)
                if self.layout.vcpu_array:
                    from drgn.helpers.linux.xarray import xa_load

                    v = drgn.cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
                else:
                    v = kvm.vcpus[i]
                if not v:
                    self.mem.problem("struct kvm", vm.addr, f"vCPU index {i} missing")
                    continue
                out.append(v)
            except drgn.FaultError as e:
                self.mem.problem("struct kvm", vm.addr, f"vCPU index {i} unreadable ({e})")
        return out

    def vcpus(self, vm: VM) -> list[VCpu]:
        """Every online vCPU of *vm*, with its MMU roots."""
        if vm.addr not in self._vcpus:
            out = []
            with self.mem.reading(vm.addr):
                for v in self.vcpu_objects(vm):
                    vc = self._read_vcpu(v)
                    if vc is not None:
                        out.append(vc)
            self._vcpus[vm.addr] = out
        return self._vcpus[vm.addr]

    def _read_vcpu(self, v: drgn.Object) -> VCpu | None:
        """One struct kvm_vcpu with its thread and current MMU; None if unreadable."""
        addr = v.value_()
        lacks = self.layout.lacks
        try:
            tid: int | NoValue | None = None
            comm: str | NoValue | None = None
            try:
                task = None
                if not lacks("struct kvm_vcpu", "pid") and v.pid:
                    task = pid_task(v.pid.read_(), 0)  # PIDTYPE_PID
                if task:
                    tid = task.pid.value_()
                    comm = task.comm.string_().decode(errors="replace")
            except (drgn.FaultError, LookupError) as e:
                tid = comm = UNREADABLE
                self.mem.problem("struct kvm_vcpu", addr, f"vCPU thread unreadable ({e})")
            value = self.layout.value
            mode = value(v, "struct kvm_vcpu", "mode")
            mp_state = value(v.arch, "struct kvm_vcpu_arch", "mp_state")
            arch = v.arch
            # "x86/kvm/mmu: make vcpu->mmu a pointer to the current MMU" (4.20, 44dd3ffa7bb3)
            mmu = arch.mmu if self.layout.mmu_is_pointer else arch.mmu.address_of_()
            mmu_addr = mmu.value_()
            mmu_name = next((n for n in ("root_mmu", "guest_mmu", "nested_mmu")
                             if has_member(arch.type_, n)
                             and getattr(arch, n).address_of_().value_() == mmu_addr), "mmu")
            root, prev, level, direct = self._read_mmu(mmu)
            other = self._other_mmu(arch, mmu_name)
            requests = value(v, "struct kvm_vcpu", "requests")
            return VCpu(
                addr=addr, vcpu_id=value(v, "struct kvm_vcpu", "vcpu_id"),
                # "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd)
                vcpu_idx=v.vcpu_idx.value_() if has_member(v.type_, "vcpu_idx") else -1,
                tid=tid, comm=comm, cpu=value(v, "struct kvm_vcpu", "cpu"),
                mode=UNKNOWN if not known(mode)
                else VCPU_MODES[mode] if 0 <= mode < len(VCPU_MODES) else str(mode),
                mp_state=UNKNOWN if not known(mp_state)
                else MP_STATES.get(mp_state, str(mp_state)),
                cr3=value(arch, "struct kvm_vcpu_arch", "cr3"), mmu_name=mmu_name,
                root_level=level, direct=direct, root=root, prev_roots=prev,
                stat=({} if lacks("struct kvm_vcpu", "stat")
                      else read_counters(self.mem, v.stat, "vcpu->stat", addr)),
                requests=requests,
                request_names=tuple(bit_names(requests, self.request_table()))
                if known(requests) else (),
                other_mmu=other,
            )
        except drgn.FaultError as e:
            self.mem.problem("struct kvm_vcpu", addr, f"unreadable ({e})")
            return None

    def _other_mmu(self, arch: drgn.Object, current: str) -> MmuRoots | None:
        """The roots of the struct kvm_mmu of vcpu->arch that vcpu->arch.mmu does not
        point at: guest_mmu (the shadow NPT/EPT MMU of a nested guest, L2) while
        root_mmu is current, root_mmu while guest_mmu is. Both are embedded in
        struct kvm_vcpu_arch from "x86/kvm/mmu: introduce guest_mmu" (4.20); each
        holds its own root, prev_roots[] and pae_root. nested_mmu has no roots of its
        own: it is only the walker of L2's page tables (vcpu->arch.walk_mmu while in
        L2), so nothing is read from it. None before that change (one embedded MMU)
        or when the current MMU is not one of the two.
        """
        mmus = self.layout.root_mmus
        if current not in mmus or len(mmus) != 2:
            return None
        name = next(n for n in mmus if n != current)
        mmu = getattr(arch, name).address_of_()
        root, prev, level, direct = self._read_mmu(mmu)
        return MmuRoots(name, mmu.value_(), level, direct, root, prev)

    def request_table(self) -> RequestTable | None:
        """The KVM_REQ_* names of this kernel: macros, absent from the DWARF, so
        chosen by the UTS release's major.minor (kvminspect.requests)."""
        if not self._request_table_read:
            self._request_table_read = True
            self._request_table = table_for(kernel_release(self.mem.prog))
        return self._request_table

    def _read_mmu(self, mmu: drgn.Object
                  ) -> tuple[RootRef | None, list[RootRef], int, bool]:
        """struct kvm_mmu: (root, prev_roots, root level, direct)."""
        lay = self.layout
        try:
            # "KVM: x86: use struct kvm_mmu_root_info for mmu->root" (5.18, b9e5603c2a3a)
            if lay.root_info:
                hpa, pgd = mmu.root.hpa.value_(), mmu.root.pgd.value_()
            else:
                hpa = mmu.root_hpa.value_()
                # "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code" (5.8)
                pgd = getattr(mmu, lay.root_pgd_name).value_() if lay.root_pgd_name else 0
            # "KVM: x86/mmu: remove extended bits from mmu_role, rename field" (5.19, 7a458f0e1ba1)
            if lay.root_role:
                level, direct = mmu.root_role.level.value_(), bool(mmu.root_role.direct)
            else:
                level = mmu.shadow_root_level.value_()
                direct = bool(mmu.direct_map)
            root = self.root_ref(mmu, hpa, pgd)
        except drgn.FaultError as e:
            self.mem.problem("struct kvm_mmu", mmu.value_(), f"unreadable ({e})")
            return None, [], 0, False
        prev = []
        # prev_roots[].pgd: "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code" (5.8)
        for i, pr in enumerate(mmu.prev_roots):
            try:
                prev.append(self.root_ref(mmu, pr.hpa.value_(),
                                          getattr(pr, lay.prev_pgd_name).value_()))
            except drgn.FaultError as e:
                self.mem.problem("struct kvm_mmu", mmu.value_(),
                                 f"prev_roots[{i}] unreadable ({e})")
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
                return RootRef(hpa, pgd, None, special=RootKind(name),
                               pae_roots=self._pae_roots(mmu))
        try:
            sp_addr = self.pages.page_private(hpa >> PAGE_SHIFT)
        except drgn.FaultError as e:
            self.mem.problem("root", hpa, f"pgd {pgd:#x}: hpa has no readable struct page ({e})")
            return RootRef(hpa, pgd, None, special=RootKind.UNREADABLE)
        if not sp_addr:
            # the zero page, no backing memslot: "KVM: x86/mmu: Use dummy root, backed by zero
            # page, for !visible guest roots" (6.6, 0e3223d8d00a)
            return RootRef(hpa, pgd, None, special=RootKind.DUMMY)
        return RootRef(hpa, pgd, self.pages.shadow_page(sp_addr))

    def _pae_roots(self, mmu: drgn.Object) -> list[tuple[int, int]]:
        """(i, shadow page) of each present mmu->pae_root[i], i < 4 (PAE and 32-bit guests)."""
        out: list[tuple[int, int]] = []
        try:
            pae = mmu.pae_root.value_()
            if not pae:
                return out
            for i in range(4):
                e = self.mem.read_u64(pae + 8 * i)
                # empty slots are 0 or INVALID_PAGE to 5.12, 0 from "KVM: x86/mmu: Use '0' as
                # the one and only value for an invalid PAE root" (5.13, c834e5e44fc1)
                if e in (0, INVALID_PAGE) or not e & PT_PRESENT_MASK:
                    continue
                sp = self.pages.to_shadow_page((e & self.layout.addr_mask) >> PAGE_SHIFT)
                if sp:
                    out.append((i, sp))
        except (drgn.FaultError, LookupError) as e:
            self.mem.problem("struct kvm_mmu", mmu.value_(), f"pae_root unreadable ({e})")
        return out

    def mmu_roots(self, v: VCpu) -> MmuRootWords | None:
        """(root (hpa, pgd), prev_roots[] (hpa, pgd)) of a vCPU's current struct kvm_mmu,
        read as one block: on a running kernel, one reading of them all, not several.

        INVALID_PAGE hpas are None. None when the MMU cannot be read, or before 5.18
        (mmu->root_hpa: read it through vcpus() instead).
        """
        lay = self.layout
        if not lay.root_info or not lay.mmu_is_pointer:
            return None
        try:
            mem = self.mem
            if self._mmu_offsets is None:
                mmu_t = mem.type("struct kvm_mmu")
                info_t = mem.type("struct kvm_mmu_root_info")
                n = mmu_t.member("prev_roots").type.unaliased().length or 0
                self._mmu_offsets = (
                    drgn.offsetof(mem.type("struct kvm_vcpu"), "arch.mmu"),
                    drgn.offsetof(mmu_t, "root"), drgn.offsetof(mmu_t, "prev_roots"),
                    drgn.sizeof(info_t), drgn.offsetof(info_t, "hpa"),
                    drgn.offsetof(info_t, "pgd"), n)
            mmu_off, root_off, prev_off, size, hpa, pgd, n = self._mmu_offsets
            mmu = mem.read_u64(v.addr + mmu_off)
            start = min(root_off, prev_off)
            end = max(root_off, prev_off + n * size) + size
            d = mem.read(mmu + start, end - start)
        except (drgn.FaultError, LookupError, ValueError):
            return None

        def info(off: int) -> tuple[int | None, int]:
            h = struct_int(d, off - start + hpa, 8)
            return (None if h == INVALID_PAGE else h, struct_int(d, off - start + pgd, 8))

        return info(root_off), tuple(info(prev_off + i * size) for i in range(n))

    def rsvd_masks(self, vcpu: VCpu) -> RsvdMasks | None:
        """The reserved-bit masks of *vcpu*'s current MMU: mmu->shadow_zero_check
        (struct rsvd_bits_validate; mmu->fmt, struct kvm_page_format, in 7.3, as the
        7.3 fixture's DWARF shows; commit not found)
        as (rsvd_bits_mask[2][N], bad_mt_xwr); None if
        this kernel has neither or they cannot be read."""
        try:
            v = self.mem.object("struct kvm_vcpu *", vcpu.addr)
            mmu = v.arch.mmu if self.layout.mmu_is_pointer else v.arch.mmu.address_of_()
            for name in ("shadow_zero_check", "fmt"):
                try:
                    zc = mmu.member_(name)
                except LookupError:
                    continue
                rows = tuple(tuple(int(x) for x in zc.rsvd_bits_mask[b].read_()) for b in (0, 1))
                return rows, int(zc.bad_mt_xwr.value_())
        except (drgn.FaultError, LookupError, AttributeError, TypeError):
            pass
        return None
