"""VM-wide state that explains stuck vCPUs (MMU notifier invalidation, NX huge
pages, mmu_page_hash), vcpu->requests by name, and the large-page fixtures.

The large fixtures (mkfixture --large, VMM -L; tests/vmcores/README.md): the
guest maps two 2 MiB pages over a THP-backed memslot, data at large.va ->
large.gpa (read after each CR3 load) and code at exec_va -> exec_gpa (a RET at
exec_off, called); kvm has nx_huge_pages=Y, so the executed one is split into
4 KiB SPTEs and its level-1 page is on possible_nx_huge_pages.
"""

from __future__ import annotations

import json

import pytest

from kvminspect.layout import UNKNOWN, has_member, known
from kvminspect.objects import RootKind
from kvminspect.requests import TABLES, bit_names, table_for
from kvminspect.walk import Stop, Verdict, walk
from tests.conftest import FIXTURES, LARGE, SMM, open_fixture, run_main, truth
from tests.test_schema import validate

OFF = 0x1234  # an offset into the data 2 MiB page, past its first 4 KiB


def the_vm(name: str):
    k = open_fixture(name).kernel
    return k, k.vms()[0]


def test_request_tables_name_their_release_and_source() -> None:
    """One table per release family; every name is KVM_REQ_* without the prefix;
    bits 0-7 generic, 8+ x86's KVM_ARCH_REQ(n)."""
    assert sorted(TABLES) == ["5.10", "6.1", "6.12", "7.3"]
    for rel, t in TABLES.items():
        assert t.release == rel and "kvm_host.h" in t.source
        assert t.names[0] == "TLB_FLUSH" and t.names[8] == "MIGRATE_TIMER"
        assert t.names[20] == "SMI" and t.names[11] == "MMU_SYNC"
    assert TABLES["5.10"].names[1] == "MMU_RELOAD" and TABLES["6.1"].names[1] == "VM_DEAD"
    # 6.1.192 (Debian 6.1.0-56) has no UNHALT: bit 3 is unnamed there
    assert 3 not in TABLES["6.1"].names and TABLES["6.12"].names[3] == "DIRTY_RING_SOFT_FULL"
    assert TABLES["7.3"].names[37] == "RECALC_INTERCEPTS"
    assert TABLES["6.12"].names[37] == "MSR_FILTER_CHANGED"


def test_request_table_by_release_and_raw_bits() -> None:
    """The table is chosen by major.minor; a release without one, or a bit a table
    does not name, shows 'bit N'."""
    assert table_for("6.1.0-56-amd64") is TABLES["6.1"]
    assert table_for("6.12.117+deb12-amd64") is TABLES["6.12"]
    assert table_for("6.2.0") is None and table_for("?") is None
    assert bit_names((1 << 20) | 1, TABLES["6.1"]) == ["SMI", "TLB_FLUSH"][::-1]
    assert bit_names((1 << 20) | (1 << 63), None) == ["bit 20", "bit 63"]
    assert bit_names(1 << 6, TABLES["7.3"]) == ["bit 6"]
    assert bit_names(0, TABLES["7.3"]) == []


@pytest.mark.parametrize("name", FIXTURES + LARGE + SMM)
def test_vcpu_requests_are_named_by_the_release_table(name: str) -> None:
    """vcpu->requests is read raw and every set bit named (the fixtures' vCPUs
    halted with clock/steal updates pending on some releases)."""
    k, vm = the_vm(name)
    table = table_for(truth(name)["kernel_release"])
    assert table is not None
    for v in k.vcpus(vm):
        raw = v.requests
        assert known(raw)
        assert list(v.request_names) == bit_names(raw, table)
        assert not any(n.startswith("bit ") for n in v.request_names), v.request_names


def test_vcpus_show_requests_text_and_json(capsys) -> None:
    """5.10-shadow's halted vCPUs have clock updates pending: shown by name."""
    status, out, err = run_main(["-c", "tests/vmcores/5.10-shadow", "vcpus"], capsys)
    assert status == 0, err
    assert "REQUESTS" in out and "CLOCK_UPDATE" in out
    status, out, err = run_main(["-c", "tests/vmcores/5.10-shadow", "vcpus", "--json"], capsys)
    doc = json.loads(out)
    validate(doc)
    v = doc["vms"][0]["vcpus"][0]
    assert int(v["requests"], 16) and "CLOCK_UPDATE" in v["request_names"]


@pytest.mark.parametrize("name", FIXTURES + LARGE + SMM)
def test_invalidation_names_probed(name: str) -> None:
    """mmu_invalidate_* from 6.3 (and Debian's 6.1 backport), mmu_notifier_*
    before; the range is unknown before 5.13 (not tracked: no warning, as the
    release never had it)."""
    k, vm = the_vm(name)
    inv = k.vm_state(vm).invalidation
    kvm = k.prog.type("struct kvm")
    want = "mmu_invalidate" if has_member(kvm, "mmu_invalidate_seq") else "mmu_notifier"
    assert inv.prefix == want
    assert inv.seq >= 0 and inv.in_progress == 0  # dumped at rest
    ranged = has_member(kvm, f"{want}_range_start")
    assert ranged == (not name.startswith("5.10"))
    assert known(inv.range_start) == ranged
    if not ranged:
        assert inv.range_start is UNKNOWN and inv.range_end is UNKNOWN


@pytest.mark.parametrize("name", FIXTURES + LARGE + SMM)
def test_hash_holds_every_shadow_mmu_page(name: str) -> None:
    """kvm->arch.mmu_page_hash holds every shadow-MMU page (not the TDP MMU's):
    its chains add up to n_used_mmu_pages for shadow VMs; TDP MMU VMs have none
    (7.x allocates the hash lazily: not allocated)."""
    k, vm = the_vm(name)
    h = k.vm_state(vm).hash
    if vm.mmu == "tdp_mmu":
        assert h is None or h.pages == 0
        return
    assert h is not None and h.buckets == 4096
    if vm.mmu == "shadow":
        assert h.pages == vm.n_used_mmu_pages > 0
    assert h.used == sum(h.histogram.values()) and h.longest == max(h.histogram)
    assert h.pages == sum(n * c for n, c in h.histogram.items())


@pytest.mark.parametrize("name", LARGE)
def test_nx_huge_pages_state(name: str) -> None:
    """nx_huge_pages=Y (truth's module_params) and the executed 2 MiB page split:
    one page on possible_nx_huge_pages under a shadow root (the guest maps its
    other code 4 KiB by 4 KiB); under TDP also the first 2 MiB, where the guest's
    code at CODE_GPA runs and which the host backs with a huge page too. The
    other fixtures run with the default (auto: off on AMD) and have none."""
    assert "nx_huge_pages=Y" in truth(name)["module_params"]
    k, vm = the_vm(name)
    nx = k.vm_state(vm).nx
    assert nx.param == 1 and nx.possible == (1 if vm.mmu == "shadow" else 2)


def test_nx_huge_pages_off_elsewhere() -> None:
    for name in ("6.1-shadow", "7.3-tdp", "5.10-shadow"):
        k, vm = the_vm(name)
        nx = k.vm_state(vm).nx
        assert nx.param == 0 and nx.possible == 0, name


def _large(name: str) -> tuple[dict, int, int]:
    """(truth's "large", data address walked, exec address walked): guest
    virtual for a shadow root, guest physical for TDP."""
    lg = truth(name)["large"]
    if truth(name)["mmu"] == "shadow":
        return lg, int(lg["va"], 16) + OFF, int(lg["exec_va"], 16) + int(lg["exec_off"], 16)
    return lg, int(lg["gpa"], 16) + OFF, int(lg["exec_gpa"], 16) + int(lg["exec_off"], 16)


@pytest.mark.parametrize("name", LARGE)
def test_walk_stops_at_the_large_spte(name: str) -> None:
    """Every vCPU's walk of the data 2 MiB page stops at a level-2 large SPTE,
    offset within 2 MiB; the memslot check confirms the 4 KiB page the offset
    falls in (gfn of large.gpa + OFF) against the VMM's page tables."""
    lg, data, _ = _large(name)
    k, vm = the_vm(name)
    for i, v in enumerate(k.vcpus(vm)):
        w = walk(k, vm, data, v.root, f"vcpu{i}.root", v, direct=v.direct)
        assert w.stop is Stop.LARGE, (w.stop, w.why)
        last = w.steps[-1]
        assert last.level == 2 and last.bits.large and last.bits.leaf
        assert w.offset == OFF and "2 MiB" in w.why
        assert last.bits.nx  # nx_huge_pages: a huge page is never executable
        c = w.check
        assert c.gfn == (int(lg["gpa"], 16) + OFF) >> 12
        assert c.verdict is Verdict.MATCH and c.host_pfn == w.pfn, c  # the 4 KiB at OFF
        assert last.value >> 12 & 0xFFFFFFFFFF == w.pfn - (OFF >> 12)  # the SPTE's pfn
        assert c.hva == int(lg["hva"], 16) + int(lg["gpa"], 16) + (OFF & ~0xFFF)


@pytest.mark.parametrize("name", LARGE)
def test_executed_huge_page_is_split(name: str) -> None:
    """The code 2 MiB page is mapped 4 KiB by 4 KiB (NX huge page): the walk ends
    at a level-1 leaf, executable, under a non-large level-2 SPTE."""
    lg, _, code = _large(name)
    k, vm = the_vm(name)
    v = k.vcpus(vm)[0]
    w = walk(k, vm, code, v.root, "vcpu0.root", v, direct=v.direct)
    assert w.stop is Stop.LEAF and w.steps[-1].level == 1
    assert not w.steps[-2].bits.large and w.steps[-1].bits.x
    assert w.check.gfn == (int(lg["exec_gpa"], 16) + int(lg["exec_off"], 16)) >> 12
    assert w.check.verdict is Verdict.MATCH


@pytest.mark.parametrize("name", LARGE)
def test_sp_decodes_large_sptes(name: str, capsys) -> None:
    """'sp' of the level-2 page shows the large SPTE: leaf, large, its pfn."""
    _, data, _ = _large(name)
    k, vm = the_vm(name)
    v = k.vcpus(vm)[0]
    w = walk(k, vm, data, v.root, "vcpu0.root", v, direct=v.direct)
    sp_addr, index = w.steps[-1].table, w.steps[-1].index  # struct kvm_mmu_page
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "sp", hex(sp_addr), "--json"],
                                capsys)
    assert status == 0, err
    doc = json.loads(out)
    validate(doc)
    (page,) = doc["vms"][0]["pages"]
    e = next(e for e in page["sptes"] if e["index"] == index)
    assert e["leaf"] and e["large"] and e["bits"]["large"]
    assert int(e["pfn"], 16) == w.pfn - (OFF >> 12)
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "sp", hex(sp_addr)], capsys)
    assert status == 0, err


@pytest.mark.parametrize("name", LARGE + ["5.10-shadow", "7.3-tdp"])
def test_vm_shows_the_state(name: str, capsys) -> None:
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "vm"], capsys)
    assert status == 0, err
    assert "MMU notifier:" in out and "NX huge pages: nx_huge_pages" in out
    assert "mmu_page_hash:" in out
    if name in LARGE:
        assert "nx_huge_pages on, possible_nx_huge_pages " in out
    for cmd in ("vm", "vms"):
        status, out, err = run_main(["-c", f"tests/vmcores/{name}", cmd, "--json"], capsys)
        doc = json.loads(out)
        validate(doc)
        st = doc["vms"][0]["mmu_state"]
        assert st["invalidate"]["names"] in ("mmu_invalidate", "mmu_notifier")
        if name.startswith("5.10"):
            assert st["invalidate"]["range_start"] == "unknown"


# The SMM fixture (mkfixture --smm, VMM -M): memslot 0 is in address spaces 0
# and 1; the last vCPU took an SMI (KVM_SMI) after the workload and halts in
# SMM, paging off, after reading smm.read and writing smm.write from its
# handler at smm.entry.


def test_smm_vcpus_root_is_made_of_smm_pages(capsys) -> None:
    """The vCPU in SMM has a PAE-style root (paging off: KVM's nonpaging MMU)
    whose pages all carry role.smm, marked SMM; no other vCPU's page does."""
    (name,) = SMM
    smm = truth(name)["smm"]
    k, vm = the_vm(name)
    vcpus = k.vcpus(vm)
    inside = vcpus[smm["vcpu"]]
    assert inside.root.special is RootKind.PAE_ROOT and inside.root.pae_roots
    for _, sp_addr in inside.root.pae_roots:
        sp = k.shadow_page(sp_addr)
        assert sp.role.get("smm") == 1 and sp.role.direct
    for v in vcpus:
        if v is not inside:
            assert v.root.sp.role.get("smm") == 0
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "roots"], capsys)
    assert status == 0, err
    rows = [r for r in out.splitlines() if "pae_root[" in r]
    assert rows and all(r.rstrip().endswith("SMM") for r in rows)
    assert sum("SMM" in r for r in out.splitlines()) == len(rows)
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "roots", "--json"], capsys)
    doc = json.loads(out)
    validate(doc)
    root = doc["vms"][0]["vcpus"][smm["vcpu"]]["root"]
    assert root["state"] == "pae_root" and all(e["page"]["smm"] for e in root["pae_roots"])


def test_smm_address_space_memslots(capsys) -> None:
    """'vm' shows memslot 0 in address space 1 too (kvm->memslots[1]), the same
    userspace memory."""
    (name,) = SMM
    k, vm = the_vm(name)
    by_as = {s.as_id: s for s in vm.memslots}
    assert set(by_as) == {0, 1}
    assert by_as[1].userspace_addr == by_as[0].userspace_addr and by_as[1].id == 0
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "vm", "--json"], capsys)
    doc = json.loads(out)
    validate(doc)
    assert [m["as_id"] for m in doc["vms"][0]["memslots"]] == [0, 1]
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "vm"], capsys)
    assert "\n 1   0   0x0" in out


def test_smm_walk_uses_address_space_1() -> None:
    """The handler's code, the page it read and the page it wrote: each walk from
    the SMM vCPU's root (guest physical: paging is off) ends at a 4 KiB leaf of an
    SMM page, confirmed through the memslot of address space 1."""
    (name,) = SMM
    smm = truth(name)["smm"]
    k, vm = the_vm(name)
    v = k.vcpus(vm)[smm["vcpu"]]
    for key in ("entry", "read", "write"):
        addr = int(smm[key], 16)
        w = walk(k, vm, addr, v.root, "root", v, direct=v.direct)
        assert w.stop is Stop.LEAF and w.steps[-1].level == 1, (key, w.why)
        assert k.shadow_page(w.steps[-1].table).role.get("smm") == 1
        assert w.check.slot.as_id == 1 and w.check.gfn == addr >> 12
        assert w.check.verdict is Verdict.MATCH, w.check


def test_vms_walks_no_hash_chain_vm_does(capsys) -> None:
    """vms stays as cheap as listing the VMs: its mmu_state leaves mmu_page_hash out
    (a read per shadow page); vm has it."""
    status, out, _ = run_main(["-c", "tests/vmcores/6.1-shadow", "vms", "--json"], capsys)
    (vm,) = json.loads(out)["vms"]
    assert status == 0 and "mmu_page_hash" not in vm["mmu_state"]
    assert "invalidate" in vm["mmu_state"] and "nx_huge_pages" in vm["mmu_state"]
    status, out, _ = run_main(["-c", "tests/vmcores/6.1-shadow", "vm", "--vm", "0", "--json"],
                              capsys)
    (vm,) = json.loads(out)["vms"]
    assert status == 0 and vm["mmu_state"]["mmu_page_hash"]["pages"] > 0
