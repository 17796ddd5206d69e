"""vms, vcpus, roots, tree, sp and vm against every fixture's truth.json."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any, cast

import pytest
from rich.console import Console

from kvminspect.cli import run_one
from kvminspect.commands.tree import TreePlan, label_units, start_pages, unsync_only_pages
from kvminspect.errors import LookupFailed, UsageError
from kvminspect.layout import UNKNOWN, UNREADABLE
from kvminspect.model import is_obsolete_sp
from kvminspect.render import compact, print_lines, wrap_words
from kvminspect.results import TreeNode, page_view
from kvminspect.session import Session
from kvminspect.shapes import LeafTexts, tree_node_json
from tests.conftest import FIXTURES, MULTI_VM, PAIR_SIDES, VMCORES, fixtures, open_fixture, truth


def run_json(name: str, *argv: str, capsys) -> dict:
    """Run one command with --json on a fresh session of fixture *name*."""
    capsys.readouterr()
    run_one(Session(open_fixture(name)), [*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def run_text(name: str, *argv: str, capsys) -> str:
    capsys.readouterr()
    run_one(Session(open_fixture(name)), list(argv))
    return capsys.readouterr().out


def is_hex(v) -> bool:
    return isinstance(v, str) and v.startswith("0x") and int(v, 16) >= 0


def long_shadow(t: dict) -> bool:
    """A shadow-MMU fixture whose guest runs 4-level long mode, not zapped."""
    return t["mmu"] == "shadow" and not t["zapped"] and t.get("guest_paging", "long") == "long"


@pytest.mark.parametrize("name", FIXTURES)
def test_vms(name: str, capsys) -> None:
    t = truth(name)
    doc = run_json(name, "vms", capsys=capsys)
    assert doc["errors"] == []
    (vm,) = doc["vms"]
    assert vm["pid"] == t["vmm_pid"] and vm["comm"] == "vmm"
    assert vm["online_vcpus"] == vm["created_vcpus"] == len(t["vcpus"])
    assert vm["mmu"] == t["mmu"] and vm["vendor"] == "kvm_amd"
    assert is_hex(vm["kvm"]) and int(vm["kvm"], 16) >> 56 == 0xFF
    assert 0 < vm["n_used_mmu_pages"] <= vm["n_max_mmu_pages"] or t["mmu"] == "tdp_mmu"
    assert vm["memslots"][0]["npages"] == 1024  # the VMM's 4 MiB memslot
    assert vm["mmu_valid_gen"] == (1 if t["zapped"] else 0)


@pytest.mark.parametrize("name", FIXTURES)
def test_vcpus(name: str, capsys) -> None:
    t = truth(name)
    (vm,) = run_json(name, "vcpus", capsys=capsys)["vms"]
    assert [(v["vcpu_id"], v["tid"], v["cr3"]) for v in vm["vcpus"]] == [
        (tv["vcpu_id"], tv["tid"], tv["cr3"]) for tv in t["vcpus"]]
    for v in vm["vcpus"]:
        assert v["mmu"] == "root_mmu" and v["comm"] == "vmm"
        assert v["direct"] == (t["mmu"] != "shadow")
        if not t["busy"]:
            assert v["mp_state"] == "HALTED" and v["mode"] == "OUTSIDE_GUEST_MODE"
    if t["busy"]:
        assert "IN_GUEST_MODE" in {v["mode"] for v in vm["vcpus"]}


@pytest.mark.parametrize("name", fixtures(long_shadow))
def test_roots_shadow(name: str, capsys) -> None:
    t = truth(name)
    (vm,) = run_json(name, "roots", capsys=capsys)["vms"]
    set_cr3 = {s["cr3"] for s in t["sets"]}
    written = {s["cr3"] for s in t["sets"] if s["unsync_gfns"]}
    by_cr3: dict[str, str] = {}
    for v, tv in zip(vm["vcpus"], t["vcpus"], strict=True):
        assert v["root"]["state"] == "page" and v["cr3"] == tv["cr3"] == v["root"]["pgd"]
        r = v["root"]["page"]
        assert int(r["gfn"], 16) == int(tv["cr3"], 16) >> 12
        assert r["level"] == 4 and not r["direct"] and not r["invalid"]
        assert r["unsync_children"] == (1 if tv["cr3"] in written else 0)
        assert by_cr3.setdefault(tv["cr3"], r["sp"]) == r["sp"]  # same CR3, same root
        prev = [p["pgd"] for p in v["prev_roots"]]
        assert len(set(prev)) == 3 and set(prev) <= set_cr3 - {tv["cr3"]}
        for p in v["prev_roots"]:
            assert int(p["page"]["gfn"], 16) == int(p["pgd"], 16) >> 12
            assert p["page"]["level"] == 4
    # root_count: one reference per vCPU that holds the root as root or prev root
    holders: dict[str, int] = {}
    for v in vm["vcpus"]:
        for r in [v["root"], *v["prev_roots"]]:
            holders[r["page"]["sp"]] = holders.get(r["page"]["sp"], 0) + 1
    for v in vm["vcpus"]:
        for r in [v["root"], *v["prev_roots"]]:
            assert r["page"]["root_count"] == holders[r["page"]["sp"]]
            assert len(r["page"]["holders"]) == holders[r["page"]["sp"]]


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] != "shadow"))
def test_roots_tdp_shared_direct(name: str, capsys) -> None:
    (vm,) = run_json(name, "roots", capsys=capsys)["vms"]
    roots = {v["root"]["page"]["sp"] for v in vm["vcpus"]}
    assert len(roots) == 1  # one direct root for every vCPU
    for v in vm["vcpus"]:
        assert v["root"]["page"]["direct"] and v["root"]["page"]["level"] == 4
        assert v["root"]["page"]["gfn"] == "0x0"
    text = run_text(name, "roots", capsys=capsys)
    assert "shared x4" in text


@pytest.mark.parametrize("name", fixtures(lambda t: t["zapped"]))
def test_roots_zapped(name: str, capsys) -> None:
    (vm,) = run_json(name, "roots", capsys=capsys)["vms"]
    assert vm["mmu_valid_gen"] == 1
    for v in vm["vcpus"]:
        for r in [v["root"], *v["prev_roots"]]:
            if r["hpa"] == "INVALID_PAGE":  # the same keys as any root, page null
                assert r["state"] == "invalid_page" and r["page"] is None
            else:
                assert r["state"] == "page" and r["page"]["invalid"] and r["page"]["obsolete"]
    assert "invalid" in run_text(name, "roots", capsys=capsys)


def walk(node: dict):
    yield node
    for c in node.get("children", []):
        yield from walk(c)


@pytest.mark.parametrize("name", fixtures(lambda t: t.get("guest_paging") == "pae"))
def test_roots_pae(name: str, capsys) -> None:
    """A PAE guest: the root is pae_root; pae_root[0] is the set's PD, one reference per
    vCPU on it; no prev_roots (fast_pgd_switch caches 4- and 5-level roots only)."""
    t = truth(name)
    (vm,) = run_json(name, "roots", capsys=capsys)["vms"]
    pd = {s["cr3"]: hex(int(s["pt_gpas"][1], 16) >> 12) for s in t["sets"]}
    written = {s["cr3"] for s in t["sets"] if s["unsync_gfns"]}
    users: dict[str, int] = {}
    for tv in t["vcpus"]:
        users[tv["cr3"]] = users.get(tv["cr3"], 0) + 1
    for v, tv in zip(vm["vcpus"], t["vcpus"], strict=True):
        r = v["root"]
        assert r["state"] == "pae_root" and r["page"] is None and r["pgd"] == tv["cr3"]
        (pae,) = r["pae_roots"]
        e = pae["page"]
        assert pae["index"] == 0 and e["gfn"] == pd[tv["cr3"]] and e["level"] == 2
        assert e["root_count"] == users[tv["cr3"]] == len(e["holders"])
        assert {h["pae_root"] for h in e["holders"]} == {0}
        n = len(next(s for s in t["sets"] if s["cr3"] == tv["cr3"])["unsync_gfns"])
        assert e["unsync_children"] == (n if tv["cr3"] in written else 0)
        assert all(p["hpa"] == "INVALID_PAGE" for p in v["prev_roots"])
    text = run_text(name, "roots", capsys=capsys)
    assert text.count("pae_root[0]") == len(t["vcpus"])


@pytest.mark.parametrize("name", fixtures(lambda t: t.get("guest_paging") == "pae"))
def test_tree_and_unsync_pae(name: str, capsys) -> None:
    """Each final set's PD is a root (held through pae_root[0]) with its windows at slots
    1..n; the unsync walk starts at that level-2 page and syncs the written windows."""
    t = truth(name)
    (vm,) = run_json(name, "tree", capsys=capsys)["vms"]
    tops = {n["gfn"]: n for n in vm["trees"]}
    for k in {tv["final_set"] for tv in t["vcpus"]}:
        s = t["sets"][k]
        pd = tops[hex(int(s["pt_gpas"][1], 16) >> 12)]
        assert pd["level"] == 2 and all(h["holder"].endswith(".root.pae_root[0]")
                                        and h["kind"] == "root" for h in pd["holders"])
        slots = {c["index"]: c["gfn"] for c in pd["children"]}
        assert slots[0] == hex(int(t["shared_pt"], 16) >> 12)
        assert [slots[1 + j] for j in range(len(s["window_pts"]))] == [
            hex(int(w, 16) >> 12) for w in s["window_pts"]]
    (vm,) = run_json(name, "unsync", capsys=capsys)["vms"]
    synced = [leaf["gfn"] for r in vm["roots"] for b in r["batches"] for leaf in b["leaves"]]
    assert sorted(synced) == sorted(g for s in t["sets"] for g in s["unsync_gfns"])
    for r in vm["roots"]:
        assert r["batches"][0]["pages"][0] == {"sp": r["sp"], "level": 2, "idx": -1}


@pytest.mark.parametrize("name", fixtures(long_shadow))
def test_tree_matches_page_tables(name: str, capsys) -> None:
    t = truth(name)
    (vm,) = run_json(name, "tree", capsys=capsys)["vms"]
    nodes = [n for tree in vm["trees"] for n in walk(tree)]
    gfns = {n["gfn"] for n in nodes}
    # every page-table page of every set is shadowed, and the shared level-1 table
    for s in t["sets"]:
        for gpa in s["pt_gpas"]:
            assert hex(int(gpa, 16) >> 12) in gfns
    assert hex(int(t["shared_pt"], 16) >> 12) in gfns
    # every set's windows hang under its PD at slots 1..n
    tops = {n["gfn"]: n for n in vm["trees"]}
    for s in t["sets"]:
        root = tops[hex(int(s["cr3"], 16) >> 12)]
        (pdpt,) = root["children"]
        (pd,) = pdpt["children"]
        slots = {c["index"]: c["gfn"] for c in pd["children"]}
        assert slots[0] == hex(int(t["shared_pt"], 16) >> 12)
        for j, w in enumerate(s["window_pts"]):
            assert slots[1 + j] == hex(int(w, 16) >> 12)
    unsync = {n["gfn"] for n in nodes if n["unsync"]}
    assert unsync == {g for s in t["sets"] for g in s["unsync_gfns"]}
    # --unsync-only keeps exactly the paths to unsync pages
    (vm2,) = run_json(name, "tree", "--unsync-only", capsys=capsys)["vms"]
    kept = [n for tree in vm2["trees"] for n in walk(tree)]
    assert {n["gfn"] for n in kept if n["level"] == 1} == unsync
    assert len(vm2["trees"]) == len({s["cr3"] for s in t["sets"] if s["unsync_gfns"]})


def test_tree_depth_and_start(capsys) -> None:
    name = "6.1-shadow"
    (vm,) = run_json(name, "tree", "--depth", "1", capsys=capsys)["vms"]
    for tree in vm["trees"]:
        for c in tree["children"]:
            assert c["children"] == [] and c["children_omitted"] == 1
    root = vm["trees"][0]["sp"]
    (vm2,) = run_json(name, "tree", root, capsys=capsys)["vms"]
    assert len(vm2["trees"]) == 1 and vm2["trees"][0]["sp"] == root
    text = run_text(name, "tree", root, capsys=capsys)
    assert "vcpu0.root" in text and "UNSYNC" in text


@pytest.mark.parametrize("name", ["6.1-shadow", "6.12-shadow"])
def test_sp_by_address_and_gfn(name: str, capsys) -> None:
    t = truth(name)
    gfn = t["sets"][0]["unsync_gfns"][0]
    (vm,) = run_json(name, "sp", "--gfn", gfn, capsys=capsys)["vms"]
    (page,) = vm["pages"]
    assert page["gfn"] == gfn and page["level"] == 1 and page["unsync"]
    assert page["role"]["level"] == 1 and page["role"]["direct"] is False
    (parent,) = page["parents"]
    assert parent["level"] == 2 and parent["indexes"] == [1]
    # the guest wrote PTE slot 100 + vCPU of each window of its final set
    writers = [v["vcpu_id"] for v in t["vcpus"] if v["final_set"] == 0]
    assert len(page["sptes"]) >= 1
    (pd,) = run_json(name, "sp", parent["sp"], capsys=capsys)["vms"][0]["pages"]
    assert pd["unsync_children"] == len(t["sets"][0]["window_pts"])
    assert pd["unsync_child_bitmap"] == list(range(1, 1 + len(t["sets"][0]["window_pts"])))
    children = {e["index"]: e for e in pd["sptes"]}
    assert children[1]["child"] == page["sp"] and not children[1]["leaf"]
    assert pd["non_present"] == 512 - len(pd["sptes"])
    assert writers  # set 0 is some vCPU's final set


def test_sp_rejects_non_shadow_page(capsys) -> None:
    s = Session(open_fixture("6.1-shadow"))
    with pytest.raises(LookupFailed, match="is not a shadow page"):
        run_one(s, ["sp", "0xffff888000001000"])
    with pytest.raises(UsageError):
        run_one(s, ["sp", "zzz"])


def test_vm_selection(capsys) -> None:
    s = Session(open_fixture("6.1-shadow"))
    run_one(s, ["vm", "0"])
    assert s.selected is not None and "vm0" in s.prompt()
    out = capsys.readouterr().out
    # the memslot table: address space 0, slot 0 at gfn 0, the VMM's 4 MiB (1024 pages)
    (row,) = [line.split() for line in out.splitlines() if line.split()[:2] == ["0", "0"]]
    assert "memslots" in out and row[2:4] == ["0x0", "1024"]
    run_one(s, ["vm", f"pid:{truth('6.1-shadow')['vmm_pid']}"])
    assert s.selected.index == 0
    with pytest.raises(LookupFailed):
        run_one(s, ["vm", "7"])
    run_one(s, ["vm", "all"])
    assert s.selected is None


def test_human_output_is_plain_when_piped(capsys) -> None:
    out = run_text("6.1-shadow", "roots", capsys=capsys)
    assert "\x1b[" not in out
    assert "vcpu[3]" in out and "prev_roots[2]" in out and "shared x2" in out


SWEEP = ["vms", "vcpus", "roots", "tree", "unsync", "stats", "check", "vm 0"]


@pytest.mark.parametrize("name", FIXTURES)
def test_every_command_runs_clean(name: str, capsys) -> None:
    """Every kernel release: each command's document has no errors and no warnings (no
    member the model reads is missing), and check finds no error."""
    for command in SWEEP:
        doc = run_json(name, *command.split(), capsys=capsys)
        assert doc["errors"] == [], (command, doc["errors"])
        assert doc["warnings"] == [], (command, doc["warnings"])
    for vm in run_json(name, "check", capsys=capsys)["vms"]:
        assert vm["summary"]["error"] == 0


# -- tree --json's template for plain pages (shapes.LeafTexts) --------------------


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM + PAIR_SIDES)
def test_tree_leaf_template_is_the_encoders_text(name: str) -> None:
    """Every page of every fixture, as a childless tree node (slot, ref and
    omitted children varied): the template's text is compact(tree_node_json())
    byte for byte, or it is None (holders, or a field that is not a plain
    bool or int); and the streamed tree document is the nested one."""
    s = Session(open_fixture(name))
    templated = bare = 0
    texts = LeafTexts()
    for vm in s.kernel.vms():
        g = s.graph(vm)
        for n, sp in enumerate(g.nodes.values()):
            slot, ref, omitted = (None, False, 0) if n % 3 == 0 else (n % 512, n % 2 == 1, n % 5)
            node = TreeNode(page_view(sp, g), slot, ref, omitted, ())
            text = texts.node(node)
            if node.page.holders:
                assert text is None
                continue
            bare += 1
            if text is not None:
                assert text == compact(tree_node_json(node)), sp
                templated += 1
        plan = TreePlan(g, start_pages(g, None), None, None)
        assert json.loads("".join(plan.chunks())) == json.loads(
            compact([tree_node_json(t) for t in plan.trees()]))
    assert templated if bare else not templated  # (a zapped VM's pages are all held roots)


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_tree_sibling_run_is_the_pages_texts(name: str) -> None:
    """LeafTexts.run() of every parent's children (holders or not: run() is
    asked only of plain ones, but writes any): None when the siblings differ
    in more than address and gfn, else page()'s texts of each joined by ", "
    byte for byte; and a TDP MMU's level-2 tables take the run."""
    s = Session(open_fixture(name))
    texts = LeafTexts()
    ran = parents = 0
    for vm in s.kernel.vms():
        g = s.graph(vm)
        for parent, pairs in g.links.items():
            parents += 1
            slots, kids = zip(*pairs, strict=True)
            sps = [g.nodes[c] for c in kids]
            obsolete = is_obsolete_sp(sps[0], vm)
            for orphan in (False, True):
                text = texts.run(sps, slots, obsolete, orphan)
                alike = len({(sp.role.word, sp.level, sp.tdp_mmu_page, sp.unsync,
                              sp.unsync_children, sp.root_count, sp.mmu_valid_gen)
                             for sp in sps}) == 1
                one = [texts.page(sp, obsolete, orphan, i)
                       for i, sp in zip(slots, sps, strict=True)]
                if text is None:
                    assert not alike or None in one, parent
                    continue
                assert alike and text == ", ".join(cast("list[str]", one)), parent
                ran += 1
            if g.nodes[parent].tdp_mmu_page and g.nodes[parent].level == 2:
                assert texts.run(sps, slots, obsolete, False) is not None
    assert ran if parents else not ran  # (a zapped VM links nothing)


def test_tree_sibling_run_refuses_what_it_cannot_write() -> None:
    """run() leaves to page() siblings that differ (unsync, a count) and any
    whose address, gfn or slot is not a plain int."""
    s = Session(open_fixture("6.1-tdp"))
    g = s.graph(s.kernel.vms()[0])
    parent, pairs = next((p, ps) for p, ps in g.links.items() if len(ps) >= 2)
    slots, kids = zip(*pairs, strict=True)
    sps = [g.nodes[c] for c in kids]
    texts = LeafTexts()
    assert texts.run(sps, slots, False, False) is not None
    for field, bad in (("unsync", True), ("root_count", 1), ("gfn", UNKNOWN)):
        assert texts.run([*sps[:-1], sps[-1]._replace(**{field: bad})], slots, False,
                         False) is None
    assert texts.run(sps, [*slots[:-1], True], False, False) is None
    assert texts.run(sps, slots, cast("bool", 1), False) is None


def _drawn(node: TreeNode, width: int, lead: str = "", guide: str = "",
           below: str = "") -> list[str]:
    """The text tree as it was drawn from the nested nodes of trees() (the
    reference for text_lines)."""
    kids = list(node.children)
    lines = wrap_words(label_units(node), width, lead + guide,
                       below + ("│" if kids else " ") + "   ")
    for k, kid in enumerate(kids):
        last = k == len(kids) - 1
        lines += _drawn(kid, width, below, "└── " if last else "├── ",
                        below + ("    " if last else "│   "))
    return lines


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM)
def test_tree_text_streamed_is_the_nested_tree_drawn(name: str) -> None:
    """TreePlan.text() (lines made as printed, no nested nodes kept) is the
    nested trees() drawn, with --depth 0 and 1, --unsync-only, at 80 and 30
    columns; and print_lines() prints the same bytes whatever its batch."""
    s = Session(open_fixture(name))
    for vm in s.kernel.vms():
        g = s.graph(vm)
        for depth, unsync_only in ((None, False), (0, False), (1, False), (None, True)):
            keep = unsync_only_pages(g, unsync_only)
            plan = TreePlan(g, [a for a in start_pages(g, None) if keep is None or a in keep],
                            depth, keep)
            for width in (80, 30):
                drawn = [line for t in plan.trees() for line in _drawn(t, width)]
                assert list(plan.text(width)) == drawn
        printed = []
        for batch in (1, 7, 4096):
            c = Console(file=io.StringIO(), width=80, color_system=None)
            print_lines(c, plan.text(80), batch)
            printed.append(cast("io.StringIO", c.file).getvalue())
        assert printed[0] == printed[1] == printed[2] == "".join(
            line + "\n" for line in plan.text(80))


@pytest.mark.parametrize("name", ["6.1-tdp", "6.12-shadow", "7.3-tdp"])
def test_tree_text_plain_children_in_one_pass(name: str, monkeypatch) -> None:
    """A parent's plain leaf children are drawn in one pass (plain_lines) at 80
    columns, not at 20 (a line would wrap); either way the lines are the
    nested tree's drawn."""
    from kvminspect.commands import tree

    s = Session(open_fixture(name))
    g = s.graph(s.kernel.vms()[0])
    plan = TreePlan(g, start_pages(g, None), None, None)
    real, taken = tree.plain_lines, []

    def counted(*args: Any) -> list[str] | None:
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(tree, "plain_lines", counted)
    for width, some in ((80, True), (20, False)):
        taken.clear()
        assert list(plan.text(width)) == [line for t in plan.trees()
                                          for line in _drawn(t, width)]
        assert any(taken) == some


def test_tree_text_streamed_marks_references_as_nested() -> None:
    """A page with children linked twice (a what-if link added to its parent)
    is drawn whole once and as "(subtree shown above)" the second time, by
    text_lines as by the nested trees()."""
    s = Session(open_fixture("6.1-shadow"))
    g = s.graph(s.kernel.vms()[0])
    parent, child = next((p, c) for p, pairs in g.links.items() for _, c in pairs
                         if g.links.get(c))
    g.links[parent] = [*g.links[parent], (511, child)]
    plan = TreePlan(g, start_pages(g, None), None, None)
    text = list(plan.text(80))
    assert text == [line for t in plan.trees() for line in _drawn(t, 80)]
    assert sum("(subtree shown above)" in line for line in text) == 1


def test_tree_leaf_template_refuses_what_it_cannot_write() -> None:
    """A field that is UNKNOWN, UNREADABLE or an int where a bool belongs (a
    kernel without the member, a damaged struct) goes to the encoder."""
    s = Session(open_fixture("6.1-tdp"))
    g = s.graph(s.kernel.vms()[0])
    sp = next(sp for sp in g.nodes.values() if sp.addr not in g.roots)
    texts = LeafTexts()
    assert texts.page(sp, False, False, 3) is not None
    for field, bad in (("unsync", UNKNOWN), ("unsync_children", UNKNOWN),
                       ("root_count", UNREADABLE), ("gfn", UNKNOWN), ("unsync", 1),
                       ("tdp_mmu_page", 1), ("root_count", True), ("level", True)):
        assert texts.page(sp._replace(**{field: bad}), False, False, 3) is None
    one: Any = 1  # an int where obsolete's bool belongs
    assert texts.page(sp, one, False, 3) is None
    assert texts.page(sp, False, False, one == 1 and True) is None  # (a bool index)
    node = TreeNode(page_view(sp._replace(gfn=-1), g), 3, False, 0, ())
    assert texts.node(node) == compact(tree_node_json(node))  # (hex() of a negative)


@pytest.mark.parametrize("name", ["6.1-shadow", "6.1-tdp"])
def test_small_reads_do_not_import_numpy(name: str) -> None:
    """vms, vcpus and roots of a small MMU run without numpy (the emulated host
    of tests/test_live_kcore.py has none): the list walks import it only for a
    run of COLUMNS_FROM pages or more."""
    code = ("import sys; from kvminspect.cli import main\n"
            f"for cmd in ('vms', 'vcpus', 'roots'):\n"
            f"    assert main(['-c', {str(VMCORES / name)!r}, cmd, '--json']) == 0\n"
            "print('numpy' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False", r.stderr
