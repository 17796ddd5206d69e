#!/usr/bin/env python3
"""Shrink a Debian kernel's debug files to what drgn needs to read a vmcore.

    mkdebug.py vmlinux IN OUT [--cu PATH ...]
    mkdebug.py module IN OUT

drgn reads memory from the core, so from the debug files it needs only DWARF,
the symbol table, the build-id note and the ORC unwind tables.

vmlinux (ET_EXEC): .debug_info keeps only the compile units that define what
drgn's kernel support and helpers look up (CUS, plus --cu); every CU carries
the types its headers declare, so those units together hold struct page,
task_struct, module, xa_node and friends. The units are copied byte for byte:
their references are CU-relative, and the offsets they hold into .debug_str,
.debug_line_str and .debug_rnglists stay valid because those sections are kept
whole. Only three things move, and are patched: each unit's abbreviation table
(.debug_abbrev is rebuilt from the tables of the kept units), its line program
(DW_AT_stmt_list into a rebuilt .debug_line) and its .debug_aranges set.
.debug_loclists (variable locations inside functions), .debug_frame (drgn
unwinds the kernel with ORC) and all .rela.* sections are dropped.

module (ET_REL: kvm.ko, kvm-amd.ko): drgn applies the .rela.debug_* sections
itself, so all DWARF stays as it is; only the code and data go.

In both, allocated sections other than the notes and the ORC tables become
NOBITS (address and size kept, no bytes); the section table keeps its order,
with dropped sections as SHT_NULL entries, so symbol section indexes stay valid.
"""

from __future__ import annotations

import argparse
import bisect
import mmap
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
# vmlinux sections kept whole (the rebuilt ones are added to these)
KEEP_VMLINUX = (".debug_line_str", ".symtab", ".strtab")

# --- ELF -------------------------------------------------------------------

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
SHDR = struct.Struct("<IIQQQQIIQQ")
PHDR = struct.Struct("<IIQQQQQQ")
SHT_NULL, SHT_RELA, SHT_NOTE, SHT_NOBITS = 0, 4, 7, 8
SHF_ALLOC, SHF_COMPRESSED = 0x2, 0x800
ET_REL, ET_EXEC = 1, 2
PT_LOAD, PT_NOTE = 1, 4


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

DW_AT_name = 0x03
DW_FORM_addr, DW_FORM_string, DW_FORM_strp, DW_FORM_indirect = 0x01, 0x08, 0x0E, 0x16
DW_FORM_sec_offset, DW_FORM_line_strp, DW_FORM_implicit_const = 0x17, 0x1F, 0x21
FIXED = {0x05: 2, 0x06: 4, 0x07: 8, 0x0B: 1, 0x0C: 1, 0x11: 1, 0x12: 2, 0x13: 4, 0x14: 8,
         0x19: 0, 0x1E: 16, 0x20: 8, 0x21: 0}  # data*, flag*, ref1-8, data16, ref_sig8
OFFSET = (DW_FORM_strp, DW_FORM_sec_offset, DW_FORM_line_strp)
LEB = (0x0D, 0x0F, 0x15)  # sdata, udata, ref_udata (only skipped: sdata reads as unsigned)
BLOCK = {0x03: 2, 0x04: 4, 0x09: 0, 0x0A: 1, 0x18: 0}  # size of the length; 0: ULEB128
# Any other form is refused: ref_addr and the supplementary-file forms point
# into .debug_info or other files, strx/addrx/loclistx/rnglistx need sections
# that GCC does not emit for the kernel.

# the section a DW_FORM_sec_offset attribute points into
SEC_OFFSET = {0x10: ".debug_line",  # stmt_list
              0x55: ".debug_rnglists", 0x74: ".debug_rnglists",  # ranges, rnglists_base
              0x02: ".debug_loclists", 0x19: ".debug_loclists", 0x38: ".debug_loclists",
              0x40: ".debug_loclists", 0x48: ".debug_loclists", 0x8C: ".debug_loclists",
              0x2137: ".debug_loclists"}  # location, string_length, data_member_location,
# frame_base, static_link, loclists_base, GNU_locviews


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
    *osz* is the offset size (4 or 8), *asz* the address size.
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
        raise SystemExit(f"DW_FORM {form:#x} is not supported")
    return int.from_bytes(buf[pos:pos + size], "little"), pos + size


def unit_length(buf: memoryview, pos: int) -> tuple[int, int]:
    """The DWARF initial length at *pos*: (size of the whole unit, offset size)."""
    (n,) = struct.unpack_from("<I", buf, pos)
    if n == 0xFFFFFFFF:
        return 12 + struct.unpack_from("<Q", buf, pos + 4)[0], 8
    return 4 + n, 4


@dataclass
class Unit:
    """A DWARF 5 compile unit header in .debug_info."""

    offset: int  # in .debug_info
    size: int  # of the whole unit, length field included
    offset_size: int
    addr_size: int
    abbrev_offset: int
    abbrev_field: int  # where the abbrev offset is stored, relative to the unit
    die: int  # the root DIE, relative to the unit


class Dwarf:
    """Just enough of a DWARF 5 reader to walk the attributes of compile units."""

    def __init__(self, elf: Elf) -> None:
        self.elf = elf
        self.info = self.section(".debug_info")
        self.abbrev = self.section(".debug_abbrev")
        self.tables: dict[int, tuple[dict[int, list[tuple[int, int]]], int]] = {}

    def section(self, name: str) -> memoryview:
        s = self.elf.section(name)
        return self.elf.data(s) if s is not None else memoryview(b"")

    def units(self) -> Iterator[Unit]:
        buf, pos = self.info, 0
        while pos < len(buf):
            size, osz = unit_length(buf, pos)
            p = pos + (4 if osz == 4 else 12)
            (version,) = struct.unpack_from("<H", buf, p)
            if version != 5 or buf[p + 2] not in (1, 3):  # DW_UT_compile, DW_UT_partial
                raise SystemExit(f"unit at {pos:#x}: only DWARF 5 compile units are supported")
            abbrev = int.from_bytes(buf[p + 4:p + 4 + osz], "little")
            yield Unit(pos, size, osz, buf[p + 3], abbrev, p + 4 - pos, p + 4 + osz - pos)
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
        """The unit's DW_AT_name: the source file of a compile unit."""
        for attr, form, _, value in self.attributes(unit, root_only=True):
            if attr == DW_AT_name:
                if form == DW_FORM_string:
                    buf, value = self.info, unit.offset + value
                else:
                    buf = self.section(".debug_str" if form == DW_FORM_strp else ".debug_line_str")
                return bytes(buf[value:value + 512]).split(b"\0")[0].decode()
        return ""


def line_header_strings(buf: bytearray, offset: int) -> Iterator[tuple[int, int, int]]:
    """(form, position, value) of each directory and file entry field in the
    DWARF 5 line program header at *offset*."""
    _, osz = unit_length(buf, offset)
    p = offset + (4 if osz == 4 else 12)
    if struct.unpack_from("<H", buf, p)[0] != 5:
        raise SystemExit(f"line program at {offset:#x}: only DWARF 5 is supported")
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
    """The parts (units with a length header) of a section that kept DWARF points
    into, copied in the order they are first asked for."""

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


def shrink_vmlinux(elf: Elf, cus: list[str]) -> dict[str, bytes | memoryview]:
    """New contents for the kept sections of a vmlinux (see the module docstring)."""
    dw = Dwarf(elf)
    info, abbrev = bytearray(), bytearray()
    abbrev_at: dict[int, int] = {}  # old table offset -> new
    info_at: dict[int, int] = {}  # old unit offset -> new
    strings = Strings(dw.section(".debug_str"))
    pieces = {name: Pieces(dw.section(name)) for name in set(SEC_OFFSET.values())}
    found: set[str] = set()
    for unit in dw.units():
        name = dw.name(unit)
        match = next((c for c in cus if name == c or name.endswith("/" + c)), None)
        if match is None:
            continue
        found.add(match)
        if unit.abbrev_offset not in abbrev_at:
            end = dw.abbrevs(unit.abbrev_offset)[1]
            abbrev_at[unit.abbrev_offset] = len(abbrev)
            abbrev += dw.abbrev[unit.abbrev_offset:end]
        data = bytearray(dw.info[unit.offset:unit.offset + unit.size])
        osz = unit.offset_size
        put(data, unit.abbrev_field, osz, abbrev_at[unit.abbrev_offset])
        for attr, form, pos, value in dw.attributes(unit):
            if form == DW_FORM_strp:
                put(data, pos, osz, strings(value))
            elif form == DW_FORM_sec_offset:
                if attr not in SEC_OFFSET:
                    raise SystemExit(f"{name}: no rule for DW_FORM_sec_offset in {attr:#x}")
                put(data, pos, osz, pieces[SEC_OFFSET[attr]](value))
        info_at[unit.offset] = len(info)
        info += data
    missing = [c for c in cus if c not in found]
    if missing:
        print(f"mkdebug: no compile unit for {', '.join(missing)}", file=sys.stderr)
    lines = pieces[".debug_line"]
    for start in lines.moved.values():
        for form, pos, value in line_header_strings(lines.out, start):
            if form == DW_FORM_strp:
                put(lines.out, pos, unit_length(lines.out, start)[1], strings(value))
    out: dict[str, bytes | memoryview] = {
        ".debug_info": info, ".debug_abbrev": abbrev, ".debug_str": strings.out,
        ".debug_aranges": rebased_aranges(dw.section(".debug_aranges"), info_at),
    }
    out.update((name, p.out) for name, p in pieces.items())
    for name in KEEP_VMLINUX + KEEP_ALLOC:
        s = elf.section(name)
        if s is not None:
            out[name] = elf.data(s)
    return {k: v for k, v in out.items() if elf.section(k) is not None}


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
    """New contents for the kept sections of a module: everything but code and data.

    Non-allocated sections stay (DWARF, their relocations, the symbol table),
    except the relocations of sections whose bytes are dropped.
    """
    out: dict[str, bytes | memoryview] = {}
    for s in elf.sections[1:]:
        if s.type == SHT_RELA and s.info:
            target = elf.sections[s.info]
            if target.flags & SHF_ALLOC and target.name not in KEEP_ALLOC:
                continue
        if not s.flags & SHF_ALLOC or s.name in KEEP_ALLOC:
            out[s.name] = elf.data(s)
    return out


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
