"""Opening a target: the live kernel, a vmcore, a crash directory, the sample.

A vmcore may be compressed (.xz, .zst, .gz): it is decompressed once into the
cache (kvminspect.cache), never next to the input. Debug files may be
compressed the same way. A vmcore shorter than its headers say is reported as
truncated before drgn reads it. Every failure is a one-line KvminspectError.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import drgn

from kvminspect import modsyms
from kvminspect.cache import decompressed
from kvminspect.cache import strip_compression as _strip_compression
from kvminspect.errors import DebugInfoError, KvmNotFound, TargetError
from kvminspect.layout import kernel_release
from kvminspect.model import VENDOR_MODULES, Kernel

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


# A crash directory's dump, by the names the tools that write one use, best first.
CORE_NAMES = (
    ("vmcore", re.compile(r"^vmcore$")),  # kexec-tools (RHEL, Fedora), SUSE kdump
    ("vmcore.xz/.zst/.gz", re.compile(r"^vmcore\.(xz|zst|gz)$")),
    ("vmcore.flat", re.compile(r"^vmcore\.flat$")),  # makedumpfile -F (kdump over ssh)
    ("dump.<timestamp>", re.compile(r"^dump\.\d+(\.(xz|zst|gz))?$")),  # Debian's kdump-tools
    ("vmcore*", re.compile(r"^vmcore.*")),  # ours: vmcore-<name> and the like
)
NOT_CORES = re.compile(r"(dmesg|\.txt$|\.json$|\.log$)")  # vmcore-dmesg.txt, dmesg.<ts>


def find_core(d: Path) -> Path:
    """The dump in crash directory *d* (kdump-tools, kexec-tools or a fixture).

    When several files qualify, the best name wins (and the newest
    dump.<timestamp>); a note on stderr says which was chosen.
    """
    try:
        names = sorted(n for n in os.listdir(d) if not NOT_CORES.search(n)
                       and (d / n).is_file())
    except OSError as e:
        raise TargetError(f"{d}: cannot list the directory ({e.strerror or e})") from None
    found = []
    for _, pat in CORE_NAMES:
        hits = [n for n in names if pat.match(n) and n not in found]
        found += sorted(hits, reverse=pat.pattern.startswith("^dump"))
    if not found:
        raise TargetError(f"{d}: directory has no vmcore (looked for "
                          f"{', '.join(n for n, _ in CORE_NAMES)})")
    if len(found) > 1:
        print(f"kvminspect: note: {d}: using {found[0]} (also there: {', '.join(found[1:])})",
              file=sys.stderr, flush=True)
    return d / found[0]


def fixture_parts(d: Path) -> tuple[Path, list[Path]]:
    """A crash or fixture directory's vmcore and its debug files."""
    core = find_core(d)
    debug = sorted(p for p in d.iterdir()
                   if p.is_file() and DEBUG_NAMES.match(_strip_compression(p.name)))
    return core, debug


def _elf_needs(f: BinaryIO, size: int) -> tuple[int, bool]:
    """Bytes an ELF core's headers need: the furthest end of its segments.

    Reads the ELF header (Elf64_Ehdr / Elf32_Ehdr) and the program headers
    (Elf64_Phdr / Elf32_Phdr: p_offset + p_filesz of PT_LOAD and PT_NOTE),
    with e_phnum from section 0's sh_info when it is PN_XNUM. Returns
    (bytes, exact): not exact when the headers themselves are cut.
    """
    ident = f.read(64)
    if len(ident) < 6:
        return 64, False
    is64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    ehsize = 64 if is64 else 52
    if len(ident) < ehsize:
        return ehsize, False
    if is64:
        phoff, shoff = struct.unpack_from(end + "QQ", ident, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", ident, 54)
    else:
        phoff, shoff = struct.unpack_from(end + "II", ident, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", ident, 42)
    if phnum == 0xFFFF:  # PN_XNUM: the count is section 0's sh_info
        f.seek(shoff + (44 if is64 else 28))
        raw = f.read(4)
        if len(raw) < 4:
            return shoff + (64 if is64 else 40), False
        phnum = struct.unpack(end + "I", raw)[0]
    if phentsize < (56 if is64 else 32):
        return 0, True  # not a layout to judge: drgn says what is wrong
    table = phoff + phnum * phentsize
    if size < table:
        return table, False
    f.seek(phoff)
    phdrs = f.read(phnum * phentsize)
    need = table
    for i in range(phnum):
        if is64:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIQQQQ", phdrs,
                                                                     i * phentsize)
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIIII", phdrs,
                                                                  i * phentsize)
        if p_type in (1, 4):  # PT_LOAD, PT_NOTE
            need = max(need, p_offset + p_filesz)
    return need, True


def _kdump_needs(f: BinaryIO, size: int) -> tuple[int, bool]:
    """Bytes a kdump-compressed core (makedumpfile's "KDUMP   ") needs.

    Reads struct disk_dump_header (block_size, sub_hdr_size, bitmap_blocks at
    offset 428) and struct kdump_sub_header (split, start_pfn, end_pfn, and
    offset/size of vmcoreinfo, notes and eraseinfo); counts the dumped pages
    in the second bitmap, which follows the first, and reads the last
    struct page_desc (offset, size, flags, page_flags: 24 bytes) of the
    table after the bitmaps. Returns (bytes, exact).
    """
    head = f.read(464)
    if len(head) < 464:
        return 464, False
    version = struct.unpack_from("<i", head, 8)[0]
    block, sub_blocks, bitmap_blocks = struct.unpack_from("<iiI", head, 428)
    if block <= 0:
        return 464, False
    bitmap = block * (1 + sub_blocks)
    descs = bitmap + block * bitmap_blocks
    if size < descs:
        return descs, False
    f.seek(block)
    sub = f.read(104).ljust(104, b"\0")
    split = struct.unpack_from("<i", sub, 12)[0]
    start_pfn, end_pfn = struct.unpack_from("<QQ", sub, 16)
    if version >= 6:
        start_pfn, end_pfn = struct.unpack_from("<QQ", sub, 80)
    need = descs
    for off_at in (32, 48, 64):  # vmcoreinfo, notes, eraseinfo: (offset, size)
        off, length = struct.unpack_from("<qQ", sub, off_at)
        if version >= 3 and off > 0 and length:
            need = max(need, off + length)
    half = block * bitmap_blocks // 2
    f.seek(bitmap + half)
    dumped = int.from_bytes(f.read(half), "little")
    if split:
        start_pfn, end_pfn = min(start_pfn, 8 * half), min(end_pfn, 8 * half)
        dumped &= ((1 << end_pfn) - 1) ^ ((1 << start_pfn) - 1)
    pages = dumped.bit_count()
    need = max(need, descs + 24 * pages)
    if pages == 0 or size < descs + 24 * pages:
        return need, size >= need
    for i in (0, pages - 1):  # the shared zero page comes first, the last page last
        f.seek(descs + 24 * i)
        off, length = struct.unpack("<qI", f.read(12))
        need = max(need, off + length)
    return need, True


def check_complete(path: Path, shown: Path) -> None:
    """A one-line TargetError when core *path* is shorter than its headers say.

    ELF and kdump-compressed cores are checked; other formats (the
    makedumpfile flattened one) are left to drgn. *shown* names the core.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(8)
        f.seek(0)
        if magic[:4] == b"\x7fELF":
            need, exact = _elf_needs(f, size)
        elif magic == b"KDUMP   ":
            need, exact = _kdump_needs(f, size)
        else:
            return
    if size < need:
        raise TargetError(f"{shown}: truncated vmcore: {size} bytes, its headers need "
                          f"{'' if exact else 'at least '}{need}")


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
    build_id: str | None = None  # the kernel's (vmlinux's) build id, hex; None: not known
    _kernel: Kernel | None = field(default=None, repr=False)

    @property
    def kernel(self) -> Kernel:
        """The KVM model (probes the layout on first use)."""
        if self._kernel is None:
            self._kernel = Kernel(self.prog, self.release)
        return self._kernel

    @property
    def kernel_if_opened(self) -> Kernel | None:
        """The KVM model if a command has asked for it (kernel), else None: no probe."""
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


def _load_files(prog: drgn.Program, files: list[Path]) -> list[str]:
    """Load the debug files *files* (decompressed), or drgn's standard search
    when there are none; the paths given to drgn. Whether a module still lacks
    its debug info is each caller's to check."""
    real = [str(decompressed(p)) for p in files]
    try:
        if real:
            prog.load_debug_info(real, main=True)
        else:
            prog.load_default_debug_info()
    except drgn.MissingDebugInfoError:
        pass
    return real


def _no_vmlinux(prog: drgn.Program, given: int, kernel: str) -> str | None:
    """The line saying *kernel*'s vmlinux debug info was not found (*given*: how
    many files -s gave); None when drgn has it."""
    main = prog.main_module()
    if not main.wants_debug_file():
        return None
    bid = main.build_id.hex() if main.build_id else "unknown"
    tried = f" (tried {given} file(s) given)" if given else " (give it with -s)"
    return f"no matching vmlinux debug info for {kernel} build id {bid}{tried}"


def _load_debug_info(prog: drgn.Program, files: list[Path], release: str | None) -> None:
    """Load vmlinux and kvm.ko debug info; one clear line when they are not there."""
    real = _load_files(prog, files)
    missing = _no_vmlinux(prog, len(real), f"kernel {release or '?'}")
    if missing is not None:
        raise DebugInfoError(missing)
    kvm = None
    for mod, _ in prog.loaded_modules():
        if mod.name in KVM_MODULES:
            kvm = mod
    # drgn skips a module whose sect_attrs names are not in the dump (a filtered
    # dump): place kvm and its vendor module from their own kallsyms instead
    for placed in modsyms.place_modules(prog, KVM_MODULES + VENDOR_MODULES,
                                        [Path(r) for r in real]):
        print(f"kvminspect: warning: {placed.name}'s section attributes (struct "
              "module.sect_attrs) are not in the dump (filtered?): its debug info is "
              "placed from the module's own symbol table (mod->kallsyms)", file=sys.stderr)
        kvm = placed if placed.name in KVM_MODULES else kvm
    if kvm is None and any(name == "kvm" for name, _ in modsyms.listed_modules(prog)):
        raise DebugInfoError(
            f"kernel {release or '?'} has kvm loaded, but its section attributes are not "
            "in the dump (filtered?) and no kvm.ko given with -s matches its symbols")
    if kvm is None:
        raise KvmNotFound(f"kernel {release or '?'} has no kvm module loaded")
    if kvm.wants_debug_file():
        kid = kvm.build_id.hex() if kvm.build_id else "unknown"
        raise DebugInfoError(f"no matching debug info for kvm.ko of kernel {release or '?'} "
                             f"build id {kid}")


def main_build_id(prog: drgn.Program) -> str | None:
    """The build id of the kernel a program reads (its vmlinux's), hex; None if unknown."""
    bid = prog.main_module().build_id
    return bid.hex() if bid else None


def open_core(path: str, debug: list[str]) -> Target:
    """A vmcore file (maybe compressed) or a fixture directory."""
    _quiet_drgn()
    p = Path(path)
    if not p.exists():
        raise TargetError(f"{path}: no such file or directory")
    files = _debug_files(debug)
    if p.is_dir():
        core, extra = fixture_parts(p)
        files = files + extra
    else:
        core = p
    if core.stat().st_size == 0:
        raise TargetError(f"{core}: file is empty")
    real = decompressed(core)
    check_complete(real, core)
    prog = drgn.Program()
    try:
        prog.set_core_dump(str(real))
    except (ValueError, OSError, drgn.FaultError) as e:
        raise TargetError(f"{core}: not a usable vmcore ({e})") from None
    _check_arch(prog, str(core))
    release = core_release(real)
    _load_debug_info(prog, files, release)
    return Target(prog, core.name if not p.is_dir() else p.name, release,
                  symbols=tuple(debug), build_id=main_build_id(prog))


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
    return Target(prog, "live", release, live=True, symbols=tuple(debug),
                  build_id=main_build_id(prog))


def open_qemu(socket: str, debug: list[str]) -> Target:
    """A QEMU-emulated host, live, through its QMP socket (drgn's set_qemu_qmp).

    QEMU must run with -device vmcoreinfo (and the host with qemu_fw_cfg) for
    drgn to know the kernel; memory is read from the QEMU process (root).
    """
    _quiet_drgn()
    if not os.path.exists(socket):
        raise TargetError(f"{socket}: no such QMP socket")
    if not stat.S_ISSOCK(os.stat(socket).st_mode):
        raise TargetError(f"{socket}: not a socket (--qemu takes QEMU's QMP unix socket, "
                          "-qmp unix:SOCK,server=on,wait=off)")
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
    return Target(prog, "live:qemu", release, live=True, symbols=tuple(debug),
                  build_id=main_build_id(prog))


def open_sample(debug: list[str] | None = None) -> Target:
    """The small real vmcore shipped inside the package (its debug set with it;
    *debug*: -s paths given too, checked as for any core)."""
    if not SAMPLE_DIR.is_dir():
        raise TargetError(f"the bundled sample is missing ({SAMPLE_DIR})")
    t = open_core(str(SAMPLE_DIR), list(debug or []))
    t.name = "sample"
    return t


GUEST_PLATFORM = drgn.Platform(drgn.Architecture.X86_64,
                               drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)


def open_guest(segments: list[tuple[int, int]], read: Callable[[int, int], bytes],
               vmcoreinfo: bytes | None, debug: list[str]) -> tuple[drgn.Program, str | None]:
    """A drgn Program on a guest's physical memory, read through the host, no file.

    *segments* are (guest physical address, size) of the guest memory the dump
    holds, each a physical memory segment of the program (Program.add_memory_segment
    with physical=True) whose reads go to *read* (guest physical address, size).
    With the guest kernel's VMCOREINFO text, the program is that Linux kernel
    (Program.set_linux_kernel_custom, drgn 0.3: drgn walks the guest's page tables
    from its swapper_pg_dir) and its debug info is loaded from *debug* (else drgn's
    standard search). Returns the program and a warning line when the guest
    kernel's debug info was not found (the program still reads memory).
    """
    _quiet_drgn()
    prog = drgn.Program(GUEST_PLATFORM)

    def read_fn(address: int, count: int, offset: int, physical: bool) -> bytes:
        return read(address, count)

    for address, size in segments:
        prog.add_memory_segment(address, size, read_fn, physical=True)
    if vmcoreinfo is None:
        return prog, None
    try:
        prog.set_linux_kernel_custom(vmcoreinfo, False)
    except (ValueError, LookupError, drgn.FaultError) as e:
        raise TargetError(f"the guest's VMCOREINFO is not usable ({e})") from None
    files = _load_files(prog, _debug_files(debug))
    return prog, _no_vmlinux(prog, len(files),
                             f"the guest kernel {kernel_release_of(vmcoreinfo) or '?'}")


def kernel_release_of(vmcoreinfo: bytes) -> str | None:
    """OSRELEASE of a VMCOREINFO text."""
    m = re.search(rb"^OSRELEASE=([^\n\0]{1,64})", vmcoreinfo, re.MULTILINE)
    return m.group(1).decode(errors="replace") if m else None
