"""What changed in a host's KVM MMU from vmcore A to vmcore B: the model behind ``diff``.

Matching, as the kernel's object lifetimes allow:

* a VM (struct kvm) by its address, with the same owner pid (a freed struct
  kvm's address is reused: kvm_destroy_vm, kvm_create_vm), else by its owner
  pid; a VM on one side only is added or removed (pair_vms). One VM chosen
  in A is found in B by the same rules, and a pid that owns several VMs of B
  is ambiguous, never a silent choice (partner); two VMs chosen in each dump
  by one name pair by their name when neither rule pairs them (pair_of);
* a vCPU by vcpu_idx, its index in kvm->vcpu_array (vcpu_id on kernels without it:
  "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd));
* a shadow page by what it shadows, never by its address alone (struct
  kvm_mmu_page comes from mmu_page_header_cache: addresses are reused): its
  gfn, its role word without role.invalid (kvm_mmu_zap_all_fast sets that bit
  on the roots it keeps) and, for shadow-MMU pages, its mmu_valid_gen (a page
  made after a fast zap is a new page, not the obsolete one it replaces:
  is_obsolete_sp). Pages of one key are paired at the same address first,
  then in address order (a page rebuilt elsewhere: its "sp" changed), except
  that a page already invalid in A never pairs with another address: an
  invalid page is only freed, never revived (page_key, pair_pages).

Each result is a typed value compared as a value: a VmDiff per VM with its
Status, the counters that changed (Change), per vCPU a VcpuChange with the
RootChange of each root slot whose RootKey differs, and the pages zapped,
added and changed (PageChange, by PageField). kvminspect.shapes and the text
of kvminspect/commands/diff.py render them; nothing here reads a target or
renders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Generic, NamedTuple, TypeVar

from kvminspect.errors import LookupFailed
from kvminspect.graph import VMGraph
from kvminspect.layout import NoValue, known
from kvminspect.objects import VM, ShadowPage, VCpu
from kvminspect.results import (
    PageView,
    RootState,
    RootView,
    page_view,
    root_view,
    vm_mmu_stat,
)

T = TypeVar("T")

# struct kvm / kvm_arch counters compared old -> new (VM fields, as in shapes.vm_json)
COUNTERS = ("mmu_valid_gen", "n_used_mmu_pages", "n_max_mmu_pages", "n_requested_mmu_pages",
            "indirect_shadow_pages", "online_vcpus", "created_vcpus")


class Status(Enum):
    """A VM's or vCPU's part in the diff (JSON "status")."""

    ADDED = "added"  # only in B
    REMOVED = "removed"  # only in A
    CHANGED = "changed"
    UNCHANGED = "unchanged"


class MatchedBy(Enum):
    """How a VM of A was paired with one of B (JSON "matched_by")."""

    KVM = "kvm"  # the struct kvm address, with the same owner pid
    PID = "pid"  # the owner pid (the struct kvm is another one)
    NAME = "name"  # --vm NAME in both dumps: QEMU's guest name (another VMM process)


@dataclass(frozen=True)
class Change(Generic[T]):
    """One value before (A) and after (B); None where that side has none."""

    old: T
    new: T

    @property
    def changed(self) -> bool:
        return self.old != self.new


# -- VMs ------------------------------------------------------------------------


class VmPair(NamedTuple):
    """A VM of A and the VM of B it is paired with (None: on one side only)."""

    old: VM | None
    new: VM | None
    matched_by: MatchedBy | None


def _same_owner(a: VM, b: VM) -> bool:
    return a.pid == b.pid or not known(a.pid) or not known(b.pid)


def _same_kvm(a: VM, b: VM) -> bool:
    return a.addr == b.addr and _same_owner(a, b)


def _same_pid(a: VM, b: VM) -> bool:
    return known(a.pid) and a.pid == b.pid


def pair_vms(a: list[VM], b: list[VM]) -> list[VmPair]:
    """A's VMs each with B's (by struct kvm address and owner, else by owner pid),
    or removed; then B's VMs no pair took, added. In A's order, the added last
    (in B's order)."""
    left = list(b)
    match: dict[int, tuple[VM, MatchedBy]] = {}
    rules: tuple[tuple[MatchedBy, Callable[[VM, VM], bool]], ...] = (
        (MatchedBy.KVM, _same_kvm), (MatchedBy.PID, _same_pid))
    for how, same in rules:
        for va in a:
            if va.addr in match:
                continue
            vb = next((v for v in left if same(va, v)), None)
            if vb is not None:
                left.remove(vb)
                match[va.addr] = (vb, how)
    out = []
    for va in a:
        found = match.get(va.addr)
        out.append(VmPair(va, None, None) if found is None else VmPair(va, *found))
    return out + [VmPair(None, vb, None) for vb in left]


def _indices(vms: list[VM]) -> str:
    return ", ".join(str(v.index) for v in vms)


def partner(va: VM, b: list[VM]) -> tuple[VM, MatchedBy]:
    """A's VM *va* in B's VMs *b*, by pair_vms' rules for one VM: the VM with its
    struct kvm and owner, else the one VM with its owner pid. LookupFailed when
    none is, or when several VMs of B have that pid and none its struct kvm (one
    VMM process owns several VMs: only the struct kvm tells them apart)."""
    same = [v for v in b if _same_kvm(va, v)]
    if same:
        return same[0], MatchedBy.KVM
    by_pid = [v for v in b if _same_pid(va, v)]
    if len(by_pid) == 1:
        return by_pid[0], MatchedBy.PID
    if by_pid:
        raise LookupFailed(f"A's VM {va.index} is ambiguous: none has its struct kvm "
                           f"{va.addr:#x}, and its pid {va.pid} owns VMs {_indices(by_pid)}")
    raise LookupFailed(f"no VM has A's VM {va.index}'s struct kvm {va.addr:#x} or its "
                       f"pid {va.pid}")


def pair_of(va: VM, vb: VM, ident: str) -> MatchedBy | None:
    """How A's *va* and B's *vb*, each the VM --vm *ident* names in its dump, are
    one VM: by struct kvm (with the same owner), by owner pid, by the name
    *ident* (QEMU's guest name outlives a VMM process); None: two VMs (a struct
    kvm address another owner reused)."""
    if _same_kvm(va, vb):
        return MatchedBy.KVM
    if _same_pid(va, vb):
        return MatchedBy.PID
    if ident in va.names and ident in vb.names:
        return MatchedBy.NAME
    return None


# -- shadow pages -----------------------------------------------------------------


# page_key(): gfn, role fields but invalid, mmu_valid_gen (None for TDP MMU pages)
PageKeyT = tuple[int, tuple[tuple[str, int], ...], int | NoValue | None]


def page_key(sp: ShadowPage) -> PageKeyT:
    """What a shadow page shadows: gfn, role without role.invalid, and (not for TDP
    MMU pages, which are not obsoleted by generation) the page's mmu_valid_gen."""
    role = tuple((k, v) for k, v in sp.role.fields.items() if k != "invalid")
    return (sp.gfn, role, None if sp.tdp_mmu_page else sp.mmu_valid_gen)


def _by_position(s: ShadowPage) -> tuple[int, int, int]:
    """The order pages are listed in: level (high first), gfn, address."""
    return (-s.level, s.gfn, s.addr)


def pair_pages(ga: VMGraph, gb: VMGraph
               ) -> tuple[list[tuple[ShadowPage, ShadowPage]], list[ShadowPage],
                          list[ShadowPage]]:
    """(matched pairs, zapped (A only), added (B only)) by page_key: same address
    first, then in address order (never an A page already invalid)."""
    def groups(g: VMGraph) -> dict[PageKeyT, list[ShadowPage]]:
        out: dict[PageKeyT, list[ShadowPage]] = {}
        for sp in g.nodes.values():
            out.setdefault(page_key(sp), []).append(sp)
        return out

    old, new = groups(ga), groups(gb)
    pairs: list[tuple[ShadowPage, ShadowPage]] = []
    zapped: list[ShadowPage] = []
    added: list[ShadowPage] = []
    for key in old.keys() | new.keys():
        la = sorted(old.get(key, []), key=lambda s: s.addr)
        lb = sorted(new.get(key, []), key=lambda s: s.addr)
        at = {s.addr: s for s in lb}
        rest_a = []
        for s in la:
            if s.addr in at:
                pairs.append((s, at.pop(s.addr)))
            else:
                rest_a.append(s)
        rest_b = sorted(at.values(), key=lambda s: s.addr)
        for s in rest_a:
            if rest_b and not s.role.invalid:
                pairs.append((s, rest_b.pop(0)))
            else:
                zapped.append(s)
        added.extend(rest_b)
    return (sorted(pairs, key=lambda p: _by_position(p[1])), sorted(zapped, key=_by_position),
            sorted(added, key=_by_position))


FieldValue = int | bool | NoValue  # a PageField's value (NoValue: unknown, unreadable)


class PageField(Enum):
    """A shadow-page field whose change makes a matched page changed (JSON key of
    "changes", in this order)."""

    SP = "sp"  # rebuilt at another address
    ROLE = "role"  # the role word (role.invalid set by a fast zap)
    UNSYNC = "unsync"
    UNSYNC_CHILDREN = "unsync_children"
    ROOT_COUNT = "root_count"
    INVALID = "invalid"
    OBSOLETE = "obsolete"
    ORPHAN = "orphan"

    @property
    def address(self) -> bool:
        """Whether the value is an address or a word (shown in hex)."""
        return self in (PageField.SP, PageField.ROLE)

    def of(self, p: PageView) -> FieldValue:
        """This field of the page *p* shows."""
        sp = p.sp
        if self is PageField.SP:
            return sp.addr
        if self is PageField.ROLE:
            return sp.role.word
        if self is PageField.UNSYNC:
            return sp.unsync
        if self is PageField.UNSYNC_CHILDREN:
            return sp.unsync_children
        if self is PageField.ROOT_COUNT:
            return sp.root_count
        if self is PageField.INVALID:
            return sp.role.invalid
        if self is PageField.OBSOLETE:
            return p.obsolete
        return p.orphan


class PageChange(NamedTuple):
    """A page of A matched with one of B, and the fields that differ (PageField order)."""

    old: PageView
    new: PageView
    changes: dict[PageField, Change[FieldValue]]


def page_change(old: PageView, new: PageView) -> PageChange | None:
    """The PageChange of a matched pair, or None when no PageField differs."""
    changes = {f: Change(f.of(old), f.of(new)) for f in PageField}
    changes = {f: c for f, c in changes.items() if c.changed}
    return PageChange(old, new, changes) if changes else None


# -- vCPUs and their roots ----------------------------------------------------------


class PageKey(NamedTuple):
    """What a root change compares of the root's page: which page it is and whether
    it is still valid; not its counts, which the page's own PageChange shows."""

    sp: int
    gfn: int
    level: int
    invalid: bool
    obsolete: bool


def _page_key(p: PageView | None) -> PageKey | None:
    return None if p is None else PageKey(p.sp.addr, p.sp.gfn, p.sp.level,
                                           p.sp.role.invalid, p.obsolete)


class RootKey(NamedTuple):
    """What makes a root slot changed: its state, pgd, hpa, page and pae_root[] pages."""

    state: RootState
    pgd: int | NoValue
    hpa: int | NoValue | None
    page: PageKey | None
    pae_roots: tuple[tuple[int, PageKey | None], ...]


def root_key(r: RootView) -> RootKey:
    return RootKey(r.state, r.pgd, r.hpa, _page_key(r.page),
                   tuple((e.index, _page_key(e.page)) for e in r.pae_roots))


class RootSlot(NamedTuple):
    """A root slot of a vCPU's MMU: mmu->root (prev None) or mmu->prev_roots[prev]."""

    prev: int | None

    def __str__(self) -> str:
        return "root" if self.prev is None else f"prev_roots[{self.prev}]"


class RootChange(NamedTuple):
    """A root slot whose RootKey differs between A and B (None: no such slot there)."""

    slot: RootSlot
    old: RootView | None
    new: RootView | None


def _slots(v: VCpu, g: VMGraph) -> dict[RootSlot, RootView]:
    out = {RootSlot(None): root_view(v.root, g)}
    out.update((RootSlot(i), root_view(r, g)) for i, r in enumerate(v.prev_roots))
    return out


@dataclass(frozen=True)
class VcpuChange:
    """A vCPU on one side only, or whose CR3 or a root slot changed."""

    status: Status  # ADDED, REMOVED or CHANGED
    old: VCpu | None
    new: VCpu | None
    roots: tuple[RootChange, ...] = ()

    @property
    def vcpu(self) -> VCpu:
        """The vCPU as in B (as in A if removed)."""
        v = self.new or self.old
        assert v is not None
        return v

    @property
    def cr3(self) -> Change[int | NoValue | None]:
        return Change(None if self.old is None else self.old.cr3,
                      None if self.new is None else self.new.cr3)


def _vcpu_key(v: VCpu) -> int | NoValue:
    """vcpu_idx (vcpu_id without it, maybe UNKNOWN).

    vcpu_idx: "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd)
    """
    return v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id


def _vcpu_order(k: int | NoValue) -> tuple[int, str]:
    return (k, "") if isinstance(k, int) else (1 << 30, k.name)


def vcpu_changes(ga: VMGraph, gb: VMGraph) -> list[VcpuChange]:
    """Per vCPU (by vcpu_idx) whose root, prev_roots[] or CR3 changed, or that is on
    one side only, in vcpu_idx order."""
    old = {_vcpu_key(v): v for v in ga.vcpus}
    new = {_vcpu_key(v): v for v in gb.vcpus}
    out = []
    for k in sorted(old.keys() | new.keys(), key=_vcpu_order):
        va, vb = old.get(k), new.get(k)
        if va is None or vb is None:
            out.append(VcpuChange(Status.ADDED if va is None else Status.REMOVED, va, vb))
            continue
        sa, sb = _slots(va, ga), _slots(vb, gb)
        roots = tuple(RootChange(s, sa.get(s), sb.get(s))
                      for s in sorted(sa.keys() | sb.keys(), key=lambda s: (
                          s.prev is not None, s.prev or 0))
                      if s not in sa or s not in sb or root_key(sa[s]) != root_key(sb[s]))
        if roots or va.cr3 != vb.cr3:
            out.append(VcpuChange(Status.CHANGED, va, vb, roots))
    return out


# -- one VM -------------------------------------------------------------------------


@dataclass(frozen=True)
class VmDiff:
    """One VM's part of the diff: matched (changed or unchanged), added or removed."""

    old: VM | None
    new: VM | None
    matched_by: MatchedBy | None
    status: Status
    pages: Change[int | None]  # shadow pages in each graph (None: unmatched)
    counters: dict[str, Change[int | NoValue]]  # COUNTERS that changed
    stat: dict[str, Change[int | None]]  # kvm->stat's MMU counters that changed
    vcpus: list[VcpuChange]
    pages_zapped: list[PageView]  # A's pages no page of B matches (as in A)
    pages_added: list[PageView]  # B's pages no page of A matches (as in B)
    pages_changed: list[PageChange]

    @property
    def vm(self) -> VM:
        """The VM as in A (as in B if added)."""
        v = self.old or self.new
        assert v is not None
        return v


def counter_changes(a: VM, b: VM) -> dict[str, Change[int | NoValue]]:
    """The struct kvm counters (COUNTERS) that changed, old -> new."""
    out: dict[str, Change[int | NoValue]] = {}
    for c in COUNTERS:
        ch: Change[int | NoValue] = Change(getattr(a, c), getattr(b, c))
        if ch.changed:
            out[c] = ch
    return out


def stat_changes(a: VM, b: VM) -> dict[str, Change[int | None]]:
    """kvm->stat's MMU counters (those stats shows) that changed, old -> new."""
    sa, sb = vm_mmu_stat(a.stat), vm_mmu_stat(b.stat)
    return {k: Change(sa.get(k), sb.get(k)) for k in {**sa, **sb} if sa.get(k) != sb.get(k)}


def vm_diff(pair: VmPair, ga: VMGraph | None, gb: VMGraph | None) -> VmDiff:
    """One VM's diff: *pair* and its graphs in A and B (None for a VM on one side)."""
    va, vb = pair.old, pair.new
    if va is None or vb is None or ga is None or gb is None:
        return VmDiff(va, vb, pair.matched_by, Status.ADDED if va is None else Status.REMOVED,
                      Change(None, None), {}, {}, [], [], [], [])
    pairs, zapped, added = pair_pages(ga, gb)
    changed = [c for sa, sb in pairs
               if (c := page_change(page_view(sa, ga), page_view(sb, gb))) is not None]
    d = VmDiff(va, vb, pair.matched_by, Status.UNCHANGED, Change(len(ga), len(gb)),
               counter_changes(va, vb), stat_changes(va, vb), vcpu_changes(ga, gb),
               [page_view(s, ga) for s in zapped], [page_view(s, gb) for s in added], changed)
    if d.counters or d.stat or d.vcpus or d.pages_zapped or d.pages_added or d.pages_changed:
        return replace(d, status=Status.CHANGED)
    return d
