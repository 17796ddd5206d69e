"""py and drgn: Python on the same program, from kvminspect's REPL.

``py EXPR`` (or statements) runs with ``prog`` (the drgn Program), ``kvm`` (the
selected VM's ``struct kvm *``, else None), ``session`` and drgn's helpers
bound, and prints an expression's value as drgn's REPL does. ``drgn`` runs
drgn's own interactive shell on the same program.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import types
from typing import Any

import drgn
from drgn.commands import ParsedCommand, parse_shell_command

from kvminspect.commands import kvm_command, session_of
from kvminspect.errors import KvminspectError, UsageError
from kvminspect.session import Session


def kvm_object(session: Session) -> drgn.Object | None:
    """The selected VM as a drgn ``struct kvm *``, or None when no VM is selected."""
    vm = session.selected
    if vm is None:
        return None
    return drgn.Object(session.target.prog, "struct kvm *", vm.addr)


def bindings(session: Session) -> dict[str, Any]:
    """The names py and drgn's shell see: drgn's defaults, prog, kvm and session."""
    from drgn.cli import default_globals

    return {**default_globals(session.target.prog), "kvm": kvm_object(session),
            "session": session}


def show(value: Any) -> None:
    """Print an expression statement's value as drgn's REPL does (sys.displayhook):
    a drgn Object formatted to the terminal's width, a str as is, else repr()."""
    if value is None:
        return
    if isinstance(value, drgn.Object):
        try:
            text = value.format_(columns=shutil.get_terminal_size((0, 0)).columns)
        except drgn.FaultError:
            text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = repr(value)
    print(text)


def run_python(session: Session, code: types.CodeType) -> None:
    """exec *code* in the session's Python namespace (kept between py lines);
    an exception is one kvminspect error line naming its type."""
    names = session.py_globals
    if not names:
        names.update(bindings(session))
    names["kvm"] = kvm_object(session)  # follows 'vm ID'
    names["session"] = session
    old = sys.displayhook
    sys.displayhook = show
    try:
        exec(code, names)
    except (KvminspectError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise KvminspectError(f"py: {type(e).__name__}: {e}") from e
    finally:
        sys.displayhook = old


PyCode = types.CodeType | SyntaxError | None


def parse_py(source: str) -> ParsedCommand[PyCode]:
    """py's words: the Python code, then any '| shell' pipe and '> file' redirects.

    As drgn's own py command splits them: the code ends at the first '|', '<'
    or '>' before which it compiles; with none, all of it is the code (a
    SyntaxError is the command's to raise). The code is compiled as a "single"
    statement, so an expression's value is printed.
    """
    for match in re.finditer(r"[|<>]", source):
        code_text = source[:match.start()]
        try:
            code = None if code_text.isspace() or not code_text else compile(
                code_text, "<input>", "single")
        except SyntaxError:
            continue
        parsed = parse_shell_command(source[match.start():])
        if parsed.args:
            raise SyntaxError("py does not support arguments after redirections")
        return dataclasses.replace(parsed, args=code)  # type: ignore[arg-type,return-value]
    if not source or source.isspace():
        return ParsedCommand(None)
    try:
        return ParsedCommand(compile(source, "<input>", "single"))
    except SyntaxError as e:
        return ParsedCommand(e)


@kvm_command(vm=False, json=False, parse=parse_py, usage="**py** *code*")
def _cmd_py(prog: drgn.Program, name: str, code: PyCode, **kwargs: Any) -> None:
    """evaluate Python with prog, kvm (the selected struct kvm *) and session

    Run Python code (an expression's value is printed as drgn's REPL prints
    it) with prog (the drgn Program), kvm (the selected VM's struct kvm *, or
    None), session and drgn's helpers bound. Names assigned stay for the next
    py line. A pipe or redirect after the code applies to its output:
    py kvm.nr_memslot_pages | cat. An exception is one error line.
    """
    if code is None:
        raise UsageError("py needs Python code, e.g. 'py kvm.online_vcpus'")
    if isinstance(code, SyntaxError):
        raise code
    run_python(session_of(kwargs), code)


@kvm_command(vm=False, json=False)
def _cmd_drgn(prog: drgn.Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """drgn's interactive shell on this program (kvm and session bound)

    Runs drgn's own REPL (drgn.cli.run_interactive) on the program kvminspect
    opened, with kvm (the selected VM's struct kvm *, or None) and session bound
    besides drgn's usual names; leave it with Ctrl-D to come back here.
    """
    if prog.config.get("outer_repl"):
        raise UsageError("already inside drgn's shell: run Python there directly")
    import drgn.cli

    s = session_of(kwargs)

    def add_names(names: dict[str, Any]) -> dict[str, Any]:
        return {**names, "kvm": kvm_object(s), "session": s}

    def banner(text: str) -> str:
        return text + "\n>>> kvm, session  # from kvminspect; Ctrl-D returns to it"

    drgn.cli.run_interactive(prog, banner_func=banner, globals_func=add_names)
