"""This machine's Python, kvminspect and its dependencies as initramfs entries.

``python_archive()`` is a newc cpio (to append to the host's initramfs: the
kernel unpacks concatenated archives) with

  /py/bin/python3            this interpreter (sys.base_prefix), PYTHONHOME=/py
  /py/lib/libpython3.11.so…  its shared library (LD_LIBRARY_PATH=/py/lib)
  /py/lib/python3.11/        the stdlib without test, idlelib, tkinter, ensurepip
                             and the static library's config directory
  …/site-packages/           kvminspect (the source tree's package, copied as
                             files, never an editable-install pointer) and the
                             distributions it imports (PACKAGES)
  /lib…, /usr/lib…           the shared libraries ``ldd`` names for the interpreter
                             and every extension module shipped, at the same paths

Files keep their modification times so that the shipped ``__pycache__``
entries stay valid (nothing is compiled under TCG). Built once per process
(``functools.cache``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "py"  # in the initramfs: /py
VER = f"python{sys.version_info.major}.{sys.version_info.minor}"
STDLIB_SKIP = {"site-packages", "test", "idlelib", "tkinter", "ensurepip", "turtledemo",
               "lib2to3", "__phello__", f"config-{sys.version_info.major}."
               f"{sys.version_info.minor}-x86_64-linux-gnu"}
# top-level names in site-packages that kvminspect's imports need (checked by
# importing inside the host: tests/test_live_kcore.py)
PACKAGES = ["drgn", "_drgn_util", "drgn.libs", "networkx", "rich", "prompt_toolkit",
            "zstandard", "pygments", "markdown_it", "mdurl", "wcwidth", "typing_extensions"]
DYNLOAD_SKIP = ("_tkinter.", "_test", "xxlimited", "_xxtest")  # Tk and X11, tests
SKIP_DIRS = {"tests", "test", "testing"}  # inside the packages (networkx's are large)


class CannotPack(Exception):
    """This interpreter cannot be packed (the reason is the message)."""


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _walk(src: Path, dst: str, skip: set[str]) -> list[tuple[str, Path]]:
    """(path in the archive, file) for the files under *src*, without the
    directories named in *skip* and without optimized .pyc files."""
    out = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        rel = Path(root).relative_to(src)
        for n in sorted(names):
            if ".opt-" in n and n.endswith(".pyc") or n.startswith(DYNLOAD_SKIP):
                continue
            out.append((str(Path(dst) / rel / n), Path(root) / n))
    return out


def _ldd(paths: list[Path]) -> set[str]:
    """The shared libraries (and the program interpreter) ``ldd`` names for
    *paths*, outside the trees shipped anyway."""
    libs: set[str] = set()
    for chunk in range(0, len(paths), 200):
        r = subprocess.run(["ldd", *map(str, paths[chunk:chunk + 200])],
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if "not found" in line:
                raise CannotPack(f"ldd: {line.strip()}")
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return libs


def _entries() -> list[tuple[str, int, bytes, int]]:
    base = Path(sys.base_prefix)
    exe = Path(sys.executable).resolve()  # in a venv, the base interpreter
    lib = base / "lib"
    stdlib = lib / VER
    libpython = [p for p in lib.glob(f"lib{VER}*.so.*") if not p.is_symlink()]
    if not (stdlib / "os.py").exists():
        raise CannotPack(f"{stdlib}: no stdlib")
    site = _site_packages()
    files: list[tuple[str, Path]] = [(f"{PREFIX}/bin/python3", exe)]
    files += [(f"{PREFIX}/lib/{p.name}", p) for p in libpython]
    files += _walk(stdlib, f"{PREFIX}/lib/{VER}", STDLIB_SKIP)
    sp = f"{PREFIX}/lib/{VER}/site-packages"
    for name in PACKAGES:
        src = site / name
        if src.is_dir():
            files += _walk(src, f"{sp}/{name}", SKIP_DIRS)
        elif (site / f"{name}.py").exists():
            files.append((f"{sp}/{name}.py", site / f"{name}.py"))
        else:
            raise CannotPack(f"{name} is not installed in {site}")
    files += [(f"{sp}/{p.name}", p) for p in site.glob("_drgn.cpython-*.so")]
    top = importlib.metadata.packages_distributions()
    for dist in sorted({d for name in PACKAGES for d in top.get(name, [])}):
        info = importlib.metadata.distribution(dist)._path  # its .dist-info (metadata.version)
        files += _walk(info, f"{sp}/{info.name}", set())
    files += _walk(REPO / "kvminspect", f"{sp}/kvminspect", {"__pycache__"})
    compiled = _compile([(d, p) for d, p in files if p.suffix == ".py"])
    elves = [p for _, p in files if p.suffix == ".so" or ".so." in p.name or p == exe]
    shipped = {p.resolve() for _, p in files}
    for so in sorted(_ldd(elves)):
        if Path(so).resolve() not in shipped:
            files.append((so.lstrip("/"), Path(so)))
    out, dirs = [], set()
    for dst, src in [*files, *compiled]:
        for parent in reversed(Path(dst).parents[:-1]):
            if str(parent) not in dirs:
                dirs.add(str(parent))
                out.append((str(parent), 0o40755, b"", 0))
        if isinstance(src, Path):
            st = src.stat()
            src = (0o100000 | (st.st_mode & 0o777), src.read_bytes(), int(st.st_mtime))
        out.append((dst, *src))
    return out


def _compile(sources: list[tuple[str, Path]]) -> list[tuple[str, tuple[int, bytes, int]]]:
    """(path, (mode, data, mtime)) of the __pycache__ files the shipped
    *sources* lack (kvminspect's are never shipped from the tree, where they
    may be stale): compiling under TCG at every run would cost seconds."""
    out = []
    shipped = {d for d, _ in sources}
    for dst, src in sources:
        pyc = Path(importlib.util.cache_from_source(f"/{dst}")).relative_to("/")
        if "kvminspect" not in dst and str(pyc) in shipped:
            continue  # shipped with its directory, valid (same mtime and size)
        st = src.stat()
        code = compile(src.read_bytes(), f"/{dst}", "exec", dont_inherit=True)
        data = importlib._bootstrap_external._code_to_timestamp_pyc(
            code, int(st.st_mtime), st.st_size)
        out.append((str(pyc), (0o100644, bytes(data), int(st.st_mtime))))
    return out


def newc(entries: list[tuple[str, int, bytes, int]], first_ino: int = 1 << 20) -> bytes:
    """mkfixture.newc with modification times: (path, mode, data, mtime); the
    inode numbers start at *first_ino* (an archive appended to another one
    must not reuse its numbers)."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, mtime) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)],
                                                     first_ino):
        bname = name.encode() + b"\0"
        nlink = 2 if mode & 0o40000 else 1
        fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, len(bname), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + bname
        pad4()
        out += data
        pad4()
    return bytes(out)


@functools.cache
def python_archive() -> bytes:
    """The newc archive described above (about 300 MB; built once per process)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise CannotPack("not an x86_64 Linux interpreter")
    return newc(_entries())


WRAPPER = ("bin/kvminspect", 0o100755,
           b"#!/bin/sh\nexec /py/bin/python3 -m kvminspect \"$@\"\n", 0)
"""/bin/kvminspect in the initramfs (a newc entry)."""


ENV = {"PYTHONHOME": f"/{PREFIX}", "LD_LIBRARY_PATH": f"/{PREFIX}/lib", "HOME": "/root",
       "XDG_CACHE_HOME": "/tmp/cache", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200",
       "TERM": "dumb"}
