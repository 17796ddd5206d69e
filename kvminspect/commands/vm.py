"""vm: select a VM for the following commands and show its details."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.accounting import TdpPages
from kvminspect.commands import NO_VMS, finish, kvm_command, session_of
from kvminspect.commands.vms import tdp_text, vm_tdp_pages
from kvminspect.errors import UsageError
from kvminspect.fmt import hx
from kvminspect.layout import known
from kvminspect.model import VM
from kvminspect.read_vmstate import VmState
from kvminspect.render import Grid, console, plural
from kvminspect.session import Session
from kvminspect.shapes import vm_json


def shown(s: Session, shown_vm: str | None) -> list[VM]:
    """The VMs 'vm' shows (after any selection): --vm ID's (shown, not
    selected), else the selected one, else none in a REPL (where selection
    is the point), every VM in one shot."""
    if shown_vm is not None:
        return [s.kernel.vm_by_id(shown_vm)]
    if s.selected is not None:
        return [s.selected]
    return [] if s.interactive else s.kernel.vms()


def state_lines(st: VmState) -> list[str]:
    """The MMU notifier, NX huge page and mmu_page_hash lines of 'vm'."""
    inv, nx, h = st.invalidation, st.nx, st.hash
    p = inv.prefix or "mmu_invalidate"
    count = "mmu_notifier_count" if inv.prefix == "mmu_notifier" else f"{p}_in_progress"
    # the range counts hvas to 6.7 and gfns from 6.8 (read_vmstate.RangeUnit)
    rng = ("" if not known(inv.range_start)
           else f", range {inv.unit.value} {hx(inv.range_start)}-{hx(inv.range_end)}")
    param = str(nx.param)  # UNKNOWN without the symbol
    if isinstance(nx.param, int):
        param = {1: "on", 0: "off", -1: "auto (undecided)"}.get(nx.param, param)
    by = "".join(f", {k} {n}" for k, n in nx.by_mmu.items())
    out = [f"  MMU notifier: {p}_seq {inv.seq}, {count} {inv.in_progress}{rng}",
           f"  NX huge pages: nx_huge_pages {param}, possible_nx_huge_pages {nx.possible}{by}"]
    if h is None:
        out.append("  mmu_page_hash: not allocated")
    else:
        hist = ", ".join(f"{n} of length {k}" for k, n in h.histogram.items())
        out.append(f"  mmu_page_hash: {plural(h.pages, 'page', 'pages')} in {h.used} of "
                   f"{h.buckets} buckets, longest chain {h.longest}"
                   + (f" (buckets: {hist})" if hist else ""))
    return out


def show_vm(vm: VM, st: VmState | None = None, tdp: TdpPages | None = None) -> None:
    """One VM's struct kvm: owner, vCPUs, MMU page counts (*tdp*: its TDP MMU's),
    invalidation, NX huge page and hash state, and memslots."""
    c = console()
    c.print(f"VM {vm.index}: kvm {hx(vm.addr)}  pid {vm.pid} ({vm.comm or '?'}, "
            f"state {vm.task_state or '?'})  vCPUs {vm.online_vcpus}/{vm.created_vcpus}",
            markup=False)
    c.print(f"  MMU {vm.mmu}: {vm.n_used_mmu_pages} of {vm.n_max_mmu_pages} shadow pages used "
            f"(requested {vm.n_requested_mmu_pages})"
            + ("" if tdp is None else f", TDP MMU pages {tdp_text(tdp)}")
            + f", mmu_valid_gen {vm.mmu_valid_gen}, "
            f"indirect_shadow_pages {vm.indirect_shadow_pages}", markup=False)
    for line in state_lines(st) if st is not None else ():
        c.print(line, markup=False)
    t = Grid(title="memslots")
    for col in ("AS", "ID", "BASE GFN", "NPAGES", "USERSPACE ADDR", "FLAGS"):
        t.add_column(col)
    for m in vm.memslots:
        t.add_row(str(m.as_id), str(m.id), hx(m.base_gfn), str(m.npages),
                  hx(m.userspace_addr), hx(m.flags))
    c.print(t)


@kvm_command(
    argument("id", nargs="?", metavar="ID",
             help="VM index, pid:PID, struct kvm address, name (kvm-PID, QEMU's -name), "
                  "or 'all'"),
)
def _cmd_vm(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """select a VM (index, pid:PID, struct kvm address or name) and show it

    'vm ID' selects a VM: in a REPL, later commands work on it only (the prompt shows
    it); 'vm all' clears the selection. 'vm' alone shows the selected VM; with none
    selected, a REPL says so, and a one-shot 'kvminspect ... vm' shows every VM.
    'vm --vm ID' shows that VM without selecting it.

    Columns of memslots: AS the address space (1: SMM); ID the slot id; BASE GFN its
    first guest frame; NPAGES its size in 4 KiB pages; USERSPACE ADDR where the VMM
    mapped it; FLAGS its KVM_MEM_* flags (1: LOG_DIRTY_PAGES, 2: READONLY).

    Also shown: the MMU notifier's invalidation sequence, count in progress and range
    (kvm->mmu_invalidate_*, mmu_notifier_* before 6.0: a fault that overlaps an
    invalidation retries; the range is host virtual addresses, "hva", to 6.7 and guest
    frame numbers, "gfn", from 6.8), kvm.ko's nx_huge_pages and the pages on
    kvm->arch.possible_nx_huge_pages, and the chain lengths of kvm->arch.mmu_page_hash.
    """
    s = session_of(kwargs)
    if args.id is not None and args.vm is not None:
        raise UsageError("vm takes ID or --vm ID, not both")
    if args.id == "all":
        s.selected = None
    elif args.id is not None:
        s.select(args.id)
    vms = shown(s, args.vm)

    def human() -> None:
        if not vms:
            n = len(s.kernel.vms())
            console().print(NO_VMS if not n else
                            f"no VM selected ({plural(n, 'VM', 'VMs')}; commands work on "
                            f"{'it' if n == 1 else 'all of them'}; 'vm ID' selects one)",
                            markup=False)
        for vm in vms:
            show_vm(vm, states[vm.addr], tdps[vm.addr])

    states = {vm.addr: s.kernel.vm_state(vm) for vm in vms}
    tdps = {vm.addr: vm_tdp_pages(s.kernel, vm) for vm in vms}
    finish(s, args, "vm", {"vms": [vm_json(vm, tdps[vm.addr], states[vm.addr]) for vm in vms]},
           human, vms)
