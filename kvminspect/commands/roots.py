"""roots: per vCPU, the MMU root and prev_roots[] (the CR3 -> root cache)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from drgn import Program
from drgn.commands import drgn_argument

from kvminspect.commands import kvm_command, per_vm, session_of, sp_flags, vm_header
from kvminspect.drgn_code import print_code, roots_code
from kvminspect.graph import VMGraph
from kvminspect.layout import INVALID_PAGE
from kvminspect.model import VM, VCpu
from kvminspect.render import Grid, console, hx
from kvminspect.session import Session
from kvminspect.shapes import root_json, vcpu_ref


def page_cells(d: dict[str, Any] | None, shared: Counter) -> tuple[str, str, str]:
    """(sp, gfn/level, flags) of a root's shadow page (shapes.sp_json) for the table."""
    if d is None:
        return ("-", "-", "")
    shared_by = [f"shared x{shared[d['sp']]}"] if shared[d["sp"]] > 1 else []
    return (d["sp"], f"{d['gfn']}/L{d['level']}", " ".join(shared_by + sp_flags(d)))


def is_empty(d: dict[str, Any]) -> bool:
    """An unused prev_roots[] slot (KVM_MMU_ROOT_INFO_INVALID): pgd and hpa both
    INVALID_PAGE (shapes.root_json)."""
    return d["state"] == "invalid_page" and d["pgd"] == hx(INVALID_PAGE)


def root_rows(d: dict[str, Any], shared: Counter) -> list[tuple[str, ...]]:
    """A root (shapes.root_json) as table rows: the root, then its pae_root[i] pages."""
    if is_empty(d):
        rows = [("-", "-", "-", "-", "empty")]
    elif d["state"] in ("page", "invalid_page", "unreadable"):
        rows = [(d["pgd"], d["hpa"], *page_cells(d["page"], shared))]
    else:  # a special root (pae_root, ...) or a dummy root: no struct kvm_mmu_page
        rows = [(d["pgd"], d["hpa"], d["state"], "-", d["state"])]
    rows += [(f"pae_root[{e['index']}]", "", *page_cells(e["page"], shared))
             for e in d["pae_roots"]]
    return rows


def vcpu_roots_json(v: VCpu, g: VMGraph) -> dict[str, Any]:
    """One vCPU's roots: mmu->root and prev_roots[], then those of its other MMU
    (guest_mmu, or root_mmu while the vCPU runs a nested guest)."""
    o = v.other_mmu
    return {**vcpu_ref(v), "cr3": hx(v.cr3), "mmu": v.mmu_name,
            "root": root_json(v.root, g), "prev_roots": [root_json(r, g) for r in v.prev_roots],
            "other_mmu": None if o is None else {
                "mmu": o.name, "root": root_json(o.root, g),
                "prev_roots": [root_json(r, g) for r in o.prev_roots]}}


def _nested(rows: list[tuple[str, ...]], mmu: str) -> list[tuple[str, ...]]:
    """Rows of guest_mmu (the shadow NPT/EPT MMU of a nested guest) flagged nested."""
    if mmu != "guest_mmu":
        return rows
    return [(*r[:-1], r[-1] if "nested" in r[-1].split() else (r[-1] + " nested").strip())
            for r in rows]


def other_rows(o: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """The other MMU's roots that are in use (not INVALID_PAGE) as (ROOT, ...) rows:
    "guest_mmu.root", "guest_mmu.prev[i]" (or root_mmu's while in L2)."""
    if o is None:
        return []
    named = [("root", o["root"])] + [(f"prev[{i}]", r) for i, r in enumerate(o["prev_roots"])]
    out = []
    for label, r in named:
        if r["state"] == "invalid_page":
            continue
        for j, row in enumerate(_nested(root_rows(r, Counter()), o["mmu"])):
            out.append((f"{o['mmu']}.{label}", *row) if j == 0 else (row[0], "", "", *row[2:]))
    return out


def roots_table(vcpus: list[dict[str, Any]]) -> Grid:
    """One block of rows per vCPU: root (with pae_root[i]), then prev_roots[i]."""
    current = Counter(p["sp"] for v in vcpus for p in
                      [v["root"]["page"], *(e["page"] for e in v["root"]["pae_roots"])] if p)
    t = Grid()
    for col in ("VCPU", "CR3", "ROOT", "PGD", "HPA", "SP", "GFN/LVL", "FLAGS"):
        t.add_column(col, text=col == "FLAGS", carry=col in ("VCPU", "CR3"))
    for v in vcpus:
        for j, row in enumerate(_nested(root_rows(v["root"], current), v["mmu"])):
            if j == 0:
                t.add_row(f"vcpu[{v['vcpu_idx']}]", str(v["cr3"]), "root", *row)
            else:
                t.add_row("", "", row[0], "", "", *row[2:])
        for i, r in enumerate(v["prev_roots"]):
            for row in _nested(root_rows(r, Counter()), v["mmu"]):
                t.add_row("", "", f"prev[{i}]", *row)
        for row in other_rows(v.get("other_mmu")):
            t.add_row("", "", *row)
    return t


@kvm_command(drgn_argument)
def _cmd_roots(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """per vCPU: mmu->root and prev_roots[], shared roots marked

    The 'vcpu[i] root_hpa' dump: for each vCPU its guest CR3, the current root (hpa,
    pgd, its struct kvm_mmu_page: gfn, level, root_count, unsync_children) and the
    prev_roots[] cache. A root held by several vCPUs (or cached by them) is marked
    shared; INVALID_PAGE roots show as such. A PAE guest's root is mmu->pae_root: its
    present pae_root[i] entries follow, each with its level-2 shadow page. --drgn prints
    the drgn code that reads the same roots.

    Columns: VCPU the vCPU (vcpu[vcpu_idx]); CR3 its guest CR3; ROOT root (mmu->root),
    prev[i] (mmu->prev_roots[i]) or pae_root[i]; PGD the guest page table the root
    shadows (the CR3 it was built for); HPA the root's host physical address; SP its
    struct kvm_mmu_page; GFN/LVL that page's gfn and level (L4: a 4-level table);
    FLAGS shared xN (N vCPUs have it as their current root), direct, tdp, UNSYNC,
    unsync_children=N, invalid, obsolete, root_count=N, ORPHAN, SMM (role.smm: a page
    of System Management Mode, address space 1), nested (role.guest_mode, or a root of
    guest_mmu); empty: an unused prev_roots slot.

    Nested guests: root and prev[i] are those of vcpu->arch.mmu (guest_mmu while the
    vCPU runs L2); the roots of its other MMU (guest_mmu, the shadow NPT/EPT MMU of
    L2, or root_mmu while in L2) follow as guest_mmu.root, guest_mmu.prev[i] (or
    root_mmu.*), when they are not INVALID_PAGE. --drgn reads vcpu->arch.mmu only.
    """
    if args.drgn:
        s = session_of(kwargs)
        vms = s.vms(args.vm)
        print_code(args, lambda: roots_code(prog, s.kernel.layout, vms,
                                                 every=args.vm is None and s.selected is None))
        return
    def collect(s: Session, vm: VM) -> list[dict[str, Any]]:
        g = s.graph(vm)
        return [vcpu_roots_json(v, g) for v in g.vcpus]

    per_vm(kwargs, args, "roots", collect=collect,
           to_json=lambda vm, vcpus: {"vcpus": vcpus},
           header=lambda vm, vcpus: vm_header(vm) + f"  mmu_valid_gen {vm.mmu_valid_gen}",
           show=lambda vm, vcpus: console().print(roots_table(vcpus)))
