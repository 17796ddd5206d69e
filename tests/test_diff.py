"""diff A B: two vmcores of one host, before and after.

On the committed fixtures: a core against itself has no changes; two cores of
two boots share no VM (added and removed); the one-shot, -c and REPL forms
agree; the matching rules on pages made up from a real page; two kernels are
one line, exit 1. Then a real pair of one host, before and after a fast zap:
the committed one (tests/vmcores/6.1-shadow-pair, mkfixture --pair), where
--vm selects in both dumps, and one of a running host (tests/live/host.py):
dumped through QMP, a fast zap, dumped again. The diff must show what the
kernel did and nothing else: mmu_valid_gen 0 -> 1, the halted vCPUs' roots
kept but invalid and obsolete, every other page zapped, nothing added, all
as the VMM's record says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvminspect.cli import run_one
from kvminspect.commands.diff import DifferentKernels, same_kernel
from kvminspect.diff import MatchedBy, pair_of, pair_pages, partner
from kvminspect.errors import LookupFailed
from kvminspect.graph import VMGraph
from kvminspect.model import Role, ShadowPage
from kvminspect.options import split_first_core
from kvminspect.session import Session
from kvminspect.target import open_core
from tests.conftest import FIXTURES, MULTI_VM, PAIRS, VMCORES, open_fixture, truth
from tests.conftest import run_main as run
from tests.test_schema import VALIDATOR, validate

SHADOW = str(VMCORES / "6.1-shadow")
PAIR = "6.1-shadow-pair"  # mkfixture --pair: PAIR/before and PAIR/after, one boot
BEFORE, AFTER = (str(VMCORES / PAIR / side) for side in ("before", "after"))


def diff_json(argv: list[str], capsys) -> dict:
    status, out, err = run([*argv, "--json"], capsys)
    assert status == 0, err
    doc = json.loads(out)
    validate(doc)
    assert doc["command"] == "diff"
    return doc


def no_changes(vm: dict) -> bool:
    return (vm["status"] == "unchanged" and vm["matched_by"] == "kvm"
            and not any(vm[k] for k in ("counters", "stat", "vcpus", "pages_added",
                                        "pages_zapped", "pages_changed"))
            and vm["pages"]["old"] == vm["pages"]["new"] and vm["before"] == vm["after"])


# -- committed fixtures -----------------------------------------------------------


@pytest.mark.slow
def test_a_core_against_itself_has_no_changes(capsys) -> None:
    doc = diff_json(["diff", SHADOW, SHADOW], capsys)
    (vm,) = doc["vms"]
    assert no_changes(vm), vm
    assert vm["pid"] == truth("6.1-shadow")["vmm_pid"] and vm["pages"]["old"] == 37
    assert doc["errors"] == [] and doc["warnings"] == []
    status, out, err = run(["diff", SHADOW, SHADOW], capsys)
    assert status == 0 and err == ""
    assert out.splitlines() == [
        f"VM 0  kvm {vm['kvm']}  pid {vm['pid']}  shadow: no changes (matched by kvm)"]
    # the schema is no rubber stamp for diff either
    for bad in ({**vm, "status": "moved"}, {**vm, "pages": {"old": 1}},
                {**vm, "pages_changed": [{**vm["before"], "changes": {}}]}):
        assert list(VALIDATOR.iter_errors({**doc, "vms": [bad]}))


@pytest.mark.slow
@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_every_fixture_against_itself(name: str, capsys) -> None:
    """Every MMU kind and kernel: each VM matched by address, nothing changed."""
    capsys.readouterr()
    run_one(Session(open_fixture(name)), ["diff", str(VMCORES / name), "--json"])
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    assert len(doc["vms"]) == len(truth(name).get("vms", [None]))
    assert all(no_changes(vm) for vm in doc["vms"]), name


@pytest.mark.slow
def test_two_vms_against_themselves_and_vm_selection(capsys) -> None:
    two = str(VMCORES / "6.1-shadow-2vm")
    doc = diff_json(["diff", two, two], capsys)
    assert len(doc["vms"]) == 2 and all(no_changes(vm) for vm in doc["vms"])
    (vm,) = diff_json(["diff", two, two, "--vm", "1"], capsys)["vms"]
    assert vm["index"] == 1 and no_changes(vm)
    status, _, err = run(["diff", two, two, "--vm", "7"], capsys)
    assert status == 1 and err == "kvminspect: error: A (6.1-shadow-2vm): no VM '7' (have 2)\n"
    # a pid two VMs share is ambiguous in each dump: the index tells them apart
    pid = truth("6.1-shadow-2vm")["vmm_pid"]
    status, _, err = run(["diff", two, two, "--vm", f"pid:{pid}"], capsys)
    assert status == 1 and err == (f"kvminspect: error: A (6.1-shadow-2vm): VM 'pid:{pid}' is "
                                   f"ambiguous: pid {pid} owns VMs 0, 1 (use the index)\n")


@pytest.mark.slow
def test_two_boots_share_no_vm(capsys) -> None:
    """6.1-shadow-zapped is another boot: another struct kvm, another VMM pid."""
    zapped = str(VMCORES / "6.1-shadow-zapped")
    doc = diff_json(["diff", SHADOW, zapped], capsys)
    removed, added = doc["vms"]
    assert removed["status"] == "removed" and removed["after"] is None
    assert removed["pid"] == truth("6.1-shadow")["vmm_pid"] == removed["before"]["pid"]
    assert added["status"] == "added" and added["before"] is None
    assert added["pid"] == truth("6.1-shadow-zapped")["vmm_pid"] == added["after"]["pid"]
    for vm in doc["vms"]:
        assert vm["matched_by"] is None and vm["vcpus"] == vm["pages_zapped"] == []
    _, out, _ = run(["diff", SHADOW, zapped], capsys)
    assert "removed (only in A)" in out and "added (only in B)" in out
    # --vm selects in both dumps: a VM only in one is one line, exit 1, naming the dump
    a_pid, b_pid = removed["pid"], added["pid"]
    for ident, line in ((f"pid:{b_pid}", f"A (6.1-shadow): no VM 'pid:{b_pid}'"),
                        (f"pid:{a_pid}", f"B (6.1-shadow-zapped): no VM 'pid:{a_pid}'"),
                        ("0", f"B (6.1-shadow-zapped): no VM has A's VM 0's struct kvm "
                              f"{removed['kvm']} or its pid {a_pid}")):
        status, out, err = run(["diff", SHADOW, zapped, "--vm", ident], capsys)
        assert (status, out, err) == (1, "", f"kvminspect: error: {line}\n"), ident


@pytest.mark.slow
def test_the_three_forms_agree(capsys) -> None:
    """kvminspect diff A B, kvminspect -c A diff B, and 'diff B' in a session on A."""
    one = diff_json(["diff", SHADOW, "--vm", "0", SHADOW], capsys)
    assert diff_json(["-c", SHADOW, "diff", SHADOW, "--vm", "0"], capsys) == one
    capsys.readouterr()
    session = Session(open_fixture("6.1-shadow"))
    run_one(session, ["diff", SHADOW, "--json"])
    assert json.loads(capsys.readouterr().out) == one
    assert session.other(SHADOW) is session.other(SHADOW + "/")  # B is opened once


@pytest.mark.slow
def test_a_damaged_b(tmp_path: Path, capsys) -> None:
    """B's problems are in the document (and on stderr) marked as B's; the damaged
    page is a change like any other."""
    from tests.corrupt import make

    damaged = tmp_path / "b"
    make("6.1-shadow", "unsync-children-huge", damaged)
    (vm,) = (doc := diff_json(["diff", SHADOW, str(damaged)], capsys))["vms"]
    (page,) = vm["pages_changed"]
    assert page["level"] == 2 and page["changes"]["unsync_children"]["new"] == 1000
    assert vm["pages_added"] == vm["pages_zapped"] == [] and vm["vcpus"] == []
    assert [e["error"] for e in doc["errors"]] == ["impossible unsync_children 1000 (in B)"]
    assert doc["errors"][0]["addr"] == page["sp"]
    status, out, err = run(["diff", SHADOW, str(damaged)], capsys)
    assert status == 0 and "unsync_children 20 -> 1000" in out
    assert err == (f"kvminspect: warning: struct kvm_mmu_page {page['sp']}: "
                   "impossible unsync_children 1000 (in B)\n")


def test_in_the_repl(tmp_path: Path, capsys) -> None:
    """'diff B' is a REPL line like any other (errors one line, the REPL goes on);
    Tab completes B as a file name."""
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from kvminspect.repl import ReplCompleter, run_line

    session = Session(open_fixture("6.1-shadow"))
    capsys.readouterr()
    assert run_line(session, f"diff {SHADOW}")
    assert run_line(session, "diff /no/such/core")
    out, err = capsys.readouterr()
    assert out.endswith("shadow: no changes (matched by kvm)\n")
    assert err == "kvminspect: error: /no/such/core: no such file or directory\n"
    (tmp_path / "vmcore-after.elf").write_text("")
    text = f"diff {tmp_path}/vmcore-a"
    found = ReplCompleter(session).get_completions(Document(text, len(text)),
                                                   CompleteEvent(completion_requested=True))
    assert [c.text for c in found] == ["fter.elf"]


def test_command_line_errors_and_help(capsys) -> None:
    assert split_first_core(["--json", "A", "--vm", "0", "B"]) == ("A", ["--json", "--vm", "0",
                                                                         "B"])
    for argv in (["diff"], ["diff", SHADOW], ["diff", "--vm", "0", SHADOW]):
        status, out, err = run(argv, capsys)
        assert status == 2 and out == ""
        assert err == "kvminspect: error: diff needs two vmcores: kvminspect diff A B " \
                      "(or -c A diff B)\n"
    other = str(VMCORES / "6.12-shadow")  # another kernel: one line, exit 1 (not a usage error)
    status, out, err = run(["diff", SHADOW, other], capsys)
    assert (status, out) == (1, "")
    assert err == (f"kvminspect: error: {other}: kernel 6.12.117+deb12-amd64, but A's is "
                   "6.1.0-56-amd64: diff compares two vmcores of one kernel\n")
    status, _, err = run(["diff", SHADOW, "/no/such/core"], capsys)
    assert status == 1 and err == "kvminspect: error: /no/such/core: no such file or directory\n"
    for argv in (["help", "diff"], ["diff", "-h"], ["-c", SHADOW, "help", "diff"]):
        status, out, _ = run(argv, capsys)
        assert status == 0 and out.startswith("usage: diff [--vm ID] [--json] B\n"), argv
    status, out, _ = run(["help"], capsys)
    assert status == 0 and "\n  diff     what changed between" in out


# -- the matching rules, on pages made up from a real one -------------------------


def test_pages_match_by_gfn_and_role_not_by_address() -> None:
    target = open_fixture("6.1-shadow")
    g0 = Session(target).graph(target.kernel.vms()[0])
    real = g0.sp(g0.root_order()[0])
    invalid_bit = next(1 << f.shift for f in target.kernel.layout.sp.role_fields
                       if f.name == "invalid")

    def page(addr: int, gfn: int, gen: int = 0, invalid: bool = False) -> ShadowPage:
        word = real.role.word | (invalid_bit if invalid else 0)
        role = Role(word, {**real.role.fields, "invalid": int(invalid)}, real.role.widths)
        return real._replace(addr=addr, gfn=gfn, role=role, mmu_valid_gen=gen)

    def graph(*pages: ShadowPage) -> VMGraph:
        g = VMGraph(g0.vm, [])
        for p in pages:
            g.set_page(p)
        return g

    a = graph(page(0x1000, 0x10),                 # kept: same address, now invalid
              page(0x2000, 0x20),                 # its address reused for another gfn
              page(0x3000, 0x30),                 # rebuilt at another address
              page(0x4000, 0x40),                 # zapped, a new generation's page made
              page(0x5000, 0x50, invalid=True))   # invalid: gone, never comes back
    b = graph(page(0x1000, 0x10, invalid=True),
              page(0x2000, 0x21),
              page(0x3800, 0x30),
              page(0x4800, 0x40, gen=1),
              page(0x5800, 0x50))
    pairs, zapped, added = pair_pages(a, b)
    assert sorted((x.addr, y.addr) for x, y in pairs) == [(0x1000, 0x1000), (0x3000, 0x3800)]
    assert sorted(s.addr for s in zapped) == [0x2000, 0x4000, 0x5000]
    assert sorted(s.addr for s in added) == [0x2000, 0x4800, 0x5800]


def test_one_vm_chosen_in_each_dump() -> None:
    """--vm's pairing (kvminspect.diff.partner, pair_of) on VMs made up from a real one:
    an index finds A's VM in B by struct kvm and owner, else by the one VM of its pid
    (several: ambiguous); a pid, name or address chosen in each dump pairs by struct
    kvm, owner pid or the name, and a reused address of another owner is two VMs."""
    vm = open_fixture("6.1-shadow").kernel.vms()[0]
    moved = replace(vm, addr=vm.addr + 0x2000)  # another struct kvm, the same VMM
    stranger = replace(vm, addr=vm.addr + 0x4000, pid=vm.pid + 1, stats_id=f"kvm-{vm.pid + 1}")
    assert partner(vm, [stranger, vm]) == (vm, MatchedBy.KVM)
    assert partner(vm, [stranger, moved]) == (moved, MatchedBy.PID)
    with pytest.raises(LookupFailed, match=r"^A's VM 0 is ambiguous: none has its struct kvm "
                       rf"{vm.addr:#x}, and its pid {vm.pid} owns VMs 0, 1$"):
        partner(vm, [moved, replace(moved, addr=vm.addr + 0x6000, index=1)])
    with pytest.raises(LookupFailed, match=r"^no VM has A's VM 0's struct kvm"):
        partner(vm, [stranger])
    assert pair_of(vm, vm, f"pid:{vm.pid}") is MatchedBy.KVM
    assert pair_of(vm, moved, f"pid:{vm.pid}") is MatchedBy.PID
    web_a, web_b = replace(vm, guest_name="web"), replace(stranger, guest_name="web")
    assert pair_of(web_a, web_b, "web") is MatchedBy.NAME  # QEMU restarted: its guest name
    assert pair_of(web_a, web_b, hex(vm.addr)) is None
    assert pair_of(vm, replace(vm, pid=vm.pid + 1), hex(vm.addr)) is None  # address reused


def test_two_builds_of_one_release_are_two_kernels() -> None:
    """The release and the vmlinux build id must both agree (stand-in sessions); a
    real dump names its build id (VMCOREINFO's BUILD-ID, as drgn reads it)."""
    assert open_fixture("6.1-shadow").build_id == \
        open_fixture(f"{PAIR}/after").build_id == "eb4fbcd037e7253717950bf2b93bd5566f47c56f"
    def dump(release: str, build_id: str | None) -> SimpleNamespace:
        return SimpleNamespace(target=SimpleNamespace(release=release, build_id=build_id))

    same_kernel(dump("6.1.0-56-amd64", "eb"), dump("6.1.0-56-amd64", "eb"), "B")
    same_kernel(dump("6.1.0-56-amd64", "eb"), dump("6.1.0-56-amd64", None), "B")
    with pytest.raises(DifferentKernels) as e:
        same_kernel(dump("6.1.0-56-amd64", "eb"), dump("6.1.0-56-amd64", "01"), "B")
    assert str(e.value) == ("B: kernel 6.1.0-56-amd64 build id 01, but A's build id is eb: "
                            "diff compares two vmcores of one kernel") and e.value.status == 1


# -- what a fast zap does, as the VMM's record says ------------------------------------


def check_fast_zap(vm: dict, t: dict) -> None:
    """*vm*, the diff of a host's one VM before and after the VMM zapped it (a
    memslot added and deleted: kvm_mmu_zap_all_fast), against the VMM's record *t*:
    mmu_valid_gen 0 -> 1; every root a halted vCPU holds (root and prev_roots[],
    one per set) kept at its address, now invalid and obsolete; every other page
    zapped, the unsync ones the guest wrote among them; nothing added; the kernel's
    own counters agree."""
    assert vm["pid"] == t["vmm_pid"] and vm["status"] == "changed" and vm["matched_by"] == "kvm"
    assert vm["before"]["kvm"] == vm["after"]["kvm"] == vm["kvm"]
    assert vm["counters"]["mmu_valid_gen"] == {"old": 0, "new": 1}
    assert vm["before"]["mmu_valid_gen"] == 0 and vm["after"]["mmu_valid_gen"] == 1
    set_gfns = {int(s["cr3"], 16) >> 12 for s in t["sets"]}

    # halted vCPUs keep every root (root and prev_roots[]): same page, now invalid
    assert [v["vcpu_idx"] for v in vm["vcpus"]] == list(range(len(t["vcpus"])))
    for v, tv in zip(vm["vcpus"], t["vcpus"], strict=True):
        assert v["status"] == "changed" and v["cr3"] == {"old": tv["cr3"], "new": tv["cr3"]}
        slots = {r["slot"]: r for r in v["roots"]}
        assert slots["root"]["old"]["pgd"] == tv["cr3"]
        assert {r["old"]["pgd"] for s, r in slots.items() if s != "root"} == \
            {s["cr3"] for s in t["sets"]} - {tv["cr3"]}  # the other sets are cached
        for r in v["roots"]:
            old, new = r["old"], r["new"]
            assert (old["pgd"], old["hpa"]) == (new["pgd"], new["hpa"])
            assert old["page"]["sp"] == new["page"]["sp"]
            assert int(old["page"]["gfn"], 16) == int(old["pgd"], 16) >> 12
            assert not old["page"]["invalid"] and not old["page"]["obsolete"]
            assert new["page"]["invalid"] and new["page"]["obsolete"]

    # the roots are the pages left: changed, at the same address
    assert vm["pages_added"] == []
    changed = vm["pages_changed"]
    assert {int(p["gfn"], 16) for p in changed} == set_gfns
    for p in changed:
        c = p["changes"]
        assert "sp" not in c and c["invalid"] == c["obsolete"] == {"old": False, "new": True}
        assert p["level"] == 4 and "root_count" not in c  # the vCPUs still hold them
    # every other page was zapped: the sets' page tables and every unsync one
    zapped = vm["pages_zapped"]
    assert vm["pages"] == {"old": len(zapped) + len(changed), "new": len(changed)}
    gfns = {int(p["gfn"], 16) for p in zapped}
    assert gfns >= {int(g, 16) >> 12 for s in t["sets"] for g in s["pt_gpas"]} - set_gfns
    assert all(p["level"] < 4 and not p["obsolete"] for p in zapped)
    unsync = {p["gfn"] for p in zapped if p["unsync"]}
    assert unsync == {g for s in t["sets"] for g in s["unsync_gfns"]}
    # the kernel's own count agrees: kvm_zap_obsolete_pages prepared every page
    assert vm["stat"]["mmu_shadow_zapped"]["new"] - vm["stat"]["mmu_shadow_zapped"]["old"] \
        == vm["pages"]["old"]
    assert vm["counters"]["n_used_mmu_pages"] == vm["pages"]


def check_fast_zap_text(out: str, vm: dict, t: dict) -> None:
    """The text of check_fast_zap's diff: the summary line, the counters, the sections."""
    lines = out.splitlines()
    zapped, changed = len(vm["pages_zapped"]), len(vm["pages_changed"])
    assert lines[0].endswith(f"shadow: changed (matched by kvm): {len(t['vcpus'])} vCPUs, "
                             f"{zapped} pages zapped, 0 added, {changed} changed")
    assert lines[1].startswith("  mmu_valid_gen 0 -> 1, n_used_mmu_pages ")
    assert f"shadow pages zapped ({zapped}):" in lines
    assert f"shadow pages changed ({changed}):" in lines
    assert "shadow pages added" not in out


# -- the committed pair: one host, one boot, before and after a fast zap ---------------


def test_the_pair_is_committed() -> None:
    assert PAIR in PAIRS


@pytest.mark.slow
def test_the_pair_shows_the_fast_zap(capsys) -> None:
    """What the VMM's record (truth.json of both sides) says the zap did, and only
    that; the one-shot, -c and REPL forms agree."""
    t = truth(f"{PAIR}/before")
    assert truth(f"{PAIR}/after")["zapped"] and not t["zapped"]
    doc = diff_json(["diff", BEFORE, AFTER], capsys)
    assert doc["errors"] == [] and doc["warnings"] == []
    (vm,) = doc["vms"]
    check_fast_zap(vm, t)
    assert diff_json(["-c", BEFORE, "diff", AFTER], capsys) == doc
    status, out, err = run(["diff", BEFORE, AFTER], capsys)
    assert status == 0 and err == ""
    check_fast_zap_text(out, vm, t)


@pytest.mark.slow
def test_vm_selects_in_both_dumps_of_the_pair(capsys) -> None:
    """--vm by index, pid:PID, name (kvm->stats_id) or struct kvm address, and the VM
    selected in a REPL on A: the one VM of both dumps, matched by its struct kvm."""
    pid = truth(f"{PAIR}/before")["vmm_pid"]
    whole = diff_json(["diff", BEFORE, AFTER], capsys)
    kvm = whole["vms"][0]["kvm"]
    for ident in ("0", f"pid:{pid}", f"kvm-{pid}", kvm, kvm[2:]):
        assert diff_json(["diff", BEFORE, AFTER, "--vm", ident], capsys) == whole, ident
    session = Session(open_fixture(f"{PAIR}/before"))
    session.select(f"pid:{pid}")
    capsys.readouterr()
    run_one(session, ["diff", AFTER, "--json"])
    assert json.loads(capsys.readouterr().out) == whole
    for ident, line in (("1", "A (before): no VM '1' (have 1)"),
                        ("pid:1", "A (before): no VM 'pid:1'")):
        status, out, err = run(["diff", BEFORE, AFTER, "--vm", ident], capsys)
        assert (status, out, err) == (1, "", f"kvminspect: error: {line}\n"), ident
    # another boot of the same kernel: its VM is not this one
    status, _, err = run(["diff", SHADOW, AFTER, "--vm", f"kvm-{pid}"], capsys)
    assert status == 1 and err == (f"kvminspect: error: A (6.1-shadow): no VM 'kvm-{pid}' "
                                   "(have 1: index, pid:PID, kvm address, or name)\n")


# -- a real pair: one running host, before and after a fast zap -------------------


@pytest.fixture(scope="module")
def host():
    from tests.live.host import booted

    yield from booted(qmp=2)  # socket 0 stays free for other readers


def dump(host, path: Path) -> Path:
    """The host's memory as an ELF core (QMP dump-guest-memory, the guest paused
    meanwhile), through the second QMP socket."""
    from tests.vmcores.pipeline.mkfixture import QMP

    qmp = QMP(host.qmp_sockets[1])
    try:
        qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}")
    finally:
        qmp.f.close()
        qmp.sock.close()
    return path


@pytest.fixture(scope="module")
def cores(host, tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(before, after): dumps around one fast zap (about 550 MB each, deleted after
    the module: pytest keeps its last temporary directories)."""
    d = tmp_path_factory.mktemp("diff")
    try:
        before = dump(host, d / "before.elf")
        assert host.zap() == 1
        yield before, dump(host, d / "after.elf")
    finally:
        for f in d.glob("*.elf"):
            f.unlink()


def symbols(host) -> list[str]:
    return [a for f in host.debug_files for a in ("-s", f)]


@pytest.mark.slow
@pytest.mark.live
def test_live_fast_zap(host, cores, capsys) -> None:
    before, after = cores
    doc = diff_json([*symbols(host), "diff", str(before), str(after)], capsys)
    assert doc["errors"] == []
    (vm,) = doc["vms"]
    check_fast_zap(vm, host.truth)
    status, out, err = run([*symbols(host), "diff", str(before), str(after)], capsys)
    assert status == 0 and err == ""
    check_fast_zap_text(out, vm, host.truth)


@pytest.mark.slow
@pytest.mark.live
def test_live_repl_form_and_the_reverse(host, cores, capsys) -> None:
    """'diff B' in a session on A opens B with A's -s paths; B against A is the
    mirror image (what was zapped is added)."""
    before, after = cores
    forward = diff_json([*symbols(host), "diff", str(before), str(after)], capsys)
    capsys.readouterr()
    session = Session(open_core(str(before), host.debug_files))
    run_one(session, ["diff", str(after), "--json"])
    assert json.loads(capsys.readouterr().out) == forward
    back = diff_json([*symbols(host), "diff", str(after), str(before)], capsys)["vms"][0]
    fwd = forward["vms"][0]
    assert back["counters"]["mmu_valid_gen"] == {"old": 1, "new": 0}
    assert [p["sp"] for p in back["pages_added"]] == [p["sp"] for p in fwd["pages_zapped"]]
    assert back["pages_zapped"] == [] and len(back["pages_changed"]) == len(fwd["pages_changed"])
