"""Damaged kernels degrade: the bad object is named, the rest still comes out.

Each case is a real fixture with one kernel object patched in the dump
(tests/corrupt.py). roots, tree, unsync and check must finish with status 0,
print their JSON document, and list the damaged object in "errors" (and
check must report it as a finding).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from kvminspect.cli import main
from tests.corrupt import make

COMMANDS = ("roots", "tree", "unsync", "check")
# case -> (fixture, text expected in some error, commands whose JSON must still name a vCPU)
CASES = {
    "garbage-page-table": ("6.1-shadow", "point at no shadow page"),
    "active-list-loop": ("6.1-shadow", "list loops"),
    "active-list-self-loop": ("6.1-shadow", "list loops at"),
    "vm-list-loop": ("6.1-shadow", "list loops"),
    "tdp-roots-loop": ("6.1-tdp", "list loops"),
    "vcpu-mmu-unmapped": ("6.1-shadow", "unreadable"),
    "spt-unmapped": ("6.1-shadow", "unreadable"),
    "prev-root-unmapped": ("6.1-shadow", "no readable struct page"),
    "level-zero": ("6.1-shadow", "impossible level 0"),
    "level-too-big": ("6.12-shadow", "impossible level 7"),
    "unsync-children-huge": ("6.1-shadow", "impossible unsync_children 1000"),
    "spte-cycle": ("6.1-shadow", "has level 4, expected 1"),
    "wrong-child-level": ("6.12-shadow", "has level 2, expected 3"),
    "private-mismatch": ("6.1-shadow", "has level 2, expected 3"),
}


@cache
def damaged(case: str, root: str) -> tuple[Path, list]:
    fixture = CASES[case][0] if case in CASES else "6.1-shadow"
    out = Path(root) / case
    return out, make(fixture, case, out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("corrupt"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_commands_degrade(case: str, workdir: str, capsys) -> None:
    path, _ = damaged(case, workdir)
    needle = CASES[case][1]
    for cmd in COMMANDS:
        capsys.readouterr()
        status = main(["-c", str(path), cmd, "--json"])
        out, err = capsys.readouterr()
        assert status == (3 if cmd == "check" else 0), (cmd, err)  # 3: check found errors
        assert "Traceback" not in err
        doc = json.loads(out)
        errors = [e["error"] for e in doc["errors"]]
        assert any(needle in e for e in errors), (cmd, errors)
        assert all(e["object"] for e in doc["errors"])
        if cmd == "check":
            msgs = [f["message"] for vm in doc["vms"] for f in vm["findings"]]
            assert any(needle in m for m in msgs), msgs
    # human output: the same problem as a warning line on stderr, output still there
    capsys.readouterr()
    assert main(["-c", str(path), "roots"]) == 0
    out, err = capsys.readouterr()
    assert "kvminspect: warning:" in err and needle in err
    if case != "vm-list-loop":
        assert "vcpu[0]" in out


def test_everything_else_still_read(workdir: str, capsys) -> None:
    """One bad prev_root: every other root of every vCPU is still resolved."""
    path, _ = damaged("prev-root-unmapped", workdir)
    capsys.readouterr()
    assert main(["-c", str(path), "roots", "--json"]) == 0
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    bad = [r for v in vm["vcpus"] for r in [v["root"], *v["prev_roots"]] if r["page"] is None]
    good = [r for v in vm["vcpus"] for r in [v["root"], *v["prev_roots"]] if r["page"]]
    assert len(bad) == 1 and bad[0]["state"] == "unreadable" and len(good) == 15


def test_nothing_readable_exits_nonzero(workdir: str, capsys) -> None:
    """vm_list itself unreadable: the error is named and the exit status is 1."""
    path, _ = damaged("vm-list-unmapped", workdir)
    capsys.readouterr()
    assert main(["-c", str(path), "roots", "--json"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["vms"] == [] and "struct kvm" in {e["object"] for e in doc["errors"]}
    assert "Traceback" not in err
