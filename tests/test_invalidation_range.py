"""The MMU notifier invalidation range's unit (read_vmstate.RangeUnit) and
Invalidation.in_range(), the question the fault path's retry check asks.

kvm->mmu_invalidate_range_start/end (mmu_notifier_range_* before 6.0) count
host virtual addresses (unsigned long) from "KVM: x86/mmu: Consider the hva in
mmu_notifier retry" (5.12) and guest frame numbers (gfn_t) from "KVM: Use gfn
instead of hva for mmu_notifier_retry" (6.8): the 6.1 fixture's range is an
hva, the 6.12 and 7.3 fixtures' a gfn, the 5.10 fixture has none.
"""

from __future__ import annotations

import json

import pytest

from kvminspect.layout import UNKNOWN
from kvminspect.read_vmstate import INVALID_GPA, Invalidation, RangeUnit
from tests.conftest import ALL, open_fixture, run_main, truth
from tests.test_schema import validate

KVM_FIXTURES = [n for n in ALL if not truth(n).get("special")]
UNITS = {"5.10": RangeUnit.UNKNOWN, "6.1": RangeUnit.HVA, "6.12": RangeUnit.GFN,
         "7.3": RangeUnit.GFN}


def release(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", KVM_FIXTURES)
def test_unit_follows_the_member_type(name: str) -> None:
    k = open_fixture(name).kernel
    kvm = k.prog.type("struct kvm")
    for vm in k.vms():
        inv = k.vm_state(vm, hash_chains=False).invalidation
        assert inv.unit is UNITS[release(name)]
        if inv.unit is not RangeUnit.UNKNOWN:  # the DWARF says it, not the release
            t = kvm.member(f"{inv.prefix}_range_start").type
            assert (t.name == "gfn_t") == (inv.unit is RangeUnit.GFN), str(t)
        # dumped at rest: nothing retries, whatever the address
        assert inv.in_range(0, inv.unit) is False
        assert inv.in_range(0x1234, RangeUnit.HVA) is False


@pytest.mark.parametrize("name", ["5.10-tdp", "6.1-tdp", "6.12-tdp", "7.3-tdp"])
def test_vm_shows_the_unit(name: str, capsys) -> None:
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "vm"], capsys)
    assert status == 0, err
    unit = UNITS[release(name)]
    line = next(x for x in out.splitlines() if "MMU notifier:" in x)
    if unit is RangeUnit.UNKNOWN:
        assert "range" not in line
    else:
        assert line.endswith(f", range {unit.value} 0x0-0x0"), line
    status, out, err = run_main(["-c", f"tests/vmcores/{name}", "vm", "--json"], capsys)
    doc = json.loads(out)
    validate(doc)
    assert doc["vms"][0]["mmu_state"]["invalidate"]["unit"] == unit.value


def test_in_range_gfn() -> None:
    inv = Invalidation("mmu_invalidate", 7, 1, 0x100, 0x200, RangeUnit.GFN)
    assert inv.in_range(0x100, RangeUnit.GFN) is True
    assert inv.in_range(0x1FF, RangeUnit.GFN) is True
    assert inv.in_range(0x200, RangeUnit.GFN) is False  # [start, end)
    assert inv.in_range(0xFF, RangeUnit.GFN) is False
    assert inv.in_range(0x150, RangeUnit.HVA) is None  # not the range's unit
    assert inv.in_range(0x150, RangeUnit.UNKNOWN) is None
    # begun but no range added yet: mmu_invalidate_retry_gfn() WARNs and retries
    empty = Invalidation("mmu_invalidate", 7, 1, INVALID_GPA, INVALID_GPA, RangeUnit.GFN)
    assert empty.in_range(0x150, RangeUnit.GFN) is True
    done = Invalidation("mmu_invalidate", 8, 0, 0x100, 0x200, RangeUnit.GFN)
    assert done.in_range(0x150, RangeUnit.GFN) is False  # a leftover range retries nothing


def test_in_range_hva() -> None:
    inv = Invalidation("mmu_invalidate", 3, 2, 0x7F00_0000_0000, 0x7F00_0020_0000,
                       RangeUnit.HVA)
    assert inv.in_range(0x7F00_0010_0000, RangeUnit.HVA) is True
    assert inv.in_range(0x7F00_0020_0000, RangeUnit.HVA) is False
    assert inv.in_range(0x100, RangeUnit.GFN) is None  # translate the gfn to an hva first


def test_in_range_unknown() -> None:
    old = Invalidation("mmu_notifier", 1, 1, UNKNOWN, UNKNOWN)  # 5.10: no range
    assert old.unit is RangeUnit.UNKNOWN and old.in_range(0x100, RangeUnit.GFN) is None
    assert Invalidation("mmu_notifier", 1, 0, UNKNOWN, UNKNOWN).in_range(0, RangeUnit.HVA) is False
    nothing = Invalidation(None, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
    assert nothing.in_range(0, RangeUnit.GFN) is None
