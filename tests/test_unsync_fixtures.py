"""The unsync replay on the real fixtures, against a hand-worked expectation.

Hand-worked (6.1-shadow, set 0: PML4 gfn 0x101 -> PDPT 0x102 -> PD 0x103, 20 unsync
window tables at PD slots 1..20, gfns 0x104..0x117; the shared table at slot 0 is not
unsync and its bit is not set). mmu_unsync_walk adds the root with INVALID_INDEX (-1),
then walks PML4's bitmap (slot 0) -> PDPT (has unsync_children: added, recursed),
PDPT slot 0 -> PD (added, recursed), PD slots 1.. -> each unsync leaf is added; the
16th entry (leaf at slot 13) fills the kvm_mmu_pages array: -ENOSPC. for_each_sp syncs
those 13 leaves and clears their bits (PD: 20 -> 7). The second walk re-adds root,
PDPT, PD and the 7 leaves at slots 14..20 (10 entries, returns 7); clearing the last
one empties PD, then PDPT's bit, then the root's. The third walk finds nothing.
"""

from __future__ import annotations

import json

import pytest

from kvminspect.cli import run_one
from kvminspect.session import Session
from tests.conftest import fixtures, open_fixture, truth


def unsync_doc(name: str, capsys) -> dict:
    capsys.readouterr()
    run_one(Session(open_fixture(name)), ["unsync", "--json"])
    return json.loads(capsys.readouterr().out)


def gfn_of(gpa: str) -> str:
    return hex(int(gpa, 16) >> 12)


def test_hand_worked_two_batches(capsys) -> None:
    t = truth("6.1-shadow")
    (vm,) = unsync_doc("6.1-shadow", capsys)["vms"]
    s0 = t["sets"][0]
    names = [[h["holder"] for h in r["holders"]] for r in vm["roots"]]
    roots = {n[0]: r for n, r in zip(names, vm["roots"], strict=True)}
    root = next(r for n, r in zip(names, vm["roots"], strict=True) if "vcpu0.root" in n)
    assert "vcpu3.root" in [h["holder"] for h in root["holders"]] and len(roots) == 3
    b1, b2 = root["batches"]
    head = [(e["level"], e["idx"]) for e in b1["pages"][:3]]
    assert head == [(4, -1), (3, 0), (2, 0)]
    assert [(e["level"], e["idx"]) for e in b1["pages"][3:]] == [(1, i) for i in range(1, 14)]
    assert len(b1["pages"]) == 16
    assert [(e["level"], e["idx"]) for e in b2["pages"]] == [(4, -1), (3, 0), (2, 0)] + [
        (1, i) for i in range(14, 21)]
    wins = [gfn_of(w) for w in s0["window_pts"]]
    assert [leaf["gfn"] for leaf in b1["leaves"]] == wins[:13]
    assert [leaf["gfn"] for leaf in b2["leaves"]] == wins[13:]
    pml4, pdpt, pd = (e["sp"] for e in b1["pages"][:3])
    assert b2["pages"][0]["sp"] == pml4 and b2["pages"][2]["sp"] == pd
    for leaf in b1["leaves"] + b2["leaves"]:
        assert leaf["parents"] == [{"sp": pd, "level": 2}, {"sp": pdpt, "level": 3},
                                   {"sp": pml4, "level": 4}]
    assert root["errors"] == []


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "shadow" and not t["zapped"]))
def test_replay_syncs_exactly_the_written_tables(name: str, capsys) -> None:
    t = truth(name)
    (vm,) = unsync_doc(name, capsys)["vms"]
    want = {s["cr3"]: [gfn_of(w) for w in s["window_pts"]] for s in t["sets"] if s["unsync_gfns"]}
    assert len(vm["roots"]) == len(want)
    for r in vm["roots"]:
        leaves = [leaf["gfn"] for b in r["batches"] for leaf in b["leaves"]]
        assert leaves in want.values()  # each written table once, in slot order
        # root, PDPT and PD take 3 of the 16 entries in every batch: 13 leaves each
        assert len(r["batches"]) == -(-len(leaves) // 13)
        for b in r["batches"]:
            assert len(b["pages"]) <= 16 and b["pages"][0]["idx"] == -1

def test_no_unsync_on_tdp_and_zapped(capsys) -> None:
    for name in fixtures(lambda t: t["mmu"] != "shadow" or t["zapped"]):
        (vm,) = unsync_doc(name, capsys)["vms"]
        assert vm["roots"] == []


@pytest.mark.parametrize("name", ["6.1-shadow", "7.3-shadow-pae"])
def test_zap_replay_walks_like_sync(name: str, capsys) -> None:
    """unsync --zap (mmu_zap_unsync_children): the same batches and leaves as the sync
    walk on these roots, each leaf zapped instead of synced."""
    s = Session(open_fixture(name))
    capsys.readouterr()
    run_one(s, ["unsync", "--json"])
    sync = json.loads(capsys.readouterr().out)["vms"][0]["roots"]
    run_one(s, ["unsync", "--zap", "--json"])
    zap = json.loads(capsys.readouterr().out)["vms"][0]["roots"]
    assert [r["batches"] for r in zap] == [r["batches"] for r in sync] and sync
    assert all(r["zap"] for r in zap) and not any(r["zap"] for r in sync)
    run_one(s, ["unsync", "--zap"])
    text = capsys.readouterr().out
    assert text.count("  zap sp ") == sum(len(b["leaves"]) for r in zap for b in r["batches"])
    assert "  sync sp " not in text
