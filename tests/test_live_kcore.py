"""kvminspect --live on /proc/kcore, run inside a running emulated KVM host.

One host for the module (tests/live/host.py, ``python=True``): Debian's 6.1
kernel under QEMU TCG, a shadow-MMU guest whose vCPUs halt (spinning ones
would take the 2 emulated CPUs from kvminspect: 4x slower), and in the host's
initramfs this machine's Python with kvminspect and its dependencies
(tests/live/pack.py) and the kernel's debug set in /debug. The commands run in
the host against its own /proc/kcore (``host.run``: typed on the serial
console, output dumped back between markers) and must match the VMM's record.
"""

from __future__ import annotations

import json

import pytest

from tests.live.host import DEBUG_IN_HOST, EmulatedHost, booted, check_record

pytestmark = [pytest.mark.slow, pytest.mark.live]

# what kvminspect imports, directly or through its dependencies, in any command
MODULES = ["drgn", "_drgn", "networkx", "rich", "rich.console", "prompt_toolkit",
           "zstandard", "pygments", "markdown_it", "mdurl", "wcwidth"]


@pytest.fixture(scope="module")
def host():
    yield from booted(python=True)  # halted vCPUs: busy ones starve kvminspect


def live(host: EmulatedHost, command: str) -> dict:
    """kvminspect --live -s /debug COMMAND --json, inside the host."""
    r = host.run(f"kvminspect --live -s {DEBUG_IN_HOST} {command} --json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["command"] == command.split()[0] and out["errors"] == [], out["errors"]
    return out


def test_python_imports_inside_the_host(host: EmulatedHost) -> None:
    """Every kvminspect module and its dependencies import in the packed Python,
    from the copied package (not the source tree through an editable install)."""
    script = ("import importlib, pkgutil, kvminspect; "
              f"[importlib.import_module(m) for m in {MODULES!r}]; "
              "[importlib.import_module(m.name) for m in "
              "pkgutil.walk_packages(kvminspect.__path__, 'kvminspect.') "
              "if m.name != 'kvminspect.__main__']; "
              "print(kvminspect.__file__)")
    r = host.run(f'/py/bin/python3 -c "{script}"')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "/py/lib/python3.11/site-packages/kvminspect/__init__.py"


def test_kcore_one_shot_matches_the_record(host: EmulatedHost) -> None:
    """vms, vcpus, roots (with prev_roots) and unsync on /proc/kcore."""
    check_record(lambda command: live(host, command), host.truth)


def kprobe_events(host: EmulatedHost) -> str:
    r = host.run("cat /sys/kernel/tracing/kprobe_events")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_rate_zero_when_halted_and_kprobe_removed(host: EmulatedHost) -> None:
    """rate: halted vCPUs reload no root (0 kvm_mmu_load calls a second); the kprobe
    and its trigger are gone afterwards."""
    assert kprobe_events(host) == ""
    doc = live(host, "rate --seconds 2")
    (vm,) = doc["vms"]
    assert [v["tid"] for v in vm["vcpus"]] == [v["tid"] for v in host.truth["vcpus"]]
    assert all(v["per_second"] == [0, 0] for v in vm["vcpus"])
    assert all(v["histogram"]["0-9"] == 2 for v in vm["vcpus"])
    assert kprobe_events(host) == ""
