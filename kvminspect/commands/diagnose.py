"""diagnose: a verdict per VM, the findings that matter, and why stuck vCPUs are stuck."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect import render
from kvminspect.check import Severity
from kvminspect.commands import kvm_command, per_vm, vm_header
from kvminspect.diagnose import Folded, VcpuDiagnosis, Verdict, VmDiagnosis, diagnose_vm
from kvminspect.errors import UsageError
from kvminspect.fmt import hx
from kvminspect.objects import VM
from kvminspect.options import BATCH_USAGE
from kvminspect.render import plural
from kvminspect.session import Session
from kvminspect.shapes import diagnosis_json

STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
FAIL_ON = {"error": Severity.ERROR, "warning": Severity.WARNING}


def say(text: str, style: str | None = None) -> None:
    """One item of diagnose's text (render.say): wrapped at the console's width
    between words (an address is never cut), continuation lines indented two more."""
    render.say(text, "  ", style=style)


def refuse_in_session(args: argparse.Namespace) -> None:
    """The diagnose command in a session (a REPL, -e, -c CORE): --jsonl, -j and
    CORE are the command line's, which starts a process per core."""
    if args.jsonl or args.cores or args.jobs is not None:
        raise UsageError("diagnose: --jsonl, -j and CORE are for the command line, without "
                         f"a target: {BATCH_USAGE}")


def verdict_line(vm: VM, d: VmDiagnosis) -> str:
    """The VM's header with its verdict and counts."""
    n = d.counts
    errors = plural(n[Severity.ERROR], "error", "errors")
    warnings = plural(n[Severity.WARNING], "warning", "warnings")
    stuck = sum(1 for v in d.vcpus if v.stuck)
    also = f", {plural(stuck, 'stuck vCPU', 'stuck vCPUs')}" if stuck else ""
    return vm_header(vm, f"{d.verdict.value.upper()} ({errors}, {warnings}, "
                     f"{n[Severity.INFO]} info{also})")


def audit_line(d: VmDiagnosis) -> str:
    """What the audit checked (a clean audit says so)."""
    a = d.audit
    return (f"  checked {plural(a.pages, 'shadow page', 'shadow pages')}, "
            f"{plural(a.leaves, 'present leaf SPTE', 'present leaf SPTEs')} against the "
            f"memslots and rmaps ({a.unchecked} not checkable)")


def folded_line(folded: list[Folded]) -> str:
    """The info findings, one kind after the other with its count, on one line."""
    return "  info (normal states; check --all lists each): " + ", ".join(
        f"{f.kind.value} x{f.count}" for f in folded)


def vcpu_lines(v: VcpuDiagnosis) -> list[str]:
    """Why one vCPU cannot make progress, and the evidence."""
    c = v.vcpu
    name = f"vcpu{c.vcpu_idx if c.vcpu_idx >= 0 else c.vcpu_id}"
    out = [f"  {name} STUCK-SUSPECT: " + ", ".join(r.value for r in v.reasons)]
    out.append(f"    state: mp_state {c.mp_state}, mode {c.mode}, requests "
               + (", ".join(c.request_names) or "none"))
    root = c.root
    out.append(f"    root: {v.root.value}" + ("" if root is None or root.hpa is None
                                              else f" (hpa {root.hpa:#x})")
               + f", reload request {'pending' if v.reload_pending else 'not pending'}")
    e = v.last_exit
    if e is not None:
        addr = "" if e.address is None else f" at {e.address_kind.value} {e.address:#x}"
        out.append(f"    last exit: {e.name or hex(e.code)}{addr} ({e.source})"
                   + (": stale, the vCPU is in guest mode" if e.stale else ""))
    f = v.fault
    if f is not None:
        out.append(f"    fault address: {f.kind} {f.address:#x} -> gfn {hx(f.gfn)}, "
                   f"hva {hx(f.hva)} ({f.how}); inside the invalidation: "
                   + {True: "yes", False: "no", None: "unknown"}[f.inside])
    return out


@kvm_command(
    argument("--fail-on", choices=sorted(FAIL_ON), default="error",
             help="the severity that makes the exit status 3 (default: error)"),
    argument("--jsonl", action="store_true",
             help="diagnose each CORE in its own process, one JSON line per core, in order "
             "(the command line only, without -c)"),
    argument("-j", "--jobs", type="count", metavar="N",
             help="with --jsonl: at most N cores at once (default: 1)"),
    argument("cores", nargs="*", metavar="CORE",
             help="with --jsonl: a vmcore or crash directory, as -c takes"),
)
def _cmd_diagnose(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """a verdict per VM (healthy, degraded, corrupt), what matters, and stuck vCPUs

    Runs check and the audit (check --audit) on each VM and weighs them: a VM is
    corrupt with any error finding, degraded with a warning or a stuck-suspect vCPU,
    healthy otherwise; states
    the kernel calls normal (an obsolete root whose vCPUs have the reload request
    pending, orphans kept for reuse) are info, folded into one line per kind. Then each
    vCPU that cannot make progress, and why: its last exit is a page fault inside an MMU
    notifier invalidation in progress, or its root is invalid or obsolete with no reload
    request pending (README: Diagnose), with the evidence: mp_state and mode, pending
    requests, the root, the last exit and its address in the invalidation range's unit,
    the invalidation and mmu_lock. The exit status is 3 when a VM is corrupt (with
    --fail-on warning, degraded too).

    Many vmcores at once: kvminspect diagnose --jsonl CORE... [-j N] prints one line per
    core, in the order given: diagnose --json's document with "core", "kernel_release"
    and "elapsed" in front, or {"core", "error", "elapsed"} for a core that cannot be
    diagnosed (the others go on). Each core is read by its own process, at most N at
    once. Exit status: 1 if a core could not be diagnosed, else 3 if one has an error
    finding (with --fail-on warning, a warning), else 0 (README: Scripts).
    """
    refuse_in_session(args)
    fail = FAIL_ON[args.fail_on]

    def collect(s: Session, vm: VM) -> VmDiagnosis:
        d = s.memo(("diagnose", vm.addr),
                   lambda: diagnose_vm(s.kernel, s.graph(vm), live=s.target.live))
        if d.verdict is Verdict.CORRUPT or (fail is Severity.WARNING
                                             and d.verdict is Verdict.DEGRADED):
            s.check_errors = True  # exit status 3
        return d

    def show(vm: VM, d: VmDiagnosis) -> None:
        for f in d.shown:
            say(f"  {f.severity.value} {f.check.value}: {f.message}", STYLE[f.severity])
        if d.folded:
            say(folded_line(d.folded), STYLE[Severity.INFO])
        say(audit_line(d))
        say(f"  {invalidation_text(d)}; {lock_text(d)}")
        stuck = [v for v in d.vcpus if v.stuck]
        if not stuck:
            say(f"  vCPUs: {len(d.vcpus)}, none stuck")
        for v in stuck:
            for line in vcpu_lines(v):
                say(line)

    per_vm(kwargs, args, "diagnose", collect=collect, show=show,
           header=verdict_line, to_json=lambda vm, d: diagnosis_json(d))


def invalidation_text(d: VmDiagnosis) -> str:
    """The MMU notifier's state (struct kvm's mmu_invalidate_*): in progress or not."""
    inv = d.invalidation
    if inv.prefix is None:
        return "MMU notifier state not in this kernel's struct kvm"
    if not inv.in_progress:
        return f"MMU notifier: seq {inv.seq}, no invalidation in progress"
    return (f"MMU notifier: seq {inv.seq}, {inv.in_progress} invalidation(s) in progress, "
            f"range {inv.unit.value} {hx(inv.range_start)}-{hx(inv.range_end)}")


def lock_text(d: VmDiagnosis) -> str:
    """kvm->mmu_lock as diagnose states it."""
    lock = d.mmu_lock
    if lock.error is not None:
        return f"mmu_lock unreadable ({lock.error})"
    if not lock.rwlock:
        return f"mmu_lock (a spinlock) {'held' if lock.writer else 'free'}"
    if lock.writer:
        return "mmu_lock held for write"
    return f"mmu_lock held for read by {lock.readers}" if lock.readers else "mmu_lock free"


__all__ = ["Verdict", "lock_text", "vcpu_lines", "verdict_line"]
