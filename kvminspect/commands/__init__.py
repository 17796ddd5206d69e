"""kvminspect's commands, one module each, registered in one drgn namespace.

Commands are drgn commands (``drgn.commands``): argparse-declared, with
``| shell`` pipes and ``> file`` redirects in the REPL. They take the Session
from ``globals["session"]`` and return nothing; with ``--json`` they print
one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import shlex
from collections.abc import Callable
from typing import Any

from drgn import Program
from drgn.commands import CommandArgumentError, CommandNamespace, argument, command

from kvminspect.errors import Problem, UsageError
from kvminspect.layout import MissingMember
from kvminspect.model import VM
from kvminspect.render import console, emit_json, warn_problems
from kvminspect.session import Session
from kvminspect.shapes import SCHEMA_VERSION, vm_ref

NO_VMS = "no VMs (vm_list is empty)"

NAMESPACE = CommandNamespace(func_name_prefix="_cmd_")
MODULES = ("vms", "vm", "vcpus", "roots", "tree", "sp", "walk", "rmap", "unsync", "stats", "check",
           "export", "watch", "diff", "rate", "pyshell", "help")

JSON_ARG = argument("--json", action="store_true", help="print one JSON document")
VM_ARG = argument("--vm", metavar="ID",
                  help="VM index, pid:PID, struct kvm address or name (kvm-PID, QEMU's -name) "
                  "(default: the selected VM, else all VMs; export: else the only VM)")


def kvm_command(*arguments: Any, vm: bool = True, json: bool = True) -> Callable:
    """Register a kvminspect command in NAMESPACE (drgn.commands.command).

    The description is the first line of the function's docstring, the long
    description the rest (its paragraphs kept); --vm ID and --json follow the command's own
    *arguments* unless *vm* / *json* is False.
    """
    extra = ((VM_ARG,) if vm else ()) + ((JSON_ARG,) if json else ())

    def register(func: Callable) -> Callable:
        first, _, rest = inspect.cleandoc(func.__doc__ or "").partition("\n")
        paragraphs = [" ".join(p.split()) for p in rest.split("\n\n") if p.strip()]
        return command(description=first.strip(),
                       long_description="\n\n".join(paragraphs) or None,
                       arguments=(*arguments, *extra), namespace=NAMESPACE)(func)

    return register


def load_all() -> CommandNamespace:
    """Import every command module (each registers itself)."""
    for m in MODULES:
        importlib.import_module(f"kvminspect.commands.{m}")
    return NAMESPACE


HELP_FLAGS = ("-h", "--help")


def asks_help(words: list[str]) -> str | None:
    """The command of 'CMD ... -h' / '--help' (shown as 'help CMD': drgn commands
    have no -h), else None. The CLI and the REPL both ask this."""
    if len(words) > 1 and any(w in HELP_FLAGS for w in words[1:]):
        return words[0]
    return None


def check_arguments(prog: Program, argv: list[str]) -> None:
    """Parse a one-shot command's arguments before it runs: a bad one is then
    one line, "CMD: what is wrong; usage: CMD ...", instead of argparse's
    usage line and error line (still a CommandArgumentError: exit status 2)."""
    cmd = NAMESPACE.lookup(prog, argv[0])
    parser = getattr(cmd, "_parser", None)  # drgn's argparse command keeps its parser
    if not isinstance(parser, argparse.ArgumentParser):
        return  # the command reports its own argument errors
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage line
            parser.parse_args(cmd.parse(shlex.join(argv[1:])).args)
    except CommandArgumentError as e:
        raise CommandArgumentError(f"{e}; usage: {cmd.format_usage().strip()}") from None


def session_of(kwargs: dict[str, Any]) -> Session:
    return kwargs["globals"]["session"]


def parse_int(text: str, what: str) -> int:
    """An address or number as typed: hex with or without 0x, or decimal."""
    t = text.strip().lower()
    try:
        if t.startswith("0x") or any(c in "abcdef" for c in t) or len(t) > 10:
            return int(t, 16)
        return int(t, 10)
    except ValueError:
        raise UsageError(f"bad {what}: {text!r}") from None


def non_negative(text: str) -> int:
    """An argparse type: a count or depth, 0 or more (argparse says which option)."""
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return n


def parse_gfn(text: str) -> int:
    """A guest frame number as typed: hex, with or without 0x."""
    t = text.strip().lower()
    try:
        n = int(t[2:] if t.startswith("0x") else t, 16)
    except ValueError:
        n = -1
    if n < 0 or not t:
        raise UsageError(f"bad gfn: {text!r} (a guest frame number in hex)")
    return n


def sp_scope(session: Session, vm_ident: str | None, sp_text: str | None
             ) -> tuple[list, int | None]:
    """The VMs a command with an optional SP argument covers, and that SP.

    With SP: only the VM that owns it (LookupFailed if none does).
    """
    vms = session.vms(vm_ident)
    if sp_text is None:
        return vms, None
    top = parse_int(sp_text, "shadow page address")
    return [session.find_sp(top, vms)[0]], top


def finish(session: Session, args: argparse.Namespace, command: str, doc: dict[str, Any],
           human: Callable[[], None], vms: list[VM], *,
           problems: list[Problem] | None = None,
           missing: tuple[MissingMember, ...] | None = None) -> None:
    """Print a command's result: JSON, or rich output plus warnings on stderr.

    The document (and stderr) carries the problems of the VMs it shows,
    wherever in the session they were first met, and no others (*problems*
    and *missing* instead, for a command that reads two targets); stderr
    repeats none already printed in this session.
    """
    if problems is None:
        problems = session.kernel.problems.of(vm.addr for vm in vms)
    if missing is None:
        missing = session.kernel.missing
    if getattr(args, "json", False):
        emit_json({"schema_version": SCHEMA_VERSION, "command": command, **doc}, problems,
                  missing)
    else:
        human()
        new = [p for p in problems if p not in session.printed]
        session.printed.update(new)
        warn_problems(new, missing)


def sp_flags(d: dict[str, Any]) -> list[str]:
    """A shadow page's state (shapes.sp_json) as words, for every text renderer."""
    flags = [w for k, w in (("direct", "direct"), ("tdp_mmu_page", "tdp"), ("unsync", "UNSYNC"))
             if d[k] is True]
    if d["unsync_children"]:
        flags.append(f"unsync_children={d['unsync_children']}")
    if d["invalid"]:
        flags.append("invalid")
    elif d["obsolete"]:
        flags.append("obsolete")
    if d["root_count"]:
        flags.append(f"root_count={d['root_count']}")
    if d["orphan"]:
        flags.append("ORPHAN")
    if d.get("smm"):  # role.smm: built for System Management Mode (address space 1)
        flags.append("SMM")
    if d.get("guest_mode"):  # role.guest_mode: a nested guest's (L2) page
        flags.append("nested")
    return flags


def vm_header(vm: VM, what: str = "") -> str:
    """The line that opens one VM's part of a command's text output."""
    return f"VM {vm.index}  kvm {vm.addr:#x}  pid {vm.pid}  {vm.mmu}" + (
        f": {what}" if what else "")


def per_vm(kwargs: dict[str, Any], args: argparse.Namespace, command: str, *,
           collect: Callable[[Session, VM], Any],
           to_json: Callable[[VM, Any], dict[str, Any]],
           show: Callable[[VM, Any], None],
           header: Callable[[VM, Any], str] = lambda vm, data: vm_header(vm),
           vms: list[VM] | None = None) -> None:
    """What every per-VM command does around its own part.

    The VMs are --vm ID, the selected one, or all (unless *vms* is given);
    *collect* reads each VM's data (its problems recorded against it);
    the JSON document is {"vms": [{vm_ref..., **to_json(vm, data)}]}; the
    text says when there are no VMs, and prints *header* then *show* per VM.
    """
    s = session_of(kwargs)
    vms = s.vms(getattr(args, "vm", None)) if vms is None else vms
    items = []
    for vm in vms:
        with s.kernel.reading(vm):
            items.append((vm, collect(s, vm)))

    def human() -> None:
        c = console()
        if not vms:
            c.print(NO_VMS)
        for vm, data in items:
            c.print(header(vm, data), markup=False)
            show(vm, data)

    doc = {"vms": [{**vm_ref(vm), **to_json(vm, data)} for vm, data in items]}
    finish(s, args, command, doc, human, vms)


__all__ = ["NAMESPACE", "JSON_ARG", "NO_VMS", "VM_ARG", "Program", "finish", "load_all",
           "parse_int", "per_vm", "session_of", "sp_flags", "sp_scope", "vm_header"]
