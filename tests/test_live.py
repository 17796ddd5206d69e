"""kvminspect live on a running emulated KVM host, through QMP (--qemu).

One host (tests/live/host.py) for the module: Debian's 6.1 kernel under QEMU TCG
with a shadow-MMU guest whose vCPUs spin in guest mode. The commands read it
while it runs and must match the VMM's record; one REPL session must see the
MMU change under it (a fast zap the test triggers between two commands): a
session that kept its first reading fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvminspect.cli import run_one
from kvminspect.session import Session
from kvminspect.target import open_qemu
from tests.live.host import EmulatedHost, booted

pytestmark = [pytest.mark.slow, pytest.mark.live]


@pytest.fixture(scope="module")
def host():
    yield from booted(busy=True)


def one_shot(host: EmulatedHost, *argv: str) -> dict:
    """kvminspect --qemu SOCK CMD --json as a process (what a script would run)."""
    cmd = [sys.executable, "-m", "kvminspect", "--qemu", str(host.qmp_socket),
           *(a for f in host.debug_files for a in ("-s", f)), *argv, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_qemu_one_shot_matches_the_record(host: EmulatedHost) -> None:
    """vms, vcpus, roots (with prev_roots) and unsync, read while the vCPUs run."""
    t = host.truth
    (vm,) = one_shot(host, "vms")["vms"]
    assert vm["pid"] == t["vmm_pid"] and vm["mmu"] == "shadow" and vm["vendor"] == "kvm_amd"
    assert vm["online_vcpus"] == len(t["vcpus"])
    (vm,) = one_shot(host, "vcpus")["vms"]
    assert [v["tid"] for v in vm["vcpus"]] == [v["tid"] for v in t["vcpus"]]
    assert [v["cr3"] for v in vm["vcpus"]] == [v["cr3"] for v in t["vcpus"]]
    # busy vCPUs: some is in guest mode whenever we look (TCG runs them all the time)
    modes = {v["mode"] for _ in range(3) for v in one_shot(host, "vcpus")["vms"][0]["vcpus"]}
    assert "IN_GUEST_MODE" in modes
    (vm,) = one_shot(host, "roots")["vms"]
    sets = {s["cr3"] for s in t["sets"]}
    for v, tv in zip(vm["vcpus"], t["vcpus"], strict=True):
        page = v["root"]["page"]
        assert page["gfn"] == hex(int(tv["cr3"], 16) >> 12) and not page["invalid"]
        prev = {p["pgd"] for p in v["prev_roots"]}
        assert prev == sets - {tv["cr3"]}  # 4 sets: the other three are cached
    (vm,) = one_shot(host, "unsync")["vms"]
    synced = sorted(leaf["gfn"] for r in vm["roots"] for b in r["batches"]
                    for leaf in b["leaves"])
    assert synced == sorted(g for s in t["sets"] for g in s["unsync_gfns"])


def test_repl_session_sees_the_mmu_change(host: EmulatedHost, capsys) -> None:
    """One session, two readings around a fast zap: mmu_valid_gen and the roots'
    state differ; a frozen (cached) reading would show the first twice."""
    s = Session(open_qemu(str(host.qmp_socket), host.debug_files))
    assert s.prompt().startswith("kvminspect(live:qemu")

    def roots() -> dict:
        capsys.readouterr()
        run_one(s, ["roots", "--json"])
        return json.loads(capsys.readouterr().out)["vms"][0]

    before = roots()
    gen = before["mmu_valid_gen"]
    assert all(not v["root"]["page"]["obsolete"] for v in before["vcpus"])
    host.zap()
    after = roots()
    assert after["mmu_valid_gen"] != gen  # kvm_mmu_zap_all_fast toggled it
    # the old roots are gone or obsolete; busy vCPUs reload onto new, valid roots
    old = {v["root"]["page"]["sp"] for v in before["vcpus"]}
    for v in after["vcpus"]:
        page = v["root"]["page"]
        assert page is None or page["sp"] not in old or page["obsolete"]
    assert after != before
