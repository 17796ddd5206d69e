"""kvminspect never writes to its target."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
from pathlib import Path

from kvminspect.cli import main
from kvminspect.target import decompressed
from tests.conftest import VMCORES

COMMANDS = [["vms"], ["vm", "0"], ["vcpus"], ["roots"], ["tree"], ["unsync"], ["stats"],
            ["check"], ["sp", "--gfn", "0x104"]]


def digest(p: Path) -> tuple[str, int]:
    return hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns


def test_every_command_leaves_the_core_untouched(tmp_path: Path, capsys) -> None:
    src = VMCORES / "6.1-shadow"
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    files = sorted(tmp_path.iterdir())
    before = {f: digest(f) for f in files}
    plain = decompressed(tmp_path / "vmcore.xz")
    plain_before = digest(plain)
    for argv in COMMANDS:
        assert main(["-c", str(tmp_path), *argv, "--json"]) == 0, argv
    assert main(["-c", str(tmp_path), "export", "--format", "json",
                 str(tmp_path.parent / "g.json")]) == 0
    assert main(["diff", str(tmp_path), str(tmp_path), "--json"]) == 0
    capsys.readouterr()
    assert {f: digest(f) for f in files} == before
    assert digest(plain) == plain_before


def test_core_is_opened_read_only(tmp_path: Path) -> None:
    """Every file descriptor drgn holds on the core is O_RDONLY."""
    from kvminspect.target import open_core

    shutil.copytree(VMCORES / "6.1-shadow", tmp_path / "fx", symlinks=False)
    target = open_core(str(tmp_path / "fx"), [])
    target.kernel.vms()
    core = os.path.realpath(decompressed(tmp_path / "fx" / "vmcore.xz"))
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.path.realpath(f"/proc/self/fd/{fd}") == core:
                fds.append(fd)
        except OSError:
            continue
    assert fds, "drgn should hold the core open"
    for fd in fds:
        flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_RDONLY


def test_no_code_path_can_write_memory() -> None:
    """No kvminspect module calls a drgn API that adds or changes target memory."""
    pkg = Path(__file__).resolve().parent.parent / "kvminspect"
    forbidden = {"add_memory_segment", "write", "write_u64", "set_core_dump"}
    # stdout, cache (cache.py), files; and rate.py, the one command that changes the target (a
    # tracefs kprobe, removed on exit: tests/test_rate.py checks kprobe_events)
    # batch.py: diagnose --jsonl's lines, copied from each worker's output file;
    # guestcore.py: the guest's ELF core, a new file (never the target)
    allowed_write = {"render.py", "target.py", "cache.py", "export.py", "repl.py", "rate.py",
                     "batch.py", "guestcore.py"}
    for py in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in forbidden:
                if node.attr == "write" and py.name in allowed_write:
                    continue
                if node.attr == "set_core_dump" and py.name == "target.py":
                    continue
                # the guest's own Program (target.py): segments that read the host, never
                # write it (guest memory is read through host physical reads)
                if node.attr == "add_memory_segment" and py.name == "target.py":
                    continue
                raise AssertionError(f"{py.name}:{node.lineno} uses .{node.attr}")
