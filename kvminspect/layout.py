"""Where KVM keeps its MMU state in this kernel, probed from the DWARF.

Every layout difference between kernel versions that kvminspect handles is
decided here, once per program, by looking for struct members and symbols;
nothing branches on a version string. Each probe names the kernel change it
is for. See ``shared/reference/kvm-mmu-layouts.md`` for the history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import drgn

from kvminspect.errors import KvmNotFound

INVALID_PAGE = 2**64 - 1
PAGE_SHIFT = 12
SPTE_PRESENT_BIT = 1 << 11  # SPTE_MMU_PRESENT_MASK (5.13+)
SPTE_LARGE_BIT = 1 << 7  # PT_PAGE_SIZE_MASK
PT_PRESENT_MASK = 1  # bit 0: present in pae_root[] entries and old SPTEs


def _bare(t: drgn.Type) -> drgn.Type:
    """*t* without typedefs and qualifiers."""
    return t.unaliased().unqualified()


def has_member(type_: drgn.Type, name: str) -> bool:
    """Whether a struct/union type has member *name* (anonymous members too)."""
    try:
        type_.member(name)
    except LookupError:
        return False
    return True


def member_offset(type_: drgn.Type, name: str) -> int:
    """Byte offset of member *name*, looking through anonymous unions."""
    return drgn.offsetof(type_, name)


def member_size(type_: drgn.Type, name: str) -> int:
    """Size in bytes of member *name*."""
    return drgn.sizeof(type_.member(name).type)


@dataclass(frozen=True)
class Bitfield:
    """One bitfield of union kvm_mmu_page_role (offset and width in bits)."""

    name: str
    shift: int
    width: int

    def get(self, word: int) -> int:
        return (word >> self.shift) & ((1 << self.width) - 1)


def role_bitfields(role_type: drgn.Type) -> list[Bitfield]:
    """Every named bitfield of union kvm_mmu_page_role, by its DWARF position.

    Names vary (cr4_pae -> gpte_is_8_bytes -> has_4_byte_gpte, nxe -> efer_nx,
    passthrough from 5.19, is_mirror from 6.14): the DWARF tells which exist.
    """
    out: list[Bitfield] = []

    def walk(t: drgn.Type, base: int) -> None:
        t = _bare(t)
        for m in t.members or ():
            mt = _bare(m.type)
            if m.name is None and mt.kind in (drgn.TypeKind.STRUCT, drgn.TypeKind.UNION):
                walk(mt, base + m.bit_offset)
            elif m.name and m.name != "word" and mt.kind == drgn.TypeKind.INT:
                width = m.bit_field_size or drgn.sizeof(mt) * 8
                out.append(Bitfield(m.name, base + m.bit_offset, width))

    walk(role_type, 0)
    return out


@dataclass(frozen=True)
class SpLayout:
    """Offsets of the struct kvm_mmu_page fields kvminspect reads."""

    size: int
    link: int
    gfn: int
    spt: int
    role: int
    unsync: int
    unsync_children: int
    unsync_child_bitmap: int
    bitmap_bytes: int
    root_count: int
    mmu_valid_gen: int
    mmu_valid_gen_size: int
    tdp_mmu_page: int | None  # 5.10+
    role_fields: tuple[Bitfield, ...] = field(default=())


@dataclass(frozen=True)
class Layout:
    """Everything about this kernel's KVM layout that kvminspect needs."""

    sp: SpLayout
    vcpu_array: bool  # kvm->vcpu_array xarray (5.16/5.17+) vs kvm->vcpus[]
    mmu_is_pointer: bool  # vcpu->arch.mmu is a pointer (4.20+) vs embedded
    root_info: bool  # mmu->root.{hpa,pgd} (5.18+) vs mmu->root_hpa
    root_pgd_name: str | None  # root_pgd (5.8+) / root_cr3 (4.20-5.4) / None
    prev_pgd_name: str  # prev_roots[].pgd (5.8+) vs .cr3
    root_role: bool  # mmu->root_role / cpu_role (5.19+) vs mmu_role / base_role
    special_roots: tuple[str, ...]  # pae_root, lm_root / pml4_root, pml5_root
    tdp_mmu_per_vm: bool  # kvm->arch.tdp_mmu_enabled (5.10-6.2, some backports)
    tdp_mmu_roots: bool  # kvm->arch.tdp_mmu_roots (5.10+)
    tdp_mmu_pages_list: bool  # kvm->arch.tdp_mmu_pages list (5.10-6.1)
    present_bit: bool  # SPTE_MMU_PRESENT_MASK era (5.13+), see spte_present()
    addr_mask: int  # SPTE_BASE_ADDR_MASK (PT64_BASE_ADDR_MASK before 6.0)
    page_size: int  # sizeof(struct page)
    page_private: int  # offsetof(struct page, private)
    vmemmap_base: int
    page_offset_base: int


def _sp_layout(prog: drgn.Program) -> SpLayout:
    """Offsets in struct kvm_mmu_page (kvm.ko DWARF)."""
    t = prog.type("struct kvm_mmu_page")
    # mmu_valid_gen: unsigned long in 4.19/4.20, u8 from 5.4, in a union with
    # tdp_mmu_scheduled_root_to_zap from 6.6 (and in Debian's 6.1.192)
    return SpLayout(
        size=drgn.sizeof(t),
        link=member_offset(t, "link"),
        gfn=member_offset(t, "gfn"),
        spt=member_offset(t, "spt"),
        role=member_offset(t, "role"),
        unsync=member_offset(t, "unsync"),
        unsync_children=member_offset(t, "unsync_children"),
        unsync_child_bitmap=member_offset(t, "unsync_child_bitmap"),
        bitmap_bytes=member_size(t, "unsync_child_bitmap"),
        # root_count: int to 5.12, union with refcount_t tdp_mmu_root_count
        # from 5.14 (same offset, the int view is what the kernel prints)
        root_count=member_offset(t, "root_count"),
        mmu_valid_gen=member_offset(t, "mmu_valid_gen"),
        mmu_valid_gen_size=member_size(t, "mmu_valid_gen"),
        tdp_mmu_page=member_offset(t, "tdp_mmu_page") if has_member(t, "tdp_mmu_page") else None,
        role_fields=tuple(role_bitfields(t.member("role").type)),
    )


def _symbol_u64(prog: drgn.Program, name: str, default: int | None = None) -> int:
    """Read a u64 global through the symbol table (works without its DWARF)."""
    try:
        return prog.read_u64(prog.symbol(name).address)
    except (LookupError, drgn.FaultError):
        if default is None:
            raise
        return default


def probe(prog: drgn.Program) -> Layout:
    """Probe the DWARF and symbols of *prog* for KVM's MMU layout.

    Raises KvmNotFound when kvm.ko (its types or vm_list) is not there.
    """
    try:
        prog.symbol("vm_list")
        kvm = prog.type("struct kvm")
        kvm_arch = prog.type("struct kvm_arch")
        vcpu_arch = prog.type("struct kvm_vcpu_arch")
        mmu = prog.type("struct kvm_mmu")
        prog.type("struct kvm_mmu_page")
    except LookupError as e:
        raise KvmNotFound(f"kvm is not loaded or its debug info is missing ({e})") from None
    prev = _bare(mmu.member("prev_roots").type).type
    try:
        page = prog.type("struct page")
        page_size, page_private = drgn.sizeof(page), drgn.offsetof(page, "private")
    except LookupError:
        page_size, page_private = 64, 40  # x86-64 without struct page debug info
    # SPTE_BASE_ADDR_MASK is physical_mask & PAGE_MASK with
    # CONFIG_DYNAMIC_PHYSICAL_MASK (SME), else bits 12..51
    physical_mask = _symbol_u64(prog, "physical_mask", (1 << 52) - 1)
    mmu_member = vcpu_arch.member("mmu")
    return Layout(
        sp=_sp_layout(prog),
        # 5.16: kvm->vcpus[KVM_MAX_VCPUS] became the vcpu_array xarray
        vcpu_array=has_member(kvm, "vcpu_array"),
        # 4.20: vcpu->arch.mmu became a pointer to root_mmu or guest_mmu
        mmu_is_pointer=_bare(mmu_member.type).kind == drgn.TypeKind.POINTER,
        # 5.18: root_hpa/root_pgd folded into struct kvm_mmu_root_info root
        root_info=has_member(mmu, "root"),
        root_pgd_name=next((n for n in ("root_pgd", "root_cr3") if has_member(mmu, n)), None),
        # 5.8: prev_roots[].cr3 renamed pgd
        prev_pgd_name="pgd" if has_member(prev, "pgd") else "cr3",
        # 5.19: mmu_role split into cpu_role and root_role
        root_role=has_member(mmu, "root_role"),
        special_roots=tuple(
            n for n in ("pae_root", "lm_root", "pml4_root", "pml5_root") if has_member(mmu, n)
        ),
        # 6.3 moved tdp_mmu_enabled from struct kvm_arch to a kvm.ko global
        tdp_mmu_per_vm=has_member(kvm_arch, "tdp_mmu_enabled"),
        tdp_mmu_roots=has_member(kvm_arch, "tdp_mmu_roots"),
        # 6.2 replaced the tdp_mmu_pages list by a counter
        tdp_mmu_pages_list=has_member(kvm_arch, "tdp_mmu_pages")
        and _bare(kvm_arch.member("tdp_mmu_pages").type).tag == "list_head",
        # 5.13 introduced SPTE_MMU_PRESENT_MASK (bit 11) together with the
        # TDP MMU root refcount union; before it presence was "!= 0 && !mmio"
        present_bit=has_member(prog.type("struct kvm_mmu_page"), "tdp_mmu_root_count"),
        addr_mask=physical_mask & ~0xFFF & ((1 << 52) - 1),
        page_size=page_size,
        page_private=page_private,
        vmemmap_base=_symbol_u64(prog, "vmemmap_base", 0xFFFFEA0000000000),
        page_offset_base=_symbol_u64(prog, "page_offset_base", 0xFFFF888000000000),
    )
