"""struct kvm_mmu_page: shadow pages, their spt[] and the VM page lists.

ShadowPages is the model's part for arch/x86/kvm/mmu/mmu.c's and tdp_mmu.c's
pages: it decodes struct kvm_mmu_page by offset (in runs, from the slab pages
Memory caches), reads each page table's spt[], follows an SPTE to its child
the way to_shadow_page() does (page_private(pfn_to_page(pfn))), and walks
kvm->arch.active_mmu_pages, tdp_mmu_pages and tdp_mmu_roots.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Iterable, Iterator
from itertools import compress, repeat
from operator import attrgetter, not_
from typing import TYPE_CHECKING, Any

import drgn

from kvminspect import spte
from kvminspect.layout import UNKNOWN, Layout, SpLayout
from kvminspect.memory import KERNEL_MIN, MAX_LIST, PAGE_MASK, PAGE_SIZE, Memory
from kvminspect.objects import (
    VM,
    Role,
    ShadowPage,
    Spte,
)
from kvminspect.read_spte import SpteReader
from kvminspect.spte import PAGE_SHIFT, SPTE_ENT_PER_PAGE

if TYPE_CHECKING:  # numpy is imported where it is used: `vms` never needs it
    import numpy as np
    from numpy.typing import NDArray

_U64 = struct.Struct("<Q")
PRIVATES_RUN = 16  # vmemmap pages read at once by page_private() (1024 struct pages)
_new = tuple.__new__  # ShadowPage(...) without NamedTuple's Python-level __new__
LEVEL_OF, SPT_OF, ADDR_OF = attrgetter("level"), attrgetter("spt"), attrgetter("addr")
COLUMNS_FROM = 256  # _decode_many(): structs decoded column by column from this many
RUN_FROM = 1 << 14  # a plain list walk of this many new pages keeps them as a PageRun
LINKS_COLUMNS_FROM = 64  # link_columns(): tables with this many non-zero entries, by numpy
NUMPY_CODES = {"B": "<u1", "H": "<u2", "I": "<u4", "Q": "<u8", "i": "<i4"}  # struct -> numpy


class SpDecoder:
    """The struct kvm_mmu_page fields kvminspect reads, decoded by offset.

    From SpLayout's offsets: ``record`` is one struct.Struct of the whole
    struct's size over the scalar fields that do not overlap, so that
    ``record.iter_unpack`` decodes a run of structs in one C loop; a field
    that overlaps another (a union member) is read on its own; missing
    members read as UNKNOWN.
    """

    SCALARS = ("gfn", "role", "spt", "unsync", "unsync_children", "root_count",
               "mmu_valid_gen", "tdp_mmu_page")

    def __init__(self, lay: SpLayout) -> None:
        codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
        spec = {"gfn": (lay.gfn, "Q"), "role": (lay.role, "I"), "spt": (lay.spt, "Q"),
                "unsync": (lay.unsync, "B"), "unsync_children": (lay.unsync_children, "I"),
                "root_count": (lay.root_count, "i"),
                "mmu_valid_gen": (lay.mmu_valid_gen, codes.get(lay.mmu_valid_gen_size, "Q")),
                "tdp_mmu_page": (lay.tdp_mmu_page, "B")}
        fmt, pos, at = "<", 0, 0
        slots: dict[str, int] = {}
        self.alone: dict[str, tuple[int, struct.Struct]] = {}
        present = {n: (off, code) for n, (off, code) in spec.items() if off is not None}
        for name, (off, code) in sorted(present.items(), key=lambda nv: nv[1][0]):
            if off < pos:  # overlaps the previous field: read alone
                self.alone[name] = (off, struct.Struct("<" + code))
                continue
            fmt += f"{off - pos}x{code}" if off > pos else code
            slots[name] = at
            at += 1
            pos = off + struct.calcsize(code)
        self.record = struct.Struct(fmt + (f"{lay.size - pos}x" if lay.size > pos else ""))
        for k, name in enumerate(self.alone):  # after the UNKNOWN appended to a record
            slots[name] = at + 1 + k
        # where each scalar is in a row (rows()); `at`: the UNKNOWN after the record
        self.index = tuple(slots.get(n, at) for n in self.SCALARS)
        self.complete = at not in self.index  # every scalar is in the record itself
        self.bitmap = (None if lay.unsync_child_bitmap is None else
                       (lay.unsync_child_bitmap, lay.unsync_child_bitmap + lay.bitmap_bytes))
        self.spec = present  # name: (offset, struct code) of each field the struct has
        self.size = lay.size
        self._numpy: Any = None  # numpy_dtype(), made once

    def numpy_dtype(self) -> Any:
        """The struct as a numpy record type: every field kvminspect reads at its
        offset (union members may overlap), the bitmap as bytes."""
        import numpy as np

        if self._numpy is None:
            names, formats, offsets = [], [], []
            for name, (off, code) in self.spec.items():
                names.append(name)
                formats.append(NUMPY_CODES[code])
                offsets.append(off)
            if self.bitmap is not None:
                names.append("unsync_child_bitmap")
                formats.append(f"({self.bitmap[1] - self.bitmap[0]},)u1")
                offsets.append(self.bitmap[0])
            self._numpy = np.dtype({"names": names, "formats": formats, "offsets": offsets,
                                    "itemsize": self.size})
        return self._numpy

    def rows(self, blocks: list[bytes]) -> Iterator[tuple[Any, ...]]:
        """Per block (one struct's bytes each): the record's values, UNKNOWN,
        then the fields read alone (``index`` says where each scalar is)."""
        if not self.alone:
            rows = self.record.iter_unpack(b"".join(blocks))
            if self.complete:  # no index points past the record: rows as unpacked
                return rows
            tail = (UNKNOWN,)
            return (row + tail for row in rows)
        return self._rows_alone(blocks)

    def _rows_alone(self, blocks: list[bytes]) -> Iterator[tuple[Any, ...]]:
        """rows() when some fields overlap others and are read one by one."""
        for d in blocks:
            row = list(self.record.unpack_from(d)) + [UNKNOWN]
            for off, st in self.alone.values():
                row.append(st.unpack_from(d, off)[0])
            yield tuple(row)


class ShadowPages:
    """struct kvm_mmu_page of one target: decoded pages, their spt[], the page lists.

    Reads through *mem*, by the offsets of *layout*, and decodes SPTEs by the
    format *sptes* probed. Owns the caches of what it decoded (reset()).
    """

    def __init__(self, mem: Memory, layout: Layout, sptes: SpteReader) -> None:
        self.mem = mem
        self.layout = layout
        self.spte = sptes
        self._sp_cache: dict[int, ShadowPage | None] = {}
        self._runs: list[PageRun] = []  # the big plain list walks' pages (PageRun)
        self._spt_cache: dict[int, array.array[int] | None] = {}
        self._roles: dict[int, Role] = {}  # one Role per distinct role word
        # page_private(): the private words of each vmemmap page read, and how to
        # take them out of its bytes (None: struct page does not tile 4 KiB)
        self._privates: dict[int, array.array[int]] = {}
        size, off = layout.page_size, layout.page_private
        self._privates_of = (struct.Struct("<" + f"{off}xQ{size - off - 8}x" * (PAGE_SIZE // size))
                             if PAGE_SIZE % size == 0 and off + 8 <= size else None)
        self._role_widths = ({f.name: f.width for f in layout.sp.role_fields}
                             if layout.sp else {})
        self._decoder: SpDecoder | None = None
        self._tdp_quirk: bool | None = None
        self._gfn_array: tuple[int, int] | None = None  # see _translation_array()
        self._gfn_array_probed = False

    def reset(self) -> None:
        """Forget every page decoded and every spt[] read (a re-read of a VM)."""
        self._sp_cache.clear()
        self._runs.clear()
        self._spt_cache.clear()
        self._privates.clear()

    def page_private(self, pfn: int) -> int:
        """page_private(pfn_to_page(pfn)): struct page's private word, of the
        vmemmap; FaultError if there is no such struct page.

        Where struct pages tile a 4 KiB page (sizeof 64: 64 of them), the
        private words of the whole vmemmap page are read at once and only they
        are kept (512 bytes, not 4 KiB): a 10^5-page MMU reads a few thousand.
        """
        lay = self.layout
        at = lay.vmemmap_base + pfn * lay.page_size
        if at + lay.page_size > 2**64:
            raise drgn.FaultError("pfn beyond any struct page", pfn)
        if self._privates_of is None:
            return self.mem.read_word(at + lay.page_private)
        block = at & ~(PAGE_SIZE - 1)
        words = self._privates.get(block)
        if words is None:
            try:
                words = self._read_privates(block)
            except drgn.FaultError:
                return self.mem.read_word(at + lay.page_private)  # a part may be readable
        return words[(at - block) // lay.page_size]

    def _read_privates(self, block: int) -> array.array[int]:
        """The private words of the struct pages in the vmemmap page at *block*,
        read with the pages around it: PRIVATES_RUN pages in one read (page
        tables are allocated close together: their struct pages are neighbours),
        one at a time where the run cannot be read whole."""
        unpack = self._privates_of.unpack if self._privates_of else None
        assert unpack is not None
        run = PRIVATES_RUN * PAGE_SIZE
        start = block & ~(run - 1)
        try:
            data = self.mem.read(start, run)
        except drgn.FaultError:
            start, data = block, self.mem.read(block, PAGE_SIZE)
        for off in range(0, len(data), PAGE_SIZE):
            if start + off not in self._privates:
                self._privates[start + off] = array.array(
                    "Q", unpack(data[off:off + PAGE_SIZE]))
        return self._privates[block]

    def to_shadow_page(self, pfn: int) -> int | None:
        """to_shadow_page() (arch/x86/kvm/mmu/mmu_internal.h): the struct
        kvm_mmu_page of the page table at *pfn*, page_private(pfn_to_page(pfn)),
        as the kernel follows it; None when the page has no private pointer and
        when its struct page cannot be read (e.g. an SPTE of a garbage page
        table): callers say which object pointed there. Whether each decoded
        page's sp->spt leads back to it is spt_owner_mismatches()'s question.
        """
        try:
            return self.page_private(pfn) or None
        except drgn.FaultError:
            return None

    def spt_owner_mismatches(self, pages: Iterable[ShadowPage]
                             ) -> list[tuple[int, int, int | None]]:
        """(sp, pfn of sp->spt, page_private of that pfn) of each of *pages*
        whose spt[] page does not name it as its owner: the kernel's
        to_shadow_page() would not lead to it (kvm_mmu_alloc_shadow_page() and
        tdp_mmu_init_sp() set_page_private(virt_to_page(sp->spt), sp))."""
        lay = self.layout
        offset, size = lay.page_offset_base, lay.page_size
        suspects: Iterable[ShadowPage] = pages
        if size & (size - 1) == 0 and not offset & PAGE_MASK:
            suspects = self._owner_suspects(list(pages))
        out = []
        for sp in suspects:
            pfn = (sp.spt - offset) >> PAGE_SHIFT
            owner = self.to_shadow_page(pfn) if pfn >= 0 else None
            if owner != sp.addr:
                out.append((sp.addr, pfn, owner))
        return out

    def _owner_suspects(self, pages: list[ShadowPage]) -> list[ShadowPage]:
        """The pages whose sp->spt page's private word, as links() read it, is not
        the page (or was not read): spt_owner_mismatches() asks those again. The
        struct page of sp->spt is at base + (spt - offset) / PAGE_SIZE * size, one
        shift; numpy does it for all the pages at once."""
        import numpy as np

        lay = self.layout
        size = lay.page_size
        n = len(pages)
        spt = np.fromiter(map(SPT_OF, pages), dtype=np.uint64, count=n)
        addrs = np.fromiter(map(ADDR_OF, pages), dtype=np.uint64, count=n)
        shift = PAGE_SHIFT - (size.bit_length() - 1)
        first = lay.vmemmap_base - (lay.page_offset_base >> shift)  # (may be negative)
        at = (spt >> np.uint64(shift)) + np.uint64(first & (2**64 - 1))  # (mod 2**64)
        blocks = at & np.uint64(~PAGE_MASK & (2**64 - 1))
        unique, which = np.unique(blocks, return_inverse=True)
        words, have = self._private_rows(unique.tolist())
        which = which.reshape(-1)
        slot = ((at & np.uint64(PAGE_MASK)) // np.uint64(size)).astype(np.intp)
        # (spt values so large that the sum wraps are garbage: asked again too)
        wrapped = spt >> np.uint64(shift) > np.uint64(2**64 - 1 - (first & (2**64 - 1)))
        ok = have[which] & (words[which, slot] == addrs) & ~wrapped
        return [pages[j] for j in np.flatnonzero(~ok).tolist()]

    def _private_rows(self, blocks: list[int], pfns: list[int | None] | None = None
                      ) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """The private words page_private() read of the struct pages in each
        vmemmap page at *blocks*, as rows (a struct page each), and whether each
        row was read; with *pfns*, a vmemmap page not read yet is read first, by
        page_private() of pfns[j] (and its neighbours; None: not readable)."""
        import numpy as np

        per = PAGE_SIZE // self.layout.page_size
        words = np.zeros((len(blocks), per), dtype=np.uint64)
        have = np.zeros(len(blocks), dtype=bool)
        privates = self._privates
        for j, block in enumerate(blocks):
            got = privates.get(block)
            if got is None and pfns is not None and (pfn := pfns[j]) is not None:
                self.to_shadow_page(pfn)
                got = privates.get(block)
            if got is not None and len(got) == per:
                words[j] = np.frombuffer(got, dtype=np.uint64)
                have[j] = True
        return words, have

    def shadow_page(self, addr: int) -> ShadowPage | None:
        """struct kvm_mmu_page at *addr*, decoded by offset; None if unreadable."""
        try:
            return self._sp_cache[addr]
        except KeyError:
            pass
        for run in self._runs:
            found = run.get(addr)
            if found is not None:
                return found
        lay = self.layout.sp
        if lay is None:  # a structural member is missing (a MissingMember says which)
            return None
        sp: ShadowPage | None = None
        try:
            if addr < KERNEL_MIN:
                raise drgn.FaultError("not a kernel address", addr)
            sp = self._decode_sp(addr, self.mem.read_block(addr, lay.size))
        except drgn.FaultError as e:
            self.mem.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
        self._sp_cache[addr] = sp
        return sp

    def shadow_pages(self, addrs: list[int]) -> list[ShadowPage | None]:
        """shadow_page() of each address (a list walk's pages in order:
        listed_pages())."""
        return [self.shadow_page(a) for a in addrs]

    def _known(self, addr: int) -> bool:
        """Whether the page at *addr* is decoded already (or known unreadable)."""
        return addr in self._sp_cache or any(run.get(addr) is not None for run in self._runs)

    def _known_many(self, addrs: list[int]) -> list[bool]:
        """_known() of each address: the PageRuns searched at once."""
        known = list(map(self._sp_cache.__contains__, addrs))
        if self._runs and addrs:
            import numpy as np

            at = np.array(addrs, dtype=np.uint64)
            found = np.zeros(len(addrs), dtype=bool)
            for run in self._runs:
                found |= run.contains(at)
            known = [a or b for a, b in zip(known, found.tolist(), strict=True)]
        return known

    def _decode_sp(self, addr: int, d: bytes) -> ShadowPage:
        """A struct kvm_mmu_page's bytes as a ShadowPage (see _decode_many)."""
        return self._decode_many([addr], [d])[0]

    def _decode_many(self, addrs: list[int], blocks: list[bytes]) -> list[ShadowPage]:
        """Structs kvm_mmu_page (their addresses and bytes) as ShadowPages.

        One SpDecoder.rows() pass, one Role per role word, impossible levels
        and unsync_children recorded as problems: ~1.5 us a page. Many pages
        (a list walk's) are decoded column by column instead (_decode_columns).
        """
        dec = self._decoder_of()
        if len(addrs) >= COLUMNS_FROM:
            return self._decode_columns(dec, addrs, blocks)
        ig, ir, isp, iu, ic, irc, igen, itdp = dec.index
        roles = self._roles
        bitmap = dec.bitmap
        b0, b1 = bitmap if bitmap is not None else (0, 0)
        from_bytes = int.from_bytes
        out = []
        for addr, d, row in zip(addrs, blocks, dec.rows(blocks), strict=True):
            word, spt, unsync, children = row[ir], row[isp], row[iu], row[ic]
            root_count, tdp = row[irc], row[itdp]
            role = roles.get(word)
            if role is None:
                role = self._role(word)
            level = role.level
            if tdp is UNKNOWN:
                tdp = False
            elif tdp:
                tdp = True
                if root_count == 0 and self.tdp_child_level_is_parents():
                    level -= 1
            else:
                tdp = False
            out.append(_new(ShadowPage, (
                addr, row[ig], level, role, spt, unsync if unsync is UNKNOWN else unsync != 0,
                children, from_bytes(d[b0:b1], "little") if bitmap else UNKNOWN,
                root_count, row[igen], tdp)))
            if not 1 <= role.level <= 5:
                self.mem.problem("struct kvm_mmu_page", addr, f"impossible level {role.level}")
            if children is not UNKNOWN and children > 512:
                self.mem.problem("struct kvm_mmu_page", addr,
                                 f"impossible unsync_children {children}")
        return out

    def _decoder_of(self) -> SpDecoder:
        """The SpDecoder of this kernel's struct kvm_mmu_page (made once)."""
        lay = self.layout.sp
        assert lay is not None
        if self._decoder is None:
            self._decoder = SpDecoder(lay)
        return self._decoder

    def _decode_columns(self, dec: SpDecoder, addrs: list[int], blocks: list[bytes]
                        ) -> list[ShadowPage]:
        """_decode_many() column by column: the structs' bytes as one numpy record
        array, each field one vector, a ShadowPage made per page from them
        (~0.5 us a page); the same ShadowPages, problems and order."""
        import numpy as np

        return self._decode_records(
            dec, addrs, np.frombuffer(b"".join(blocks), dtype=dec.numpy_dtype()))

    def _decode_records(self, dec: SpDecoder, addrs: list[int], rec: Any
                        ) -> list[ShadowPage]:
        """_decode_columns() of structs already in a numpy record array *rec*."""
        import numpy as np

        n = len(addrs)
        unknown: list[Any] = [UNKNOWN] * n
        col: dict[str, list[Any]] = {
            name: rec[name].tolist() if name in rec.dtype.names else unknown
            for name in SpDecoder.SCALARS}
        roles = self._roles
        words = col["role"]
        for word in set(words):
            if word not in roles:
                self._role(word)
        role_of = list(map(roles.__getitem__, words))
        levels = list(map(LEVEL_OF, role_of))
        tdp = ([False] * n if "tdp_mmu_page" not in rec.dtype.names
               else (rec["tdp_mmu_page"] != 0).tolist())
        root_counts = col["root_count"]
        quirk_at = next((i for i in range(n) if tdp[i] and root_counts[i] == 0), n)
        unsync = col["unsync"]
        if unsync is not unknown:
            unsync = (rec["unsync"] != 0).tolist()
        if dec.bitmap is None:
            bitmaps: list[Any] = unknown
        else:
            bits = rec["unsync_child_bitmap"]
            bitmaps = [0] * n
            from_bytes = int.from_bytes
            for i in np.flatnonzero(bits.any(axis=1)).tolist():
                bitmaps[i] = from_bytes(bits[i].tobytes(), "little")
        children = col["unsync_children"]
        # the problems, page by page as _decode_many records them, and the TDP MMU
        # level quirk decided where _decode_many would first ask
        bad = self._bad_rows(rec, words, children is not unknown)
        for i in bad:
            if i >= quirk_at:
                break
            self._problems_of(addrs[i], levels[i], children[i])
        if quirk_at < n and self.tdp_child_level_is_parents():
            for i in range(quirk_at, n):
                if tdp[i] and root_counts[i] == 0:
                    levels[i] -= 1
        for i in bad:
            if i >= quirk_at:
                self._problems_of(addrs[i], role_of[i].level, children[i])
        return list(map(_new, repeat(ShadowPage, n), zip(
            addrs, col["gfn"], levels, role_of, col["spt"], unsync, children, bitmaps,
            root_counts, col["mmu_valid_gen"], tdp, strict=True)))

    def _bad_rows(self, rec: Any, words: list[int], children: bool) -> list[int]:
        """The rows of *rec* (structs kvm_mmu_page) that _decode_many records a
        problem for: an impossible role.level (told per role word), or, with
        *children*, unsync_children above 512; in order, found by numpy."""
        import numpy as np

        roles = self._roles
        odd = [w for w in set(words) if not 1 <= roles[w].level <= 5]
        bad = np.isin(rec["role"], odd) if odd else np.zeros(len(words), dtype=bool)
        if children:
            bad |= rec["unsync_children"] > 512
        rows: list[int] = np.flatnonzero(bad).tolist()
        return rows

    def _problems_of(self, addr: int, level: int, children: Any) -> None:
        """The problems _decode_many records for one page's role.level and unsync_children."""
        if not 1 <= level <= 5:
            self.mem.problem("struct kvm_mmu_page", addr, f"impossible level {level}")
        if children is not UNKNOWN and children > 512:
            self.mem.problem("struct kvm_mmu_page", addr, f"impossible unsync_children {children}")

    def _role(self, word: int) -> Role:
        """The Role of a role word (union kvm_mmu_page_role), made once per word."""
        assert self.layout.sp is not None
        role = self._roles[word] = Role(
            word, {f.name: f.get(word) for f in self.layout.sp.role_fields}, self._role_widths)
        return role

    def tdp_child_level_is_parents(self) -> bool:
        """Whether TDP MMU child pages carry their parent's level in role.level.

        5.10's kvm_tdp_mmu_map() allocated each child page table with
        alloc_tdp_mmu_page(vcpu, iter.gfn, iter.level): the level of the SPTE
        pointing at it, one above its own (fixed by "KVM: x86/mmu: Fix TDP MMU
        page table level" (5.14, f1b832550832)); roots were right. Decided once, from the
        first TDP MMU root with a child: is the child's role.level the root's?
        Read raw, without the shadow-page cache (whose levels depend on it).
        """
        if self._tdp_quirk is None:
            self._tdp_quirk = False  # also while deciding: no recursion
            try:
                self._tdp_quirk = self._first_tdp_child_level_equal()
            except (drgn.FaultError, LookupError, ValueError):
                pass
        return self._tdp_quirk

    def _first_tdp_child_level_equal(self) -> bool:
        """See tdp_child_level_is_parents (struct kvm_mmu_page, raw reads)."""
        lay = self.layout
        if lay.sp is None or lay.sp.tdp_mmu_page is None or not lay.tdp_mmu_roots:
            return False
        level_of = next((f for f in lay.sp.role_fields if f.name == "level"), None)
        if level_of is None:
            return False
        mem = self.mem
        off = drgn.offsetof(mem.type("struct kvm"), "arch") + drgn.offsetof(
            mem.type("struct kvm_arch"), "tdp_mmu_roots")
        vm_off = drgn.offsetof(mem.type("struct kvm"), "vm_list")
        for node in mem.list_nodes(mem.symbol_address("vm_list"), "vm_list"):
            for root in mem.list_nodes(node - vm_off + off, "kvm->arch.tdp_mmu_roots"):
                root -= lay.sp.link
                level = level_of.get(mem.read_u32(root + lay.sp.role))
                spt = mem.read_u64(root + lay.sp.spt)
                table = array.array("Q", mem.read(spt, PAGE_SIZE))
                for _, value in spte.present_non_leaf(table, self.spte.format):
                    child = self.to_shadow_page((value & lay.addr_mask) >> PAGE_SHIFT)
                    if child:
                        return level_of.get(mem.read_u32(child + lay.sp.role)) == level
        return False

    def sptes(self, sp: ShadowPage, keep: bool = True) -> array.array[int] | None:
        """sp->spt[0..511] as one 4 KiB read; None if unreadable (recorded, and
        remembered). *keep*: False reads a table without keeping it (an audit
        reads 10^5 level-1 tables once); a copy already kept is still used."""
        if sp.addr in self._spt_cache:
            return self._spt_cache[sp.addr]
        out: array.array[int] | None
        try:
            out = self._read_spt(sp)
        except drgn.FaultError as e:
            self.mem.problem("struct kvm_mmu_page", sp.addr, f"spt {sp.spt:#x} unreadable ({e})")
            out = None
        if keep or out is None:
            self._spt_cache[sp.addr] = out
        return out

    def table_runs(self, sps: list[ShadowPage]
                   ) -> Iterator[tuple[NDArray[np.intp], NDArray[np.uint64] | None]]:
        """sp->spt[0..511] of each page of *sps*, by runs: (positions in *sps*,
        their tables as rows of 512 SPTEs), or (positions, None) for tables that
        cannot be read (each recorded as sptes() records it). sptes() for many
        pages at once: level-1 tables read together with their neighbours
        (Memory.page_runs; an audit reads 10^5 of them once, none kept), the
        others through sptes() (kept, and mostly read by the graph already).
        A run's rows are a view of one read, to use before the next."""
        import numpy as np

        n = len(sps)
        spt = np.fromiter(map(SPT_OF, sps), dtype=np.uint64, count=n)
        bulk = ((np.fromiter(map(LEVEL_OF, sps), dtype=np.int64, count=n) == 1)
                & (spt >= np.uint64(KERNEL_MIN)) & ((spt & np.uint64(PAGE_MASK)) == 0))
        if self._spt_cache:  # (tables sptes() kept: from their copy)
            bulk &= ~np.fromiter(map(self._spt_cache.__contains__, map(ADDR_OF, sps)),
                                 dtype=bool, count=n)
        for j in np.flatnonzero(~bulk).tolist():
            sp = sps[j]
            table = self.sptes(sp, keep=sp.level > 1)
            yield (np.array([j], dtype=np.intp),
                   None if table is None else np.frombuffer(table, dtype="<u8").reshape(1, -1))
        where = np.flatnonzero(bulk)
        if not len(where):
            return
        addrs = spt[where]
        for at, rows in self.mem.page_runs(addrs):
            if rows is not None:
                yield where[at], rows
                continue
            for j in where[at].tolist():  # read alone: the problem says why, as sptes() does
                table = self.sptes(sps[j], keep=False)
                yield (np.array([j], dtype=np.intp),
                       None if table is None else np.frombuffer(table, dtype="<u8").reshape(1, -1))

    def spte_bits(self, sp: ShadowPage, value: int, vm: VM | None = None) -> spte.SpteBits:
        """One SPTE of *sp*, every bit decoded (kvminspect.spte.decode_bits)."""
        return self.spte.bits(sp.level, value, None if vm is None else vm.addr)

    def decode(self, sp: ShadowPage, index: int, value: int, resolve: bool = True) -> Spte:
        """One SPTE of *sp*: presence, leaf-ness and the child shadow page."""
        d = spte.decode(value, sp.level, self.spte.format)
        child = None
        if d.present and not d.leaf and resolve:
            child = self.to_shadow_page(d.pfn)
        return Spte(index, value, d.present, d.large, d.leaf, d.pfn, child,
                    self.spte.bits(sp.level, value))

    def children(self, sp: ShadowPage) -> list[Spte]:
        """Present non-leaf SPTEs of *sp* with their child shadow pages."""
        return [self.decode(sp, i, value) for i, value, _ in self.links(sp)]

    def links(self, sp: ShadowPage) -> list[tuple[int, int, int | None]]:
        """(index, SPTE, child struct kvm_mmu_page or None) of every present
        non-leaf SPTE of *sp* (a page above level 1): the graph's edges
        (link_columns(), as triples)."""
        return list(zip(*self.link_columns(sp), strict=True))

    def link_columns(self, sp: ShadowPage) -> tuple[list[int], list[int], list[int | None]]:
        """links() as three lists: the indexes, the SPTEs and the children.

        spte.present_non_leaf() over the whole table, and to_shadow_page() for
        each child (its struct page read through Memory's page cache); a table
        with many children (a TDP MMU's level 2: up to 512) is done column by
        column, each vmemmap page's private words taken at once.
        """
        if sp.level <= 1:
            return [], [], []
        spt = self.sptes(sp)
        if spt is None:
            return [], [], []
        return self._links_of([spt])[0]

    def _links_of(self, spts: list[array.array[int]]
                  ) -> list[tuple[list[int], list[int], list[int | None]]]:
        """link_columns() of each table in *spts* (sp->spt[0..511]): one with few
        entries by _few_links() (a small MMU's commands never import numpy),
        the others together by _link_columns()."""
        out: list[tuple[list[int], list[int], list[int | None]]] = []
        many: list[array.array[int]] = []
        at: list[int] = []  # the position in *out* of each of *many*
        for spt in spts:
            if spt.count(0) > SPTE_ENT_PER_PAGE - LINKS_COLUMNS_FROM:  # (a C loop: ~1 us)
                out.append(self._few_links(spt))
            else:
                at.append(len(out))
                many.append(spt)
                out.append(([], [], []))
        for j, cols in zip(at, self._link_columns(many), strict=True):
            out[j] = cols
        return out

    def _few_links(self, spt: array.array[int]
                   ) -> tuple[list[int], list[int], list[int | None]]:
        """link_columns() of a table with few entries, without numpy."""
        found = spte.present_non_leaf(spt, self.spte.format)
        return ([i for i, _ in found], [v for _, v in found],
                [self._child(v) for _, v in found])

    def _child(self, value: int) -> int | None:
        """to_shadow_page() of a non-leaf SPTE: inline where its struct page's
        private word is read already."""
        lay = self.layout
        pfn = (value & lay.addr_mask) >> PAGE_SHIFT
        at = lay.vmemmap_base + pfn * lay.page_size
        block = at & ~(PAGE_SIZE - 1)
        words = self._privates.get(block)
        if words is not None:
            return words[(at - block) // lay.page_size] or None
        return self.to_shadow_page(pfn)

    def link_columns_many(self, sps: list[ShadowPage]
                          ) -> list[tuple[list[int], list[int], list[int | None]] | None]:
        """link_columns() of each of *sps* (a graph's parents, a few hundred at a
        time), the tables read so far or readable now done together by numpy:
        one mask over all their entries, their children's struct pages looked
        up at once (a TDP MMU's 2,000 level-2 tables of 512 children cost one
        pass, not 2,000); a table with few entries without numpy (_links_of).
        None for a table that cannot be read: link_columns() of it records
        why, when its caller gets to it."""
        out: list[tuple[list[int], list[int], list[int | None]] | None] = []
        tables: list[array.array[int]] = []
        at: list[int] = []  # the position in *out* of each table read
        for sp in sps:
            spt = self._spt_quiet(sp) if sp.level > 1 else None
            if spt is not None:
                at.append(len(out))
                tables.append(spt)
            out.append(([], [], []) if sp.level <= 1 else None)
        for j, cols in zip(at, self._links_of(tables), strict=True):
            out[j] = cols
        return out

    def _spt_quiet(self, sp: ShadowPage) -> array.array[int] | None:
        """sptes() of *sp* if it is kept or readable now (then kept, as sptes()
        keeps it), else None with nothing recorded (sptes() says why later)."""
        if sp.addr in self._spt_cache:
            return self._spt_cache[sp.addr]
        try:
            out = self._spt_cache[sp.addr] = self._read_spt(sp)
        except drgn.FaultError:
            return None
        return out

    def _read_spt(self, sp: ShadowPage) -> array.array[int]:
        """sp->spt[0..511], read now (FaultError if it cannot be)."""
        if sp.spt < KERNEL_MIN:
            raise drgn.FaultError("not a kernel address", sp.spt)
        out = array.array("Q", self.mem.read(sp.spt, PAGE_SIZE))
        if sys.byteorder != "little":
            out.byteswap()
        return out

    def _link_columns(self, spts: list[array.array[int]]
                      ) -> list[tuple[list[int], list[int], list[int | None]]]:
        """link_columns() of each table in *spts* (sp->spt[0..511]), by numpy:
        every table's entries masked at once, each vmemmap page's private words
        taken at once for all the children in it."""
        if not spts:
            return []
        import numpy as np

        lay = self.layout
        t = np.frombuffer(b"".join(spts), dtype=np.uint64).reshape(len(spts), SPTE_ENT_PER_PAGE)
        table, index = np.nonzero(spte.present_non_leaf_mask(t, self.spte.format))
        values = t[table, index]
        pfns = (values & np.uint64(lay.addr_mask)) >> np.uint64(PAGE_SHIFT)
        size = lay.page_size
        # where base + pfn * size stays below 2**64 (else page_private() says no)
        fits = pfns <= np.uint64((2**64 - 1 - lay.vmemmap_base) // size - 1)
        at = np.uint64(lay.vmemmap_base) + pfns * np.uint64(size)
        blocks = at & np.uint64(~(PAGE_SIZE - 1) & (2**64 - 1))
        slot = ((at - blocks) // np.uint64(size)).astype(np.intp)
        # the private words of each vmemmap page the children's struct pages are in
        unique, first, which = np.unique(blocks, return_index=True, return_inverse=True)
        words, have = self._private_rows(
            unique.tolist(), [int(pfns[j]) if fits[j] else None for j in first.tolist()])
        which = which.reshape(-1)
        found = fits & have[which]
        children: list[int | None] = [c or None for c in words[which, slot].tolist()]
        for j in np.flatnonzero(~found).tolist():  # one by one, as page_private() reads
            children[j] = self.to_shadow_page(int(pfns[j]))
        indexes, sptes = index.tolist(), values.tolist()
        ends = np.cumsum(np.bincount(table, minlength=len(spts))).tolist()
        return [(indexes[a:b], sptes[a:b], children[a:b])
                for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def active_pages(self, vm: VM) -> list[int]:
        """Shadow pages on kvm->arch.active_mmu_pages (and the tdp_mmu_pages list, 5.10-6.1)."""
        return self.listed_pages(vm)[0]

    def listed_pages(self, vm: VM) -> tuple[list[int], list[ShadowPage | None]]:
        """active_pages(), and the ShadowPage of each (None: unreadable)."""
        if self.layout.sp is None:
            return [], []
        kvm = self.mem.object("struct kvm *", vm.addr)
        heads = [("active_mmu_pages", kvm.arch.active_mmu_pages.address_of_().value_())]
        # a list to 6.1, then a counter: "KVM: x86/mmu: Track the number of TDP MMU pages,
        # but not the actual pages" (6.2, d25ceb926436)
        if self.layout.tdp_mmu_pages_list:
            heads.append(("tdp_mmu_pages", kvm.arch.tdp_mmu_pages.address_of_().value_()))
        out: list[int] = []
        pages: list[ShadowPage | None] = []
        for name, head in heads:
            addrs, sps = self._sp_list(head, f"kvm->arch.{name}")
            out.extend(addrs)
            pages.extend(sps)
        return out, pages

    def _sp_list(self, head: int, kind: str) -> tuple[list[int], list[ShadowPage | None]]:
        """The struct kvm_mmu_page of each node of a list through sp->link, and
        its ShadowPage, decoded on the way into the shadow-page cache.

        The same walk as list_nodes (bounded, cycle-safe, poison-aware), but
        each node's next pointer comes from the struct just read: one
        read_block per page, the hot loop of a 10^5-page MMU.
        """
        lay = self.layout.sp
        assert lay is not None
        mem = self.mem
        link, size, cache = lay.link, lay.size, self._sp_cache
        block, unpack = mem.read_block, _U64.unpack_from
        out: list[int] = []
        todo: list[int] = []  # not decoded yet, and their bytes
        blocks: list[bytes] = []
        try:
            node = mem.read_word(head)
        except drgn.FaultError as e:
            mem.problem(kind, head, f"list head unreadable ({e})")
            return out, []
        if node == 0:  # never initialised (e.g. the TDP MMU lists of a shadow VM)
            return out, []
        fast = self._plain_walk(head, node)
        if fast is not None:
            return fast
        cached, page_mask = mem.cached_page, ~(PAGE_SIZE - 1)
        # Brent's cycle detection (no set of every node): the tortoise jumps to
        # the current node after 1, 2, 4, ... steps; a loop is met within twice
        # its length and prefix
        tortoise, power, steps = None, 1, 0
        tick = 0x4000
        while node != head:
            if node < KERNEL_MIN:  # also LIST_POISON1/2 (0xdead...)
                mem.problem(kind, node, "list pointer is poisoned or not a kernel address")
                break
            if node == tortoise or len(out) > MAX_LIST:
                out = self._cut_loop(out, node, link, kind, head)
                break
            steps += 1
            if steps == power:
                tortoise, power, steps = node, power << 1, 0
            addr = node - link
            out.append(addr)
            tick -= 1
            if not tick:
                tick = 0x4000
                if mem.on_progress is not None:
                    mem.on_progress(len(out))
            page = addr & page_mask
            data = cached(page)
            off = addr - page
            try:
                if data is not None and off + size <= PAGE_SIZE:  # read_block, inline
                    d = data[off:off + size]
                else:
                    d = block(addr, size)
            except drgn.FaultError as e:
                mem.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
                cache[addr] = None
                try:  # the list goes on if the node itself is readable
                    node = mem.read_word(node)
                except drgn.FaultError as e:
                    mem.problem(kind, node, f"list node unreadable ({e})")
                    break
                continue
            if not self._known(addr):  # (a list that loops may list a page twice: harmless)
                todo.append(addr)
                blocks.append(d)
                if len(todo) == 4096:  # decoded in runs: a few MB of bytes at most
                    self._cache_decoded(todo, blocks)
                    todo, blocks = [], []
            node = unpack(d, link)[0]
        self._cache_decoded(todo, blocks)
        return out, [self.shadow_page(a) for a in out]

    def _cache_decoded(self, todo: list[int], blocks: list[bytes]) -> None:
        """Decode the struct kvm_mmu_page bytes *blocks* of the pages at *todo*
        (_decode_many) into the page cache: the careful list walk's runs of 4096."""
        # _decode_many makes one page per address, in order: filled in C
        self._sp_cache.update(zip(todo, self._decode_many(todo, blocks), strict=True))

    def _plain_walk(self, head: int, node: int
                    ) -> tuple[list[int], list[ShadowPage | None]] | None:
        """_sp_list() where nothing is wrong: each node's struct kvm_mmu_page,
        decoded into the cache by runs of 4096 as _sp_list() decodes them; None
        at the first thing that is not plain (a pointer that is no kernel
        address, an unreadable struct, more than MAX_LIST nodes: a loop), for
        the careful walk to say what (this one decodes nothing before it ends,
        so the careful walk's runs are the same).

        The hot loop of a 10^6-page MMU, so following a node is one index:
        sp->link.next is the u64 at the node itself, taken from the 4 KiB page
        Memory holds as a memoryview of u64 words, looked up only when the walk
        moves to another page (a slab page holds a few dozen nodes, allocated
        one after another: in random order within the slab with
        CONFIG_SLAB_FREELIST_RANDOM); the loop bound is checked every 4096
        nodes. The structs are decoded after the walk from the same pages
        (_gathered), and kept in the cache, or as a PageRun when there are
        RUN_FROM or more.
        """
        lay = self.layout.sp
        assert lay is not None
        mem = self.mem
        link, size = lay.link, lay.size
        lo, hi = link, PAGE_SIZE - size + link  # a node's offset whose struct is in its page
        words: dict[int, memoryview] = {}  # each slab page read, as u64 words
        get = words.get
        out: list[int] = []
        add = out.append
        tick = 0x1000
        ticked: set[int] = set()  # the node met at each tick: a loop repeats one soon
        last, page_words = -1, memoryview(b"")  # the page of the node before, its words
        while node != head:
            if len(out) > MAX_LIST - tick or node in ticked:  # the careful walk says
                return None
            ticked.add(node)
            if mem.on_progress is not None and not len(out) & 0x3FFF:
                mem.on_progress(len(out))
            for _ in repeat(None, tick):  # (consecutive nodes share a slab page mostly)
                off = node & PAGE_MASK
                page = node - off
                if page != last or not lo <= off <= hi:
                    held = get(page)
                    if held is None or not lo <= off <= hi:
                        if node < KERNEL_MIN or node & 7:  # (also LIST_POISON1/2)
                            return None
                        try:  # every page of the struct, for _gathered
                            mem.read_block(node - link, size)
                        except drgn.FaultError:
                            return None
                        data = mem.cached_page(page)
                        assert data is not None  # (read just now)
                        held = words[page] = memoryview(data).cast("Q")
                    last, page_words = page, held
                add(node - link)
                node = page_words[off >> 3]
                if node == head:
                    break
        words.clear()
        # the pages not decoded before the walk (the roots were): in runs of 4096
        old = self._known_many(out)
        todo = list(compress(out, map(not_, old))) if any(old) else out
        made: list[ShadowPage] = []
        for i in range(0, len(todo), 4096):
            made.extend(self._gathered(todo[i:i + 4096], size))
        if len(todo) >= RUN_FROM:  # kept by address without a dict entry each
            self._runs.append(PageRun(todo, made))
        else:
            self._sp_cache.update(zip(todo, made, strict=True))
        pages: list[ShadowPage | None] = list(made)
        for i in (i for i, known in enumerate(old) if known):  # (a few) in their places
            pages.insert(i, self.shadow_page(out[i]))
        return out, pages

    def _gathered(self, addrs: list[int], size: int) -> list[ShadowPage]:
        """_decode_many() of structs whose slab pages Memory holds (the plain
        walk's): their bytes gathered by numpy from those pages at once (a few,
        one by one: numpy is not needed for a small MMU)."""
        if len(addrs) < COLUMNS_FROM:
            block = self.mem.read_block
            return self._decode_many(addrs, [block(a, size) for a in addrs])
        import numpy as np

        at = np.array(addrs, dtype=np.uint64)
        pages = at & np.uint64(~(PAGE_SIZE - 1) & (2**64 - 1))
        offs = (at - pages).astype(np.intp)
        held = np.unique(pages)
        cross = offs > PAGE_SIZE - size
        if cross.any():  # the next page follows its page in *held* (sorted, adjacent)
            held = np.unique(np.concatenate([held, pages[cross] + np.uint64(PAGE_SIZE)]))
        cached, block = self.mem.cached_page, self.mem.read_block
        buf = np.frombuffer(b"".join([cached(p) or block(p, PAGE_SIZE)  # (held: the walk's)
                                      for p in held.tolist()]), np.uint8)
        where = np.searchsorted(held, pages).astype(np.intp) * PAGE_SIZE + offs
        dec = self._decoder_of()
        # a record at every byte of *buf* (a view), of which those at *where* are copied
        every = np.ndarray((len(buf) - size + 1,), dec.numpy_dtype(), buf, 0, (1,))
        return self._decode_records(dec, addrs, every[where])

    def _cut_loop(self, out: list[int], node: int, link: int, kind: str,
                  head: int) -> list[int]:
        """A looping list's structs up to the first node met twice (reported);
        *node*: where the walk stopped (met again, or the MAX_LIST-th)."""
        seen: set[int] = set()
        for n, addr in enumerate(out):
            if addr in seen:
                self.mem.problem(kind, head, f"list loops at {addr + link:#x}")
                return out[:n]
            seen.add(addr)
        if node - link in seen:
            self.mem.problem(kind, head, f"list loops at {node:#x}")
        else:
            self.mem.problem(kind, head, f"list loops (more than {MAX_LIST} nodes)")
        return out

    def tdp_roots(self, vm: VM) -> list[int]:
        """TDP MMU roots on kvm->arch.tdp_mmu_roots (invalid roots stay listed)."""
        if not self.layout.tdp_mmu_roots or self.layout.sp is None:
            return []
        kvm = self.mem.object("struct kvm *", vm.addr)
        head = kvm.arch.tdp_mmu_roots.address_of_().value_()
        link = self.layout.sp.link
        return [n - link for n in self.mem.list_nodes(head, "kvm->arch.tdp_mmu_roots")]

    def leaf_gfns(self, sp: ShadowPage, indexes: list[int]) -> list[int] | None:
        """kvm_mmu_page_get_gfn(sp, index) of each index in *indexes* (mmu.c).

        A direct page's gfn is sp->gfn + (index << 9 * (level - 1)); an
        indirect one's is sp->shadowed_translation[index] >> PAGE_SHIFT ("KVM:
        x86/mmu: Cache the access bits of shadowed translations" (6.0, 6a97575d5cff)) or
        sp->gfns[index] before: one 4 KiB read a page (a word each for a few).
        None if the array cannot be read.
        """
        if sp.role.direct:
            return [sp.gfn + (i << (9 * (sp.level - 1))) for i in indexes]
        where = self._translation_array()
        if where is None:
            return None
        off, shift = where
        mem = self.mem
        try:
            ptr = mem.read_word(sp.addr + off)
            if not ptr:
                return None
            if len(indexes) <= 8:  # most leaf tables map a few pages: one word each
                return [mem.read_u64(ptr + 8 * i) >> shift for i in indexes]
            arr = array.array("Q", mem.read(ptr, PAGE_SIZE))
        except drgn.FaultError:
            return None
        if sys.byteorder != "little":
            arr.byteswap()
        return [arr[i] >> shift for i in indexes]

    def leaf_gfns_of(self, sps: list[ShadowPage], table: NDArray[np.intp],
                     index: NDArray[np.int64]) -> tuple[NDArray[np.uint64], NDArray[np.bool_]]:
        """leaf_gfns() of many leaves of indirect pages at once: for each j,
        kvm_mmu_page_get_gfn(sps[table[j]], index[j]), and whether it could be
        read (not where the page's array pointer is NULL or either is not in the
        dump). The pointers are read from the structs, the arrays (a page each)
        with their neighbours, each page once (Memory.gather_words)."""
        import numpy as np

        n = len(table)
        where = self._translation_array()
        if where is None or not n:
            return np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=bool)
        off, shift = where
        words = np.array([sp.addr + off for sp in sps], dtype=np.uint64)
        page = np.uint64(~PAGE_MASK & (2**64 - 1))
        ptrs, read = self.mem.gather_words(
            words & page, ((words & np.uint64(PAGE_MASK)) >> np.uint64(3)).astype(np.intp))
        if bool((words & np.uint64(7)).any()) or bool((ptrs & np.uint64(PAGE_MASK)).any()):
            # (never: slab objects and the arrays are aligned) page by page
            gfns = np.zeros(n, dtype=np.uint64)
            ok = np.zeros(n, dtype=bool)
            for j, (t, i) in enumerate(zip(table.tolist(), index.tolist(), strict=True)):
                got = self.leaf_gfns(sps[t], [i])
                if got is not None:
                    gfns[j], ok[j] = got[0], True
            return gfns, ok
        ptr = ptrs[table]
        usable = read[table] & (ptr != 0)
        values, ok = self.mem.gather_words(ptr[usable], index[usable].astype(np.intp))
        gfns = np.zeros(n, dtype=np.uint64)
        gfns[usable] = values >> np.uint64(shift)
        found = np.zeros(n, dtype=bool)
        found[usable] = ok
        return gfns, found

    def _translation_array(self) -> tuple[int, int] | None:
        """(offset in struct kvm_mmu_page, shift) of shadowed_translation (6.0+)
        or gfns (before); None when the struct has neither."""
        if not self._gfn_array_probed:
            self._gfn_array_probed = True
            t = self.mem.type("struct kvm_mmu_page")
            for name, shift in (("shadowed_translation", PAGE_SHIFT), ("gfns", 0)):
                try:
                    self._gfn_array = (drgn.offsetof(t, name), shift)
                    break
                except LookupError:
                    continue
        return self._gfn_array


class PageRun:
    """The pages one big plain list walk decoded, found by address: a sorted
    numpy array of the addresses and where each one's page is in *pages*.
    ShadowPages' cache for 10^4 pages and more, without a dict entry each (at
    10^6 pages, filling the dict cost more than decoding the structs)."""

    def __init__(self, addrs: list[int], pages: list[ShadowPage]) -> None:
        import numpy as np

        keys = np.array(addrs, dtype=np.uint64)
        self.order = np.argsort(keys, kind="stable")
        self.keys = keys[self.order]
        self.pages = pages

    def contains(self, at: Any) -> Any:
        """Whether each address of the numpy array *at* has a page here."""
        import numpy as np

        i = np.minimum(self.keys.searchsorted(at), len(self.keys) - 1)
        return self.keys[i] == at

    def get(self, addr: int) -> ShadowPage | None:
        """The page at *addr*, None if this run has none."""
        if not 0 <= addr < 2**64:
            return None
        i = int(self.keys.searchsorted(addr))
        if i < len(self.keys) and int(self.keys[i]) == addr:
            return self.pages[int(self.order[i])]
        return None
