#!/usr/bin/env python3
"""Shrink a Debian kernel's debug files to what drgn needs to read a vmcore.

    mkdebug.py vmlinux IN OUT [--cu PATH ...]
    mkdebug.py module IN OUT

drgn reads memory from the core, so from the debug files it needs only DWARF,
the symbol table, the build-id note and the ORC unwind tables.

vmlinux (ET_EXEC): .debug_info keeps only the compile units that define what
drgn's kernel support and the helpers kvminspect uses look up (CUS, plus
--cu; matched by DW_AT_name, the file's path in the source tree). Each unit
also carries every type its code uses, so together they hold struct page,
task_struct, module, xa_node and friends. Kept units must be DWARF 4 or 5
compile units; the others are skipped unread, whatever their version (the
Rust units of 7.x are DWARF 4, the assembler ones of 5.10 DWARF 2). The units
are copied byte for byte (references inside a unit are unit-relative) and
their offsets into other sections are rewritten: the abbreviation table, the
strings (.debug_str and .debug_line_str keep only those the kept units and
their line program headers use), the line program and the range and location
lists of each kept unit are copied into new, small sections. DWARF 5 list
tables (.debug_rnglists, .debug_loclists) and line programs are copied whole
per unit; DWARF 4's .debug_ranges and .debug_loc have no headers, so each
unit gets the span from its first list to the end of its last. Forms that
point into other units or files (DW_FORM_ref_addr, ...) or into tables not
rebuilt (strx, addrx, ...) are refused in kept units. Offsets of DIEs inside
location expressions (DW_OP_call_ref, DW_OP_implicit_pointer: locals of
inlined code) are not rewritten; drgn does not follow them. .debug_aranges
keeps the sets of the kept units; .symtab keeps all symbols but export tables,
CRCs and function padding (DROP_SYMBOLS); .debug_frame (drgn unwinds the
kernel with ORC) and all .rela.* sections go.

module (ET_REL: kvm.ko, kvm-amd.ko): all DWARF but .debug_frame stays, as do
the symbol table and the relocations drgn applies to DWARF and ORC. Those
against debug sections (offsets, not addresses: most of them) are applied
here and dropped.

In both, allocated sections other than notes (the build id) and the ORC tables
become NOBITS, address and size kept; .init.text stays PROGBITS (zeros), as
drgn tells a vmlinux by it. The section table keeps its order, dropped
sections becoming SHT_NULL entries, so symbol section indexes stay valid.
"""

from __future__ import annotations

import argparse
import bisect
import mmap
import os
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Compile units that hold the definitions drgn's Linux support and the helpers
# kvminspect uses look up (vmcoreinfo, init_task, page_offset_base,
# vmemmap_base, modules, init_pid_ns, task_state_array, struct xa_node, ...).
CUS = (
    "arch/x86/kernel/head64.c",
    "arch/x86/kernel/process.c",
    "arch/x86/kernel/setup_percpu.c",
    "arch/x86/mm/init_64.c",
    "fs/proc/array.c",
    "init/init_task.c",
    "init/version.c",
    "kernel/crash_core.c",
    "kernel/module.c",  # until 5.18; 5.19 split it into kernel/module/
    "kernel/module/main.c",
    "kernel/module/sysfs.c",
    "kernel/pid.c",
    "kernel/vmcore_info.c",  # 6.9+: vmcoreinfo moved out of crash_core.c
    "lib/xarray.c",
    "mm/init-mm.c",
    "mm/sparse.c",
)
# allocated sections whose bytes drgn reads from the file, not from the core
KEEP_ALLOC = (".orc_header", ".orc_unwind", ".orc_unwind_ip")
# vmlinux symbols no one looks up in a vmcore: export tables, CRCs, the
# padding before functions (6.12)
DROP_SYMBOLS = (b"__ksymtab_", b"__kstrtab_", b"__kstrtabns_", b"__crc_", b"__pfx_")
# module sections kept besides .debug_* and the relocations of kept sections
KEEP_MODULE = (".symtab", ".strtab")

# --- ELF -------------------------------------------------------------------

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
PHDR = struct.Struct("<IIQQQQQQ")
SHT_NULL, SHT_RELA, SHT_NOTE, SHT_NOBITS = 0, 4, 7, 8
SHF_ALLOC, SHF_COMPRESSED = 0x2, 0x800
ET_REL, ET_EXEC = 1, 2
PT_LOAD, PT_NOTE = 1, 4
SYM = struct.Struct("<IBBHQQ")
RELA = struct.Struct("<QQq")
RELOC_SIZE = {1: 8, 10: 4}  # R_X86_64_64, R_X86_64_32


@dataclass
class Section:
    """One section header (ELF64), with its name resolved."""

    name_off: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entsize: int
    name: str = ""

    def pack(self) -> bytes:
        return SHDR.pack(self.name_off, self.type, self.flags, self.addr, self.offset,
                         self.size, self.link, self.info, self.align, self.entsize)


class Elf:
    """A little-endian ELF64 file, memory-mapped read-only."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        self.header = list(EHDR.unpack_from(self.buf))
        ident = self.header[0]
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            raise SystemExit(f"{path}: not a little-endian ELF64 file")
        self.type = self.header[1]
        phoff, shoff, phnum, shnum, shstrndx = (self.header[i] for i in (5, 6, 10, 12, 13))
        if shnum == 0 or shstrndx >= 0xFF00:
            raise SystemExit(f"{path}: extended section numbering is not supported")
        self.phdrs = [list(PHDR.unpack_from(self.buf, phoff + i * PHDR.size))
                      for i in range(phnum)]
        self.sections = [Section(*SHDR.unpack_from(self.buf, shoff + i * SHDR.size))
                         for i in range(shnum)]
        names = bytes(self.data(self.sections[shstrndx]))
        for s in self.sections:
            s.name = names[s.name_off:names.index(b"\0", s.name_off)].decode()
        self.shstrndx = shstrndx

    def data(self, s: Section) -> memoryview:
        """The bytes of section *s* (empty for NOBITS)."""
        if s.type == SHT_NOBITS:
            return self.buf[0:0]
        if s.flags & SHF_COMPRESSED:
            raise SystemExit(f"section {s.name} is compressed: give an uncompressed file")
        return self.buf[s.offset:s.offset + s.size]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def write(self, out: Path, contents: dict[str, bytes | memoryview]) -> None:
        """Write a copy whose sections named in *contents* hold those bytes.

        Notes keep their bytes, other allocated sections become NOBITS and
        everything else becomes an empty SHT_NULL entry (so indexes stay).
        """
        secs = [Section(**vars(s)) for s in self.sections]
        data: dict[int, bytes | memoryview] = {self.shstrndx: self.data(secs[self.shstrndx])}
        for i, s in enumerate(secs):
            if s.name in contents:
                data[i] = contents[s.name]
            elif s.type == SHT_NOTE:
                data[i] = self.data(s)
        pos = EHDR.size + len(self.phdrs) * PHDR.size
        chunks: list[tuple[int, bytes | memoryview]] = []
        for i in sorted(range(1, len(secs)), key=lambda i: secs[i].offset):
            s = secs[i]
            if i in data:
                pos = -(-pos // max(s.align, 1)) * max(s.align, 1)
                s.offset, s.size = pos, len(data[i])
                chunks.append((pos, data[i]))
                pos += s.size
                if s.type == SHT_NOBITS:
                    s.type = 1  # PROGBITS: e.g. an allocated section given contents
            elif s.flags & SHF_ALLOC:
                s.type, s.offset = SHT_NOBITS, pos
            else:
                secs[i] = Section(0, SHT_NULL, 0, 0, 0, 0, 0, 0, 0, 0)
        shoff = -(-pos // 8) * 8
        header = list(self.header)
        header[6] = shoff
        phdrs = []
        for p in self.phdrs:
            p = list(p)
            if p[0] == PT_NOTE:  # points at the note section that starts at its address
                note = next(s for s in secs if s.type == SHT_NOTE and s.addr == p[3])
                p[2] = note.offset
            elif p[0] == PT_LOAD:
                p[2] = p[5] = 0  # no bytes in the file, as objcopy --only-keep-debug
            phdrs.append(PHDR.pack(*p))
        with open(out, "wb") as f:
            f.write(EHDR.pack(*header))
            f.write(b"".join(phdrs))
            for off, chunk in chunks:
                f.seek(off)
                f.write(chunk)
            f.seek(shoff)
            f.write(b"".join(s.pack() for s in secs))


# --- DWARF -----------------------------------------------------------------

DW_AT_name, DW_AT_GNU_locviews = 0x03, 0x2137
DW_FORM_addr, DW_FORM_string, DW_FORM_strp, DW_FORM_indirect = 0x01, 0x08, 0x0E, 0x16
DW_FORM_sec_offset, DW_FORM_line_strp, DW_FORM_implicit_const = 0x17, 0x1F, 0x21
DW_UT_compile, DW_UT_partial = 1, 3
FIXED = {0x05: 2, 0x06: 4, 0x07: 8, 0x0B: 1, 0x0C: 1, 0x11: 1, 0x12: 2, 0x13: 4, 0x14: 8,
         0x19: 0, 0x1E: 16, 0x20: 8, 0x21: 0,  # data*, flag*, ref1-8, data16, ref_sig8
         0x1C: 4, 0x24: 8, 0x25: 1, 0x26: 2, 0x27: 3, 0x28: 4,  # ref_sup4/8, strx1-4
         0x29: 1, 0x2A: 2, 0x2B: 3, 0x2C: 4}  # addrx1-4
OFFSET = (DW_FORM_strp, DW_FORM_sec_offset, DW_FORM_line_strp,
          0x10, 0x1D, 0x1F20, 0x1F21)  # ref_addr, strp_sup, GNU_ref_alt, GNU_strp_alt
LEB = (0x0D, 0x0F, 0x15,  # sdata, udata, ref_udata (only skipped: sdata reads as unsigned)
       0x1A, 0x1B, 0x22, 0x23, 0x1F01, 0x1F02)  # strx, addrx, loclistx, rnglistx, GNU_*_index
BLOCK = {0x03: 2, 0x04: 4, 0x09: 0, 0x0A: 1, 0x18: 0}  # size of the length; 0: ULEB128
# Forms a kept unit may not hold (any unit may, to be skipped): references into
# other units or files (ref_addr, the supplementary and GNU_*_alt forms), and
# indexes into .debug_str_offsets, .debug_addr or list offset tables (strx*,
# addrx*, loclistx, rnglistx, GNU_*_index), which GCC does not emit for the kernel.
FOREIGN = frozenset((0x10, 0x1A, 0x1B, 0x1C, 0x1D, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28,
                     0x29, 0x2A, 0x2B, 0x2C, 0x1F01, 0x1F02, 0x1F20, 0x1F21))

# the section a DW_FORM_sec_offset attribute points into, in DWARF 5 and 4
LOCLIST_ATTRS = (0x02, 0x19, 0x38, 0x40, 0x48, DW_AT_GNU_locviews)  # location,
# string_length, data_member_location, frame_base, static_link, GNU_locviews
SEC_OFFSET = {
    5: {0x10: ".debug_line", 0x55: ".debug_rnglists", 0x74: ".debug_rnglists",  # rnglists_base
        0x8C: ".debug_loclists"} | dict.fromkeys(LOCLIST_ATTRS, ".debug_loclists"),  # loclists_base
    4: {0x10: ".debug_line", 0x55: ".debug_ranges"} | dict.fromkeys(LOCLIST_ATTRS, ".debug_loc"),
}
# DWARF 4 list sections: no unit headers, lists end with a (0, 0) entry
HEADERLESS = (".debug_ranges", ".debug_loc")


def uleb(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 at *pos*: (value, next position)."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def read_form(buf: memoryview, pos: int, form: int, osz: int, asz: int) -> tuple[int, int]:
    """Skip one attribute value of *form* at *pos*: (its integer value, next position).

    Strings and blocks give the position of their first byte as the value.
    *osz* is the offset size (4 or 8), *asz* the address size. An unknown form
    raises ValueError.
    """
    if form in FIXED:
        size = FIXED[form]
    elif form in OFFSET:
        size = osz
    elif form == DW_FORM_addr:
        size = asz
    elif form in LEB:
        return uleb(buf, pos)
    elif form == DW_FORM_string:
        end = pos
        while buf[end]:
            end += 1
        return pos, end + 1
    elif form in BLOCK:
        if BLOCK[form]:
            length, start = int.from_bytes(buf[pos:pos + BLOCK[form]], "little"), pos + BLOCK[form]
        else:
            length, start = uleb(buf, pos)
        return start, start + length
    else:
        raise ValueError(f"DW_FORM {form:#x} is not supported")
    return int.from_bytes(buf[pos:pos + size], "little"), pos + size


def unit_length(buf: memoryview, pos: int) -> tuple[int, int]:
    """The DWARF initial length at *pos*: (size of the whole unit, offset size)."""
    (n,) = struct.unpack_from("<I", buf, pos)
    if n == 0xFFFFFFFF:
        return 12 + struct.unpack_from("<Q", buf, pos + 4)[0], 8
    return 4 + n, 4


@dataclass
class Unit:
    """A unit header in .debug_info."""

    offset: int  # in .debug_info
    size: int  # of the whole unit, length field included
    version: int
    unit_type: int  # DW_UT_*; DW_UT_compile before DWARF 5
    offset_size: int
    addr_size: int
    abbrev_offset: int
    abbrev_field: int  # where the abbrev offset is stored, relative to the unit
    die: int  # the root DIE, relative to the unit


class Dwarf:
    """Just enough of a DWARF 2-5 reader to name units and walk the attributes of
    compile units."""

    def __init__(self, elf: Elf) -> None:
        self.elf = elf
        self.info = self.section(".debug_info")
        self.abbrev = self.section(".debug_abbrev")
        self.tables: dict[int, tuple[dict[int, list[tuple[int, int]]], int]] = {}

    def section(self, name: str) -> memoryview:
        s = self.elf.section(name)
        return self.elf.data(s) if s is not None else memoryview(b"")

    def units(self) -> Iterator[Unit]:
        """Every unit, whatever its version or type."""
        buf, pos = self.info, 0
        while pos < len(buf):
            size, osz = unit_length(buf, pos)
            p = pos + (4 if osz == 4 else 12)
            (version,) = struct.unpack_from("<H", buf, p)
            if version >= 5:  # version, unit_type, address_size, debug_abbrev_offset
                unit_type, asz, field = buf[p + 2], buf[p + 3], p + 4
                # type units add a signature and a type offset, skeleton and
                # split units a DWO id
                extra = {2: 8 + osz, 6: 8 + osz, 4: 8, 5: 8}.get(unit_type, 0)
                die = field + osz + extra
            else:  # version, debug_abbrev_offset, address_size
                unit_type, field = DW_UT_compile, p + 2
                asz, die = buf[field + osz], field + osz + 1
            abbrev = int.from_bytes(buf[field:field + osz], "little")
            yield Unit(pos, size, version, unit_type, osz, asz, abbrev, field - pos, die - pos)
            pos += size

    def abbrevs(self, offset: int) -> tuple[dict[int, list[tuple[int, int]]], int]:
        """The abbreviation table at *offset*: ({code: [(attribute, form)]}, end offset)."""
        if offset not in self.tables:
            buf, pos, table = self.abbrev, offset, {}
            while True:
                code, pos = uleb(buf, pos)
                if code == 0:
                    break
                _tag, pos = uleb(buf, pos)
                pos += 1  # has children
                attrs = table[code] = []
                while True:
                    attr, pos = uleb(buf, pos)
                    form, pos = uleb(buf, pos)
                    if attr == form == 0:
                        break
                    if form == DW_FORM_implicit_const:
                        _, pos = uleb(buf, pos)  # the value lives here, not in the DIE
                    attrs.append((attr, form))
            self.tables[offset] = table, pos
        return self.tables[offset]

    def attributes(self, unit: Unit, root_only: bool = False
                   ) -> Iterator[tuple[int, int, int, int]]:
        """(attribute, form, position in the unit, value) of each attribute of each DIE."""
        buf = self.info[unit.offset:unit.offset + unit.size]
        table = self.abbrevs(unit.abbrev_offset)[0]
        pos = unit.die
        while pos < unit.size:
            code, pos = uleb(buf, pos)
            if code == 0:
                continue
            for attr, form in table[code]:
                while form == DW_FORM_indirect:
                    form, pos = uleb(buf, pos)
                start = pos
                value, pos = read_form(buf, pos, form, unit.offset_size, unit.addr_size)
                yield attr, form, start, value
            if root_only:
                return

    def name(self, unit: Unit) -> str:
        """The unit's DW_AT_name (the source file of a compile unit); "" if it
        has none this reader can resolve."""
        try:
            for attr, form, _, value in self.attributes(unit, root_only=True):
                if attr != DW_AT_name:
                    continue
                if form == DW_FORM_string:
                    buf, value = self.info, unit.offset + value
                elif form in (DW_FORM_strp, DW_FORM_line_strp):
                    buf = self.section(".debug_str" if form == DW_FORM_strp else ".debug_line_str")
                else:  # strx*: needs .debug_str_offsets
                    return ""
                return bytes(buf[value:value + 512]).split(b"\0")[0].decode()
        except (ValueError, KeyError, IndexError):  # a form or abbreviation this reader lacks
            pass
        return ""


def line_header_strings(buf: bytearray, offset: int) -> Iterator[tuple[int, int, int]]:
    """(form, position, value) of each directory and file entry field in the
    line program header at *offset*; none before DWARF 5, whose headers hold
    their strings inline."""
    _, osz = unit_length(buf, offset)
    p = offset + (4 if osz == 4 else 12)
    if struct.unpack_from("<H", buf, p)[0] < 5:
        return
    asz = buf[p + 2]
    p += 4 + osz + 5  # version, sizes, header_length, 5 one-byte fields
    p += buf[p]  # opcode_base: it and the standard_opcode_lengths after it
    for _ in ("directories", "file names"):
        forms = []
        nformats, p = buf[p], p + 1
        for _ in range(nformats):
            _content, p = uleb(buf, p)
            form, p = uleb(buf, p)
            forms.append(form)
        count, p = uleb(buf, p)
        for _ in range(count):
            for form in forms:
                start = p
                value, p = read_form(memoryview(buf), p, form, osz, asz)
                yield form, start, value


class Pieces:
    """The parts (units with a length header: line programs, DWARF 5 list
    tables) of a section that kept DWARF points into, copied in the order they
    are first asked for."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.starts, pos = buf, [], 0
        while pos < len(buf):
            self.starts.append(pos)
            pos += unit_length(buf, pos)[0]
        self.starts.append(pos)
        self.out = bytearray()
        self.moved: dict[int, int] = {}  # old start -> new start

    def __call__(self, offset: int) -> int:
        """The new offset of old *offset* (its part is copied on first use)."""
        i = bisect.bisect_right(self.starts, offset) - 1
        start = self.starts[i]
        if start not in self.moved:
            self.moved[start] = len(self.out)
            self.out += self.buf[start:self.starts[i + 1]]
        return self.moved[start] + offset - start


def list_end(buf: memoryview, pos: int, asz: int, loc: bool) -> int:
    """The end of the DWARF 4 range list (or location list, *loc*) at *pos*."""
    base_entry = (1 << 8 * asz) - 1
    while True:
        begin = int.from_bytes(buf[pos:pos + asz], "little")
        end = int.from_bytes(buf[pos + asz:pos + 2 * asz], "little")
        pos += 2 * asz
        if begin == end == 0:
            return pos
        if loc and begin != base_entry:  # a location expression follows
            pos += 2 + int.from_bytes(buf[pos:pos + 2], "little")


class Regions:
    """A DWARF 4 list section (.debug_ranges, .debug_loc): no headers, so each
    kept unit gets a copy of the span from its first list to the end of its
    last one (a unit's lists are emitted together, one object file's section)."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.out = bytearray()

    def copy(self, refs: list[tuple[int, int]], asz: int, loc: bool) -> dict[int, int]:
        """Copy the span of one unit's references (attribute, old offset): {old: new}."""
        lo = min(offset for _, offset in refs)
        # a GNU_locviews list has no end marker: its location list follows it
        hi = max(list_end(self.buf, offset, asz, loc)
                 for attr, offset in refs if attr != DW_AT_GNU_locviews)
        if any(offset >= hi for _, offset in refs):
            raise SystemExit(f"view list after the last location list at {hi:#x}")
        base = len(self.out)
        self.out += self.buf[lo:hi]
        return {offset: base + offset - lo for _, offset in refs}


class Strings:
    """A new string section holding the strings kept DWARF points at."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = bytes(buf)
        self.out = bytearray()
        self.at: dict[bytes, int] = {}

    def __call__(self, offset: int) -> int:
        """The new offset of the string at old *offset*."""
        s = self.buf[offset:self.buf.index(b"\0", offset) + 1]
        if s not in self.at:
            self.at[s] = len(self.out)
            self.out += s
        return self.at[s]


# --- the two recipes -------------------------------------------------------


def put(buf: bytearray, pos: int, size: int, value: int) -> None:
    buf[pos:pos + size] = value.to_bytes(size, "little")


class Rebuilt:
    """The new .debug_* sections that kept units point into."""

    def __init__(self, dw: Dwarf) -> None:
        self.dw = dw
        self.strings = {form: Strings(dw.section(name)) for form, name in
                        ((DW_FORM_strp, ".debug_str"), (DW_FORM_line_strp, ".debug_line_str"))}
        self.pieces: dict[str, Pieces] = {}
        self.regions: dict[str, Regions] = {}

    def piece(self, name: str, offset: int) -> int:
        if name not in self.pieces:
            self.pieces[name] = Pieces(self.dw.section(name))
        return self.pieces[name](offset)

    def region(self, name: str) -> Regions:
        if name not in self.regions:
            self.regions[name] = Regions(self.dw.section(name))
        return self.regions[name]

    def unit(self, unit: Unit, name: str) -> bytearray:
        """A copy of *unit* pointing into the new sections (its abbreviation
        offset is left to the caller)."""
        if unit.version not in SEC_OFFSET or unit.unit_type not in (DW_UT_compile, DW_UT_partial):
            raise SystemExit(f"{name}: DWARF {unit.version} unit of type {unit.unit_type}: "
                             "only DWARF 4 and 5 compile units can be kept")
        data = bytearray(self.dw.info[unit.offset:unit.offset + unit.size])
        osz = unit.offset_size
        lists: dict[str, list[tuple[int, int, int]]] = {}  # headerless section -> refs
        try:
            for attr, form, pos, value in self.dw.attributes(unit):
                if form in FOREIGN:
                    raise ValueError(f"DW_FORM {form:#x} points outside the unit's sections")
                if form in self.strings:
                    put(data, pos, osz, self.strings[form](value))
                elif form == DW_FORM_sec_offset:
                    section = SEC_OFFSET[unit.version].get(attr)
                    if section is None:
                        raise ValueError(f"no rule for DW_FORM_sec_offset in {attr:#x}")
                    if section in HEADERLESS:
                        lists.setdefault(section, []).append((attr, pos, value))
                    else:
                        put(data, pos, osz, self.piece(section, value))
        except ValueError as e:
            raise SystemExit(f"{name}: {e}") from None
        for section, refs in lists.items():
            moved = self.region(section).copy([(attr, value) for attr, _, value in refs],
                                              unit.addr_size, section == ".debug_loc")
            for _, pos, value in refs:
                put(data, pos, osz, moved[value])
        return data

    def line_strings(self) -> None:
        """Point the string forms of the copied line program headers at the new
        string sections."""
        lines = self.pieces.get(".debug_line")
        for start in lines.moved.values() if lines else ():
            osz = unit_length(lines.out, start)[1]
            for form, pos, value in list(line_header_strings(lines.out, start)):
                if form in self.strings:
                    put(lines.out, pos, osz, self.strings[form](value))

    def sections(self) -> dict[str, bytearray]:
        out = {name: self.strings[form].out for form, name in
               ((DW_FORM_strp, ".debug_str"), (DW_FORM_line_strp, ".debug_line_str"))}
        out.update((name, p.out) for name, p in self.pieces.items())
        out.update((name, r.out) for name, r in self.regions.items())
        for names in SEC_OFFSET.values():  # sections no kept unit points into become empty
            for name in names.values():
                out.setdefault(name, bytearray())
        return out


def shrink_vmlinux(elf: Elf, cus: list[str]) -> dict[str, bytes | memoryview]:
    """New contents for the kept sections of a vmlinux (see the module docstring)."""
    dw = Dwarf(elf)
    rebuilt = Rebuilt(dw)
    info, abbrev = bytearray(), bytearray()
    abbrev_at: dict[int, int] = {}  # old table offset -> new
    info_at: dict[int, int] = {}  # old unit offset -> new
    found: set[str] = set()
    for unit in dw.units():
        # GCC names C units by their path in the source tree ("kernel/pid.c":
        # not a suffix match, as arch/x86/kernel/module.c is not kernel/module.c)
        name = dw.name(unit)
        if os.path.normpath(name) not in cus:
            continue
        found.add(os.path.normpath(name))
        data = rebuilt.unit(unit, name)
        if unit.abbrev_offset not in abbrev_at:
            end = dw.abbrevs(unit.abbrev_offset)[1]
            abbrev_at[unit.abbrev_offset] = len(abbrev)
            abbrev += dw.abbrev[unit.abbrev_offset:end]
        put(data, unit.abbrev_field, unit.offset_size, abbrev_at[unit.abbrev_offset])
        info_at[unit.offset] = len(info)
        info += data
    missing = [c for c in cus if c not in found]
    if missing:
        print(f"mkdebug: not in this kernel: {', '.join(missing)}", file=sys.stderr)
    rebuilt.line_strings()
    out: dict[str, bytes | memoryview] = {
        ".debug_info": info, ".debug_abbrev": abbrev,
        ".debug_aranges": rebased_aranges(dw.section(".debug_aranges"), info_at),
    }
    out.update(rebuilt.sections())
    for name in KEEP_ALLOC:
        s = elf.section(name)
        if s is not None:
            out[name] = elf.data(s)
    out[".symtab"], out[".strtab"] = shrink_symtab(elf)
    init_text = elf.section(".init.text")
    if init_text is not None:  # drgn knows vmlinux by a PROGBITS .init.text
        out[".init.text"] = bytes(init_text.size)
    return {k: v for k, v in out.items() if elf.section(k) is not None}


def shrink_symtab(elf: Elf) -> tuple[bytes, bytes]:
    """.symtab without the symbols of DROP_SYMBOLS and a .strtab for it.

    The .symtab header's first-global index is updated in *elf* itself.
    """
    symtab = elf.section(".symtab")
    assert symtab is not None
    strings = Strings(elf.data(elf.sections[symtab.link]))
    strings(0)  # the empty name stays at offset 0
    out, first_global = [], None
    for i, (name, *rest) in enumerate(SYM.iter_unpack(elf.data(symtab))):
        if i and strings.buf.startswith(DROP_SYMBOLS, name):
            continue
        if i >= symtab.info and first_global is None:
            first_global = len(out)
        out.append(SYM.pack(strings(name), *rest))
    symtab.info = len(out) if first_global is None else first_global
    return b"".join(out), bytes(strings.out)


def rebased_aranges(buf: memoryview, info_at: dict[int, int]) -> bytearray:
    """The .debug_aranges sets of the kept units, pointing at their new offsets."""
    out, pos = bytearray(), 0
    while pos < len(buf):
        size, osz = unit_length(buf, pos)
        field = (4 if osz == 4 else 12) + 2  # after the length and the version
        old = int.from_bytes(buf[pos + field:pos + field + osz], "little")
        if old in info_at:
            start = len(out)
            out += buf[pos:pos + size]
            put(out, start + field, osz, info_at[old])
        pos += size
    return out


def shrink_module(elf: Elf) -> dict[str, bytes | memoryview]:
    """New contents for the kept sections of a module (see the module docstring).

    DWARF (but .debug_frame), the symbol table, ORC and the relocations of
    those stay. Relocations that do not depend on where the module was loaded
    (offsets into other debug sections: most of them) are applied here.
    """
    out: dict[str, bytes | memoryview] = {}
    for s in elf.sections[1:]:
        if s.name in KEEP_MODULE + KEEP_ALLOC or (
                s.name.startswith(".debug_") and s.name != ".debug_frame"):
            out[s.name] = elf.data(s)
    symtab = elf.section(".symtab")
    syms = list(SYM.iter_unpack(elf.data(symtab))) if symtab else []
    for s in elf.sections[1:]:
        if s.type != SHT_RELA or not s.info:
            continue
        target = elf.sections[s.info]
        if target.name not in out:
            continue
        if target.flags & SHF_ALLOC:  # ORC
            out[s.name] = elf.data(s)
        else:
            data = out[target.name] = bytearray(out[target.name])
            out[s.name] = apply_fixed_relocations(elf, s, syms, data)
    return out


def apply_fixed_relocations(elf: Elf, rela: Section, syms: list[tuple[int, ...]],
                            data: bytearray) -> bytes:
    """Apply to *data* the entries of *rela* against symbols in non-allocated
    sections (their address is 0 wherever the module is loaded); return the
    others."""
    keep = []
    for entry in RELA.iter_unpack(elf.data(rela)):
        offset, info, addend = entry
        _, _, _, shndx, value, _ = syms[info >> 32]
        size = RELOC_SIZE.get(info & 0xFFFFFFFF)
        if size and 0 < shndx < 0xFF00 and not elf.sections[shndx].flags & SHF_ALLOC:
            put(data, offset, size, value + addend)
        else:
            keep.append(RELA.pack(*entry))
    return b"".join(keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("vmlinux", "module"))
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--cu", action="append", default=[], metavar="PATH",
                    help="also keep this compile unit (vmlinux; e.g. mm/slub.c)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    elf = Elf(args.input)
    if args.kind == "vmlinux":
        if elf.type != ET_EXEC:
            raise SystemExit(f"{args.input}: not a vmlinux (ET_EXEC)")
        contents = shrink_vmlinux(elf, list(CUS) + args.cu)
    else:
        if elf.type != ET_REL:
            raise SystemExit(f"{args.input}: not a module (ET_REL)")
        contents = shrink_module(elf)
    elf.write(args.output, contents)
    size_in, size_out = args.input.stat().st_size, args.output.stat().st_size
    print(f"{args.output}: {size_out / 1e6:.1f} MB (from {size_in / 1e6:.1f} MB) "
          f"in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
