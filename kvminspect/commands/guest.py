"""guest: a drgn Program on a guest's memory, read through the host dump, no file.

The guest's physical memory the dump holds (kvminspect.guestcore: the same
pages guest-core writes) becomes drgn's physical memory segments, each read
through the host (Program.add_memory_segment with a read function); a Linux
guest's VMCOREINFO note, found in its memory, makes the program that
kernel (Program.set_linux_kernel_custom). Then drgn's shell runs on it, or
``guest py`` binds it as ``guest`` beside the host's ``prog`` for py (and,
under drgn's ``%kvm``, in drgn's own shell).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import drgn
from drgn.commands import argument

from kvminspect.commands import kvm_command, session_of
from kvminspect.commands.guestcore import one_vm
from kvminspect.errors import KvminspectError
from kvminspect.guestcore import (
    SMM_AS,
    GuestMemory,
    NoGuestMemory,
    find_vmcoreinfo,
    guest_frames,
    no_memory_message,
    vcpu_registers,
)
from kvminspect.render import console
from kvminspect.session import Session

CACHE_KEY = "kvminspect_guests"  # in the host Program's config: the guests opened
# struct pt_regs (arch/x86/include/asm/ptrace.h, x86-64) member <- kvminspect's register name
PT_REGS = {"r15": "r15", "r14": "r14", "r13": "r13", "r12": "r12", "bp": "rbp", "bx": "rbx",
           "r11": "r11", "r10": "r10", "r9": "r9", "r8": "r8", "ax": "rax", "cx": "rcx",
           "dx": "rdx", "si": "rsi", "di": "rdi", "ip": "rip", "cs": "cs", "flags": "rflags",
           "sp": "rsp", "ss": "ss"}


class Guest:
    """A guest's drgn Program and what it was made from."""

    def __init__(self, prog: drgn.Program, summary: str, warning: str | None,
                 regs: dict[int, dict[str, int]]) -> None:
        self.prog = prog
        self.summary = summary
        self.warning = warning
        self.regs = regs  # vcpu_idx -> the registers KVM saved (read_regs.SavedRegs.values)


def open_guest_of(s: Session, vm_ident: str | None, as_id: int, debug: list[str]) -> Guest:
    """The guest of one VM as a drgn Program (kept per target, vmcore only)."""
    from kvminspect.target import open_guest

    vm = one_vm(s, vm_ident, "no guest to open")
    key = (vm.addr, as_id, tuple(debug))
    cache: dict[tuple[int, int, tuple[str, ...]], Guest] = s.target.prog.config.setdefault(
        CACHE_KEY, {})
    if not s.target.live and key in cache:
        return cache[key]
    k = s.kernel
    with k.reading(vm):
        frames = guest_frames(k, vm, as_id)
        if frames.pages == 0:
            raise NoGuestMemory(no_memory_message(vm, frames), frames)
        memory = GuestMemory(k, frames)
        scan = find_vmcoreinfo(k, frames, memory)
        regs = {v.vcpu.vcpu_idx: dict(v.regs.values) for v in vcpu_registers(k, vm)
                if v.regs is not None}
    info = scan.found
    if info is not None and not debug:
        debug = same_build(s.target.prog, info.build_id)
    prog, warning = open_guest([(r.gpa, r.size) for r in frames.runs], memory.read,
                               info.desc if info is not None else None, debug)
    what = (f"Linux {info.release} (build id {info.build_id or '?'}, VMCOREINFO at gpa "
            f"{info.gpa:#x})" if info is not None
            else "no VMCOREINFO (not a Linux guest?): physical memory only, "
            "read(ADDR, SIZE, True)")
    summary = (f"guest of VM {vm.index}: {frames.pages} pages in the dump in "
               f"{len(frames.runs)} segments, {frames.hole_pages} holes (address space "
               f"{as_id}); {what}")
    g = Guest(prog, summary, warning, regs)
    if not s.target.live:
        cache[key] = g
    return g


def stack_from_regs(prog: drgn.Program, regs: dict[str, int]) -> drgn.StackTrace:
    """The stack trace that starts at *regs* (a vCPU's saved registers), through a
    struct pt_regs of the guest kernel's debug info (Program.stack_trace takes one):
    how a custom program, which has no NT_PRSTATUS, unwinds a task running on a vCPU."""
    value = {member: regs.get(name, 0) for member, name in PT_REGS.items()}
    return prog.stack_trace(drgn.Object(prog, "struct pt_regs", value=value))


def names_of(g: Guest) -> dict[str, Any]:
    """What the guest adds to py's and drgn's names."""
    return {"guest": g.prog, "guest_regs": g.regs,
            "guest_stack": lambda i: stack_from_regs(g.prog, g.regs[i])}


def same_build(host: drgn.Program, build_id: str | None) -> list[str]:
    """The host's vmlinux debug file when the guest runs the very same kernel build
    (its VMCOREINFO BUILD-ID is the host's), else nothing (drgn's search)."""
    main = host.main_module()
    if build_id and main.build_id and main.build_id.hex() == build_id and main.debug_file_path:
        return [main.debug_file_path]
    return []


def bind_py(s: Session, g: Guest, outer: dict[str, Any] | None) -> None:
    """guest (the Program), guest_regs (vcpu_idx -> registers) and guest_stack(i) in
    py's names, and in drgn's shell's when %kvm runs there."""
    from kvminspect.commands.pyshell import bindings

    if not s.py_globals:
        s.py_globals.update(bindings(s))
    names = names_of(g)
    s.py_globals.update(names)
    if outer is not None:
        outer.update(names)


def run_shell(s: Session, g: Guest) -> None:
    """drgn's interactive shell on the guest: prog is the guest, host the host."""
    import drgn.cli

    from kvminspect.commands.pyshell import kvm_object

    def add_names(names: dict[str, Any]) -> dict[str, Any]:
        return {**names, **names_of(g), "host": s.target.prog, "kvm": kvm_object(s),
                "session": s}

    def banner(text: str) -> str:
        return (text + "\n>>> host, kvm, session, guest, guest_regs, guest_stack  # from "
                "kvminspect: prog is the guest; Ctrl-D returns to kvminspect")

    drgn.cli.run_interactive(g.prog, banner_func=banner, globals_func=add_names)


@kvm_command(
    argument("mode", nargs="?", choices=("py",), metavar="py",
             help="bind the guest's program as guest for py instead of entering drgn's shell"),
    argument("-s", "--guest-debug", dest="debug", action="append", default=[], metavar="PATH",
             help="the guest kernel's debug info (vmlinux; file or directory, repeatable); "
             "default: drgn's search by the guest's build id"),
    argument("--smm", action="store_true",
             help="address space 1 (System Management Mode) instead of 0"),
    json=False,
)
def _cmd_guest(prog: drgn.Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """open a drgn program on a guest's memory: drgn's shell on it, or guest in py

    Opens one VM's guest (--vm ID, else the selected VM, else the only one) as a drgn
    Program, without writing a file: its memory is the guest physical memory the dump
    holds (the pages guest-core would write; holes are faults), read through the host
    page by page. When the guest's memory holds a Linux kernel's VMCOREINFO note, the
    program is that kernel (drgn walks its page tables, lists its tasks, reads its
    variables) with its debug info from -s PATH, else the host's vmlinux when the guest
    runs the same build (the same build id), else drgn's standard search (in a
    one-shot command, -s after the command is kvminspect's own: give --guest-debug
    PATH there). Without py: drgn's interactive shell on the guest (prog is the guest;
    host, kvm, session, guest_regs and guest_stack bound; Ctrl-D comes back). With py:
    guest, guest_regs (vcpu_idx -> the registers KVM saved) and guest_stack are bound
    for py (py guest['init_uts_ns'].name.release) and, under drgn's %kvm, in drgn's
    shell. The program has no NT_PRSTATUS, so drgn cannot unwind a task running on a
    vCPU by itself ("registers for CPU N were not saved"): guest_stack(N) unwinds from
    vCPU N's saved registers (a struct pt_regs), and guest-core writes them into a core.
    """
    s = session_of(kwargs)
    g = open_guest_of(s, args.vm, SMM_AS if args.smm else 0, list(args.debug))
    c = console()
    c.print(g.summary, markup=False, soft_wrap=True)
    if g.warning:
        print(f"kvminspect: warning: {g.warning}", file=sys.stderr, flush=True)
    outer = kwargs["globals"].get("drgn_globals")
    if args.mode == "py":
        bind_py(s, g, outer)
        c.print("bound: guest, guest_regs, guest_stack (py guest.read(ADDR, SIZE, True)"
                + (", py guest['init_uts_ns'].name.release" if g.prog.flags
                   & drgn.ProgramFlags.IS_LINUX_KERNEL else "") + ")", markup=False)
        return
    if not sys.stdin.isatty():
        raise KvminspectError("guest: drgn's shell needs a terminal (guest py binds it for "
                              "py instead)")
    run_shell(s, g)
