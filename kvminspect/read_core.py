"""Which host physical pages the dump holds, from the dump's own tables.

CorePages is the model's part for the host core's page presence: a page is
in the dump when the core's own table says it is, never because a read of it
succeeds (drgn zero-fills the p_memsz tail of an ELF segment past p_filesz,
so such a read returns zeros for a page the dump does not have).

* ELF (QEMU's dump-guest-memory, makedumpfile -E, /proc/vmcore, /proc/kcore):
  the bytes of each PT_LOAD from p_paddr to p_paddr + p_filesz are in the
  file (include/uapi/linux/elf.h, Elf64_Phdr; e_phnum PN_XNUM: the count is
  section 0's sh_info). makedumpfile -E keeps a run of fewer than 256
  excluded pages (PFN_EXCLUDED) inside its PT_LOAD, with the page contents,
  and cuts a longer one out (write_elf_pages_cyclic()): the file has what
  its segments say, no more.
* kdump-compressed (makedumpfile -c/-l/-p, "KDUMP   "): the second bitmap
  (dumpable pages) that follows the first after struct disk_dump_header
  and the sub header (makedumpfile's diskdump_mod.h: block_size,
  sub_hdr_size and bitmap_blocks at offset 428; the bitmaps start at block
  1 + sub_hdr_size, the second half of bitmap_blocks blocks is the second
  bitmap, bit pfn % 8 of byte pfn / 8). A split dump (struct kdump_sub_header
  split, start_pfn, end_pfn; start_pfn_64/end_pfn_64 from header version 6)
  holds only its pfn range.
* makedumpfile's flattened format (-F, "makedumpfile" header then
  struct makedumpfile_data_header records: big-endian offset and size of
  each piece of the kdump-compressed file): the pieces that make the
  header and bitmaps are gathered, then read as above.
* A live target (QEMU over QMP; no core file): every page the target maps is
  there and a read says so (a live read never zero-fills).
"""

from __future__ import annotations

import bisect
import struct
from enum import Enum
from typing import BinaryIO

from kvminspect.memory import Memory

PAGE_SHIFT = 12
KDUMP_SIGNATURE = b"KDUMP   "
FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER_SIZE = 4096  # MAX_SIZE_MDF_HEADER
FLAT_END = -1  # END_FLAG_FLAT_HEADER
DISK_DUMP_HEADER = 464  # what kvminspect reads of struct disk_dump_header
SUB_HEADER = 104  # what kvminspect reads of struct kdump_sub_header


class CoreKind(Enum):
    """Where a host page's presence comes from."""

    ELF = "ELF program headers"
    KDUMP = "kdump-compressed bitmap"
    FLAT = "flattened kdump-compressed bitmap"
    LIVE = "live target"


class CorePages:
    """The host pages the dump holds, read from the core file drgn opened (once).

    *mem* gives the drgn Program (its core_dump_path and flags). Owns the
    parsed table (reset() forgets it).
    """

    def __init__(self, mem: Memory) -> None:
        self.mem = mem
        self._kind: CoreKind | None = None
        self._starts: list[int] = []  # ELF: sorted [start, end) pfn ranges
        self._ends: list[int] = []
        self._bitmap = b""  # kdump: the second bitmap
        self._pfn_range = (0, 0)  # kdump: the pfns this file may hold (a split dump)
        self._error: str | None = None

    def reset(self) -> None:
        """Forget the parsed table (the next question parses the core again)."""
        self._kind = None
        self._starts, self._ends, self._bitmap = [], [], b""

    def kind(self) -> CoreKind:
        """What presence is read from (parses the core on first use; OSError or
        ValueError when the core file cannot be parsed)."""
        if self._kind is None:
            self._kind = self._parse()
        return self._kind

    def present(self, pfn: int) -> bool:
        """Whether host page *pfn* is in the dump (on a live target: always True,
        the read decides)."""
        kind = self.kind()
        if kind is CoreKind.LIVE:
            return True
        if kind is CoreKind.ELF:
            i = bisect.bisect_right(self._starts, pfn) - 1
            return i >= 0 and pfn < self._ends[i]
        lo, hi = self._pfn_range
        byte = pfn >> 3
        return lo <= pfn < hi and byte < len(self._bitmap) and bool(
            self._bitmap[byte] >> (pfn & 7) & 1)

    # parsing

    def _parse(self) -> CoreKind:
        prog = self.mem.prog
        path = prog.core_dump_path
        if path is None:  # QEMU over QMP: no file
            return CoreKind.LIVE
        with open(path, "rb") as f:
            magic = f.read(16)
            f.seek(0)
            if magic[:4] == b"\x7fELF":
                self._elf(f)
                return CoreKind.ELF
            if magic[:8] == KDUMP_SIGNATURE:
                self._kdump(_Plain(f))
                return CoreKind.KDUMP
            if magic[:len(FLAT_SIGNATURE)] == FLAT_SIGNATURE:
                self._kdump(_Flat(f))
                return CoreKind.FLAT
        raise ValueError(f"{path}: not an ELF, kdump-compressed or flattened core")

    def _elf(self, f: BinaryIO) -> None:
        """PT_LOAD [p_paddr, p_paddr + p_filesz) of an ELF64 core, as whole pages."""
        head = f.read(64)
        if head[4] != 2 or head[5] != 1:
            raise ValueError("only little-endian ELF64 cores are read")
        phoff, shoff = struct.unpack_from("<QQ", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        if phnum == 0xFFFF:  # PN_XNUM
            f.seek(shoff + 44)
            phnum = struct.unpack("<I", f.read(4))[0]
        f.seek(phoff)
        table = f.read(phnum * phentsize)
        ranges = []
        for i in range(phnum):
            p_type, _, _, _, paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type != 1 or paddr == 0xFFFFFFFFFFFFFFFF:  # PT_LOAD with a physical address
                continue
            start = (paddr + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
            end = (paddr + filesz) >> PAGE_SHIFT
            if start < end:
                ranges.append((start, end))
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def _kdump(self, f: _Plain | _Flat) -> None:
        """The second bitmap of a kdump-compressed core (and a split dump's range)."""
        head = f.read(0, DISK_DUMP_HEADER)
        version = struct.unpack_from("<i", head, 8)[0]
        block, sub_blocks, bitmap_blocks = struct.unpack_from("<iiI", head, 428)
        if block <= 0:
            raise ValueError("kdump-compressed core with a bad block size")
        sub = f.read(block, SUB_HEADER)
        split = struct.unpack_from("<i", sub, 12)[0]
        start, end = struct.unpack_from("<QQ", sub, 16)
        if version >= 6:
            start, end = struct.unpack_from("<QQ", sub, 80)
        half = block * bitmap_blocks // 2
        self._bitmap = f.read(block * (1 + sub_blocks) + half, half)
        self._pfn_range = (start, end) if split else (0, 8 * half)


class _Plain:
    """Random reads of a plain file."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def read(self, offset: int, size: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(size).ljust(size, b"\0")


class _Flat:
    """Random reads of the kdump-compressed file a flattened one describes."""

    def __init__(self, f: BinaryIO) -> None:
        self.pieces: list[tuple[int, int, int]] = []  # (offset, size, where in f)
        pos = FLAT_HEADER_SIZE
        while True:
            f.seek(pos)
            rec = f.read(16)
            if len(rec) < 16:
                break
            offset, size = struct.unpack(">qq", rec)
            if offset == FLAT_END or size < 0:
                break
            self.pieces.append((offset, size, pos + 16))
            pos += 16 + size
        self.f = f

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        for off, n, at in self.pieces:
            lo, hi = max(off, offset), min(off + n, offset + size)
            if lo < hi:
                self.f.seek(at + lo - off)
                out[lo - offset:hi - offset] = self.f.read(hi - lo)
        return bytes(out)
