"""vcpus: every vCPU of a VM: thread, CPU, state, guest CR3 and current MMU."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import command
from rich.table import Table

from kvminspect.commands import JSON_ARG, NAMESPACE, VM_ARG, finish, session_of
from kvminspect.model import VCpu
from kvminspect.render import console, hexs, hx


def vcpu_json(v: VCpu) -> dict[str, Any]:
    """The JSON shape of one struct kvm_vcpu (without its roots)."""
    return {
        "vcpu": hx(v.addr), "vcpu_id": v.vcpu_id, "vcpu_idx": v.vcpu_idx, "tid": v.tid,
        "comm": v.comm, "cpu": v.cpu, "mode": v.mode, "mp_state": v.mp_state,
        "cr3": hx(v.cr3), "mmu": v.mmu_name, "root_level": v.root_level, "direct": v.direct,
        "root_hpa": hx(v.root.hpa) if v.root else None,
    }


@command(
    description="list vCPUs (struct kvm_vcpu) with thread, state, CR3 and MMU",
    long_description="One row per online vCPU: id and index, its thread, the CPU it last "
    "ran on, vcpu->mode and mp_state, the guest CR3 (vcpu->arch.cr3), which MMU is "
    "current (root_mmu or guest_mmu) and its root.",
    arguments=(VM_ARG, JSON_ARG),
    namespace=NAMESPACE,
)
def _cmd_vcpus(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    s = session_of(kwargs)
    start = len(s.problems())
    vms = s.vms(args.vm)
    rows = [(vm, s.kernel.vcpus(vm)) for vm in vms]

    def human() -> None:
        c = console()
        if not vms:
            c.print("no VMs (vm_list is empty)")
        for vm, vcpus in rows:
            c.print(f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid} ({vm.comm})  {vm.mmu}")
            t = Table(box=None, header_style="bold")
            for col in ("IDX", "ID", "VCPU", "TID", "CPU", "MODE", "MP_STATE", "CR3", "MMU",
                        "ROOT HPA"):
                t.add_column(col)
            for v in vcpus:
                root = "-" if v.root is None else (
                    "INVALID" if v.root.hpa is None else hex(v.root.hpa))
                t.add_row(str(v.vcpu_idx), str(v.vcpu_id), hex(v.addr), str(v.tid or "?"),
                          str(v.cpu), str(v.mode), str(v.mp_state), hexs(v.cr3), v.mmu_name, root)
            c.print(t)

    doc = {"vms": [{"kvm": hx(vm.addr), "pid": vm.pid, "mmu": vm.mmu,
                    "vcpus": [vcpu_json(v) for v in vcpus]} for vm, vcpus in rows]}
    finish(s, args, doc, human, start)
