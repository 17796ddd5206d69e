"""kvminspect's commands, one module each, registered in one drgn namespace.

Commands are drgn commands (``drgn.commands``): argparse-declared, with
``| shell`` pipes and ``> file`` redirects in the REPL. They take the Session
from ``globals["session"]`` and return nothing; with ``--json`` they print
one JSON document.

A command's module is imported when the command first runs: until then
NAMESPACE holds its kvminspect.registry.Entry (from the manifest), which
lists, describes and helps without importing it. This package itself imports
neither the model nor the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from drgn import Program
from drgn.commands import (
    Command,
    CommandNamespace,
    CommandNotFoundError,
    ParsedCommand,
    argument,
    command,
    custom_command,
)

from kvminspect import registry
from kvminspect.errors import Problem
from kvminspect.registry import Entry, asks_help

if TYPE_CHECKING:
    from kvminspect.layout import Missing
    from kvminspect.model import VM
    from kvminspect.session import Session

NO_VMS = "no VMs (vm_list is empty)"



class KvmNamespace(CommandNamespace):
    """drgn's CommandNamespace with its commands in a public dict, *commands*:
    a registry.Entry per command until the command's module registers the real one."""

    def __init__(self) -> None:
        # the number types every command's arguments use (registry.NUMBER_TYPES)
        super().__init__(func_name_prefix="_cmd_", argparse_types=registry.NUMBER_TYPES)
        self.commands: dict[str, Command[Any]] = {}

    def register(self, name: str, command: Command[Any]) -> None:
        self.commands[name] = command
        registry.REAL[name] = command  # what the registry's stand-in Entry runs

    def lookup(self, prog: Program, name: str) -> Command[object]:
        cmd = self.commands.get(name)
        if cmd is None or not cmd.enabled(prog):
            raise CommandNotFoundError(name)
        return cmd

    def enabled(self, prog: Program) -> Iterable[tuple[str, Command[object]]]:
        return [(n, c) for n, c in self.commands.items() if c.enabled(prog)]


NAMESPACE = KvmNamespace()
NAMESPACE.commands.update(registry.entries())

JSON_ARG = argument("--json", action="store_true", help="print one JSON document")
VM_ARG = argument("--vm", metavar="ID",
                  help="VM index (decimal), pid:PID, struct kvm address (hex, 0x optional) or "
                  "name (kvm-PID, QEMU's -name) (default: the selected VM, else all VMs; "
                  "export: else the only VM)")


def kvm_command(*arguments: Any, vm: bool = True, json: bool = True,
                parse: Callable[[str], ParsedCommand[Any]] | None = None,
                usage: str | None = None, name: str | None = None) -> Callable:
    """Register a kvminspect command in NAMESPACE (drgn.commands.command), and its
    spec in kvminspect.registry.LIVE (the manifest is made from those).

    The description is the first line of the function's docstring, the long
    description the rest (its paragraphs kept); --vm ID and --json follow the command's own
    *arguments* unless *vm* / *json* is False. With *parse* (and its *usage*) the
    command parses its own words (drgn.commands.custom_command). A command whose
    arguments take numbers (the types "address", "gfn", "count": registry.NUMBER_TYPES)
    says in its usage line how they are typed (registry.usage_with_numbers). *name*:
    the command's name when it is not the function's ("guest-core" for _cmd_guest_core).
    """
    extra = ((VM_ARG,) if vm else ()) + ((JSON_ARG,) if json else ())

    def register(func: Callable) -> Callable:
        first, _, rest = inspect.cleandoc(func.__doc__ or "").partition("\n")
        paragraphs = [" ".join(p.split()) for p in rest.split("\n\n") if p.strip()]
        args = (*arguments, *extra)
        spec = registry.CommandSpec(
            name=name or func.__name__.removeprefix("_cmd_"), module=func.__module__,
            description=first.strip(), long_description="\n\n".join(paragraphs) or None,
            usage=usage, arguments=tuple(registry.spec_of(a) for a in args),
            custom=parse is not None)
        if usage is None and (numbered := registry.usage_with_numbers(spec)) is not None:
            spec = dataclasses.replace(spec, usage=numbered)
        registry.LIVE[spec.name] = spec
        if parse is not None:
            return custom_command(name=spec.name, description=spec.description, usage=usage,
                                  long_description=spec.long_description, arguments=args,
                                  parse=parse, namespace=NAMESPACE)(func)
        return command(name=spec.name, description=spec.description, usage=spec.usage,
                       long_description=spec.long_description,
                       arguments=args, namespace=NAMESPACE)(func)

    return register


def load_all() -> KvmNamespace:
    """Import every command module (each registers itself)."""
    registry.import_all()
    return NAMESPACE



def run_command(session: Session, argv: list[str]) -> None:
    """Run one command (argv[0] with its arguments) in *session*: its arguments
    checked first (a bad one is one line), then drgn's command framework."""
    import shlex

    if (cmd := asks_help(argv)) is not None:
        argv = ["help", cmd]
    check_arguments(session.target.prog, argv)
    session.begin(progress="--json" not in argv)
    entry = registry.entry(argv[0])
    # py's words are its code as typed ('py "x + 1"'), not words to quote
    line = " ".join(argv) if entry is not None and entry.spec.custom else shlex.join(argv)
    NAMESPACE.run(session.target.prog, line, globals={"session": session})

def check_arguments(prog: Program, argv: list[str]) -> None:
    """Parse a one-shot command's arguments before it runs: a bad one is then
    one line, "CMD: what is wrong; usage: CMD ..." (a UsageError: exit status 2),
    instead of argparse's usage line and error line. A command that parses
    its own words (py) is left to do so."""
    cmd = NAMESPACE.lookup(prog, argv[0])
    if isinstance(cmd, Entry):
        cmd.real()  # its module imported, its spec is live (with its types)
    spec = registry.LIVE.get(argv[0])
    if spec is not None:
        Entry(spec).check(argv[1:], typed=True)


def session_of(kwargs: dict[str, Any]) -> Session:
    return kwargs["globals"]["session"]


def sp_scope(session: Session, vm_ident: str | None, top: int | None
             ) -> tuple[list, int | None]:
    """The VMs a command with an optional SP argument (an "address") covers, and that SP.

    With SP: only the VM that owns it (LookupFailed if none does).
    """
    vms = session.vms(vm_ident)
    if top is None:
        return vms, None
    return [session.find_sp(top, vms)[0]], top


def finish(session: Session, args: argparse.Namespace, command: str, doc: dict[str, Any],
           human: Callable[[], None], vms: list[VM], *,
           problems: list[Problem] | None = None,
           missing: tuple[Missing, ...] | None = None) -> None:
    """Print a command's result: JSON, or rich output plus warnings on stderr.

    The document (and stderr) carries the problems of the VMs it shows,
    wherever in the session they were first met, and no others (*problems*
    and *missing* instead, for a command that reads two targets); stderr
    repeats none already printed in this session.
    """
    from kvminspect.render import emit_json, warn_problems
    from kvminspect.shapes import SCHEMA_VERSION

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
    from kvminspect.render import console, say
    from kvminspect.shapes import vm_ref

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
            say(header(vm, data))  # wrapped between words when narrow
            show(vm, data)

    doc = {"vms": [{**vm_ref(vm), **to_json(vm, data)} for vm, data in items]}
    finish(s, args, command, doc, human, vms)


__all__ = ["NAMESPACE", "JSON_ARG", "NO_VMS", "VM_ARG", "Program", "asks_help", "finish",
           "run_command", "load_all", "per_vm", "session_of", "sp_flags", "sp_scope", "vm_header"]
