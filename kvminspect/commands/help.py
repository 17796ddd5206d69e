"""help: the commands, or one command's options."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import CommandNotFoundError, argument

from kvminspect.commands import NAMESPACE, kvm_command
from kvminspect.errors import UsageError
from kvminspect.render import console


@kvm_command(
    argument("cmd", nargs="?", metavar="CMD", help="a command name"),
    vm=False,
    json=False,
)
def _cmd_help(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """list commands, or show one command's usage and options"""
    c = console()
    if args.cmd:
        try:
            cmd = NAMESPACE.lookup(prog, args.cmd)
        except CommandNotFoundError:
            raise UsageError(f"unknown command '{args.cmd}'") from None
        c.print(f"usage: {cmd.format_usage()}\n\n{cmd.description()}\n", markup=False)
        c.print(cmd.format_help(indent="  "), markup=False)
        return
    for cmd_name, cmd in sorted(NAMESPACE.enabled(prog)):
        c.print(f"  {cmd_name:<8} {cmd.description()}", markup=False)
    c.print("\nCommands that print data take --json (one JSON document). "
            "In the REPL: 'cmd | shell', 'cmd > file'; Ctrl-C cancels, Ctrl-D exits.",
            markup=False)
