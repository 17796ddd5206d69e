"""What the output says (issue 11, item 8): one-line argument errors, values as
typed, plurals, 'sp' vs 'root sp', a one-shot 'vm', and a legend for every
abbreviation a table header uses."""

from __future__ import annotations

import json
import re

import pytest

from kvminspect.cli import run_one
from kvminspect.commands import load_all
from kvminspect.render import plural
from kvminspect.session import Session
from tests.conftest import VMCORES, open_fixture
from tests.conftest import run_main as run

SHADOW = str(VMCORES / "6.1-shadow")


@pytest.mark.parametrize("argv, needle", [
    (["roots", "--bogus"],
     "roots: unrecognized arguments: --bogus; usage: roots [--drgn] [--vm ID]"),
    (["tree", "--depth", "x"],
     "tree: argument --depth: not a number: 'x' (decimal, 0x accepted); usage: tree "),
    (["export"], "export: the following arguments are required"),
])
def test_argument_errors_are_one_line(argv: list[str], needle: str, capsys) -> None:
    status, out, err = run(["-c", SHADOW, *argv], capsys)
    assert status == 2 and out == ""
    (line,) = err.splitlines()  # no separate argparse usage line
    assert line.startswith("kvminspect: error: ") and line.count("error") == 1, line
    assert needle in line


@pytest.mark.parametrize("depth", ["-1", "-5"])
def test_negative_depth_is_a_usage_error(depth: str, capsys) -> None:
    status, out, err = run(["-c", SHADOW, "tree", "--depth", depth], capsys)
    assert status == 2 and out == ""
    assert f"must be 0 or more, not {depth}" in err


def test_depth_zero_is_fine(capsys) -> None:
    status, out, _ = run(["-c", SHADOW, "tree", "--depth", "0"], capsys)
    assert status == 0 and "below --depth" in out


@pytest.mark.parametrize("gfn", ["xyz", "0x", "-5", "0xg1"])
def test_bad_gfn_is_echoed_as_typed(gfn: str, capsys) -> None:
    status, _, err = run(["-c", SHADOW, "sp", "--gfn", gfn], capsys)
    assert status == 2
    assert f"bad gfn: {gfn!r}" in err and "0x0x" not in err and "0xxyz" not in err


def test_gfn_with_or_without_0x(capsys) -> None:
    outs = [run(["-c", SHADOW, "sp", "--gfn", g], capsys)[1] for g in ("101", "0x101", "0X101")]
    assert outs[0] and outs[0] == outs[1] == outs[2]


def unsync(argv: list[str], capsys) -> tuple[str, dict]:
    s = Session(open_fixture("6.1-shadow"))
    capsys.readouterr()
    run_one(s, argv)
    text = capsys.readouterr().out
    run_one(s, [*argv, "--json"])
    return text, json.loads(capsys.readouterr().out)


def test_unsync_plurals_and_root_wording(capsys) -> None:
    """'1 batch, 1 unsync leaf' (was '1 batch(es), 1 unsync leaves'); a page below the
    roots is 'sp X', not 'root sp X (no vCPU)'."""
    text, doc = unsync(["unsync"], capsys)
    (vm,) = doc["vms"]
    one = [r for r in vm["roots"] if len(r["batches"]) == 1
           and sum(len(b["leaves"]) for b in r["batches"]) == 1]
    assert one
    assert re.search(rf"^root sp {one[0]['sp']} \(vcpu.*\): 1 batch, 1 unsync leaf$", text,
                     re.M)
    assert "(es)" not in text and "1 unsync leaves" not in text
    root = vm["roots"][0]
    leaf = root["batches"][0]["leaves"][0]
    parent = leaf["parents"][0]["sp"]  # an L2 page: no root
    text, doc = unsync(["unsync", parent], capsys)
    (r,) = doc["vms"][0]["roots"]
    assert not r["holders"]
    nb, n = len(r["batches"]), sum(len(b["leaves"]) for b in r["batches"])
    assert (f"\nsp {parent}: {plural(nb, 'batch', 'batches')}, "
            f"{plural(n, 'unsync leaf', 'unsync leaves')}\n") in text
    assert "root sp" not in text and "(no vCPU)" not in text
    text, _ = unsync(["unsync", leaf["sp"]], capsys)
    assert f"\nsp {leaf['sp']}: 0 batches, 0 unsync leaves\n" in text


def test_plural() -> None:
    assert plural(1, "batch", "batches") == "1 batch"
    assert plural(0, "batch", "batches") == "0 batches"
    assert plural(2, "unsync leaf", "unsync leaves") == "2 unsync leaves"


def test_one_shot_vm_shows_the_vms(capsys) -> None:
    """One shot there is no selection to keep: 'vm' shows every VM, '--vm ID' and
    'vm ID' that one."""
    core = str(VMCORES / "6.1-shadow-2vm")
    status, out, _ = run(["-c", core, "vm"], capsys)
    assert status == 0 and "no VM selected" not in out
    assert re.findall(r"^VM (\d+): kvm", out, re.M) == ["0", "1"]
    assert out.count("memslots") == 2
    for argv in (["vm", "1"], ["vm", "--vm", "1"], ["--vm", "1", "vm"]):
        status, out, _ = run(["-c", core, *argv], capsys)
        assert status == 0 and re.findall(r"^VM (\d+): kvm", out, re.M) == ["1"], argv
    status, out, _ = run(["-c", core, "vm", "--json"], capsys)
    assert [v["index"] for v in json.loads(out)["vms"]] == [0, 1]
    status, _, err = run(["-c", core, "vm", "0", "--vm", "1"], capsys)
    assert status == 2 and "not both" in err


def test_repl_vm_without_selection_says_how_to_select(capsys) -> None:
    s = Session(open_fixture("6.1-shadow"))
    s.interactive = True
    capsys.readouterr()
    run_one(s, ["vm"])
    assert capsys.readouterr().out == (
        "no VM selected (1 VM; commands work on it; 'vm ID' selects one)\n")
    run_one(s, ["vm", "--vm", "0"])  # shown, not selected
    assert capsys.readouterr().out.startswith("VM 0: kvm")
    assert s.selected is None


# header -> the words its command's help must use to explain it
LEGEND = {
    "vms": ["ST", "GEN", "SHADOW PAGES", "TDP PAGES", "VCPUS", "MEMSLOTS"],
    "vcpus": ["IDX", "ID", "TID", "CPU", "MODE", "MP_STATE", "ROOT HPA"],
    "roots": ["CR3", "ROOT", "PGD", "HPA", "SP", "GFN/LVL", "FLAGS"],
    "sp": ["IDX", "SPTE", "KIND", "PFN", "W", "CHILD SP", "CHILD GFN/LVL", "FLAGS"],
    "walk": ["LVL", "TABLE", "GFN", "IDX", "SPTE", "FLAGS", "NEXT SP"],
    "unsync": ["SP Index", "SP Level", "Slot in Parent"],
    "vm": ["AS", "BASE GFN", "NPAGES", "USERSPACE ADDR", "FLAGS"],
}


@pytest.mark.parametrize("cmd", sorted(LEGEND))
def test_help_explains_every_column(cmd: str) -> None:
    """ST, GEN, IDX, W... were explained nowhere: each command's help has a legend."""
    text = " ".join(load_all().lookup(None, cmd).format_help().split())  # type: ignore[arg-type]
    m = re.search(r"Columns( of [\w ]+)?: (.*)", text)
    assert m, text
    legend = m.group(2)
    for col in LEGEND[cmd]:
        assert re.search(rf"(^|[ ;]){re.escape(col)}:? ", legend), (cmd, col, legend)
