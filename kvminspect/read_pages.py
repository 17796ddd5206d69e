"""struct kvm_mmu_page: shadow pages, their spt[] and the VM page lists."""

from __future__ import annotations

import array
import dataclasses
import struct
import sys
from collections.abc import Iterator

import drgn

from kvminspect import spte
from kvminspect.layout import (
    PAGE_SHIFT,
    UNKNOWN,
    SpLayout,
    has_member,
)
from kvminspect.objects import (
    KERNEL_MIN,
    MAX_LIST,
    VM,
    Role,
    ShadowPage,
    Spte,
)
from kvminspect.read_base import PAGE_SIZE, KernelBase

_U64 = struct.Struct("<Q")
_new = tuple.__new__  # ShadowPage(...) without NamedTuple's Python-level __new__


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
        for name, (off, code) in sorted(((n, v) for n, v in spec.items() if v[0] is not None),
                                        key=lambda nv: nv[1][0]):
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

    def rows(self, blocks: list[bytes]) -> Iterator[tuple]:
        """Per block (one struct's bytes each): the record's values, UNKNOWN,
        then the fields read alone (``index`` says where each scalar is)."""
        if not self.alone:
            rows = self.record.iter_unpack(b"".join(blocks))
            if self.complete:  # no index points past the record: rows as unpacked
                return rows
            tail = (UNKNOWN,)
            return (row + tail for row in rows)
        return self._rows_alone(blocks)

    def _rows_alone(self, blocks: list[bytes]) -> Iterator[tuple]:
        """rows() when some fields overlap others and are read one by one."""
        for d in blocks:
            row = list(self.record.unpack_from(d)) + [UNKNOWN]
            for off, st in self.alone.values():
                row.append(st.unpack_from(d, off)[0])
            yield tuple(row)


class PageReader(KernelBase):
    """struct kvm_mmu_page: shadow pages, their spt[] and the VM page lists."""

    def page_private(self, pfn: int) -> int:
        """page_private(pfn_to_page(pfn)); FaultError if there is no such struct page."""
        lay = self.layout
        page = lay.vmemmap_base + pfn * lay.page_size + lay.page_private
        if page >= 2**64:
            raise drgn.FaultError("pfn beyond any struct page", pfn)
        return self.read_word(page)

    def page_to_sp(self, pfn: int) -> int | None:
        """The struct kvm_mmu_page of a page table (to_shadow_page), or None.

        A page already decoded whose sp->spt is that pfn answers first (the
        kernel sets page->private to the sp that owns sp->spt: no read), else
        page_private of the pfn's struct page. None both when the page has no
        private pointer and when its struct page cannot be read (e.g. an SPTE of
        a garbage page table): callers say which object pointed there.
        """
        sp = self._by_spt.get(pfn)
        if sp is not None:
            return sp
        try:
            return self.page_private(pfn) or None
        except drgn.FaultError:
            return None

    def shadow_page(self, addr: int) -> ShadowPage | None:
        """struct kvm_mmu_page at *addr*, decoded by offset; None if unreadable."""
        try:
            return self._sp_cache[addr]
        except KeyError:
            pass
        lay = self.layout.sp
        if lay is None:  # a structural member is missing (a MissingMember says which)
            return None
        sp: ShadowPage | None = None
        try:
            if addr < KERNEL_MIN:
                raise drgn.FaultError("not a kernel address", addr)
            sp = self._decode_sp(addr, self.read_block(addr, lay.size))
        except drgn.FaultError as e:
            self.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
        self._sp_cache[addr] = sp
        return sp

    def shadow_pages(self, addrs: list[int]) -> list[ShadowPage | None]:
        """shadow_page() of each address (those of a list walk are decoded already)."""
        cache = self._sp_cache
        return [cache[a] if a in cache else self.shadow_page(a) for a in addrs]

    def _decode_sp(self, addr: int, d: bytes) -> ShadowPage:
        """A struct kvm_mmu_page's bytes as a ShadowPage (see _decode_many)."""
        return self._decode_many([addr], [d])[0]

    def _decode_many(self, addrs: list[int], blocks: list[bytes]) -> list[ShadowPage]:
        """Structs kvm_mmu_page (their addresses and bytes) as ShadowPages.

        One SpDecoder.rows() pass, one Role per role word, impossible levels
        and unsync_children recorded as problems; each page's sp->spt pfn is
        remembered for links(). The hot loop of a 10^5-page MMU: ~1.5 us a page.
        """
        lay = self.layout.sp
        assert lay is not None
        dec = self._sp_decoder
        if dec is None:
            dec = self._sp_decoder = SpDecoder(lay)
        ig, ir, isp, iu, ic, irc, igen, itdp = dec.index
        roles, by_spt, offset = self._roles, self._by_spt, self.layout.page_offset_base
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
            by_spt[(spt - offset) >> PAGE_SHIFT] = addr
            out.append(_new(ShadowPage, (
                addr, row[ig], level, role, spt, unsync if unsync is UNKNOWN else unsync != 0,
                children, from_bytes(d[b0:b1], "little") if bitmap else UNKNOWN,
                root_count, row[igen], tdp)))
            if not 1 <= role.level <= 5:
                self.problem("struct kvm_mmu_page", addr, f"impossible level {role.level}")
            if children is not UNKNOWN and children > 512:
                self.problem("struct kvm_mmu_page", addr,
                             f"impossible unsync_children {children}")
        return out

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
        page table level", 5.13); roots were right. Decided once, from the
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
        off = drgn.offsetof(self.prog.type("struct kvm"), "arch") + drgn.offsetof(
            self.prog.type("struct kvm_arch"), "tdp_mmu_roots")
        vm_off = drgn.offsetof(self.prog.type("struct kvm"), "vm_list")
        for node in self.list_nodes(self.prog.symbol("vm_list").address, "vm_list"):
            for root in self.list_nodes(node - vm_off + off, "kvm->arch.tdp_mmu_roots"):
                root -= lay.sp.link
                level = level_of.get(self.prog.read_u32(root + lay.sp.role))
                spt = self.prog.read_u64(root + lay.sp.spt)
                for value in array.array("Q", self.prog.read(spt, 4096)):
                    if self.spte_present(value) and not spte.is_large_pte(value):
                        child = self.page_to_sp((value & lay.addr_mask) >> PAGE_SHIFT)
                        if child:
                            return level_of.get(self.prog.read_u32(child + lay.sp.role)) == level
        return False

    def sptes(self, sp: ShadowPage, keep: bool = True) -> array.array | None:
        """sp->spt[0..511] as one 4 KiB read; None if unreadable (recorded, and
        remembered). *keep*: False reads a table without keeping it (an audit
        reads 10^5 level-1 tables once); a copy already kept is still used."""
        if sp.addr in self._spt_cache:
            return self._spt_cache[sp.addr]
        out: array.array | None = array.array("Q")
        try:
            if sp.spt < KERNEL_MIN:
                raise drgn.FaultError("not a kernel address", sp.spt)
            out.frombytes(self.prog.read(sp.spt, 4096))
            if sys.byteorder != "little":
                out.byteswap()
        except drgn.FaultError as e:
            self.problem("struct kvm_mmu_page", sp.addr, f"spt {sp.spt:#x} unreadable ({e})")
            out = None
        if keep or out is None:
            self._spt_cache[sp.addr] = out
        return out

    @property
    def spte_format(self) -> spte.SpteFormat:
        """This release's SPTE decoding rules (kvminspect.spte)."""
        if self._spte_format is None:
            self._spte_format = spte.SpteFormat(self.layout.present_bit, self.layout.addr_mask)
        return self._spte_format

    def spte_masks(self, vm: VM | None = None) -> spte.SpteMasks:
        """The SPTE format as this kernel holds it: kvm.ko's shadow_*_mask
        globals (arch/x86/kvm/mmu/spte.c) and the probed SpteLayout; with *vm*,
        its own kvm->arch.shadow_mmio_value where the kernel keeps one (6.10+).

        A global the kernel lacks is a named fallback (5.10's SPTE_HOST_WRITEABLE
        / SPTE_MMU_WRITEABLE constants, SPTE_SPECIAL_MASK for MMIO,
        shadow_me_mask for shadow_me_value) or None ("unknown"), never an error.
        """
        if self._spte_masks is None:
            self._spte_masks = self._read_spte_masks()
        m = self._spte_masks
        if vm is not None and self._has_vm_mmio_value():
            try:
                kvm = self.kvm_object(vm)
                m = dataclasses.replace(m, mmio_value=kvm.arch.shadow_mmio_value.value_())
            except (drgn.FaultError, LookupError, AttributeError):
                pass
        return m

    def _has_vm_mmio_value(self) -> bool:
        """Whether struct kvm_arch has shadow_mmio_value (6.10+, TDX preparation)."""
        try:
            return has_member(self.prog.type("struct kvm_arch"), "shadow_mmio_value")
        except LookupError:
            return False

    def _global(self, name: str, size: int = 8) -> int | None:
        """A kvm.ko global by its symbol (u64, or u8/bool), None if absent or unreadable."""
        try:
            addr = self.prog.symbol(name).address
            if size == 1:
                return self.prog.read_u8(addr)
            return self.prog.read_u64(addr)
        except (LookupError, drgn.FaultError, ValueError):
            return None

    def spte_layout(self) -> spte.SpteLayout:
        """The SpteLayout of this kernel, probed: shadow_xu_mask (MBEC), then
        kvm->arch.shadow_mmio_value (SHADOW_NONPRESENT_VALUE came with it in
        6.10), then SPTE_MMU_PRESENT_MASK (Layout.present_bit, 5.13)."""
        if self._global("shadow_xu_mask") is not None:
            return spte.LAYOUT_MBEC
        if self._has_vm_mmio_value():
            return spte.LAYOUT_NONPRESENT
        if self.layout.present_bit:
            return spte.LAYOUT_PRESENT_BIT
        return spte.LAYOUT_SPECIAL

    def _read_spte_masks(self) -> spte.SpteMasks:
        """See spte_masks(): every global spte.GLOBALS names, then the fallbacks."""
        found = {name: v for name in spte.GLOBALS if (v := self._global(name)) is not None}
        for name in ("shadow_phys_bits", "enable_mmio_caching"):
            if (v := self._global(name, 1)) is not None:
                found[name] = v
        if "shadow_phys_bits" not in found:
            try:  # 7.x: kvm_host.maxphyaddr
                found["kvm_host.maxphyaddr"] = self.prog["kvm_host"].maxphyaddr.value_()
            except (LookupError, drgn.FaultError, AttributeError):
                pass
        return spte.masks_from_globals(found, self.spte_layout())

    def spte_bits(self, sp: ShadowPage, value: int, vm: VM | None = None) -> spte.SpteBits:
        """One SPTE of *sp*, every bit decoded (kvminspect.spte.decode_bits)."""
        return spte.decode_bits(value, sp.level, self.spte_format, self.spte_masks(vm))

    def spte_present(self, value: int) -> bool:
        """is_shadow_present_pte() of this release (kvminspect.spte)."""
        return spte.is_shadow_present_pte(value, self.spte_format)

    def decode(self, sp: ShadowPage, index: int, value: int, resolve: bool = True) -> Spte:
        """One SPTE of *sp*: presence, leaf-ness and the child shadow page."""
        d = spte.decode(value, sp.level, self.spte_format)
        child = None
        if d.present and not d.leaf and resolve:
            child = self.page_to_sp(d.pfn)
        return Spte(index, value, d.present, d.large, d.leaf, d.pfn, child,
                    spte.decode_bits(value, sp.level, self.spte_format, self.spte_masks()))

    def children(self, sp: ShadowPage) -> list[Spte]:
        """Present non-leaf SPTEs of *sp* with their child shadow pages."""
        return [self.decode(sp, i, value) for i, value, _ in self.links(sp)]

    def links(self, sp: ShadowPage) -> list[tuple[int, int, int | None]]:
        """(index, SPTE, child struct kvm_mmu_page or None) of every present
        non-leaf SPTE of *sp* (a page above level 1): the graph's edges.

        is_shadow_present_pte() and !is_large_pte() as masks over the whole
        table (the same rules as kvminspect.spte), and page_to_sp() for the child.
        """
        if sp.level <= 1:
            return []
        spt = self.sptes(sp)
        if spt is None:
            return []
        large = spte.PT_PAGE_SIZE_MASK
        if self.spte_format.present_bit:
            bit = spte.SPTE_MMU_PRESENT_MASK
            found = [(i, v) for i, v in enumerate(spt) if v & bit and not v & large]
        else:
            special, mmio = spte.SPTE_SPECIAL_MASK, spte.SPTE_MMIO_MASK
            found = [(i, v) for i, v in enumerate(spt)
                     if v and v & special != mmio and not v & large]
        mask, to_sp = self.layout.addr_mask, self.page_to_sp
        return [(i, v, to_sp((v & mask) >> PAGE_SHIFT)) for i, v in found]

    def active_pages(self, vm: VM) -> list[int]:
        """Shadow pages on kvm->arch.active_mmu_pages (and 6.1's tdp_mmu_pages)."""
        if self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        heads = [("active_mmu_pages", kvm.arch.active_mmu_pages.address_of_().value_())]
        if self.layout.tdp_mmu_pages_list:
            heads.append(("tdp_mmu_pages", kvm.arch.tdp_mmu_pages.address_of_().value_()))
        out = []
        for name, head in heads:
            out.extend(self._sp_list(head, f"kvm->arch.{name}"))
        return out

    def _sp_list(self, head: int, kind: str) -> list[int]:
        """The struct kvm_mmu_page of each node of a list through sp->link,
        decoded on the way into the shadow-page cache.

        The same walk as list_nodes (bounded, cycle-safe, poison-aware), but
        each node's next pointer comes from the struct just read: one
        read_block per page, the hot loop of a 10^5-page MMU.
        """
        lay = self.layout.sp
        assert lay is not None
        link, size, cache = lay.link, lay.size, self._sp_cache
        block, unpack = self.read_block, _U64.unpack_from
        out: list[int] = []
        todo: list[int] = []  # not decoded yet, and their bytes
        blocks: list[bytes] = []
        try:
            node = self.read_word(head)
        except drgn.FaultError as e:
            self.problem(kind, head, f"list head unreadable ({e})")
            return out
        if node == 0:  # never initialised (e.g. the TDP MMU lists of a shadow VM)
            return out
        pages, page_mask = self._pages, ~(PAGE_SIZE - 1)
        # Brent's cycle detection (no set of every node): the tortoise jumps to
        # the current node after 1, 2, 4, ... steps; a loop is met within twice
        # its length and prefix
        tortoise, power, steps = None, 1, 0
        tick = 0x4000
        while node != head:
            if node < KERNEL_MIN:  # also LIST_POISON1/2 (0xdead...)
                self.problem(kind, node, "list pointer is poisoned or not a kernel address")
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
                if self.on_progress is not None:
                    self.on_progress(len(out))
            page = addr & page_mask
            data = pages.get(page)
            off = addr - page
            try:
                if data is not None and off + size <= PAGE_SIZE:  # read_block, inline
                    d = data[off:off + size]
                else:
                    d = block(addr, size)
            except drgn.FaultError as e:
                self.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
                cache[addr] = None
                try:  # the list goes on if the node itself is readable
                    node = self.read_word(node)
                except drgn.FaultError as e:
                    self.problem(kind, node, f"list node unreadable ({e})")
                    break
                continue
            if addr not in cache:  # (a list that loops may list a page twice: harmless)
                todo.append(addr)
                blocks.append(d)
                if len(todo) == 4096:  # decoded in runs: a few MB of bytes at most
                    for sp in self._decode_many(todo, blocks):
                        cache[sp.addr] = sp
                    todo, blocks = [], []
            node = unpack(d, link)[0]
        for sp in self._decode_many(todo, blocks):
            cache[sp.addr] = sp
        return out

    def _cut_loop(self, out: list[int], node: int, link: int, kind: str,
                  head: int) -> list[int]:
        """A looping list's structs up to the first node met twice (reported);
        *node*: where the walk stopped (met again, or the MAX_LIST-th)."""
        seen: set[int] = set()
        for n, addr in enumerate(out):
            if addr in seen:
                self.problem(kind, head, f"list loops at {addr + link:#x}")
                return out[:n]
            seen.add(addr)
        if node - link in seen:
            self.problem(kind, head, f"list loops at {node:#x}")
        else:
            self.problem(kind, head, f"list loops (more than {MAX_LIST} nodes)")
        return out

    def tdp_roots(self, vm: VM) -> list[int]:
        """TDP MMU roots on kvm->arch.tdp_mmu_roots (invalid roots stay listed)."""
        if not self.layout.tdp_mmu_roots or self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        head = kvm.arch.tdp_mmu_roots.address_of_().value_()
        return [n - self.layout.sp.link for n in self.list_nodes(head, "kvm->arch.tdp_mmu_roots")]
