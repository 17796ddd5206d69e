"""TDX VMs: listed, their MMU not read, one line saying so.

Debian's kernels here have no CONFIG_KVM_INTEL_TDX and TCG has no VMX, so no
real core holds a TDX VM: the VM read from a real fixture is given
vm_type "tdx" (what kvm->arch.vm_type == KVM_X86_TDX_VM reads as).
"""

from __future__ import annotations

import dataclasses

from kvminspect.session import Session
from tests.conftest import open_fixture


def test_tdx_vm_is_named_not_read() -> None:
    target = open_fixture("6.1-shadow")
    session = Session(target)
    vm = dataclasses.replace(target.kernel.vms()[0], vm_type="tdx", addr=1)
    g = session.graph(vm)
    assert len(g.graph) == 0 and not g.roots and not g.vcpus
    msgs = [str(p) for p in target.kernel.problems if p.addr == vm.addr]
    assert msgs == ["struct kvm 0x1: TDX VM (mirror and external roots) not supported: "
                    "its MMU is not read"]
    target.kernel.problems.discard(vm.addr)


def test_other_vm_types_are_read() -> None:
    target = open_fixture("6.1-shadow")
    vm = dataclasses.replace(target.kernel.vms()[0], vm_type="sev")
    assert vm.unsupported is None
    assert len(Session(target).graph(vm).graph) > 0
