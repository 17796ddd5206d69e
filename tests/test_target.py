"""Opening a target: truncated cores, crash directories' file names, the cache."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvminspect import cache
from kvminspect.errors import TargetError
from tests.conftest import VMCORES, truth
from tests.conftest import run_main as run

ELF_FIXTURES = ["6.1-shadow", "6.12-shadow", "7.3-shadow"]
DEBUG = ("vmlinux.xz", "kvm.ko.xz", "kvm-amd.ko.xz")


def one_line_error(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("kvminspect: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def crash_dir(d: Path, fixture: str, files: dict[str, Path | str]) -> Path:
    """Directory *d* holding *files* (name: symlink target, or text) and the debug files."""
    d.mkdir()
    for name, what in files.items():
        if isinstance(what, Path):
            (d / name).symlink_to(what)
        else:
            (d / name).write_text(what)
    for name in DEBUG:
        (d / name).symlink_to((VMCORES / fixture / name).resolve())
    return d


def plain_core(fixture: str) -> Path:
    """The fixture's vmcore, decompressed (into the session's cache)."""
    return cache.decompressed(VMCORES / fixture / "vmcore.xz")


# --- truncated cores: file size against what the headers need ---------------------------

@pytest.mark.parametrize("fixture", ELF_FIXTURES)
def test_truncated_elf_core(fixture: str, tmp_path: Path, capsys) -> None:
    """`head -c N vmcore`: one line naming the size and what the program headers need."""
    plain = plain_core(fixture)
    size = plain.stat().st_size
    with open(plain, "rb") as f:
        data = f.read(20 << 20)
    for n in (4096, 65536, 20 << 20, size - 1):
        d = tmp_path / str(n)
        cut = tmp_path / f"vmcore.{n}"
        if n < len(data):
            cut.write_bytes(data[:n])
        else:
            shutil.copyfile(plain, cut)
            os.truncate(cut, n)
        crash_dir(d, fixture, {"vmcore": cut})
        status, out, err = run(["-c", str(d), "roots"], capsys)
        assert status == 1 and out == ""
        one_line_error(err, "truncated vmcore", f"{n} bytes", f"its headers need {size}")


def test_whole_elf_core_is_not_truncated(tmp_path: Path) -> None:
    from kvminspect.target import check_complete

    check_complete(plain_core("6.1-shadow"), tmp_path)  # no error


def test_truncated_elf_header(tmp_path: Path, capsys) -> None:
    """A core cut inside its own program headers: "at least"."""
    (tmp_path / "vmcore").write_bytes(plain_core("6.1-shadow").read_bytes()[:200])
    status, _, err = run(["-c", str(tmp_path / "vmcore"), "vms"], capsys)
    assert status == 1
    one_line_error(err, "truncated vmcore: 200 bytes, its headers need at least")


@pytest.fixture(scope="module")
def kdump_core(tmp_path_factory) -> Path:
    """The 6.1-shadow dump in makedumpfile's kdump-compressed format (as test_errors makes it)."""
    exe = shutil.which("makedumpfile")
    if exe is None:
        pytest.skip("makedumpfile is not installed (CI installs it)")
    out = tmp_path_factory.mktemp("kdump") / "dump.202401011200"
    subprocess.run([exe, "-c", "-d", "31", str(plain_core("6.1-shadow")), str(out)],
                   check=True, capture_output=True, timeout=120)
    assert out.read_bytes()[:8] == b"KDUMP   "
    return out


def test_truncated_kdump_core(kdump_core: Path, tmp_path: Path, capsys) -> None:
    """A kdump-compressed core cut short: bitmaps, page descriptors or page data missing."""
    size = kdump_core.stat().st_size
    data = kdump_core.read_bytes()
    for n in (4096, 65536, size // 2, size - 1):
        cut = tmp_path / f"cut{n}"
        cut.write_bytes(data[:n])
        d = crash_dir(tmp_path / str(n), "6.1-shadow", {"dump.202401011200": cut})
        status, out, err = run(["-c", str(d), "roots"], capsys)
        assert status == 1 and out == ""
        line = one_line_error(err, "truncated vmcore", f"{n} bytes")
        need = int(line.rsplit(" ", 1)[1])
        assert need > n and (need == size or "at least" in line), line


def test_whole_kdump_core(kdump_core: Path, tmp_path: Path, capsys) -> None:
    """A kdump-tools crash directory (dump.<timestamp>, dmesg.<timestamp>) opens as is."""
    d = crash_dir(tmp_path / "202401011200", "6.1-shadow",
                  {"dump.202401011200": kdump_core, "dmesg.202401011200": "[    0.000000] Linux"})
    status, out, err = run(["-c", str(d), "vms", "--json"], capsys)
    assert status == 0, err
    assert json.loads(out)["vms"][0]["online_vcpus"] == 4


@pytest.mark.parametrize("fmt", ["xz", "gz", "zst"])
def test_truncated_compressed_core(fmt: str, tmp_path: Path, capsys) -> None:
    """A compressed core cut short is a truncated stream, said as such (zstd's reader
    itself returns a cut frame's data without an error)."""
    src = VMCORES / "6.1-shadow" / "vmcore.xz"
    if fmt == "xz":
        data = src.read_bytes()
    else:
        import zstandard

        plain = lzma.decompress(src.read_bytes())
        data = (gzip.compress(plain, compresslevel=1) if fmt == "gz"
                else zstandard.ZstdCompressor(level=1, write_checksum=True).compress(plain))
    for n in (4096, len(data) // 2, len(data) - 1):
        core = tmp_path / f"{n}" / f"vmcore.{fmt}"
        core.parent.mkdir()
        core.write_bytes(data[:n])
        status, out, err = run(["-c", str(core), "vms"], capsys)
        assert status == 1 and out == ""
        one_line_error(err, f"truncated {fmt} file")
    assert not [p for p in Path(os.environ["KVMINSPECT_CACHE"]).rglob("*")
                if cache.PARTIAL in p.name]


def test_zstd_frames_walked() -> None:
    """Several frames, a skippable one, no content size: complete; cut anywhere: truncated."""
    import zstandard

    a = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(b"x" * 300000)
    b = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(
        bytes(range(256)) * 900)
    skip = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    whole = a + skip + b
    p = Path(os.environ["KVMINSPECT_CACHE"]) / "frames.zst"
    p.write_bytes(whole)
    assert not cache.zstd_truncated(p)
    for n in (3, len(a) - 1, len(a) + 6, len(whole) - 1):
        p.write_bytes(whole[:n])
        assert cache.zstd_truncated(p), n


# --- crash directories: the names kdump-tools and kexec-tools write ---------------------

def test_kdump_tools_directory(tmp_path: Path, capsys) -> None:
    """Debian's kdump-tools: /var/crash/<ts>/dump.<ts> beside dmesg.<ts>."""
    d = crash_dir(tmp_path / "202401011200", "6.1-shadow",
                  {"dump.202401011200": plain_core("6.1-shadow"),
                   "dmesg.202401011200": "[    0.000000] Linux version 6.1.0\n"})
    status, out, err = run(["-c", str(d), "vms", "--json"], capsys)
    assert status == 0 and err == "", err
    assert json.loads(out)["vms"][0]["online_vcpus"] == 4


def test_kexec_tools_directory(tmp_path: Path, capsys) -> None:
    """RHEL/Fedora kexec-tools: /var/crash/<ip>-<date>/vmcore beside vmcore-dmesg.txt."""
    d = crash_dir(tmp_path / "127.0.0.1-2024-01-01-12:00:00", "6.1-shadow",
                  {"vmcore-dmesg.txt": "[    0.000000] Linux version 6.1.0\n",
                   "vmcore": plain_core("6.1-shadow")})
    status, out, err = run(["-c", str(d), "vms", "--json"], capsys)
    assert status == 0 and err == "", err
    assert json.loads(out)["vms"][0]["online_vcpus"] == 4


def test_several_dumps_say_which(tmp_path: Path, capsys) -> None:
    """The best name wins, the newest dump.<ts> among them, and a note says so."""
    from kvminspect.target import find_core

    a, b = plain_core("6.1-shadow"), plain_core("6.12-shadow")
    d = crash_dir(tmp_path / "d", "6.12-shadow",
                  {"dump.202401011200": a, "dump.202402011200": b})
    capsys.readouterr()
    assert find_core(d).name == "dump.202402011200"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "using dump.202402011200" in err
    assert "also there: dump.202401011200" in err
    status, out, err = run(["-c", str(d), "vms", "--json"], capsys)
    assert status == 0 and "using dump.202402011200" in err
    assert json.loads(out)["vms"][0]["pid"] == truth("6.12-shadow")["vmm_pid"]
    (d / "vmcore").symlink_to(a)
    capsys.readouterr()
    assert find_core(d).name == "vmcore"
    assert "using vmcore (also there: dump.202402011200, dump.202401011200)" in \
        capsys.readouterr().err


def test_directory_without_a_dump(tmp_path: Path, capsys) -> None:
    """Only the dmesg files (the dump failed): one line naming what was looked for."""
    d = crash_dir(tmp_path / "d", "6.1-shadow",
                  {"vmcore-dmesg.txt": "x", "dmesg.202401011200": "x"})
    status, _, err = run(["-c", str(d), "vms"], capsys)
    assert status == 1
    one_line_error(err, "no vmcore", "vmcore", "dump.<timestamp>", "vmcore.flat")


def test_flattened_core(tmp_path: Path, capsys) -> None:
    """vmcore.flat (makedumpfile -F, kexec-tools' dump over ssh) is read as is."""
    exe = shutil.which("makedumpfile")
    if exe is None:
        pytest.skip("makedumpfile is not installed (CI installs it)")
    flat = tmp_path / "flat"
    with open(flat, "wb") as f:
        subprocess.run([exe, "-F", "-c", "-d", "31", str(plain_core("6.1-shadow"))], stdout=f,
                       stderr=subprocess.DEVNULL, check=True, timeout=120)
    d = crash_dir(tmp_path / "d", "6.1-shadow", {"vmcore.flat": flat})
    status, out, err = run(["-c", str(d), "vms", "--json"], capsys)
    assert status == 0, err
    assert json.loads(out)["vms"][0]["online_vcpus"] == 4


# --- the decompression cache -------------------------------------------------------------

@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """An empty cache directory, and the module's per-process state reset
    (before the test and after it)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("KVMINSPECT_CACHE", str(d))
    monkeypatch.delenv("KVMINSPECT_CACHE_MAX", raising=False)
    cache.forget_process_state()
    yield d
    cache.forget_process_state()


def gz(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1))
    return path


def entries(d: Path) -> list[Path]:
    """The complete files in cache *d*."""
    return sorted(p for p in d.rglob("*") if p.is_file() and cache.PARTIAL not in p.name)


def test_same_content_shares_one_entry(fresh_cache: Path, tmp_path: Path) -> None:
    """A copy under another name and place, and a symlink: one decompressed copy."""
    data = os.urandom(100000)
    a = gz(tmp_path / "a" / "vmcore.gz", data)
    b = tmp_path / "b" / "dump.202401011200.gz"
    b.parent.mkdir()
    shutil.copy(a, b)  # a new mtime too
    c = tmp_path / "c.gz"
    c.symlink_to(a)
    out = {cache.decompressed(p) for p in (a, b, c)}
    assert len(out) == 1 and out.pop().read_bytes() == data
    assert len(entries(fresh_cache)) == 1
    gz(a, data[:-1] + b"!")  # rewritten in place: new content, new entry
    assert cache.decompressed(a).read_bytes() == data[:-1] + b"!"
    assert len(entries(fresh_cache)) == 2


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
def test_unwritable_cache_falls_back(how: str, fresh_cache: Path, tmp_path: Path,
                                     monkeypatch, capsys) -> None:
    """A cache that cannot be written: one warning line, the command still works."""
    if how == "under-a-file":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("KVMINSPECT_CACHE", str(tmp_path / "file" / "cache"))
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only directory")
        fresh_cache.mkdir(mode=0o500)
    fx = tmp_path / "fx"
    shutil.copytree(VMCORES / "6.1-shadow", fx)
    status, out, err = run(["-c", str(fx), "vms", "--json"], capsys)
    assert status == 0, err
    assert json.loads(out)["vms"][0]["online_vcpus"] == 4
    warnings = [line for line in err.splitlines() if line.startswith("kvminspect: warning:")]
    assert len(warnings) == 1 and err.count("\n") == 1, err
    assert "cannot write the cache" in warnings[0] and "removed at exit" in warnings[0]
    fallback = cache.fallback_dir()
    assert fallback is not None and entries(fallback)
    shutil.rmtree(fallback)


def test_the_program_removes_its_fallback_at_exit(tmp_path: Path) -> None:
    """`python -m kvminspect` ends with os._exit (cli.run, nothing freed one by
    one), after its output is flushed and its atexit handlers have run: the
    fallback directory of an unwritable cache is gone when the process is."""
    import re
    import sys

    (tmp_path / "file").write_text("")
    fx = tmp_path / "fx"
    shutil.copytree(VMCORES / "6.1-shadow", fx)
    env = {**os.environ, "KVMINSPECT_CACHE": str(tmp_path / "file" / "cache")}
    r = subprocess.run([sys.executable, "-m", "kvminspect", "-c", str(fx), "vms", "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vms"][0]["online_vcpus"] == 4  # (all of it, flushed)
    m = re.search(r"decompressing into (\S+), removed at exit", r.stderr)
    assert m, r.stderr
    assert not Path(m.group(1)).exists()


def test_interrupted_decompression_leaves_nothing(fresh_cache: Path, tmp_path: Path,
                                                  monkeypatch) -> None:
    """Ctrl-C in the middle of writing: no file, and the next run decompresses anew."""
    data = os.urandom(300000)
    src = gz(tmp_path / "vmcore.gz", data)
    real_copy = cache.copy_stream

    def interrupted(s, dst, path) -> None:
        dst.write(s.read(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "copy_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.decompressed(src)
    assert [p for p in fresh_cache.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(cache, "copy_stream", real_copy)
    assert cache.decompressed(src).read_bytes() == data


def test_stale_partials_removed(fresh_cache: Path, tmp_path: Path) -> None:
    """A killed process's partial file: never used, removed once an hour old."""
    data = os.urandom(1000)
    src = gz(tmp_path / "vmcore.gz", data)
    d = fresh_cache / cache.content_key(src)
    d.mkdir(parents=True)
    stale = d / f".vmcore{cache.PARTIAL}dead"
    stale.write_bytes(data[:10])
    old = time.time() - 2 * cache.STALE_PARTIAL_S
    os.utime(stale, (old, old))
    other = fresh_cache / "0123" / f".vmcore{cache.PARTIAL}live"  # another process, writing
    other.parent.mkdir()
    other.write_bytes(b"x")
    out = cache.decompressed(src)
    assert out.read_bytes() == data and cache.PARTIAL not in out.name
    assert not stale.exists() and other.exists()


def test_eviction_beyond_the_cap(fresh_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """Least recently used first, each decompressed() a new process (no entry in use)."""
    monkeypatch.setenv("KVMINSPECT_CACHE_MAX", "2500K")
    files = {n: gz(tmp_path / f"{n}.gz", os.urandom(1 << 20)) for n in "abc"}

    def use(n: str) -> Path:
        cache.forget_process_state()  # as if a new process
        return cache.decompressed(files[n])

    pa, pb = use("a"), use("b")
    time.sleep(0.01)
    assert use("a") == pa  # a hit: a is now more recent than b
    pc = use("c")
    assert pa.exists() and pc.exists() and not pb.exists()
    assert not pb.parent.exists()
    assert sum(p.stat().st_size for p in entries(fresh_cache)) <= 2500 << 10


def test_entries_in_use_are_kept(fresh_cache: Path, tmp_path: Path, monkeypatch) -> None:
    """Within one process (a core and its debug files) nothing it opened is evicted;
    an entry larger than the cap is still made."""
    monkeypatch.setenv("KVMINSPECT_CACHE_MAX", "1")
    outs = [cache.decompressed(gz(tmp_path / f"{n}.gz", os.urandom(5000))) for n in "ab"]
    assert all(p.exists() for p in outs)


def test_bad_cache_max(fresh_cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVMINSPECT_CACHE_MAX", "lots")
    with pytest.raises(TargetError, match="KVMINSPECT_CACHE_MAX"):
        cache.decompressed(gz(tmp_path / "a.gz", b"x"))
    for raw, n in (("4G", 4 << 30), ("500M", 500 << 20), ("123", 123), ("2GiB", 2 << 30)):
        monkeypatch.setenv("KVMINSPECT_CACHE_MAX", raw)
        assert cache.cache_max() == n
