"""The committed vmcores are what the VMM says they are (drgn only, no kvminspect).

Each fixture directory holds vmcore.xz, the small debug set (vmlinux, kvm.ko,
kvm-amd.ko; maybe .zst) and truth.json, the VMM's record of the guest. These
tests read the dumps with plain drgn and compare them with that record; they
also prove that the small debug set is enough for everything kvminspect reads.
"""

from __future__ import annotations

import lzma
import os
import shutil
from functools import cache
from pathlib import Path

import drgn
import pytest
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.pid import find_task
from drgn.helpers.linux.xarray import xa_load

from tests.conftest import MULTI_VM, PAIR_SIDES, PAIRS, VMCORES, fixtures, truth

INVALID_PAGE = 2**64 - 1
CACHE = Path(os.environ.get("KVMINSPECT_TEST_CACHE", "/tmp/kvminspect-test-cache"))


def _plain(p: Path) -> Path:
    """*p* decompressed into the test cache (.xz or .zst), never into the tree."""
    if p.suffix not in (".xz", ".zst"):
        return p
    st = p.stat()
    out = CACHE / f"{p.parent.name}-{st.st_size}-{st.st_mtime_ns}" / p.stem
    if not out.exists():
        # the same file of another checkout (another mtime): one copy kept, not one per clone
        for old in CACHE.glob(f"{p.parent.name}-{st.st_size}-*/{p.stem}"):
            shutil.rmtree(old.parent, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".xz":
            data = lzma.decompress(p.read_bytes())
        else:
            import zstandard

            data = zstandard.ZstdDecompressor().decompressobj().decompress(p.read_bytes())
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(out)
    return out


@cache
def prog_of(name: str) -> drgn.Program:
    """A drgn Program on fixture *name* with only its own debug files."""
    d = VMCORES / name
    prog = drgn.Program()
    prog.set_core_dump(str(_plain(d / "vmcore.xz")))
    debug = [str(_plain(p)) for p in sorted(d.iterdir())
             if p.name.split(".")[0] in ("vmlinux", "kvm", "kvm-amd")]
    prog.load_debug_info(debug, main=True)
    return prog


def all_vms(prog: drgn.Program) -> list[drgn.Object]:
    """Every struct kvm on vm_list, head first."""
    return list(list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"))


def with_pairs(pred=lambda t: True) -> list[str]:
    """fixtures(pred) and the sides of the same-boot pairs (PAIR_SIDES) *pred* takes."""
    return fixtures(pred) + [n for n in PAIR_SIDES if pred(truth(n))]


def the_vm(prog: drgn.Program) -> drgn.Object:
    vms = all_vms(prog)
    assert len(vms) == 1
    return vms[0]


def has(obj: drgn.Object, member: str) -> bool:
    try:
        obj.member_(member)
    except LookupError:
        return False
    return True


def vcpus_of(kvm: drgn.Object) -> list[drgn.Object]:
    """kvm->vcpu_array (5.16+) or kvm->vcpus[] (5.10)."""
    n = kvm.online_vcpus.counter.value_()
    if not has(kvm, "vcpu_array"):
        return [kvm.vcpus[i] for i in range(n)]
    return [drgn.cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
            for i in range(n)]


def root_hpa(mmu: drgn.Object) -> int:
    """mmu->root.hpa (5.18+) or mmu->root_hpa (5.10)."""
    return (mmu.root.hpa if has(mmu, "root") else mmu.root_hpa).value_()


def to_sp(prog: drgn.Program, hpa: int) -> drgn.Object:
    """to_shadow_page(): page_private(pfn_to_page(hpa >> PAGE_SHIFT))."""
    from drgn.helpers.linux.mm import pfn_to_page

    page = pfn_to_page(prog, hpa >> 12)
    return drgn.Object(prog, "struct kvm_mmu_page *", page.private.value_())


def active_pages(kvm: drgn.Object) -> list[drgn.Object]:
    return list(list_for_each_entry("struct kvm_mmu_page",
                                    kvm.arch.active_mmu_pages.address_of_(), "link"))


@pytest.mark.parametrize("name", with_pairs())
def test_vm_owner_and_vcpus(name: str) -> None:
    t = truth(name)
    prog = prog_of(name)
    assert prog["UTS_RELEASE"].string_().decode() == t["kernel_release"]
    kvm = the_vm(prog)
    assert kvm.userspace_pid.value_() == t["vmm_pid"]
    assert find_task(prog, t["vmm_pid"]).comm.string_() == b"vmm"
    vcpus = vcpus_of(kvm)
    assert len(vcpus) == len(t["vcpus"])
    for v, tv in zip(vcpus, t["vcpus"], strict=True):
        assert v.vcpu_id.value_() == tv["vcpu_id"]
        assert v.arch.cr3.value_() == int(tv["cr3"], 16)
        task = drgn.helpers.linux.pid.pid_task(v.pid, 0)
        assert task.pid.value_() == tv["tid"]


def long_mode(t: dict) -> bool:
    return t.get("guest_paging", "long") == "long"


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "shadow" and not t["zapped"]
                                          and long_mode(t)))
def test_shadow_roots_follow_cr3(name: str) -> None:
    t = truth(name)
    prog = prog_of(name)
    vcpus = vcpus_of(the_vm(prog))
    set_cr3s = {int(s["cr3"], 16) for s in t["sets"]}
    root_by_cr3: dict[int, int] = {}
    for v in vcpus:
        mmu = v.arch.mmu
        cr3 = v.arch.cr3.value_()
        sp = to_sp(prog, root_hpa(mmu))
        assert sp.gfn.value_() == cr3 >> 12  # each root shadows the guest's CR3
        assert sp.role.level.value_() == 4  # the guest's paging, whatever the host's
        assert not sp.role.direct and not sp.role.invalid
        # vCPUs that ended on one CR3 share one root
        assert root_by_cr3.setdefault(cr3, sp.value_()) == sp.value_()
        # prev_roots cache the other CR3s the vCPU loaded most recently
        prev = {r.pgd.value_() for r in mmu.prev_roots}
        assert len(prev) == 3 and cr3 not in prev and prev <= set_cr3s
        for r in mmu.prev_roots:
            assert to_sp(prog, r.hpa.value_()).gfn.value_() == r.pgd.value_() >> 12
    if len(t["sets"]) <= 4:  # with 4 sets, prev_roots hold exactly the other three
        for v in vcpus:
            prev = {r.pgd.value_() for r in v.arch.mmu.prev_roots}
            assert prev == set_cr3s - {v.arch.cr3.value_()}


@pytest.mark.parametrize("name", with_pairs(lambda t: t["mmu"] == "shadow" and not t["zapped"]))
def test_unsync_leaves_are_the_written_page_tables(name: str) -> None:
    t = truth(name)
    kvm = the_vm(prog_of(name))
    expected = {int(g, 16) for s in t["sets"] for g in s["unsync_gfns"]}
    pages = active_pages(kvm)
    unsync = {sp.gfn.value_() for sp in pages if sp.unsync}
    assert unsync == expected
    assert all(sp.role.level.value_() == 1 for sp in pages if sp.unsync)
    # every ancestor on the way from a root has unsync_children set
    uc = {sp.gfn.value_(): sp.unsync_children.value_() for sp in pages}
    for s in t["sets"]:
        if s["unsync_gfns"] and long_mode(t):
            pml4, pdpt, pd = (int(g, 16) >> 12 for g in s["pt_gpas"][:3])
            assert uc[pml4] == 1 and uc[pdpt] == 1
            assert uc[pd] == len(s["unsync_gfns"])
        elif s["unsync_gfns"]:  # PAE: the PDPT is not shadowed, the PD is the top
            pdpt, pd = (int(g, 16) >> 12 for g in s["pt_gpas"][:2])
            assert pdpt not in uc
            assert uc[pd] == len(s["unsync_gfns"])


@pytest.mark.parametrize("name", fixtures(lambda t: not long_mode(t)))
def test_pae_roots(name: str) -> None:
    """A 32-bit PAE guest: mmu->root is __pa(mmu->pae_root); pae_root[0] holds the
    level-2 shadow page of the PD that PDPT entry 0 points to; no prev_roots."""
    t = truth(name)
    prog = prog_of(name)
    pd_of = {int(s["cr3"], 16): int(s["pt_gpas"][1], 16) >> 12 for s in t["sets"]}
    users: dict[int, int] = {}
    for v in vcpus_of(the_vm(prog)):
        mmu = v.arch.mmu
        pae = mmu.pae_root.value_()
        assert root_hpa(mmu) == pae - prog["page_offset_base"].value_()
        entries = [prog.read_u64(pae + 8 * i) for i in range(4)]
        assert entries[0] & 1 and entries[1:] == [0, 0, 0]  # empty slots are 0 (5.14+)
        sp = to_sp(prog, entries[0] & ~0xFFF & ((1 << 52) - 1))
        assert sp.gfn.value_() == pd_of[v.arch.cr3.value_()]
        assert sp.role.level.value_() == 2 and not sp.role.has_4_byte_gpte
        users[sp.value_()] = users.get(sp.value_(), 0) + 1
        assert all(r.hpa.value_() == INVALID_PAGE for r in mmu.prev_roots)
    for sp, n in users.items():  # one reference per vCPU on that PD
        assert drgn.Object(prog, "struct kvm_mmu_page *", sp).root_count.value_() == n


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "tdp_mmu"))
def test_tdp_mmu_roots(name: str) -> None:
    prog = prog_of(name)
    kvm = the_vm(prog)
    roots = list(list_for_each_entry("struct kvm_mmu_page",
                                     kvm.arch.tdp_mmu_roots.address_of_(), "link"))
    assert roots and all(r.role.direct and r.tdp_mmu_page for r in roots)
    assert not active_pages(kvm)  # the TDP MMU does not use active_mmu_pages
    for v in vcpus_of(kvm):
        sp = to_sp(prog, root_hpa(v.arch.mmu))
        assert sp.value_() in {r.value_() for r in roots}


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "tdp_legacy"))
def test_tdp_legacy_roots(name: str) -> None:
    prog = prog_of(name)
    kvm = the_vm(prog)
    pages = active_pages(kvm)
    assert pages and all(sp.role.direct and not sp.tdp_mmu_page for sp in pages)
    for v in vcpus_of(kvm):
        sp = to_sp(prog, root_hpa(v.arch.mmu))
        assert sp.value_() in {p.value_() for p in pages} and sp.role.level.value_() == 4


@pytest.mark.parametrize("name", with_pairs(lambda t: t["zapped"]))
def test_zapped_roots_are_invalid(name: str) -> None:
    prog = prog_of(name)
    kvm = the_vm(prog)
    assert kvm.arch.mmu_valid_gen.value_() == 1  # one fast zap
    for v in vcpus_of(kvm):
        mmu = v.arch.mmu
        for hpa in [root_hpa(mmu)] + [r.hpa.value_() for r in mmu.prev_roots]:
            if hpa != INVALID_PAGE:
                sp = to_sp(prog, hpa)
                assert sp.role.invalid and sp.mmu_valid_gen.value_() != 1


@pytest.mark.parametrize("name", fixtures(lambda t: t["busy"]))
def test_busy_vcpus_in_guest_mode(name: str) -> None:
    prog = prog_of(name)
    modes = [v.mode.value_() for v in vcpus_of(the_vm(prog))]
    assert prog["IN_GUEST_MODE"].value_() in modes


@pytest.mark.parametrize("name", fixtures(lambda t: t["paging_levels"] == 5))
def test_five_level_host(name: str) -> None:
    prog = prog_of(name)
    assert prog.read_u32(prog.symbol("__pgtable_l5_enabled").address) == 1
    # the direct map (where struct kvm lives) starts at 0xff11... with 5 levels
    assert the_vm(prog).value_() >> 52 != 0xFFF


@pytest.mark.parametrize("name", with_pairs())
def test_small_debug_set_reads_tasks_and_stacks(name: str) -> None:
    """What the small vmlinux must still give drgn: tasks, per-CPU data, stacks."""
    t = truth(name)
    prog = prog_of(name)
    from drgn.helpers.linux.sched import task_state_to_char

    task = find_task(prog, t["vcpus"][0]["tid"])
    assert task.comm.string_() == b"vmm"
    assert task_state_to_char(task) in "RS"
    trace = prog.stack_trace(task)
    names = [f.name for f in list(trace)[:20]]
    if not t["busy"]:
        assert "kvm_vcpu_block" in names or "kvm_vcpu_halt" in names, names


@pytest.mark.parametrize("name", fixtures(lambda t: t["mmu"] == "tdp_mmu"))
def test_tdp_child_page_levels(name: str) -> None:
    """role.level of a TDP MMU root's child: 3, but 4 on 5.10, whose kvm_tdp_mmu_map()
    gave a child page table the level of the SPTE pointing at it (fixed in 5.13)."""
    prog = prog_of(name)
    kvm = the_vm(prog)
    (root,) = list_for_each_entry("struct kvm_mmu_page", kvm.arch.tdp_mmu_roots.address_of_(),
                                  "link")
    assert root.role.level.value_() == 4
    child_spte = next(v for v in (root.spt[i].value_() for i in range(512)) if v & 1)
    child = to_sp(prog, child_spte & ~0xFFF & ((1 << 52) - 1))
    assert child.tdp_mmu_page and child.root_count.value_() == 0
    old = truth(name)["kernel_release"].startswith("5.10.")
    assert child.role.level.value_() == (4 if old else 3)


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_is_one_boot_before_and_after_a_fast_zap(pair: str) -> None:
    """NAME/before and NAME/after (mkfixture --pair): one kernel, one boot (the same
    struct kvm, owner and vCPU threads), the VMM's one record; after the zap
    (kvm_mmu_zap_all_fast) mmu_valid_gen is 1, active_mmu_pages is empty and the
    roots the halted vCPUs hold are all that n_used_mmu_pages still counts."""
    before, after = (truth(f"{pair}/{side}") for side in ("before", "after"))
    assert (before["pair"]["side"], after["pair"]["side"]) == ("before", "after")
    assert (before["zapped"], after["zapped"]) == (False, True)
    for key in ("kernel_release", "vmm_pid", "vcpus", "made_with"):
        assert before[key] == after[key], key
    assert [s["cr3"] for s in before["sets"]] == [s["cr3"] for s in after["sets"]]
    progs = [prog_of(f"{pair}/{side}") for side in ("before", "after")]
    kvm0, kvm1 = (the_vm(p) for p in progs)
    assert kvm0.value_() == kvm1.value_()
    assert kvm0.userspace_pid.value_() == kvm1.userspace_pid.value_() == before["vmm_pid"]
    assert [v.value_() for v in vcpus_of(kvm0)] == [v.value_() for v in vcpus_of(kvm1)]
    assert (kvm0.arch.mmu_valid_gen.value_(), kvm1.arch.mmu_valid_gen.value_()) == (0, 1)
    assert active_pages(kvm0) and not active_pages(kvm1)
    roots = {root_hpa(v.arch.mmu) for v in vcpus_of(kvm1)}
    roots |= {r.hpa.value_() for v in vcpus_of(kvm1) for r in v.arch.mmu.prev_roots}
    roots.discard(INVALID_PAGE)
    assert {to_sp(progs[1], hpa).gfn.value_() for hpa in roots} == \
        {int(s["cr3"], 16) >> 12 for s in before["sets"]}
    assert kvm1.arch.n_used_mmu_pages.value_() == len(roots)


# Fixtures with several VMs in one VMM process: truth["vms"] in creation order.


def vms_by_creation(prog: drgn.Program, t: dict) -> list[drgn.Object]:
    """The dump's VMs in truth["vms"] order, each recognised by its vCPU threads
    (all VMs of the VMM have the same userspace_pid)."""
    index = {frozenset(v["tid"] for v in tv["vcpus"]): i for i, tv in enumerate(t["vms"])}
    found: dict[int, drgn.Object] = {}
    for kvm in all_vms(prog):
        tids = frozenset(drgn.helpers.linux.pid.pid_task(v.pid, 0).pid.value_()
                         for v in vcpus_of(kvm))
        assert tids in index, f"VM {kvm.value_():#x}: vCPU tids {sorted(tids)} not in truth"
        found[index[tids]] = kvm
    assert sorted(found) == list(range(len(t["vms"])))
    return [found[i] for i in range(len(t["vms"]))]


@pytest.mark.parametrize("name", MULTI_VM)
def test_multi_vm_truth_shape(name: str) -> None:
    """The top level describes the first VM created, as in a one-VM fixture."""
    t = truth(name)
    assert len(t["vms"]) > 1
    assert [tv["index_created"] for tv in t["vms"]] == list(range(len(t["vms"])))
    for key, value in t["vms"][0].items():
        if key != "index_created":
            assert t[key] == value, key
    assert len({tv["vmm_pid"] for tv in t["vms"]}) == 1
    assert sorted(t["vm_list_order"]) == list(range(len(t["vms"])))


@pytest.mark.parametrize("name", MULTI_VM)
def test_multi_vm_list_order_and_owner(name: str) -> None:
    """Every VM is on vm_list, owned by the one VMM process; kvm_create_vm()
    adds a VM at the head of vm_list, so the newest comes first."""
    t = truth(name)
    prog = prog_of(name)
    assert prog["UTS_RELEASE"].string_().decode() == t["kernel_release"]
    vms = all_vms(prog)
    assert len(vms) == len(t["vms"])
    assert all(kvm.userspace_pid.value_() == t["vmm_pid"] for kvm in vms)
    assert find_task(prog, t["vmm_pid"]).comm.string_() == b"vmm"
    by_creation = vms_by_creation(prog, t)
    order = [by_creation.index(kvm) for kvm in vms]
    assert order == t["vm_list_order"] == list(reversed(range(len(vms))))


@pytest.mark.parametrize("name", MULTI_VM)
def test_multi_vm_vcpus(name: str) -> None:
    """Each VM has its own vCPUs: ids, threads of the VMM and final CR3s as recorded."""
    t = truth(name)
    prog = prog_of(name)
    for kvm, tv in zip(vms_by_creation(prog, t), t["vms"], strict=True):
        vcpus = vcpus_of(kvm)
        assert len(vcpus) == len(tv["vcpus"])
        for v, rec in zip(vcpus, tv["vcpus"], strict=True):
            assert v.kvm == kvm
            assert v.vcpu_id.value_() == rec["vcpu_id"]
            assert v.arch.cr3.value_() == int(rec["cr3"], 16)
            task = drgn.helpers.linux.pid.pid_task(v.pid, 0)
            assert task.pid.value_() == rec["tid"] and task.tgid.value_() == t["vmm_pid"]


@pytest.mark.parametrize("name", [n for n in MULTI_VM
                                  if truth(n)["mmu"] in ("shadow", "tdp_legacy")])
def test_multi_vm_mmu_pages_are_per_vm(name: str) -> None:
    """active_mmu_pages of different VMs are disjoint; each VM counts its own."""
    t = truth(name)
    prog = prog_of(name)
    seen: set[int] = set()
    for kvm in vms_by_creation(prog, t):
        pages = {sp.value_() for sp in active_pages(kvm)}
        assert pages and not pages & seen
        seen |= pages
        if has(kvm.arch, "n_used_mmu_pages"):
            assert kvm.arch.n_used_mmu_pages.value_() == len(pages)


@pytest.mark.parametrize("name", [n for n in MULTI_VM
                                  if truth(n)["mmu"] == "shadow" and not truth(n)["zapped"]
                                  and long_mode(truth(n))])
def test_multi_vm_shadow_roots(name: str) -> None:
    """Each VM's roots shadow its own vCPUs' CR3s and sit on its own
    active_mmu_pages, even where two VMs use the same guest CR3; a root's
    root_count is the number of its VM's vCPUs holding it (current or previous)."""
    t = truth(name)
    prog = prog_of(name)
    vms = vms_by_creation(prog, t)
    pages_of = [{sp.value_() for sp in active_pages(kvm)} for kvm in vms]
    root_of_cr3: list[dict[int, int]] = []
    for i, (kvm, tv) in enumerate(zip(vms, t["vms"], strict=True)):
        set_cr3s = {int(s["cr3"], 16) for s in tv["sets"]}
        refs: dict[int, int] = {}
        by_cr3: dict[int, int] = {}
        for v, rec in zip(vcpus_of(kvm), tv["vcpus"], strict=True):
            mmu = v.arch.mmu
            cr3 = int(rec["cr3"], 16)
            sp = to_sp(prog, root_hpa(mmu))
            assert sp.gfn.value_() == cr3 >> 12 and sp.role.level.value_() == 4
            assert not sp.role.direct and not sp.role.invalid
            assert by_cr3.setdefault(cr3, sp.value_()) == sp.value_()
            prev = [r for r in mmu.prev_roots if r.hpa.value_() != INVALID_PAGE]
            # prev_roots: the other CR3s this vCPU loaded last; all S - 1 if S <= 4
            prev_cr3s = {r.pgd.value_() for r in prev}
            assert prev_cr3s <= set_cr3s - {cr3} and len(prev_cr3s) == min(3, len(set_cr3s) - 1)
            for hpa in [root_hpa(mmu)] + [r.hpa.value_() for r in prev]:
                root = to_sp(prog, hpa).value_()
                assert root in pages_of[i]
                assert all(root not in pages for j, pages in enumerate(pages_of) if j != i)
                refs[root] = refs.get(root, 0) + 1
        for root, n in refs.items():
            assert drgn.Object(prog, "struct kvm_mmu_page *", root).root_count.value_() == n
        root_of_cr3.append(by_cr3)
    # a guest CR3 used in several VMs has a root in each
    for cr3 in set.intersection(*(set(d) for d in root_of_cr3)):
        roots = [d[cr3] for d in root_of_cr3]
        assert len(set(roots)) == len(roots)


@pytest.mark.parametrize("name", [n for n in MULTI_VM
                                  if truth(n)["mmu"] == "shadow" and not truth(n)["zapped"]])
def test_multi_vm_unsync_leaves(name: str) -> None:
    """Each VM's unsync shadow pages are the page tables its own guest wrote."""
    t = truth(name)
    prog = prog_of(name)
    for kvm, tv in zip(vms_by_creation(prog, t), t["vms"], strict=True):
        expected = {int(g, 16) for s in tv["sets"] for g in s["unsync_gfns"]}
        pages = active_pages(kvm)
        assert {sp.gfn.value_() for sp in pages if sp.unsync} == expected
        assert all(sp.role.level.value_() == 1 for sp in pages if sp.unsync)
        uc = {sp.gfn.value_(): sp.unsync_children.value_() for sp in pages
              if not sp.role.direct and sp.role.level.value_() > 1}
        for s in tv["sets"]:
            if s["unsync_gfns"] and long_mode(tv):
                pml4, pdpt, pd = (int(g, 16) >> 12 for g in s["pt_gpas"][:3])
                assert uc[pml4] == 1 and uc[pdpt] == 1
                assert uc[pd] == len(s["unsync_gfns"])


@pytest.mark.parametrize("name", MULTI_VM)
def test_multi_vm_vcpu_threads_block(name: str) -> None:
    """Every VM's vCPU threads are the VMM's and (unless busy) halted in KVM."""
    t = truth(name)
    prog = prog_of(name)
    from drgn.helpers.linux.sched import task_state_to_char

    for tv in t["vms"]:
        for rec in tv["vcpus"]:
            task = find_task(prog, rec["tid"])
            assert task.comm.string_() == b"vmm" and task_state_to_char(task) in "RS"
            names = [f.name for f in list(prog.stack_trace(task))[:20]]
            if not tv["busy"]:
                assert "kvm_vcpu_block" in names or "kvm_vcpu_halt" in names, names
