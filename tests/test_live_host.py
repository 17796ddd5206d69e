"""Plain drgn on a running emulated KVM host (tests/live/host.py), over QMP.

One host per variant for the whole module (halted vCPUs, then busy ones
spinning in guest mode): the VM and its vCPU threads are the VMM's, each
vCPU's root shadows its CR3 and stays put between two readings, and a zap
(a memslot added and deleted) is seen live: mmu_valid_gen toggles and the
halted vCPUs' roots turn invalid, while busy vCPUs load new valid roots.
A third host's vCPUs keep cycling CR3 (VMM -c): the roots move under drgn.
About 11 s per host on two cores (TCG), 45 s in all.
"""

from __future__ import annotations

import time

import drgn
import pytest
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import pfn_to_page
from drgn.helpers.linux.pid import pid_task
from drgn.helpers.linux.xarray import xa_load

from tests.live.host import EmulatedHost, booted

pytestmark = [pytest.mark.slow, pytest.mark.live]


VARIANTS = {  # EmulatedHost options; tests choose theirs (indirect parametrization)
    "halted": {},
    "busy": {"busy": True},
    "cycling": {"busy": True, "cycle": True},
}
# pytest groups the tests by variant: one host at a time, each booted once
STEADY = pytest.mark.parametrize("host", ["halted", "busy"], indirect=True)


@pytest.fixture(scope="module")
def host(request):
    yield from booted(**VARIANTS[request.param])


@pytest.fixture(scope="module")
def prog(host: EmulatedHost) -> drgn.Program:
    """Plain drgn on the host over QMP, with the 6.1 debug set."""
    p = drgn.Program()
    p.set_qemu_qmp(str(host.qmp_socket))
    p.load_debug_info(host.debug_files, main=True)
    return p


def the_vm(prog: drgn.Program) -> drgn.Object:
    vms = list(list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"))
    assert len(vms) == 1
    return vms[0]


def vcpus_of(kvm: drgn.Object) -> list[drgn.Object]:
    n = kvm.online_vcpus.counter.value_()
    return [drgn.cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
            for i in range(n)]


def root_of(prog: drgn.Program, vcpu: drgn.Object) -> drgn.Object:
    """The shadow page of vcpu->arch.mmu->root.hpa (to_shadow_page())."""
    page = pfn_to_page(prog, vcpu.arch.mmu.root.hpa.value_() >> 12)
    return drgn.Object(prog, "struct kvm_mmu_page *", page.private.value_())


@STEADY
def test_live_vm_and_vcpus(host: EmulatedHost, prog: drgn.Program) -> None:
    t = host.truth
    assert prog.flags & drgn.ProgramFlags.IS_LIVE
    assert prog["UTS_RELEASE"].string_().decode() == t["kernel_release"]
    kvm = the_vm(prog)
    assert kvm.userspace_pid.value_() == t["vmm_pid"] == host.record["vmm_pid"]
    vcpus = vcpus_of(kvm)
    assert [v.vcpu_id.value_() for v in vcpus] == [v["vcpu_id"] for v in t["vcpus"]]
    assert [pid_task(v.pid, 0).pid.value_() for v in vcpus] == [v["tid"] for v in t["vcpus"]]
    assert [v.arch.cr3.value_() for v in vcpus] == [int(v["cr3"], 16) for v in t["vcpus"]]


@STEADY
def test_live_roots_follow_cr3_and_stay(host: EmulatedHost, prog: drgn.Program) -> None:
    vcpus = vcpus_of(the_vm(prog))
    readings = []
    for _ in range(2):
        roots = [root_of(prog, v) for v in vcpus]
        for sp, tv in zip(roots, host.truth["vcpus"], strict=True):
            assert sp.gfn.value_() == int(tv["cr3"], 16) >> 12
            assert sp.role.level.value_() == 4 and not sp.role.invalid
        readings.append([sp.value_() for sp in roots])
        time.sleep(0.5)
    assert readings[0] == readings[1]


@STEADY
def test_live_zap(host: EmulatedHost, prog: drgn.Program) -> None:
    assert host.zaps == 0
    kvm = the_vm(prog)
    vcpus = vcpus_of(kvm)
    before = [root_of(prog, v) for v in vcpus]
    assert kvm.arch.mmu_valid_gen.value_() == 0
    assert host.zap() == 1
    assert kvm.arch.mmu_valid_gen.value_() == 1  # kvm_mmu_zap_all_fast()
    if not host.args.busy:  # halted vCPUs keep their roots, now invalid
        for v, sp in zip(vcpus, before, strict=True):
            assert root_of(prog, v).value_() == sp.value_()
            assert sp.role.invalid
        return
    # busy vCPUs were kicked out of guest mode: they freed the obsolete roots
    # and came back on new ones of the new generation
    deadline = time.monotonic() + 10
    while True:
        after = [root_of(prog, v) for v in vcpus]
        if all(sp.mmu_valid_gen.value_() == 1 for sp in after) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for sp, tv in zip(after, host.truth["vcpus"], strict=True):
        assert sp.mmu_valid_gen.value_() == 1 and not sp.role.invalid
        assert sp.gfn.value_() == int(tv["cr3"], 16) >> 12


@pytest.mark.parametrize("host", ["cycling"], indirect=True)
def test_live_roots_move_with_cycling_cr3(host: EmulatedHost, prog: drgn.Program) -> None:
    """Every set's root stays cached (4 sets: the root and 3 prev_roots), so a
    vCPU's root is always one of the sets' PML4 shadow pages, whichever it is."""
    vcpus = vcpus_of(the_vm(prog))
    set_gfns = {int(s["cr3"], 16) >> 12 for s in host.truth["sets"]}
    seen: set[tuple[int, int]] = set()
    for _ in range(10):
        for i, v in enumerate(vcpus):
            sp = root_of(prog, v)
            assert sp.gfn.value_() in set_gfns and not sp.role.invalid
            seen.add((i, sp.gfn.value_()))
        time.sleep(0.2)
    assert len(seen) > len(vcpus)  # some vCPU was seen on two roots
