"""The kernel's own MMU accounting, cross-checked against the pages read.

KVM keeps three kinds of counters about its MMU; each is compared here with
the same thing counted on the graph (arch/x86/kvm/mmu/mmu.c and tdp_mmu.c of
Debian's 6.1.192 and 6.12.118):

* ``kvm->stat.pages_4k/2m/1g`` (``stat.pages[level - 1]``): present leaf SPTEs
  by the level of their table. kvm_update_page_stats() is called by
  __rmap_add() (+1) and mmu_spte_clear_track_bits() (-1) for the shadow MMU,
  by handle_changed_spte() on each leaf <-> non-leaf change and by
  tdp_mmu_split_huge_page() (+512 once the split table is linked) for the TDP
  MMU. Leaves of invalid and obsolete pages count until they are zapped, so
  every page of the graph counts. Before 5.15 ("KVM: x86/mmu: Add detailed
  page size stats") ``kvm->stat.lpages`` counted the large leaves alone, and
  not on every path: see LPAGES_DRIFT.
* ``kvm->arch.n_used_mmu_pages`` (``kvm->stat.mmu_shadow_pages`` in 7.3):
  kvm_account_mmu_page() when kvm_mmu_alloc_shadow_page() puts a page on
  active_mmu_pages, kvm_unaccount_mmu_page() when __kvm_mmu_prepare_zap_page()
  moves it to an invalid list. A zapped root that vCPUs still hold
  (root_count > 0) leaves active_mmu_pages but stays accounted until
  mmu_free_root_page() puts its last reference: expected = shadow pages on
  active_mmu_pages + such zapped roots.
* ``kvm->arch.tdp_mmu_pages``: the linked non-root TDP MMU pages, a list
  (5.10-6.1) then a count (6.2-7.2): tdp_account_mmu_page() right after
  tdp_mmu_link_sp() links a table, tdp_unaccount_mmu_page() first thing in
  handle_removed_pt(). 7.3 keeps no such counter (the 7.3 fixture's DWARF).

Every update above is made under kvm->mmu_lock (the TDP MMU's for read, next
to other vCPUs'), after the SPTE or list it accounts for changed, so a dump
taken with mmu_lock held, or with frozen SPTEs, may be mid-update; a live
target is read over time; pages whose spt[] is not in the dump hide their
leaves. Those differences are info, naming the reason (CounterCheck.why).
With none of them the kernel's accounting is exact, and a difference is a
warning for the statistics (nothing in the kernel acts on them) and an error
for n_used_mmu_pages (kvm_mmu_available_pages() and the shrinker act on it)
and tdp_mmu_pages (kvm_mmu_uninit_tdp_mmu() WARNs unless it is back to 0).

``accounting()`` returns the typed comparisons; ``check_accounting()`` the
findings. Nothing here renders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import Enum

from kvminspect.check import Finding, FindingKind, Severity, vm_problems
from kvminspect.graph import VMGraph
from kvminspect.layout import known
from kvminspect.leaves import AuditState, collect
from kvminspect.model import Kernel
from kvminspect.objects import VM, ShadowPage
from kvminspect.render import plural
from kvminspect.rmap import LEVEL_NAMES

# kvm->stat.pages[level - 1]'s names ("KVM: x86/mmu: Add detailed page size stats", 5.15)
PAGE_STATS = {1: "pages_4k", 2: "pages_2m", 3: "pages_1g"}

# why lpages (before 5.15) may count more large leaves than there are: the paths
# "KVM: x86/mmu: Add detailed page size stats" (5.15) moved into the accounting
LPAGES_DRIFT = (
    "before 5.15 lpages was not decremented when kvm_zap_rmapp(), kvm_set_pte_rmapp() or "
    "kvm_mmu_zap_collapsible_spte() dropped a large SPTE through pte_list_remove(), and the "
    "TDP MMU counted non-present SPTEs with bit 7 set (\"KVM: x86/mmu: Avoid collision with "
    "!PRESENT SPTEs in TDP MMU lpage stats\", 5.15): it drifts upwards, never down")

# what a mid-update dump explains, per counter
MID_UPDATE = {
    FindingKind.PAGE_STATS: (
        "kvm_update_page_stats() follows the SPTE write (__rmap_add(), "
        "mmu_spte_clear_track_bits(), handle_changed_spte()), tdp_mmu_split_huge_page() adds "
        "a split table's 512 leaves after linking it, and handle_removed_pt() drops an "
        "unlinked table's leaves one by one"),
    FindingKind.USED_MMU_PAGES: (
        "kvm_mmu_alloc_shadow_page() links a page on active_mmu_pages before "
        "kvm_account_mmu_page(), __kvm_mmu_prepare_zap_page() moves it off before "
        "kvm_unaccount_mmu_page()"),
    FindingKind.TDP_MMU_PAGES: (
        "tdp_mmu_link_sp() accounts a table after linking it, handle_removed_pt() unaccounts "
        "it after it was unlinked"),
}


class Verdict(Enum):
    """What a comparison of one counter came to; the value is its JSON name."""

    MATCH = "match"  # the counter is what the pages read say (CounterCheck.why: a part explained)
    EXPLAINED = "explained"  # it differs, for a reason the kernel gives (CounterCheck.why)
    MISMATCH = "mismatch"  # it differs, and nothing the kernel does explains it
    UNCHECKED = "unchecked"  # not compared: CounterCheck.why says why


@dataclass(frozen=True)
class Leaves:
    """Present leaf SPTEs of a VM's pages, by the level of their table (the level
    kvm_update_page_stats() is given), and what may hide some."""

    by_level: dict[int, int]
    frozen: int = 0  # FROZEN_SPTE / REMOVED_SPTE values: a TDP MMU update under way
    unreadable: int = 0  # page tables whose spt[] is not in the dump

    @classmethod
    def of(cls, st: AuditState) -> Leaves:
        """From what kvminspect.leaves.collect() read (check --audit reads it once)."""
        import numpy as np

        levels, first, count = np.unique(st.columns().level, return_index=True,
                                          return_counts=True)
        by_level = {int(levels[i]): int(count[i]) for i in np.argsort(first)}  # as met
        return cls(by_level, len(st.frozen), len(st.unreadable_tables))


def count_leaves(k: Kernel, vg: VMGraph) -> Leaves:
    """Every page's present leaf SPTEs counted (every leaf table read, as
    leaves.collect() does, without the gfns): the graph's side of the page stats."""
    return Leaves.of(collect(k, vg, gfns=False))


@dataclass(frozen=True)
class CounterCheck:
    """One counter of the kernel's against the same thing counted on the pages."""

    kind: FindingKind  # PAGE_STATS, USED_MMU_PAGES or TDP_MMU_PAGES
    counter: str  # "kvm->stat.pages_4k", "kvm->arch.n_used_mmu_pages", ...
    kernel: int | None  # the counter's value (None: UNCHECKED)
    found: int | None  # the same counted on the pages read (None: UNCHECKED)
    what: str  # what *found* counts, in words
    verdict: Verdict
    why: str = ""  # the kernel's reason (EXPLAINED, or a MATCH with a part explained)
    objects: tuple[int, ...] = ()  # addresses a finding names (the VM, explained pages)


@dataclass(frozen=True)
class Accounting:
    """A VM's counters compared (accounting()), and why this reading may be mid-update."""

    vm: int  # struct kvm
    checks: tuple[CounterCheck, ...]
    busy: tuple[str, ...]  # each reason the counters may be caught mid-update


def _busy(k: Kernel, vm: VM, leaves: Leaves | None, live: bool) -> tuple[str, ...]:
    """Why this reading may catch the accounting between a change and its count."""
    out = []
    if live:
        out.append("read from a running kernel: the counters and the pages were read at "
                   "different moments")
    lock = k.vm_states.mmu_lock(vm)
    if lock.error is None and (lock.writer or lock.readers):
        held = ("held for write" if lock.writer else
                f"held for read by {plural(lock.readers, 'thread', 'threads')}")
        out.append(f"the dump was taken with mmu_lock {held}")
    if leaves is not None and leaves.frozen:
        out.append(f"{plural(leaves.frozen, 'frozen SPTE', 'frozen SPTEs')}: a TDP MMU "
                   "update was under way")
    return tuple(out)


def _compare(kind: FindingKind, counter: str, kernel: int, found: int, what: str,
             busy: tuple[str, ...], hidden: str = "") -> CounterCheck:
    """MATCH, or EXPLAINED by a mid-update reading (*busy*) or by pages the count
    could not see (*hidden*, which only explains a kernel count above *found*)."""
    if kernel == found:
        return CounterCheck(kind, counter, kernel, found, what, Verdict.MATCH)
    why = [f"{'; '.join(busy)} ({MID_UPDATE[kind]})"] if busy else []
    if hidden and kernel > found:
        why.append(hidden)
    if why:
        return CounterCheck(kind, counter, kernel, found, what, Verdict.EXPLAINED, "; ".join(why))
    return CounterCheck(kind, counter, kernel, found, what, Verdict.MISMATCH)


def _model_problems(k: Kernel, vg: VMGraph) -> str:
    n = len(vm_problems(k, vg))
    return (f"{plural(n, 'object', 'objects')} of this VM could not be read or made no "
            "sense (see errors): pages may be missing from the count") if n else ""


def page_stats(k: Kernel, vg: VMGraph, leaves: Leaves | None,
               busy: tuple[str, ...]) -> list[CounterCheck]:
    """kvm->stat.pages_4k/2m/1g (lpages before 5.15) against the present leaves."""
    stat = vg.vm.stat
    names = {lv: n for lv, n in PAGE_STATS.items() if n in stat}
    if not names and "lpages" not in stat:
        return []
    if leaves is None:
        return [CounterCheck(FindingKind.PAGE_STATS, f"kvm->stat.{n}", stat[n], None, "",
                             Verdict.UNCHECKED, "the leaf tables were not read (--audit)")
                for n in (names.values() or ["lpages"])]
    hidden = []
    if leaves.unreadable:
        hidden.append(f"{plural(leaves.unreadable, 'page table', 'page tables')} not in the "
                      "dump: their leaves are not counted")
    if problems := _model_problems(k, vg):
        hidden.append(problems)
    out = []
    for level, name in names.items():
        out.append(_compare(FindingKind.PAGE_STATS, f"kvm->stat.{name}", stat[name],
                            leaves.by_level.get(level, 0),
                            f"present {LEVEL_NAMES[level]} leaf SPTEs", busy, "; ".join(hidden)))
    if not names:
        # "KVM: x86/mmu: Add detailed page size stats" (5.15) replaced lpages
        large = sum(n for lv, n in leaves.by_level.items() if lv > 1)
        c = _compare(FindingKind.PAGE_STATS, "kvm->stat.lpages", stat["lpages"], large,
                     "present large (2M, 1G) leaf SPTEs", busy, "; ".join([LPAGES_DRIFT, *hidden]))
        out.append(c)
    return out


def _shadow_pages(vg: VMGraph) -> tuple[int, list[ShadowPage], int]:
    """Shadow-MMU pages on active_mmu_pages; zapped roots still held (role.invalid,
    root_count > 0, off the list: accounted until put); unreadable list entries."""
    active = vg.active
    tdp, listed = vg.column("tdp_mmu_page"), vg.listed()
    read = int(listed.sum())  # the pages on the lists that were read (in nodes)
    unreadable = len(active) - read
    on_list = read - int((listed & tdp).sum())
    held = vg.pages_where(lambda sp: not sp.tdp_mmu_page and sp.addr not in active
                          and known(sp.root_count) and sp.root_count > 0,
                          among=("role.invalid",))
    return on_list, held, unreadable


def used_pages(k: Kernel, vg: VMGraph, busy: tuple[str, ...]) -> list[CounterCheck]:
    """n_used_mmu_pages (kvm->stat.mmu_shadow_pages in 7.3) against the shadow pages."""
    vm = vg.vm
    if not known(vm.n_used_mmu_pages):
        return []
    # 7.3 moved the count to kvm->stat.mmu_shadow_pages (the 7.3 fixture's DWARF; commit
    # not found)
    counter = ("kvm->stat.mmu_shadow_pages" if k.layout.used_pages_path == "stat.mmu_shadow_pages"
               else "kvm->arch.n_used_mmu_pages")
    on_list, held, unreadable = _shadow_pages(vg)
    what = "shadow pages on active_mmu_pages"
    if held:
        what = (f"shadow pages ({on_list} on active_mmu_pages + "
                f"{plural(len(held), 'zapped root', 'zapped roots')} still held)")
    hidden = [x for x in (
        f"{plural(unreadable, 'page', 'pages')} on the lists could not be read"
        if unreadable else "", _model_problems(k, vg)) if x]
    c = _compare(FindingKind.USED_MMU_PAGES, counter, vm.n_used_mmu_pages, on_list + len(held),
                 what, busy, "; ".join(hidden))
    if held and c.verdict is not Verdict.MISMATCH:
        part = (f"{plural(len(held), 'zapped root', 'zapped roots')} off active_mmu_pages but "
                "still held by vCPUs stay accounted until their last reference is put "
                "(__kvm_mmu_prepare_zap_page() keeps a root with root_count > 0 accounted; "
                "mmu_free_root_page() zaps it for good)")
        c = replace(c, why="; ".join(x for x in (part, c.why) if x),
                    objects=tuple(sp.addr for sp in held))
    return [c]


@dataclass(frozen=True)
class TdpPages:
    """A TDP MMU VM's pages as the kernel keeps them (vms, vm): the pages its
    n_used_mmu_pages does not count."""

    pages: int | None  # kvm->arch.tdp_mmu_pages: the linked non-root pages (None: 7.3)
    roots: int  # the roots on kvm->arch.tdp_mmu_roots (tdp_mmu_pages counts none)


def tdp_mmu_pages(k: Kernel, vm: VM) -> TdpPages | None:
    """What kvm->arch.tdp_mmu_pages and tdp_mmu_roots hold for *vm*: the count (6.2-7.2)
    or the list's length (5.10-6.1),
    and the roots; None for a VM without the TDP MMU (shadow, tdp_legacy: its pages are
    shadow pages, in n_used_mmu_pages) or whose MMU is not read (TDX)."""
    if vm.mmu != "tdp_mmu" or vm.unsupported:
        return None
    n = k.vm_reader.tdp_mmu_pages_count(vm)
    if n is None:  # 5.10-6.1: the list's length, its pages not decoded (vms stays cheap)
        n = k.vm_reader.tdp_mmu_pages_listed(vm)
    return TdpPages(n, len(k.tdp_roots(vm)))


def tdp_pages(k: Kernel, vg: VMGraph, busy: tuple[str, ...]) -> list[CounterCheck]:
    """kvm->arch.tdp_mmu_pages against the non-root TDP MMU pages the roots reach."""
    import numpy as np

    addrs, tdp = vg.column("addr"), vg.column("tdp_mmu_page")
    out = np.fromiter([*vg.roots, *vg.orphan_set], dtype=np.uint64)  # (a few)
    reaches = tdp & ~np.isin(addrs, out) if len(out) else tdp
    reached = addrs[reaches]
    what = "non-root TDP MMU pages reachable"
    n = k.vm_reader.tdp_mmu_pages_count(vg.vm)
    hidden = _model_problems(k, vg)
    if n is not None:
        return [_compare(FindingKind.TDP_MMU_PAGES, "kvm->arch.tdp_mmu_pages", n, len(reached),
                         what, busy, hidden)]
    # a list of the pages 5.10-6.1: "KVM: x86/mmu: Track the number of TDP MMU pages, but
    # not the actual pages" (6.2, d25ceb926436); neither in 7.3 (the 7.3 fixture's DWARF)
    if not k.layout.tdp_mmu_pages_list:
        if vg.vm.mmu != "tdp_mmu":
            return []
        return [CounterCheck(FindingKind.TDP_MMU_PAGES, "kvm->arch.tdp_mmu_pages", None,
                             len(reached), what, Verdict.UNCHECKED,
                             "this kernel keeps no count of TDP MMU pages")]
    lists = vg.listed() & tdp
    listed = addrs[lists]
    apart = tuple(np.sort(addrs[lists ^ reaches]).tolist())  # on one side only
    c = _compare(FindingKind.TDP_MMU_PAGES, "the kvm->arch.tdp_mmu_pages list", len(listed),
                 len(reached), what, busy, hidden)
    if c.verdict is Verdict.MATCH and apart:  # as many, not the same
        c = replace(c, verdict=Verdict.EXPLAINED if busy else Verdict.MISMATCH,
                    why=f"{'; '.join(busy)} ({MID_UPDATE[c.kind]})" if busy else "")
    return [replace(c, objects=apart)]


def accounting(k: Kernel, vg: VMGraph, leaves: Leaves | None = None, *,
               live: bool = False) -> Accounting:
    """Every counter of *vg*'s VM against its pages. *leaves*: the present leaves
    counted (Leaves.of(audit state), count_leaves()); without them the page
    stats are UNCHECKED. *live*: the target is a running kernel."""
    vm = vg.vm
    if vm.unsupported:
        return Accounting(vm.addr, (), ())
    busy = _busy(k, vm, leaves, live)
    checks = [*page_stats(k, vg, leaves, busy), *used_pages(k, vg, busy),
              *tdp_pages(k, vg, busy)]
    return Accounting(vm.addr, tuple(checks), busy)


# the severity of a difference nothing explains: the kernel acts on (or WARNs about)
# the page counts; the page stats are statistics only
MISMATCH = {FindingKind.PAGE_STATS: Severity.WARNING, FindingKind.USED_MMU_PAGES: Severity.ERROR,
            FindingKind.TDP_MMU_PAGES: Severity.ERROR}
WHY_EXACT = {
    FindingKind.PAGE_STATS: "with mmu_lock free the kernel's count is exact "
                            "(kvm_update_page_stats()); nothing in the kernel acts on it",
    FindingKind.USED_MMU_PAGES: "with mmu_lock free the kernel's count is exact; "
                                "kvm_mmu_available_pages() and the shrinker act on it",
    FindingKind.TDP_MMU_PAGES: "with mmu_lock free the kernel's count is exact; "
                               "kvm_mmu_uninit_tdp_mmu() WARNs unless it is back to 0",
}


def _counted(n: int | None, what: str) -> str:
    """*n* and *what* (a plural phrase: "shadow pages on active_mmu_pages") after it, its
    noun singular for one: "1 shadow page on active_mmu_pages"."""
    if n == 1:
        what = re.sub(r"\b(pages|SPTEs)\b", lambda m: m.group(1)[:-1], what, count=1)
    return f"{n} {what}"


def finding(c: CounterCheck, vm: int) -> Finding | None:
    """One comparison as a finding: None for a plain MATCH or UNCHECKED."""
    if c.verdict is Verdict.UNCHECKED or (c.verdict is Verdict.MATCH and not c.why):
        return None
    objects = [vm, *c.objects]
    if c.verdict is Verdict.MATCH:
        return Finding(c.kind, Severity.INFO, objects,
                       f"{c.counter} is {c.kernel} = {_counted(c.found, c.what)}: {c.why}")
    if c.kernel == c.found:  # the tdp_mmu_pages list: as many pages, not the same
        what = (f"{c.counter} holds {plural(c.kernel or 0, 'page', 'pages')}, as many as the "
                f"{c.what}, but "
                f"{plural(len(c.objects), 'page is', 'pages are')} on one side only")
    else:
        what = f"{c.counter} is {c.kernel} but {_counted(c.found, c.what)}"
    if c.verdict is Verdict.EXPLAINED:
        return Finding(c.kind, Severity.INFO, objects, f"{what}: explained, {c.why}")
    return Finding(c.kind, MISMATCH[c.kind], objects, f"{what}: {WHY_EXACT[c.kind]}")


def findings(acc: Accounting) -> list[Finding]:
    """The findings of one VM's accounting (accounting())."""
    return [f for c in acc.checks if (f := finding(c, acc.vm)) is not None]


def check_accounting(k: Kernel, vg: VMGraph, leaves: Leaves | None = None, *,
                     live: bool = False) -> list[Finding]:
    """The kernel's accounting of *vg*'s VM checked (check; the page stats with
    *leaves*: check --audit)."""
    return findings(accounting(k, vg, leaves, live=live))


def check_tdp_mmu_pages(k: Kernel, vg: VMGraph, *, live: bool = False) -> list[Finding]:
    """kvm->arch.tdp_mmu_pages (tdp_account_mmu_page: every linked non-root TDP
    MMU page) against the non-root TDP MMU pages the graph found."""
    vm = vg.vm
    return [f for c in tdp_pages(k, vg, _busy(k, vm, None, live))
            if (f := finding(c, vm.addr)) is not None]
