"""Consistency checks of one VM's MMU state, on the kernel model (no rendering).

``check_vm(kernel, vg)`` compares what the shadow pages say about themselves
with what the rest of the model shows, the way the kernel maintains it
(arch/x86/kvm/mmu/mmu.c and tdp_mmu.c of 6.1.y and 6.12; the unsync walk is
the same algorithm back to 4.19):

* unsync_children is the number of set bits of unsync_child_bitmap
  (mark_unsync() and clear_unsync_child_bit() change both together);
* a set bit i says spt[i] leads to an unsync page: __mmu_unsync_walk() clears
  bits over non-present or large SPTEs and over children that are neither
  unsync nor have unsync_children, so such bits are harmless leftovers;
* every parent of an unsync page (or of a page with unsync_children) has the
  bit of its SPTE set: kvm_mmu_mark_parents_unsync() and link_shadow_page();
* only indirect level-1 shadow pages become unsync (mmu_try_to_unsync_pages);
* root_count is one reference per vCPU root, prev_roots[] and pae_root[]
  entry, of root_mmu and of guest_mmu (mmu_alloc_root; dropped by
  mmu_free_root_page), plus one for a valid TDP MMU root on tdp_mmu_roots
  (kvm_tdp_mmu_get_vcpu_root_hpa sets the refcount to 2: the vCPU's and the
  TDP MMU's own; upstream since 6.4, "KVM: x86: Preserve TDP MMU roots until
  they are explicitly invalidated" (edbdb43fc96b), and in 6.1.y from 6.1.50 as
  the 6.1.192 fixtures show);
* obsolete roots (is_obsolete_sp) still in use, orphans, roots nobody holds;
* every Problem the model recorded while reading (unreadable objects, levels
  out of range, a child whose level is not its parent's minus one).

Each finding is a Finding: which check (FindingKind), how much it matters
(Severity), the objects it names by address and a message; nothing here
renders (kvminspect.shapes and the check command do) or reads anything the
model has not already read, apart from sp->spt[].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from kvminspect.errors import Problem
from kvminspect.fmt import spte_text
from kvminspect.graph import Holder, VMGraph
from kvminspect.layout import NoValue, known
from kvminspect.model import Kernel
from kvminspect.objects import RootKind, ShadowPage, VCpu
from kvminspect.render import plural
from kvminspect.spte import SPTE_ENT_PER_PAGE

MAX_LISTED = 8  # addresses spelled out in one message (all are in Finding.objects)


class Severity(Enum):
    """How much a finding matters, most first: the order check lists findings in.

    ERROR: the kernel's own invariants do not hold; WARNING: a state the kernel
    leaves only briefly (or a kernel version cannot be told apart); INFO:
    noteworthy, expected. The value is the JSON and text name.
    """

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        """0 for errors, 1 for warnings, 2 for info: the sort key."""
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}
SEVERITIES = tuple(s.value for s in Severity)  # their names, in order ("error", ...)


# the requests whose handling drops an invalid or obsolete root (reload_pending)
RELOAD_REQUESTS = ("MMU_FREE_OBSOLETE_ROOTS", "MMU_RELOAD")

class FindingKind(Enum):
    """Which check made a finding; the value is its id (JSON "check", the CHECK column)."""

    # check_vm: what the model read (kvminspect.errors.Problem)
    MODEL = "model"
    # unsync_children and unsync_child_bitmap (mark_unsync, __mmu_unsync_walk)
    UNSYNC_CHILDREN = "unsync-children"
    BIT_NOT_PRESENT = "bit-not-present"
    STALE_BIT = "stale-bit"
    BIT_ON_LEAF = "bit-on-leaf"
    MISSING_BIT = "missing-bit"
    UNSYNC_PAGE = "unsync-page"
    # roots (mmu_alloc_root, mmu_free_root_page, is_obsolete_sp)
    UNHELD_ROOT = "unheld-root"
    ROOT_COUNT = "root-count"
    OBSOLETE_ROOT = "obsolete-root"
    ORPHANS = "orphans"
    # page->private of each page's sp->spt (to_shadow_page, set_page_private)
    SPT_OWNER = "spt-owner"
    # the kernel's own accounting against the pages (kvminspect.accounting):
    # kvm->arch.tdp_mmu_pages, n_used_mmu_pages (stat.mmu_shadow_pages in 7.3),
    # kvm->stat.pages_4k/2m/1g (lpages before 5.15)
    TDP_MMU_PAGES = "tdp-mmu-pages"
    USED_MMU_PAGES = "used-mmu-pages"
    PAGE_STATS = "page-stats"
    # check --audit (kvminspect.audit: mmu_audit.c)
    LEAF_PFN = "leaf-pfn"
    LEAF_PFN_UNCHECKED = "leaf-pfn-unchecked"
    RMAP_UNREADABLE = "rmap-unreadable"
    RMAP_MISSING = "rmap-missing"
    RMAP_WRONG_GFN = "rmap-wrong-gfn"
    RMAP_STALE = "rmap-stale"
    RMAP_UNCHECKED = "rmap-unchecked"
    WRITABLE_SHADOWED = "writable-shadowed"
    FROZEN_SPTE = "frozen-spte"
    # check --audit: a page against its parent, SPTEs against the memslots
    # (kvminspect.invariants: kvm_mmu_child_role, kvm_mmu_page_get_gfn, check_mmio_spte)
    CHILD_ROLE = "child-role"
    CHILD_GFN = "child-gfn"
    MMIO_OVER_RAM = "mmio-over-ram"
    LEAF_NO_MEMSLOT = "leaf-no-memslot"


@dataclass(frozen=True)
class Finding:
    """One inconsistency (or noteworthy state) of a VM's MMU."""

    check: FindingKind
    severity: Severity
    objects: list[int] = field(default_factory=list)  # addresses it names
    message: str = ""
    count: int = 1  # the objects it stands for (a summary finding: how many it counts)


def summary(findings: list[Finding]) -> dict[Severity, int]:
    """How many findings of each severity (every severity, in order, zeros too)."""
    c = Counter(f.severity for f in findings)
    return {s: c.get(s, 0) for s in Severity}


def infos_by_kind(findings: list[Finding]) -> dict[FindingKind, list[Finding]]:
    """The info findings of each check, the checks in the order first met: what the
    text of check and diagnose folds into one line per check."""
    out: dict[FindingKind, list[Finding]] = {}
    for f in findings:
        if f.severity is Severity.INFO:
            out.setdefault(f.check, []).append(f)
    return out


def by_severity(findings: list[Finding]) -> list[Finding]:
    """*findings* errors first, then warnings, then info (stable: each check's order kept)."""
    return sorted(findings, key=lambda f: f.severity.rank)


def _addrs(addrs: list[int]) -> str:
    """Some addresses as text, the rest counted."""
    shown = ", ".join(f"{a:#x}" for a in addrs[:MAX_LISTED])
    more = len(addrs) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def sp_id(sp: ShadowPage) -> str:
    """A shadow page as the findings name it: 'sp ADDR (gfn GFN LLEVEL)'."""
    return f"sp {sp.addr:#x} (gfn {sp.gfn:#x} L{sp.level})"


def _sp_of(kernel: Kernel, vg: VMGraph, addr: int) -> ShadowPage | None:
    """The graph's copy of a page (which tests may have edited), else the model's."""
    if addr in vg:
        return vg.sp(addr)
    return kernel.shadow_page(addr)


def _unsync_pages(vg: VMGraph) -> list[ShadowPage]:
    """The pages whose unsync fields mean something and say something (unsync,
    unsync_children or a bit of unsync_child_bitmap), which the checks below read.

    Not: bad levels, 6.14's mirror pages, and every page of a kernel that
    lacks one of the fields (UNKNOWN). From 6.14 unsync_children shares a
    union with external_spt, used by mirror (TDX) roots and their pages
    (role.is_mirror): 6.14 "KVM: x86/mmu: Add an external pointer to struct
    kvm_mmu_page" and "KVM: x86/mmu: Add an is_mirror member for union
    kvm_mmu_page_role".
    """
    # only pages with one of the three set matter to the checks below (a NoValue is
    # false too): told apart in C, a 10^6-page MMU has a few
    return vg.pages_where(
        lambda sp: 1 <= sp.level <= 5 and not sp.role.is_mirror
        and not isinstance(sp.unsync, NoValue)
        and not isinstance(sp.unsync_children, NoValue)
        and not isinstance(sp.unsync_child_bitmap, NoValue),
        among=("unsync_child_bitmap", "unsync", "unsync_children"))


# -- unsync_children and unsync_child_bitmap ------------------------------------


def check_unsync_count(vg: VMGraph, pages: list[ShadowPage] | None = None) -> list[Finding]:
    """unsync_children == popcount(unsync_child_bitmap) (mark_unsync / clear_unsync_child_bit).

    *pages*: _unsync_pages(vg), when the caller has it already.
    """
    out = []
    for sp in _unsync_pages(vg) if pages is None else pages:
        bitmap = sp.unsync_child_bitmap
        if isinstance(bitmap, NoValue) or not (sp.unsync_children or bitmap):
            continue  # (_unsync_pages has no NoValue)
        n = bitmap.bit_count()
        if sp.unsync_children != n:
            out.append(Finding(
                FindingKind.UNSYNC_CHILDREN, Severity.ERROR, [sp.addr],
                f"{sp_id(sp)}: unsync_children {sp.unsync_children} but "
                f"{plural(n, 'bit', 'bits')} set in unsync_child_bitmap"))
    return out


def _parent_sptes(vg: VMGraph, addr: int) -> int:
    """How many SPTEs point at *addr* (its parent_ptes, as far as the graph sees)."""
    return sum(len(idx) for _, idx in vg.parents(addr))


def _check_bit(kernel: Kernel, vg: VMGraph, sp: ShadowPage, i: int,
               value: int) -> Finding | None:
    """One set bit of sp->unsync_child_bitmap against spt[i] (__mmu_unsync_walk)."""
    e = kernel.decode(sp, i, value)
    if not e.present or e.large:
        what = "is not present" if not e.present else "maps a large page"
        return Finding(
            FindingKind.BIT_NOT_PRESENT, Severity.INFO, [sp.addr],
            f"{sp_id(sp)}: unsync_child_bitmap bit {i} but spt[{i}] = {spte_text(value)} {what}; "
            "the kernel clears such bits lazily in __mmu_unsync_walk (e.g. after the "
            "unsync child was zapped)")
    if e.child is None:
        return None  # the graph recorded a Problem for an SPTE without a shadow page
    child = _sp_of(kernel, vg, e.child)
    if child is None or child.unsync or child.unsync_children:
        return None
    others = _parent_sptes(vg, child.addr) - 1
    if others > 0:
        return Finding(
            FindingKind.STALE_BIT, Severity.INFO, [sp.addr, child.addr],
            f"{sp_id(sp)}: unsync_child_bitmap bit {i} but its child {sp_id(child)} is "
            f"neither unsync nor has unsync_children; the child has "
            f"{plural(others, 'other parent SPTE', 'other parent SPTEs')} and "
            "mmu_pages_clear_parents clears only the path the walk took; "
            "__mmu_unsync_walk clears this bit lazily")
    return Finding(
        FindingKind.STALE_BIT, Severity.WARNING, [sp.addr, child.addr],
        f"{sp_id(sp)}: unsync_child_bitmap bit {i} but its only child there, "
        f"{sp_id(child)}, is neither unsync nor has unsync_children; no kernel path is "
        "expected to leave this (harmless: __mmu_unsync_walk clears it lazily)")


def check_bitmap_bits(kernel: Kernel, vg: VMGraph,
                      pages: list[ShadowPage] | None = None) -> list[Finding]:
    """Every set bit of every page's unsync_child_bitmap against its SPTE and child."""
    out = []
    for sp in _unsync_pages(vg) if pages is None else pages:
        if not sp.unsync_child_bitmap:
            continue
        bits = sp.bitmap_indexes()
        if sp.level == 1:
            out.append(Finding(
                FindingKind.BIT_ON_LEAF, Severity.ERROR, [sp.addr],
                f"{sp_id(sp)}: a level-1 page has no child pages, yet unsync_child_bitmap "
                f"has {plural(len(bits), 'bit', 'bits')} set "
                f"({', '.join(map(str, bits[:MAX_LISTED]))})"))
            continue
        if bits[-1] >= SPTE_ENT_PER_PAGE:
            continue  # the model reads exactly 512 bits; never happens
        spt = kernel.sptes(sp)
        if spt is None:
            continue  # the model recorded the unreadable spt
        for i in bits:
            f = _check_bit(kernel, vg, sp, i, spt[i])
            if f is not None:
                out.append(f)
    return out


def check_parent_bits(vg: VMGraph, pages: list[ShadowPage] | None = None) -> list[Finding]:
    """Each parent SPTE of an unsync page (or one with unsync_children) has its bit set.

    kvm_mmu_mark_parents_unsync() marks every parent_ptes entry of a page that
    becomes unsync or gets its first unsync child; link_shadow_page() marks a
    new parent of such a page.
    """
    out: list[Finding] = []
    marked = {sp.addr: sp for sp in (_unsync_pages(vg) if pages is None else pages)
              if sp.unsync or sp.unsync_children}
    if not marked:
        return out
    for p, pairs in vg.links.items():  # every link into a marked page, by parent
        parent = vg.sp(p)
        for i, c in pairs:
            sp = marked.get(c)
            bits = parent.unsync_child_bitmap
            if sp is not None and known(bits) and not bits >> i & 1:
                why = "is unsync" if sp.unsync else f"has unsync_children {sp.unsync_children}"
                out.append(Finding(
                    FindingKind.MISSING_BIT, Severity.ERROR, [parent.addr, sp.addr],
                    f"{sp_id(sp)} {why} but bit {i} of the unsync_child_bitmap of its "
                    f"parent {sp_id(parent)} is clear: mmu_sync_children from that "
                    "parent will not find it"))
    return out


def check_unsync_pages(vg: VMGraph, pages: list[ShadowPage] | None = None) -> list[Finding]:
    """Only indirect level-1 shadow pages are unsync (mmu_try_to_unsync_pages).

    Direct and TDP MMU pages have only direct children, so they never have
    unsync_children either.
    """
    out = []
    for sp in _unsync_pages(vg) if pages is None else pages:
        if not (sp.unsync or sp.unsync_children):
            continue
        kind = "TDP MMU page" if sp.tdp_mmu_page else "direct page" if sp.role.direct else None
        if sp.unsync:
            bad = []
            if sp.level != 1:
                bad.append(f"level {sp.level}")
            if kind:
                bad.append(kind)
            if bad:
                out.append(Finding(
                    FindingKind.UNSYNC_PAGE, Severity.ERROR, [sp.addr],
                    f"{sp_id(sp)} is unsync but is a {' '.join(bad)}; only indirect "
                    "level-1 shadow pages become unsync"))
        if kind and sp.unsync_children:
            out.append(Finding(
                FindingKind.UNSYNC_PAGE, Severity.ERROR, [sp.addr],
                f"{sp_id(sp)}: {kind} with unsync_children {sp.unsync_children}; its "
                "children are direct and never unsync"))
    return out


# -- roots ------------------------------------------------------------------------


def _vcpu_holders(holders: list[Holder]) -> list[Holder]:
    """Holders that are vCPU references: mmu->root, prev_roots[i], pae_root[i]."""
    return [h for h in holders if h.is_vcpu]


def _on_tdp_list(holders: list[Holder]) -> bool:
    return any(h.kind == "tdp_mmu_roots" for h in holders)


def _names(holders: list[Holder]) -> str:
    return ", ".join(map(str, holders))


def _expected_refs(sp: ShadowPage, holders: list[Holder], list_ref: bool = True
                   ) -> tuple[set[int], str]:
    """root_count values the holders explain, and how they were counted.

    *list_ref*: whether tdp_mmu_roots may hold a reference of its own (never
    while the TDP MMU root count was the plain int root_count, 5.10-5.12).
    """
    n = len(_vcpu_holders(holders))
    what = plural(n, "vCPU reference", "vCPU references")
    if sp.tdp_mmu_page and _on_tdp_list(holders) and not list_ref:
        return {n}, what + " (tdp_mmu_roots holds none before tdp_mmu_root_count)"
    if sp.tdp_mmu_page and _on_tdp_list(holders):
        if sp.role.invalid:
            # the list's (or, before it had one, the zap worker's) reference is put
            # once the invalid root is zapped (kvm_tdp_mmu_zap_invalidated_roots)
            return {n, n + 1}, what + " (+1 for tdp_mmu_roots until the invalid root is zapped)"
        return {n + 1}, what + " + 1 for tdp_mmu_roots"
    return {n}, what


def _old_tdp_refcount(sp: ShadowPage, holders: list[Holder]) -> bool:
    """A valid TDP MMU root counted the old way: no reference for tdp_mmu_roots.

    "KVM: x86: Preserve TDP MMU roots until they are explicitly invalidated"
    (edbdb43fc96b) made kvm_tdp_mmu_get_vcpu_root_hpa() start a new root at 2
    (upstream in 6.4; backported to 6.3.2 and to 6.1.50, as the 6.1.192 fixtures
    show); before, at 1.
    """
    return (sp.tdp_mmu_page and not sp.role.invalid and _on_tdp_list(holders)
            and sp.root_count == len(_vcpu_holders(holders)))


def _uncounted(vg: VMGraph) -> list[str]:
    """vCPU root references the model could not see, which root_count may include."""
    out = []
    for v in vg.vcpus:
        name = f"vcpu{v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id}"
        if v.root is None:
            out.append(f"{name}: MMU unreadable")
            continue
        roots = [v.root, *v.prev_roots]
        o = v.other_mmu
        if o is not None:
            if o.root is None:
                out.append(f"{name}: {o.name} unreadable")
            else:
                roots += [o.root, *o.prev_roots]
        bad = [r for r in roots if r.special is RootKind.UNREADABLE]
        if bad:
            out.append(f"{name}: {plural(len(bad), 'root', 'roots')} whose hpa has no "
                       "readable struct page")
    return out


def check_root_counts(vg: VMGraph, list_ref: bool = True) -> list[Finding]:
    """root_count against the references the model sees (and roots nobody holds).

    *list_ref*: see _expected_refs.
    """
    out = []
    uncounted = _uncounted(vg)
    for addr in vg.root_order():
        holders = vg.roots[addr]
        sp = vg.sp(addr)
        if not known(sp.root_count):
            continue
        want, how = _expected_refs(sp, holders, list_ref)
        if sp.root_count in want:
            continue
        held = _vcpu_holders(holders)
        if not held and sp.root_count > max(want):
            out.append(Finding(
                FindingKind.UNHELD_ROOT, Severity.INFO, [addr],
                f"{sp_id(sp)}: root_count {sp.root_count} but no vCPU holds it as root, "
                "prev root or pae_root entry (being freed, or held outside vCPU MMUs)"))
            continue
        severity = Severity.ERROR
        note = ""
        if _old_tdp_refcount(sp, holders):
            severity = Severity.WARNING
            note = (" (unless the kernel predates 'Preserve TDP MMU roots until they are "
                    "explicitly invalidated', when the list held no reference)")
        elif uncounted and sp.root_count > max(want):
            severity = Severity.WARNING
            note = f" (not counted: {'; '.join(uncounted)})"
        expected = " or ".join(str(w) for w in sorted(want))
        out.append(Finding(
            FindingKind.ROOT_COUNT, severity, [addr],
            f"{sp_id(sp)}: root_count {sp.root_count} but expected {expected}: {how}"
            + (f" ({_names(held)})" if held else "") + note))
    # (a root_count of 0, or unknown, is false: passed over in C)
    for sp in vg.pages_where(lambda sp: known(sp.root_count) and sp.root_count < 0
                             and sp.addr not in vg.roots, among=("root_count",)):
        out.append(Finding(FindingKind.ROOT_COUNT, Severity.ERROR, [sp.addr],
                           f"{sp_id(sp)}: negative root_count {sp.root_count}"))
    return out


def _obsolete_why(sp: ShadowPage, vm_gen: int | NoValue) -> str:
    why = []
    if sp.role.invalid:
        why.append("role.invalid")
    if not sp.tdp_mmu_page and sp.mmu_valid_gen != vm_gen:
        why.append(f"mmu_valid_gen {sp.mmu_valid_gen} != kvm->arch.mmu_valid_gen {vm_gen}")
    return ", ".join(why)


def reload_pending(v: VCpu) -> bool:
    """Whether *v* has a request pending whose handling drops an obsolete root:
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS (kvm_mmu_free_obsolete_roots() in
    vcpu_enter_guest()), or KVM_REQ_MMU_RELOAD (kvm_mmu_unload()), which the
    fast zap requests in 5.10 (the 5.10-shadow-zapped fixture's vCPUs have it)."""
    return any(n in v.request_names for n in RELOAD_REQUESTS)


def check_obsolete_roots(vg: VMGraph) -> list[Finding]:
    """Obsolete roots (is_obsolete_sp) that vCPUs still hold.

    A current root: normal (info) while every vCPU using it has the reload
    request pending (reload_pending: it drops the root at its next VM entry,
    right after a fast zap, kvm_mmu_zap_all_fast); a warning for the vCPUs
    without it: is_page_fault_stale() retries every fault on that root, and
    nothing makes them drop it. Only cached in prev_roots[]: info, freed at
    the same point.
    """
    out = []
    pending: dict[int | None, bool] = {  # by Holder.vcpu: vcpu_idx (vcpu_id without it)
        v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id if known(v.vcpu_id) else -1:
        reload_pending(v) for v in vg.vcpus}
    for addr in vg.root_order():
        holders = vg.roots[addr]
        sp = vg.sp(addr)
        held = _vcpu_holders(holders)
        if not vg.obsolete(sp) or not held:
            continue
        current = [h for h in held if h.kind == "root"]
        why = _obsolete_why(sp, vg.vm.mmu_valid_gen)
        stuck = [h for h in current if not pending.get(h.vcpu, False)]
        if stuck:
            out.append(Finding(
                FindingKind.OBSOLETE_ROOT, Severity.WARNING, [addr],
                f"{sp_id(sp)} is obsolete ({why}) but is still in use as "
                f"{_names(stuck)} with no reload request pending "
                "(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS): their faults on it retry "
                "(is_page_fault_stale) until something reloads their MMU"))
        elif current:
            out.append(Finding(
                FindingKind.OBSOLETE_ROOT, Severity.INFO, [addr],
                f"{sp_id(sp)} is obsolete ({why}) and still in use as "
                f"{_names(current)}, each with its reload request pending: normal right "
                "after a fast zap (memslot change, kvm_mmu_zap_all_fast)"))
        else:
            out.append(Finding(
                FindingKind.OBSOLETE_ROOT, Severity.INFO, [addr],
                f"{sp_id(sp)} is obsolete ({why}) and still cached in {_names(held)}; "
                "freed when the vCPUs handle KVM_REQ_MMU_FREE_OBSOLETE_ROOTS"))
    return out


def check_orphans(vg: VMGraph) -> list[Finding]:
    """Pages on active_mmu_pages (or the TDP MMU lists) that no root reaches."""
    orphans = sorted(vg.orphans())
    if not orphans:
        return []
    return [Finding(
        FindingKind.ORPHANS, Severity.INFO, orphans,
        f"{plural(len(orphans), 'shadow page', 'shadow pages')} on the VM's page lists "
        f"{'is' if len(orphans) == 1 else 'are'} reachable from no "
        f"root: {_addrs(orphans)} (kept for reuse until zapped or recycled)")]


def check_spt_owners(kernel: Kernel, vg: VMGraph) -> list[Finding]:
    """Each page whose sp->spt page does not name it in page->private: the kernel
    finds a page table's struct kvm_mmu_page by to_shadow_page(), which reads
    page_private(virt_to_page(sp->spt)) (set by kvm_mmu_alloc_shadow_page() and
    tdp_mmu_init_sp()), so an SPTE pointing at that table leads elsewhere."""
    out = []
    for sp, pfn, owner in sorted(kernel.pages.spt_owner_mismatches(vg.nodes.values())):
        other = "no shadow page" if owner is None else f"sp {owner:#x}"
        out.append(Finding(
            FindingKind.SPT_OWNER, Severity.ERROR, [sp] + ([] if owner is None else [owner]),
            f"sp {sp:#x}: its spt page (pfn {pfn:#x}) names {other} in page->private: "
            f"to_shadow_page() of an SPTE pointing at it does not find sp {sp:#x}"))
    return out


# -- what the model could not read ------------------------------------------------


def vm_problems(kernel: Kernel, vg: VMGraph) -> list[Problem]:
    """The model's Problems met while reading this VM (and the VM list's own)."""
    return kernel.problems.of([vg.vm.addr])


def check_problems(kernel: Kernel, vg: VMGraph) -> list[Finding]:
    """Each Problem the model recorded (unreadable, impossible level, bad child level)."""
    return [Finding(FindingKind.MODEL, Severity.ERROR, [] if p.addr is None else [p.addr],
                    str(p))
            for p in vm_problems(kernel, vg)]


# -- all of it ----------------------------------------------------------------------


def check_vm(kernel: Kernel, vg: VMGraph) -> list[Finding]:
    """Every check on one VM's graph; errors first, then warnings, then info."""
    pages = _unsync_pages(vg)
    findings = [
        *check_problems(kernel, vg),
        *check_unsync_count(vg, pages),
        *check_bitmap_bits(kernel, vg, pages),
        *check_parent_bits(vg, pages),
        *check_unsync_pages(vg, pages),
        # 5.13 "KVM: x86/mmu: Make TDP MMU root refcount atomic" (11cccf5c0472) made
        # the TDP MMU root count a refcount_t (tdp_mmu_root_count); before it
        # tdp_mmu_roots held no reference of its own
        *check_root_counts(vg, kernel.layout.tdp_root_refcount),
        *check_obsolete_roots(vg),
        *check_orphans(vg),
        *check_spt_owners(kernel, vg),
    ]
    return by_severity(findings)
