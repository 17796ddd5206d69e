"""The decompression cache: a full uncompressed copy of each compressed input.

drgn reads a vmcore (and debug files) through a plain file, so a compressed
input (.xz, .zst, .gz) is decompressed once into the cache directory
($KVMINSPECT_CACHE, else $XDG_CACHE_HOME/kvminspect, else ~/.cache/kvminspect),
never next to the input.

- Entries are keyed on content, not path: the compressed file's size and a
  SHA-256 of its first and last MiB. A compressed stream ends with a check of
  what it decompresses to (gzip's CRC32 and length, xz's block check and
  index, zstd's content checksum), so two paths to the same dump (copies,
  links, renames) share one entry, and a file rewritten in place gets a new
  one, at the cost of reading 2 MiB, whatever the input's size.
- The cache is capped ($KVMINSPECT_CACHE_MAX, default 4G): least recently used
  entries (a use touches the entry's atime) are evicted, never one this
  process uses; the newest entry is kept even when it alone exceeds the cap.
- A copy is written under a temporary ".partial-" name and renamed when
  complete, so an interrupted decompression never leaves an entry that is
  later used; partial files older than an hour (a killed process) are removed.
- An unwritable cache directory is not an error: the copy goes to a
  temporary directory, removed at exit, with a one-line warning.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, cast

from kvminspect.errors import TargetError

COMPRESSED = (".xz", ".zst", ".gz")
CACHE_MAX_DEFAULT = 4 << 30
PARTIAL = ".partial-"  # in the name of a copy being written
STALE_PARTIAL_S = 3600  # a partial file not written to for this long is dead
KEY_SPAN = 1 << 20  # bytes hashed at each end of a compressed file
CHUNK = 1 << 22

_used: set[Path] = set()  # entries this process opened: never evicted by it
_fallback: Path | None = None  # the temporary directory, once the cache failed
_swept: set[Path] = set()  # cache directories already cleaned of stale partials


def cache_dir() -> Path:
    """Where decompressed inputs are kept."""
    if os.environ.get("KVMINSPECT_CACHE"):
        return Path(os.environ["KVMINSPECT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "kvminspect"


def cache_max() -> int:
    """The cap in bytes: $KVMINSPECT_CACHE_MAX (e.g. 500M, 4G, 1T, or bytes)."""
    raw = os.environ.get("KVMINSPECT_CACHE_MAX", "").strip()
    if not raw:
        return CACHE_MAX_DEFAULT
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", raw, re.IGNORECASE)
    if m is None:
        raise TargetError(f"KVMINSPECT_CACHE_MAX={raw!r}: expected a size such as 500M or 4G")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def strip_compression(name: str) -> str:
    """*name* without its .xz/.zst/.gz extension."""
    for ext in COMPRESSED:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def content_key(path: Path) -> str:
    """The identity of a compressed file: its size and its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(KEY_SPAN))
        if size > KEY_SPAN:
            f.seek(max(KEY_SPAN, size - KEY_SPAN))
            h.update(f.read(KEY_SPAN))
    return h.hexdigest()[:32]


def _decompressor(path: Path) -> BinaryIO:
    """A file object that decompresses *path* by its extension."""
    if path.suffix == ".xz":
        return cast(BinaryIO, lzma.open(path))
    if path.suffix == ".gz":
        return cast(BinaryIO, gzip.open(path))
    try:
        import zstandard
    except ImportError:
        raise TargetError(f"{path}: reading .zst needs the 'zstandard' package") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def zstd_truncated(path: Path) -> bool:
    """Whether a .zst file ends inside a frame (RFC 8878 frame and block headers).

    zstandard's stream reader returns a cut frame's data without an error, so
    the frames are walked here: frame header, then block headers (3 bytes:
    last-block bit, type, size), then the optional 4-byte content checksum.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(14)
            if len(head) < 4:
                return True
            magic = struct.unpack_from("<I", head)[0]
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                if len(head) < 8:
                    return True
                pos += 8 + struct.unpack_from("<I", head, 4)[0]
                continue
            if magic != 0xFD2FB528 or len(head) < 5:
                return len(head) < 5  # not zstd: the decompressor says so
            fhd = head[4]
            single = bool(fhd & 0x20)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            while True:
                f.seek(pos)
                bh = f.read(3)
                if len(bh) < 3:
                    return True
                b = int.from_bytes(bh, "little")
                pos += 3 + (1 if (b >> 1) & 3 == 1 else b >> 3)
                if b & 1:
                    break
            pos += 4 if fhd & 4 else 0
        return pos > size


def _warn(message: str) -> None:
    """One line on stderr."""
    print(f"kvminspect: warning: {message}", file=sys.stderr, flush=True)


def fallback_dir() -> Path | None:
    """The temporary directory this process decompresses into since the cache
    could not be written, or None (the cache works)."""
    return _fallback


def forget_process_state() -> None:
    """Forget what this process used, swept and fell back to, as a new process
    would start (the entries themselves stay on disk)."""
    global _fallback
    _used.clear()
    _swept.clear()
    _fallback = None


def _fallback_dir(cache: Path, why: OSError) -> Path:
    """A temporary directory for this process (removed at exit), said once."""
    global _fallback
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="kvminspect-"))
        atexit.register(shutil.rmtree, _fallback, True)
        _warn(f"cannot write the cache {cache} ({why.strerror or why}): "
              f"decompressing into {_fallback}, removed at exit (set KVMINSPECT_CACHE)")
    return _fallback


def _entry(d: Path) -> Path | None:
    """The complete file in entry directory *d*, if any."""
    try:
        names = [n for n in os.listdir(d) if PARTIAL not in n]
    except OSError:
        return None
    return d / names[0] if names else None


def _entry_dirs(cache: Path) -> list[Path]:
    """The entry directories of *cache* (none when it does not exist)."""
    try:
        return [d for d in cache.iterdir() if d.is_dir()]
    except OSError:
        return []


def sweep_partials(cache: Path) -> None:
    """Remove partial files not written to for an hour, and entries left empty."""
    if cache in _swept:
        return
    _swept.add(cache)
    now = time.time()
    for d in _entry_dirs(cache):
        for p in d.glob(f"*{PARTIAL}*"):
            try:
                if now - p.stat().st_mtime > STALE_PARTIAL_S:
                    p.unlink()
            except OSError:
                pass
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


def evict(cache: Path, cap: int) -> list[Path]:
    """Remove least recently used entries until the cache holds at most *cap* bytes.

    Entries this process uses stay; returns the removed entry directories.
    """
    entries = []
    for d in _entry_dirs(cache):
        f = _entry(d)
        if f is None:
            continue
        try:
            st = f.stat()
        except OSError:
            continue
        entries.append((st.st_atime_ns, st.st_size, d, f))
    total = sum(e[1] for e in entries)
    removed = []
    for _, size, d, f in sorted(entries, key=lambda e: e[0]):
        if total <= cap:
            break
        if f in _used:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d)
    return removed


def _touch(f: Path) -> None:
    """Mark entry *f* as used now (atime; mtime is kept)."""
    try:
        os.utime(f, ns=(time.time_ns(), f.stat().st_mtime_ns))
    except OSError:
        pass


def copy_stream(src: BinaryIO, dst: BinaryIO, path: Path) -> None:
    """Decompress *src* into *dst*; a bad input is a one-line TargetError.

    Errors writing *dst* (OSError) propagate for the caller to report.
    """
    kind = path.suffix[1:]
    while True:
        try:
            chunk = src.read(CHUNK)
        except EOFError:
            raise TargetError(f"{path}: truncated {kind} file: the compressed data ends "
                              "before its end marker") from None
        except Exception as e:  # lzma.LZMAError, gzip.BadGzipFile, zlib.error, ZstdError
            raise TargetError(f"{path}: corrupt {kind} data ({e})") from None
        if not chunk:
            return
        dst.write(chunk)


def _write(path: Path, out: Path) -> None:
    """Decompress *path* into *out*, through a partial file renamed when complete."""
    if path.suffix == ".zst" and zstd_truncated(path):
        raise TargetError(f"{path}: truncated zst file: the compressed data ends inside a frame")
    made = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent)
        try:
            with _decompressor(path) as src, os.fdopen(fd, "wb") as dst:
                copy_stream(src, dst, path)
            os.replace(tmp, out)
            done = True
        finally:  # a failure or Ctrl-C: nothing half-written stays
            Path(tmp).unlink(missing_ok=True)
    finally:
        if made and not done:  # nor the entry's directory made for it
            try:
                out.parent.rmdir()
            except OSError:
                pass


def decompressed(path: Path) -> Path:
    """*path* itself, or its decompressed copy in the cache (made once per content)."""
    if path.suffix not in COMPRESSED:
        return path
    try:
        size = path.stat().st_size
        key = content_key(path)
    except OSError as e:
        raise TargetError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise TargetError(f"{path}: file is empty")
    cache, cap = cache_dir(), cache_max()
    for base in (cache, _fallback):
        hit = _entry(base / key) if base is not None else None
        if hit is not None:
            _used.add(hit)
            _touch(hit)
            return hit
    name = strip_compression(path.name)
    out = (_fallback or cache) / key / name
    try:
        if _fallback is None:
            sweep_partials(cache)
        _write(path, out)
    except OSError as e:
        if _fallback is not None or not _unwritable(e):
            raise TargetError(f"{path}: cannot write its decompressed copy into {out.parent} "
                              f"({e.strerror or e})") from None
        out = _fallback_dir(cache, e) / key / name
        try:
            _write(path, out)
        except OSError as e2:
            raise TargetError(f"{path}: cannot write its decompressed copy into "
                              f"{out.parent} ({e2.strerror or e2})") from None
    _used.add(out)
    if _fallback is None or _fallback not in out.parents:
        evict(cache, cap)
    return out


def _unwritable(e: OSError) -> bool:
    """Whether *e* says the cache directory cannot be written at all (not: disk full)."""
    import errno

    # ENOENT: a directory that cannot be made (KVMINSPECT_CACHE=/proc/nope)
    return e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                       errno.ENOENT)
