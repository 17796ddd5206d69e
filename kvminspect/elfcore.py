"""The ELF core format kvminspect writes and reads, drgn-free: x86-64 only.

Headers (include/uapi/linux/elf.h): Elf64_Ehdr, Elf64_Phdr, Elf64_Shdr (only
section 0, which holds the program header count when it does not fit in
e_phnum: PN_XNUM), Elf64_Nhdr notes with 4-byte padding as the kernel's
own vmcore notes have them (fs/proc/vmcore.c, kernel/crash_core.c
append_elf_note()).

NT_PRSTATUS (include/linux/elfcore.h): struct elf_prstatus is struct
elf_prstatus_common (pr_info: three ints; pr_cursig: a short; pr_sigpend,
pr_sighold: unsigned longs; pr_pid, pr_ppid, pr_pgrp, pr_sid: pid_t; four
struct __kernel_old_timeval of two longs), 112 bytes on x86-64, then
pr_reg (elf_gregset_t) and int pr_fpvalid: 336 bytes with the tail padding.
On x86-64 elf_gregset_t is struct user_regs_struct
(arch/x86/include/asm/user_64.h; arch/x86/include/asm/elf.h: ELF_NGREG is
its size in unsigned longs): 27 unsigned longs in USER_REGS order. QEMU's
dump-guest-memory writes the same 336 bytes (target/i386/arch_dump.c,
x86_64_elf_prstatus: pid at 32, regs at 112).

VMCOREINFO: the note a Linux kernel keeps for kdump (kernel/crash_core.c,
kernel/vmcore_info.c from 6.9): update_vmcoreinfo_note() writes, into
vmcoreinfo_note, one Elf64_Nhdr named "VMCOREINFO" (VMCOREINFO_NOTE_NAME,
type 0) whose descriptor is the text of vmcoreinfo_data, "KEY=value" lines
opening with "OSRELEASE=" (VMCOREINFO_OSRELEASE is the first line
crash_save_vmcoreinfo_init() appends). vmcoreinfo_note comes from
alloc_pages_exact() since "kexec: move vmcoreinfo out of the kernel's .bss
section" (4.15, 1229384f5b85): it starts a page.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

PAGE_SIZE = 4096

# include/uapi/linux/elf.h
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF  # e_phnum when the count is in section 0's sh_info
NT_PRSTATUS = 1
EHDR_SIZE = 64  # sizeof(Elf64_Ehdr)
PHDR_SIZE = 56  # sizeof(Elf64_Phdr)
SHDR_SIZE = 64  # sizeof(Elf64_Shdr)
NHDR_SIZE = 12  # sizeof(Elf64_Nhdr): n_namesz, n_descsz, n_type
NOTE_ALIGN = 4

CORE_NAME = b"CORE"  # the owner of NT_PRSTATUS notes
VMCOREINFO_NAME = b"VMCOREINFO"  # VMCOREINFO_NOTE_NAME
VMCOREINFO_MAX = 2 * PAGE_SIZE  # VMCOREINFO_BYTES is one page; a larger descsz is no note

# struct user_regs_struct (arch/x86/include/asm/user_64.h), in order; kvminspect's
# names: rflags is "flags" there, rbp "bp", and so on
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
             "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss",
             "fs_base", "gs_base", "ds", "es", "fs", "gs")
PRSTATUS_PID = 32  # offsetof(struct elf_prstatus, common.pr_pid)
PRSTATUS_REG = 112  # offsetof(struct elf_prstatus, pr_reg)
PRSTATUS_SIZE = 336  # sizeof(struct elf_prstatus) on x86-64
_U64 = 0xFFFFFFFFFFFFFFFF


def _pad(n: int, align: int = NOTE_ALIGN) -> int:
    return (n + align - 1) & ~(align - 1)


def ehdr(phnum: int, shoff: int = 0) -> bytes:
    """The Elf64_Ehdr of an x86-64 ET_CORE file whose program headers follow it;
    *phnum* PN_XNUM or more goes to section 0 (shdr0()), which *shoff* locates."""
    ident = b"\x7fELF" + bytes((ELFCLASS64, ELFDATA2LSB, EV_CURRENT)) + bytes(9)
    xnum = phnum >= PN_XNUM
    return ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, EM_X86_64, EV_CURRENT, 0,
                               EHDR_SIZE, shoff if xnum else 0, 0, EHDR_SIZE, PHDR_SIZE,
                               PN_XNUM if xnum else phnum, SHDR_SIZE if xnum else 0,
                               1 if xnum else 0, 0)


def shdr0(phnum: int) -> bytes:
    """Section header 0 (SHN_UNDEF) carrying the real program header count in sh_info."""
    return struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)


def headers_size(phnum: int) -> int:
    """Bytes the ELF header, *phnum* program headers and (PN_XNUM) section 0 take."""
    return EHDR_SIZE + PHDR_SIZE * phnum + (SHDR_SIZE if phnum >= PN_XNUM else 0)


def phdr(p_type: int, offset: int, paddr: int, size: int, *, vaddr: int = 0,
         flags: int = PF_R, align: int = 0) -> bytes:
    """One Elf64_Phdr (p_filesz = p_memsz = *size*: every byte is in the file)."""
    return struct.pack("<IIQQQQQQ", p_type, flags, offset, vaddr, paddr, size, size, align)


def note(name: bytes, n_type: int, desc: bytes) -> bytes:
    """One Elf64_Nhdr note: the name NUL-terminated, name and descriptor padded to 4."""
    n = name + b"\0"
    return (struct.pack("<III", len(n), len(desc), n_type) + n.ljust(_pad(len(n)), b"\0")
            + desc.ljust(_pad(len(desc)), b"\0"))


def prstatus(regs: Mapping[str, int], pid: int = 0) -> bytes:
    """struct elf_prstatus with pr_reg from *regs* (USER_REGS names; a missing one
    is 0) and pr_pid *pid*; everything else 0."""
    out = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<i", out, PRSTATUS_PID, pid)
    struct.pack_into("<27Q", out, PRSTATUS_REG, *(regs.get(r, 0) & _U64 for r in USER_REGS))
    return bytes(out)


def prstatus_regs(desc: bytes) -> dict[str, int]:
    """pr_reg of one NT_PRSTATUS descriptor, by USER_REGS name."""
    return dict(zip(USER_REGS, struct.unpack_from("<27Q", desc, PRSTATUS_REG), strict=True))


def notes_of(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name without its NUL, type, descriptor) of each note in a PT_NOTE's bytes."""
    out = []
    off = 0
    while off + NHDR_SIZE <= len(data):
        namesz, descsz, n_type = struct.unpack_from("<III", data, off)
        name_at = off + NHDR_SIZE
        desc_at = name_at + _pad(namesz)
        if desc_at + descsz > len(data):
            break
        out.append((data[name_at:name_at + namesz].rstrip(b"\0"), n_type,
                    data[desc_at:desc_at + descsz]))
        off = desc_at + _pad(descsz)
    return out


# the Elf64_Nhdr and name a VMCOREINFO note opens with, but for n_descsz
_VMCOREINFO_NAMESZ = len(VMCOREINFO_NAME) + 1
VMCOREINFO_HEAD = NHDR_SIZE + _pad(_VMCOREINFO_NAMESZ)  # where its descriptor starts: 24


def vmcoreinfo_descsz(head: bytes) -> int | None:
    """n_descsz when *head* (at least VMCOREINFO_HEAD bytes) opens a VMCOREINFO note
    (update_vmcoreinfo_note()'s header: name "VMCOREINFO", type 0), else None."""
    if len(head) < VMCOREINFO_HEAD:
        return None
    namesz, descsz, n_type = struct.unpack_from("<III", head, 0)
    if (namesz != _VMCOREINFO_NAMESZ or n_type != 0 or not 0 < descsz <= VMCOREINFO_MAX
            or head[NHDR_SIZE:NHDR_SIZE + namesz] != VMCOREINFO_NAME + b"\0"):
        return None
    return int(descsz)


def parse_vmcoreinfo(desc: bytes) -> dict[str, str] | None:
    """The KEY=value lines of a VMCOREINFO descriptor; None unless it opens with
    OSRELEASE= (what the kernel writes first, and what drgn requires)."""
    text = desc.split(b"\0", 1)[0]
    if not text.startswith(b"OSRELEASE="):
        return None
    out: dict[str, str] = {}
    for line in text.decode(errors="replace").splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out.setdefault(key, value)
    return out
