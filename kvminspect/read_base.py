"""The common part of the kernel readers: the program, its layout, problems, lists."""

from __future__ import annotations

import array
import contextlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import drgn

from kvminspect import spte
from kvminspect.errors import Problem, Problems
from kvminspect.layout import (
    UNKNOWN,
    Layout,
    MissingMember,
    probe,
)
from kvminspect.objects import (
    KERNEL_MIN,
    LIST_POISON,
    MAX_LIST,
    VM,
    Int,
    Role,
    ShadowPage,
    VCpu,
)

PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
_U64 = struct.Struct("<Q")


class KernelBase:
    """What every reader shares: the target, its probed layout, the caches, the
    problems met (each owned by the VM being read) and bounded list walks."""

    def __init__(self, prog: drgn.Program, release: str | None = None,
                 layout: Layout | None = None) -> None:
        self.prog = prog
        self.layout: Layout = layout if layout is not None else probe(prog, release)
        self.problems = Problems()
        self.owner: int | None = None  # the VM being read (see reading())
        self._sp_cache: dict[int, ShadowPage | None] = {}
        self._spt_cache: dict[int, array.array | None] = {}
        self._vms: list[VM] | None = None
        self._tdp_quirk: bool | None = None
        self._spte_format: spte.SpteFormat | None = None
        self._spte_masks: spte.SpteMasks | None = None
        self._role_widths = ({f.name: f.width for f in self.layout.sp.role_fields}
                             if self.layout.sp else {})
        self._vcpus: dict[int, list[VCpu]] = {}
        self._mmu_offsets: tuple[int, ...] | None = None
        self._pages: dict[int, bytes | None] = {}  # see read_block()
        self._roles: dict[int, Role] = {}  # one Role per distinct role word
        self._by_spt: dict[int, int] = {}  # pfn of sp->spt -> sp, of decoded pages
        self.on_progress: Callable[[int], None] | None = None  # pages read so far
        self._sp_decoder: Any = None  # read_pages.SpDecoder, made on first use

    @property
    def missing(self) -> tuple[MissingMember, ...]:
        """Members the model reads that this kernel lacks (shown as unknown)."""
        return self.layout.missing

    def value(self, obj: drgn.Object, struct: str, member: str) -> Int:
        """obj.member's integer value, or UNKNOWN when *struct* lacks *member*."""
        if self.layout.lacks(struct, member):
            return UNKNOWN
        return obj.member_(member).value_()

    def problem(self, kind: str, addr: int | None, what: str) -> None:
        """Record an unreadable or inconsistent object (once)."""
        self.problems.add(Problem(kind, addr, what), self.owner)

    @contextlib.contextmanager
    def reading(self, vm: VM | int | None) -> Iterator[None]:
        """Problems met inside belong to *vm* (a VM or its struct kvm address)."""
        outer, self.owner = self.owner, (vm.addr if isinstance(vm, VM) else vm)
        try:
            yield
        finally:
            self.owner = outer

    def read_block(self, addr: int, size: int) -> bytes:
        """*size* bytes at *addr* through a cache of whole 4 KiB pages.

        drgn's Program.read costs about the same for 8 bytes as for 4 KiB, and
        the objects read by the thousand (struct kvm_mmu_page from its slab,
        struct page from the vmemmap, list nodes) sit many to a page: reading
        each page once makes a 10^5-page MMU a few thousand reads. FaultError
        for a page that cannot be read (remembered). The cache lives as long
        as the reading (a live target starts a new Kernel per command) and is
        dropped by drop_blocks().
        """
        page = addr & ~PAGE_MASK
        end = addr + size
        if end <= page + PAGE_SIZE:
            data = self._pages.get(page) or self._page(page)
            return data[addr - page:end - page]
        return b"".join(self._page(p)[max(addr - p, 0):min(end - p, PAGE_SIZE)]
                        for p in range(page, end, PAGE_SIZE))

    def read_word(self, addr: int) -> int:
        """The u64 at *addr* (read_block's cache; FaultError if unreadable)."""
        page = addr & ~PAGE_MASK
        off = addr - page
        data = self._pages.get(page)
        if data is not None and off <= PAGE_SIZE - 8:
            return _U64.unpack_from(data, off)[0]
        return int.from_bytes(self.read_block(addr, 8), "little")

    def _page(self, page: int) -> bytes:
        """The 4 KiB page at *page* (cached, also when unreadable)."""
        try:
            data = self._pages[page]
        except KeyError:
            try:
                data = self.prog.read(page, PAGE_SIZE)
            except drgn.FaultError:
                data = None
            self._pages[page] = data
        if data is None:
            raise drgn.FaultError("could not read memory", page)
        return data

    def drop_blocks(self) -> None:
        """Forget the pages read_block() keeps (their data is decoded by now)."""
        self._pages.clear()

    def list_nodes(self, head: int, kind: str) -> Iterator[int]:
        """Addresses of the nodes of a struct list_head list, bounded and cycle-safe."""
        seen = {head}
        try:
            node = self.read_word(head)
        except drgn.FaultError as e:
            self.problem(kind, head, f"list head unreadable ({e})")
            return
        if node == 0:  # never initialised (e.g. the TDP MMU lists of a shadow VM)
            return
        while node != head:
            if node in LIST_POISON or node < KERNEL_MIN:
                self.problem(kind, node, "list pointer is poisoned or not a kernel address")
                return
            if node in seen or len(seen) > MAX_LIST:
                self.problem(kind, head, f"list loops at {node:#x}")
                return
            seen.add(node)
            yield node
            try:
                node = self.read_word(node)
            except drgn.FaultError as e:
                self.problem(kind, node, f"list node unreadable ({e})")
                return
