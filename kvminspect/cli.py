"""Command line: one-shot commands, and the live / vmcore REPLs.

    kvminspect [-c CORE | --live | --qemu SOCK | --sample] [-s PATH]... [--vm ID] COMMAND
               [ARGS] [--json]
    kvminspect [-s PATH]... diff A B [--vm ID] [--json]    (A is the target: -c A diff B)
    kvminspect help [CMD]                                  (no target needed)
    kvminspect live [--qemu SOCK] [-s PATH]...
    kvminspect vmcore [PATH] [-s PATH]...
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback

import drgn

from kvminspect import __version__
from kvminspect.commands import asks_help, check_arguments, load_all
from kvminspect.commands.diff import split_first_core
from kvminspect.errors import UsageError, describe
from kvminspect.session import Session
from kvminspect.target import Target, open_core, open_live, open_qemu, open_sample


def _commands_epilog() -> str:
    ns = load_all()
    rows = [f"  {name:<8} {cmd.description()}" for name, cmd in ns.enabled(None)]
    return ("commands:\n" + "\n".join(rows) + "\n\n"
            "REPLs:\n  kvminspect live              the running kernel (root)\n"
            "  kvminspect live --qemu SOCK  a QEMU-emulated host, live, through QMP\n"
            "  kvminspect vmcore [PATH]     a vmcore or fixture directory "
            "(no PATH: the bundled sample)\n\n"
            "'kvminspect diff A B' compares two vmcores of one host (A before, B after).\n"
            "'kvminspect help CMD' shows a command's options.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvminspect",
        description="Show what KVM's MMU is doing in a Linux host kernel: "
        "VMs, vCPUs, roots, shadow pages, the unsync walk.",
        epilog=_commands_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("-c", "--core", metavar="CORE",
                     help="vmcore (ELF or kdump; .xz/.zst/.gz) or fixture directory")
    src.add_argument("--live", action="store_true", help="the running kernel (/proc/kcore)")
    src.add_argument("--qemu", metavar="SOCKET",
                     help="a QEMU-emulated host, live, through its QMP unix socket")
    src.add_argument("--sample", action="store_true", help="the sample vmcore in the package")
    p.add_argument("-s", "--symbols", metavar="PATH", action="append", default=[],
                   help="debug info file or directory (repeatable); default: drgn's search")
    p.add_argument("--vm", metavar="ID", help="select a VM (index, pid:PID or kvm address)")
    p.add_argument("--version", action="version", version=f"kvminspect {__version__}")
    p.add_argument("command", nargs="?", help="a command, or 'live' / 'vmcore' for a REPL")
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _has_target(args: argparse.Namespace) -> bool:
    return bool(args.core or args.live or args.qemu or args.sample)


def _open(args: argparse.Namespace) -> Target:
    if args.qemu:
        return open_qemu(args.qemu, args.symbols)
    if args.live:
        return open_live(args.symbols)
    if args.sample:
        return open_sample()
    if args.core:
        return open_core(args.core, args.symbols)
    raise UsageError(f"'{args.command}' needs a target: -c CORE, --live, --qemu SOCKET "
                     "or --sample")


def run_one(session: Session, argv: list[str]) -> None:
    """Run one command (argv[0] with its arguments) in *session*."""
    ns = load_all()
    if (cmd := asks_help(argv)) is not None:
        argv = ["help", cmd]
    check_arguments(session.target.prog, argv)
    session.begin(progress="--json" not in argv)
    ns.run(session.target.prog, shlex.join(argv), globals={"session": session})


def run_help(argv: list[str]) -> None:
    """'help [CMD]' or 'CMD ... --help' without a target: help reads no kernel."""
    cmd = asks_help(argv)
    load_all().run(drgn.Program(), shlex.join(["help", cmd] if cmd is not None else argv),
                   globals={})


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.command in ("live", "vmcore"):
            from kvminspect.repl import run_repl

            if args.command == "live":
                live_args = [a for a in args.args if a != "--qemu"]
                if args.qemu or "--qemu" in args.args:  # kvminspect live --qemu SOCKET
                    sock = args.qemu or (live_args[0] if live_args else "")
                    if not sock:
                        raise UsageError("live --qemu needs the QMP socket")
                    target = open_qemu(sock, args.symbols)
                else:
                    target = open_live(args.symbols)
            elif args.args:
                target = open_core(args.args[0], args.symbols)
            else:
                target = open_sample()
            session = Session(target)
            if args.vm:
                session.select(args.vm)
            return run_repl(session)
        if not args.command:
            p.print_usage(sys.stderr)
            print("kvminspect: error: no command (see kvminspect --help)", file=sys.stderr)
            return 2
        if args.command not in dict(load_all().enabled(None)):
            raise UsageError(f"unknown command '{args.command}' (see kvminspect --help)")
        words = [args.command, *args.args]
        if not _has_target(args) and (args.command == "help" or asks_help(words)):
            run_help(words)
            return 0
        if args.command == "diff" and not _has_target(args):  # kvminspect diff A B
            core, rest = split_first_core(args.args)
            target, words = open_core(core, args.symbols), ["diff", *rest]
        else:
            target = _open(args)
        session = Session(target)
        if args.vm:
            session.select(args.vm)
        try:
            run_one(session, words)
        except SystemExit as e:  # rich exits when the reader of a pipe goes away
            if isinstance(e.__context__, BrokenPipeError):
                return 0
            raise
        k = session.target._kernel
        if k is not None and k._vms == [] and k.problems:
            return 1  # nothing could be read: the VM list itself is damaged
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one line, as in the REPL (errors.describe)
        kind, text, status = describe(e, "see kvminspect --help")
        if kind == "error":
            print(f"kvminspect: error: {text}", file=sys.stderr)
            return status
        if os.environ.get("KVMINSPECT_DEBUG"):
            traceback.print_exc()
        print(f"kvminspect: internal error: {text} (KVMINSPECT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
