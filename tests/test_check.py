"""check: consistency checks on every fixture, and on edited copies of the model.

The real kernel states are consistent, so the fixtures must give no errors.
To prove each check fires, a copy of a fixture's VMGraph gets one edited
struct kvm_mmu_page (ShadowPage._replace) or one edited edge; the corrupted
vmcore copies of tests/corrupt.py give the model's structural problems.
"""

from __future__ import annotations

import dataclasses
import json
import re

import networkx as nx
import pytest

from kvminspect import check
from kvminspect.check import Finding, FindingKind, Severity, check_vm
from kvminspect.cli import run_one
from kvminspect.graph import Holder, VMGraph
from kvminspect.model import Kernel, ShadowPage
from kvminspect.session import Session
from kvminspect.target import open_core
from tests import corrupt
from tests.conftest import FIXTURES, MULTI_VM, fixtures, open_fixture, truth

SHADOW = fixtures(lambda t: t["mmu"] == "shadow" and not t["zapped"])
ZAPPED = fixtures(lambda t: t["zapped"])
HEX = re.compile(r"^0x[0-9a-f]+$")


def run_check(session: Session, capsys, *argv: str) -> dict:
    capsys.readouterr()
    run_one(session, ["check", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def copied(name: str) -> tuple[Kernel, VMGraph]:
    """The kernel and an independent copy of the VM graph of fixture *name*."""
    s = Session(open_fixture(name))
    vg = s.graph(s.kernel.vms()[0])
    return s.kernel, VMGraph(vg.vm, vg.vcpus, dict(vg.nodes),
                             {a: list(pairs) for a, pairs in vg.links.items()},
                             {a: list(h) for a, h in vg.roots.items()}, set(vg.active),
                             set(vg.orphan_set))


def edit(vg: VMGraph, addr: int, **changes) -> ShadowPage:
    """Replace one page of the copy by an edited ShadowPage."""
    sp = vg.sp(addr)._replace(**changes)
    vg.set_page(sp)
    return sp


def only(findings: list[Finding], check_id: FindingKind) -> Finding:
    """The single finding of *check_id*, and nothing else of error/warning severity."""
    (f,) = [f for f in findings if f.check is check_id]
    others = [x for x in findings if x is not f and x.severity is not Severity.INFO]
    assert others == [], others
    return f


def invalid_role(k: Kernel, sp: ShadowPage):
    """sp's role with role.invalid set."""
    (fld,) = [f for f in k.layout.sp.role_fields if f.name == "invalid"]
    word = sp.role.word | 1 << fld.shift
    return dataclasses.replace(sp.role, word=word, fields={**sp.role.fields, "invalid": 1})


def unsync_leaf(vg: VMGraph) -> tuple[ShadowPage, int, int]:
    """An unsync level-1 page, one parent and the parent's SPTE index."""
    sp = next(s for s in vg.pages() if s.unsync)
    ((parent, (i, *_)), *_) = vg.parents(sp.addr)
    return sp, parent, i


# -- the fixtures as they are ------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_fixtures_are_consistent(name: str, capsys) -> None:
    doc = run_check(Session(open_fixture(name)), capsys)
    assert doc["errors"] == []
    (vm,) = doc["vms"]
    assert vm["pid"] == truth(name)["vmm_pid"] and HEX.match(vm["kvm"])
    assert vm["summary"]["error"] == 0, vm["findings"]
    t = truth(name)
    if t.get("guest_paging") == "pae":
        # no prev_roots with PAE: the PD (and window tables) of a set no vCPU ended on
        # lost its root reference at the last CR3 switch and stays on the list, unreachable
        finals = {v["final_set"] for v in t["vcpus"]}
        left = {int(g, 16) >> 12 for k, s in enumerate(t["sets"]) if k not in finals
                for g in s["pt_gpas"][1:]}
        (f,) = vm["findings"]
        vg = Session(open_fixture(name)).graph(open_fixture(name).kernel.vms()[0])
        assert f["check"] == "orphans" and f["severity"] == "info"
        assert {vg.sp(int(a, 16)).gfn for a in f["objects"]} == left
    elif not t["zapped"]:
        assert vm["findings"] == [] and vm["summary"] == {"error": 0, "warning": 0, "info": 0}
    for f in vm["findings"]:
        assert f["severity"] in check.SEVERITIES and all(HEX.match(a) for a in f["objects"])
    n = {s: sum(f["severity"] == s for f in vm["findings"]) for s in check.SEVERITIES}
    assert vm["summary"] == n


@pytest.mark.parametrize("name", ZAPPED)
def test_zapped_obsolete_roots_in_use_are_normal(name: str, capsys) -> None:
    """Right after a fast zap every vCPU holding an obsolete root has its reload
    request pending: the kernel's normal state, info (one per root)."""
    s = Session(open_fixture(name))
    (vm,) = run_check(s, capsys)["vms"]
    vg = s.graph(s.kernel.vms()[0])
    current = {hex(v.root.sp.addr) for v in vg.vcpus}
    normal = {f["objects"][0] for f in vm["findings"]
              if f["check"] == "obsolete-root" and "reload request pending" in f["message"]}
    assert normal == current and len(current) == 3  # vcpu0 and vcpu3 share a root
    assert {f["severity"] for f in vm["findings"]} == {"info"}
    # (the other info: n_used_mmu_pages counts those roots, tests/test_accounting.py)
    assert {f["check"] for f in vm["findings"]} == {"obsolete-root", "used-mmu-pages"}
    for f in [f for f in vm["findings"] if f["check"] == "obsolete-root"]:
        assert "role.invalid" in f["message"]
        assert "mmu_valid_gen 0 != kvm->arch.mmu_valid_gen 1" in f["message"]
    # the fourth root is only in prev_roots[]
    (cached,) = [f for f in vm["findings"] if "prev_roots[0]" in f["message"]]
    assert cached["check"] == "obsolete-root"
    capsys.readouterr()
    run_one(s, ["check"])
    out = capsys.readouterr().out
    assert "0 errors, 0 warnings, 5 info" in out and "3 more like it (--all lists each)" in out
    run_one(s, ["check", "--all"])
    assert capsys.readouterr().out.count("obsolete-root") == 4


@pytest.mark.parametrize("name", ZAPPED)
def test_obsolete_root_without_reload_request_warns(name: str, tmp_path, capsys) -> None:
    """The same state with vcpu0's reload request cleared: a warning naming vcpu0
    only (vcpu3 shares its root and still has the request)."""
    from kvminspect.target import open_core
    from tests.corrupt import make

    make(name, "reload-request-cleared", tmp_path / "core")
    s = Session(open_core(str(tmp_path / "core"), []))
    (vm,) = run_check(s, capsys)["vms"]
    (warning,) = [f for f in vm["findings"] if f["severity"] == "warning"]
    assert warning["check"] == "obsolete-root"
    assert "as vcpu0.root with no reload" in warning["message"]


def test_clean_human_output(capsys) -> None:
    capsys.readouterr()
    run_one(Session(open_fixture("6.1-shadow")), ["check", "--vm", "0"])
    out = capsys.readouterr().out
    assert "0 errors, 0 warnings, 0 info" in out and "no findings" in out
    assert "\x1b[" not in out


# -- unsync_children and the bitmap ----------------------------------------------------


@pytest.mark.parametrize("name", ["6.1-shadow", "6.12-shadow"])
def test_wrong_unsync_children(name: str) -> None:
    k, vg = copied(name)
    pd = next(s for s in vg.pages() if s.level == 2 and s.unsync_children)
    edit(vg, pd.addr, unsync_children=pd.unsync_children + 1)
    f = only(check_vm(k, vg), FindingKind.UNSYNC_CHILDREN)
    assert f.severity is Severity.ERROR and f.objects == [pd.addr]
    assert f"{pd.addr:#x}" in f.message
    assert f"unsync_children {pd.unsync_children + 1} but {pd.unsync_children} bits" in f.message


def test_stale_bit_on_shared_child_is_info() -> None:
    """spt[0] of every PD is the guest's shared page table: other parents keep bits."""
    k, vg = copied("6.1-shadow")
    pd = next(s for s in vg.pages() if s.level == 2 and s.unsync_children)
    assert not pd.unsync_child_bitmap & 1
    (child,) = [c for i, c in vg.children(pd.addr) if i == 0]
    assert len(vg.parents(child)) > 1 and not vg.sp(child).unsync
    edit(vg, pd.addr, unsync_child_bitmap=pd.unsync_child_bitmap | 1,
         unsync_children=pd.unsync_children + 1)
    f = only(check_vm(k, vg), FindingKind.STALE_BIT)
    assert f.severity is Severity.INFO and f.objects == [pd.addr, child]
    assert "bit 0" in f.message and "other" in f.message


def test_stale_bit_on_only_child_is_warning() -> None:
    k, vg = copied("6.12-shadow")
    parent, child, i = next(
        (p, c, idx[0]) for p, c, idx in vg.edges()
        if len(idx) == 1 and len(vg.parents(c)) == 1 and not vg.sp(c).unsync
        and not vg.sp(c).unsync_children)
    sp = vg.sp(parent)
    edit(vg, parent, unsync_child_bitmap=sp.unsync_child_bitmap | 1 << i,
         unsync_children=sp.unsync_children + 1)
    (f,) = [f for f in check_vm(k, vg) if f.check is FindingKind.STALE_BIT]
    assert f.severity is Severity.WARNING and f.objects == [parent, child]
    assert f"bit {i}" in f.message and f"{child:#x}" in f.message


def test_bit_over_non_present_spte_is_info() -> None:
    k, vg = copied("6.1-shadow")
    pd = next(s for s in vg.pages() if s.level == 2)
    spt = k.sptes(pd)
    i = next(i for i, v in enumerate(spt) if not k.spte_present(v))
    edit(vg, pd.addr, unsync_child_bitmap=pd.unsync_child_bitmap | 1 << i,
         unsync_children=pd.unsync_children + 1)
    findings = check_vm(k, vg)
    (f,) = [f for f in findings if f.check is FindingKind.BIT_NOT_PRESENT]
    assert f.severity is Severity.INFO and f.objects == [pd.addr]
    assert f"bit {i}" in f.message and "__mmu_unsync_walk" in f.message
    assert [x for x in findings if x.severity is not Severity.INFO] == []


def test_bit_on_level1_page() -> None:
    k, vg = copied("6.1-shadow")
    leaf, _, _ = unsync_leaf(vg)
    edit(vg, leaf.addr, unsync_child_bitmap=1 << 7, unsync_children=1)
    f = only(check_vm(k, vg), FindingKind.BIT_ON_LEAF)
    assert f.severity is Severity.ERROR and f.objects == [leaf.addr] and "(7)" in f.message


@pytest.mark.parametrize("name", ["6.1-shadow", "6.12-shadow-6x6"])
def test_missing_parent_bit(name: str) -> None:
    k, vg = copied(name)
    leaf, parent, i = unsync_leaf(vg)
    p = vg.sp(parent)
    assert p.unsync_child_bitmap >> i & 1
    edit(vg, parent, unsync_child_bitmap=p.unsync_child_bitmap & ~(1 << i),
         unsync_children=p.unsync_children - 1)
    f = only(check_vm(k, vg), FindingKind.MISSING_BIT)
    assert f.severity is Severity.ERROR and f.objects == [parent, leaf.addr]
    assert f"bit {i}" in f.message and "is unsync" in f.message


def test_missing_bit_for_unsync_children() -> None:
    """A page with unsync_children whose parent lost its bit (one level up)."""
    k, vg = copied("6.1-shadow")
    pd = next(s for s in vg.pages() if s.level == 2 and s.unsync_children)
    ((parent, (i, *_)),) = vg.parents(pd.addr)
    p = vg.sp(parent)
    edit(vg, parent, unsync_child_bitmap=p.unsync_child_bitmap & ~(1 << i),
         unsync_children=p.unsync_children - 1)
    findings = check_vm(k, vg)
    (f,) = [f for f in findings if f.severity is Severity.ERROR]
    assert f.check is FindingKind.MISSING_BIT and f.objects == [parent, pd.addr]
    assert f"unsync_children {pd.unsync_children}" in f.message
    # the level-3 parent now has no unsync children, so the root's bit over it is stale
    (root,) = vg.parents(parent)
    (stale,) = [f for f in findings if f.check is FindingKind.STALE_BIT]
    assert stale.objects == [root[0], parent] and stale.severity is Severity.WARNING


def test_unsync_page_not_level1() -> None:
    k, vg = copied("6.1-shadow")
    pd = next(s for s in vg.pages() if s.level == 2)
    edit(vg, pd.addr, unsync=True)
    found = [f for f in check_vm(k, vg) if f.check is FindingKind.UNSYNC_PAGE]
    assert [f.objects for f in found] == [[pd.addr]] and "level 2" in found[0].message


def test_unsync_tdp_page() -> None:
    k, vg = copied("6.1-tdp")
    leaf = next(s for s in vg.pages() if s.level == 1)
    edit(vg, leaf.addr, unsync=True)
    root = next(iter(vg.roots))
    edit(vg, root, unsync_children=1, unsync_child_bitmap=1)
    found = {tuple(f.objects): f for f in check_vm(k, vg) if f.check is FindingKind.UNSYNC_PAGE}
    assert set(found) == {(leaf.addr,), (root,)}
    assert "TDP MMU page" in found[(leaf.addr,)].message
    assert "unsync_children 1" in found[(root,)].message


# -- roots ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,delta", [("6.1-shadow", 1), ("6.12-shadow-6x6", -1),
                                        ("6.1-tdp-legacy", 1)])
def test_root_count_off_by_one(name: str, delta: int) -> None:
    k, vg = copied(name)
    root = next(a for a, h in vg.roots.items() if any(x.kind == "root" for x in h))
    sp = vg.sp(root)
    edit(vg, root, root_count=sp.root_count + delta)
    f = only(check_vm(k, vg), FindingKind.ROOT_COUNT)
    assert f.severity is Severity.ERROR and f.objects == [root]
    assert f"root_count {sp.root_count + delta} but expected {sp.root_count}" in f.message
    n = len(vg.roots[root])
    assert f"{n} vCPU reference{'' if n == 1 else 's'}" in f.message


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "tdp_mmu"))
def test_tdp_root_count_includes_the_list(name: str) -> None:
    k, vg = copied(name)
    (root,) = vg.roots
    if not k.layout.tdp_root_refcount:  # 5.10-5.12: one reference per vCPU, none for the list
        assert vg.sp(root).root_count == 4 and len(vg.vcpus) == 4
        assert [f for f in check_vm(k, vg) if f.check is FindingKind.ROOT_COUNT] == []
        edit(vg, root, root_count=5)
        f = only(check_vm(k, vg), FindingKind.ROOT_COUNT)
        assert f.severity is Severity.ERROR and "root_count 5 but expected 4" in f.message
        return
    assert vg.sp(root).root_count == 5 and len(vg.vcpus) == 4
    edit(vg, root, root_count=6)
    f = only(check_vm(k, vg), FindingKind.ROOT_COUNT)
    assert f.severity is Severity.ERROR and "root_count 6 but expected 5" in f.message
    assert "4 vCPU references + 1 for tdp_mmu_roots" in f.message
    # one reference per vCPU only: how kernels counted before the list held one
    edit(vg, root, root_count=4)
    f = only(check_vm(k, vg), FindingKind.ROOT_COUNT)
    assert f.severity is Severity.WARNING and "expected 5" in f.message
    assert "Preserve TDP MMU roots" in f.message
    # an invalid root may have dropped the list's reference already
    for n in (4, 5):
        edit(vg, root, root_count=n, role=invalid_role(k, vg.sp(root)))
        assert [f.check for f in check_vm(k, vg) if f.check is FindingKind.ROOT_COUNT] == []


def test_unheld_root() -> None:
    k, vg = copied("6.1-shadow")
    pd = next(s for s in vg.pages() if s.level == 2)
    edit(vg, pd.addr, root_count=1)
    vg.roots[pd.addr] = [Holder("root_count")]
    f = only(check_vm(k, vg), FindingKind.UNHELD_ROOT)
    assert f.severity is Severity.INFO and f.objects == [pd.addr] and "root_count 1" in f.message


def test_obsolete_current_root() -> None:
    k, vg = copied("6.12-shadow")
    v0 = vg.vcpus[0]
    edit(vg, v0.root.sp.addr, mmu_valid_gen=7)  # an old generation: obsolete
    f = only(check_vm(k, vg), FindingKind.OBSOLETE_ROOT)
    assert f.severity is Severity.WARNING and f.objects == [v0.root.sp.addr]
    assert "vcpu0.root" in f.message and "mmu_valid_gen 7 != kvm->arch.mmu_valid_gen 0" in f.message


def test_orphans() -> None:
    """Unlink a level-3 page from its root: its subtree becomes unreachable.

    (Except the guest's shared page table, which the other roots still reach.)
    """
    k, vg = copied("6.1-shadow")
    root = next(a for a in vg.roots if vg.sp(a).unsync_children == 0)
    (l3,) = vg.successors(root)
    vg.unlink(root, l3)
    reach = set(vg.roots)
    for r in vg.roots:
        reach |= nx.descendants(vg.graph, r)
    lost = ({l3} | nx.descendants(vg.graph, l3)) - reach
    assert set(vg.orphans()) == lost
    assert l3 in lost and len(lost) >= 3  # level 3, 2 and the set's own page tables
    f = only(check_vm(k, vg), FindingKind.ORPHANS)
    assert f.severity is Severity.INFO and set(f.objects) == lost
    assert f.message.startswith(f"{len(lost)} shadow page{'' if len(lost) == 1 else 's'} ")
    assert f"{min(lost):#x}" in f.message
    if len(lost) > check.MAX_LISTED:
        assert f"and {len(lost) - check.MAX_LISTED} more" in f.message


# -- the model's problems --------------------------------------------------------------


@pytest.mark.parametrize("case", ["wrong-child-level", "level-zero", "unsync-children-huge"])
def test_model_problems_are_errors(case: str, tmp_path, capsys) -> None:
    patches = corrupt.make("6.1-shadow", case, tmp_path)
    damaged = re.search(r"0x[0-9a-f]+", patches[0].what).group(0)
    s = Session(open_core(str(tmp_path), []))
    (vm,) = run_check(s, capsys)["vms"]
    model = [f for f in vm["findings"] if f["check"] == "model"]
    assert model and all(f["severity"] == "error" for f in model)
    assert {str(p) for p in s.kernel.problems} == {f["message"] for f in model}
    assert any(damaged in f["message"] for f in model)
    if case == "unsync-children-huge":
        (f,) = [f for f in vm["findings"] if f["check"] == "unsync-children"]
        assert f["objects"] == [damaged] and "unsync_children 1000" in f["message"]


@pytest.mark.parametrize("name", MULTI_VM)
def test_problems_attributed_to_their_vm(name: str, capsys) -> None:
    """Two VMs: a problem met while reading one VM is in its documents only, whichever
    command met it first; each VM's findings name only its own pages."""
    s = Session(open_fixture(name))
    a, b = s.kernel.vms()
    ga, gb = s.graph(a), s.graph(b)
    assert not set(ga.graph) & set(gb.graph)
    sp = next(iter(ga.graph))
    with s.kernel.reading(a):
        s.kernel.problem("struct kvm_mmu_page", sp, "made up by the test")
    try:
        for cmd in ("roots", "tree", "check"):
            capsys.readouterr()
            run_one(s, [cmd, "--vm", "0", "--json"])
            assert [e["addr"] for e in json.loads(capsys.readouterr().out)["errors"]] == [hex(sp)]
            run_one(s, [cmd, "--vm", "1", "--json"])
            assert json.loads(capsys.readouterr().out)["errors"] == []
        run_one(s, ["check", "--json"])
        doc = json.loads(capsys.readouterr().out)
        (f,) = [f for f in doc["vms"][0]["findings"] if f["check"] == "model"]
        assert f["objects"] == [hex(sp)] and doc["vms"][1]["findings"] == []
    finally:
        s.kernel.problems.discard(a.addr)


def test_root_count_with_uncounted_references(tmp_path, capsys) -> None:
    """A reference the model cannot resolve makes a root_count surplus a warning."""
    corrupt.make("6.1-shadow", "prev-root-unmapped", tmp_path)
    (vm,) = run_check(Session(open_core(str(tmp_path), [])), capsys)["vms"]
    (f,) = [f for f in vm["findings"] if f["check"] == "root-count"]
    assert f["severity"] == "warning" and "root_count 4 but expected 3" in f["message"]
    assert "not counted: vcpu0: 1 root whose hpa has no readable struct page" in f["message"]


def test_root_count_with_nested_vcpu() -> None:
    k, vg = copied("6.1-shadow")
    root = vg.vcpus[0].root.sp.addr
    edit(vg, root, root_count=vg.sp(root).root_count + 1)
    vg.vcpus = [dataclasses.replace(vg.vcpus[0], mmu_name="guest_mmu"), *vg.vcpus[1:]]
    # the roots of both root_mmu and guest_mmu are in the model (VCpu.other_mmu,
    # tests/test_nested.py): a nested vCPU no longer excuses an extra reference
    f = only(check_vm(k, vg), FindingKind.ROOT_COUNT)
    assert f.severity is Severity.ERROR and "not counted" not in f.message
