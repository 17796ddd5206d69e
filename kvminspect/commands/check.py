"""check: consistency checks of each VM's MMU state (kvminspect.check)."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import command
from rich.table import Table
from rich.text import Text

from kvminspect.check import Finding, check_vm, summary
from kvminspect.commands import JSON_ARG, NAMESPACE, VM_ARG, finish, session_of
from kvminspect.model import VM
from kvminspect.render import console, hx

STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def findings_table(findings: list[Finding]) -> Table:
    """The findings of one VM: severity, check id, message."""
    t = Table(box=None, header_style="bold")
    for col in ("SEVERITY", "CHECK", "MESSAGE"):
        t.add_column(col, overflow="fold")
    for f in findings:
        t.add_row(f.severity, f.check, Text(f.message), style=STYLE.get(f.severity))
    return t


@command(
    description="consistency checks: unsync bitmaps, root_count, obsolete roots, orphans",
    long_description="Checks each VM's shadow pages the way the kernel maintains them: "
    "unsync_children against the bits of unsync_child_bitmap; each set bit against "
    "spt[i] and its child (stale bits, bits over non-present SPTEs: info, the kernel "
    "clears them lazily in __mmu_unsync_walk); every parent of an unsync page has its bit "
    "set; only indirect level-1 pages are unsync; root_count against the vCPU references "
    "(root, prev_roots[], pae_root[]; +1 for a valid TDP MMU root on tdp_mmu_roots); "
    "obsolete roots still in use (a warning, normal right after a fast zap); orphan pages; "
    "and every object the model could not read or found impossible (errors).",
    arguments=(VM_ARG, JSON_ARG),
    namespace=NAMESPACE,
)
def _cmd_check(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    s = session_of(kwargs)
    start = len(s.problems())
    vms = s.vms(args.vm)
    data: list[tuple[VM, list[Finding]]] = []
    for vm in vms:
        data.append((vm, check_vm(s.kernel, s.graph(vm))))

    def human() -> None:
        c = console()
        if not vms:
            c.print("no VMs (vm_list is empty)")
        for vm, findings in data:
            n = summary(findings)
            c.print(f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid}  {vm.mmu}: "
                    f"{n['error']} errors, {n['warning']} warnings, {n['info']} info",
                    markup=False)
            if findings:
                c.print(findings_table(findings), markup=False)
            else:
                c.print("  no findings")

    doc = {"vms": [{"kvm": hx(vm.addr), "pid": vm.pid,
                    "findings": [f.to_json() for f in findings],
                    "summary": summary(findings)} for vm, findings in data]}
    finish(s, args, doc, human, start)
