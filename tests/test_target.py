"""Opening a target: the decompression cache."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from kvminspect import cache
from kvminspect.cli import main
from kvminspect.errors import TargetError
from tests.conftest import VMCORES

ELF_FIXTURES = ["6.1-shadow", "6.12-shadow", "7.3-shadow"]
DEBUG = ("vmlinux.xz", "kvm.ko.xz", "kvm-amd.ko.xz")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


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


# --- the decompression cache -------------------------------------------------------------

@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty cache directory, and the module's per-process state reset."""
    d = tmp_path / "cache"
    monkeypatch.setenv("KVMINSPECT_CACHE", str(d))
    monkeypatch.delenv("KVMINSPECT_CACHE_MAX", raising=False)
    monkeypatch.setattr(cache, "_used", set())
    monkeypatch.setattr(cache, "_fallback", None)
    monkeypatch.setattr(cache, "_swept", set())
    return d


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
    assert cache._fallback is not None and entries(cache._fallback)
    shutil.rmtree(cache._fallback)


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
        cache._used.clear()  # as if a new process
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
