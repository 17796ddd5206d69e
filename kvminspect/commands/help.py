"""help: the commands, or one command's options."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import NAMESPACE, kvm_command, session_of
from kvminspect.registry import show_help


@kvm_command(
    argument("cmd", nargs="?", metavar="CMD", help="a command name"),
    vm=False,
    json=False,
)
def _cmd_help(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """list commands, or show one command's usage and options"""
    show_help(args.cmd, dict(NAMESPACE.enabled(prog)), repl=session_of(kwargs).interactive)
