"""guest-core: write a guest's physical memory and vCPU registers as an ELF core.

The model's part is kvminspect.guestcore (which frames are where, the
VMCOREINFO note, the writer); this module picks the VM, shows the progress
and says what was written and what to run next.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import finish, kvm_command, session_of, vm_header
from kvminspect.errors import LookupFailed, UsageError
from kvminspect.fmt import hx
from kvminspect.guestcore import (
    SMM_AS,
    GuestCore,
    GuestFrames,
    Hole,
    VcpuRegs,
    VmcoreInfoScan,
    Why,
    gfn_ranges,
    write_guest_core,
)
from kvminspect.model import VM
from kvminspect.read_regs import GPRS, SavedRegs
from kvminspect.render import console, plural
from kvminspect.session import Session
from kvminspect.shapes import vm_ref

SHOWN_RANGES = 8  # hole ranges listed per reason in the text (JSON lists them all)
PROGRESS_AFTER = 1.0  # seconds before the progress bar shows


def one_vm(s: Session, ident: str | None, what: str) -> VM:
    """The VM a guest command works on: --vm, the selected VM, or the only one."""
    vms = s.vms(ident)
    if not vms:
        raise LookupFailed(f"no VMs (vm_list is empty): {what}")
    if len(vms) > 1:
        raise UsageError(f"{len(vms)} VMs: choose one with --vm ID (or select it with 'vm ID')")
    return vms[0]


def gfn_text(start: int, end: int) -> str:
    """Guest frames [start, end): "0x10e-0x10f", or "0x0" for one."""
    return hx(start) if end - start == 1 else f"{start:#x}-{end - 1:#x}"


def holes_text(holes: tuple[Hole, ...]) -> list[str]:
    """One line per reason: its ranges (the first SHOWN_RANGES) and the reason."""
    lines = []
    for why in Why:
        mine = [h for h in holes if h.why is why]
        if not mine:
            continue
        shown = ", ".join(gfn_text(h.start, h.end) for h in mine[:SHOWN_RANGES])
        more = f", and {len(mine) - SHOWN_RANGES} more ranges" if len(mine) > SHOWN_RANGES else ""
        lines.append(f"{shown}{more}: {why.value}")
    return lines


def sources_text(regs: SavedRegs) -> list[str]:
    """Where the registers came from, one line per place: "vcpu->arch.regs[]: rax..r15 rip"."""
    by: dict[str, list[str]] = {}
    for name, where in regs.sources.items():
        by.setdefault(where, []).append(name)
    lines = []
    for where, names in by.items():
        if all(g in names for g in GPRS):
            names = ["rax..r15"] + [n for n in names if n not in GPRS]
        lines.append(f"{where}: {' '.join(names)}")
    return lines


def vcpu_line(v: VcpuRegs) -> str:
    """One vCPU's registers in the summary."""
    head = f"vcpu{v.vcpu.vcpu_idx}"
    r = v.regs
    if r is None:
        return f"{head}  registers unreadable (its NT_PRSTATUS holds zeros)"
    vals = "  ".join(f"{n} {r.values[n]:#x}" if n in r.values else f"{n} ?"
                     for n in ("rip", "rsp", "rflags", "cr3"))
    extra = []
    if r.stale:
        extra.append("in guest mode at the dump: stale")
    if r.unknown:
        extra.append("not in the dump (0 in the note): " + " ".join(r.unknown))
    extra.extend(r.notes)
    return f"{head}  {vals}" + "".join(f"\n      {e}" for e in extra)


def next_line(path: str, scan: VmcoreInfoScan, host_build_id: str | None = None) -> str:
    """The drgn command line to run next (*host_build_id*: the host kernel's, to say
    when the guest runs the same build)."""
    info = scan.found
    if info is None:
        return (f"next: drgn -c {path}   (no VMCOREINFO: drgn reads the guest's physical "
                "memory, prog.read(ADDR, SIZE, True))")
    what = [f"guest kernel {info.release}"] + ([f"build id {info.build_id}"]
                                               if info.build_id else [])
    same = ": the host's own build, its vmlinux serves" if (
        info.build_id and info.build_id == host_build_id) else ""
    return f"next: drgn -c {path} -s <guest vmlinux>   ({', '.join(what)}{same})"


def vmcoreinfo_text(frames: GuestFrames, scan: VmcoreInfoScan) -> str:
    info = scan.found
    if info is None:
        return (f"VMCOREINFO: none found at the start of the guest's {scan.pages} pages in the "
                "dump (not a Linux guest, a kernel before 4.15, or its page is a hole)")
    extra = f"; {len(scan.at)} notes found, the first used" if len(scan.at) > 1 else ""
    return (f"VMCOREINFO: at gpa {info.gpa:#x}: OSRELEASE={info.release} "
            f"BUILD-ID={info.build_id or '?'}{extra}")


def show(vm: VM, out: GuestCore, host_build_id: str | None = None) -> None:
    c = console()
    f = out.frames
    total = f.pages + f.hole_pages
    space = f"address space {f.as_id}" + (" (SMM)" if f.as_id == SMM_AS else "")
    lines = [
        f"wrote {out.path} ({out.size} bytes): {space}, "
        f"{plural(len(f.memslots), 'memslot', 'memslots')}, {total} guest pages",
        f"  written: {f.pages} pages in {plural(len(f.runs), 'PT_LOAD run', 'PT_LOAD runs')}",
        f"  holes: {f.hole_pages} pages"
        + ("" if not f.hole_pages else ": " + ", ".join(
            f"{n} {w.value}" for w, n in f.holes_by_why().items()))
        + f" (presence from the {f.kind.value})",
        *(f"    {line}" for line in holes_text(f.holes)),
    ]
    if out.zeroed:
        lines.append("  written as zeros (listed by the dump but unreadable): "
                     + ", ".join(gfn_text(a, b) for a, b in gfn_ranges(out.zeroed)))
    lines.append(f"  {vmcoreinfo_text(f, out.vmcoreinfo)}")
    first = next((v.regs for v in out.vcpus if v.regs is not None), None)
    lines.append(f"  vCPUs: {plural(len(out.vcpus), 'NT_PRSTATUS note', 'NT_PRSTATUS notes')} "
                 f"in vcpu_idx order ({vm.vendor or 'no vendor module'})")
    if first is not None:
        where = sources_text(first)
        lines.append(f"    registers: {where[0]}")
        lines += [f"               {w}" for w in where[1:]]
    lines += [f"    {vcpu_line(v)}" for v in out.vcpus]
    lines.append(next_line(out.path, out.vmcoreinfo, host_build_id))
    for line in lines:
        c.print(line, markup=False, soft_wrap=True)


def regs_json(v: VcpuRegs) -> dict[str, Any]:
    r = v.regs
    return {"vcpu": hx(v.vcpu.addr), "vcpu_id": v.vcpu.vcpu_id, "vcpu_idx": v.vcpu.vcpu_idx,
            "registers": None if r is None else {n: hx(x) for n, x in r.values.items()},
            "sources": None if r is None else dict(r.sources),
            "unknown": None if r is None else list(r.unknown),
            "stale": None if r is None else r.stale,
            "notes": [] if r is None else list(r.notes)}


def core_json(out: GuestCore, host_build_id: str | None = None) -> dict[str, Any]:
    """guest-core's part of one VM's entry in the JSON document."""
    f = out.frames
    info = out.vmcoreinfo.found
    return {
        "file": out.path, "bytes": out.size, "address_space": f.as_id,
        "memslots": [s.id for s in f.memslots], "presence": f.kind.name.lower(),
        "pages": f.pages, "hole_pages": f.hole_pages,
        "runs": [{"gfn": hx(r.gfn), "pages": len(r.pfns)} for r in f.runs],
        "holes": [{"start": hx(h.start), "end": hx(h.end), "pages": h.pages,
                   "why": h.why.name.lower()} for h in f.holes],
        "zeroed": [hx(g) for g in out.zeroed],
        "vmcoreinfo": None if info is None else {
            "gpa": hx(info.gpa), "osrelease": info.release, "build_id": info.build_id},
        "vmcoreinfo_notes": [hx(a) for a in out.vmcoreinfo.at],
        "vcpus": [regs_json(v) for v in out.vcpus],
        "next": next_line(out.path, out.vmcoreinfo, host_build_id).removeprefix("next: "),
    }


@contextmanager
def progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawing a bar on stderr once writing has taken
    PROGRESS_AFTER seconds (a terminal only, never under --json)."""
    if not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    start = time.monotonic()
    bar: list[Progress] = []

    def tick(done: int, total: int) -> None:
        if not bar:
            if time.monotonic() - start < PROGRESS_AFTER:
                return
            p = Progress(TextColumn("writing guest pages"), BarColumn(), MofNCompleteColumn(),
                         console=Console(file=sys.stderr), transient=True)
            p.add_task("pages", total=total)
            p.start()
            bar.append(p)
        bar[0].update(bar[0].task_ids[0], completed=done)

    try:
        yield tick
    finally:
        if bar:
            bar[0].stop()


@kvm_command(
    argument("out", metavar="OUT", help="the core file to write (never overwritten)"),
    argument("--smm", action="store_true",
             help="address space 1 (System Management Mode) instead of 0"),
    name="guest-core",
)
def _cmd_guest_core(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """write a guest's physical memory and vCPU registers as an ELF core for drgn

    Writes OUT, an ELF core (ET_CORE, x86-64) of one VM's guest physical memory
    (--vm ID, else the selected VM, else the only one): one PT_LOAD per run of
    consecutive guest pages the host dump holds (p_paddr: the guest physical
    address), over the memslots of address space 0 (1 with --smm); an NT_PRSTATUS
    per vCPU in vcpu_idx order, from the registers KVM saved (vcpu->arch.regs[];
    on AMD RFLAGS and the segments from the VMCB save area; on Intel only what
    kvm_intel caches in memory, the rest is 0 and named); and the guest kernel's
    VMCOREINFO note, when its memory holds one (a Linux guest), so that drgn opens
    OUT as the guest kernel's vmcore: drgn -c OUT -s GUEST_VMLINUX.

    A guest page is written when the VMM's page tables map a host page at its
    address and the host dump holds that page by its own table (ELF program
    headers, the kdump bitmap); every other page is a hole, never zeros: not
    mapped by the VMM (never touched, or swapped out), or not in the dump
    (makedumpfile -d 31 drops the VMM's memory; -d 17 keeps it). The summary says
    how many pages were written and which gfn ranges are holes, where each register
    came from, and which vCPUs were in guest mode at the dump (their registers are
    stale). No page of the guest in the dump is an error; OUT is never overwritten.
    """
    s = session_of(kwargs)
    vm = one_vm(s, args.vm, "no guest to write")
    k = s.kernel
    with k.reading(vm), progress(not args.json) as tick:
        out = write_guest_core(k, vm, args.out, SMM_AS if args.smm else 0, tick)

    main = prog.main_module()
    host = main.build_id.hex() if main.build_id else None

    def human() -> None:
        console().print(vm_header(vm), markup=False)
        show(vm, out, host)

    finish(s, args, "guest-core", {"vms": [{**vm_ref(vm), **core_json(out, host)}]}, human,
           [vm])
