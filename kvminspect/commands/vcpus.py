"""vcpus: every vCPU of a VM: thread, CPU, state, guest CR3 and current MMU."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program

from kvminspect.commands import kvm_command, per_vm, vm_header
from kvminspect.model import VCpu
from kvminspect.render import Grid, console
from kvminspect.shapes import vcpu_json


def mmu_cell(d: dict[str, Any]) -> str:
    """The MMU column: the current MMU, then the other one with its root hpa when
    that root is in use, flagged nested when either is guest_mmu's."""
    o = d["other_mmu"]
    cell = d["mmu"]
    in_use = o is not None and o["root_hpa"] != "INVALID_PAGE"
    if in_use:
        cell += f" ({o['mmu']} {o['root_hpa']})"
    if d["mmu"] == "guest_mmu" or (in_use and o["mmu"] == "guest_mmu"):
        cell += " nested"
    return cell


def vcpu_table(vcpus: list[VCpu]) -> Grid:
    """One row per vCPU (shapes.vcpu_json's fields)."""
    t = Grid()
    for col in ("IDX", "ID", "VCPU", "TID", "CPU", "MODE", "MP_STATE", "CR3", "MMU",
                "ROOT HPA", "REQUESTS"):
        t.add_column(col)
    for v in vcpus:
        d = vcpu_json(v)
        t.add_row(str(d["vcpu_idx"]), str(d["vcpu_id"]), d["vcpu"], str(d["tid"] or "-"),
                  str(d["cpu"]), str(d["mode"]), str(d["mp_state"]), str(d["cr3"]), mmu_cell(d),
                  d["root_hpa"], ",".join(d["request_names"]) or "-")
    return t


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
           header=lambda vm, vcpus: vm_header(vm) + f"  ({vm.comm})",
           show=lambda vm, vcpus: console().print(vcpu_table(vcpus)))
