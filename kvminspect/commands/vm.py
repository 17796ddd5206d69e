"""vm: select a VM for the following commands and show its details."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument
from rich.table import Table

from kvminspect.commands import finish, kvm_command, session_of
from kvminspect.render import console
from kvminspect.shapes import vm_json


@kvm_command(
    argument("id", nargs="?", metavar="ID",
             help="VM index, pid:PID, struct kvm address, or 'all'"),
    vm=False,
)
def _cmd_vm(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """select a VM (index, pid:PID or struct kvm address) and show it

    Later commands work on the selected VM only (the prompt shows it). 'vm all' clears
    the selection; 'vm' alone shows the selected VM.
    """
    s = session_of(kwargs)
    if args.id == "all":
        s.selected = None
    elif args.id is not None:
        s.select(args.id)
    vm = s.selected

    def human() -> None:
        c = console()
        if vm is None:
            c.print(f"no VM selected ({len(s.kernel.vms())} VMs; commands work on all of them)")
            return
        c.print(f"VM {vm.index}: kvm {vm.addr:#x}  pid {vm.pid} ({vm.comm or '?'}, "
                f"state {vm.task_state or '?'})  vCPUs {vm.online_vcpus}/{vm.created_vcpus}")
        c.print(f"  MMU {vm.mmu}: {vm.n_used_mmu_pages} of {vm.n_max_mmu_pages} pages used "
                f"(requested {vm.n_requested_mmu_pages}), mmu_valid_gen {vm.mmu_valid_gen}, "
                f"indirect_shadow_pages {vm.indirect_shadow_pages}")
        t = Table(box=None, header_style="bold", title="memslots", title_justify="left")
        for col in ("AS", "ID", "BASE GFN", "NPAGES", "USERSPACE ADDR", "FLAGS"):
            t.add_column(col)
        for m in vm.memslots:
            t.add_row(str(m.as_id), str(m.id), hex(m.base_gfn), str(m.npages),
                      hex(m.userspace_addr), hex(m.flags))
        c.print(t)

    # the selected VM (none: commands work on all VMs)
    finish(s, args, "vm", {"vms": [vm_json(vm)] if vm else []}, human,
           [vm] if vm else [])
