"""Command line: one-shot commands, scripts (-e, stdin) and the live / vmcore REPLs.

    kvminspect [-c CORE | --live | --qemu SOCK | --sample] [-s PATH]... [--vm ID] COMMAND
               [ARGS] [--json]
    kvminspect -c CORE | --live | --qemu SOCK | --sample   (no command: the REPL, as drgn)
    kvminspect [-c CORE | ...] -e 'CMD; CMD' [-e CMD]... [--json]
    kvminspect [-s PATH]... diff A B [--vm ID] [--json]    (A is the target: -c A diff B)
    kvminspect [-s PATH]... diagnose --jsonl CORE... [-j N] [--vm ID] [--fail-on warning]
                                                           (one JSON line per core: batch)
    kvminspect help [CMD]                                  (no target needed)
    kvminspect live [--qemu SOCK] [-s PATH]...
    kvminspect vmcore [PATH] [-s PATH]...
    kvminspect --completion bash|zsh

Global options (-c, -s, --live, --qemu, --sample, --vm, --json, -e) work in any
position; two targets, or two different --vm, are an error (exit 2).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shlex
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from kvminspect import __version__, options, registry
from kvminspect.errors import KvminspectError, UsageError
from kvminspect.options import SHELLS, split_first_core

if TYPE_CHECKING:
    from kvminspect.session import Session
    from kvminspect.target import Target

REPLS = ("live", "vmcore")
# global options that take a value, by every spelling, and the Globals field they fill
VALUE_OPTIONS = {f: o.dest for o in options.OPTIONS if o.takes_value and not o.first
                 for f in o.flags}
FLAG_OPTIONS = {f: o.dest for o in options.OPTIONS if not o.takes_value and not o.first
                for f in o.flags}
# -h, --help, --version: only before the command (after it, -h is the command's)
FIRST_OPTIONS = {f: o.dest for o in options.OPTIONS if o.first for f in o.flags}


def _commands_epilog() -> str:
    rows = [f"  {name:<8} {cmd.description()}" for name, cmd in registry.entries().items()]
    return ("commands:\n" + "\n".join(rows) + "\n\n"
            "REPLs:\n  kvminspect live              the running kernel (root)\n"
            "  kvminspect live --qemu SOCK  a QEMU-emulated host, live, through QMP\n"
            "  kvminspect vmcore [PATH]     a vmcore or fixture directory "
            "(no PATH: the bundled sample)\n\n"
            "Global options work before or after the command.\n"
            + textwrap.fill(f"Numbers: {registry.NUMBERS_RULE}.", 79) + "\n"
            "'kvminspect diff A B' compares two vmcores of one host (A before, B after).\n"
            "'kvminspect diagnose --jsonl CORE... [-j N]' diagnoses many vmcores, one JSON\n"
            "line each, N worker processes at once.\n"
            "'kvminspect help CMD' shows a command's options.")


def parser() -> argparse.ArgumentParser:
    """The top-level help text (the command line itself is read by split_argv),
    from the table of global options (kvminspect.options)."""
    p = argparse.ArgumentParser(
        prog="kvminspect",
        usage=options.usage(),
        description="Show what KVM's MMU is doing in a Linux host kernel: "
        "VMs, vCPUs, roots, shadow pages, the unsync walk.",
        epilog=_commands_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    for o in options.OPTIONS:
        if o.dest == "version":
            p.add_argument(*o.flags, action="version", version=f"kvminspect {__version__}",
                           help=o.help)
        elif o.dest == "help":
            p.add_argument(*o.flags, action="help", help=o.help)
        elif o.takes_value:
            p.add_argument(*o.flags, metavar=o.metavar, help=o.help,
                           choices=o.choices or None)
        else:
            p.add_argument(*o.flags, action="store_true", help=o.help)
    return p


@dataclass
class Globals:
    """The command line, global options apart from the command's words."""

    core: list[str] = field(default_factory=list)
    symbols: list[str] = field(default_factory=list)
    qemu: list[str] = field(default_factory=list)
    vm: list[str] = field(default_factory=list)
    exec: list[str] = field(default_factory=list)
    completion: list[str] = field(default_factory=list)
    live: bool = False
    sample: bool = False
    json: bool = False
    help: bool = False
    version: bool = False
    words: list[str] = field(default_factory=list)  # COMMAND ARGS (or live / vmcore [PATH])


def _option(arg: str) -> tuple[str, str | None]:
    """'--core=X' -> ('--core', 'X'), '-cX' -> ('-c', 'X'), else (arg, None)."""
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
        return name, (value if eq else None)
    if len(arg) > 2 and arg[:2] in VALUE_OPTIONS:
        return arg[:2], arg[2:]
    return arg, None


def split_argv(argv: list[str]) -> Globals:
    """The global options, wherever they are, and the remaining words.

    Before the command only global options (and -h, --version) are allowed;
    after it the other words are the command's. '--' ends the global options.
    """
    g = Globals()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            g.words += argv[i:]
            break
        name, value = _option(arg)
        if name in VALUE_OPTIONS:
            if value is None:
                if i >= len(argv):
                    raise UsageError(f"{name} needs a value")
                value, i = argv[i], i + 1
            getattr(g, VALUE_OPTIONS[name]).append(value)
        elif name in FLAG_OPTIONS and value is None:
            setattr(g, FLAG_OPTIONS[name], True)
        elif not g.words and arg in FIRST_OPTIONS:
            setattr(g, FIRST_OPTIONS[arg], True)
        elif not g.words and arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg} (see kvminspect --help)")
        else:
            g.words.append(arg)
    return g


def _one(values: list[str], option: str) -> str | None:
    """The value of an option given once (or several times alike); UsageError on a conflict."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1:
        raise UsageError(f"conflicting options: {option} {distinct[0]} and {option} "
                         f"{distinct[1]}")
    return distinct[0] if distinct else None


def target_source(g: Globals) -> tuple[str, str | None] | None:
    """The target the global options name: (kind, value) with kind core, live,
    qemu or sample; None if none. Two different ones are a UsageError."""
    given: list[tuple[str, tuple[str, str | None]]] = []
    for o in options.targets():  # -c, --live, --qemu, --sample
        if o.takes_value:
            value = _one(getattr(g, o.dest), o.flags[0])
            if value is not None:
                given.append((f"{o.flags[0]} {value}", (o.dest, value)))
        elif getattr(g, o.dest):
            given.append((o.flags[0], (o.dest, None)))
    if len(given) > 1:
        raise UsageError(f"conflicting targets: {given[0][0]} and {given[1][0]}")
    return given[0][1] if given else None


def repl_source(g: Globals, source: tuple[str, str | None] | None
                ) -> tuple[str, str | None]:
    """The target of 'live' or 'vmcore [PATH]' together with the global options."""
    mode, args = g.words[0], g.words[1:]
    if any(a.startswith("-") and a != "-" for a in args):
        bad = next(a for a in args if a.startswith("-"))
        raise UsageError(f"{mode}: unknown option {bad} (see kvminspect --help)")
    if mode == "live":
        if args:
            raise UsageError(f"live takes no argument: {args[0]} (a QMP socket: "
                             "live --qemu SOCK)")
        if source is not None and source[0] not in ("live", "qemu"):
            raise UsageError(f"conflicting targets: live and {_label(source)}")
        return source or ("live", None)
    if len(args) > 1:
        raise UsageError(f"vmcore takes one PATH, not {len(args)}: {shlex.join(args)}")
    if args:
        if source is not None and source != ("core", args[0]):
            raise UsageError(f"conflicting targets: vmcore {args[0]} and {_label(source)}")
        return ("core", args[0])
    if source is not None and source[0] not in ("core", "sample"):
        raise UsageError(f"conflicting targets: vmcore and {_label(source)}")
    return source or ("sample", None)


def _label(source: tuple[str, str | None]) -> str:
    kind, value = source
    flag = next(o.flags[0] for o in options.targets() if o.dest == kind)
    return flag if value is None else f"{flag} {value}"


def open_source(source: tuple[str, str | None], symbols: list[str]) -> Target:
    """Open the target *source* names (target_source, repl_source)."""
    from kvminspect.target import open_core, open_live, open_qemu, open_sample

    kind, value = source
    if kind == "qemu":
        return open_qemu(value or "", symbols)
    if kind == "live":
        return open_live(symbols)
    if kind == "sample":
        return open_sample(symbols)
    return open_core(value or "", symbols)


def split_commands(text: str) -> list[str]:
    """'CMD; CMD' as its commands: ';' outside quotes separates; empty ones dropped."""
    out: list[str] = []
    cur: list[str] = []
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur))
    return [c.strip() for c in out if c.strip()]


def with_json(line: str) -> str:
    """*line* with --json after its command name (unless it has it): -e ... --json."""
    words = line.split()
    if "--json" in words:
        return line
    return f"{words[0]} --json {line[len(words[0]):].lstrip()}".rstrip()


def run_one(session: Session, argv: list[str]) -> None:
    """Run one command (argv[0] with its arguments) in *session*
    (kvminspect.commands.run_command)."""
    from kvminspect.commands import run_command

    run_command(session, argv)


def run_help(argv: list[str]) -> None:
    """'help [CMD]' or 'CMD ... --help' without a target: help reads no kernel,
    and imports no command (kvminspect.registry knows them)."""
    cmd = registry.asks_help(argv)
    words = ["help", cmd] if cmd is not None else argv
    registry.entries()["help"].check(words[1:])
    registry.show_help(words[1] if len(words) > 1 else None, registry.entries())


def run_script(session: Session, lines: list[str], json: bool) -> int:
    """-e: each command in turn on one load (a failure is one line on stderr and
    the next runs); the exit status is Session.exit_status()."""
    from kvminspect.repl import run_guarded

    for line in lines:
        if not run_guarded(session, with_json(line) if json else line) or session.output_failed:
            break  # 'quit', or the output cannot be written: said once
    return session.exit_status()


def _session(target: Target, vm: str | None) -> Session:
    from kvminspect.session import Session

    session = Session(target)
    if vm is not None:
        session.select(vm)
    return session


def _main(argv: list[str] | None) -> int:
    """main() without the mapping of errors to one line."""
    g = split_argv(sys.argv[1:] if argv is None else argv)
    if g.version:
        print(f"kvminspect {__version__}")
        return 0
    if g.completion:
        from kvminspect.completion import script

        shell = _one(g.completion, "--completion") or ""
        if shell not in SHELLS:
            raise UsageError(f"--completion takes {' or '.join(SHELLS)}, not {shell!r}")
        print(script(shell), end="")
        return 0
    if g.help and not g.words:
        parser().print_help()
        return 0
    source = target_source(g)
    vm = _one(g.vm, "--vm")
    lines = [c for text in g.exec for c in split_commands(text)]
    command = g.words[0] if g.words else None
    if command in REPLS:
        session = _session(open_source(repl_source(g, source), g.symbols), vm)
        if g.exec:
            return run_script(session, lines, g.json)
        if g.json:
            raise UsageError(f"--json is for commands: kvminspect {command} ... -e CMD --json")
        from kvminspect.repl import run_repl

        return run_repl(session)
    if g.exec:
        if command is not None:
            raise UsageError(f"-e runs its own commands: '{command}' as well is ambiguous "
                             "(put it in -e)")
        if not lines:
            raise UsageError("-e has no command")
        if source is None:
            raise UsageError(f"-e needs a target: {options.target_choices()}")
        return run_script(_session(open_source(source, g.symbols), vm), lines, g.json)
    if command is None:
        if source is not None:  # 'kvminspect -c CORE' (--sample, --live, --qemu SOCK): a REPL
            if g.json:
                raise UsageError("--json is for commands: kvminspect -c CORE COMMAND --json "
                                 "(or -e CMD --json)")
            from kvminspect.repl import run_repl

            return run_repl(_session(open_source(source, g.symbols), vm))
        print(parser().format_usage(), end="", file=sys.stderr)
        raise UsageError("no command (see kvminspect --help)")
    entry = registry.entry(command)
    if entry is None:
        raise UsageError(f"unknown command '{command}' (see kvminspect --help)")
    words = g.words + (["--json"] if g.json and "--json" not in g.words else [])
    if command == "help" or registry.asks_help(words):
        run_help(words)  # help reads no kernel: the target is not opened
        return 0
    if vm is not None and entry.options().get("--vm"):
        words, vm = words + ["--vm", vm], None
    if command == "diagnose":  # kvminspect diagnose --jsonl CORE...: a process per core
        from kvminspect import batch

        req = batch.request(words[1:], g.symbols)
        if req is not None:
            if source is not None:
                raise UsageError(f"diagnose --jsonl takes its vmcores as arguments, not "
                                 f"{_label(source)}: {options.BATCH_USAGE}")
            return batch.run(req)
    if command == "diff" and source is None:  # kvminspect diff A B
        core, rest = split_first_core(words[1:])
        source, words = ("core", core), ["diff", *rest]
    entry.check(words[1:])  # a bad argument is said before the target is opened
    if source is None:
        raise UsageError(f"'{command}' needs a target: {options.target_choices()}")
    session = _session(open_source(source, g.symbols), vm)
    session.freeze_graphs = argv is None  # a process of its own (tests call main(list))
    try:
        run_one(session, words)
    except SystemExit as e:  # rich exits when the reader of a pipe goes away
        if isinstance(e.__context__, BrokenPipeError):
            return 0
        raise
    k = session.target.kernel_if_opened
    if k is not None and k.vms_if_read() == [] and k.problems:
        return 1  # nothing could be read: the VM list itself is damaged
    return session.exit_status()


def run() -> NoReturn:
    """The ``kvminspect`` program (and ``python -m kvminspect``): main(), then
    the process ends at once. What a command read stays allocated: at 10^6
    shadow pages, freeing it object by object would take a third of a second
    more. Output is flushed and atexit handlers (the cache's temporary files)
    run first, as at a normal exit."""
    status = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # (a reader gone: main() said so already)
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except SystemExit as e:  # rich exits when the reader of a pipe goes away ('help | true')
        if isinstance(e.__context__, BrokenPipeError):
            return 0
        raise
    except KvminspectError as e:  # as errors.describe says it, without importing drgn
        print(f"kvminspect: error: {e}", file=sys.stderr)
        return e.status
    except Exception as e:  # one line, as in the REPL (errors.describe)
        from kvminspect.errors import describe

        kind, text, status = describe(e, "see kvminspect --help")
        if kind == "error":
            print(f"kvminspect: error: {text}", file=sys.stderr)
            return status
        if os.environ.get("KVMINSPECT_DEBUG"):
            traceback.print_exc()
        print(f"kvminspect: internal error: {text} (KVMINSPECT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


