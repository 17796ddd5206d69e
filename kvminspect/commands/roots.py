"""roots: per vCPU, the MMU root and prev_roots[] (the CR3 -> root cache)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from drgn import Program
from drgn.commands import command
from rich.table import Table

from kvminspect.commands import JSON_ARG, NAMESPACE, VM_ARG, finish, session_of
from kvminspect.model import RootRef, ShadowPage
from kvminspect.render import console, hexs, hx


def sp_brief(sp: ShadowPage | None) -> dict[str, Any]:
    """The fields of a root's shadow page that roots and tree print."""
    if sp is None:
        return {"sp": None, "gfn": None, "level": None}
    return {"sp": hx(sp.addr), "gfn": hx(sp.gfn), "level": sp.level, "direct": sp.role.direct,
            "invalid": sp.role.invalid, "obsolete": sp.obsolete, "root_count": sp.root_count,
            "unsync": sp.unsync, "unsync_children": sp.unsync_children}


def root_json(r: RootRef | None, prev: bool = False) -> dict[str, Any] | None:
    """A root as JSON: hpa/sp null for INVALID_PAGE."""
    if r is None:
        return None
    d = {"pgd": hx(r.pgd), "hpa": hx(r.hpa), **sp_brief(r.sp)}
    if r.special:
        d["special"] = r.special
        d["pae_roots"] = [hx(a) for a in r.pae_roots]
    return d


def root_cells(r: RootRef | None, shared: Counter) -> tuple[str, str, str, str, str]:
    """(pgd, hpa, sp, gfn/level, flags) of a root for the table."""
    if r is None:
        return ("-", "-", "-", "-", "unreadable")
    if r.hpa is None:
        return (hex(r.pgd), "INVALID_PAGE", "-", "-", "")
    if r.sp is None:
        return (hex(r.pgd), hex(r.hpa), r.special or "-", "-", r.special or "")
    sp = r.sp
    flags = []
    if shared[sp.addr] > 1:
        flags.append(f"shared x{shared[sp.addr]}")
    if sp.role.invalid:
        flags.append("invalid")
    elif sp.obsolete:
        flags.append("obsolete")
    if sp.unsync_children:
        flags.append(f"unsync_children={sp.unsync_children}")
    flags.append(f"root_count={sp.root_count}")
    return (hex(r.pgd), hex(r.hpa), hex(sp.addr), f"{sp.gfn:#x}/L{sp.level}", " ".join(flags))


@command(
    description="per vCPU: mmu->root and prev_roots[], shared roots marked",
    long_description="The 'vcpu[i] root_hpa' dump: for each vCPU its guest CR3, the current "
    "root (hpa, pgd, its struct kvm_mmu_page: gfn, level, root_count, unsync_children) and "
    "the prev_roots[] cache. A root held by several vCPUs (or cached by them) is marked "
    "shared; INVALID_PAGE roots show as such.",
    arguments=(VM_ARG, JSON_ARG),
    namespace=NAMESPACE,
)
def _cmd_roots(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    s = session_of(kwargs)
    start = len(s.problems())
    vms = s.vms(args.vm)
    data = []
    for vm in vms:
        g = s.graph(vm)  # marks obsolete pages against kvm->arch.mmu_valid_gen
        data.append((vm, g.vcpus))

    def human() -> None:
        c = console()
        if not vms:
            c.print("no VMs (vm_list is empty)")
        for vm, vcpus in data:
            current = Counter(v.root.sp.addr for v in vcpus if v.root and v.root.sp)
            c.print(f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid}  {vm.mmu}  "
                    f"mmu_valid_gen {vm.mmu_valid_gen}")
            t = Table(box=None, header_style="bold")
            for col in ("VCPU", "CR3", "ROOT", "PGD", "HPA", "SP", "GFN/LVL", ""):
                t.add_column(col)
            for v in vcpus:
                t.add_row(f"vcpu[{v.vcpu_idx}]", hexs(v.cr3), "root",
                          *root_cells(v.root, current))
                for i, r in enumerate(v.prev_roots):
                    t.add_row("", "", f"prev[{i}]", *root_cells(r, Counter()))
            c.print(t)

    doc = {"vms": [{"kvm": hx(vm.addr), "pid": vm.pid, "mmu": vm.mmu,
                    "mmu_valid_gen": vm.mmu_valid_gen,
                    "vcpus": [{"vcpu_id": v.vcpu_id, "vcpu_idx": v.vcpu_idx,
                               "cr3": hx(v.cr3), "mmu": v.mmu_name,
                               "root": root_json(v.root),
                               "prev_roots": [root_json(r, True) for r in v.prev_roots]}
                              for v in vcpus]} for vm, vcpus in data]}
    finish(s, args, doc, human, start)
