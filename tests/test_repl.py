"""The REPL, driven through prompt_toolkit pipe input against a real vmcore fixture."""

from __future__ import annotations

import argparse
import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from drgn import Program
from drgn.commands import CommandNamespace, CommandNotFoundError, command
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output.plain_text import PlainTextOutput

from kvminspect.commands import NAMESPACE, load_all
from kvminspect.errors import LookupFailed, describe
from kvminspect.repl import (
    QuietFileHistory,
    ReplCompleter,
    history_path,
    open_history,
    run_repl,
)
from kvminspect.session import Session
from tests.conftest import open_fixture

FIXTURE = "6.1-shadow"
CTRL_C, CTRL_D, ENTER, UP = "\x03", "\x04", "\r", "\x1b[A"


@pytest.fixture(autouse=True)
def history_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own history file (in a directory that does not exist yet)."""
    path = tmp_path / "state" / "history"
    monkeypatch.setenv("KVMINSPECT_HISTORY", str(path))
    return path


@pytest.fixture
def session() -> Session:
    load_all()
    return Session(open_fixture(FIXTURE))


def drive(session: Session, *lines: str, end: str = CTRL_D,
          later: str = "") -> tuple[int, str]:
    """Type *lines* (each ended by Enter) then *end* into the REPL.

    *later* is typed 0.3 s after the rest, when the REPL waits at a prompt that
    has loaded its history (typed ahead, keys can beat the history load).
    Returns the exit status and what prompt_toolkit rendered (prompts and echo).
    """
    screen = io.StringIO()
    with create_pipe_input() as keys:
        keys.send_text("".join(line + ENTER for line in lines) + ("" if later else end))
        timer = threading.Timer(0.3, keys.send_text, [later + end])
        if later:
            timer.start()
        try:
            status = run_repl(session, input=keys, output=PlainTextOutput(screen))
        finally:
            timer.cancel()
    return status, screen.getvalue()


def no_traceback(*texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t and "internal error" not in t, t


def json_docs(text: str) -> list[dict]:
    """The JSON documents printed one after the other in *text* (and nothing else)."""
    decoder, docs, pos = json.JSONDecoder(), [], 0
    while text[pos:].strip():
        pos += len(text[pos:]) - len(text[pos:].lstrip())
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)
    return docs


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("kvminspect: ")]


# -- running commands ---------------------------------------------------------


def test_banner_commands_and_ctrl_d(session: Session, capfd: pytest.CaptureFixture) -> None:
    status, screen = drive(session, "vms", "", "   ", "# a comment")
    out, err = capfd.readouterr()
    assert status == 0
    first = out.splitlines()[0]
    assert first == ("kvminspect on 6.1-shadow (6.1.0-56-amd64): 1 VM; "
                     "'help' lists commands, Ctrl-D exits")
    assert "COMM" in out and " vmm " in out and "shadow" in out
    assert "kvminspect(6.1-shadow)> " in screen
    assert err == ""


def test_json_pipe_and_redirect(session: Session, tmp_path: Path,
                                capfd: pytest.CaptureFixture) -> None:
    target = tmp_path / "roots.txt"
    status, _ = drive(session, "roots --json", "vms | grep -c vmm", f"roots > {target}")
    out, err = capfd.readouterr()
    assert status == 0 and err == ""
    body = out.split("\n", 1)[1]  # after the banner
    doc, end = json.JSONDecoder().raw_decode(body)
    assert doc["errors"] == [] and len(doc["vms"][0]["vcpus"]) == 4
    assert body[end:].split() == ["1"]  # grep -c counted the VM row; roots went to the file
    text = target.read_text()
    assert text.startswith("VM 0  kvm 0x") and "vcpu[3]" in text and "prev_roots[0]" in text


def test_errors_are_one_line_and_the_repl_goes_on(session: Session,
                                                  capfd: pytest.CaptureFixture) -> None:
    status, _ = drive(session, "bogus", "roots --bogus", "sp 0x1234", "roots > /nonexistent/x",
                      "| grep x", "roots 3> x", "vms --json")
    out, err = capfd.readouterr()
    assert status == 0
    no_traceback(out, err)
    assert error_lines(err) == [
        "kvminspect: error: unknown command 'bogus' (try help)",
        "kvminspect: error: roots: unrecognized arguments: --bogus; "
        "usage: roots [--drgn] [--vm ID] [--json]",  # one line, as the CLI's
        "kvminspect: error: 0x1234 is not a shadow page of this VM",
        "kvminspect: error: /nonexistent/x: No such file or directory",
        "kvminspect: error: syntax error: expected command name",
        "kvminspect: error: redirecting output fd 3 is not supported",
    ]
    assert json.loads(out.split("\n", 1)[1])["vms"][0]["pid"] == 97  # still running


def test_reader_that_stops_early(session: Session, capfd: pytest.CaptureFixture) -> None:
    """'| head' closing the pipe ends that command only (rich raises SystemExit on EPIPE)."""
    status, _ = drive(session, "tree | head -1", "tree --json | head -c 1", "vms --json")
    out, err = capfd.readouterr()
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[1].startswith("VM 0  kvm 0x") and len(lines[1:]) > 2
    assert lines[2] == "{{"  # head -c 1's "{" (no newline), then the REPL went on: vms --json
    assert '"comm": "vmm"' in out


def test_failed_pipeline(session: Session, capfd: pytest.CaptureFixture) -> None:
    drive(session, "vms | grep no-such-vm")
    _, err = capfd.readouterr()
    assert error_lines(err) == ["kvminspect: error: 'grep no-such-vm' exited with status 1"]


def test_vm_selects_and_changes_the_prompt(session: Session,
                                           capfd: pytest.CaptureFixture) -> None:
    if "vm" not in dict(NAMESPACE.enabled(None)):
        pytest.skip("the 'vm' command is not registered yet")
    status, screen = drive(session, "vm 0", "vm 9", "vm all")
    out, err = capfd.readouterr()
    assert status == 0
    assert "VM 0: kvm 0x" in out
    assert "kvminspect(6.1-shadow vm0)> vm 9" in screen
    assert "kvminspect(6.1-shadow vm0)> vm all" in screen  # vm 9 failed: 0 still selected
    assert error_lines(err) == ["kvminspect: error: no VM '9' (have 1)"]
    assert session.selected is None


def test_quit_and_exit(session: Session, capfd: pytest.CaptureFixture) -> None:
    for word in ("quit", "exit"):
        status, _ = drive(session, word, "bogus", end="")
        _, err = capfd.readouterr()
        assert status == 0 and err == ""  # left before 'bogus'


def test_help(session: Session, capfd: pytest.CaptureFixture) -> None:
    drive(session, "help", "roots --help")
    out, err = capfd.readouterr()
    no_traceback(out, err)
    assert "roots" in out and "vms" in out
    assert "usage: roots [--drgn] [--vm ID] [--json]" in out  # --help became 'help roots'


def test_help_without_a_help_command(session: Session, monkeypatch: pytest.MonkeyPatch,
                                     capfd: pytest.CaptureFixture) -> None:
    monkeypatch.delitem(NAMESPACE.commands, "help")
    drive(session, "help", "help roots")
    out, err = capfd.readouterr()
    assert "  roots    per vCPU" in out and "Ctrl-D" in out  # the REPL's own list
    assert error_lines(err) == ["kvminspect: error: unknown command 'help' (try help)"]


def test_ctrl_c_at_the_prompt_drops_the_line(session: Session,
                                            capfd: pytest.CaptureFixture) -> None:
    status, _ = drive(session, "bogus" + CTRL_C + "vms --json")
    out, err = capfd.readouterr()
    assert status == 0 and err == ""
    assert json.loads(out.split("\n", 1)[1])["vms"][0]["comm"] == "vmm"


@pytest.fixture
def interrupting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 'ctrlc' command that behaves as if Ctrl-C was pressed while it ran."""
    scratch = CommandNamespace(func_name_prefix="_cmd_")

    @command(description="raise KeyboardInterrupt", namespace=scratch)
    def _cmd_ctrlc(prog: Program, name: str, args: argparse.Namespace, **kw: Any) -> None:
        print("working...")
        raise KeyboardInterrupt

    @command(description="fail with a bug", namespace=scratch)
    def _cmd_crash(prog: Program, name: str, args: argparse.Namespace, **kw: Any) -> None:
        raise ZeroDivisionError("division by zero")

    for name, cmd in scratch.enabled(None):
        monkeypatch.setitem(NAMESPACE.commands, name, cmd)


def test_ctrl_c_cancels_the_running_command(session: Session, interrupting: None,
                                            capfd: pytest.CaptureFixture) -> None:
    status, _ = drive(session, "ctrlc", "crash", "ctrlc > /dev/null", "vms --json")
    out, err = capfd.readouterr()
    assert status == 0
    assert out.count("working...") == 1  # the second went to /dev/null
    assert error_lines(err) == [
        "kvminspect: interrupted",
        "kvminspect: internal error: ZeroDivisionError: division by zero "
        "(KVMINSPECT_DEBUG=1 shows the traceback)",
        "kvminspect: interrupted",
    ]
    assert "Traceback" not in err
    assert '"comm": "vmm"' in out  # the REPL went on


def test_error_text() -> None:
    """One mapping (errors.describe) for the REPL and the CLI, exit status included."""
    assert describe(CommandNotFoundError("x")) == ("error", "unknown command 'x' (try help)", 2)
    assert describe(LookupFailed("no VM '3'")) == ("error", "no VM '3'", 1)
    assert describe(KeyError("k")) == ("internal", "KeyError: 'k'", 1)


def test_piped_stdin_without_a_terminal(session: Session, monkeypatch: pytest.MonkeyPatch,
                                        capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("vms --json\nbogus\nroots --json\n"))
    assert run_repl(session) == 2  # a line failed (unknown command: a usage error)
    out, err = capfd.readouterr()
    # nothing but the two documents on stdout
    keys = ["schema_version", "command", "vms", "errors", "warnings"]
    assert [list(d) for d in json_docs(out)] == [keys, keys]
    assert err.startswith("kvminspect on 6.1-shadow")  # the banner stays off stdout
    assert error_lines(err)[-1] == "kvminspect: error: unknown command 'bogus' (try help)"


# -- history ------------------------------------------------------------------


def test_history_persists(session: Session, history_file: Path,
                          capfd: pytest.CaptureFixture) -> None:
    drive(session, "vms --json", "roots --json")
    saved = [line for line in history_file.read_text().splitlines() if line.startswith("+")]
    assert saved == ["+vms --json", "+roots --json"]
    capfd.readouterr()
    drive(session, later=UP + UP + ENTER)  # a new REPL recalls "vms --json" from the file
    out, _ = capfd.readouterr()
    assert list(json.loads(out.split("\n", 1)[1])) == [
        "schema_version", "command", "vms", "errors", "warnings"]


def test_history_falls_back_to_memory(session: Session, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KVMINSPECT_HISTORY", str(blocker / "history"))
    assert isinstance(open_history(), InMemoryHistory)
    status, _ = drive(session, "vms --json", later=UP + ENTER)  # recall works in memory
    out, err = capfd.readouterr()
    assert status == 0 and err == "" and out.count('"comm": "vmm"') == 2


def test_history_write_errors_are_silent(tmp_path: Path) -> None:
    h = QuietFileHistory(str(tmp_path))  # a directory: every open() fails
    h.store_string("vms")
    assert list(h.load_history_strings()) == []


def test_history_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert history_path() == tmp_path / "state" / "history"
    monkeypatch.delenv("KVMINSPECT_HISTORY")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert history_path() == tmp_path / "xdg" / "kvminspect" / "history"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert history_path() == tmp_path / "home" / ".local/state/kvminspect/history"


# -- completion ---------------------------------------------------------------


def complete(session: Session, text: str) -> list[str]:
    """What Tab offers after *text* (cursor at the end), each checked to fit the word."""
    event = CompleteEvent(completion_requested=True)
    found = list(ReplCompleter(session).get_completions(Document(text, len(text)), event))
    for c in found:
        assert -c.start_position <= len(text)
    return [c.text for c in found]


def test_complete_command_names(session: Session) -> None:
    names = complete(session, "")
    assert {"vms", "roots", "vcpus", "quit", "exit"} <= set(names)
    assert complete(session, "ro") == ["roots"]
    assert complete(session, "  v") == [n for n in names if n.startswith("v")]
    assert complete(session, "nope") == []
    assert complete(session, "pa") == ["pager"]
    assert complete(session, "pager ") == ["on", "off"]
    assert complete(session, "pager o") == ["on", "off"]


def test_complete_options(session: Session) -> None:
    assert complete(session, "roots --j") == ["--json"]
    assert sorted(complete(session, "roots -")) == ["--drgn", "--json", "--vm"]
    assert complete(session, "roots --json -") == ["--drgn", "--vm"]  # not offered twice
    assert "--unsync-only" in complete(session, "tree --")
    assert complete(session, "tree --depth ") == []  # a number: nothing to offer
    assert complete(session, "bogus --") == []


def test_complete_vm_ids(session: Session) -> None:
    (vm,) = session.kernel.vms()
    assert complete(session, "roots --vm ") == ["0", f"pid:{vm.pid}"]
    assert complete(session, "vcpus --vm pid") == [f"pid:{vm.pid}"]
    if "vm" in dict(NAMESPACE.enabled(None)):
        assert complete(session, "vm ") == ["0", f"pid:{vm.pid}", "all"]
        assert complete(session, "vm 0 ") == []  # one ID only


def test_complete_shadow_pages(session: Session) -> None:
    (vm,) = session.kernel.vms()
    addrs = sorted(hex(a) for a in session.graph(vm).graph.nodes)
    assert len(addrs) > 1
    assert sorted(complete(session, "sp ")) == addrs
    assert sorted(complete(session, "tree --depth 2 ")) == addrs
    first = addrs[0]
    assert first in complete(session, f"sp {first[:-2]}")
    assert first in complete(session, f"sp --vm 0 {first[2:-2]}")  # hex without 0x
    assert complete(session, "sp --vm 7 ") == []  # no such VM: nothing, no error
    assert complete(session, f"sp {first} ") == []
    # walk ADDR is a guest address (nothing to offer); walk --root SP a shadow page
    assert complete(session, "walk ") == []
    assert sorted(complete(session, "walk 0x200000 --root ")) == addrs


def test_complete_elsewhere(session: Session, tmp_path: Path) -> None:
    (tmp_path / "roots.txt").write_text("")
    assert complete(session, f"roots > {tmp_path}/ro") == ["ots.txt"]
    assert complete(session, f"roots >{tmp_path}/ro") == ["ots.txt"]
    assert complete(session, "vms | gr") == []
    assert "roots" in complete(session, "help r")


def test_completion_never_raises(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list:
        raise RuntimeError("boom")

    monkeypatch.setattr(session, "vms", broken)
    assert complete(session, "sp ") == []
    assert complete(session, 'sp "unterminated') == []


def test_a_second_vms_does_not_walk_the_tdp_mmu_pages_again(monkeypatch, capsys) -> None:
    """6.1's kvm->arch.tdp_mmu_pages list is walked to count a TDP MMU VM's pages;
    on a vmcore once per session (10^6 nodes took 0.8 s per 'vms')."""
    from kvminspect.memory import Memory
    from kvminspect.repl import run_line
    from kvminspect.target import open_core
    from tests.conftest import VMCORES

    walked = []
    real = Memory.count_nodes

    def counted(self, head, kind):
        if kind == "kvm->arch.tdp_mmu_pages":
            walked.append(head)
        return real(self, head, kind)

    monkeypatch.setattr(Memory, "count_nodes", counted)
    s = Session(open_core(str(VMCORES / "6.1-tdp"), []))  # a target of its own
    outs = []
    for _ in range(2):
        run_line(s, "vms --json")
        outs.append(capsys.readouterr().out)
    assert len(walked) == 1 and outs[0] == outs[1]
    assert json.loads(outs[0])["vms"][0]["tdp_mmu_pages"] == 4
