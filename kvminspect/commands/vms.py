"""vms: every VM on vm_list with its owner and MMU-wide state."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program

from kvminspect.accounting import TdpPages, tdp_mmu_pages
from kvminspect.commands import NO_VMS, finish, kvm_command, session_of
from kvminspect.fmt import hx
from kvminspect.layout import NoValue
from kvminspect.model import VM, Kernel
from kvminspect.render import Grid, console, plural
from kvminspect.shapes import vm_json

# when the table does not fit (80 columns): these go under the column before them
# (COMM, NAME and ST under PID),
# then ST and VENDOR are left out
NARROW_UNDER = ("COMM", "NAME", "ST", "VENDOR", "TDP PAGES", "MEMSLOTS")
NARROW_DROP = {"ST": 1, "VENDOR": 2}


def vm_tdp_pages(k: Kernel, vm: VM) -> TdpPages | None:
    """*vm*'s TDP MMU pages (accounting.tdp_mmu_pages), read as the VM's: what cannot
    be read is named against it."""
    with k.reading(vm):
        return tdp_mmu_pages(k, vm)


def tdp_text(t: TdpPages | None) -> str:
    """TDP PAGES: the kernel's non-root TDP MMU pages + the roots ("4 + 1 root", "?" where
    the kernel keeps no count), "-" for a VM without the TDP MMU."""
    if t is None:
        return "-"
    return f"{'?' if t.pages is None else t.pages} + {plural(t.roots, 'root', 'roots')}"


def vm_name(vm: VM) -> str:
    """NAME: the guest name and kvm->stats_id, "guest (kvm-PID)", or "-" for neither."""
    if vm.guest_name and vm.stats_id:
        return f"{vm.guest_name} ({vm.stats_id})"
    return vm.guest_name or vm.stats_id or "-"


def shown(v: str | NoValue | None) -> str:
    """An owner field: its value, "unreadable" (the dump lacks the task), or "?" (none)."""
    return v if isinstance(v, str) else "unreadable" if v is not None else "?"


@kvm_command(vm=False)
def _cmd_vms(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """list VMs (struct kvm on vm_list)

    One row per VM: its struct kvm, owner process, its name (QEMU's -name guest=, then
    kvm->stats_id "kvm-PID"; --vm takes either), vCPUs, MMU kind (shadow, tdp_mmu,
    tdp_legacy), the vendor module (kvm_amd, kvm_intel), shadow pages in use, the TDP
    MMU's pages and the MMU generation. A TDX VM is listed, but its MMU is not read.

    Columns: VM the VM's index (* marks the selected VM); KVM the struct kvm address;
    PID and COMM the owner process (kvm->userspace_pid); NAME the guest name and
    kvm->stats_id; ST its task state, as ps
    shows it (R running, S sleeping, D uninterruptible, T stopped, Z zombie, I idle);
    VCPUS online/created vCPUs; MMU the MMU kind (a non-default VM type in
    parentheses); VENDOR the vendor module; SHADOW PAGES the shadow MMU's pages in use
    / the maximum (kvm->arch.n_used_mmu_pages / n_max_mmu_pages; kvm->stat.mmu_shadow_pages
    in 7.3): every page of a shadow or tdp_legacy VM, only the nested guests' of a
    tdp_mmu VM; TDP PAGES (shown when a VM has the TDP MMU) its pages, which the
    shadow count leaves out: kvm->arch.tdp_mmu_pages, the non-root pages (a list to 6.1,
    a count 6.2-7.2; ? in 7.3, which keeps none), + the roots on kvm->arch.tdp_mmu_roots
    (tree counts both); GEN kvm->arch.mmu_valid_gen, the MMU generation a fast zap
    bumps; MEMSLOTS memslots in use.
    """
    s = session_of(kwargs)
    vms = s.kernel.vms()

    def human() -> None:
        if not vms:
            console().print(NO_VMS)
            return
        t = Grid()
        tdp_col = any(tdp is not None for tdp in tdps)
        for col in ("VM", "KVM", "PID", "COMM", "NAME", "ST", "VCPUS", "MMU", "VENDOR",
                    "SHADOW PAGES", *(("TDP PAGES",) if tdp_col else ()), "GEN", "MEMSLOTS"):
            t.add_column(col, justify="right" if col in ("VM", "PID", "GEN") else "left",
                         under=col in NARROW_UNDER, drop=NARROW_DROP.get(col, 0))
        for vm, tdp in zip(vms, tdps, strict=True):
            mark = "*" if s.selected and s.selected.addr == vm.addr else ""
            t.add_row(f"{mark}{vm.index}", hx(vm.addr), str(vm.pid), shown(vm.comm),
                      vm_name(vm), shown(vm.task_state), f"{vm.online_vcpus}/{vm.created_vcpus}",
                      vm.mmu + (f" ({vm.vm_type})" if vm.vm_type not in (None, "default")
                                else ""), vm.vendor or "?",
                      f"{vm.n_used_mmu_pages}/{vm.n_max_mmu_pages}",
                      *((tdp_text(tdp),) if tdp_col else ()), str(vm.mmu_valid_gen),
                      str(len(vm.memslots)))
        console().print(t)

    states = [s.kernel.vm_state(vm, hash_chains=False) for vm in vms]  # no chain walks
    tdps = [vm_tdp_pages(s.kernel, vm) for vm in vms]
    finish(s, args, "vms", {"vms": [vm_json(vm, tdp, st) for vm, tdp, st
                                    in zip(vms, tdps, states, strict=True)]},
           human, vms)
