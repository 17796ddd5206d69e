"""kvminspect's commands, one module each, registered in one drgn namespace.

Commands are drgn commands (``drgn.commands``): argparse-declared, with
``| shell`` pipes and ``> file`` redirects in the REPL. They take the Session
from ``globals["session"]`` and return nothing; with ``--json`` they print
one JSON document.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from drgn import Program
from drgn.commands import CommandNamespace, argument

from kvminspect.errors import UsageError
from kvminspect.render import emit_json, warn_problems
from kvminspect.session import Session

NAMESPACE = CommandNamespace(func_name_prefix="_cmd_")
MODULES = ("vms", "vm", "vcpus", "roots", "tree", "sp", "unsync", "stats", "check",
           "export", "help")

JSON_ARG = argument("--json", action="store_true", help="print one JSON document")
VM_ARG = argument("--vm", metavar="ID",
                  help="VM index, pid:PID or struct kvm address (default: the selected VM, else "
                  "all VMs; export: else the only VM)")


def load_all() -> CommandNamespace:
    """Import every command module (each registers itself)."""
    for m in MODULES:
        importlib.import_module(f"kvminspect.commands.{m}")
    return NAMESPACE


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


def finish(session: Session, args: argparse.Namespace, doc: dict[str, Any],
           human: Callable[[], None], start: int = 0) -> None:
    """Print a command's result: JSON, or rich output plus warnings on stderr.

    JSON lists every problem the session has met; on stderr only those met
    since *start* (the count before the command ran) are repeated.
    """
    problems = session.problems()
    missing = session.kernel.missing
    if getattr(args, "json", False):
        emit_json(doc, problems, missing)
    else:
        human()
        warn_problems(problems[start:], missing)


__all__ = ["NAMESPACE", "JSON_ARG", "VM_ARG", "Program", "finish", "load_all",
           "parse_int", "session_of", "sp_scope"]
