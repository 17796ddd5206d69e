"""vms: every VM on vm_list with its owner and MMU-wide state."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import command
from rich.table import Table

from kvminspect.commands import JSON_ARG, NAMESPACE, finish, session_of
from kvminspect.model import VM
from kvminspect.render import console, hx


def vm_json(vm: VM) -> dict[str, Any]:
    """The JSON shape of one VM (struct kvm)."""
    return {
        "index": vm.index, "kvm": hx(vm.addr), "pid": vm.pid, "comm": vm.comm,
        "task_state": vm.task_state, "online_vcpus": vm.online_vcpus,
        "created_vcpus": vm.created_vcpus, "mmu": vm.mmu, "vendor": vm.vendor,
        "vm_type": vm.vm_type,
        "n_used_mmu_pages": vm.n_used_mmu_pages, "n_max_mmu_pages": vm.n_max_mmu_pages,
        "n_requested_mmu_pages": vm.n_requested_mmu_pages,
        "mmu_valid_gen": vm.mmu_valid_gen, "indirect_shadow_pages": vm.indirect_shadow_pages,
        "memslots": [{"as_id": s.as_id, "id": s.id, "base_gfn": hx(s.base_gfn),
                      "npages": s.npages, "userspace_addr": hx(s.userspace_addr),
                      "flags": s.flags} for s in vm.memslots],
    }


@command(
    description="list VMs (struct kvm on vm_list)",
    long_description="One row per VM: its struct kvm, owner process, vCPUs, MMU kind "
    "(shadow, tdp_mmu, tdp_legacy), the vendor module (kvm_amd, kvm_intel), shadow pages "
    "in use and the MMU generation. A TDX VM is listed, but its MMU is not read.",
    arguments=(JSON_ARG,),
    namespace=NAMESPACE,
)
def _cmd_vms(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    s = session_of(kwargs)
    start = len(s.problems())
    vms = s.kernel.vms()

    def human() -> None:
        if not vms:
            console().print("no VMs (vm_list is empty)")
            return
        t = Table(box=None, header_style="bold")
        for col in ("VM", "KVM", "PID", "COMM", "ST", "VCPUS", "MMU", "VENDOR", "MMU PAGES",
                    "GEN", "MEMSLOTS"):
            t.add_column(col, justify="right" if col in ("VM", "PID", "GEN") else "left")
        for vm in vms:
            mark = "*" if s.selected and s.selected.addr == vm.addr else ""
            t.add_row(f"{mark}{vm.index}", hex(vm.addr), str(vm.pid), vm.comm or "?",
                      vm.task_state or "?", f"{vm.online_vcpus}/{vm.created_vcpus}",
                      vm.mmu + (f" ({vm.vm_type})" if vm.vm_type not in (None, "default")
                                else ""), vm.vendor or "?",
                      f"{vm.n_used_mmu_pages}/{vm.n_max_mmu_pages}", str(vm.mmu_valid_gen),
                      str(len(vm.memslots)))
        console().print(t)

    finish(s, args, {"vms": [vm_json(vm) for vm in vms]}, human, start)
