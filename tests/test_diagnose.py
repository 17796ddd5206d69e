"""diagnose: verdicts, the rules for stuck vCPUs, golden text, exit status, JSON."""

from __future__ import annotations

import json

import pytest

from kvminspect.cli import main
from kvminspect.diagnose import RootHealth, StuckReason, Verdict, diagnose_vm
from kvminspect.graph import build
from kvminspect.session import Session
from kvminspect.target import open_core
from tests.conftest import ALL, FIXTURES, LARGE, MULTI_VM, SMM, VMCORES, open_fixture, truth

CLEAN = [n for n in ALL if not truth(n).get("special")]  # every fixture with a VM


def run(argv: list[str], capsys, monkeypatch, columns: int = 100) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", str(columns))
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("name", CLEAN)
def test_every_clean_fixture_is_healthy(name: str) -> None:
    """No error, no warning, no stuck vCPU on any fixture the VMM left consistent."""
    k = open_fixture(name).kernel
    for vm in k.vms():
        d = diagnose_vm(k, build(k, vm))
        assert d.verdict is Verdict.HEALTHY, [f.message for f in d.shown]
        assert not [v for v in d.vcpus if v.stuck]
        assert d.audit.pages == len(build(k, vm)) and d.audit.leaves >= 0


GOLDEN = {
    "6.1-shadow": """\
VM 0  kvm 0xffffd1e6803fd000  pid 97  shadow: HEALTHY (0 errors, 0 warnings, 0 info)
  checked 37 shadow pages, 53 present leaf SPTEs against the memslots and rmaps (0 not checkable)
  MMU notifier: seq 0, no invalidation in progress; mmu_lock free
  vCPUs: 4, none stuck
""",
    "6.1-shadow-zapped": """\
VM 0  kvm 0xffffd2d580405000  pid 98  shadow: HEALTHY (0 errors, 0 warnings, 5 info)
  info (normal states; check --all lists each): obsolete-root x4, used-mmu-pages x1
  checked 4 shadow pages, 0 present leaf SPTEs against the memslots and rmaps (0 not checkable)
  MMU notifier: seq 0, no invalidation in progress; mmu_lock free
  vCPUs: 4, none stuck
""",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_text(name: str, capsys, monkeypatch) -> None:
    status, out, err = run(["-c", str(VMCORES / name), "diagnose"], capsys, monkeypatch)
    assert (status, err) == (0, "")
    assert out == GOLDEN[name]


@pytest.mark.parametrize("name", FIXTURES + MULTI_VM + LARGE + SMM)
def test_healthy_fits_one_screen(name: str, capsys, monkeypatch) -> None:
    """At 100 columns a healthy VM takes a few lines, never more than 30."""
    status, out, _ = run(["-c", str(VMCORES / name), "diagnose"], capsys, monkeypatch)
    assert status == 0
    assert len(out.splitlines()) <= 30 * len(open_fixture(name).kernel.vms())
    assert all(len(line) <= 100 for line in out.splitlines())


def test_stale_root_without_reload_request_is_stuck(damaged, capsys, monkeypatch) -> None:
    """vcpu0's reload request cleared after a fast zap: its obsolete root stays,
    so it is stuck-suspect (stale-root-no-reload); vcpu3 shares the root but has
    the request: not stuck. The VM is degraded; exit 0, or 3 with --fail-on warning."""
    path = damaged("6.1-shadow-zapped", "reload-request-cleared")
    k = open_core(str(path), []).kernel
    vm = k.vms()[0]
    d = diagnose_vm(k, build(k, vm))
    assert d.verdict is Verdict.DEGRADED
    stuck = {v.vcpu.vcpu_idx: v for v in d.vcpus if v.stuck}
    assert list(stuck) == [0]
    assert stuck[0].reasons == (StuckReason.STALE_ROOT_NO_RELOAD,)
    assert stuck[0].root is RootHealth.INVALID and not stuck[0].reload_pending
    status, out, _ = run(["-c", str(path), "diagnose"], capsys, monkeypatch)
    assert status == 0
    assert "DEGRADED (0 errors, 1 warning, 4 info, 1 stuck vCPU)" in out
    assert "vcpu0 STUCK-SUSPECT: stale-root-no-reload" in out and "vcpu3 STUCK" not in out
    assert "reload request not pending" in out
    status, _, _ = run(["-c", str(path), "diagnose", "--fail-on", "warning"], capsys,
                       monkeypatch)
    assert status == 3


def test_corrupt_exits_3_and_lists_errors_first(damaged, capsys, monkeypatch) -> None:
    path = damaged("6.1-shadow", "private-mismatch")
    status, out, _ = run(["-c", str(path), "diagnose"], capsys, monkeypatch)
    assert status == 3
    lines = out.splitlines()
    assert "CORRUPT (" in lines[0] and "0 warnings, 1 info)" in lines[0]
    assert lines[1].startswith("  error ") and "error spt-owner: " in out and "orphans x1" in out


@pytest.mark.parametrize("name", ["6.1-shadow", "6.1-tdp", "7.3-shadow-pae", "5.10-shadow"])
def test_json_lists_every_finding_and_vcpu(name: str, capsys, monkeypatch) -> None:
    status, out, _ = run(["-c", str(VMCORES / name), "diagnose", "--json"], capsys, monkeypatch)
    assert status == 0
    (vm,) = json.loads(out)["vms"]
    assert vm["verdict"] == "healthy" and vm["summary"]["error"] == 0
    assert [v["vcpu_id"] for v in vm["vcpus"]] == [v["vcpu_id"] for v in truth(name)["vcpus"]]
    assert all(v["stuck"] is False and v["reasons"] == [] for v in vm["vcpus"])
    assert vm["audit"]["pages"] > 0


@pytest.mark.parametrize(("fixture", "case", "kind", "unit"), [
    ("6.12-tdp", "npf-in-invalidation", "gpa", "gfn"),
    ("6.1-tdp", "npf-in-invalidation", "gpa", "hva"),
    ("6.1-shadow", "pf-in-invalidation", "gva", "hva"),
    ("7.3-shadow", "pf-in-invalidation", "gva", "gfn"),
])
def test_fault_inside_an_invalidation_is_stuck(fixture: str, case: str, kind: str, unit: str,
                                               damaged, capsys, monkeypatch) -> None:
    """vcpu0's last exit planted as a fault (NPF at gpa 0x200000, or a #PF intercept at
    gva 0x200000, which the guest maps to gfn 0x200) and one invalidation in progress
    over that page, in the range's unit (an hva to 6.7, a gfn from 6.8): stuck-suspect,
    the VM degraded, the evidence printed."""
    path = damaged(fixture, case)
    k = open_core(str(path), []).kernel
    d = diagnose_vm(k, build(k, k.vms()[0]))
    (v,) = [v for v in d.vcpus if v.stuck]
    assert v.vcpu.vcpu_idx == 0 and v.reasons == (StuckReason.FAULT_IN_INVALIDATION,)
    assert v.fault is not None
    assert (v.fault.kind, v.fault.gfn, v.fault.inside) == (kind, 0x200, True)
    assert d.invalidation.unit.value == unit and d.verdict is Verdict.DEGRADED
    status, out, _ = run(["-c", str(path), "diagnose"], capsys, monkeypatch)
    assert status == 0 and "1 stuck vCPU)" in out.splitlines()[0]
    flat = " ".join(out.split())  # lines wrap between words at 100 columns
    assert "vcpu0 STUCK-SUSPECT: fault-in-invalidation" in flat
    assert f"{kind} 0x200000 -> gfn 0x200" in flat and "inside the invalidation: yes" in flat
    assert f"range {unit} " in flat


def test_the_verdict_goes_away_outside_the_range(damaged) -> None:
    """The same NPF with the invalidation over gfn 0x300: nothing is stuck."""
    path = damaged("6.12-tdp", "npf-outside-invalidation")
    k = open_core(str(path), []).kernel
    d = diagnose_vm(k, build(k, k.vms()[0]))
    assert d.verdict is Verdict.HEALTHY and not [v for v in d.vcpus if v.stuck]
    (v0,) = [v for v in d.vcpus if v.vcpu.vcpu_idx == 0]
    assert v0.fault is not None and v0.fault.gfn == 0x200 and v0.fault.inside is False


def test_a_second_diagnose_in_a_session_reuses_the_first(monkeypatch, capsys) -> None:
    """On a vmcore the REPL's second 'diagnose' prints what the first found without
    diagnosing again (Session.memo), the same text and exit status."""
    from kvminspect import repl
    from kvminspect.commands import diagnose as cmd

    calls = []
    real = cmd.diagnose_vm

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cmd, "diagnose_vm", counted)
    session = Session(open_fixture("6.1-shadow-2vm"))
    outs = []
    for _ in range(2):
        repl.run_line(session, "diagnose")
        outs.append(capsys.readouterr().out)
    assert len(calls) == 2  # two VMs, once each
    assert outs[0] == outs[1] and "VM 1" in outs[0]
