"""The progress bar of slow graph builds: stderr, terminals only, never under --json."""

from __future__ import annotations

import io
import json

from kvminspect import session as session_mod
from kvminspect.cli import run_one
from kvminspect.session import Session
from tests.conftest import open_fixture


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def terminal_stderr(monkeypatch, after: float = 0.0) -> Tty:
    """sys.stderr a terminal, builds slow after *after* seconds. Called in the
    test body: pytest's capture puts its own sys.stderr back when the test starts."""
    err = Tty()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(session_mod, "PROGRESS_AFTER", after)
    return err


def test_progress_bar_on_a_terminal(monkeypatch, capsys) -> None:
    err = terminal_stderr(monkeypatch)
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])
    assert "vm0: reading shadow pages" in err.getvalue()
    assert "reading shadow pages" not in capsys.readouterr().out


def test_no_progress_bar_under_json(monkeypatch, capsys) -> None:
    err = terminal_stderr(monkeypatch)
    run_one(Session(open_fixture("6.1-shadow")), ["roots", "--json"])
    assert err.getvalue() == ""
    assert json.loads(capsys.readouterr().out)["command"] == "roots"


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setattr(session_mod, "PROGRESS_AFTER", 0.0)
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])
    assert "reading shadow pages" not in capsys.readouterr().err


def test_no_progress_bar_for_a_fast_build(monkeypatch) -> None:
    err = terminal_stderr(monkeypatch, after=3600.0)
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])
    assert err.getvalue() == ""
