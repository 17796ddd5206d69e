"""The progress bar of slow graph builds: stderr, terminals only, never under --json."""

from __future__ import annotations

import io
import json

import pytest

from kvminspect import session as session_mod
from kvminspect.cli import run_one
from kvminspect.session import Session
from tests.conftest import open_fixture


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def tty_stderr(monkeypatch) -> Tty:
    err = Tty()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(session_mod, "PROGRESS_AFTER", 0.0)  # every build counts as slow
    return err


def test_progress_bar_on_a_terminal(tty_stderr: Tty, capsys) -> None:
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])
    assert "vm0: reading shadow pages" in tty_stderr.getvalue()
    assert "reading shadow pages" not in capsys.readouterr().out


def test_no_progress_bar_under_json(tty_stderr: Tty, capsys) -> None:
    run_one(Session(open_fixture("6.1-shadow")), ["roots", "--json"])
    assert tty_stderr.getvalue() == ""
    assert json.loads(capsys.readouterr().out)["command"] == "roots"


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setattr(session_mod, "PROGRESS_AFTER", 0.0)
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])
    assert "reading shadow pages" not in capsys.readouterr().err


def test_no_progress_bar_for_a_fast_build(tty_stderr: Tty) -> None:
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])  # PROGRESS_AFTER is 0 here
    tty_stderr.truncate(0)
    session_mod.PROGRESS_AFTER = 3600.0  # restored by monkeypatch
    run_one(Session(open_fixture("6.1-shadow")), ["roots"])
    assert tty_stderr.getvalue() == ""
