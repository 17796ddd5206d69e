"""VM-wide MMU state that explains stuck vCPUs: the MMU notifier's invalidation
sequence and range (struct kvm), NX huge pages (kvm.ko's nx_huge_pages,
kvm->arch.possible_nx_huge_pages) and the shadow-page hash
(kvm->arch.mmu_page_hash[] buckets)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import drgn

from kvminspect.layout import UNKNOWN, Int, bare_type, has_member, known
from kvminspect.memory import Memory
from kvminspect.objects import VM

MAX_CHAIN = 1 << 20  # no hash chain is this long
INVALID_GPA = (1 << 64) - 1  # ~(gpa_t)0: the range's value between invalidations (6.8+)


class RangeUnit(Enum):
    """What kvm->mmu_invalidate_range_start/end count."""

    HVA = "hva"  # host virtual addresses (unsigned long), 5.12 to 6.7
    GFN = "gfn"  # guest frame numbers (gfn_t) from 6.8
    UNKNOWN = "unknown"  # no range (before 5.12)


@dataclass(frozen=True)
class Invalidation:
    """struct kvm's MMU notifier state: a page fault that began before the last
    invalidation, or overlaps one in progress, retries (mmu_invalidate_retry)."""

    prefix: str | None  # "mmu_invalidate" (6.0+), "mmu_notifier" (before), None: neither
    seq: Int
    in_progress: Int  # mmu_invalidate_in_progress / mmu_notifier_count
    # [range_start, range_end) in *unit*; UNKNOWN without the range: "KVM: x86/mmu:
    # Consider the hva in mmu_notifier retry" (5.12, 4a42d848db95) added it, so not in
    # the 5.10 fixture's DWARF; a release difference (as kvm->stats_id before 5.14),
    # not a warning
    range_start: Int
    range_end: Int
    unit: RangeUnit = RangeUnit.UNKNOWN

    def in_range(self, address: int, unit: RangeUnit) -> bool | None:
        """Whether *address*, in *unit* (an hva, or a gfn: pass a GPA as gpa >> 12),
        lies in the invalidation in progress, as the fault path's retry check tests
        it: mmu_invalidate_retry_gfn() (mmu_invalidate_retry_hva() to 6.7) retries
        while in_progress is non-zero and range_start <= address < range_end, and
        (6.8+) always while the range is still INVALID_GPA. False when no
        invalidation is in progress; None when this cannot be said: the count or
        range unknown, or *unit* not the range's (translate the address first)."""
        if not known(self.in_progress):
            return None
        if self.in_progress == 0:
            return False
        if (not known(self.range_start) or not known(self.range_end)
                or unit is RangeUnit.UNKNOWN or unit is not self.unit):
            return None
        if unit is RangeUnit.GFN and INVALID_GPA in (self.range_start, self.range_end):
            return True  # WARN_ON_ONCE(...range_start == INVALID_GPA ...) return 1
        return self.range_start <= address < self.range_end


@dataclass(frozen=True)
class HashStats:
    """kvm->arch.mmu_page_hash[]: the shadow MMU's gfn hash, bucket by bucket."""

    buckets: int
    used: int  # buckets with at least one page
    pages: int  # pages on all chains
    longest: int
    histogram: dict[int, int] = field(default_factory=dict)  # chain length -> buckets


@dataclass(frozen=True)
class NxHugePages:
    """NX huge pages: kvm.ko's nx_huge_pages parameter, and the shadow pages
    that split a huge page for an executable mapping (possible_nx_huge_pages)."""

    param: Int  # 1 on, 0 off, -1 auto not yet decided; UNKNOWN without the symbol
    possible: Int  # pages on the list(s); UNKNOWN without the member
    # per MMU type from 7.3, as the 7.3 fixture's DWARF shows (commit not found)
    by_mmu: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MmuLock:
    """kvm->mmu_lock: a qrwlock ("KVM: x86/mmu: Use an rwlock for the x86 MMU"
    (5.12, 531810caa9f4)) counts readers and a writer but names neither; a
    spinlock (before) is only locked or not."""

    rwlock: bool
    writer: bool  # rwlock: _QW_LOCKED; spinlock: locked
    readers: int  # rwlock: cnts >> _QR_SHIFT; 0 for a spinlock
    error: str | None = None  # unreadable: why (the rest is meaningless)


@dataclass(frozen=True)
class VmState:
    """What of one VM's MMU state the 'vm' command shows beyond struct kvm's counters."""

    invalidation: Invalidation
    nx: NxHugePages
    hash: HashStats | None  # None: no hash (never allocated: lazily from 6.17, see _hash)
    hash_read: bool = True  # False: not asked for (a walk of every chain: 'vm' only)


class VmStates:
    """Reads VmState for a VM through *mem* (nothing cached: 'vm' reads it once per VM)."""

    def __init__(self, mem: Memory) -> None:
        self.mem = mem

    def reset(self) -> None:
        """Nothing to forget: every VmState is read anew."""

    def vm_state(self, vm: VM, hash_chains: bool = True) -> VmState:
        """The invalidation, NX huge page and hash state of *vm*'s struct kvm.

        *hash_chains*: walk every mmu_page_hash chain (a read per shadow page:
        'vm' does, 'vms', which must stay as cheap as listing the VMs, does not).
        """
        kvm = self.mem.object("struct kvm *", vm.addr)
        with self.mem.reading(vm.addr):
            return VmState(self._invalidation(kvm), self._nx(kvm),
                           self._hash(kvm) if hash_chains else None, hash_chains)

    def mmu_lock(self, vm: VM) -> MmuLock:
        """kvm->mmu_lock, read now: rwlock_t's qrwlock cnts (writer byte,
        readers from _QR_SHIFT 9) or spinlock_t's queued spinlock val."""
        try:
            lock = self.mem.object("struct kvm *", vm.addr).mmu_lock
            try:
                cnts = int(lock.raw_lock.cnts.counter.value_()) & 0xFFFFFFFF
            except AttributeError:
                val = int(lock.rlock.raw_lock.val.counter.value_())
                return MmuLock(False, bool(val & 0xFF), 0)
        except (drgn.FaultError, LookupError, AttributeError) as e:
            return MmuLock(False, False, 0, str(e))
        return MmuLock(True, bool(cnts & 0xFF), cnts >> 9)  # _QW_LOCKED, _QR_SHIFT

    def _invalidation(self, kvm: drgn.Object) -> Invalidation:
        """kvm->mmu_invalidate_{seq,in_progress,range_start,range_end}, formerly
        mmu_notifier_{seq,count,range_start,range_end}: "KVM: Rename mmu_notifier_* to
        mmu_invalidate_*" (6.0, 20ec3ebd707c). The range: see Invalidation."""
        t = kvm.type_
        for prefix, count in (("mmu_invalidate", "in_progress"), ("mmu_notifier", "count")):
            if not has_member(t, f"{prefix}_seq"):
                continue
            try:
                ranged = has_member(t, f"{prefix}_range_start")
                return Invalidation(
                    prefix, kvm.member_(f"{prefix}_seq").value_(),
                    kvm.member_(f"{prefix}_{count}").value_(),
                    kvm.member_(f"{prefix}_range_start").value_() if ranged else UNKNOWN,
                    kvm.member_(f"{prefix}_range_end").value_() if ranged else UNKNOWN,
                    _range_unit(kvm.member_(f"{prefix}_range_start").type_) if ranged
                    else RangeUnit.UNKNOWN)
            except drgn.FaultError as e:
                self.mem.problem("struct kvm", kvm.value_(), f"{prefix}_* unreadable ({e})")
        return Invalidation(None, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)

    def _nx(self, kvm: drgn.Object) -> NxHugePages:
        """kvm.ko's nx_huge_pages and the length of kvm->arch.possible_nx_huge_pages
        (formerly lpage_disallowed_mmu_pages: "KVM: x86/mmu: Rename NX huge pages
        fields/functions for consistency" (6.2, 55c510e26ab6); one struct
        kvm_possible_nx_huge_pages {pages, nr_pages} per MMU type in 7.3, as the 7.3
        fixture's DWARF shows, commit not found)."""
        try:
            param: Int = self.mem.variable("nx_huge_pages").value_()
        except (LookupError, drgn.FaultError):
            param = UNKNOWN
        arch = kvm.arch
        possible: Int = UNKNOWN
        by_mmu: dict[str, int] = {}
        try:
            for name in ("possible_nx_huge_pages", "lpage_disallowed_mmu_pages"):
                if not has_member(arch.type_, name):
                    continue
                m = arch.member_(name)
                if bare_type(m.type_).kind == drgn.TypeKind.ARRAY:
                    kinds = _mmu_types(self.mem, len(m))
                    for i, e in enumerate(m):
                        by_mmu[kinds[i]] = (e.nr_pages.value_() if has_member(e.type_, "nr_pages")
                                            else self._count(e.pages.address_of_().value_()))
                    possible = sum(by_mmu.values())
                else:
                    possible = self._count(m.address_of_().value_())
                break
        except drgn.FaultError as e:
            self.mem.problem("struct kvm_arch", kvm.value_(), f"possible_nx_huge_pages ({e})")
            possible = UNKNOWN
        return NxHugePages(param, possible, by_mmu)

    def _count(self, head: int) -> int:
        """Nodes of one list_head list (bounded, cycle-safe)."""
        return sum(1 for _ in self.mem.list_nodes(head, "possible_nx_huge_pages"))

    def _hash(self, kvm: drgn.Object) -> HashStats | None:
        """Chain lengths of kvm->arch.mmu_page_hash[KVM_NUM_MMU_PAGES]: an array, then a
        pointer from "KVM: x86/mmu: Dynamically allocate shadow MMU's hashed page list"
        (6.17, 039ef33e2f93; in 6.12.y from 6.12.112), NULL until the first shadow page
        from "KVM: x86/mmu: Defer allocation of shadow MMU's hashed page list" (6.17,
        9c4fe6d1509b)."""
        arch = kvm.arch
        if not has_member(arch.type_, "mmu_page_hash"):
            return None
        h = arch.mmu_page_hash
        try:
            if bare_type(h.type_).kind == drgn.TypeKind.ARRAY:
                n, base = len(h), h.address_of_().value_()
            else:
                base = h.value_()
                if not base:
                    return None
                n = 1 << 12  # KVM_NUM_MMU_PAGES (1 << KVM_MMU_HASH_SHIFT): a macro
            data = self.mem.read(base, 8 * n)
        except drgn.FaultError as e:
            self.mem.problem("struct kvm_arch", kvm.value_(), f"mmu_page_hash unreadable ({e})")
            return None
        lengths: Counter[int] = Counter()
        for i in range(n):
            node, length = int.from_bytes(data[8 * i:8 * i + 8], "little"), 0
            while node and length < MAX_CHAIN:
                length += 1
                try:
                    node = self.mem.read_word(node)  # hlist_node.next
                except drgn.FaultError as e:
                    self.mem.problem("mmu_page_hash", node, f"chain of bucket {i} unreadable ({e})")
                    break
            lengths[length] += 1
        used = n - lengths.get(0, 0)
        return HashStats(n, used, sum(k * v for k, v in lengths.items()),
                         max(lengths), {k: v for k, v in sorted(lengths.items()) if k})


def _range_unit(t: drgn.Type) -> RangeUnit:
    """The unit of kvm->mmu_invalidate_range_start by its DWARF type: gfn_t from "KVM:
    Use gfn instead of hva for mmu_notifier_retry" (6.8, 8569992d64b8), unsigned
    long (an hva) before, as the 6.12 and 6.1 fixtures' DWARF show."""
    while t.kind == drgn.TypeKind.TYPEDEF:
        if t.name == "gfn_t":
            return RangeUnit.GFN
        t = t.type
    return RangeUnit.HVA


def _mmu_types(mem: Memory, n: int) -> list[str]:
    """Names of enum kvm_mmu_type (KVM_SHADOW_MMU, KVM_TDP_MMU) by value, "shadow"/"tdp"."""
    names = [str(i) for i in range(n)]
    try:
        for e in mem.type("enum kvm_mmu_type").enumerators or ():
            if 0 <= e.value < n:
                names[e.value] = e.name.removeprefix("KVM_").removesuffix("_MMU").lower()
    except LookupError:
        pass
    return names
