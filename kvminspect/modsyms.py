"""Place a module's debug info when its section attributes are not in the dump.

drgn places a loaded module's debug file from the module's sysfs section
attributes (``struct module.sect_attrs``: a name and an address per ELF
section) and its build ID from ``notes_attrs``. The names and notes are
kmalloc'd; a dump filtered by a makedumpfile that does not know the kernel
(``makedumpfile -d 31`` of Debian 12 on 6.12: "The kernel version is not
supported") drops those slab pages, and drgn then ignores kvm.ko ("could not
read memory from kdump: Excluded page").

The module's own symbol table survives: ``mod->kallsyms`` (``struct
mod_kallsyms``, in the module's own memory) holds an ``Elf64_Sym`` per core
symbol, as kernel/module/kallsyms.c add_kallsyms() copied it after
simplify_symbols() made each ``st_value`` absolute; ``st_shndx`` is still the
section's index in the .ko. The same symbol in the .ko file has its offset in
that section, so each section's address is ``st_value - offset``, agreed on
by every symbol of the section. This module reads the .ko's ELF tables and
``mod->kallsyms`` and makes drgn's module with those section addresses.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import drgn
from drgn.helpers.linux.module import for_each_module

SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: st_name st_info st_other st_shndx st_value st_size
SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
SHT_SYMTAB = 2
SHN_LORESERVE = 0xFF00
AGREE = 0.9  # the share of a section's symbols that must agree on its address
MAX_SYMBOLS = 1 << 20  # bound on mod->kallsyms->num_symtab (a garbage count)
MAX_MODULES = 1 << 16  # bound on the modules list (one that loops)


@dataclass(frozen=True)
class KoFile:
    """What a .ko's ELF tables say: its module name (.modinfo "name=", else
    the file's name as the kernel spells it: kvm-amd.ko is kvm_amd), its
    section names by index, and each defined symbol's (section index, offset),
    names two symbols share left out."""

    path: Path
    name: str
    sections: dict[int, str]
    symbols: dict[str, tuple[int, int]]


def _cstr(data: bytes, offset: int) -> str:
    """The NUL-terminated string at *offset* of *data*."""
    end = data.find(b"\0", offset)
    return data[offset:end if end >= 0 else len(data)].decode(errors="replace")


def read_ko(path: Path) -> KoFile | None:
    """The ELF tables of the relocatable object *path* (a .ko, with or without
    debug info); None when it is not a 64-bit little-endian ELF .ko, or its
    tables are cut short or point outside it."""
    try:
        return _read_ko(path)
    except (struct.error, IndexError, KeyError, OSError):
        return None


def _read_ko(path: Path) -> KoFile | None:
    """read_ko(), which may raise on a damaged file."""
    with path.open("rb") as f:
        head = f.read(18)
    # e_ident: ELF, 64-bit, little-endian; e_type ET_REL (a .ko, not vmlinux)
    if head[:6] != b"\x7fELF\x02\x01" or head[16:18] != b"\x01\x00":
        return None
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize != SHDR.size or shoff + shnum * SHDR.size > len(data):
        return None
    headers = [SHDR.unpack_from(data, shoff + i * SHDR.size) for i in range(shnum)]
    strtab_of_names = headers[shstrndx]
    names = data[strtab_of_names[4]:strtab_of_names[4] + strtab_of_names[5]]
    sections = {i: _cstr(names, h[0]) for i, h in enumerate(headers)}
    modinfo = next((data[h[4]:h[4] + h[5]] for i, h in enumerate(headers)
                    if sections[i] == ".modinfo"), b"")
    name = next((f[5:].decode(errors="replace") for f in modinfo.split(b"\0")
                 if f.startswith(b"name=")), "")
    if not name and path.name.split(".")[1:2] == ["ko"]:  # a debug file: .modinfo is NOBITS
        name = path.name.split(".")[0].replace("-", "_")
    symbols: dict[str, tuple[int, int]] = {}
    twice: set[str] = set()  # a name two symbols have (static functions of two files)
    for h in headers:
        if h[1] != SHT_SYMTAB:
            continue
        strs = headers[h[6]]  # sh_link: its string table
        strtab = data[strs[4]:strs[4] + strs[5]]
        for k in range(h[5] // SYM.size):
            st_name, _, _, shndx, value, _ = SYM.unpack_from(data, h[4] + k * SYM.size)
            if st_name and 0 < shndx < SHN_LORESERVE:
                sym = _cstr(strtab, st_name)
                if sym in symbols:
                    twice.add(sym)
                symbols[sym] = (shndx, value)
    for sym in twice:
        del symbols[sym]
    return KoFile(path, name, sections, symbols) if name else None


def kallsyms(mod: drgn.Object) -> list[tuple[str, int, int]]:
    """(name, st_shndx, st_value) of each symbol of ``mod->kallsyms`` (struct
    mod_kallsyms: symtab, num_symtab, strtab), read as blocks."""
    prog = mod.prog_
    ks = mod.kallsyms if mod.type_.type.has_member("kallsyms") else mod.core_kallsyms.address_of_()
    n = int(ks.num_symtab)
    if not 0 < n <= MAX_SYMBOLS:
        return []
    raw = prog.read(int(ks.symtab), n * SYM.size)
    syms = [SYM.unpack_from(raw, k * SYM.size) for k in range(n)]
    top = max(s[0] for s in syms)
    strtab = prog.read(int(ks.strtab), top + 512)  # the last name ends within 512 bytes
    return [(_cstr(strtab, s[0]), s[3], s[4]) for s in syms if s[0]]


def section_addresses(mod: drgn.Object, ko: KoFile) -> dict[str, int]:
    """Each section of *ko* that has a core symbol in ``mod->kallsyms``: the
    address most of its symbols agree on; {} when *ko* is not the module's
    file (fewer than AGREE of all symbols agree with memory)."""
    votes: dict[int, Counter[int]] = {}
    for name, shndx, value in kallsyms(mod):
        found = ko.symbols.get(name)
        if found is not None and found[0] == shndx:
            votes.setdefault(shndx, Counter())[value - found[1]] += 1
    out = {ko.sections[shndx]: counter.most_common(1)[0][0] for shndx, counter in votes.items()}
    agreeing = sum(counter.most_common(1)[0][1] for counter in votes.values())
    total = sum(sum(counter.values()) for counter in votes.values())
    return out if total and agreeing >= AGREE * total else {}


def core_range(mod: drgn.Object) -> tuple[int, int]:
    """The module's core text as [start, end): ``mod->mem[MOD_TEXT]`` (6.4+),
    else ``mod->core_layout``, else ``module_core``/``core_size`` (before 4.5)."""
    t = mod.type_.type
    if t.has_member("mem"):  # 6.4 ac3b43283923: struct module_memory mem[MOD_MEM_NUM_TYPES]
        base, size = int(mod.mem[0].base), int(mod.mem[0].size)
    elif t.has_member("core_layout"):  # 4.5 7523e4dc5057: struct module_layout
        base, size = int(mod.core_layout.base), int(mod.core_layout.size)
    else:
        base, size = int(mod.module_core), int(mod.core_size)
    return base, base + size


def listed_modules(prog: drgn.Program) -> list[tuple[str, drgn.Object]]:
    """(name, struct module *) of each module on the kernel's ``modules`` list,
    as far as it is readable: a module whose name is not in the dump is left
    out, an unreadable or looping list ends the walk (at MAX_MODULES)."""
    out: list[tuple[str, drgn.Object]] = []
    try:
        for mod in for_each_module(prog):
            if len(out) >= MAX_MODULES:
                break
            try:
                out.append((mod.name.string_().decode(errors="replace"), mod))
            except drgn.FaultError:
                continue
    except (drgn.FaultError, LookupError, ValueError):
        pass
    return out


def place_modules(prog: drgn.Program, names: tuple[str, ...], files: list[Path]
                  ) -> list[drgn.RelocatableModule]:
    """For each module of *names* on the kernel's ``modules`` list that drgn
    did not load (its sect_attrs or notes not in the dump), the drgn module
    made from its kallsyms and the matching .ko of *files*, its debug info
    loaded; the modules made."""
    loaded = {m.name for m in prog.modules()}
    kos: list[KoFile] | None = None  # read only when a module needs placing
    made = []
    for name, mod in listed_modules(prog):
        if name not in names or name in loaded:
            continue
        if kos is None:
            kos = [ko for p in files if (ko := read_ko(p)) is not None]
        for ko in (k for k in kos if k.name == name):
            addresses = section_addresses(mod, ko)
            if not addresses:
                continue
            module = prog.relocatable_module(name, mod.value_(), create=True)
            module.object = mod
            module.address_range = core_range(mod)
            for section, address in addresses.items():
                module.section_addresses[section] = address
            module.try_file(str(ko.path), force=True)
            made.append(module)
            break
    return made
