"""A guest's physical memory and vCPUs from a host dump: an ELF core of the guest.

What a guest's memory is, to KVM: its memslots (address space 0; 1 is
System Management Mode's), each gfn at the VMM's address
``userspace_addr + (gfn - base_gfn) * PAGE_SIZE`` (__gfn_to_hva_memslot()),
backed by whatever page the VMM's page tables map there (follow_pfn(): the
same host page KVM's hva_to_pfn() would get). KVM's internal memslots
(APIC access page, identity page table, TSS: ids from KVM_USER_MEM_SLOTS)
are not the guest's RAM and are left out.

A guest page is in the written core when the VMM maps a host page at its
address and the host dump holds that page by its own table (the CorePages
part: ELF p_filesz or the kdump bitmap, never a read that succeeds). Every
other page is a hole, never zeros: not mapped by the VMM (never touched,
swapped out, or the VMM's page tables are not in the dump), or not in the
dump (makedumpfile -d 31 drops the VMM's memory: user pages).

The core (kvminspect.elfcore) is what QEMU's dump-guest-memory writes
without paging: ET_CORE for x86-64, one PT_LOAD per run of consecutive
guest pages present (p_paddr the guest physical address, p_vaddr 0), one
PT_NOTE with an NT_PRSTATUS per vCPU in vcpu_idx order (drgn takes the n-th
NT_PRSTATUS of a Linux kernel core as CPU n's registers) from the registers
KVM saved (the Registers part), and, when the guest is Linux, its own
VMCOREINFO note, found in guest memory as its kernel keeps it for kdump
(a page starting with an Elf64_Nhdr named "VMCOREINFO" whose text opens
with OSRELEASE=, kvminspect.elfcore). With it drgn treats the core as the
guest kernel's vmcore and walks the guest's page tables from its
swapper_pg_dir. The file is written in one pass: the pages, then the notes,
then the headers in front.
"""

from __future__ import annotations

import array
import bisect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO

import drgn

from kvminspect import elfcore
from kvminspect.errors import KvminspectError
from kvminspect.model import Kernel
from kvminspect.objects import VM, Memslot, VCpu
from kvminspect.read_core import CoreKind
from kvminspect.read_regs import SavedRegs
from kvminspect.spte import PAGE_SHIFT

PAGE_SIZE = 1 << PAGE_SHIFT
BATCH = 256  # pages read at once where their host pages are consecutive (1 MiB)
SMM_AS = 1  # address space 1: System Management Mode (KVM_ADDRESS_SPACE_NUM 2)
# what keeps the VMM's memory in a dump (makedumpfile's dump level bits: 8 user pages,
# 2 and 4 cache pages, which a shmem- or memfd-backed VMM's RAM is)
KEEP_VMM_MEMORY = "makedumpfile -d 31 drops it (user and cache pages); -d 17 keeps it"


class Why(Enum):
    """Why a guest page is a hole in the core."""

    UNMAPPED = "not mapped by the VMM"  # follow_pfn(): no present PTE at its address
    UNWALKABLE = "the VMM's page tables cannot be walked"
    NO_MM = "the VMM has no address space (kvm->mm)"
    NOT_DUMPED = "not in the dump"  # the host page is not in the core's table


@dataclass(frozen=True)
class Run:
    """Consecutive guest frames from *gfn*, each in the dump at host page *pfns[i]*
    (an array of u64: 8 bytes a page, for guests of many GiB)."""

    gfn: int
    pfns: array.array[int]

    @property
    def gpa(self) -> int:
        return self.gfn << PAGE_SHIFT

    @property
    def size(self) -> int:
        return len(self.pfns) << PAGE_SHIFT


@dataclass(frozen=True)
class Hole:
    """Guest frames [start, end) not in the core, and why."""

    start: int
    end: int
    why: Why

    @property
    def pages(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class GuestFrames:
    """Where each guest frame of one address space is in the host dump."""

    as_id: int
    memslots: tuple[Memslot, ...]
    runs: tuple[Run, ...]
    holes: tuple[Hole, ...]
    kind: CoreKind  # what host page presence was read from

    @property
    def pages(self) -> int:
        """Guest pages the dump holds."""
        return sum(len(r.pfns) for r in self.runs)

    @property
    def hole_pages(self) -> int:
        return sum(h.pages for h in self.holes)

    def holes_by_why(self) -> dict[Why, int]:
        """Hole pages per reason, in Why's order (reasons with none left out)."""
        out = {w: 0 for w in Why}
        for h in self.holes:
            out[h.why] += h.pages
        return {w: n for w, n in out.items() if n}


class NoGuestMemory(KvminspectError):
    """No page of the guest is in the dump (exit status 1)."""

    def __init__(self, message: str, frames: GuestFrames) -> None:
        super().__init__(message)
        self.frames = frames


def guest_memslots(k: Kernel, vm: VM, as_id: int) -> tuple[Memslot, ...]:
    """The guest's memslots of address space *as_id*, by base gfn: user memslots
    only (ids below KVM_USER_MEM_SLOTS)."""
    limit = k.vm_reader.user_memslots()
    return tuple(sorted((s for s in vm.memslots if s.as_id == as_id and s.id < limit),
                        key=lambda s: s.base_gfn))


def guest_frames(k: Kernel, vm: VM, as_id: int = 0,
                 on_progress: Callable[[int, int], None] | None = None) -> GuestFrames:
    """Each guest frame of *vm*'s address space *as_id*: its host page, or why it
    is a hole. *on_progress* (frames done, total) is called every 4096 frames."""
    try:
        kind = k.core_kind()
    except (OSError, ValueError) as e:
        raise KvminspectError(f"cannot tell which host pages the dump holds ({e})") from None
    slots = guest_memslots(k, vm, as_id)
    mm = k.vm_reader.vmm_mm(vm)
    total = sum(s.npages for s in slots)
    runs: list[Run] = []
    holes: list[Hole] = []
    run_gfn, run_pfns = -1, array.array("Q")  # the run being built
    done = 0

    def close_run() -> None:
        nonlocal run_pfns
        if run_pfns:
            runs.append(Run(run_gfn, run_pfns))
            run_pfns = array.array("Q")

    def hole(gfn: int, why: Why) -> None:
        close_run()
        last = holes[-1] if holes else None
        if last is not None and last.end == gfn and last.why is why:
            holes[-1] = Hole(last.start, gfn + 1, why)
        else:
            holes.append(Hole(gfn, gfn + 1, why))

    for s in slots:
        for i in range(s.npages):
            gfn = s.base_gfn + i
            done += 1
            if on_progress is not None and done % 4096 == 0:
                on_progress(done, total)
            if mm is None:
                hole(gfn, Why.NO_MM)
                continue
            try:
                pfn = k.vm_reader.hva_to_pfn(mm, s.userspace_addr + (i << PAGE_SHIFT))
            except drgn.FaultError:
                hole(gfn, Why.UNMAPPED)
                continue
            except (LookupError, ValueError, NotImplementedError):
                hole(gfn, Why.UNWALKABLE)
                continue
            if not k.host_page_present(pfn):
                hole(gfn, Why.NOT_DUMPED)
                continue
            if not run_pfns or gfn != run_gfn + len(run_pfns):
                close_run()
                run_gfn = gfn
            run_pfns.append(pfn)
    close_run()
    return GuestFrames(as_id, slots, tuple(runs), tuple(holes), kind)


def no_memory_message(vm: VM, frames: GuestFrames) -> str:
    """The one line that says a guest has no page in the dump, and why."""
    if not frames.memslots:
        return f"VM {vm.index} has no memslot in address space {frames.as_id}"
    why = ", ".join(f"{n} {w.value}" for w, n in frames.holes_by_why().items())
    hint = f" ({KEEP_VMM_MEMORY})" if Why.NOT_DUMPED in frames.holes_by_why() else ""
    return (f"VM {vm.index}: none of its {frames.hole_pages} guest pages (address space "
            f"{frames.as_id}) is in the dump: {why}{hint}")


def batches(run: Run, limit: int = BATCH) -> Iterator[tuple[int, int, int]]:
    """(gfn, host pfn, pages) of *run* in pieces whose host pages are consecutive."""
    start = 0
    pfns = run.pfns
    while start < len(pfns):
        n = 1
        while start + n < len(pfns) and n < limit and pfns[start + n] == pfns[start] + n:
            n += 1
        yield run.gfn + start, pfns[start], n
        start += n


class GuestMemory:
    """Guest physical reads through the host pages *frames* names (present pages only:
    an absent one is a drgn.FaultError at its guest physical address)."""

    def __init__(self, k: Kernel, frames: GuestFrames) -> None:
        self.k = k
        self.runs = frames.runs
        self.starts = [r.gfn for r in frames.runs]  # sorted: runs are in gfn order

    def pfn(self, gfn: int) -> int | None:
        """The host page of guest frame *gfn*, None for a hole."""
        i = bisect.bisect_right(self.starts, gfn) - 1
        if i < 0 or gfn - self.starts[i] >= len(self.runs[i].pfns):
            return None
        return self.runs[i].pfns[gfn - self.starts[i]]

    def read(self, gpa: int, size: int) -> bytes:
        """*size* bytes at guest physical *gpa*, page by page, consecutive host pages
        read at once."""
        out = []
        addr, end = gpa, gpa + size
        while addr < end:
            gfn = addr >> PAGE_SHIFT
            pfn = self.pfn(gfn)
            if pfn is None:
                raise drgn.FaultError("guest page not in the dump", addr)
            n = 1  # pages after this one that follow it on the host too
            while ((gfn + n) << PAGE_SHIFT) < end and self.pfn(gfn + n) == pfn + n:
                n += 1
            stop = min(end, (gfn + n) << PAGE_SHIFT)
            out.append(self.k.memory.read_physical((pfn << PAGE_SHIFT) + (addr & 0xFFF),
                                                   stop - addr))
            addr = stop
        return b"".join(out)


@dataclass(frozen=True)
class VmcoreInfo:
    """A Linux guest kernel's VMCOREINFO note, found at guest physical *gpa*."""

    gpa: int
    desc: bytes  # the note's text (its descriptor)
    fields: dict[str, str]

    @property
    def release(self) -> str | None:
        return self.fields.get("OSRELEASE")

    @property
    def build_id(self) -> str | None:
        return self.fields.get("BUILD-ID")


def vmcoreinfo_at(memory: GuestMemory, gpa: int, head: bytes) -> VmcoreInfo | None:
    """The VMCOREINFO note at page-aligned *gpa*, whose first bytes are *head*."""
    descsz = elfcore.vmcoreinfo_descsz(head)
    if descsz is None:
        return None
    try:
        desc = memory.read(gpa + elfcore.VMCOREINFO_HEAD, descsz)
    except drgn.FaultError:
        return None
    fields = elfcore.parse_vmcoreinfo(desc)
    return None if fields is None else VmcoreInfo(gpa, desc.split(b"\0", 1)[0], fields)


@dataclass(frozen=True)
class VmcoreInfoScan:
    """The guest pages searched for a VMCOREINFO note: the first one found, and the
    guest physical addresses of every one found."""

    found: VmcoreInfo | None
    at: tuple[int, ...]
    pages: int


class _Scanner:
    """Page starts checked for a VMCOREINFO note, in guest physical order."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.found: VmcoreInfo | None = None
        self.at: list[int] = []
        self.pages = 0

    def pages_of(self, gfn: int, data: bytes) -> None:
        for off in range(0, len(data), PAGE_SIZE):
            self.pages += 1
            head = data[off:off + elfcore.VMCOREINFO_HEAD]
            if head[:4] != b"\x0b\0\0\0":  # n_namesz 11: most pages stop here
                continue
            info = vmcoreinfo_at(self.memory, (gfn << PAGE_SHIFT) + off, head)
            if info is not None:
                self.at.append(info.gpa)
                self.found = self.found or info

    def result(self) -> VmcoreInfoScan:
        return VmcoreInfoScan(self.found, tuple(self.at), self.pages)


def find_vmcoreinfo(k: Kernel, frames: GuestFrames, memory: GuestMemory) -> VmcoreInfoScan:
    """Every present guest page's start checked for a VMCOREINFO note."""
    scan = _Scanner(memory)
    for run in frames.runs:
        for gfn, pfn, n in batches(run):
            try:
                data = k.memory.read_physical(pfn << PAGE_SHIFT, n << PAGE_SHIFT)
            except drgn.FaultError:
                continue
            scan.pages_of(gfn, data)
    return scan.result()


@dataclass(frozen=True)
class VcpuRegs:
    """One vCPU's NT_PRSTATUS: its registers, or None when they could not be read
    (its note then holds zeros)."""

    vcpu: VCpu
    regs: SavedRegs | None


@dataclass(frozen=True)
class GuestCore:
    """What guest-core wrote."""

    path: str
    size: int
    frames: GuestFrames
    vmcoreinfo: VmcoreInfoScan
    vcpus: tuple[VcpuRegs, ...]
    zeroed: tuple[int, ...]  # gfns the table listed but a read failed: written as zeros


def vcpu_registers(k: Kernel, vm: VM) -> tuple[VcpuRegs, ...]:
    """Each vCPU of *vm* in vcpu_idx order with the registers KVM saved."""
    return tuple(VcpuRegs(v, k.saved_registers(v))
                 for v in sorted(k.vcpus(vm), key=lambda v: v.vcpu_idx))


def prstatus_notes(vcpus: tuple[VcpuRegs, ...]) -> bytes:
    """An NT_PRSTATUS note per vCPU, in order; registers the dump lacks are 0. pr_pid
    is the vCPU's index + 1, as QEMU's dump-guest-memory writes it (KVM does not know
    which guest task runs on a vCPU): drgn shows a guest that is not Linux as one
    thread per vCPU, tid vcpu_idx + 1."""
    return b"".join(elfcore.note(elfcore.CORE_NAME, elfcore.NT_PRSTATUS,
                                 elfcore.prstatus(v.regs.values if v.regs else {},
                                                  pid=max(v.vcpu.vcpu_idx, i) + 1))
                    for i, v in enumerate(vcpus))


def write_guest_core(k: Kernel, vm: VM, path: str, as_id: int = 0,
                     on_progress: Callable[[int, int], None] | None = None) -> GuestCore:
    """Write *vm*'s guest physical memory (address space *as_id*) and vCPU registers
    to a new ELF core at *path*. KvminspectError when *path* exists (never
    overwritten) and NoGuestMemory when no guest page is in the dump (no file is
    made); a failed write removes the file. *on_progress*: (pages done, total)."""
    if os.path.lexists(path):
        raise KvminspectError(f"{path}: already exists (guest-core never overwrites a file)")
    frames = guest_frames(k, vm, as_id)
    if frames.pages == 0:
        raise NoGuestMemory(no_memory_message(vm, frames), frames)
    vcpus = vcpu_registers(k, vm)
    try:
        f = open(path, "xb")  # noqa: SIM115 (closed below, removed on failure)
    except FileExistsError:
        raise KvminspectError(f"{path}: already exists (guest-core never overwrites a "
                              "file)") from None
    except OSError as e:
        raise KvminspectError(f"{path}: cannot create it ({e.strerror or e})") from None
    try:
        with f:
            scan, zeroed = write_frames(f, k, frames, vcpus, on_progress)
            size = f.tell()
    except BaseException:
        os.unlink(path)
        raise
    return GuestCore(path, size, frames, scan, vcpus, zeroed)


def write_frames(f: BinaryIO, k: Kernel, frames: GuestFrames, vcpus: tuple[VcpuRegs, ...],
                 on_progress: Callable[[int, int], None] | None = None
                 ) -> tuple[VmcoreInfoScan, tuple[int, ...]]:
    """The ELF core of *frames* and *vcpus* into *f* (seekable, empty): the pages
    first (after room for the headers), then the notes, then the headers in front.
    Returns the VMCOREINFO scan of the pages written and the gfns written as zeros."""
    phnum = 1 + len(frames.runs)
    data_at = -(-elfcore.headers_size(phnum) // PAGE_SIZE) * PAGE_SIZE
    f.write(bytes(data_at))
    memory = GuestMemory(k, frames)
    scan = _Scanner(memory)
    zeroed: list[int] = []
    offsets = []
    done, total = 0, frames.pages
    for run in frames.runs:
        offsets.append(f.tell())
        for gfn, pfn, n in batches(run):
            try:
                data = k.memory.read_physical(pfn << PAGE_SHIFT, n << PAGE_SHIFT)
            except drgn.FaultError:
                data = _page_by_page(k, gfn, pfn, n, zeroed)
            scan.pages_of(gfn, data)
            f.write(data)
            done += n
            if on_progress is not None:
                on_progress(done, total)
    found = scan.result()
    notes = prstatus_notes(vcpus)
    if found.found is not None:
        notes += elfcore.note(elfcore.VMCOREINFO_NAME, 0, found.found.desc)
    note_at = f.tell()
    f.write(notes)
    f.seek(0)
    head = [elfcore.phdr(elfcore.PT_NOTE, note_at, 0, len(notes), align=elfcore.NOTE_ALIGN)]
    head += [elfcore.phdr(elfcore.PT_LOAD, off, run.gpa, run.size, align=PAGE_SIZE,
                          flags=elfcore.PF_R | elfcore.PF_W | elfcore.PF_X)
             for off, run in zip(offsets, frames.runs, strict=True)]
    table_end = elfcore.EHDR_SIZE + elfcore.PHDR_SIZE * phnum
    f.write(elfcore.ehdr(phnum, shoff=table_end) + b"".join(head))
    if phnum >= elfcore.PN_XNUM:
        f.write(elfcore.shdr0(phnum))
    f.seek(0, os.SEEK_END)
    return found, tuple(zeroed)


def _page_by_page(k: Kernel, gfn: int, pfn: int, n: int, zeroed: list[int]) -> bytes:
    """A batch read again one page at a time: a page the table lists but that cannot
    be read is written as zeros (and named)."""
    out = []
    for i in range(n):
        try:
            out.append(k.memory.read_physical((pfn + i) << PAGE_SHIFT, PAGE_SIZE))
        except drgn.FaultError:
            zeroed.append(gfn + i)
            out.append(bytes(PAGE_SIZE))
    return b"".join(out)


def gfn_ranges(gfns: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """Sorted gfns as [start, end) ranges."""
    out: list[tuple[int, int]] = []
    for g in sorted(gfns):
        if out and out[-1][1] == g:
            out[-1] = (out[-1][0], g + 1)
        else:
            out.append((g, g + 1))
    return out
