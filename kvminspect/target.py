"""Opening a target: the live kernel, a vmcore, a fixture directory, the sample.

A vmcore may be compressed (.xz, .zst, .gz): it is decompressed once into the
cache (kvminspect.cache), never next to the input. Debug files may be
compressed the same way. Every failure is a one-line KvminspectError.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import drgn

from kvminspect.cache import decompressed
from kvminspect.cache import strip_compression as _strip_compression
from kvminspect.errors import DebugInfoError, KvmNotFound, TargetError
from kvminspect.layout import kernel_release
from kvminspect.model import Kernel

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
DEBUG_NAMES = re.compile(r"^(vmlinux.*|.*\.ko|.*\.debug)$")
KVM_MODULES = ("kvm",)


def core_release(path: Path) -> str | None:
    """OSRELEASE from the VMCOREINFO in a core's first MiBs (ELF and kdump)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8 << 20)
    except OSError:
        return None
    m = re.search(rb"OSRELEASE=([^\n\0]{1,64})", head)
    return m.group(1).decode(errors="replace") if m else None


def _debug_files(paths: list[str]) -> list[Path]:
    """Files under -s arguments: files as given, directories searched."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for root, _, names in os.walk(p):
                for n in sorted(names):
                    if DEBUG_NAMES.match(_strip_compression(n)):
                        out.append(Path(root) / n)
        elif p.exists():
            out.append(p)
        else:
            raise DebugInfoError(f"debug info path not found: {p}")
    return out


def _fixture_parts(d: Path) -> tuple[Path, list[Path]]:
    """A fixture directory's vmcore and its debug files."""
    cores = sorted(p for p in d.iterdir() if p.name.startswith("vmcore"))
    if not cores:
        raise TargetError(f"{d}: directory has no vmcore* file")
    core = cores[0]
    debug = sorted(p for p in d.iterdir()
                   if p.is_file() and DEBUG_NAMES.match(_strip_compression(p.name)))
    return core, debug


@dataclass
class Target:
    """An opened program and its KVM model.

    A live target (/proc/kcore, or a QEMU guest over QMP) changes under us:
    fresh() forgets everything read but the probed layout, so each command
    reads the kernel anew. A vmcore keeps its readings for the session.
    """

    prog: drgn.Program
    name: str  # for prompts: "live", "qemu" or the core's file name
    release: str | None
    live: bool = False
    symbols: tuple[str, ...] = ()  # the -s paths it was opened with (diff opens B with them)
    _kernel: Kernel | None = field(default=None, repr=False)

    @property
    def kernel(self) -> Kernel:
        """The KVM model (probes the layout on first use)."""
        if self._kernel is None:
            self._kernel = Kernel(self.prog, self.release)
        return self._kernel

    def fresh(self) -> bool:
        """On a live target, start a new reading (same layout); False on a vmcore."""
        if not self.live or self._kernel is None:
            return False
        self._kernel = Kernel(self.prog, self.release, layout=self._kernel.layout)
        return True


def _check_arch(prog: drgn.Program, what: str) -> None:
    """kvminspect reads x86-64 KVM only: any other kernel is one clear line."""
    arch = prog.platform.arch if prog.platform is not None else None
    if arch is not None and arch != drgn.Architecture.X86_64:
        raise TargetError(f"{what}: {arch.name.lower()} kernels are not supported "
                          "(kvminspect reads x86-64 KVM only)")


def _quiet_drgn() -> None:
    """drgn logs missing debug info as warnings; kvminspect says it once itself."""
    logging.getLogger("drgn").setLevel(logging.ERROR)


def _load_debug_info(prog: drgn.Program, files: list[Path], release: str | None) -> None:
    """Load vmlinux and kvm.ko debug info; one clear line when they are not there."""
    real = [str(decompressed(p)) for p in files]
    try:
        if real:
            prog.load_debug_info(real, main=True)
        else:
            prog.load_default_debug_info()
    except drgn.MissingDebugInfoError:
        pass  # checked per module below
    main = prog.main_module()
    bid = main.build_id.hex() if main.build_id else "unknown"
    if main.wants_debug_file():
        tried = f" (tried {len(real)} file(s) given)" if real else " (give it with -s)"
        raise DebugInfoError(
            f"no matching vmlinux debug info for kernel {release or '?'} "
            f"build id {bid}{tried}")
    kvm = None
    for mod, _ in prog.loaded_modules():
        if mod.name in KVM_MODULES:
            kvm = mod
    if kvm is None:
        raise KvmNotFound(f"kernel {release or '?'} has no kvm module loaded")
    if kvm.wants_debug_file():
        kid = kvm.build_id.hex() if kvm.build_id else "unknown"
        raise DebugInfoError(f"no matching debug info for kvm.ko of kernel {release or '?'} "
                             f"build id {kid}")


def open_core(path: str, debug: list[str]) -> Target:
    """A vmcore file (maybe compressed) or a fixture directory."""
    _quiet_drgn()
    p = Path(path)
    if not p.exists():
        raise TargetError(f"{path}: no such file or directory")
    files = _debug_files(debug)
    if p.is_dir():
        core, extra = _fixture_parts(p)
        files = files + extra
    else:
        core = p
    if core.stat().st_size == 0:
        raise TargetError(f"{core}: file is empty")
    real = decompressed(core)
    prog = drgn.Program()
    try:
        prog.set_core_dump(str(real))
    except (ValueError, OSError, drgn.FaultError) as e:
        raise TargetError(f"{core}: not a usable vmcore ({e})") from None
    _check_arch(prog, str(core))
    release = core_release(real)
    _load_debug_info(prog, files, release)
    return Target(prog, core.name if not p.is_dir() else p.name, release,
                  symbols=tuple(debug))


def open_live(debug: list[str], kcore: str = "/proc/kcore") -> Target:
    """The running kernel through /proc/kcore (root only)."""
    _quiet_drgn()
    if not os.path.exists(kcore):
        raise TargetError(f"{kcore} does not exist: this kernel has no CONFIG_PROC_KCORE")
    if not os.access(kcore, os.R_OK):
        raise TargetError(f"cannot read {kcore}: kvminspect live needs root")
    prog = drgn.Program()
    try:
        prog.set_kernel()
    except (OSError, ValueError) as e:
        raise TargetError(f"cannot open the live kernel: {e}") from None
    release = os.uname().release
    _load_debug_info(prog, _debug_files(debug), release)
    return Target(prog, "live", release, live=True, symbols=tuple(debug))


def open_qemu(socket: str, debug: list[str]) -> Target:
    """A QEMU-emulated host, live, through its QMP socket (drgn's set_qemu_qmp).

    QEMU must run with -device vmcoreinfo (and the host with qemu_fw_cfg) for
    drgn to know the kernel; memory is read from the QEMU process (root).
    """
    _quiet_drgn()
    if not os.path.exists(socket):
        raise TargetError(f"{socket}: no such QMP socket")
    prog = drgn.Program()
    try:
        prog.set_qemu_qmp(socket)
    except (OSError, ValueError, drgn.FaultError) as e:
        raise TargetError(f"{socket}: cannot attach to QEMU over QMP ({e})") from None
    _check_arch(prog, socket)
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL:
        raise TargetError(f"{socket}: QEMU's guest is not a Linux kernel drgn recognizes "
                          "(run QEMU with -device vmcoreinfo and load qemu_fw_cfg in the host)")
    release = kernel_release(prog)
    _load_debug_info(prog, _debug_files(debug), release)
    return Target(prog, "live:qemu", release, live=True, symbols=tuple(debug))


def open_sample() -> Target:
    """The small real vmcore shipped inside the package."""
    if not SAMPLE_DIR.is_dir():
        raise TargetError(f"the bundled sample is missing ({SAMPLE_DIR})")
    t = open_core(str(SAMPLE_DIR), [])
    t.name = "sample"
    return t
