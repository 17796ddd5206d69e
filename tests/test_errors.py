"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import VMCORES, truth
from tests.conftest import run_main as run


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("kvminspect: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_path(capsys) -> None:
    status, out, err = run(["-c", "/nonexistent/vmcore", "vms"], capsys)
    assert status == 1 and out == ""
    one_line_error(err, "/nonexistent/vmcore", "no such file")


def test_empty_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "vmcore").write_bytes(b"")
    status, _, err = run(["-c", str(tmp_path / "vmcore"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "empty")


def test_random_bytes(tmp_path: Path, capsys) -> None:
    (tmp_path / "vmcore").write_bytes(os.urandom(65536))
    status, _, err = run(["-c", str(tmp_path / "vmcore"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "not a usable vmcore")


def test_directory_without_vmcore(tmp_path: Path, capsys) -> None:
    status, _, err = run(["-c", str(tmp_path), "vms"], capsys)
    assert status == 1
    one_line_error(err, "no vmcore")


def test_truncated_compressed_vmcore(tmp_path: Path, capsys) -> None:
    src = VMCORES / "6.1-shadow" / "vmcore.xz"
    (tmp_path / "vmcore.xz").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    status, _, err = run(["-c", str(tmp_path / "vmcore.xz"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "truncated xz file")


def test_truncated_elf_vmcore(tmp_path: Path, capsys) -> None:
    """An ELF vmcore cut short: the header is fine, the memory is gone."""
    import lzma

    data = lzma.decompress((VMCORES / "6.1-shadow" / "vmcore.xz").read_bytes())
    (tmp_path / "vmcore").write_bytes(data[: len(data) // 3])
    for f in (VMCORES / "6.1-shadow").iterdir():
        if f.name.startswith(("vmlinux", "kvm")):
            shutil.copy(f, tmp_path / f.name)
    status, out, err = run(["-c", str(tmp_path), "roots"], capsys)
    # the modules list lies beyond the cut: nothing can be read, one line says so
    assert status == 1 and out == ""
    one_line_error(err)


def test_debug_info_missing(capsys) -> None:
    status, _, err = run(["-c", str(VMCORES / "6.1-shadow" / "vmcore.xz"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "no matching vmlinux debug info", "6.1.0-56-amd64", "build id")


def test_debug_info_from_another_kernel(capsys) -> None:
    status, _, err = run(["-c", str(VMCORES / "6.1-shadow" / "vmcore.xz"),
                          "-s", str(VMCORES / "6.12-shadow"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "no matching vmlinux debug info", "6.1.0-56-amd64")


def test_kvm_debug_info_missing(tmp_path: Path, capsys) -> None:
    vmlinux = next(p for p in (VMCORES / "6.1-shadow").iterdir() if p.name.startswith("vmlinux"))
    status, _, err = run(["-c", str(VMCORES / "6.1-shadow" / "vmcore.xz"),
                          "-s", str(vmlinux), "vms"], capsys)
    assert status == 1
    one_line_error(err, "kvm.ko", "build id")


def test_debug_path_missing(capsys) -> None:
    status, _, err = run(["-c", str(VMCORES / "6.1-shadow"), "-s", "/nonexistent", "vms"],
                         capsys)
    assert status == 1
    one_line_error(err, "/nonexistent")


def test_kernel_without_kvm(capsys) -> None:
    status, _, err = run(["-c", str(VMCORES / "6.1-no-kvm"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "no kvm module loaded", "6.1.0-56-amd64")


def test_no_vms_is_not_an_error(capsys) -> None:
    status, out, err = run(["-c", str(VMCORES / "6.1-no-vm"), "vms"], capsys)
    assert status == 0 and "no VMs" in out and err == ""
    for cmd in ("vcpus", "roots", "tree", "unsync", "check", "stats"):
        status, out, err = run(["-c", str(VMCORES / "6.1-no-vm"), cmd, "--json"], capsys)
        assert status == 0, (cmd, err)
        assert json.loads(out)["vms"] == [] and json.loads(out)["errors"] == []


def test_unknown_command_and_bad_arguments(capsys) -> None:
    core = str(VMCORES / "6.1-shadow")
    status, _, err = run(["-c", core, "bogus"], capsys)
    assert status == 2
    one_line_error(err, "unknown command 'bogus'")
    status, _, err = run(["-c", core, "tree", "--depth", "x"], capsys)
    assert status == 2
    one_line_error(err, "--depth")
    assert "usage: tree" in err
    status, _, err = run(["vms"], capsys)
    assert status == 2
    one_line_error(err, "needs a target")
    status, _, err = run(["-c", core, "--no-such-option", "vms"], capsys)
    assert status == 2
    one_line_error(err, "unknown option --no-such-option")


def test_not_a_shadow_page(capsys) -> None:
    status, _, err = run(["-c", str(VMCORES / "6.1-shadow"), "sp", "0xffff888012345000"], capsys)
    assert status == 1
    one_line_error(err, "0xffff888012345000 is not a shadow page")
    status, _, err = run(["-c", str(VMCORES / "6.1-shadow"), "vm", "5"], capsys)
    assert status == 1
    one_line_error(err, "no VM")


def test_command_help(capsys) -> None:
    status, out, _ = run(["-c", str(VMCORES / "6.1-shadow"), "roots", "--help"], capsys)
    assert status == 0 and "usage: roots" in out


def test_live_without_kcore() -> None:
    from kvminspect.errors import TargetError
    from kvminspect.target import open_live

    with pytest.raises(TargetError, match="does not exist"):
        open_live([], kcore="/nonexistent/kcore")


@pytest.mark.slow
def test_live_without_access() -> None:
    """`kvminspect --live` as a user who cannot read /proc/kcore."""
    if os.geteuid() != 0:
        cmd = [sys.executable, "-m", "kvminspect", "--live", "vms"]
    else:  # import as root (kvminspect imports lazily), then drop to nobody
        cmd = [sys.executable, "-c",
               "import os, sys; from kvminspect import commands, drgn_compat, manifest, target; "
               "from kvminspect.cli import main; commands.load_all(); "
               "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
               "sys.exit(main(['--live', 'vms']))"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 1, r.stderr
    # some sandboxes have no /proc/kcore at all: then that is the one line
    one_line_error(r.stderr, "/proc/kcore",
                   "root" if os.path.exists("/proc/kcore") else "does not exist")


@pytest.mark.parametrize("fmt", ["gz", "zst", "plain"])
def test_compressed_and_plain_cores(fmt: str, tmp_path: Path, capsys) -> None:
    """A vmcore as .gz, .zst or plain ELF, with -s pointing at the debug files."""
    import gzip

    import zstandard

    from kvminspect.target import decompressed

    plain = decompressed(VMCORES / "6.1-shadow" / "vmcore.xz").read_bytes()
    core = tmp_path / {"gz": "vmcore.gz", "zst": "vmcore.zst", "plain": "vmcore"}[fmt]
    if fmt == "gz":
        core.write_bytes(gzip.compress(plain, compresslevel=1))
    elif fmt == "zst":
        core.write_bytes(zstandard.ZstdCompressor(level=1).compress(plain))
    else:
        core.write_bytes(plain)
    debug = [str(p) for p in (VMCORES / "6.1-shadow").iterdir() if ".ko" in p.name
             or p.name.startswith("vmlinux")]
    argv = ["-c", str(core)] + [a for d in debug for a in ("-s", d)] + ["vms", "--json"]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert json.loads(out)["vms"][0]["online_vcpus"] == 4


@pytest.mark.slow
def test_kdump_compressed_core(tmp_path: Path, capsys) -> None:
    """The same dump as makedumpfile's kdump-compressed format (read by libkdumpfile)."""
    exe = shutil.which("makedumpfile")
    if exe is None:
        pytest.skip("makedumpfile is not installed (CI installs it)")
    from kvminspect.target import decompressed

    plain = decompressed(VMCORES / "6.1-shadow" / "vmcore.xz")
    fx = tmp_path / "kdump"
    fx.mkdir()
    subprocess.run([exe, "-c", "-d", "31", str(plain), str(fx / "vmcore")], check=True,
                   capture_output=True, timeout=120)
    assert (fx / "vmcore").read_bytes()[:8] == b"KDUMP   "
    for p in (VMCORES / "6.1-shadow").iterdir():
        if p.name != "vmcore.xz":
            shutil.copy(p, fx / p.name)
    status, out, err = run(["-c", str(fx), "roots", "--json"], capsys)
    assert status == 0, err
    (vm,) = json.loads(out)["vms"]
    assert [v["cr3"] for v in vm["vcpus"]] == [v["cr3"] for v in truth("6.1-shadow")["vcpus"]]


def _elf_core(path: Path, machine: int) -> None:
    """A minimal ELF core of another architecture: one 4 KiB PT_LOAD of zeros."""
    import struct

    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 4, machine, 1,
                       0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 6, 4096, 0xFFFF000000000000, 0, 4096, 4096, 4096)
    path.write_bytes((ehdr + phdr).ljust(8192, b"\0"))


@pytest.mark.parametrize("machine,arch", [(183, "aarch64"), (22, "s390x")])
def test_other_architecture_not_supported(tmp_path: Path, machine: int, arch: str,
                                          capsys) -> None:
    """An arm64 or s390 kernel: one line "not supported", exit 1 (EM_AARCH64, EM_S390)."""
    core = tmp_path / "vmcore"
    _elf_core(core, machine)
    status, out, err = run(["-c", str(core), "roots"], capsys)
    assert status == 1 and out == ""
    one_line_error(err, arch, "not supported", "x86-64")
