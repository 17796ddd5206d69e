"""roots: per vCPU, the MMU root and prev_roots[] (the CR3 -> root cache)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from drgn import Program
from drgn.commands import command
from rich.table import Table

from kvminspect.commands import JSON_ARG, NAMESPACE, VM_ARG, finish, session_of
from kvminspect.graph import VMGraph
from kvminspect.model import RootRef, ShadowPage
from kvminspect.render import console, hexs, hx


def sp_brief(sp: ShadowPage | None) -> dict[str, Any]:
    """The fields of a root's shadow page that roots and tree print."""
    if sp is None:
        return {"sp": None, "gfn": None, "level": None}
    return {"sp": hx(sp.addr), "gfn": hx(sp.gfn), "level": sp.level, "direct": sp.role.direct,
            "invalid": sp.role.invalid, "obsolete": sp.obsolete, "root_count": sp.root_count,
            "unsync": sp.unsync, "unsync_children": sp.unsync_children}


def root_json(r: RootRef | None, g: VMGraph) -> dict[str, Any] | None:
    """A root as JSON: hpa/sp null for INVALID_PAGE; a PAE root with its pae_root[] pages."""
    if r is None:
        return None
    d = {"pgd": hx(r.pgd), "hpa": hx(r.hpa), **sp_brief(r.sp)}
    if r.special:
        d["special"] = r.special
        d["pae_roots"] = [{"index": i, **sp_brief(g.sp(a) if a in g.graph else None)}
                          for i, a in r.pae_roots]
    return d


def root_cells(r: RootRef | None, shared: Counter) -> tuple[str, str, str, str, str]:
    """(pgd, hpa, sp, gfn/level, flags) of a root for the table."""
    if r is None:
        return ("-", "-", "-", "-", "unreadable")
    if r.hpa is None:
        return (hex(r.pgd), "INVALID_PAGE", "-", "-", "")
    if r.sp is None:
        return (hex(r.pgd), hex(r.hpa), r.special or "-", "-", r.special or "")
    return (hex(r.pgd), hex(r.hpa), *sp_cells(r.sp, shared))


def sp_cells(sp: ShadowPage, shared: Counter) -> tuple[str, str, str]:
    """(sp, gfn/level, flags) of a root's shadow page for the table."""
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
    return (hex(sp.addr), f"{sp.gfn:#x}/L{sp.level}", " ".join(flags))


@command(
    description="per vCPU: mmu->root and prev_roots[], shared roots marked",
    long_description="The 'vcpu[i] root_hpa' dump: for each vCPU its guest CR3, the current "
    "root (hpa, pgd, its struct kvm_mmu_page: gfn, level, root_count, unsync_children) and "
    "the prev_roots[] cache. A root held by several vCPUs (or cached by them) is marked "
    "shared; INVALID_PAGE roots show as such. A PAE guest's root is mmu->pae_root: its "
    "present pae_root[i] entries follow, each with its level-2 shadow page.",
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
        data.append((vm, g))

    def human() -> None:
        c = console()
        if not vms:
            c.print("no VMs (vm_list is empty)")
        for vm, g in data:
            vcpus = g.vcpus
            current = Counter(v.root.sp.addr for v in vcpus if v.root and v.root.sp)
            current.update(a for v in vcpus if v.root for _, a in v.root.pae_roots)
            c.print(f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid}  {vm.mmu}  "
                    f"mmu_valid_gen {vm.mmu_valid_gen}")
            t = Table(box=None, header_style="bold")
            for col in ("VCPU", "CR3", "ROOT", "PGD", "HPA", "SP", "GFN/LVL", ""):
                t.add_column(col)
            for v in vcpus:
                t.add_row(f"vcpu[{v.vcpu_idx}]", hexs(v.cr3), "root",
                          *root_cells(v.root, current))
                for i, a in v.root.pae_roots if v.root else ():
                    if a in g.graph:
                        t.add_row("", "", f"pae_root[{i}]", "", "", *sp_cells(g.sp(a), current))
                for i, r in enumerate(v.prev_roots):
                    t.add_row("", "", f"prev[{i}]", *root_cells(r, Counter()))
            c.print(t)

    doc = {"vms": [{"kvm": hx(vm.addr), "pid": vm.pid, "mmu": vm.mmu,
                    "mmu_valid_gen": vm.mmu_valid_gen,
                    "vcpus": [{"vcpu_id": v.vcpu_id, "vcpu_idx": v.vcpu_idx,
                               "cr3": hx(v.cr3), "mmu": v.mmu_name,
                               "root": root_json(v.root, g),
                               "prev_roots": [root_json(r, g) for r in v.prev_roots]}
                              for v in g.vcpus]} for vm, g in data]}
    finish(s, args, doc, human, start)
