"""walk: the path one address takes through a root, level by level."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument, mutually_exclusive_group

from kvminspect.commands import kvm_command, per_vm, session_of
from kvminspect.errors import LookupFailed
from kvminspect.fmt import spte_text
from kvminspect.objects import VM, VCpu
from kvminspect.render import Grid, console, say
from kvminspect.session import Session
from kvminspect.shapes import walk_json
from kvminspect.walk import AddressKind, Verdict, Walk, memslot_why, walk

KINDS = {AddressKind.GVA: "guest virtual address (shadow root)",
         AddressKind.GPA: "guest physical address (TDP/direct root)"}
VERDICTS = {Verdict.MATCH: "", Verdict.MISMATCH: "MISMATCH: ",
            Verdict.NOT_CHECKABLE: "not checkable: "}


def _vcpu(s: Session, vm: VM, n: int) -> VCpu:
    """The vCPU at index *n* of kvm->vcpus (its vcpu_idx)."""
    vcpus = s.kernel.vcpus(vm)
    if not 0 <= n < len(vcpus):
        raise LookupFailed(f"VM {vm.index} has no vCPU {n} (it has {len(vcpus)})")
    return vcpus[n]


def collect(s: Session, vm: VM, addr: int, vcpu: int | None, top: int | None) -> list[Walk]:
    """The walk of *addr* in *vm*: from --root SP, else --vcpu N's (default 0's) root."""
    k = s.kernel
    if top is not None:
        g = s.graph(vm)
        sp = g.sp(top)
        holders = [h.vcpu for h in g.roots.get(top, []) if h.vcpu is not None]
        vcpus = k.vcpus(vm)
        # Holder.vcpu: vcpu_idx, vcpu_id on kernels without it:
        # "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd)
        holder = next((v for v in vcpus
                       if (v.vcpu_idx if v.vcpu_idx >= 0 else v.vcpu_id) in holders), None)
        return [walk(k, vm, addr, sp, f"sp {top:#x}", holder)]
    v = _vcpu(s, vm, vcpu or 0)
    if v.root is None:
        raise LookupFailed(f"vCPU {vcpu or 0}'s MMU could not be read")
    idx = v.vcpu_idx if v.vcpu_idx >= 0 else (vcpu or 0)
    return [walk(k, vm, addr, v.root, f"vcpu{idx}.root", v, direct=v.direct)]


def render(w: Walk) -> None:
    c = console()
    say(f"walk {w.addr:#x}: {KINDS[w.kind]} from {w.root}"
        + ("" if w.root_addr is None else f" (top {w.root_addr:#x}"
           + (", role.invalid: zapped, on its way out)" if w.root_invalid else ")")))
    if w.steps:
        t = Grid()
        # narrow (80 columns): GFN under TABLE, IDX under GFN; FLAGS wraps
        for col in ("LVL", "TABLE", "GFN", "IDX", "SPTE", "FLAGS", "NEXT SP"):
            t.add_column(col, text=col == "FLAGS", under=col in ("GFN", "IDX"))
        for st in w.steps:
            flags = st.bits.flags() if st.bits else ("present" if st.value and st.value & 1
                                                      else "-")
            if st.reserved:
                flags += " RSVD"
            t.add_row(f"L{st.level}", hex(st.table),
                      "" if st.table_gfn is None else hex(st.table_gfn), str(st.index),
                      "unreadable" if st.value is None else spte_text(st.value), flags,
                      "" if st.child is None else hex(st.child))
        c.print(t)
    say(f"  stop: {w.stop.value.replace('_', ' ')}: {w.why}")
    if not w.checked_reserved and w.steps:
        c.print("  reserved bits: not checked (no vCPU holds this root)", markup=False)
    m = w.check
    if m is not None:
        line = "  memslot: " + ("gfn ?" if m.gfn is None else f"gfn {m.gfn:#x}")
        if m.slot is not None:
            line += f" -> slot {m.slot.id} (as {m.slot.as_id})"
        if m.hva is not None:
            line += f" -> hva {m.hva:#x}"
        if m.host_pfn is not None:
            line += f" -> host pfn {m.host_pfn:#x}"
        say(line)
        say(f"  check: {VERDICTS[m.verdict]}{memslot_why(m)}")


@kvm_command(
    argument("addr", metavar="ADDR", type="address",
             help="the address to walk (hex, 0x optional: 200000 is 0x200000): a guest "
             "virtual address through a shadow root, a guest physical address through a "
             "TDP/direct root"),
    mutually_exclusive_group(
        argument("--vcpu", metavar="N", type="count",
                 help="walk from vCPU N's current root (its index, decimal; default 0)"),
        argument("--root", metavar="SP", type="address",
                 help="walk from this shadow page (struct kvm_mmu_page address, hex) as "
                 "the top"),
    ),
)
def _cmd_walk(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """the path an address takes through a root: each level's SPTE, where it stops

    Walks ADDR as KVM's for_each_shadow_entry() does, in each VM --vm names (as other
    commands: the selected VM, else every VM): from the root (vCPU 0's current
    root, or --vcpu N's, or the shadow page --root SP), at each level the SPTE at
    ADDR's index in that shadow page, down to where it stops: a leaf (4 KiB or a large
    page, with ADDR's offset in it), a non-present, MMIO or frozen SPTE, reserved bits
    set, a pointer to no shadow page, or a table that cannot be read. A shadow root
    translates a guest virtual address, a TDP or direct root a guest physical one; a
    PAE root (32-bit guests) starts at pae_root[ADDR bits 31:30]. A leaf's host page
    is then checked against the memslot: its gfn, the memslot's userspace address,
    and the page the VMM process's page tables map there.

    Columns: LVL the table's level; TABLE its struct kvm_mmu_page (or the pae_root);
    GFN the shadow page's gfn; IDX the index in spt[] (bits of ADDR); SPTE its value;
    FLAGS the SPTE decoded by the kernel's own masks (R/W/X, U user, NX, A accessed,
    D dirty, hw host-writable, mw MMU-writable, acc-track with its saved bits, MMIO
    with its generation, FROZEN, RSVD reserved bits set); NEXT SP the shadow page the
    SPTE points to.
    """
    s = session_of(kwargs)
    addr, vcpu, top = args.addr, args.vcpu, args.root  # "address", "count", "address"
    vms = s.vms(args.vm)
    if top is not None:
        vms = [s.find_sp(top, vms)[0]]

    def show(vm: VM, walks: list[Walk]) -> None:
        for w in walks:
            render(w)

    per_vm(kwargs, args, "walk", vms=vms,
           collect=lambda s, vm: collect(s, vm, addr, vcpu, top),
           to_json=lambda vm, walks: {"walks": [walk_json(w) for w in walks]}, show=show)
