"""What kvminspect.drgn_compat takes from drgn's private parts is still there and
still what drgn formats its commands' help with: fails when drgn changes it."""

from __future__ import annotations

import argparse
from typing import Any

from drgn import Program
from drgn.commands import (
    CommandNamespace,
    ParsedCommand,
    argument,
    argument_group,
    command,
    custom_command,
    mutually_exclusive_group,
)

from kvminspect import registry
from kvminspect.drgn_compat import HelpFormatter

LONG = ("A first paragraph long enough to be wrapped by the formatter at the terminal's "
        "width, more than once, with 100% of its words kept.\n\n"
        "A second paragraph, which must stay one (drgn keeps paragraphs).")
ARGUMENTS = (
    argument("sp", nargs="?", metavar="SP", help="a positional"),
    mutually_exclusive_group(
        argument("--one", metavar="N", type=int, help="one way"),
        argument("--two", action="store_true", help="the other"),
    ),
    argument_group(argument("--fmt", choices=("a", "b"), help="a choice"), title="output",
                   description="how it looks"),
)


def test_help_formatter_is_an_argparse_formatter() -> None:
    assert issubclass(HelpFormatter, argparse.HelpFormatter)


def test_registry_formats_a_command_as_drgn_does() -> None:
    """A command registered with drgn and the same spec in kvminspect.registry
    (built with drgn_compat.HelpFormatter) give the same usage and help."""
    ns = CommandNamespace(func_name_prefix="_cmd_")

    @command(description="do it", long_description=LONG, arguments=ARGUMENTS, namespace=ns)
    def _cmd_thing(prog: Program, name: str, args: argparse.Namespace, **kw: Any) -> None:
        pass

    @custom_command(description="raw", usage="**raw** *text*", long_description=LONG,
                    parse=ParsedCommand, namespace=ns)
    def _cmd_raw(prog: Program, name: str, args: str, **kw: Any) -> None:
        pass

    for name, usage, arguments in (("thing", None, ARGUMENTS), ("raw", "**raw** *text*", ())):
        real = ns.lookup(Program(), name)
        entry = registry.Entry(registry.CommandSpec(
            name, __name__, real.description(), LONG, usage,
            arguments=tuple(registry.spec_of(a) for a in arguments)))
        assert entry.format_usage() == real.format_usage()
        assert entry.format_help(indent="  ") == real.format_help(indent="  ")
        assert "drgn keeps paragraphs" in entry.format_help()
