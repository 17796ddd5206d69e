"""export (DOT, GraphML, JSON read back) and stats (kvm->stat, vcpu->stat) on the fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import networkx as nx
import pytest

from kvminspect.cli import run_one
from kvminspect.commands.export import dot_quote
from kvminspect.errors import KvminspectError, UsageError
from kvminspect.graph import VMGraph
from kvminspect.results import VCPU_NAMES, VCPU_PREFIXES, VM_PREFIXES
from kvminspect.session import Session
from tests.conftest import FIXTURES, fixtures, open_fixture, truth

EXPORTED = ["6.1-shadow", "6.12-shadow-6x6", "6.12-tdp", "6.1-shadow-zapped"]
DOT_NODE = re.compile(r'^\s*"(0x[0-9a-f]+)" \[(.*)\];$', re.M)
DOT_EDGE = re.compile(r'^\s*"(0x[0-9a-f]+)" -> "(0x[0-9a-f]+)" \[label="([0-9,]+)"[^\]]*\];$',
                      re.M)


def export(name: str, fmt: str, path: Path, capsys) -> tuple[VMGraph, dict]:
    """Export fixture *name* to *path*; the session's graph and the --json answer."""
    s = Session(open_fixture(name))
    capsys.readouterr()
    run_one(s, ["export", "--format", fmt, str(path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    return s.graph(s.kernel.vms()[0]), doc


def shadowed_page_tables(t: dict) -> tuple[int, int]:
    """(pages, edges) the guest's page tables give a 4-level shadow MMU (truth.json):
    every set's PML4, PDPT, PD and window tables plus the shared level-1 table; each
    set links PML4 -> PDPT -> PD -> (shared table, each window)."""
    gpas = {g for s in t["sets"] for g in s["pt_gpas"]}
    return len(gpas) + 1, sum(len(s["pt_gpas"]) for s in t["sets"])


def a_root(g: VMGraph) -> int:
    """A root some vCPU uses as its current root."""
    return next(a for a, h in g.roots.items() if any(x.kind == "root" for x in h))


def edge_set(g: VMGraph) -> set[tuple[str, str, tuple[int, ...]]]:
    return {(hex(a), hex(b), tuple(sorted(d["indexes"]))) for a, b, d in g.graph.edges(data=True)}


def check_answer(doc: dict, path: Path, fmt: str, g: VMGraph) -> None:
    assert doc["errors"] == []
    (vm,) = doc["vms"]
    assert vm["file"] == str(path) and vm["format"] == fmt
    assert vm["nodes"] == g.graph.number_of_nodes() > 0
    assert vm["edges"] == g.graph.number_of_edges()
    assert vm["kvm"] == hex(g.vm.addr) and vm["pid"] == g.vm.pid


# -- export ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPORTED)
def test_export_graphml(name: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "vm.graphml"
    g, doc = export(name, "graphml", path, capsys)
    check_answer(doc, path, "graphml", g)
    back = nx.read_graphml(path)
    assert back.is_directed()
    assert set(back.nodes) == {hex(a) for a in g.graph.nodes}
    assert {(a, b, tuple(int(i) for i in d["indexes"].split(",")))
            for a, b, d in back.edges(data=True)} == edge_set(g)
    assert back.graph["kvm"] == hex(g.vm.addr) and back.graph["mmu"] == g.vm.mmu
    root = a_root(g)
    sp, d = g.sp(root), back.nodes[hex(root)]
    assert d["addr"] == hex(root) and d["gfn"] == hex(sp.gfn)
    assert (d["level"], d["root_count"], d["unsync_children"]) == (
        sp.level, sp.root_count, sp.unsync_children)
    assert d["root"] is True and d["orphan"] is False and d["unsync"] is False
    assert d["invalid"] is sp.role.invalid and d["obsolete"] is g.obsolete(sp)
    assert d["direct"] is sp.role.direct and d["tdp_mmu_page"] is sp.tdp_mmu_page
    assert d["holders"].split(",") == [str(h) for h in g.roots[root]]
    unsync = {hex(s.addr) for s in g.pages() if s.unsync}
    assert {n for n, x in back.nodes(data=True) if x["unsync"]} == unsync


@pytest.mark.parametrize("name", EXPORTED)
def test_export_json(name: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "vm.json"
    g, doc = export(name, "json", path, capsys)
    check_answer(doc, path, "json", g)
    data = json.loads(path.read_text())
    assert data["vm"]["kvm"] == hex(g.vm.addr) and data["vm"]["pid"] == truth(name)["vmm_pid"]
    assert data["directed"] is True
    nodes = {n["id"]: n for n in data["nodes"]}
    assert set(nodes) == {hex(a) for a in g.graph.nodes}
    assert {(e["source"], e["target"], tuple(e["indexes"])) for e in data["edges"]} == edge_set(g)
    root = a_root(g)
    n = nodes[hex(root)]
    assert n["holders"] == [str(h) for h in g.roots[root]]
    assert n["root_count"] == g.sp(root).root_count
    assert n["level"] == g.sp(root).level and n["obsolete"] == g.obsolete(g.sp(root))
    # the graph round-trips through networkx
    back = nx.node_link_graph({k: v for k, v in data.items() if k != "vm"}, edges="edges")
    assert back.number_of_nodes() == g.graph.number_of_nodes()
    assert back.number_of_edges() == g.graph.number_of_edges()


@pytest.mark.parametrize("name", EXPORTED)
def test_export_dot(name: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "vm.dot"
    g, doc = export(name, "dot", path, capsys)
    check_answer(doc, path, "dot", g)
    text = path.read_text()
    assert text.startswith('digraph "vm0" {') and text.rstrip().endswith("}")
    nodes = dict(DOT_NODE.findall(text))
    assert set(nodes) == {hex(a) for a in g.graph.nodes}
    assert len(DOT_NODE.findall(text)) == len(g.graph)
    edges = {(a, b, tuple(int(i) for i in ix.split(","))) for a, b, ix in DOT_EDGE.findall(text)}
    assert edges == edge_set(g)
    assert len(DOT_EDGE.findall(text)) == g.graph.number_of_edges()
    for addr in g.graph.nodes:
        attrs = nodes[hex(addr)]
        sp = g.sp(addr)
        assert ('color="blue"' in attrs) == (addr in g.roots)
        assert ('fillcolor="orange"' in attrs) == sp.unsync
        assert f"gfn {sp.gfn:#x} L{sp.level}" in attrs
    root = a_root(g)
    assert f"root_count={g.sp(root).root_count}" in nodes[hex(root)]
    assert ", ".join(map(str, g.roots[root])) in nodes[hex(root)]
    if g.obsolete(g.sp(root)):
        assert "dashed" in nodes[hex(root)]


def test_dot_quote() -> None:
    assert dot_quote('a "b" \\ c\nd') == '"a \\"b\\" \\\\ c\\nd"'
    assert dot_quote("vcpu0.prev_roots[2]") == '"vcpu0.prev_roots[2]"'


def test_export_human_and_errors(tmp_path: Path, capsys) -> None:
    s = Session(open_fixture("6.1-shadow"))
    path = tmp_path / "g.dot"
    capsys.readouterr()
    run_one(s, ["export", "-f", "dot", str(path), "--vm", "0"])
    out, err = capsys.readouterr()
    pages, edges = shadowed_page_tables(truth("6.1-shadow"))
    assert out == ""  # the status line is not data: stderr
    assert err.count("\n") == 1 and f"wrote {pages} shadow pages and {edges} edges of VM 0" in err
    assert str(path) in err and path.exists()
    with pytest.raises(KvminspectError, match="cannot write"):
        run_one(s, ["export", "-f", "json", str(tmp_path / "missing" / "g.json")])
    with pytest.raises(UsageError):  # exit status 2 (errors.describe), before any reading
        run_one(s, ["export", "-f", "pdf", str(path)])


# -- stats --------------------------------------------------------------------------


def stats(name: str, capsys) -> tuple[Session, dict]:
    s = Session(open_fixture(name))
    capsys.readouterr()
    run_one(s, ["stats", "--json"])
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    return s, vm


def present_leaves(s: Session) -> int:
    """Present leaf SPTEs in every shadow page of the VM."""
    k = s.kernel
    g = s.graph(k.vms()[0])
    n = 0
    for sp in g.pages():
        spt = k.sptes(sp)
        n += sum(k.decode(sp, i, v, resolve=False).leaf for i, v in enumerate(spt))
    return n


@pytest.mark.parametrize("name", FIXTURES)
def test_stats_shape_and_relations(name: str, capsys) -> None:
    t = truth(name)
    s, vm = stats(name, capsys)
    kvm = s.kernel.vms()[0]
    assert vm["kvm"] == hex(kvm.addr) and vm["pid"] == t["vmm_pid"]
    st = vm["stat"]
    assert all(k.startswith(VM_PREFIXES) for k in st)
    assert all(isinstance(v, int) and v >= 0 for v in st.values())
    release = tuple(int(x) for x in t["kernel_release"].split("-")[0].split(".")[:2])
    assert {"mmu_shadow_zapped", "mmu_cache_miss", "mmu_unsync", "mmu_recycled",
            "nx_lpage_splits"} <= set(st)
    # 5.15 replaced lpages by pages_4k/2m/1g; 5.19 added the pf_taken family
    pages = {"pages_4k", "pages_2m", "pages_1g"}
    assert pages <= set(st) if release >= (5, 15) else "lpages" in st and not pages & set(st)
    if release >= (5, 15):
        assert st["remote_tlb_flush"] <= st["remote_tlb_flush_requests"]
    # every vCPU of the VMM, each with its MMU counters only
    assert [v["vcpu_id"] for v in vm["vcpus"]] == [v["vcpu_id"] for v in t["vcpus"]]
    for v in vm["vcpus"]:
        c = v["stat"]
        assert set(c) >= {"pf_fixed", "pf_guest", "tlb_flush", "invlpg"}
        assert all(k.startswith(VCPU_PREFIXES) or k in VCPU_NAMES for k in c)
        if release >= (5, 19):
            assert c["pf_taken"] >= c["pf_fixed"] + c["pf_spurious"] + c["pf_emulate"]
        else:
            assert "pf_taken" not in c
        assert c["pf_fixed"] > 0  # every vCPU faulted its code and page tables in
    # pages_4k/2m/1g count the present leaf SPTEs (kvm_update_page_stats)
    if release >= (5, 15):
        assert st["pages_4k"] + st["pages_2m"] + st["pages_1g"] == present_leaves(s)
    # every shadow page was a hash miss; none was recycled
    assert st["mmu_recycled"] == 0
    if st["mmu_shadow_zapped"] == 0:
        assert st["mmu_cache_miss"] == kvm.n_used_mmu_pages
    if t["mmu"] == "tdp_mmu":
        assert st["mmu_cache_miss"] == st["mmu_unsync"] == kvm.n_used_mmu_pages == 0
        assert st.get("pages_4k", 1) > 0


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "shadow"))
def test_stats_shadow(name: str, capsys) -> None:
    t = truth(name)
    s, vm = stats(name, capsys)
    st = vm["stat"]
    g = s.graph(s.kernel.vms()[0])
    unsync_now = sum(sp.unsync for sp in g.pages())
    assert unsync_now == sum(len(x["unsync_gfns"]) for x in t["sets"]) or t["zapped"]
    # kvm_unsync_page() counts every page it marks; nothing was synced since
    assert st["mmu_unsync"] >= unsync_now
    if t["zapped"]:
        # the fast zap zapped every page; the 4 roots stay allocated while vCPUs hold them
        assert st["mmu_shadow_zapped"] == st["mmu_cache_miss"] > 0 and st["mmu_unsync"] == 0
        assert s.kernel.vms()[0].n_used_mmu_pages == len(g.roots) == 4
    else:
        assert st["mmu_unsync"] == unsync_now > 0
    for v in vm["vcpus"]:
        assert v["stat"]["tlb_flush"] > 0  # guest CR3 loads flush the guest TLB


def test_stats_human(capsys) -> None:
    capsys.readouterr()
    run_one(Session(open_fixture("6.12-shadow-6x6")), ["stats"])
    out = capsys.readouterr().out
    assert "mmu_unsync" in out and "pages_4k" in out and "pf_fixed" in out
    assert "vcpu[5]" in out and "\x1b[" not in out
    row = next(line for line in out.splitlines() if line.strip().startswith("mmu_cache_miss"))
    # every shadow page was one hash miss, nothing was zapped
    assert row.split()[-1] == str(shadowed_page_tables(truth("6.12-shadow-6x6"))[0])
