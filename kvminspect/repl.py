"""The interactive REPL of ``kvminspect live`` and ``kvminspect vmcore``.

Each line is one drgn command of the kvminspect namespace (with ``| shell``
pipes and ``> file`` redirects). Errors are one line on stderr and the REPL
goes on; Ctrl-C cancels the running command (or clears the line at the
prompt), Ctrl-D, ``quit`` or ``exit`` leave.

On a terminal the prompt is prompt_toolkit's, with completion (command names,
options, VM ids, shadow-page addresses, redirect paths) and persistent history
(``$KVMINSPECT_HISTORY``, else ``$XDG_STATE_HOME/kvminspect/history``, else
``~/.local/state/kvminspect/history``). When stdin is not a terminal and no
input is given, lines are read plainly from stdin, so a script can be piped
in; the banner then goes to stderr to keep stdout clean.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import drgn
from drgn.commands import (
    CommandExitStatusError,
    CommandNotFoundError,
)
from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output

from kvminspect import registry
from kvminspect.commands import NAMESPACE, asks_help, check_arguments
from kvminspect.errors import KvminspectError, UsageError, describe, is_output_error
from kvminspect.model import VM
from kvminspect.session import Session

EXIT_WORDS = ("quit", "exit")
PAGER_DEFAULT = "less -FRX"  # as crash: quit at one screen, colours, no screen clear
# commands that stream (a line per sample, a shell): never paged
UNPAGED = ("watch", "rate", "py", "guest")
# commands whose positional argument is a shadow page (struct kvm_mmu_page address)
SP_COMMANDS = ("sp", "tree", "unsync")
SP_METAVARS = ("SP", "ADDR")
# commands whose positional argument is a guest address (walk ADDR)
ADDR_COMMANDS = ("walk",)
# commands whose positional argument is a file (diff B: a vmcore or fixture directory)
FILE_COMMANDS = ("diff",)
FILE_METAVARS = ("OUT", "FILE")  # guest-core OUT, export FILE: a path to write


# -- history ------------------------------------------------------------------


def history_path() -> Path:
    """Where the REPL keeps its history: $KVMINSPECT_HISTORY, else the XDG state dir."""
    override = os.environ.get("KVMINSPECT_HISTORY")
    if override:
        return Path(override).expanduser()
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "kvminspect" / "history"


class QuietFileHistory(FileHistory):
    """FileHistory that stops writing (keeping entries in memory) if the file fails."""

    def load_history_strings(self) -> Iterable[str]:
        """The stored entries, newest first; none if the file cannot be read."""
        try:
            return list(super().load_history_strings())
        except OSError:
            return []

    def store_string(self, string: str) -> None:
        """Append *string* to the file; a write error is ignored."""
        try:
            super().store_string(string)
        except OSError:
            pass


def open_history(path: Path | None = None) -> History:
    """A history persisted at *path* (default history_path()), else an in-memory one."""
    path = path or history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    except OSError:
        return InMemoryHistory()
    return QuietFileHistory(str(path))


# -- running one line ---------------------------------------------------------


def _err(message: str, newline: bool = False) -> None:
    """One line on stderr, prefixed with the program name (on a fresh line if *newline*)."""
    print(f"{chr(10) if newline else ''}kvminspect: {message}", file=sys.stderr, flush=True)


def is_tty(f: TextIO | None) -> bool:
    """Whether *f* is a terminal (False for closed or fd-less files)."""
    try:
        return f is not None and f.isatty()
    except (ValueError, OSError):
        return False


def report_error(e: BaseException) -> None:
    """Print what went wrong as one line (a traceback only with KVMINSPECT_DEBUG)."""
    if isinstance(e, CommandExitStatusError) and e.exit_status in (-signal.SIGINT, 130):
        _err("interrupted", newline=is_tty(sys.stderr))
        return
    kind, text, _ = describe(e)
    if kind == "error":
        _err(f"error: {text}")
        return
    if os.environ.get("KVMINSPECT_DEBUG"):
        traceback.print_exception(e)
    _err(f"internal error: {text} (KVMINSPECT_DEBUG=1 shows the traceback)")


def _flush_stdout() -> None:
    """Flush what a command printed; a reader that went away is not an error."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _commands(prog: drgn.Program) -> dict[str, Any]:
    """The enabled commands by name, sorted."""
    return dict(sorted(NAMESPACE.enabled(prog)))


def _builtin_help(prog: drgn.Program) -> None:
    """A command list for when no 'help' command is registered."""
    for name, cmd in _commands(prog).items():
        print(f"  {name:<8} {cmd.description()}")
    print("\n'quit', 'exit' or Ctrl-D leave.")


def rewrite(prog: drgn.Program, line: str) -> str:
    """'CMD ... -h' / '--help' becomes 'help CMD' (drgn commands have no -h)."""
    cmd = asks_help(line.split("|", 1)[0].split())
    if cmd is not None and "help" in _commands(prog):
        return f"help {cmd}"
    return line


def _failed(session: Session, e: BaseException) -> None:
    """report_error, and the first failure's exit status kept in *session*."""
    if session.output_failed and is_output_error(e):
        return  # said once: the output is gone
    report_error(e)
    session.failed = session.failed or describe(e)[2]
    session.output_failed = session.output_failed or is_output_error(e)


# -- the pager ----------------------------------------------------------------


class _Screen(io.StringIO):
    """What a paged command prints, kept until it ends; a terminal to the
    renderers (colours, the terminal's width), as the real stdout is."""

    def isatty(self) -> bool:
        return True


def pager_command() -> list[str]:
    """$PAGER split as a shell would, else PAGER_DEFAULT."""
    try:
        words = shlex.split(os.environ.get("PAGER", ""))
    except ValueError:
        words = []
    return words or shlex.split(PAGER_DEFAULT)


def command_part(line: str) -> str:
    """The words of a REPL line before its pipe or redirect ('cmd | sh',
    'cmd > f', 'cmd 2> f'): the command and its arguments."""
    return re.split(r"\s\d+>|[|>]", line, maxsplit=1)[0]


def paged(session: Session, text: str) -> bool:
    """Whether REPL line *text* goes through the pager, as crash's does: the
    REPL's pager is on, stdout is a terminal, and the line neither pipes,
    redirects ('cmd | shell', 'cmd > file') nor streams (UNPAGED)."""
    words = text.split()
    return (session.interactive and session.paging and is_tty(sys.stdout) and bool(words)
            and words[0] not in UNPAGED and command_part(text) == text)


def page(out: str) -> None:
    """Print *out*: through pager_command() when it is longer than the screen,
    else (or when the pager cannot start, said as a warning) straight to stdout."""
    rows = shutil.get_terminal_size((80, 24)).lines
    if out.count("\n") < rows - 1:
        sys.stdout.write(out)
        return
    cmd = pager_command()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, text=True)
    except OSError as e:
        _err(f"warning: pager '{shlex.join(cmd)}' did not start ({e.strerror}); "
             "'pager off' stops trying")
        sys.stdout.write(out)
        return
    try:
        assert proc.stdin is not None
        proc.stdin.write(out)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the pager was left before the end: the reader's choice
    while True:
        try:
            proc.wait()
            return
        except KeyboardInterrupt:
            continue  # Ctrl-C belongs to the pager while it runs


def pager_builtin(session: Session, word: str | None) -> None:
    """The REPL's 'pager' word: 'pager on', 'pager off', or 'pager' for the state."""
    if word in ("on", "off"):
        session.paging = word == "on"
    elif word is not None:
        raise UsageError("usage: pager [on|off]")
    state = f"on ({shlex.join(pager_command())})" if session.paging else "off"
    print(f"pager {state}")


def _checked(session: Session, line: str) -> bool:
    """Check the arguments of REPL *line* (rewritten) as the one-shot CLI does
    (commands.check_arguments): a bad one is one line, "CMD: what is wrong;
    usage: ...", not argparse's usage line and error line; False then. A line
    whose words do not split (an open quote) is left to drgn's parser."""
    try:
        argv = shlex.split(command_part(line))
    except ValueError:
        return True
    if not argv:
        return True
    try:
        check_arguments(session.target.prog, argv)
    except UsageError as e:
        _failed(session, e)
        return False
    except CommandNotFoundError:
        pass  # drgn's namespace says so, with its suggestions
    return True


def _run_command(session: Session, text: str) -> None:
    """One command line through drgn's namespace, its arguments checked first,
    its output paged when wanted."""
    prog = session.target.prog
    line = rewrite(prog, text)
    if not _checked(session, line):
        return
    to_pager = paged(session, text)
    real = sys.stdout
    if to_pager:
        sys.stdout = screen = _Screen()
    try:
        session.begin(progress="--json" not in text.split())
        NAMESPACE.run(prog, line, globals={"session": session},
                      onerror=lambda e: _failed(session, e))
    finally:
        if to_pager:
            sys.stdout = real
            page(screen.getvalue())


def run_line(session: Session, line: str) -> bool:
    """Run one REPL line; False when it asks to leave. Never raises (but Ctrl-C).
    A failure is reported and recorded (Session.failed)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return True
    if text in EXIT_WORDS:
        return False
    prog = session.target.prog
    if text == "help" and "help" not in _commands(prog):
        _builtin_help(prog)
        return True
    words = text.split()
    if words[0] == "pager" and len(words) <= 2:
        try:
            pager_builtin(session, words[1] if len(words) > 1 else None)
        except UsageError as e:
            _failed(session, e)
        return True
    try:
        _run_command(session, text)
    except Exception as e:  # run() hands errors to onerror; this is a last resort
        _failed(session, e)
    except SystemExit:
        pass  # rich exits when a '| head' stops reading: that ends the command, not the REPL
    finally:
        _flush_stdout()
    return True


def run_guarded(session: Session, line: str) -> bool:
    """run_line, with Ctrl-C cancelling the command instead of the REPL."""
    try:
        return run_line(session, line)
    except KeyboardInterrupt:
        _flush_stdout()
        _err("interrupted", newline=is_tty(sys.stderr))  # after the terminal's "^C"
        session.failed = session.failed or 130
        return True


# -- completion ---------------------------------------------------------------


def _options(name: str, cmd: Any) -> dict[str, bool]:
    """Option string -> whether it takes a value, for command *name*: from the
    registry, else (a command kvminspect did not register) from its usage line."""
    entry = registry.entry(name)
    if entry is not None:
        return entry.options()
    usage = cmd.format_usage()
    return {m.group(1): bool(m.group(2))
            for m in re.finditer(r"(?<![\w-])(--?[\w][\w-]*)(?:[ =]([A-Z][A-Z_]*))?", usage)}


def _positionals(name: str, cmd: Any) -> list[str]:
    """The metavars (or names) of a command's positional arguments, in order."""
    entry = registry.entry(name)
    if entry is not None:
        return entry.positionals()
    usage = re.sub(r"\[?--?[\w-]+(?: [A-Z][A-Z_]*)?\]?", " ", cmd.format_usage())
    return re.findall(r"\b[A-Z][A-Z_]*\b", usage)


def _split(text: str) -> tuple[list[str], str]:
    """The words before the cursor's word, and the (possibly empty) word being typed."""
    words = text.split()
    if not words or text[-1:].isspace():
        return words, ""
    return words[:-1], words[-1]


def _matching(word: str, candidates: Iterable[tuple[str, str]]) -> Iterator[Completion]:
    """Completions of *word* from (text, meta) pairs; hex addresses match without 0x."""
    for text, meta in candidates:
        bare = text[2:] if text.startswith("0x") else None
        if text.startswith(word) or (bare is not None and word and bare.startswith(word)):
            yield Completion(text, start_position=-len(word), display_meta=meta)


class ReplCompleter(Completer):
    """Tab completion for the REPL: never raises. Completing a shadow-page address
    builds that VM's graph once (the session keeps it); everything else is cheap."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterator[Completion]:
        """Completions at the cursor (nothing on any error)."""
        try:
            yield from self._complete(document, complete_event)
        except Exception:
            return

    def _complete(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        """Dispatch on the words before the cursor: command, option, value or argument."""
        text = document.text_before_cursor
        if "|" in text:
            return  # a shell pipeline: not ours
        words, word = _split(text)
        if word.startswith(">") or (words and words[-1] in (">", ">>")):
            yield from self._complete_path(word.lstrip(">"), event)
            return
        if not words:
            yield from self._complete_commands(word)
            return
        if words == ["pager"]:  # the REPL's own word, not a command
            yield from _matching(word, [("on", "page long output"), ("off", "never page")])
            return
        try:
            cmd = NAMESPACE.lookup(self.session.target.prog, words[0])
        except CommandNotFoundError:
            return
        options = _options(words[0], cmd)
        if len(words) > 1 and options.get(words[-1]):
            if words[-1] == "--vm":
                yield from _matching(word, self._vm_ids(all_=False))
            elif words[-1] == "--root":  # walk --root SP
                yield from _matching(word, self._sp_addrs(words))
            return
        if word.startswith("-"):
            used = set(words[1:])
            yield from _matching(word, ((o, "") for o in options if o not in used))
            return
        yield from self._complete_positional(words, word, cmd, options, event)

    def _complete_path(self, word: str, event: CompleteEvent) -> Iterator[Completion]:
        """File names for a '> FILE' redirect."""
        yield from self._paths.get_completions(Document(word, len(word)), event)

    def _complete_commands(self, word: str) -> Iterator[Completion]:
        """Command names (with their description), then the REPL's words: pager,
        quit, exit."""
        cmds = _commands(self.session.target.prog)
        pairs = [(n, c.description()) for n, c in cmds.items()]
        words = [("pager", "long output through $PAGER: pager on|off")]
        yield from _matching(word, pairs + words + [(w, "leave") for w in EXIT_WORDS])

    def _complete_positional(self, words: list[str], word: str, cmd: Any,
                             options: dict[str, bool], event: CompleteEvent
                             ) -> Iterator[Completion]:
        """The positional argument being typed: VM id, shadow page, command name or
        (diff's B) a file."""
        given, skip = 0, False
        for w in words[1:]:
            if skip:
                skip = False
            elif w.startswith("-"):
                skip = options.get(w, False)
            else:
                given += 1
        positionals = _positionals(words[0], cmd)
        if given >= len(positionals):
            return
        metavar, name = positionals[given], words[0]
        if name in ADDR_COMMANDS:
            return  # a guest address: nothing to offer
        if name in SP_COMMANDS or metavar in SP_METAVARS:
            yield from _matching(word, self._sp_addrs(words))
        elif name == "vm" or metavar == "ID":
            yield from _matching(word, self._vm_ids(all_=name == "vm"))
        elif name == "help" or metavar == "CMD":
            yield from self._complete_commands(word)
        elif name in FILE_COMMANDS or metavar in FILE_METAVARS:
            yield from self._complete_path(word, event)

    def _vm_ids(self, all_: bool) -> list[tuple[str, str]]:
        """VM indexes and pid:PID forms (and 'all' for the vm command); a pid
        that owns two VMs is not offered (it is ambiguous: an error)."""
        out = []
        vms = self.session.kernel.vms()
        pids = Counter(vm.pid for vm in vms)
        for vm in vms:
            meta = f"pid {vm.pid} {vm.comm if isinstance(vm.comm, str) else '?'} {vm.mmu}"
            out.append((str(vm.index), meta))
            if pids[vm.pid] == 1:
                out.append((f"pid:{vm.pid}", f"VM {vm.index}"))
        if all_:
            out.append(("all", "clear the selection"))
        return out

    def _target_vms(self, words: list[str]) -> list[VM]:
        """The VMs an argument refers to: --vm ID on the line, else the selected, else all."""
        if "--vm" in words[:-1]:
            ident = words[words.index("--vm") + 1]
            try:
                return [self.session.kernel.vm_by_id(ident)]
            except KvminspectError:
                return []
        return self.session.vms()

    def _sp_addrs(self, words: list[str]) -> list[tuple[str, str]]:
        """Shadow-page addresses of the target VMs (graphs are cached by the session)."""
        out = []
        for vm in self._target_vms(words):
            g = self.session.graph(vm)
            for sp in g.pages():  # roots first, then by level and gfn
                root = " root" if sp.addr in g.roots else ""
                out.append((hex(sp.addr), f"L{sp.level} gfn {sp.gfn:#x}{root}"))
        return out


# -- the loop -----------------------------------------------------------------


def banner(session: Session) -> str:
    """The one-line greeting: target, kernel release and how many VMs."""
    t = session.target
    try:
        n = len(session.kernel.vms())
        vms = f"{n} VM" if n == 1 else f"{n} VMs"
    except Exception as e:  # the greeting must not stop the REPL; commands say more
        vms = f"VMs unreadable ({describe(e)[1]})"
    return (f"kvminspect on {t.name} ({t.release or 'unknown release'}): {vms}; "
            "'help' lists commands, Ctrl-D exits")


def _run_plain(session: Session, stdin: TextIO) -> int:
    """Lines from a non-terminal stdin, no prompt, to the end of input (or quit):
    the exit status is Session.exit_status() (non-zero if a line failed)."""
    print(banner(session), file=sys.stderr)
    while True:
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            return 130
        if not line or not run_guarded(session, line) or session.output_failed:
            return session.exit_status()


def make_prompt(session: Session, input: Input | None = None,
                output: Output | None = None) -> PromptSession[str]:
    """The prompt_toolkit session: history, completion, suggestions from history."""
    return PromptSession(
        history=open_history(),
        completer=ReplCompleter(session),
        complete_while_typing=False,
        auto_suggest=AutoSuggestFromHistory(),
        enable_history_search=False,
        input=input,
        output=output,
    )


def run_repl(session: Session, *, input: Input | None = None,
             output: Output | None = None) -> int:
    """Read and run commands until Ctrl-D, 'quit' or 'exit'; the exit status (0)."""
    session.interactive = True
    if input is None and not is_tty(sys.stdin):
        return _run_plain(session, sys.stdin)
    prompt = make_prompt(session, input, output)
    print(banner(session), flush=True)
    while True:
        try:
            line = prompt.prompt(session.prompt())
        except KeyboardInterrupt:
            continue  # Ctrl-C at the prompt: the line is dropped
        except EOFError:
            print(flush=True)
            return 0
        if not run_guarded(session, line):
            return 0
