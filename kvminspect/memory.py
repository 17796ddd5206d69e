"""Memory access for the model: one target's reads, cached by page, bounded.

Memory is the one part that reads the target's memory for the others: whole
4 KiB pages cached for the objects read by the thousand (struct kvm_mmu_page
from its slab, struct page from the vmemmap, list nodes), uncached reads for
what must be read as it is now, bounded and cycle-safe walks of struct
list_head lists, and the problems met on the way, each owned by the VM being
read. Nothing here knows KVM's structures.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator

import drgn

from kvminspect.errors import Problem, Problems

PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
MAX_LIST = 1 << 20  # no kernel list kvminspect walks is this long
KERNEL_MIN = 0xFF00000000000000  # 5-level paging puts the direct map at 0xff11...
LIST_POISON = (0xDEAD000000000100, 0xDEAD000000000122)  # LIST_POISON1/2 (include/linux/poison.h)
_U64 = struct.Struct("<Q")


class Memory:
    """Reads of one target (a drgn Program): a page cache, list walks, problems.

    A live target starts a new Memory per reading (a new Kernel per command);
    a vmcore's lasts the session. ``on_progress`` (pages read so far) is
    called by long list walks.
    """

    def __init__(self, prog: drgn.Program) -> None:
        self.prog = prog
        self.problems = Problems()
        self.owner: int | None = None  # the VM being read (see reading())
        self.on_progress: Callable[[int], None] | None = None
        self._pages: dict[int, bytes | None] = {}  # see read_block()
        # the cached bytes of the page at a page-aligned address, None if not read
        # (or unreadable): the dict's own get, for the hot loops that inline read_block
        self.cached_page: Callable[[int], bytes | None] = self._pages.get

    def reset(self) -> None:
        """Forget the pages read_block() keeps (their data is decoded by now)."""
        self._pages.clear()

    # problems

    def problem(self, kind: str, addr: int | None, what: str) -> None:
        """Record an unreadable or inconsistent object (once), owned by the VM being read."""
        self.problems.add(Problem(kind, addr, what), self.owner)

    @contextlib.contextmanager
    def reading(self, vm_addr: int | None) -> Iterator[None]:
        """Problems met inside belong to the VM whose struct kvm is at *vm_addr*."""
        outer, self.owner = self.owner, vm_addr
        try:
            yield
        finally:
            self.owner = outer

    # uncached reads (FaultError when unreadable)

    def read(self, addr: int, size: int) -> bytes:
        """*size* bytes at *addr*, read now (no cache)."""
        return bytes(self.prog.read(addr, size))

    def read_u64(self, addr: int) -> int:
        """The u64 at *addr*, read now (no cache)."""
        return int(self.prog.read_u64(addr))

    def read_u32(self, addr: int) -> int:
        """The u32 at *addr*, read now (no cache)."""
        return int(self.prog.read_u32(addr))

    def read_u8(self, addr: int) -> int:
        """The u8 at *addr*, read now (no cache)."""
        return int(self.prog.read_u8(addr))

    def read_physical(self, addr: int, size: int) -> bytes:
        """*size* bytes at physical address *addr*, read now (no cache)."""
        return bytes(self.prog.read(addr, size, True))

    # the debug info

    def type(self, name: str) -> drgn.Type:
        """A type of the target's debug info (LookupError if it has none)."""
        return self.prog.type(name)

    def object(self, type_name: str, addr: int) -> drgn.Object:
        """A drgn Object of type *type_name* (a pointer type) with value *addr*."""
        return drgn.Object(self.prog, type_name, addr)

    def variable(self, name: str) -> drgn.Object:
        """The global variable *name* as a drgn Object (LookupError if none)."""
        return self.prog[name]

    def symbol_address(self, name: str) -> int:
        """The address of the kernel or module symbol *name* (LookupError if none)."""
        return int(self.prog.symbol(name).address)

    def global_int(self, name: str, size: int = 8) -> int | None:
        """A global by its symbol: u64, or u8 when *size* is 1; None if absent or unreadable."""
        try:
            addr = self.symbol_address(name)
            return self.read_u8(addr) if size == 1 else self.read_u64(addr)
        except (LookupError, drgn.FaultError, ValueError):
            return None

    # cached reads

    def read_block(self, addr: int, size: int) -> bytes:
        """*size* bytes at *addr* through a cache of whole 4 KiB pages.

        drgn's Program.read costs about the same for 8 bytes as for 4 KiB, and
        the objects read by the thousand sit many to a page: reading each page
        once makes a 10^5-page MMU a few thousand reads. FaultError for a page
        that cannot be read (remembered). The cache lives until reset().
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
            return int(_U64.unpack_from(data, off)[0])
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

    # lists

    def list_nodes(self, head: int, kind: str) -> Iterator[int]:
        """Addresses of the nodes of a struct list_head list, bounded and cycle-safe.

        A poisoned or non-kernel pointer, a loop, or an unreadable node ends
        the walk with a problem of *kind* naming the node.
        """
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
