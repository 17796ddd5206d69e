"""watch on running emulated KVM hosts whose guests cycle CR3 forever (--qemu).

Two hosts (tests/live/host.py, VMM -c): with 4 page-table sets every root
stays cached (the current root and 3 prev_roots), so each switch watch sees is
a prev_roots hit; with 6 sets the 4-entry cache cannot hold them, so some new
roots were not in the previous sample's prev_roots. The CR3s named are the
sets' CR3s from the VMM's record.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvminspect.cli import run_one
from kvminspect.errors import UsageError
from kvminspect.session import Session
from kvminspect.target import open_qemu
from tests.conftest import FIXTURES, open_fixture
from tests.live.host import booted
from tests.test_schema import VALIDATOR

SHAPES = {"cached": {"sets": 4, "windows": "1,1,1,1"},
          "thrashing": {"sets": 6, "windows": "1,1,1,1,1,1"}}


@pytest.fixture(scope="module", params=list(SHAPES))
def cycling(request):
    for host in booted(busy=True, cycle=True, **SHAPES[request.param]):
        yield request.param, host


@pytest.mark.slow
@pytest.mark.live
def test_watch_counts_switches_hits_and_misses(cycling, capsys) -> None:
    shape, host = cycling
    s = Session(open_qemu(str(host.qmp_socket), host.debug_files))
    capsys.readouterr()
    run_one(s, ["watch", "--interval", "0.2", "--count", "12", "--json"])
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, VALIDATOR.schema)
    (vm,) = doc["vms"]
    assert vm["samples"] == 12 and len(vm["vcpus"]) == len(host.truth["vcpus"])
    sets = {s["cr3"] for s in host.truth["sets"]}
    for v in vm["vcpus"]:
        assert set(v["cr3s"]) <= sets and v["switches"] == v["prev_root_hits"] + v["new_roots"]
    assert sum(v["switches"] for v in vm["vcpus"]) > 0  # the guest keeps switching
    misses = sum(v["new_roots"] for v in vm["vcpus"])
    if shape == "cached":
        assert misses == 0 and sum(v["prev_root_hits"] for v in vm["vcpus"]) > 0
    else:
        assert misses > 0
    capsys.readouterr()
    run_one(s, ["watch", "--interval", "0.1", "--count", "3"])
    out = capsys.readouterr().out
    assert "3 samples, 0.1 s apart" in out and "PREV_ROOTS HITS" in out


def test_watch_needs_a_live_target() -> None:
    with pytest.raises(UsageError, match="live target"):
        run_one(Session(open_fixture("6.1-shadow")), ["watch"])


@pytest.mark.parametrize("name", FIXTURES)
def test_mmu_roots_block_read_agrees(name: str) -> None:
    """Kernel.mmu_roots (one block read of root and prev_roots) says what vcpus() says;
    None where the layout predates struct kvm_mmu_root_info root (5.10)."""
    k = open_fixture(name).kernel
    for v in k.vcpus(k.vms()[0]):
        got = k.mmu_roots(v)
        if not k.layout.root_info:
            assert got is None
            continue
        assert got == ((v.root.hpa, v.root.pgd), tuple((r.hpa, r.pgd) for r in v.prev_roots))
