"""stats: the MMU counters of kvm->stat and of each vcpu->stat."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program

from kvminspect.commands import kvm_command, per_vm, vm_header
from kvminspect.model import VM
from kvminspect.render import Grid, console
from kvminspect.results import VcpuStat, VmStats, vcpu_mmu_stat, vm_mmu_stat
from kvminspect.session import Session
from kvminspect.shapes import stats_json


def vm_table(stat: dict[str, int]) -> Grid:
    """kvm->stat: one counter per row."""
    t = Grid()
    t.add_column("COUNTER")
    t.add_column("VALUE", justify="right")
    for k, v in stat.items():
        t.add_row(k, str(v))
    return t


def vcpu_table(rows: list[VcpuStat]) -> Grid:
    """vcpu->stat: one vCPU per row, one counter per column."""
    t = Grid()
    t.add_column("VCPU")
    names: list[str] = []
    for _, st in rows:
        names.extend(k for k in st if k not in names)
    for n in names:
        t.add_column(n, justify="right")
    for v, st in rows:
        t.add_row(f"vcpu[{v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id}]",
                  *(str(st.get(n, "-")) for n in names))
    return t


def vcpu_tables(rows: list[VcpuStat], width: int) -> list[Grid]:
    """vcpu_table(), or where it does not fit *width* (80 columns) the same
    counters turned: one counter per row, one column per vCPU, as many vCPUs
    to a table as fit."""
    wide = vcpu_table(rows)
    if wide.needed_width() <= width:
        return [wide]
    names: list[str] = []
    for _, st in rows:
        names.extend(k for k in st if k not in names)
    label = max([len("COUNTER"), *(len(n) for n in names)]) + Grid.PAD
    per = max(1, (width - label) // (len("vcpu[999]") + Grid.PAD))
    out = []
    for k in range(0, len(rows), per):
        part = rows[k:k + per]
        t = Grid()
        t.add_column("COUNTER")
        for v, _ in part:
            t.add_column(f"vcpu[{v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id}]",
                         justify="right")
        for n in names:
            t.add_row(n, *(str(st.get(n, "-")) for _, st in part))
        out.append(t)
    return out


@kvm_command()
def _cmd_stats(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """MMU counters: kvm->stat and per vCPU vcpu->stat

    The MMU counters of each VM's kvm->stat (mmu_*, nx_*, pages_*/lpages, max_mmu_*,
    remote_tlb_flush*) and of each vCPU's vcpu->stat (pf_* page faults, tlb_flush,
    invlpg), as the kernel holds them: cumulative since the VM or vCPU was created.
    """
    def collect(s: Session, vm: VM) -> VmStats:
        return VmStats(vm_mmu_stat(vm.stat),
                       [VcpuStat(v, vcpu_mmu_stat(v.stat)) for v in s.kernel.vcpus(vm)])

    def show(vm: VM, data: VmStats) -> None:
        c = console()
        c.print(vm_table(data.stat) if data.stat else "  kvm->stat: no MMU counters",
                markup=False)
        if data.vcpus:
            for t in vcpu_tables(data.vcpus, c.width):
                c.print(t, markup=False)

    per_vm(kwargs, args, "stats", collect=collect, show=show,
           header=lambda vm, data: vm_header(vm) + f"  mmu pages {vm.n_used_mmu_pages}/"
           f"{vm.n_max_mmu_pages}",
           to_json=lambda vm, data: stats_json(data))
