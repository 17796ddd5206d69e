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
from tests.live.host import EmulatedHost, booted, check_record

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
    check_record(lambda command: one_shot(host, command), host.truth)
    # busy vCPUs: some is in guest mode whenever we look (TCG runs them all the time)
    modes = {v["mode"] for _ in range(3) for v in one_shot(host, "vcpus")["vms"][0]["vcpus"]}
    assert "IN_GUEST_MODE" in modes


def test_qemu_audit_and_walk_live(host: EmulatedHost) -> None:
    """check --audit and walk on the running host: the audit's memslot check
    reads the VMM's page tables live; every vCPU's walk of its set's first
    window (the guest touched it) ends at a leaf the memslot confirms."""
    (vm,) = one_shot(host, "check", "--audit")["vms"]
    assert vm["summary"]["error"] == 0, vm["findings"]
    for v in host.truth["vcpus"]:
        (w,) = one_shot(host, "walk", "0x200000", "--vcpu", str(v["vcpu_id"]))["vms"][0]["walks"]
        assert w["kind"] == "gva" and w["stop"] == "leaf", w
        assert w["memslot"]["verdict"] == "match", w["memslot"]


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
