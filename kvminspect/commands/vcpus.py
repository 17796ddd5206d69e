"""vcpus: every vCPU of a VM: thread, CPU, state, guest CR3 and current MMU."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program

from kvminspect.commands import kvm_command, per_vm, vm_header
from kvminspect.fmt import hpa_text, hx
from kvminspect.layout import known
from kvminspect.model import VM, VCpu
from kvminspect.render import Grid, console
from kvminspect.results import GUEST_MMU, root_hpa
from kvminspect.shapes import vcpu_json


def mmu_cell(v: VCpu) -> str:
    """The MMU column: the current MMU, then the other one with its root hpa when
    that root is in use (not INVALID_PAGE), flagged nested when either is guest_mmu's."""
    cell = v.mmu_name
    o = v.other_mmu
    hpa = None if o is None else root_hpa(o.root)
    if o is not None and hpa is not None:  # in use (UNREADABLE too: shown as such)
        cell += f" ({o.name} {hpa_text(hpa)})"
    else:
        o = None
    if v.mmu_name == GUEST_MMU or (o is not None and o.name == GUEST_MMU):
        cell += " nested"
    return cell


def vcpu_table(vcpus: list[VCpu]) -> Grid:
    """One row per vCPU (the fields of shapes.vcpu_json)."""
    t = Grid()
    # narrow (80 columns): ID under IDX, CPU under TID, MP_STATE and REQUESTS
    # under MODE, ROOT HPA under MMU; REQUESTS wraps after its commas
    for col in ("IDX", "ID", "VCPU", "TID", "CPU", "MODE", "MP_STATE", "CR3", "MMU",
                "ROOT HPA", "REQUESTS"):
        t.add_column(col, text=col == "MMU", items=col == "REQUESTS",
                     under="MODE" if col == "REQUESTS"
                     else col in ("ID", "CPU", "MP_STATE", "ROOT HPA"))
    for v in vcpus:
        tid = str(v.tid) if v.tid or not known(v.tid) else "-"  # None (no thread yet)
        t.add_row(str(v.vcpu_idx), str(v.vcpu_id), hx(v.addr), tid, str(v.cpu), str(v.mode),
                  str(v.mp_state), hx(v.cr3), mmu_cell(v), hpa_text(root_hpa(v.root)),
                  ",".join(v.request_names) or "-")
    return t


def owner_text(vm: VM) -> str:
    """The VM's owner task as the header names it: its comm, "owner unreadable"
    (a dump that lacks its task), or "no owner task" (it exited)."""
    if isinstance(vm.comm, str):
        return vm.comm
    return "owner unreadable" if vm.comm is not None else "no owner task"


@kvm_command()
def _cmd_vcpus(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """list vCPUs (struct kvm_vcpu) with thread, state, CR3 and MMU

    One row per online vCPU: id and index, its thread, the CPU it last ran on,
    vcpu->mode and mp_state, the guest CR3 (vcpu->arch.cr3), which MMU is current
    (root_mmu or guest_mmu) and its root.

    Columns: IDX vcpu->vcpu_idx (the index in kvm->vcpu_array); ID vcpu->vcpu_id (the
    APIC ID userspace gave); VCPU the struct kvm_vcpu address; TID the vCPU thread;
    CPU vcpu->cpu, the host CPU it last ran on; MODE vcpu->mode (OUTSIDE_GUEST_MODE,
    IN_GUEST_MODE, ...); MP_STATE vcpu->arch.mp_state (RUNNABLE, HALTED, ...); CR3
    the guest's CR3; MMU which MMU is current (root_mmu, or guest_mmu: the shadow
    NPT/EPT MMU of a nested guest), then in parentheses the other MMU and its root
    hpa when it holds one, flagged nested; ROOT HPA that MMU's root (host physical
    address of the top page table, or INVALID_PAGE); REQUESTS the pending
    vcpu->requests bits (KVM_REQ_* without the prefix; the names come from a table
    per kernel release, as the macros are not in the debug info; 'bit N' where
    none fits).
    """
    per_vm(kwargs, args, "vcpus",
           collect=lambda s, vm: s.kernel.vcpus(vm),
           to_json=lambda vm, vcpus: {"vcpus": [vcpu_json(v) for v in vcpus]},
           header=lambda vm, vcpus: vm_header(vm) + f"  ({owner_text(vm)})",
           show=lambda vm, vcpus: console().print(vcpu_table(vcpus)))
