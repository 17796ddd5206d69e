"""Where KVM keeps its MMU state in this kernel, probed from the DWARF.

Every layout difference between kernel versions that kvminspect handles is
decided here, once per program, by looking for struct members and symbols;
nothing branches on a version string. Each probe names the kernel change it
is for; docs/kernel-layouts.md lists them all, with how each is verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

import drgn

from kvminspect.errors import KvmNotFound
from kvminspect.spte import spte_base_addr_mask


class NoValue:
    """A field with no value to show, and why: one instance per reason.

    UNKNOWN: this kernel's debug info lacks the member ("unknown").
    UNREADABLE: the member exists but its memory could not be read
    ("unreadable"; a problem names the object). Both are distinct from
    INVALID_PAGE (a root the kernel marked invalid) and from None (nothing
    there, e.g. a vCPU without a thread yet). Formatting one with any spec
    gives its name; it is false, and never a number.
    """

    _instances: dict[str, NoValue] = {}

    def __new__(cls, name: str) -> NoValue:
        if name not in cls._instances:
            inst = super().__new__(cls)
            inst.name = name
            cls._instances[name] = inst
        return cls._instances[name]

    name: str

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return self.name

    def __bool__(self) -> bool:
        return False


UNKNOWN = NoValue("unknown")
UNREADABLE = NoValue("unreadable")
Int = int | NoValue  # a counter or id that this kernel may lack (UNKNOWN)
_T = TypeVar("_T")


def known(v: _T | NoValue) -> TypeGuard[_T]:
    """Whether *v* is a value read from the kernel (not UNKNOWN or UNREADABLE);
    a type guard: where it holds, *v* is the value's own type."""
    return not isinstance(v, NoValue)


@dataclass(frozen=True)
class MissingMember:
    """A struct member kvminspect reads that this kernel's debug info lacks."""

    struct: str  # "struct kvm_arch"
    member: str  # "n_used_mmu_pages"
    release: str  # the kernel release, "?" if unknown
    effect: str  # what is shown instead

    def __str__(self) -> str:
        return (f"{self.struct} has no member {self.member} in kernel {self.release}: "
                f"{self.effect}")

    def to_json(self) -> dict[str, str]:
        return {"member": f"{self.struct}.{self.member}", "kernel": self.release,
                "warning": str(self)}


@dataclass(frozen=True)
class MissingType:
    """A type kvminspect reads that this kernel's debug info lacks: a loaded
    module whose debug file was not given (kvm-amd.ko's struct vcpu_svm)."""

    type: str  # "struct vcpu_svm"
    module: str  # "kvm_amd", the module that defines it
    debug_file: str  # "kvm-amd.ko", the debug file that has it
    release: str  # the kernel release, "?" if unknown
    effect: str  # what is lost

    def __str__(self) -> str:
        return (f"{self.type} is not in the debug info of kernel {self.release} (no "
                f"matching {self.debug_file} for {self.module}; give it with -s): {self.effect}")

    def to_json(self) -> dict[str, str]:
        return {"member": self.type, "kernel": self.release, "warning": str(self)}


# A warning of the "warnings" channel (JSON "warnings", stderr "kvminspect: warning:"):
# what this kernel's debug info lacks, and what is shown or lost instead
Missing = MissingMember | MissingType


# Members the model reads as plain values. A kernel without one of them gets a
# MissingMember warning and the field is UNKNOWN; nothing else changes.
VALUE_MEMBERS: dict[str, tuple[str, ...]] = {
    "struct kvm": ("userspace_pid", "online_vcpus", "created_vcpus", "stat"),
    "struct kvm_arch": ("n_requested_mmu_pages", "n_max_mmu_pages", "mmu_valid_gen",
                        "indirect_shadow_pages"),
    "struct kvm_vcpu": ("vcpu_id", "cpu", "mode", "pid", "stat", "requests"),
    "struct kvm_vcpu_arch": ("mp_state", "cr3"),
}
# struct kvm_mmu_page members without which no shadow page can be read: the
# hierarchy, the unsync walk and the checks are then skipped, with a warning
SP_STRUCTURAL = ("link", "role", "gfn", "spt")
# struct kvm_mmu_page members read as values (UNKNOWN when missing)
SP_VALUES = ("unsync", "unsync_children", "unsync_child_bitmap", "root_count",
             "mmu_valid_gen")


def bare_type(t: drgn.Type) -> drgn.Type:
    """*t* without typedefs and qualifiers."""
    return t.unaliased().unqualified()


def has_member(type_: drgn.Type, name: str) -> bool:
    """Whether a struct/union type (or a pointer to one) has member *name*
    (anonymous members too)."""
    type_ = bare_type(type_)
    if type_.kind == drgn.TypeKind.POINTER:
        type_ = bare_type(type_.type)
    try:
        type_.member(name)
    except LookupError:
        return False
    return True


def member_offset(type_: drgn.Type, name: str) -> int:
    """Byte offset of member *name*, looking through anonymous unions."""
    return int(drgn.offsetof(type_, name))


def member_size(type_: drgn.Type, name: str) -> int:
    """Size in bytes of member *name*."""
    return int(drgn.sizeof(type_.member(name).type))


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
    Kernel changes: 5.17 "KVM: X86: Rename gpte_is_8_bytes to has_4_byte_gpte and
    invert the direction" (bb3b394d35e8); 5.19 "KVM: X86/MMU: Fix shadowing 5-level
    NPT for 4-level NPT L1 guest" (84e5ffd045f3) added passthrough; 6.14 "KVM:
    x86/mmu: Add an is_mirror member for union kvm_mmu_page_role".
    cr4_pae -> gpte_is_8_bytes by 5.4, nxe -> efer_nx by 5.15, as the DWARF trees in
    tests/layouts show (4.19, 5.4, 5.15; commits not found).
    """
    out: list[Bitfield] = []

    def walk(t: drgn.Type, base: int) -> None:
        t = bare_type(t)
        for m in t.members or ():
            mt = bare_type(m.type)
            if m.name is None and mt.kind in (drgn.TypeKind.STRUCT, drgn.TypeKind.UNION):
                walk(mt, base + m.bit_offset)
            elif m.name and m.name != "word" and mt.kind == drgn.TypeKind.INT:
                width = m.bit_field_size or drgn.sizeof(mt) * 8
                out.append(Bitfield(m.name, base + m.bit_offset, width))

    walk(role_type, 0)
    return out


@dataclass(frozen=True)
class SpLayout:
    """Offsets of the struct kvm_mmu_page fields kvminspect reads.

    A value field is None when the kernel lacks that member (read as UNKNOWN).
    """

    size: int
    link: int
    gfn: int
    spt: int
    role: int
    unsync: int | None
    unsync_children: int | None
    unsync_child_bitmap: int | None
    bitmap_bytes: int
    root_count: int | None
    mmu_valid_gen: int | None
    mmu_valid_gen_size: int
    tdp_mmu_page: int | None  # 5.10+
    role_fields: tuple[Bitfield, ...] = field(default=())


@dataclass(frozen=True)
class Layout:
    """Everything about this kernel's KVM layout that kvminspect needs."""

    sp: SpLayout | None  # None: struct kvm_mmu_page lacks a structural member
    vcpu_array: bool  # kvm->vcpu_array xarray (5.17) vs kvm->vcpus[]
    mmu_is_pointer: bool  # vcpu->arch.mmu is a pointer (4.20+) vs embedded
    root_info: bool  # mmu->root.{hpa,pgd} (5.18+) vs mmu->root_hpa
    root_pgd_name: str | None  # root_pgd (5.8+) / root_cr3 (4.20-5.7) / None
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
    # where kvm->arch.n_used_mmu_pages lives: "arch.n_used_mmu_pages" to 7.2,
    # "stat.mmu_shadow_pages" from 7.3, None if neither exists (the 7.3 change:
    # kvm_account_mmu_page(); its commit was not found in the sources read)
    used_pages_path: str | None = None
    # KVM_X86_TDX_VM and friends: kvm->arch.vm_type (6.8+), else None
    vm_type: bool = False
    mirror_root: bool = False  # mmu->mirror_root_hpa (6.14+, TDX)
    # 5.13 "KVM: x86/mmu: Make TDP MMU root refcount atomic" (11cccf5c0472): the TDP
    # MMU root count became refcount_t tdp_mmu_root_count (in a union with
    # root_count); before it tdp_mmu_roots held no reference
    tdp_root_refcount: bool = False
    # the struct kvm_mmu members of struct kvm_vcpu_arch that own roots: root_mmu
    # and guest_mmu (L2's shadow NPT/EPT MMU) from 4.20 ("x86/kvm/mmu: introduce
    # guest_mmu"); () when vcpu->arch.mmu is the one embedded MMU (4.19).
    # nested_mmu is a guest page-table walker only.
    root_mmus: tuple[str, ...] = ()
    missing: tuple[MissingMember, ...] = ()
    absent: frozenset[tuple[str, str]] = frozenset()  # (struct, member) of missing

    @property
    def unsync_known(self) -> bool:
        """Whether the unsync walk can be replayed: unsync, unsync_children and
        unsync_child_bitmap are all there."""
        sp = self.sp
        return sp is not None and None not in (sp.unsync, sp.unsync_children,
                                               sp.unsync_child_bitmap)

    def lacks(self, struct: str, member: str) -> bool:
        """Whether this kernel's *struct* lacks *member* (a MissingMember)."""
        return (struct, member) in self.absent

    def value(self, obj: drgn.Object, struct: str, member: str) -> Int:
        """obj.member's integer value, or UNKNOWN when *struct* lacks *member*."""
        if self.lacks(struct, member):
            return UNKNOWN
        return int(obj.member_(member).value_())


def _opt_offset(t: drgn.Type, name: str) -> int | None:
    """offsetof(t, name), or None when the member is not there."""
    return member_offset(t, name) if has_member(t, name) else None


def _sp_layout(prog: drgn.Program) -> SpLayout | None:
    """Offsets in struct kvm_mmu_page (kvm.ko DWARF); None without a structural member."""
    t = prog.type("struct kvm_mmu_page")
    if not all(has_member(t, m) for m in SP_STRUCTURAL):
        return None
    # mmu_valid_gen: unsigned long in 4.19, u8 in 5.4 (as the tests/layouts DWARF trees
    # show; commit not found), in a union with
    # tdp_mmu_scheduled_root_to_zap from 6.6 (and in Debian's 6.1.192): 6.6 "KVM:
    # x86/mmu: Stop zapping invalidated TDP MMU roots asynchronously" (0df9dab891ff)
    return SpLayout(
        size=drgn.sizeof(t),
        link=member_offset(t, "link"),
        gfn=member_offset(t, "gfn"),
        spt=member_offset(t, "spt"),
        role=member_offset(t, "role"),
        unsync=_opt_offset(t, "unsync"),
        unsync_children=_opt_offset(t, "unsync_children"),
        unsync_child_bitmap=_opt_offset(t, "unsync_child_bitmap"),
        bitmap_bytes=member_size(t, "unsync_child_bitmap")
        if has_member(t, "unsync_child_bitmap") else 0,
        # root_count: int to 5.12, union with refcount_t tdp_mmu_root_count
        # from 5.13 (same offset, the int view is what the kernel prints): 5.13
        # "KVM: x86/mmu: Make TDP MMU root refcount atomic" (11cccf5c0472)
        root_count=_opt_offset(t, "root_count"),
        mmu_valid_gen=_opt_offset(t, "mmu_valid_gen"),
        mmu_valid_gen_size=member_size(t, "mmu_valid_gen")
        if has_member(t, "mmu_valid_gen") else 0,
        # 5.10 "kvm: x86/mmu: Allocate and free TDP MMU roots" (02c00b3a2f7e)
        tdp_mmu_page=_opt_offset(t, "tdp_mmu_page"),
        role_fields=tuple(role_bitfields(t.member("role").type)),
    )


def _missing_members(prog: drgn.Program, release: str, used_pages_path: str | None
                     ) -> list[MissingMember]:
    """Every member the model reads that this kernel lacks, with what is shown instead."""
    out: list[MissingMember] = []
    for struct, members in VALUE_MEMBERS.items():
        t = prog.type(struct)
        out.extend(MissingMember(struct, m, release, f"{m} shown as unknown")
                   for m in members if not has_member(t, m))
    if used_pages_path is None:
        out.append(MissingMember("struct kvm_arch", "n_used_mmu_pages", release,
                                 "n_used_mmu_pages shown as unknown (nor is there "
                                 "kvm->stat.mmu_shadow_pages)"))
    sp = prog.type("struct kvm_mmu_page")
    for m in SP_STRUCTURAL:
        if not has_member(sp, m):
            out.append(MissingMember("struct kvm_mmu_page", m, release,
                                     "shadow pages cannot be read (no hierarchy, unsync "
                                     "walk or checks)"))
    for m in SP_VALUES:
        if not has_member(sp, m):
            out.append(MissingMember("struct kvm_mmu_page", m, release,
                                     f"{m} shown as unknown; what needs it is skipped"))
    return out


def kernel_release(prog: drgn.Program) -> str:
    """UTS_RELEASE of the target (from VMCOREINFO), or "?"."""
    try:
        return str(prog["UTS_RELEASE"].string_().decode(errors="replace"))
    except (LookupError, drgn.FaultError, ValueError, TypeError):
        return "?"


def _symbol_u64(prog: drgn.Program, name: str, default: int | None = None) -> int:
    """Read a u64 global through the symbol table (works without its DWARF)."""
    try:
        return int(prog.read_u64(prog.symbol(name).address))
    except (LookupError, drgn.FaultError):
        if default is None:
            raise
        return default


def probe(prog: drgn.Program, release: str | None = None) -> Layout:
    """Probe the DWARF and symbols of *prog* for KVM's MMU layout.

    Raises KvmNotFound when kvm.ko (its types or vm_list) is not there.
    Members the model reads but this kernel lacks are listed in
    ``Layout.missing`` (named with *release*), never an error.
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
    prev = bare_type(mmu.member("prev_roots").type).type
    try:
        page = prog.type("struct page")
        page_size, page_private = drgn.sizeof(page), drgn.offsetof(page, "private")
    except LookupError:
        page_size, page_private = 64, 40  # x86-64 without struct page debug info
    # SPTE_BASE_ADDR_MASK is physical_mask & PAGE_MASK with
    # CONFIG_DYNAMIC_PHYSICAL_MASK (SME), else bits 12..51; PT64_BASE_ADDR_MASK before
    # "KVM: x86/mmu: Use separate namespaces for guest PTEs and shadow PTEs" (6.0)
    physical_mask = _symbol_u64(prog, "physical_mask", (1 << 52) - 1)
    mmu_member = vcpu_arch.member("mmu")
    if has_member(kvm_arch, "n_used_mmu_pages"):
        used_pages_path: str | None = "arch.n_used_mmu_pages"
    elif has_member(bare_type(kvm.member("stat").type), "mmu_shadow_pages"):
        # 7.3 (kvm_account_mmu_page): the count moved to kvm->stat.mmu_shadow_pages
        # (commit not found in the sources read; the 7.3 fixture shows it)
        used_pages_path = "stat.mmu_shadow_pages"
    else:
        used_pages_path = None
    release = release or kernel_release(prog)
    sp_type = prog.type("struct kvm_mmu_page")
    missing = _missing_members(prog, release, used_pages_path)
    return Layout(
        sp=_sp_layout(prog),
        # 5.17 "KVM: Convert the kvm->vcpus array to a xarray" (c5b077549136):
        # kvm->vcpus[KVM_MAX_VCPUS] became the vcpu_array xarray
        vcpu_array=has_member(kvm, "vcpu_array"),
        # 4.20 "x86/kvm/mmu: make vcpu->mmu a pointer to the current MMU"
        # (44dd3ffa7bb3): vcpu->arch.mmu became a pointer to root_mmu or guest_mmu
        mmu_is_pointer=bare_type(mmu_member.type).kind == drgn.TypeKind.POINTER,
        # 5.18 "KVM: x86: use struct kvm_mmu_root_info for mmu->root" (b9e5603c2a3a):
        # root_hpa/root_pgd folded into struct kvm_mmu_root_info root
        root_info=has_member(mmu, "root"),
        # 5.8 "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code":
        # mmu->root_cr3 renamed root_pgd, prev_roots[].cr3 renamed pgd
        root_pgd_name=next((n for n in ("root_pgd", "root_cr3") if has_member(mmu, n)), None),
        prev_pgd_name="pgd" if has_member(prev, "pgd") else "cr3",
        # 5.19 "KVM: x86/mmu: split cpu_role from mmu_role" (e5ed0fb01004), "KVM:
        # x86/mmu: remove extended bits from mmu_role, rename field" (7a458f0e1ba1)
        root_role=has_member(mmu, "root_role"),
        # pml5_root: "KVM: x86/mmu: Support shadowing NPT when 5-level paging is enabled
        # in host" (5.15, cb0f722aff6e); lm_root -> pml4_root: lm_root in the 5.10 fixture,
        # pml4_root in the 5.15 DWARF tree (commit not found)
        special_roots=tuple(
            n for n in ("pae_root", "lm_root", "pml4_root", "pml5_root") if has_member(mmu, n)
        ),
        # 6.3 "KVM: x86/mmu: Change tdp_mmu to a read-only parameter" (3af15ff47c4d)
        # moved tdp_mmu_enabled from struct kvm_arch to a kvm.ko global
        tdp_mmu_per_vm=has_member(kvm_arch, "tdp_mmu_enabled"),
        # 5.10 "kvm: x86/mmu: Allocate and free TDP MMU roots" (02c00b3a2f7e)
        tdp_mmu_roots=has_member(kvm_arch, "tdp_mmu_roots"),
        # 6.2 "KVM: x86/mmu: Track the number of TDP MMU pages, but not the actual
        # pages" (d25ceb926436) replaced the tdp_mmu_pages list by a counter
        tdp_mmu_pages_list=has_member(kvm_arch, "tdp_mmu_pages")
        and bare_type(kvm_arch.member("tdp_mmu_pages").type).tag == "list_head",
        # 5.13 "KVM: x86/mmu: Use a dedicated bit to track shadow/MMU-present SPTEs"
        # (edea7c4fc215) introduced SPTE_MMU_PRESENT_MASK (bit 11), in the same
        # release as the TDP MMU root refcount union; before, presence was
        # "!= 0 && !mmio"
        present_bit=has_member(sp_type, "tdp_mmu_root_count"),
        addr_mask=spte_base_addr_mask(physical_mask),
        page_size=page_size,
        page_private=page_private,
        vmemmap_base=_symbol_u64(prog, "vmemmap_base", 0xFFFFEA0000000000),
        page_offset_base=_symbol_u64(prog, "page_offset_base", 0xFFFF888000000000),
        used_pages_path=used_pages_path,
        # 6.8 "KVM: x86: Add support for "protected VMs" that can utilize private
        # memory" (89ea60c2c7b5): kvm->arch.vm_type; KVM_X86_TDX_VM from 6.14
        # ("KVM: x86: Add a VM type define for TDX")
        vm_type=has_member(kvm_arch, "vm_type"),
        # 6.14 "KVM: x86/tdp_mmu: Support mirror root for TDP MMU" (TDX): mirror
        # roots beside mmu->root
        mirror_root=has_member(mmu, "mirror_root_hpa"),
        tdp_root_refcount=has_member(sp_type, "tdp_mmu_root_count"),
        root_mmus=tuple(n for n in ("root_mmu", "guest_mmu") if has_member(vcpu_arch, n)
                        and bare_type(vcpu_arch.member(n).type).tag == "kvm_mmu"),
        missing=tuple(missing),
        absent=frozenset((m.struct, m.member) for m in missing),
    )
