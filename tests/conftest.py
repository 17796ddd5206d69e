"""Shared test helpers: the committed real vmcore fixtures."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import pytest

VMCORES = Path(__file__).resolve().parent / "vmcores"
ALL = sorted(p.name for p in VMCORES.iterdir() if (p / "truth.json").exists())


def truth(name: str) -> dict:
    """The VMM's record of what the guest did (tests/vmcores/NAME/truth.json)."""
    return json.loads((VMCORES / name / "truth.json").read_text())


def fixtures(pred=lambda t: True) -> list[str]:
    """Fixture names whose truth.json satisfies *pred*."""
    return [n for n in FIXTURES if pred(truth(n))]


def _nvms(t: dict) -> int:
    """VMs the fixture's VMM made: truth["vms"] lists them when there are several."""
    return len(t.get("vms", [None]))


def _real_guest(t: dict) -> bool:
    """Debian's QEMU running a Linux guest (mkfixture --real-guest): no VMM
    record, its own truth keys (tests/vmcores/README.md)."""
    return t.get("vmm") == "qemu"


def _shaped(t: dict) -> bool:
    """The usual guest: no special host, and none of the guests with their own
    shape and tests (--large: 2 vCPUs, 2 sets, 2 MiB pages, see LARGE; --smm: a
    vCPU in SMM, see SMM; --real-guest: QEMU and Linux, see REAL_GUEST)."""
    return (not t.get("special") and "large" not in t and "smm" not in t
            and not _real_guest(t))


# fixtures with one VM; the others ("special": "no-vm" / "no-kvm") test the edges
FIXTURES = [n for n in ALL if _shaped(truth(n)) and _nvms(truth(n)) == 1]
# guests that map 2 MiB pages over a THP-backed memslot (mkfixture --large):
# tests/test_vmstate.py
LARGE = [n for n in ALL if "large" in truth(n)]
# a vCPU halted in System Management Mode (mkfixture --smm): tests/test_vmstate.py
SMM = [n for n in ALL if "smm" in truth(n)]
# fixtures with several VMs in one VMM process (truth["vms"], creation order)
MULTI_VM = [n for n in ALL if _shaped(truth(n)) and _nvms(truth(n)) > 1]
# Debian's QEMU in the host running a Linux guest that keeps forking (mkfixture
# --real-guest; truth["vmm"] "qemu"): tests/test_real_guest.py
REAL_GUEST = [n for n in ALL if _real_guest(truth(n))]
# one host dumped twice in one boot, before and after a fast zap (mkfixture --pair):
# NAME/before and NAME/after are fixture directories, each a name as any other here
# (truth("NAME/after"), open_fixture, VMCORES / name); NAME has no truth.json, so
# neither is in ALL: tests/test_diff.py, tests/test_fixtures.py
PAIRS = sorted(p.parent.parent.name for p in VMCORES.glob("*/before/truth.json"))
PAIR_SIDES = [f"{n}/{side}" for n in PAIRS for side in ("before", "after")]


@cache
def open_fixture(name: str):
    """A kvminspect Target on fixture *name* (cached for the test session)."""
    from kvminspect.target import open_core

    return open_core(str(VMCORES / name), [])


def pytest_configure(config) -> None:
    """Decompressed cores go to a temporary directory, never into ~/.cache: set
    before collection, as some test modules open a fixture at import time."""
    config._kvminspect_cache = tempfile.mkdtemp(prefix="kvminspect-cache-")
    config._kvminspect_old_cache = os.environ.get("KVMINSPECT_CACHE")
    os.environ["KVMINSPECT_CACHE"] = config._kvminspect_cache


def pytest_unconfigure(config) -> None:
    shutil.rmtree(config._kvminspect_cache, ignore_errors=True)
    if config._kvminspect_old_cache is None:
        os.environ.pop("KVMINSPECT_CACHE", None)
    else:
        os.environ["KVMINSPECT_CACHE"] = config._kvminspect_old_cache


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """kvminspect's main(argv) in-process: (exit status, stdout, stderr)."""
    from kvminspect.cli import main

    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="session")
def damaged(tmp_path_factory):
    """damaged(fixture, case): a damaged copy of a fixture (tests/corrupt.py CASES),
    made once per test session and shared by the modules that use the same case."""
    from tests.corrupt import make

    made: dict[tuple[str, str], Path] = {}

    def get(fixture: str, case: str) -> Path:
        if (fixture, case) not in made:
            out = tmp_path_factory.mktemp(case) / fixture
            make(fixture, case, out)
            made[(fixture, case)] = out
        return made[(fixture, case)]

    return get
