"""struct kvm_mmu_page: shadow pages, their spt[] and the VM page lists."""

from __future__ import annotations

import array
import struct
import sys

import drgn

from kvminspect import spte
from kvminspect.layout import (
    PAGE_SHIFT,
    UNKNOWN,
    SpLayout,
)
from kvminspect.objects import (
    KERNEL_MIN,
    VM,
    Role,
    ShadowPage,
    Spte,
)
from kvminspect.read_base import KernelBase


class SpDecoder:
    """The struct kvm_mmu_page fields kvminspect reads, decoded in one call.

    From SpLayout's offsets: one struct.Struct over the fields that do not
    overlap (a union member such as 6.14's unsync_children/external_spt is
    read on its own), missing members read as UNKNOWN.
    """

    NAMES = ("gfn", "role", "spt", "unsync", "unsync_children", "unsync_child_bitmap",
             "root_count", "mmu_valid_gen", "tdp_mmu_page")

    def __init__(self, lay: SpLayout) -> None:
        codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
        spec = {"gfn": (lay.gfn, "Q"), "role": (lay.role, "I"), "spt": (lay.spt, "Q"),
                "unsync": (lay.unsync, "B"), "unsync_children": (lay.unsync_children, "I"),
                "root_count": (lay.root_count, "i"),
                "mmu_valid_gen": (lay.mmu_valid_gen, codes.get(lay.mmu_valid_gen_size, "Q")),
                "tdp_mmu_page": (lay.tdp_mmu_page, "B")}
        fmt, pos, at, self.slots = "<", 0, 0, {}
        for name, (off, code) in sorted(((n, v) for n, v in spec.items() if v[0] is not None),
                                        key=lambda nv: nv[1][0]):
            if off < pos:  # overlaps the previous field: read alone
                self.slots[name] = (off, struct.Struct("<" + code))
                continue
            fmt += f"{off - pos}x{code}" if off > pos else code
            self.slots[name] = at
            at += 1
            pos = off + struct.calcsize(code)
        self.struct = struct.Struct(fmt)
        env: dict = {"UNKNOWN": UNKNOWN, "unpack": self.struct.unpack_from,
                     "from_bytes": int.from_bytes}
        parts = []
        for name in self.NAMES:
            slot = self.slots.get(name)
            if name == "unsync_child_bitmap" and lay.unsync_child_bitmap is not None:
                a = lay.unsync_child_bitmap
                parts.append(f"from_bytes(d[{a}:{a + lay.bitmap_bytes}], 'little')")
            elif slot is None:
                parts.append("UNKNOWN")
            elif isinstance(slot, int):
                parts.append(f"v[{slot}]")
            else:
                env[f"u_{name}"] = slot[1].unpack_from
                parts.append(f"u_{name}(d, {slot[0]})[0]")
        # one expression built from offsets only: ~1 us a page instead of a loop
        self.values = eval(f"lambda d, v=None: (lambda v: ({', '.join(parts)},))(unpack(d))",
                           env)
        """values(d) -> (gfn, role word, spt, unsync, unsync_children,
        unsync_child_bitmap, root_count, mmu_valid_gen, tdp_mmu_page)."""


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

        None both when the page has no private pointer and when its struct page
        cannot be read (e.g. an SPTE of a garbage page table): callers say which
        object pointed there.
        """
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

    def _decode_sp(self, addr: int, d: bytes) -> ShadowPage:
        """A struct kvm_mmu_page's bytes as a ShadowPage (see SpDecoder)."""
        dec = self._sp_decoder
        if dec is None:
            assert self.layout.sp is not None
            dec = self._sp_decoder = SpDecoder(self.layout.sp)
        gfn, word, spt, unsync, children, bitmap, root_count, gen, tdp = dec.values(d)
        role = self._roles.get(word)
        if role is None:
            role = self._roles[word] = Role(
                word, {f.name: f.get(word) for f in self.layout.sp.role_fields},
                self._role_widths)
        level = role.level
        tdp = bool(tdp)
        if tdp and root_count == 0 and self.tdp_child_level_is_parents():
            level -= 1
        self._by_spt[(spt - self.layout.page_offset_base) >> PAGE_SHIFT] = addr
        sp = ShadowPage(addr, gfn, level, role, spt,
                        unsync if unsync is UNKNOWN else bool(unsync),
                        children, bitmap, root_count, gen, tdp)
        if not 1 <= role.level <= 5:
            self.problem("struct kvm_mmu_page", addr, f"impossible level {role.level}")
        if children is not UNKNOWN and children > 512:
            self.problem("struct kvm_mmu_page", addr, f"impossible unsync_children {children}")
        return sp

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

    def sptes(self, sp: ShadowPage) -> array.array | None:
        """sp->spt[0..511] as one 4 KiB read; None if unreadable."""
        if sp.addr not in self._spt_cache:
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
            self._spt_cache[sp.addr] = out
        return self._spt_cache[sp.addr]

    @property
    def spte_format(self) -> spte.SpteFormat:
        """This release's SPTE decoding rules (kvminspect.spte)."""
        if self._spte_format is None:
            self._spte_format = spte.SpteFormat(self.layout.present_bit, self.layout.addr_mask)
        return self._spte_format

    def spte_present(self, value: int) -> bool:
        """is_shadow_present_pte() of this release (kvminspect.spte)."""
        return spte.is_shadow_present_pte(value, self.spte_format)

    def decode(self, sp: ShadowPage, index: int, value: int, resolve: bool = True) -> Spte:
        """One SPTE of *sp*: presence, leaf-ness and the child shadow page."""
        d = spte.decode(value, sp.level, self.spte_format)
        child = None
        if d.present and not d.leaf and resolve:
            child = self.page_to_sp(d.pfn)
        return Spte(index, value, d.present, d.large, d.leaf, d.pfn, child)

    def children(self, sp: ShadowPage) -> list[Spte]:
        """Present non-leaf SPTEs of *sp* with their child shadow pages."""
        return [self.decode(sp, i, value) for i, value, _ in self.links(sp)]

    def links(self, sp: ShadowPage) -> list[tuple[int, int, int | None]]:
        """(index, SPTE, child struct kvm_mmu_page or None) of every present
        non-leaf SPTE of *sp* (a page above level 1): the graph's edges.

        is_shadow_present_pte() and !is_large_pte() as masks over the whole
        table (the same rules as kvminspect.spte), and to_shadow_page(): the
        page already decoded whose sp->spt is that pfn (the kernel sets
        page->private to the sp that owns sp->spt), else page_private of the
        pfn's struct page.
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
        mask, to_sp, by_spt = self.layout.addr_mask, self.page_to_sp, self._by_spt
        out = []
        for i, v in found:
            pfn = (v & mask) >> PAGE_SHIFT
            out.append((i, v, by_spt.get(pfn) or to_sp(pfn)))
        return out

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
        decoded on the way (into the shadow-page cache): the list node and the
        struct share a page of read_block's cache."""
        lay = self.layout.sp
        assert lay is not None
        link, size, cache = lay.link, lay.size, self._sp_cache
        decode, block = self._decode_sp, self.read_block
        out = []
        for node in self.list_nodes(head, kind):
            addr = node - link
            out.append(addr)
            if addr not in cache:
                try:
                    cache[addr] = decode(addr, block(addr, size))
                except drgn.FaultError as e:
                    self.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
                    cache[addr] = None
        return out

    def tdp_roots(self, vm: VM) -> list[int]:
        """TDP MMU roots on kvm->arch.tdp_mmu_roots (invalid roots stay listed)."""
        if not self.layout.tdp_mmu_roots or self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        head = kvm.arch.tdp_mmu_roots.address_of_().value_()
        return [n - self.layout.sp.link for n in self.list_nodes(head, "kvm->arch.tdp_mmu_roots")]
