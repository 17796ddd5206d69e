"""struct kvm_mmu_page: shadow pages, their spt[] and the VM page lists."""

from __future__ import annotations

import array
import sys

import drgn

from kvminspect import spte
from kvminspect.layout import (
    PAGE_SHIFT,
    UNKNOWN,
    known,
)
from kvminspect.objects import (
    KERNEL_MIN,
    VM,
    Int,
    Role,
    ShadowPage,
    Spte,
    _struct_int,
)
from kvminspect.read_base import KernelBase


class PageReader(KernelBase):
    """struct kvm_mmu_page: shadow pages, their spt[] and the VM page lists."""

    def page_private(self, pfn: int) -> int:
        """page_private(pfn_to_page(pfn)); FaultError if there is no such struct page."""
        lay = self.layout
        page = lay.vmemmap_base + pfn * lay.page_size + lay.page_private
        if page >= 2**64:
            raise drgn.FaultError("pfn beyond any struct page", pfn)
        return self.prog.read_u64(page)

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
        """struct kvm_mmu_page at *addr*, read as one block; None if unreadable."""
        if addr in self._sp_cache:
            return self._sp_cache[addr]
        lay = self.layout.sp
        if lay is None:  # a structural member is missing (a MissingMember says which)
            return None
        sp: ShadowPage | None = None
        try:
            if addr < KERNEL_MIN:
                raise drgn.FaultError("not a kernel address", addr)
            d = self.prog.read(addr, lay.size)
            word = _struct_int(d, lay.role, 4)
            role = Role(word, {f.name: f.get(word) for f in lay.role_fields}, self._role_widths)
            def opt(off: int | None, size: int, signed: bool = False) -> Int:
                return UNKNOWN if off is None else _struct_int(d, off, size, signed)

            unsync = opt(lay.unsync, 1)
            root_count = opt(lay.root_count, 4, signed=True)
            tdp = bool(d[lay.tdp_mmu_page]) if lay.tdp_mmu_page is not None else False
            level = role.level
            if tdp and root_count == 0 and self.tdp_child_level_is_parents():
                level -= 1
            sp = ShadowPage(
                addr=addr,
                gfn=_struct_int(d, lay.gfn, 8),
                level=level,
                role=role,
                spt=_struct_int(d, lay.spt, 8),
                unsync=bool(unsync) if known(unsync) else UNKNOWN,
                unsync_children=opt(lay.unsync_children, 4),
                unsync_child_bitmap=opt(lay.unsync_child_bitmap, lay.bitmap_bytes),
                root_count=root_count,
                mmu_valid_gen=opt(lay.mmu_valid_gen, lay.mmu_valid_gen_size),
                tdp_mmu_page=tdp,
            )
            if not 1 <= role.level <= 5:
                self.problem("struct kvm_mmu_page", addr, f"impossible level {role.level}")
            if known(sp.unsync_children) and sp.unsync_children > 512:
                self.problem("struct kvm_mmu_page", addr,
                             f"impossible unsync_children {sp.unsync_children}")
        except drgn.FaultError as e:
            self.problem("struct kvm_mmu_page", addr, f"unreadable ({e})")
        self._sp_cache[addr] = sp
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
        if sp.level <= 1:
            return []
        spt = self.sptes(sp)
        if spt is None:
            return []
        fmt, present = self.spte_format, spte.is_shadow_present_pte
        return [self.decode(sp, i, value) for i, value in enumerate(spt)
                if value and present(value, fmt) and not spte.is_large_pte(value)]

    def active_pages(self, vm: VM) -> list[int]:
        """Shadow pages on kvm->arch.active_mmu_pages (and 6.1's tdp_mmu_pages)."""
        if self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        link = self.layout.sp.link
        heads = [("active_mmu_pages", kvm.arch.active_mmu_pages.address_of_().value_())]
        if self.layout.tdp_mmu_pages_list:
            heads.append(("tdp_mmu_pages", kvm.arch.tdp_mmu_pages.address_of_().value_()))
        out = []
        for name, head in heads:
            out.extend(n - link for n in self.list_nodes(head, f"kvm->arch.{name}"))
        return out

    def tdp_roots(self, vm: VM) -> list[int]:
        """TDP MMU roots on kvm->arch.tdp_mmu_roots (invalid roots stay listed)."""
        if not self.layout.tdp_mmu_roots or self.layout.sp is None:
            return []
        kvm = self.kvm_object(vm)
        head = kvm.arch.tdp_mmu_roots.address_of_().value_()
        return [n - self.layout.sp.link for n in self.list_nodes(head, "kvm->arch.tdp_mmu_roots")]
