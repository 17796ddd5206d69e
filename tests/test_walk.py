"""walk ADDR on the real fixtures: the addresses the VMM's guest touched end at
the data page the VMM put there, confirmed through the memslot.

What the guest touched comes from truth.json and the VMM's fixed layout
(tests/vmcores/pipeline/vmm.c, guest.S): after loading its final CR3 each vCPU
reads the first word of every window of its set (window j at WIN_VA + j * 2
MiB, mapping DATA_GPA), runs code at CODE_GPA, reads its parameters at
PARAMS_GPA, uses its stack page STACK_GPA + i * 0x1000, and writes slot 100 +
i of each window page table of its set through the identity map of the first
2 MiB. Under shadow paging those are guest virtual addresses (the walk
translates them to the gfns the guest's tables give); under the TDP MMU the
guest physical addresses. Each must end at a present 4 KiB leaf whose pfn is
the one the VMM's page tables map at the memslot's userspace address, or, if
the dump lacks the VMM's page tables there, say so.
"""

from __future__ import annotations

import json

import pytest

from kvminspect.cli import run_one
from kvminspect.objects import RootKind
from kvminspect.session import Session
from kvminspect.walk import (
    AddressKind,
    MemslotOutcome,
    Stop,
    Verdict,
    memslot_check,
    memslot_why,
    walk,
)
from tests.conftest import FIXTURES, open_fixture, run_main, truth
from tests.test_schema import validate

PARAMS_GPA, CODE_GPA, STACK_GPA = 0x1000, 0x2000, 0x10000  # vmm.c
DATA_GPA, WIN_VA, HUGE = 0x200000, 0x200000, 2 << 20
WALKED = [n for n in FIXTURES if not truth(n).get("zapped")]
GVA = [n for n in WALKED if truth(n)["mmu"] == "shadow"]
GPA = [n for n in WALKED if truth(n)["mmu"] != "shadow"]


def touched(t: dict, i: int) -> dict[int, int]:
    """Address -> the gfn it must reach, for vCPU *i* of the fixture *t*: guest
    virtual addresses (shadow MMU) or guest physical ones (TDP)."""
    final = t["sets"][t["vcpus"][i]["final_set"]]
    ident = [PARAMS_GPA, CODE_GPA, STACK_GPA + i * 0x1000]
    ident += [int(pt, 16) + 800 + 8 * i for pt in final["window_pts"]]  # slot 100 + i
    out = {a: a >> 12 for a in ident}
    if t["mmu"] == "shadow":
        out.update({WIN_VA + j * HUGE: DATA_GPA >> 12 for j in range(len(final["window_pts"]))})
    else:  # the windows' data page, and every guest page table the walker read
        out[DATA_GPA] = DATA_GPA >> 12
        out.update({int(pt, 16): int(pt, 16) >> 12 for pt in final["pt_gpas"]})
    return out


def the_vm(name: str):
    k = open_fixture(name).kernel
    return k, k.vms()[0]


def accept(w) -> None:
    """A present leaf that the memslot translation confirms, or that says the
    dump lacks what would confirm it: nothing else."""
    assert w.stop is Stop.LEAF, (w.stop, w.why)
    c = w.check
    assert c is not None
    if c.verdict is not Verdict.MATCH:
        assert c.outcome is MemslotOutcome.NOT_IN_DUMP, c
        assert c.verdict is Verdict.NOT_CHECKABLE and "not in the dump" in memslot_why(c), c
    else:
        assert c.outcome is MemslotOutcome.MATCH and c.host_pfn == w.pfn
        assert memslot_why(c) == "maps the page the memslot says"


@pytest.mark.parametrize("name", WALKED)
def test_touched_addresses_reach_the_vmms_pages(name: str) -> None:
    t = truth(name)
    k, vm = the_vm(name)
    vcpus = k.vcpus(vm)
    assert len(vcpus) == len(t["vcpus"])
    for i, v in enumerate(vcpus):
        for addr, gfn in touched(t, i).items():
            w = walk(k, vm, addr, v.root, f"vcpu{i}.root", v, direct=v.direct)
            assert w.kind is (AddressKind.GVA if t["mmu"] == "shadow" else AddressKind.GPA)
            accept(w)
            assert w.check.gfn == gfn, (hex(addr), w.check)
            assert w.offset == addr & 0xFFF and w.steps[-1].level == 1
            assert w.checked_reserved and not any(s.reserved for s in w.steps)
            assert [s.level for s in w.steps] == list(
                range(w.steps[0].level, 0, -1))  # one step per level, down to 1
            assert all(s.bits is None or s.bits.present for s in w.steps)


@pytest.mark.parametrize("name", WALKED)
def test_untouched_addresses_stop_not_present_at_their_level(name: str) -> None:
    """DATA page 1 (never read): level 1; past the windows: level 2; 1 GiB: level 3
    (a PAE guest: pae_root[1])."""
    t = truth(name)
    k, vm = the_vm(name)
    v = k.vcpus(vm)[0]
    nwin = len(t["sets"][t["vcpus"][0]["final_set"]]["window_pts"])
    for addr, level in ((WIN_VA + 0x1000, 1), (WIN_VA + 8 * HUGE + nwin * HUGE, 2),
                        (1 << 30, 3)):
        w = walk(k, vm, addr, v.root, "vcpu0.root", v, direct=v.direct)
        assert w.stop is Stop.NOT_PRESENT and w.check is None, (hex(addr), w)
        assert w.steps[-1].level == level and "not present" in w.why
        assert w.pfn is None


def test_pae_root_starts_at_the_addresses_top_bits() -> None:
    """A 32-bit PAE guest's root is mmu->pae_root: pae_root[addr bits 31:30] is
    the first step, its child the level-2 shadow page of the guest's PD."""
    k, vm = the_vm("7.3-shadow-pae")
    v = k.vcpus(vm)[0]
    assert v.root.special is RootKind.PAE_ROOT
    w = walk(k, vm, WIN_VA, v.root, "vcpu0.root", v)
    first = w.steps[0]
    assert w.root == "vcpu0.root pae_root[0]" and first.index == 0 and first.level == 3
    assert first.child == dict(v.root.pae_roots)[0]
    assert [s.level for s in w.steps] == [3, 2, 1]
    w = walk(k, vm, 3 << 30, v.root, "vcpu0.root", v)
    assert w.root.endswith("pae_root[3]") and w.stop is Stop.NOT_PRESENT


def test_memslot_check_verdicts() -> None:
    """The three verdicts on a real VM: the right pfn matches, another is a
    mismatch, a gfn no memslot holds or a userspace page not mapped is not
    checkable; each outcome in words (memslot_why: the text and JSON "why")."""
    k, vm = the_vm("6.1-shadow")
    v = k.vcpus(vm)[0]
    pfn = walk(k, vm, DATA_GPA, v.root, "vcpu0.root", v).pfn
    good = memslot_check(k, vm, DATA_GPA >> 12, pfn)
    assert good.verdict is Verdict.MATCH and good.outcome is MemslotOutcome.MATCH
    bad = memslot_check(k, vm, DATA_GPA >> 12, pfn + 1)
    assert bad.verdict is Verdict.MISMATCH and bad.host_pfn == pfn
    assert memslot_why(bad) == f"the memslot's page is pfn {pfn:#x}, the SPTE maps {pfn + 1:#x}"
    none = memslot_check(k, vm, 0x100000, pfn)
    assert none.verdict is Verdict.NOT_CHECKABLE and none.outcome is MemslotOutcome.NO_MEMSLOT
    assert memslot_why(none) == "no memslot of address space 0 holds gfn 0x100000"
    unmapped = memslot_check(k, vm, (DATA_GPA >> 12) + 1, pfn)
    assert unmapped.verdict is Verdict.NOT_CHECKABLE
    assert unmapped.outcome is MemslotOutcome.NOT_MAPPED and unmapped.hva is not None
    assert memslot_why(unmapped) == (f"the VMM's page tables do not map {unmapped.hva:#x} "
                                     "(no page there now)")


def test_root_sp_walks_from_any_page(capsys) -> None:
    """--root SP: a lower shadow page as the top walks from its own level."""
    s = Session(open_fixture("6.1-shadow"))
    k, vm = s.kernel, s.kernel.vms()[0]
    v = k.vcpus(vm)[0]
    full = walk(k, vm, WIN_VA, v.root, "vcpu0.root", v)
    pd = full.steps[2].table  # the level-2 page
    capsys.readouterr()
    run_one(s, ["walk", hex(WIN_VA), "--root", hex(pd), "--json"])
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    (w,) = doc["vms"][0]["walks"]
    assert w["root"] == f"sp {pd:#x}" and [st["level"] for st in w["steps"]] == [2, 1]
    assert w["stop"] == "leaf" and w["pfn"] == hex(full.pfn)
    assert w["memslot"]["verdict"] == "match"


@pytest.mark.parametrize("name", ["6.1-shadow", "5.10-shadow", "7.3-shadow-pae", "6.12-tdp",
                                  "7.3-tdp"])
def test_json_document(name: str, capsys) -> None:
    s = Session(open_fixture(name))
    for argv in (["walk", hex(DATA_GPA)], ["walk", "0x201000", "--vcpu", "1"],
                 ["walk", "0x40000000"]):
        capsys.readouterr()
        run_one(s, [*argv, "--json"])
        doc = json.loads(capsys.readouterr().out)
        validate(doc)
        (w,) = doc["vms"][0]["walks"]
        assert w["addr"] == hex(int(argv[1], 16))
        last = w["steps"][-1]
        if argv[1] == hex(DATA_GPA):
            assert w["stop"] == "leaf" and last["bits"]["leaf"] and last["bits"]["r"]
            assert w["memslot"]["gfn"] == hex(DATA_GPA >> 12)
        else:
            assert w["stop"] == "not_present" and w["memslot"] is None
        assert w["root"].startswith("vcpu1.root" if "--vcpu" in argv else "vcpu0.root")


def test_text(capsys) -> None:
    """The text: what the address is, one row per level, the stop and the check."""
    name = "6.1-shadow"
    s = Session(open_fixture(name))
    capsys.readouterr()
    run_one(s, ["walk", hex(WIN_VA), "--json"])
    (w,) = json.loads(capsys.readouterr().out)["vms"][0]["walks"]
    run_one(s, ["walk", hex(WIN_VA)])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    t = truth(name)
    assert lines[0][:2] == ["VM", "0"] and lines[0][4:6] == ["pid", str(t["vmm_pid"])]
    assert lines[1] == (f"walk {WIN_VA:#x}: guest virtual address (shadow root) from "
                        f"vcpu0.root (top {w['root_table']})").split()
    assert lines[2] == "LVL TABLE GFN IDX SPTE FLAGS NEXT SP".split()
    for row, st in zip(lines[3:7], w["steps"], strict=True):
        assert row[:5] == [f"L{st['level']}", st["table"], st["table_gfn"], str(st["index"]),
                           f"{int(st['value'], 16):#018x}"]
        assert " ".join(row[5:]).startswith(st["bits"]["flags"])
    s0 = t["sets"][0]
    assert [st["table_gfn"] for st in w["steps"]] == [
        hex(int(g, 16) >> 12) for g in s0["pt_gpas"][:3] + s0["window_pts"][:1]]
    assert lines[7] == f"stop: leaf: L1 index 0: 4 KiB page pfn {w['pfn']}, offset 0x0".split()
    assert lines[8][:3] == ["memslot:", "gfn", "0x200"] and lines[8][-1] == w["pfn"]
    assert lines[9] == "check: maps the page the memslot says".split()


@pytest.mark.parametrize("argv,message", [
    (["walk", "zz"], "bad address"),
    (["walk", "0x1000", "--vcpu", "9"], "has no vCPU 9"),
    (["walk", "0x1000", "--root", "0xffff888000001000"], "is not a shadow page"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, capsys) -> None:
    status, out, err = run_main(["--sample", *argv], capsys)
    assert status != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sp_shows_the_bits(capsys) -> None:
    """sp's SPTE table has the FLAGS column and its JSON a bits object per SPTE."""
    s = Session(open_fixture("6.1-shadow"))
    k, vm = s.kernel, s.kernel.vms()[0]
    root = k.vcpus(vm)[0].root.sp
    capsys.readouterr()
    run_one(s, ["sp", hex(root.addr), "--json"])
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    (e, *_) = doc["vms"][0]["pages"][0]["sptes"]
    assert e["bits"]["flags"] == "RWX U A" and e["bits"]["present"] and not e["bits"]["leaf"]
    run_one(s, ["sp", hex(root.addr)])
    out = capsys.readouterr().out
    assert "FLAGS" in out and "RWX U A" in out


# --- every stop, planted in a real fixture's tables ---------------------------
#
# The fixtures' guests map 4 KiB pages only, touch no MMIO and were dumped at
# rest: one SPTE of a real walk's table is replaced (in the model's cache of
# spt[], restored after the test) by a value the kernel would write there, so
# the rest of the walk stays real.


def planted(name: str, monkeypatch, level: int, index: int, value: int):
    """vCPU 0's walk table at *level* with spt[index] = *value* (model cache only)."""
    k, vm = the_vm(name)
    v = k.vcpus(vm)[0]
    table = next(s for s in walk(k, vm, WIN_VA, v.root, "vcpu0.root", v).steps
                 if s.level == level).table
    sp = k.shadow_page(table)
    spt = k.sptes(sp)
    new = type(spt)("Q", spt)
    new[index] = value
    monkeypatch.setitem(k.pages._spt_cache, sp.addr, new)
    return k, vm, v


def test_large_page_stops_with_its_offset(monkeypatch) -> None:
    """A 2 MiB SPTE at L2 (PS, 2 MiB-aligned pfn): the walk stops there, the
    offset is ADDR's within 2 MiB and the pfn that of ADDR's 4 KiB page in it."""
    base = 0x40000  # pfn of a 2 MiB-aligned host page
    value = (base << 12) | 0xE00 | 0x80 | 0x67  # hw mw present, PS, A D U W P
    k, vm, v = planted("6.1-shadow", monkeypatch, 2, 1, value)
    w = walk(k, vm, WIN_VA + 0x5123, v.root, "vcpu0.root", v)
    assert w.stop is Stop.LARGE and w.steps[-1].level == 2 and w.steps[-1].bits.large
    assert w.offset == 0x5123 and w.pfn == base + 5
    assert "large page (2 MiB)" in w.why and not w.steps[-1].reserved
    assert w.check is not None and w.check.verdict in (Verdict.MISMATCH, Verdict.NOT_CHECKABLE)


def test_reserved_bits_stop(monkeypatch) -> None:
    """A present leaf with a physical address bit above the host's (40) set:
    is_rsvd_spte() by the vCPU's shadow_zero_check."""
    k, vm, v = planted("6.1-shadow", monkeypatch, 1, 0, (1 << 45) | 0xA25 | (0x1234 << 12))
    w = walk(k, vm, WIN_VA, v.root, "vcpu0.root", v)
    assert w.stop is Stop.RESERVED and w.steps[-1].reserved and w.check is None


def test_mmio_stop_with_generation(monkeypatch) -> None:
    """make_mmio_spte() of 6.1 on AMD: shadow_mmio_value | access | gpa | generation
    (bits 0-7 in 3-10, 8-18 from 52): the walk stops at MMIO with gfn and generation."""
    k, vm, v = planted("6.1-shadow", monkeypatch, 1, 1,
                       ((1 << 51) | 1) | 0x6 | 0xFEE00000 | (0x5 << 3) | (1 << 52))
    w = walk(k, vm, WIN_VA + 0x1000, v.root, "vcpu0.root", v)
    b = w.steps[-1].bits
    assert w.stop is Stop.MMIO and b.mmio and not b.present
    assert (b.mmio_gfn, b.mmio_gen, b.mmio_access) == (0xFEE00, 0x105, 0x6)
    assert "gfn 0xfee00, generation 0x105" in w.why


def test_frozen_stop(monkeypatch) -> None:
    """6.12's FROZEN_SPTE (SHADOW_NONPRESENT_VALUE | 0x5a0) in a TDP MMU table."""
    k, vm, v = planted("6.12-tdp", monkeypatch, 2, 1, (1 << 63) | 0x5A0)
    w = walk(k, vm, DATA_GPA, v.root, "vcpu0.root", v, direct=True)
    assert w.stop is Stop.FROZEN and w.steps[-1].bits.frozen and "in progress" in w.why


def test_no_shadow_page_stop(monkeypatch) -> None:
    """A present non-leaf SPTE pointing at a page that is no shadow page (here
    the guest's data page: its struct page has no private kvm_mmu_page)."""
    k, vm = the_vm("6.1-shadow")
    v = k.vcpus(vm)[0]
    data_pfn = walk(k, vm, WIN_VA, v.root, "vcpu0.root", v).pfn
    k, vm, v = planted("6.1-shadow", monkeypatch, 2, 1, (data_pfn << 12) | 0x827)
    w = walk(k, vm, WIN_VA, v.root, "vcpu0.root", v)
    assert w.stop is Stop.NO_SHADOW_PAGE and w.steps[-1].child is None
    assert f"pfn {data_pfn:#x}, which has no shadow page" in w.why


@pytest.mark.parametrize("name", ["6.1-shadow-zapped", "5.10-shadow-zapped"])
def test_zapped_root_says_so(name: str, capsys) -> None:
    """After a fast zap vCPU 0's root is role.invalid and its children are gone:
    the walk says both."""
    s = Session(open_fixture(name))
    capsys.readouterr()
    run_one(s, ["walk", hex(WIN_VA), "--json"])
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    (w,) = doc["vms"][0]["walks"]
    assert w["root_invalid"] and w["stop"] == "not_present" and len(w["steps"]) == 1
    run_one(s, ["walk", hex(WIN_VA)])
    assert "role.invalid: zapped, on its way out)" in capsys.readouterr().out


def test_every_vm_unless_one_is_named(capsys) -> None:
    """As other commands: each VM's vCPU 0 (two VMs in one VMM), or --vm's."""
    from tests.conftest import MULTI_VM

    s = Session(open_fixture(MULTI_VM[0]))
    capsys.readouterr()
    run_one(s, ["walk", hex(DATA_GPA), "--json"])
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    assert [vm["index"] for vm in doc["vms"]] == [0, 1]
    for vm in doc["vms"]:
        (w,) = vm["walks"]
        assert w["stop"] == "leaf" and w["memslot"]["verdict"] == "match"
    run_one(s, ["walk", hex(DATA_GPA), "--vm", "1", "--json"])
    assert [vm["index"] for vm in json.loads(capsys.readouterr().out)["vms"]] == [1]
