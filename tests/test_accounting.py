"""The kernel's own accounting (kvminspect.accounting) and the rmap histogram
(rmap --stats) on the real fixtures.

Every fixture's counters match the pages read: kvm->stat.pages_4k/2m/1g (lpages
on 5.10) the present leaf SPTEs, n_used_mmu_pages (stat.mmu_shadow_pages on
7.3) the shadow pages plus the zapped roots vCPUs hold, tdp_mmu_pages the
non-root TDP MMU pages. A counter made one too many in a damaged copy of a real
fixture (tests/corrupt.py) is exactly one finding naming it and both numbers;
the same in a dump whose mmu_lock is held, or read as live, is info. The rmap
histogram bins as kvm_mmu_rmaps_stat_show() does, and its entries are the
shadow-MMU leaves.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest

from kvminspect.accounting import (
    LPAGES_DRIFT,
    Leaves,
    Verdict,
    accounting,
    check_accounting,
    check_tdp_mmu_pages,
    count_leaves,
)
from kvminspect.check import FindingKind, Severity
from kvminspect.cli import main
from kvminspect.layout import has_member
from kvminspect.leaves import collect
from kvminspect.rmap import RMAP_BUCKETS, RmapReader, rmap_bucket, rmap_histogram
from kvminspect.session import Session
from kvminspect.target import open_core
from tests.conftest import ALL, FIXTURES, LARGE, MULTI_VM, SMM, VMCORES, open_fixture, truth
from tests.corrupt import make
from tests.test_schema import VALIDATOR, validate

EVERY = FIXTURES + MULTI_VM + LARGE + SMM
TDP = [n for n in ALL if truth(n)["mmu"] == "tdp_mmu"]


def session(name: str) -> Session:
    return Session(open_fixture(name))


@pytest.mark.parametrize("name", EVERY)
def test_clean_fixtures_account_exactly(name: str) -> None:
    """Every counter of every VM is what the pages say (no warning, no error); the
    page stats are compared only with the leaves read, and counting them alone
    finds what the audit's collect() finds."""
    s = session(name)
    k = s.kernel
    for vm in k.vms():
        vg = s.graph(vm)
        leaves = Leaves.of(collect(k, vg))
        assert count_leaves(k, vg) == leaves
        acc = accounting(k, vg, leaves)
        assert acc.busy == ()
        # 7.3 keeps no count of TDP MMU pages (test_tdp_counters_per_layout)
        assert {c.verdict for c in acc.checks
                if c.counter != "kvm->arch.tdp_mmu_pages" or c.kernel is not None} == {
            Verdict.MATCH}, acc.checks
        kinds = {c.kind for c in acc.checks}
        assert {FindingKind.PAGE_STATS, FindingKind.USED_MMU_PAGES} <= kinds
        assert all(f.severity is Severity.INFO for f in check_accounting(k, vg, leaves))
        plain = accounting(k, vg)
        assert {c.verdict for c in plain.checks if c.kind is FindingKind.PAGE_STATS} == {
            Verdict.UNCHECKED}


@pytest.mark.parametrize("name", [n for n in ALL if truth(n).get("zapped")])
def test_zapped_roots_still_held_are_accounted(name: str) -> None:
    """After the fast zap, the 4 roots the vCPUs hold are off active_mmu_pages but
    still in n_used_mmu_pages: one info finding names them (and nothing else does)."""
    s = session(name)
    k = s.kernel
    vg = s.graph(k.vms()[0])
    (f,) = check_accounting(k, vg, count_leaves(k, vg))
    assert (f.check, f.severity) == (FindingKind.USED_MMU_PAGES, Severity.INFO)
    assert "n_used_mmu_pages is 4 = 4 shadow pages (0 on active_mmu_pages + 4 zapped " \
           "roots still held)" in f.message
    assert "__kvm_mmu_prepare_zap_page()" in f.message
    assert sorted(f.objects[1:]) == sorted(vg.roots)


def test_tdp_counters_per_layout() -> None:
    """The TDP MMU's page counter: a list on 6.1, a count on 6.12, none on 7.3."""
    for name, counter, verdict in (("6.1-tdp", "the kvm->arch.tdp_mmu_pages list", Verdict.MATCH),
                                   ("6.12-tdp", "kvm->arch.tdp_mmu_pages", Verdict.MATCH),
                                   ("7.3-tdp", "kvm->arch.tdp_mmu_pages", Verdict.UNCHECKED)):
        s = session(name)
        vg = s.graph(s.kernel.vms()[0])
        (c,) = [c for c in accounting(s.kernel, vg).checks if c.kind is FindingKind.TDP_MMU_PAGES]
        assert (c.counter, c.verdict, c.found) == (counter, verdict, 4), name


def test_tdp_mmu_pages_list_against_pages_reached() -> None:
    """6.1's tdp_mmu_pages list holds the 4 linked non-root pages; one of them cut off
    from its parent in the graph is listed but not reached: an error naming it."""
    s = session("6.1-tdp")
    k = s.kernel
    vg = s.graph(k.vms()[0])
    assert check_tdp_mmu_pages(k, vg) == []
    leaf = next(p for p in vg.pages() if p.tdp_mmu_page and p.level == 1)
    (parent,) = vg.predecessors(leaf.addr)
    vg.unlink(parent, leaf.addr)
    (f,) = check_tdp_mmu_pages(k, vg)
    assert (f.check, f.severity) == (FindingKind.TDP_MMU_PAGES, Severity.ERROR)
    assert f.objects == [vg.vm.addr, leaf.addr]
    assert "the kvm->arch.tdp_mmu_pages list is 4 but 3 non-root TDP MMU pages" in f.message


# -- one counter off, in a damaged copy of a real fixture ------------------------------

# (fixture, case) -> (check, severity, the message's head)
PLANTED = {
    ("6.1-shadow", "stat-pages"): (FindingKind.PAGE_STATS, Severity.WARNING,
                                   "kvm->stat.pages_4k is 54 but 53 present 4K leaf SPTEs"),
    ("7.3-shadow", "stat-pages"): (FindingKind.PAGE_STATS, Severity.WARNING,
                                   "kvm->stat.pages_4k is 54 but 53 present 4K leaf SPTEs"),
    ("6.1-shadow", "used-mmu-pages"): (
        FindingKind.USED_MMU_PAGES, Severity.ERROR,
        "kvm->arch.n_used_mmu_pages is 38 but 37 shadow pages on active_mmu_pages"),
    ("7.3-shadow", "used-mmu-pages"): (
        FindingKind.USED_MMU_PAGES, Severity.ERROR,
        "kvm->stat.mmu_shadow_pages is 38 but 37 shadow pages on active_mmu_pages"),
    ("6.12-tdp", "tdp-mmu-pages"): (
        FindingKind.TDP_MMU_PAGES, Severity.ERROR,
        "kvm->arch.tdp_mmu_pages is 5 but 4 non-root TDP MMU pages reachable"),
    ("6.1-shadow", "stat-pages-mmu-lock-held"): (
        FindingKind.PAGE_STATS, Severity.INFO,
        "kvm->stat.pages_4k is 54 but 53 present 4K leaf SPTEs: explained, the dump was "
        "taken with mmu_lock held for write"),
    ("5.10-shadow", "stat-pages"): (
        FindingKind.PAGE_STATS, Severity.INFO,
        "kvm->stat.lpages is 1 but 0 present large (2M, 1G) leaf SPTEs: explained, "
        + LPAGES_DRIFT),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("accounting"))


@cache
def damaged(fixture: str, case: str, root: str) -> Path:
    out = Path(root) / f"{fixture}-{case}"
    make(fixture, case, out)
    return out


@pytest.mark.parametrize(("fixture", "case"), sorted(PLANTED))
def test_one_counter_off_is_one_finding(fixture: str, case: str, workdir: str) -> None:
    """Exactly one finding, naming the counter and both numbers; nothing else of
    the accounting moves (the audit's own checks stay clean)."""
    check, severity, head = PLANTED[fixture, case]
    s = Session(open_core(str(damaged(fixture, case, workdir)), []))
    k = s.kernel
    vg = s.graph(k.vms()[0])
    (f,) = check_accounting(k, vg, count_leaves(k, vg))
    assert (f.check, f.severity) == (check, severity)
    assert f.message.startswith(head), f.message
    assert f.objects[0] == vg.vm.addr


def test_live_reading_explains_a_difference(workdir: str) -> None:
    """The same counter off, read as from a running kernel: info, saying so."""
    s = Session(open_core(str(damaged("6.1-shadow", "stat-pages", workdir)), []))
    k = s.kernel
    vg = s.graph(k.vms()[0])
    (f,) = check_accounting(k, vg, count_leaves(k, vg), live=True)
    assert f.severity is Severity.INFO
    assert "explained, read from a running kernel" in f.message


def test_check_reports_the_counters(workdir: str, capsys) -> None:
    """check compares the page counts (an error: exit status 3); the page stats need
    --audit, which reads every leaf table."""
    used = damaged("6.1-shadow", "used-mmu-pages", workdir)
    capsys.readouterr()
    assert main(["-c", str(used), "check", "--json"]) == 3
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    assert [(f["check"], f["severity"]) for f in vm["findings"]
            if f["check"] == "used-mmu-pages"] == [("used-mmu-pages", "error")]
    pages = damaged("6.1-shadow", "stat-pages", workdir)
    assert main(["-c", str(pages), "check", "--json"]) == 0
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    assert not [f for f in vm["findings"] if f["check"] == "page-stats"]
    assert main(["-c", str(pages), "check", "--audit", "--json"]) == 0
    (vm,) = json.loads(capsys.readouterr().out)["vms"]
    assert [f["severity"] for f in vm["findings"] if f["check"] == "page-stats"] == ["warning"]


# -- the rmap histogram (rmap --stats) ------------------------------------------------


def test_buckets_are_the_kernels() -> None:
    """ffs(count) clamped to RMAP_LOG_SIZE - 1, as kvm_mmu_rmaps_stat_show() bins:
    the lowest set bit, so 3 goes under "1" and 24 under "8-15"."""
    assert RMAP_BUCKETS == ("0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127",
                            "128-255", "256-511", "512-1023")
    assert [rmap_bucket(n) for n in (0, 1, 2, 3, 4, 6, 24, 195, 196, 512, 1000, 1024, 2048)] == [
        0, 1, 2, 1, 3, 2, 4, 1, 3, 10, 4, 10, 10]


def test_histogram_of_6_1_shadow() -> None:
    """6.1-shadow: 53 entries, one per present shadow-MMU leaf SPTE (the rmap
    scan's sptes exactly); 29 single-entry rmaps and one of 24 (the 23 unsync
    window tables' guest PTEs and its own, binned under 8-15 as ffs(24) = 4); every
    head of every level counted once; the peak stat is the longest rmap minus 1
    (pte_list_add() returns the count before adding)."""
    s = session("6.1-shadow")
    k = s.kernel
    vm = k.vms()[0]
    h = rmap_histogram(k, vm)
    st = collect(k, s.graph(vm))
    shadow = [x for x in st.leaves if not x.sp.tdp_mmu_page]
    assert h.has_rmaps and h.entries == len(shadow) == 53
    assert h.entries == len(RmapReader(k).scan(vm).entries)
    four_k, two_m, one_g = h.levels
    assert four_k.buckets == (994, 29, 0, 0, 1, 0, 0, 0, 0, 0, 0)
    assert four_k.lengths == {1: 29, 24: 1} and four_k.longest == 24
    assert (two_m.heads, one_g.heads) == (2, 1) and two_m.entries == one_g.entries == 0
    for lv in h.levels:
        assert sum(lv.buckets) == lv.heads
    assert h.max_rmap_size == four_k.longest - 1
    assert h.unreadable == () and h.skipped == ()


@pytest.mark.parametrize("name", EVERY)
def test_histogram_entries_are_the_shadow_leaves(name: str) -> None:
    """On every fixture: the entries at each level are the present shadow-MMU leaf
    SPTEs of that level; a VM without rmaps (TDP MMU) has an empty histogram."""
    s = session(name)
    k = s.kernel
    for vm in k.vms():
        h = rmap_histogram(k, vm)
        leaves = [x for x in collect(k, s.graph(vm)).leaves if not x.sp.tdp_mmu_page]
        if not h.has_rmaps:
            assert vm.mmu == "tdp_mmu" and h.levels == () and h.entries == 0 and not leaves
            continue
        assert all(sum(lv.buckets) == lv.heads for lv in h.levels)
        assert {lv.level: lv.entries for lv in h.levels if lv.entries} == dict(
            (lv, sum(1 for x in leaves if x.sp.level == lv))
            for lv in sorted({x.sp.level for x in leaves}))


@pytest.mark.parametrize("name", TDP)
def test_tdp_fixtures_have_no_rmaps(name: str) -> None:
    """The TDP MMU keeps no rmaps: none allocated (empty histogram, as the kernel's
    file is), or, before rmaps were allocated lazily (5.10), all of them empty."""
    k = session(name).kernel
    h = rmap_histogram(k, k.vms()[0])
    assert h.entries == 0
    arch = k.memory.type("struct kvm_arch")  # the flag of lazily allocated rmaps
    if not any(has_member(arch, m) for m in ("memslots_have_rmaps", "shadow_root_allocated")):
        assert h.has_rmaps and all(lv.buckets[0] == lv.heads > 0 for lv in h.levels)
    else:
        assert (h.has_rmaps, h.levels) == (False, ())


def test_rmap_stats_text_and_json(monkeypatch, capsys) -> None:
    """rmap --stats: the debugfs file's rows, the entries line and the ffs note; its
    JSON matches the schema; TDP: no rmaps; a GFN and --stats together: usage."""
    monkeypatch.setenv("COLUMNS", "120")
    shadow = str(VMCORES / "6.1-shadow")
    capsys.readouterr()
    assert main(["-c", shadow, "rmap", "--stats"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["Rmap_Count", *RMAP_BUCKETS]
    assert out[2].split() == ["Level=4K", "994", "29", "0", "0", "1", *["0"] * 6]
    assert "53 rmap entries (4K 53, 2M 0, 1G 0); longest rmap 24 (4K); " \
           "kvm->stat.max_mmu_rmap_size 23" in out[5]
    assert "by ffs(length): 24 under 8-15" in out[6]
    assert main(["-c", shadow, "rmap", "--stats", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    st = doc["vms"][0]["rmap_stats"]
    assert st["entries"] == 53 and st["levels"][0]["lengths"] == [
        {"length": 1, "heads": 29}, {"length": 24, "heads": 1}]
    assert main(["-c", str(VMCORES / "6.12-tdp"), "rmap", "--stats", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate(doc)
    assert doc["vms"][0]["rmap_stats"]["has_rmaps"] is False
    assert main(["-c", shadow, "rmap", "0x10", "--stats"]) == 2
    assert "give a GFN or --stats, not both" in capsys.readouterr().err


def test_schema_holds_rmap_stats_to_its_shape(capsys) -> None:
    """The schema is no rubber stamp for rmap --stats: a bucket short, a length of
    0, a document with both shapes, are each rejected."""
    capsys.readouterr()
    main(["-c", str(VMCORES / "6.1-shadow"), "rmap", "--stats", "--json"])
    doc = json.loads(capsys.readouterr().out)
    vm = doc["vms"][0]
    short = json.loads(json.dumps(doc))
    short["vms"][0]["rmap_stats"]["levels"][0]["counts"].pop()
    zero = json.loads(json.dumps(doc))
    zero["vms"][0]["rmap_stats"]["levels"][0]["lengths"][0]["length"] = 0
    both = {**doc, "vms": [{**vm, "gfn": "0x10", "sptes": [], "skipped": []}]}
    for bad in (short, zero, both):
        assert list(VALIDATOR.iter_errors(bad))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**doc, "vms": [{k: v for k, v in vm.items()
                                             if k != "rmap_stats"}]}, VALIDATOR.schema)
