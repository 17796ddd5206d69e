"""check: consistency checks of each VM's MMU state (kvminspect.check)."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect import audit, leaves
from kvminspect.accounting import Leaves, check_accounting
from kvminspect.check import Finding, Severity, by_severity, check_vm, infos_by_kind, summary
from kvminspect.commands import kvm_command, per_vm, vm_header
from kvminspect.objects import VM
from kvminspect.render import Grid, console, plural
from kvminspect.session import Session
from kvminspect.shapes import finding_json, summary_json

STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}


def findings_table(findings: list[Finding], every: bool = True) -> Grid:
    """The findings of one VM: severity, check id, message; unless *every*, the
    info findings of one check folded into one row with their count."""
    t = Grid()
    for col in ("SEVERITY", "CHECK", "MESSAGE"):
        t.add_column(col, text=col == "MESSAGE")
    folded = {} if every else infos_by_kind(findings)
    for f in findings:
        same = folded.get(f.check) if f.severity is Severity.INFO else None
        if same is not None and f is not same[0]:
            continue
        t.add_row(f.severity.value, f.check.value, f.message, style=STYLE[f.severity])
    for kind, same in folded.items():
        if len(same) > 1:
            t.add_row(Severity.INFO.value, kind.value,
                      f"and {len(same) - 1} more like it (--all lists each)",
                      style=STYLE[Severity.INFO])
    return t


@kvm_command(
    argument("--all", action="store_true",
             help="list every info finding (by default those of one check are folded)"),
    argument("--audit", action="store_true",
             help="also the MMU audit (CONFIG_KVM_MMU_AUDIT, removed in 5.18): each leaf "
             "SPTE's pfn against the memslot, rmap <-> SPTE both ways, write protection "
             "of shadowed gfns, frozen TDP MMU SPTEs; each child's role and gfn against "
             "its parent's, MMIO SPTEs over RAM, leaves outside every memslot"),
)
def _cmd_check(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """consistency checks: unsync bitmaps, root_count, obsolete roots, orphans

    Checks each VM's shadow pages the way the kernel maintains them: unsync_children
    against the bits of unsync_child_bitmap; each set bit against spt[i] and its child
    (stale bits, bits over non-present SPTEs: info, the kernel clears them lazily in
    __mmu_unsync_walk); every parent of an unsync page has its bit set; only indirect
    level-1 pages are unsync; root_count against the vCPU references (root,
    prev_roots[], pae_root[]; +1 for a valid TDP MMU root on tdp_mmu_roots); obsolete
    roots still in use (info while their vCPUs have the reload request pending, as
    right after a fast zap; a warning for a vCPU without it); orphan pages; the
    kernel's page counts against the pages found: n_used_mmu_pages
    (kvm->stat.mmu_shadow_pages in 7.3) against the shadow pages on active_mmu_pages
    plus the zapped roots vCPUs still hold, kvm->arch.tdp_mmu_pages (the list to 6.1,
    the count 6.2-7.2) against the non-root TDP MMU pages reached (a difference is info
    when the kernel explains it: a dump taken with mmu_lock held, a live target, pages
    not in the dump; else an error); and every object the model could not read or
    found impossible (errors).

    --audit adds what the kernel's CONFIG_KVM_MMU_AUDIT (mmu_audit.c, removed in 5.18
    by "KVM: x86/mmu: Remove MMU auditing", 1bbc60d0c7e5)
    checked, reading every leaf table: each present leaf SPTE maps the host page the
    memslot translation of its gfn gives (gfn, memslot, userspace address, the VMM's
    page tables; large SPTEs on their first 4K; pages the dump cannot confirm are
    counted as not checkable, info); every shadow-MMU leaf SPTE has an entry in its
    gfn's rmap at its level and every rmap entry points at a present leaf SPTE of
    that gfn; no writable leaf SPTE maps the gfn of a synced indirect shadow page (a
    write-protected guest page table); a frozen TDP MMU SPTE (REMOVED_SPTE /
    FROZEN_SPTE, a dump taken mid-update) is info naming what mmu_lock and the vCPUs
    say about who may hold the lock; kvm->stat.pages_4k/2m/1g (lpages before 5.15)
    against the present leaf SPTEs of each level (a warning when nothing explains a
    difference: the kernel acts on none of these statistics); and the invariants the
    kernel keeps between a page and its parent (kvminspect.invariants, errors naming
    the page, its gfn and the parent): the child's role as kvm_mmu_child_role() derives
    it (level one below, the inherited bits equal), a direct child's gfn where
    kvm_mmu_page_get_gfn(parent, index) puts it, no MMIO SPTE of the current memslot
    generation over a gfn the memslots map as RAM, no present leaf outside every
    memslot (pages made obsolete by a fast zap, and those below them, are exempt).

    The text folds the info findings of one check into one row (--all lists each);
    --json lists every finding.
    """
    def show(vm: VM, findings: list[Finding]) -> None:
        if findings:
            console().print(findings_table(findings, args.all), markup=False)
        else:
            console().print("  no findings")

    def header(vm: VM, findings: list[Finding]) -> str:
        n = summary(findings)
        return vm_header(vm, f"{plural(n[Severity.ERROR], 'error', 'errors')}, "
                         f"{plural(n[Severity.WARNING], 'warning', 'warnings')}, "
                         f"{n[Severity.INFO]} info")

    def collect(s: Session, vm: VM) -> list[Finding]:
        g = s.graph(vm)
        st = leaves.collect(s.kernel, g) if args.audit else None
        findings = check_vm(s.kernel, g) + check_accounting(
            s.kernel, g, None if st is None else Leaves.of(st), live=s.target.live)
        if st is not None:
            findings += audit.audit_vm(s.kernel, g, st=st)
        findings = by_severity(findings)
        s.check_errors = s.check_errors or summary(findings)[Severity.ERROR] > 0  # exit status 3
        return findings

    per_vm(kwargs, args, "check", collect=collect,
           show=show, header=header,
           to_json=lambda vm, findings: {"findings": [finding_json(f) for f in findings],
                                         "summary": summary_json(summary(findings))})
