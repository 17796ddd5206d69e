"""The MMU audit the kernel removed (CONFIG_KVM_MMU_AUDIT), offline: ``check --audit``.

arch/x86/kvm/mmu/mmu_audit.c (removed in 5.18 by "KVM: x86/mmu: Remove MMU
auditing", 1bbc60d0c7e5) checked at page faults and
syncs what this module checks on the model of a dump or a live host:

* unsync only at level 1: kvminspect.check.check_unsync_pages (in every check);
* every present leaf SPTE maps the host pfn the memslot translation of its
  gfn gives (audit_mappings): the leaf's gfn is kvm_mmu_page_get_gfn(sp, i)
  (sp->gfn-based for direct pages; sp->shadowed_translation[i] >> PAGE_SHIFT
  from 6.0, "KVM: x86/mmu: Cache the access bits of shadowed translations"
  (6a97575d5cff), sp->gfns[i] before), then kvminspect.walk.memslot_check; a large
  SPTE is checked on its first 4K;
* rmap <-> SPTE for shadow-MMU pages (inspect_spte_has_rmap, check_mappings_rmap):
  every present leaf SPTE has an entry in its gfn's rmap at its level, and
  every rmap entry points at a present leaf SPTE mapping that gfn;
* write protection (audit_write_protection): no writable leaf SPTE maps the
  gfn of a valid, synced, indirect shadow page (account_shadowed ->
  kvm_mmu_slot_gfn_write_protect);
* TDP MMU: a REMOVED_SPTE / FROZEN_SPTE (a dump taken mid-update) with what
  can be known of who holds mmu_lock.

The kernel's own counters (kvm->stat.pages_*, n_used_mmu_pages,
kvm->arch.tdp_mmu_pages) against the pages found are kvminspect.accounting's.
audit_vm also runs kvminspect.invariants on what collect() read: each page's role
and gfn against its parent's (kvm_mmu_child_role, kvm_mmu_page_get_gfn), MMIO and
present leaf SPTEs against the memslots.

The leaves are LeafSpte (one present leaf SPTE of a shadow page, with its
gfn); findings are kvminspect.check.Finding; a leaf the dump cannot confirm
is counted by its kvminspect.walk.MemslotOutcome. Nothing here renders.
"""

from __future__ import annotations

from collections import Counter

from kvminspect.check import Finding, FindingKind, Severity, sp_id
from kvminspect.fmt import spte_text
from kvminspect.graph import VMGraph
from kvminspect.invariants import check_invariants
from kvminspect.layout import known
from kvminspect.leaves import AuditState, collect
from kvminspect.model import Kernel
from kvminspect.objects import VM, ShadowPage, as_id_of
from kvminspect.render import plural
from kvminspect.rmap import LEVEL_NAMES, RmapReader
from kvminspect.spte import PAGE_SHIFT
from kvminspect.walk import CHECK_OUTCOMES, TRANSLATED, MemslotOutcome, memslot_checks

MAX_REPORTED = 64  # findings of one check per VM spelled out; the rest counted
PT_WRITABLE_MASK = 1 << 1


def _capped(out: list[Finding], extra: int, check: FindingKind, what: str) -> list[Finding]:
    if extra > 0:
        out.append(Finding(check, Severity.ERROR, [], f"and {extra} more {what} (not listed)"))
    return out


# Why present leaf SPTEs could not be checked against the memslot, in the
# leaf-pfn-unchecked finding: one phrase per not-checkable MemslotOutcome, in
# the order the finding lists them
UNCHECKED = {
    MemslotOutcome.CANNOT_TRANSLATE: "cannot translate the userspace address",
    MemslotOutcome.NO_MEMSLOT: "no memslot holds the gfn",
    MemslotOutcome.NO_MM: "the VM has no mm",
    MemslotOutcome.NOT_IN_DUMP: "the VMM's page tables are not in the dump",
    MemslotOutcome.NOT_MAPPED: "the VMM's page tables map nothing there",
    MemslotOutcome.NO_GFN: "the leaf's gfn could not be read",
}


def check_leaf_pfns(k: Kernel, vm: VM, st: AuditState) -> list[Finding]:
    """audit_mappings(): each present leaf's pfn against gfn -> memslot -> hva -> host
    pfn (large SPTEs on their first 4K); the ones the dump cannot confirm counted.

    Each (address space, gfn) is translated once (the first leaf's check stands
    for the others), all at once (kvminspect.walk.memslot_checks)."""
    import numpy as np

    cols = st.columns()
    out: list[Finding] = []
    unchecked: Counter[MemslotOutcome] = Counter()
    no_gfn = int((~cols.has_gfn).sum())
    if no_gfn:
        unchecked[MemslotOutcome.NO_GFN] = no_gfn
    with_gfn = np.flatnonzero(cols.has_gfn)
    gfns, as_ids = cols.gfn[with_gfn], cols.as_id[with_gfn]
    # each distinct (address space, gfn) once, and which of them each leaf is
    key_of = np.zeros(len(with_gfn), dtype=np.intp)
    keys_gfn, keys_as = [], []
    n_keys = 0
    for as_id in np.unique(as_ids).tolist():
        mine = np.flatnonzero(as_ids == as_id)
        distinct, back = np.unique(gfns[mine], return_inverse=True)
        key_of[mine] = n_keys + back.reshape(-1)
        keys_gfn.append(distinct)
        keys_as.append(np.full(len(distinct), as_id, dtype=np.int64))
        n_keys += len(distinct)
    mm = k.vm_reader.vmm_mm(vm)  # None: NO_MM for every leaf a memslot holds
    code, hva, host = (memslot_checks(k, vm, np.concatenate(keys_gfn), np.concatenate(keys_as),
                                      mm) if n_keys else
                       (np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint64),
                        np.zeros(0, dtype=np.uint64)))
    leaf_code = code[key_of]
    for c, n in zip(*np.unique(leaf_code[leaf_code != TRANSLATED], return_counts=True),
                    strict=True):
        unchecked[CHECK_OUTCOMES[int(c)]] += int(n)
    pfn = (cols.value[with_gfn] & np.uint64(k.layout.addr_mask)) >> np.uint64(PAGE_SHIFT)
    wrong = np.flatnonzero((leaf_code == TRANSLATED) & (host[key_of] != pfn))
    bad = len(wrong)
    for j in wrong[:MAX_REPORTED].tolist():
        leaf, key = cols[int(with_gfn[j])], int(key_of[j])
        assert leaf.gfn is not None
        out.append(Finding(
            FindingKind.LEAF_PFN, Severity.ERROR, [leaf.sp.addr],
            f"{leaf.where()} maps pfn {int(pfn[j]):#x} but the memslot translation of gfn "
            f"{leaf.gfn:#x} (hva {int(hva[key]):#x}) is pfn {int(host[key]):#x}"))
    if unchecked:
        n = sum(unchecked.values())
        out.append(Finding(
            FindingKind.LEAF_PFN_UNCHECKED, Severity.INFO, [],
            f"{plural(n, 'present leaf SPTE', 'present leaf SPTEs')} not checkable against "
            "the memslot: " + "; ".join(f"{unchecked[o]}: {why}" for o, why in UNCHECKED.items()
                                        if unchecked[o]), count=n))
    return _capped(out, bad - MAX_REPORTED, FindingKind.LEAF_PFN, "leaf SPTEs with the wrong pfn")


def check_rmaps(k: Kernel, vg: VMGraph, st: AuditState, reader: RmapReader) -> list[Finding]:
    """inspect_spte_has_rmap / check_mappings_rmap: shadow-MMU leaf SPTEs against
    the memslots' rmaps, both ways (the TDP MMU keeps no rmaps)."""
    import numpy as np

    vm = vg.vm
    if not reader.has_rmaps(vm):
        return []
    scan = reader.scan(vm)
    out = [Finding(FindingKind.RMAP_UNREADABLE, Severity.ERROR, [where],
                   f"rmap at {where:#x}: {why}") for where, why in scan.problems[:MAX_REPORTED]]
    cols = st.columns()
    shadow = np.flatnonzero(~cols.table_tdp[cols.table])  # the TDP MMU keeps no rmaps
    t = cols.table[shadow]
    spt = np.fromiter((sp.spt for sp in cols.tables), dtype=np.uint64, count=len(cols.tables))
    spteps = (spt[t] + np.uint64(8) * cols.index[shadow].astype(np.uint64)).tolist()
    gfns, has = cols.gfn[shadow].tolist(), cols.has_gfn[shadow].tolist()
    levels, as_ids = cols.table_level[t].tolist(), cols.table_as[t].tolist()
    entries, readable, some_unreadable = scan.entries, scan.readable, bool(scan.unreadable)
    missing = wrong = 0
    for j, sptep in enumerate(spteps):
        if not has[j]:
            continue
        got = entries.get(sptep)
        gfn, level, as_id = gfns[j], levels[j], as_ids[j]
        if got is None:
            if some_unreadable and not readable(as_id, gfn, level):
                continue
            missing += 1
            if missing <= MAX_REPORTED:
                leaf = cols[int(shadow[j])]
                out.append(Finding(
                    FindingKind.RMAP_MISSING, Severity.ERROR, [leaf.sp.addr],
                    f"{leaf.where()}: present leaf SPTE {spte_text(leaf.value)} has no entry "
                    f"in the {LEVEL_NAMES[level]} rmap of gfn {gfn:#x}"
                    + (f" (address space {as_id})" if as_id else "")))
            continue
        shift = 9 * (level - 1)
        if (got.as_id, got.gfn >> shift, got.level) != (as_id, gfn >> shift, level):
            wrong += 1
            if wrong <= MAX_REPORTED:
                leaf = cols[int(shadow[j])]
                out.append(Finding(
                    FindingKind.RMAP_WRONG_GFN, Severity.ERROR, [leaf.sp.addr],
                    f"{leaf.where()}: expected in the {LEVEL_NAMES[level]} rmap of gfn "
                    f"{gfn:#x}, found in the {LEVEL_NAMES.get(got.level, '?')} rmap of "
                    f"gfn {got.gfn:#x} (address space {got.as_id})"))
    leaves = set(spteps)
    stale = 0
    for sptep, (as_id, gfn, level) in entries.items():
        if sptep in leaves:
            continue
        stale += 1
        if stale > MAX_REPORTED:
            continue
        e = reader.resolve(vm, as_id, gfn, level, sptep)
        if e.sp is None:
            what = "points into no shadow page's spt[]"
            objs = []
        else:
            sp = vg.nodes.get(e.sp) or k.shadow_page(e.sp)
            objs = [e.sp]
            if e.value is None:
                what = f"points at spt[{e.index}] of sp {e.sp:#x}, which is unreadable"
            elif e.bits is not None and e.bits.present and e.bits.leaf:
                what = (f"points at spt[{e.index}] of {sp_id(sp) if sp else hex(e.sp)}, a "
                        "present leaf of a page no root or page list of this VM has")
            else:
                what = (f"points at spt[{e.index}] = {spte_text(e.value)} of "
                        f"{sp_id(sp) if sp else hex(e.sp)}, which is not a present leaf")
        out.append(Finding(
            FindingKind.RMAP_STALE, Severity.ERROR, objs,
            f"the {LEVEL_NAMES.get(level, '?')} rmap of gfn {gfn:#x} holds sptep {sptep:#x} "
            f"that {what}"))
    if scan.unreadable:
        out.append(Finding(
            FindingKind.RMAP_UNCHECKED, Severity.INFO, [],
            f"{plural(len(scan.unreadable), 'memslot rmap array', 'memslot rmap arrays')} "
            "not in the dump: the leaf SPTEs of those gfns are not checked against rmaps"))
    _capped(out, missing - MAX_REPORTED, FindingKind.RMAP_MISSING,
            "leaf SPTEs without rmap entries")
    _capped(out, wrong - MAX_REPORTED, FindingKind.RMAP_WRONG_GFN,
            "leaf SPTEs in another gfn's rmap")
    return _capped(out, stale - MAX_REPORTED, FindingKind.RMAP_STALE, "stale rmap entries")


def shadowed_gfns(vg: VMGraph) -> dict[tuple[int, int], ShadowPage]:
    """(address space, gfn) -> a valid, synced, indirect shadow page of that gfn:
    the guest page tables account_shadowed() write-protected (passthrough
    pages, 5.19+, shadow no guest table and are skipped: role.passthrough came
    with "KVM: X86/MMU: Fix shadowing 5-level NPT for 4-level NPT L1 guest",
    84e5ffd045f3)."""
    out: dict[tuple[int, int], ShadowPage] = {}
    vm_gen = vg.vm.mmu_valid_gen
    by_role: dict[int, tuple[bool, int]] = {}  # role word: (never shadows, address space)
    for sp in vg.pages():
        role = sp.role
        never = by_role.get(role.word)
        if never is None:
            never = by_role[role.word] = (
                bool(role.direct or role.get("passthrough") or role.invalid), as_id_of(sp))
        if never[0] or sp.tdp_mmu_page or sp.unsync is True or not known(sp.unsync):
            continue
        # is_obsolete_sp() (role.invalid above): an old mmu_valid_gen
        if known(sp.mmu_valid_gen) and known(vm_gen) and sp.mmu_valid_gen != vm_gen:
            continue
        out.setdefault((never[1], sp.gfn), sp)
    return out


def check_write_protection(vg: VMGraph, st: AuditState) -> list[Finding]:
    """audit_write_protection(): no writable leaf SPTE maps a shadowed gfn (a
    large one: none inside its range)."""
    import numpy as np

    shadowed = shadowed_gfns(vg)
    if not shadowed:
        return []
    by_as: dict[int, list[int]] = {}
    for as_id, gfn in shadowed:
        by_as.setdefault(as_id, []).append(gfn)
    cols = st.columns()
    writable = np.flatnonzero(((cols.value & np.uint64(PT_WRITABLE_MASK)) != 0) & cols.has_gfn)
    as_ids, gfns = cols.as_id[writable], cols.gfn[writable]
    span = np.uint64(1) << (np.uint64(9) * (cols.level[writable] - 1).astype(np.uint64))
    hit = np.full(len(writable), -1, dtype=np.int64)  # the shadowed gfn each covers
    for as_id, v in by_as.items():
        table = np.array(sorted(v), dtype=np.uint64)
        mine = np.flatnonzero(as_ids == as_id)
        i = np.searchsorted(table, gfns[mine])  # bisect_left
        inside = i < len(table)
        first = table[np.minimum(i, len(table) - 1)]
        covers = inside & (first < gfns[mine] + span[mine])
        hit[mine[covers]] = first[covers].astype(np.int64)
    found = np.flatnonzero(hit >= 0)
    out: list[Finding] = []
    for j in found[:MAX_REPORTED].tolist():
        leaf, gfn = cols[int(writable[j])], int(hit[j])
        guest = shadowed[(leaf.as_id, gfn)]
        out.append(Finding(
            FindingKind.WRITABLE_SHADOWED, Severity.ERROR, [leaf.sp.addr, guest.addr],
            f"{leaf.where()} is writable ({spte_text(leaf.value)}) but gfn {gfn:#x} is a guest "
            f"page table that {sp_id(guest)} shadows (synced: it must be write-protected)"))
    return _capped(out, len(found) - MAX_REPORTED, FindingKind.WRITABLE_SHADOWED,
                   "writable SPTEs to shadowed gfns")


def mmu_lock_state(k: Kernel, vm: VM) -> str:
    """What kvm->mmu_lock says about its holder: a qrwlock (5.12+, "KVM: x86/mmu:
    Use an rwlock for the x86 MMU", 531810caa9f4) counts readers and a writer but
    names neither; a spinlock (before) is only locked or not."""
    lock = k.vm_states.mmu_lock(vm)
    if lock.error is not None:
        return f"mmu_lock unreadable ({lock.error})"
    if not lock.rwlock:
        return f"mmu_lock (a spinlock, no owner recorded) is {'held' if lock.writer else 'free'}"
    if lock.writer:
        state = "held for write"
    elif lock.readers:
        state = f"held for read by {plural(lock.readers, 'thread', 'threads')}"
    else:
        state = "free"
    return f"mmu_lock (a rwlock: no owner recorded) is {state}"


def check_frozen(k: Kernel, vg: VMGraph, st: AuditState) -> list[Finding]:
    """REMOVED_SPTE / FROZEN_SPTE in TDP MMU tables: transient, a dump taken while
    a TDP MMU update (tdp_mmu_set_spte_atomic / handle_removed_pt) ran."""
    if not st.frozen:
        return []
    busy = [f"vcpu{v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id} (mode {v.mode}, "
            f"mp_state {v.mp_state}, cpu {v.cpu})" for v in vg.vcpus
            if v.mode in ("OUTSIDE_GUEST_MODE", "READING_SHADOW_PAGE_TABLES")
            and v.mp_state == "RUNNABLE"]
    where = ", ".join(f"sp {sp.addr:#x} spt[{i}]" for sp, i in st.frozen[:8])
    who = ("runnable vCPUs outside guest mode, which may hold it (in a page fault): "
           + "; ".join(busy)) if busy else (
        "no runnable vCPU is outside guest mode: a VM-wide thread (memslot update, MMU "
        "notifier, NX huge page recovery) may hold it")
    return [Finding(
        FindingKind.FROZEN_SPTE, Severity.INFO, sorted({sp.addr for sp, _ in st.frozen}),
        f"{plural(len(st.frozen), 'frozen SPTE', 'frozen SPTEs')} ({where}): transient, "
        f"the dump was taken during a TDP MMU update under mmu_lock; "
        f"{mmu_lock_state(k, vg.vm)}; {who}")]


def audit_vm(k: Kernel, vg: VMGraph, reader: RmapReader | None = None,
             st: AuditState | None = None) -> list[Finding]:
    """The audit's checks of one VM (check --audit adds them to check_vm's);
    *st*: what collect() read, when the caller has it already."""
    st = st if st is not None else collect(k, vg)
    reader = reader or RmapReader(k)
    return [
        *check_leaf_pfns(k, vg.vm, st),
        *check_rmaps(k, vg, st, reader),
        *check_write_protection(vg, st),
        *check_frozen(k, vg, st),
        *check_invariants(k, vg, st),
    ]
