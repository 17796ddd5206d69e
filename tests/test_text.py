"""Golden tests of the text output of vcpus, unsync and sp, built from truth.json.

Each expected text is assembled from the VMM's record (tids, CR3s, which page
tables the guest wrote, in which order) and, for the addresses no record can
know, from the same command's JSON; the comparison is line by line, word by
word, so any change of layout or content shows.
"""

from __future__ import annotations

import json

import pytest

from kvminspect.cli import run_one
from kvminspect.session import Session
from tests.conftest import fixtures, open_fixture, truth


def run(name: str, *argv: str, capsys) -> tuple[str, dict]:
    s = Session(open_fixture(name))
    capsys.readouterr()
    run_one(s, list(argv))
    text = capsys.readouterr().out
    run_one(s, [*argv, "--json"])
    return text, json.loads(capsys.readouterr().out)


def words(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", fixtures(lambda t: not t["busy"]))
def test_vcpus_text(name: str, capsys) -> None:
    t = truth(name)
    text, doc = run(name, "vcpus", capsys=capsys)
    (vm,) = doc["vms"]
    mmu = "root_mmu"
    expected = [f"VM 0 kvm {vm['kvm']} pid {t['vmm_pid']} {t['mmu']} (vmm)".split(),
                "IDX ID VCPU TID CPU MODE MP_STATE CR3 MMU ROOT HPA REQUESTS".split()]
    for i, (tv, v) in enumerate(zip(t["vcpus"], vm["vcpus"], strict=True)):
        expected.append([str(i), str(tv["vcpu_id"]), v["vcpu"], str(tv["tid"]), str(v["cpu"]),
                         "OUTSIDE_GUEST_MODE", "HALTED", tv["cr3"], mmu, v["root_hpa"],
                         ",".join(v["request_names"]) or "-"])
    assert words(text) == expected


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "shadow" and not t["zapped"]
                                          and t.get("guest_paging", "long") == "long"))
def test_unsync_text(name: str, capsys) -> None:
    """Per root: the 16-entry batches in the kernel's order and one line per synced leaf,
    leaves in the order the guest's windows are laid out in its PD."""
    t = truth(name)
    text, doc = run(name, "unsync", capsys=capsys)
    (vm,) = doc["vms"]
    expected = [f"VM 0 kvm {vm['kvm']} pid {t['vmm_pid']} shadow".split()]
    for r in vm["roots"]:
        holders = ", ".join(h["holder"] for h in r["holders"])
        leaves = [leaf for b in r["batches"] for leaf in b["leaves"]]
        the_set = next(s for s in t["sets"] if leaves[0]["gfn"] in s["unsync_gfns"])
        # the leaves are exactly that set's written windows, in PD slot order
        assert [leaf["gfn"] for leaf in leaves] == the_set["unsync_gfns"]
        pml4, pdpt, pd = (hex(int(g, 16) >> 12) for g in the_set["pt_gpas"][:3])
        assert r["sp"] == vm_sp(name, pml4, capsys)
        nb = len(r["batches"])
        expected.append(f"root sp {r['sp']} ({holders}): {nb} batch{'' if nb == 1 else 'es'}, "
                        f"{len(leaves)} unsync lea{'f' if len(leaves) == 1 else 'ves'}".split())
        for k, b in enumerate(r["batches"], 1):
            expected.append(f"batch {k}: {len(b['pages'])} entries".split())
            expected.append("SP Index SP Level Slot in Parent SP".split())
            expected += [[str(i), str(e["level"]), str(e["idx"]), e["sp"]]
                         for i, e in enumerate(b["pages"])]
            for leaf in b["leaves"]:
                parents = [w for p in leaf["parents"] for w in (f"L{p['level']}", p["sp"])]
                pos = [e["sp"] for e in b["pages"]].index(leaf["sp"])  # its vector position
                expected.append(["sync", "sp", f"[{pos}]", leaf["sp"], "gfn", leaf["gfn"],
                                 "parents:", *parents])
                assert [p["sp"] for p in leaf["parents"]] == [
                    vm_sp(name, g, capsys) for g in (pd, pdpt, pml4)]
    assert words(text) == expected


def vm_sp(name: str, gfn: str, capsys) -> str:
    """The one shadow page of *gfn* (sp --gfn)."""
    (vm,) = run(name, "sp", "--gfn", gfn, capsys=capsys)[1]["vms"]
    (page,) = vm["pages"]
    return page["sp"]


@pytest.mark.parametrize("name", ["6.1-shadow", "5.10-shadow", "7.3-shadow"])
def test_sp_text(name: str, capsys) -> None:
    """An unsync window table: its state, role, the PD slot that points at it (window j
    is PD[1 + j]) and the one SPTE the guest's read of the window made present."""
    t = truth(name)
    s0 = next(s for s in t["sets"] if s["unsync_gfns"])
    j = 0
    gfn = s0["unsync_gfns"][j]
    text, doc = run(name, "sp", "--gfn", gfn, capsys=capsys)
    (vm,) = doc["vms"]
    (d,) = vm["pages"]
    pd = vm_sp(name, hex(int(s0["pt_gpas"][2], 16) >> 12), capsys)
    role = " ".join(f"{k}={int(v)}" for k, v in d["role"].items() if k != "word")
    (e,) = d["sptes"]
    assert e["index"] == 0 and e["leaf"]  # load_set() reads the first word of a window
    expected = [
        f"VM 0 kvm {vm['kvm']} pid {t['vmm_pid']} shadow".split(),
        f"sp {d['sp']} gfn {gfn} level 1".split(),
        f"spt {d['spt']} root_count 0 unsync_children 0 mmu_valid_gen 0 unsync".split(),
        f"role {d['role']['word']}: {role}".split(),
        f"parent {pd} (L2) slot [{1 + j}]".split(),
        "1 present SPTE, 511 not present".split(),
        "IDX SPTE KIND PFN W CHILD SP CHILD GFN/LVL FLAGS".split(),
        ["0", f"{int(e['value'], 16):#018x}", "leaf", e["pfn"]]
        + (["w"] if e["writable"] else [])
        + e["bits"]["flags"].split(),
    ]
    assert words(text) == expected
