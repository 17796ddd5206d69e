"""drgn helpers for KVM's x86 MMU: VMs, vCPUs, roots, shadow pages and SPTEs.

Stateless functions over :class:`drgn.Object`, in drgn's own style
(``drgn.helpers.linux``), one per kernel rule, for a plain drgn script on a
host vmcore or the live host::

    drgn -c vmcore -s vmlinux -s kvm.ko -s kvm-amd.ko script.py

They mirror the kernel's own code:

* virt/kvm/kvm_main.c and include/linux/kvm_host.h: ``vm_list``,
  ``kvm_get_vcpu()`` / ``kvm_for_each_vcpu()``;
* arch/x86/kvm/mmu/mmu.c and arch/x86/include/asm/kvm_host.h: ``vcpu->arch.mmu``,
  its root and ``prev_roots[]``, ``kvm->arch.active_mmu_pages``;
* arch/x86/kvm/mmu/mmu_internal.h and mmu/spte.h: ``to_shadow_page()``,
  ``spte_to_child_sp()``, ``is_shadow_present_pte()``, ``is_large_pte()``,
  ``is_last_spte()``, ``spte_to_pfn()``;
* arch/x86/kvm/mmu/tdp_mmu.c: ``kvm->arch.tdp_mmu_roots`` and the 5.10-6.1
  ``kvm->arch.tdp_mmu_pages`` list.

Each layout difference between kernels is decided from the target's DWARF
(which members a struct has), never from its version string, and named in a
comment with the kernel change and its release. The SPTE rules' constants
and integer rules live in :mod:`kvminspect.spte`; these helpers apply them to
the kernel's objects. A helper that takes ``prog`` first may be given an
:class:`~drgn.Object` instead (drgn's ``takes_program_or_default``), or
nothing inside drgn's CLI, which has a default program.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import NamedTuple

from drgn import IntegerLike, Object, Program, Type, TypeKind, cast
from drgn.helpers.common.prog import takes_program_or_default
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import pfn_to_page
from drgn.helpers.linux.xarray import xa_load

from kvminspect import spte as _spte
from kvminspect.spte import INVALID_PAGE, PAGE_SHIFT, SPTE_ENT_PER_PAGE, SpteFormat

__all__ = (
    "INVALID_PAGE",
    "MmuRoot",
    "for_each_active_mmu_page",
    "for_each_tdp_mmu_page",
    "for_each_tdp_mmu_root",
    "for_each_vm",
    "is_large_pte",
    "is_last_spte",
    "is_shadow_present_pte",
    "mmu_roots",
    "sp_children",
    "sp_sptes",
    "spte_format",
    "spte_to_child_sp",
    "spte_to_pfn",
    "to_shadow_page",
    "vcpu_mmu",
    "vcpu_mmu_roots",
    "vm_vcpus",
)




def _struct(obj: Object) -> Type:
    """The struct type of *obj*, or of what it points at, without typedefs."""
    t = obj.type_.unaliased()
    if t.kind == TypeKind.POINTER:
        t = t.type.unaliased()
    return t


def _is_pointer(obj: Object) -> bool:
    return bool(obj.type_.unaliased_kind() == TypeKind.POINTER)


@takes_program_or_default
def for_each_vm(prog: Program) -> Iterator[Object]:
    """
    Iterate over every VM on the global ``vm_list`` (kvm_main.c), in list order.

    >>> for kvm in for_each_vm(prog):
    ...     print(hex(kvm), kvm.userspace_pid.value_())
    0xffffd1e6803fd000 97

    :return: Iterator of ``struct kvm *`` objects.
    """
    return list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list")


def vm_vcpus(kvm: Object) -> Iterator[Object]:
    """
    Iterate over a VM's online vCPUs, as ``kvm_for_each_vcpu()`` does:
    ``kvm_get_vcpu(kvm, i)`` for i below ``kvm->online_vcpus``, skipping an
    index with no vCPU.

    >>> [vcpu.vcpu_id.value_() for vcpu in vm_vcpus(kvm)]
    [0, 1, 2, 3]

    :param kvm: ``struct kvm *``
    :return: Iterator of ``struct kvm_vcpu *`` objects.
    """
    # "KVM: Convert the kvm->vcpus array to a xarray" (5.17, c5b077549136)
    xarray = _struct(kvm).has_member("vcpu_array")
    for i in range(kvm.online_vcpus.counter.value_()):
        if xarray:
            vcpu = cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))
        else:
            vcpu = kvm.vcpus[i]
        if vcpu:
            yield vcpu


def vcpu_mmu(vcpu: Object) -> Object:
    """
    Get a vCPU's current MMU, ``vcpu->arch.mmu``: ``&vcpu->arch.root_mmu``, or
    ``&vcpu->arch.guest_mmu`` while it runs a nested guest (L2).

    >>> vcpu_mmu(vcpu).value_() == vcpu.arch.root_mmu.address_of_().value_()
    True

    :param vcpu: ``struct kvm_vcpu *``
    :return: ``struct kvm_mmu *``
    """
    mmu = vcpu.arch.mmu
    # "x86/kvm/mmu: make vcpu->mmu a pointer to the current MMU" (4.20, 44dd3ffa7bb3)
    return mmu if _is_pointer(mmu) else mmu.address_of_()


class MmuRoot(NamedTuple):
    """
    One root of a struct kvm_mmu: ``mmu->root`` (*name* ``"root"``: the root in
    use) or ``mmu->prev_roots[i]`` (*name* ``"prev_roots[i]"``: the CR3 -> root
    cache). *hpa* is :data:`INVALID_PAGE` for an empty slot; *pgd* is the guest
    CR3 (or nested EPTP/NPT root) the root shadows, 0 for a direct MMU.

    >>> vcpu_mmu_roots(vcpu)[0]
    MmuRoot(name='root', hpa=49115136, pgd=1052672)
    """

    name: str
    hpa: int
    pgd: int

    @property
    def current(self) -> bool:
        """Whether this is ``mmu->root``, the root the vCPU runs on."""
        return self.name == "root"


def mmu_roots(mmu: Object) -> list[MmuRoot]:
    """
    Get the roots of a struct kvm_mmu: ``mmu->root`` first, then each
    ``mmu->prev_roots[]`` entry, as ``kvm_mmu_free_roots()`` sees them.

    >>> [(r.name, hex(r.hpa)) for r in mmu_roots(vcpu_mmu(vcpu))][:2]
    [('root', '0x2ed7000'), ('prev_roots[0]', '0x2ece000')]

    :param mmu: ``struct kvm_mmu *``
    :return: list of :class:`MmuRoot`, the current root first.
    """
    t = _struct(mmu)
    # "KVM: x86: use struct kvm_mmu_root_info for mmu->root" (5.18, b9e5603c2a3a)
    if t.has_member("root"):
        out = [MmuRoot("root", mmu.root.hpa.value_(), mmu.root.pgd.value_())]
    else:
        # "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code" (5.8)
        name = next((n for n in ("root_pgd", "root_cr3") if t.has_member(n)), None)
        pgd = mmu.member_(name).value_() if name else 0
        out = [MmuRoot("root", mmu.root_hpa.value_(), pgd)]
    if not t.has_member("prev_roots"):
        return out
    prev = mmu.prev_roots
    # prev_roots[].pgd: "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code" (5.8)
    pgd_name = "pgd" if _struct(prev[0]).has_member("pgd") else "cr3"
    for i in range(len(prev)):
        out.append(MmuRoot(f"prev_roots[{i}]", prev[i].hpa.value_(),
                           prev[i].member_(pgd_name).value_()))
    return out


def vcpu_mmu_roots(vcpu: Object) -> list[MmuRoot]:
    """
    Get the roots of a vCPU's current MMU: ``mmu_roots(vcpu_mmu(vcpu))``.

    >>> for root in vcpu_mmu_roots(vcpu):
    ...     print(root.name, hex(root.pgd), hex(root.hpa))
    root 0x101000 0x2ed7000
    prev_roots[0] 0x121000 0x2ece000
    prev_roots[1] 0x11c000 0x2ed3000
    prev_roots[2] 0x118000 0x2cc2000

    :param vcpu: ``struct kvm_vcpu *``
    :return: list of :class:`MmuRoot`, the current root (``mmu->root``) first.
    """
    return mmu_roots(vcpu_mmu(vcpu))


def _sp_list(kvm: Object, member: str) -> Iterator[Object]:
    """The struct kvm_mmu_page of each node of list kvm->arch.*member* (through
    sp->link); nothing when the list head was never initialised (NULL next)."""
    head = kvm.arch.member_(member)
    if not head.next:
        return iter(())
    return list_for_each_entry("struct kvm_mmu_page", head.address_of_(), "link")


def for_each_active_mmu_page(kvm: Object) -> Iterator[Object]:
    """
    Iterate over the shadow MMU's pages, ``kvm->arch.active_mmu_pages`` (the
    list ``kvm_mmu_zap_all()`` walks), newest first. TDP MMU pages are not on it.

    >>> len(list(for_each_active_mmu_page(kvm)))
    37

    :param kvm: ``struct kvm *``
    :return: Iterator of ``struct kvm_mmu_page *`` objects.
    """
    return _sp_list(kvm, "active_mmu_pages")


def for_each_tdp_mmu_root(kvm: Object) -> Iterator[Object]:
    """
    Iterate over the TDP MMU's roots, ``kvm->arch.tdp_mmu_roots`` (tdp_mmu.c's
    ``for_each_tdp_mmu_root()``), invalid ones included. Nothing on a kernel
    without the TDP MMU, or in a VM that never initialised it.

    >>> [hex(root) for root in for_each_tdp_mmu_root(kvm)]  # a TDP MMU VM
    ['0xffff88fd42ca95c0']

    :param kvm: ``struct kvm *``
    :return: Iterator of ``struct kvm_mmu_page *`` objects.
    """
    # "kvm: x86/mmu: Allocate and free TDP MMU roots" (5.10, 02c00b3a2f7e)
    if not _struct(kvm.arch).has_member("tdp_mmu_roots"):
        return iter(())
    return _sp_list(kvm, "tdp_mmu_roots")


def for_each_tdp_mmu_page(kvm: Object) -> Iterator[Object]:
    """
    Iterate over the TDP MMU's pages that are not roots,
    ``kvm->arch.tdp_mmu_pages``, on the kernels that keep that list; nothing on
    the others (walk down from :func:`for_each_tdp_mmu_root` there).

    >>> len(list(for_each_tdp_mmu_page(kvm)))  # a TDP MMU VM, kernel 6.1
    4

    :param kvm: ``struct kvm *``
    :return: Iterator of ``struct kvm_mmu_page *`` objects.
    """
    t = _struct(kvm.arch)
    # a list_head, then an atomic64_t counter: "KVM: x86/mmu: Track the number of TDP MMU
    # pages, but not the actual pages" (6.2, d25ceb926436)
    if not t.has_member("tdp_mmu_pages"):
        return iter(())
    if t.member("tdp_mmu_pages").type.unaliased().tag != "list_head":
        return iter(())
    return _sp_list(kvm, "tdp_mmu_pages")


@takes_program_or_default
def to_shadow_page(prog: Program, hpa: IntegerLike) -> Object:
    """
    Get the shadow page (struct kvm_mmu_page) that owns the page table at host
    physical address *hpa*, as mmu_internal.h's ``to_shadow_page()`` does:
    ``page_private()`` of the table's struct page. A NULL pointer for a page
    that is no shadow page table: a special root (``__pa(mmu->pae_root)``,
    ``pml4_root``, ``pml5_root``) or a dummy root (the zero page, from 6.6).

    >>> sp = to_shadow_page(prog, vcpu_mmu_roots(vcpu)[0].hpa)
    >>> hex(sp), hex(sp.gfn), sp.role.level.value_()
    ('0xffff8b86c2c01a10', '0x101', 4)

    :param hpa: Host physical address of a page table (its low 12 bits are
        ignored).
    :return: ``struct kvm_mmu_page *`` (NULL if the page has none)
    """
    page = pfn_to_page(prog, operator.index(hpa) >> PAGE_SHIFT)
    return Object(prog, "struct kvm_mmu_page *", page.private.value_())


def _spte_value(spte: IntegerLike) -> int:
    """An SPTE as an int, from an int or a ``u64`` Object."""
    return operator.index(spte)


@takes_program_or_default
def spte_format(prog: Program) -> SpteFormat:
    """
    Get the SPTE rules of the target's kernel release, as
    :class:`kvminspect.spte.SpteFormat` (for :mod:`kvminspect.spte`'s integer
    rules over many SPTEs): which presence rule, and ``SPTE_BASE_ADDR_MASK``.
    Probed from the DWARF once per program (``prog.cache``).

    >>> spte_format(prog)
    SpteFormat(present_bit=True, addr_mask=4503599627366400)

    :return: :class:`kvminspect.spte.SpteFormat`
    """
    key = "kvminspect.helpers.spte_format"
    fmt: SpteFormat | None = prog.cache.get(key)
    if fmt is None:
        # "KVM: x86/mmu: Use a dedicated bit to track shadow/MMU-present SPTEs" (5.13,
        # edea7c4fc215), a macro: probed by tdp_mmu_root_count, of the same release
        present_bit = prog.type("struct kvm_mmu_page").has_member("tdp_mmu_root_count")
        try:
            # vmlinux has physical_mask with CONFIG_DYNAMIC_PHYSICAL_MASK only
            physical_mask: int | None = prog["physical_mask"].value_()
        except LookupError:
            physical_mask = None
        fmt = SpteFormat(present_bit, _spte.spte_base_addr_mask(physical_mask))
        prog.cache[key] = fmt
    return fmt


@takes_program_or_default
def is_shadow_present_pte(prog: Program, spte: IntegerLike) -> bool:
    """
    Return whether an SPTE is present to KVM (spte.h's ``is_shadow_present_pte()``):
    it maps memory or a child page table, whatever its hardware RWX bits say (an
    access-tracked SPTE is present, an MMIO SPTE is not).

    >>> is_shadow_present_pte(sp.spt[0])
    True
    >>> is_shadow_present_pte(prog, 0)
    False

    :param spte: The SPTE's value, or a ``u64`` object such as ``sp.spt[i]``.
    """
    return _spte.is_shadow_present_pte(_spte_value(spte), spte_format(prog))


def is_large_pte(spte: IntegerLike) -> bool:
    """
    Return whether an SPTE has the page-size bit (spte.h's ``is_large_pte()``):
    above level 1, a present SPTE that maps a 2 MiB or 1 GiB page.

    >>> is_large_pte(0x80000000400008e7)
    True

    :param spte: The SPTE's value, or a ``u64`` object.
    """
    return _spte.is_large_pte(_spte_value(spte))


def is_last_spte(spte: IntegerLike, level: IntegerLike) -> bool:
    """
    Return whether a present SPTE of a level-*level* table maps memory rather
    than pointing at a child table (spte.h's ``is_last_spte()``): level 1, or a
    large page.

    >>> is_last_spte(sp.spt[0], sp.role.level)
    False

    :param spte: The SPTE's value, or a ``u64`` object.
    :param level: The level of the table that holds the SPTE (1 to 5).
    """
    return _spte.is_last_spte(_spte_value(spte), operator.index(level))


@takes_program_or_default
def spte_to_pfn(prog: Program, spte: IntegerLike) -> int:
    """
    Get the host page frame number an SPTE points at (spte.h's
    ``spte_to_pfn()``: ``(spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT``), a child
    table or guest memory.

    >>> hex(spte_to_pfn(sp.spt[0]))
    '0x2ed6'

    :param spte: The SPTE's value, or a ``u64`` object.
    """
    return _spte.spte_to_pfn(_spte_value(spte), spte_format(prog).addr_mask)


@takes_program_or_default
def spte_to_child_sp(prog: Program, spte: IntegerLike) -> Object:
    """
    Get the shadow page of the child table a present non-leaf SPTE points at
    (spte.h's ``spte_to_child_sp()``, ``to_shadow_page(spte &
    SPTE_BASE_ADDR_MASK)``).

    >>> hex(spte_to_child_sp(sp.spt[0]))
    '0xffff8b86c2c01508'

    :param spte: The SPTE's value, or a ``u64`` object.
    :return: ``struct kvm_mmu_page *`` (NULL if the page has none)
    """
    return to_shadow_page(prog, spte_to_pfn(prog, spte) << PAGE_SHIFT)


def sp_sptes(sp: Object) -> list[int]:
    """
    Read a shadow page's page table, ``sp->spt[0..511]``, in one read.

    >>> [hex(v) for v in sp_sptes(sp)[:2]]
    ['0x2ed6827', '0x0']

    :param sp: ``struct kvm_mmu_page *``
    :return: The 512 (SPTE_ENT_PER_PAGE) SPTE values, by index.
    """
    spt = sp.spt
    table = sp.prog_.array_type(spt.type_.type, SPTE_ENT_PER_PAGE)
    values: list[int] = Object(sp.prog_, table, address=spt.value_()).value_()
    return values


def sp_children(sp: Object, level: IntegerLike | None = None
                ) -> Iterator[tuple[int, int, Object]]:
    """
    Iterate over a shadow page's links to its child tables: each SPTE that is
    present and not last (``is_shadow_present_pte() && !is_last_spte()``, as
    ``mmu_page_zap_pte()`` and ``__mmu_unsync_walk()`` test it), with the child
    struct kvm_mmu_page (:func:`spte_to_child_sp`). A level-1 page has none.

    >>> for index, spte, child in sp_children(sp):
    ...     print(index, hex(spte), hex(child), hex(child.gfn))
    0 0x2ed6827 0xffff8b86c2c01508 0x102

    :param sp: ``struct kvm_mmu_page *``
    :param level: The table's level, if not ``sp->role.level``: a TDP MMU page
        that is not a root had its parent's level in ``role.level`` before 5.14
        ("KVM: x86/mmu: Fix TDP MMU page table level"), so a walk down from a
        root passes its parent's level minus one.
    :return: Iterator of (index, SPTE value, ``struct kvm_mmu_page *``)
        tuples; the child is NULL if the SPTE points at no shadow page.
    """
    prog = sp.prog_
    lvl = sp.role.level.value_() if level is None else operator.index(level)
    if lvl <= _spte.PG_LEVEL_4K:
        return
    fmt = spte_format(prog)
    for index, value in enumerate(sp_sptes(sp)):
        if (_spte.is_shadow_present_pte(value, fmt)
                and not _spte.is_last_spte(value, lvl)):
            child = to_shadow_page(prog, _spte.spte_to_pfn(value, fmt.addr_mask) << PAGE_SHIFT)
            yield index, value, child
