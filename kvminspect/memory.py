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
from typing import TYPE_CHECKING

import drgn

from kvminspect.errors import Problem, Problems

if TYPE_CHECKING:  # numpy is imported where it is used: `vms` never needs it
    import numpy as np
    from numpy.typing import NDArray

PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
MAX_LIST = 1 << 20  # no kernel list kvminspect walks is this long
KERNEL_MIN = 0xFF00000000000000  # 5-level paging puts the direct map at 0xff11...
LIST_POISON = (0xDEAD000000000100, 0xDEAD000000000122)  # LIST_POISON1/2 (include/linux/poison.h)
_U64 = struct.Struct("<Q")
RUN_GAP = 64 * PAGE_SIZE  # page_runs(): pages closer than this are read together
RUN_MAX = 4 << 20  # page_runs(): bytes in one read at most


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

    def gather_words(self, pages: NDArray[np.uint64], index: NDArray[np.intp],
                     physical: bool = False) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """The u64 at word *index[j]* of the 4 KiB page at *pages[j]* (page-aligned,
        kernel virtual or physical) for each j, and whether its page was readable:
        each page read once, by page_runs(), its words taken as its run is read
        (10^6 pages cost 16 MiB at a time, not 4 GiB). Not cached."""
        import numpy as np

        n = len(pages)
        values = np.zeros(n, dtype=np.uint64)
        ok = np.zeros(n, dtype=bool)
        if not n:
            return values, ok
        unique, back = np.unique(pages, return_inverse=True)
        back = back.reshape(-1)
        order = np.argsort(back, kind="stable")  # the items grouped by page
        first = np.searchsorted(back[order], np.arange(len(unique)))
        count = np.diff(np.append(first, n))
        for at, rows in self.page_runs(unique, physical):
            if rows is None:
                continue
            c = count[at]
            total = int(c.sum())
            items = order[np.repeat(first[at] - (np.cumsum(c) - c), c) + np.arange(total)]
            values[items] = rows[np.repeat(np.arange(len(at)), c), index[items]]
            ok[items] = True
        return values, ok

    def page_runs(self, addrs: NDArray[np.uint64], physical: bool = False
                  ) -> Iterator[tuple[NDArray[np.intp], NDArray[np.uint64] | None]]:
        """The 4 KiB pages at the page-aligned *addrs* (kernel virtual, or
        physical), by runs of neighbours: (positions in *addrs*, their pages as
        rows of 512 u64), or (positions, None) for pages that cannot be read. Not
        cached: a run's rows are a view of one read, to use before the next.

        Neighbours are read together: the addresses sorted, pages less than
        RUN_GAP apart make one Program.read of up to RUN_MAX bytes (a read costs
        ~3 us whatever its size up to a few KiB, 1 MiB ~50 us, and each run
        costs its caller some numpy calls), so 10^5 page tables allocated close
        together cost a few hundred reads, not 10^5. A
        run that cannot be read whole (a hole in the dump) is read again as runs
        of adjacent pages, then page by page.
        """
        import numpy as np

        n = len(addrs)
        if not n:
            return
        order = np.argsort(addrs, kind="stable")
        sorted_addrs = addrs[order]
        starts = sorted_addrs.tolist()
        cut = np.flatnonzero(np.diff(sorted_addrs) > RUN_GAP) + 1
        bounds = [0, *cut.tolist(), n]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            while lo < hi:  # runs of at most RUN_MAX bytes
                end = lo + int(np.searchsorted(sorted_addrs[lo:hi],
                                               starts[lo] + RUN_MAX - PAGE_SIZE, side="right"))
                yield from self._run(starts, sorted_addrs, order, lo, end, physical, True)
                lo = end

    def _run(self, starts: list[int], sorted_addrs: NDArray[np.uint64], order: NDArray[np.intp],
             lo: int, hi: int, physical: bool, bridged: bool
             ) -> Iterator[tuple[NDArray[np.intp], NDArray[np.uint64] | None]]:
        """page_runs() of the sorted pages starts[lo:hi], in one read; on a fault,
        the runs of adjacent pages in it (*bridged*: the run spans gaps), then
        each page alone."""
        import numpy as np

        first, last = starts[lo], starts[hi - 1]
        try:
            data = self.prog.read(first, last + PAGE_SIZE - first, physical)
        except drgn.FaultError:
            if first == last:  # one page (maybe asked for more than once)
                yield order[lo:hi], None
                return
            pieces = [lo]
            if bridged:
                pieces += [i for i in range(lo + 1, hi) if starts[i] - starts[i - 1] > PAGE_SIZE]
            if len(pieces) == 1:  # adjacent pages (or one page many times): page by page
                pieces = [i for i in range(lo, hi) if i == lo or starts[i] != starts[i - 1]]
            pieces.append(hi)
            for a, b in zip(pieces, pieces[1:], strict=False):
                yield from self._run(starts, sorted_addrs, order, a, b, physical, False)
            return
        table = np.frombuffer(data, dtype="<u8").reshape(-1, PAGE_SIZE // 8)
        rows = ((sorted_addrs[lo:hi] - np.uint64(first)) >> np.uint64(12)).astype(np.intp)
        if len(table) == hi - lo and (np.diff(rows) == 1).all():  # each page once, in order
            yield order[lo:hi], table
        else:
            yield order[lo:hi], table[rows]

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

    def count_nodes(self, head: int, kind: str) -> int:
        """How many nodes list_nodes() yields for the struct list_head list at
        *head*, without keeping them: the plain walk counts with Brent's cycle
        check (no set of 10^6 nodes); anything but a plain list (a bad pointer,
        an unreadable node, a loop, more than MAX_LIST nodes) is walked again by
        list_nodes(), which counts it as before and says what is wrong."""
        read = self.read_word
        try:
            node = read(head)
            count, mark, power, steps = 0, head, 1, 0  # Brent: mark waits, node runs
            while node != head:
                if node in LIST_POISON or node < KERNEL_MIN or count >= MAX_LIST:
                    break
                count += 1
                node = read(node)
                if node == mark and node != head:  # back at a node met before: a loop
                    break
                steps += 1
                if steps == power:
                    mark, power, steps = node, power * 2, 0
            else:
                return count
        except drgn.FaultError:
            pass
        return sum(1 for _ in self.list_nodes(head, kind))

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
