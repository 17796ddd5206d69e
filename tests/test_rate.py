"""rate (kvm_mmu_load per second per vCPU, a tracefs kprobe) on a running emulated host.

The host's one vCPU cycles CR3 through 6 page-table sets forever: more than
the current root and the 3 prev_roots hold, so every switch misses the cache
and reloads the root (kvm_mmu_load). kvminspect runs inside the host, on its
own /proc/kcore (tests/live/host.py, python=True); rate must see reloads and
leave no kprobe behind. The halted case is in tests/test_live_kcore.py.
"""

from __future__ import annotations

import json

import pytest

from kvminspect.cli import run_one
from kvminspect.errors import UsageError
from kvminspect.session import Session
from tests.conftest import open_fixture
from tests.live.host import DEBUG_IN_HOST, EmulatedHost, booted


@pytest.fixture(scope="module")
def thrashing():
    yield from booted(python=True, vcpus=1, sets=6, windows="1,1,1,1,1,1", cycle=True)


@pytest.mark.slow
@pytest.mark.live
def test_rate_counts_root_reloads(thrashing: EmulatedHost) -> None:
    host = thrashing
    r = host.run(f"kvminspect --live -s {DEBUG_IN_HOST} rate --seconds 3 --json")
    assert r.returncode == 0, r.stderr
    (vm,) = json.loads(r.stdout)["vms"]
    (v,) = vm["vcpus"]
    assert v["tid"] == host.truth["vcpus"][0]["tid"] and len(v["per_second"]) == 3
    assert sum(v["per_second"]) > 0 and sum(v["histogram"].values()) == 3
    r = host.run("cat /sys/kernel/tracing/kprobe_events")
    assert r.returncode == 0 and r.stdout == ""
    r = host.run(f"kvminspect --live -s {DEBUG_IN_HOST} rate --seconds 1")
    assert r.returncode == 0, r.stderr
    assert "kvm_mmu_load calls per second" in r.stdout and "CALLS/S" in r.stdout


def test_rate_refuses_a_vmcore() -> None:
    with pytest.raises(UsageError, match="runs on the host itself"):
        run_one(Session(open_fixture("6.1-shadow")), ["rate"])


def test_parse_hist() -> None:
    """Both ways the kernel prints a common_pid key (with its comm, or bare)."""
    from kvminspect.commands.rate import histogram, parse_hist

    text = ("# event histogram\n{ common_pid: vmm             [       113] } hitcount:        7\n"
            "{ common_pid: qemu-kvm        [      2048] } hitcount:       12\n"
            "{ common_pid:        99 } hitcount:          3\n\nTotals:\n    Hits: 22\n")
    assert parse_hist(text) == {113: 7, 2048: 12, 99: 3}
    h = histogram([0, 5, 10, 99, 100, 250])
    assert h["0-9"] == 2 and h["10-19"] == 1 and h["90-99"] == 1 and h[">=100"] == 2
