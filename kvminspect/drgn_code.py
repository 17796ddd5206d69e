"""--drgn: the drgn code that reads what roots, sp and tree show.

Like drgn's crash commands (``ps --drgn``), each command can print a drgn
script instead of its output; the script reads the same kernel objects through
drgn's API (struct kvm on vm_list, struct kvm_vcpu, struct kvm_mmu roots and
prev_roots, struct kvm_mmu_page and its spt[] SPTEs) and prints what it found.
The code is written for the target's own KVM layout (kvminspect's probe: which
members this kernel has), so it runs as printed on that kernel: it teaches the
structures by construction. Built with drgn's DrgnCodeBuilder.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import drgn
from drgn.commands import DrgnCodeBuilder

from kvminspect.errors import UsageError
from kvminspect.layout import Layout, has_member
from kvminspect.model import VM

SPT_ENTRIES = 512  # SPTE_ENT_PER_PAGE: a page table holds 512 u64 SPTEs


def print_code(args: argparse.Namespace, make: Callable[[], str]) -> None:
    """--drgn: print the code *make* builds (instead of the command's output)."""
    if getattr(args, "json", False):
        raise UsageError("--drgn prints code, --json a document: give one of them")
    print(make(), end="")


def _constants(code: DrgnCodeBuilder, lay: Layout, sptes: bool) -> None:
    """INVALID_PAGE, and the SPTE masks of this release (arch/x86/kvm/mmu/spte.h)."""
    code.append("INVALID_PAGE = 0xFFFFFFFFFFFFFFFF  # an empty root (hpa)\n")
    if sptes:
        code.append(f"SPTE_BASE_ADDR_MASK = {lay.addr_mask:#x}  # the pfn bits of an SPTE\n")
        code.append("PT_PAGE_SIZE_MASK = 1 << 7  # is_large_pte()\n")
        if lay.present_bit:
            code.append("SPTE_MMU_PRESENT_MASK = 1 << 11  # is_shadow_present_pte() (5.13+)\n")
        else:
            code.append("SPTE_MMIO_MASK = 3 << 52  # MMIO SPTEs are not present (before 5.13)\n")


def _to_shadow_page(code: DrgnCodeBuilder) -> None:
    """to_shadow_page(): a page table's struct kvm_mmu_page is its struct page's private."""
    code.add_from_import("drgn", "Object")
    code.add_from_import("drgn.helpers.linux.mm", "pfn_to_page")
    code.append('''\n
def to_shadow_page(hpa):
    """to_shadow_page() / root_to_sp(): the struct kvm_mmu_page that owns the page
    table at physical address hpa is page_private() of its struct page (0 for a
    special root, mmu->pae_root, or a dummy root)."""
    private = pfn_to_page(prog, hpa >> 12).private.value_()
    return Object(prog, "struct kvm_mmu_page *", private) if private else None
''')


def _present(code: DrgnCodeBuilder, lay: Layout) -> None:
    """is_shadow_present_pte() of this release."""
    test = ("spte & SPTE_MMU_PRESENT_MASK" if lay.present_bit
            else "spte != 0 and spte & SPTE_MMIO_MASK != SPTE_MMIO_MASK")
    code.append(f'''\n
def is_shadow_present_pte(spte):
    return bool({test})
''')


def _begin_vms(code: DrgnCodeBuilder, vms: list[VM], every: bool) -> None:
    """``kvm``: each struct kvm on vm_list, or the one VM asked for."""
    if every:
        code.add_from_import("drgn.helpers.linux.list", "list_for_each_entry")
        code.begin_block('for kvm in list_for_each_entry("struct kvm", '
                         'prog["vm_list"].address_of_(), "vm_list"):\n')
    else:
        code.add_from_import("drgn", "Object")
        code.append(f'kvm = Object(prog, "struct kvm *", {vms[0].addr:#x})\n')
        code.begin_block("")


def _begin_vcpus(code: DrgnCodeBuilder, lay: Layout) -> None:
    """``vcpu`` and ``mmu``: each online struct kvm_vcpu and its current struct kvm_mmu."""
    code.begin_block("for i in range(kvm.online_vcpus.counter):\n")
    if lay.vcpu_array:
        code.add_from_import("drgn", "cast")
        code.add_from_import("drgn.helpers.linux.xarray", "xa_load")
        code.append('vcpu = cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))\n')
    else:
        code.append("vcpu = kvm.vcpus[i]\n")
    code.append("mmu = vcpu.arch.mmu" + ("" if lay.mmu_is_pointer else ".address_of_()")
                + "  # root_mmu, or guest_mmu while in L2\n")


def _roots_list(code: DrgnCodeBuilder, lay: Layout) -> None:
    """``vcpu_roots``: (name, hpa, pgd) of mmu's root and each prev_roots[] entry."""
    if lay.root_info:
        current = "mmu.root.hpa, mmu.root.pgd"
    else:
        pgd = f"mmu.{lay.root_pgd_name}" if lay.root_pgd_name else "0"
        current = f"mmu.root_hpa, {pgd}"
    code.append(f'''vcpu_roots = [("root", {current})] + [
    (f"prev[{{j}}]", prev.hpa, prev.{lay.prev_pgd_name}) for j, prev in enumerate(mmu.prev_roots)
]
''')


def roots_code(prog: drgn.Program, lay: Layout, vms: list[VM], every: bool) -> str:
    """The drgn code of ``roots``: per vCPU, mmu->root and prev_roots[] with their pages."""
    code = DrgnCodeBuilder(prog)
    _constants(code, lay, sptes=False)
    _to_shadow_page(code)
    code.append("\n\n")
    _begin_vms(code, vms, every)
    _begin_vcpus(code, lay)
    code.append("cr3 = vcpu.arch.cr3.value_()\n")
    _roots_list(code, lay)
    code.begin_block("for name, hpa, pgd in vcpu_roots:\n")
    code.append("""hpa, pgd = hpa.value_(), pgd.value_()
if hpa == INVALID_PAGE:
    print(f"vcpu[{i}] cr3 {cr3:#x} {name}: pgd {pgd:#x} INVALID_PAGE")
    continue
sp = to_shadow_page(hpa)
if sp is None:
    print(f"vcpu[{i}] cr3 {cr3:#x} {name}: pgd {pgd:#x} hpa {hpa:#x} special root")
    continue
gfn = sp.gfn.value_()
level = sp.role.level.value_()
root_count = sp.root_count.value_()
print(f"vcpu[{i}] cr3 {cr3:#x} {name}: pgd {pgd:#x} hpa {hpa:#x} sp {sp.value_():#x} "
      f"gfn {gfn:#x} L{level} root_count {root_count}")
""")
    code.end_block()
    code.end_block()
    code.end_block()
    return code.get()


SP_FIELDS = ("unsync", "unsync_children", "root_count", "mmu_valid_gen", "tdp_mmu_page")


def sp_code(prog: drgn.Program, lay: Layout, addr: int) -> str:
    """The drgn code of ``sp ADDR``: struct kvm_mmu_page's fields and present SPTEs."""
    code = DrgnCodeBuilder(prog)
    code.add_from_import("drgn", "Object")
    _constants(code, lay, sptes=True)
    _to_shadow_page(code)
    _present(code, lay)
    code.append(f'\n\nsp = Object(prog, "struct kvm_mmu_page *", {addr:#x})\n')
    code.append("gfn = sp.gfn.value_()\n")
    code.append("role = sp.role  # union kvm_mmu_page_role: level, direct, invalid, ...\n")
    code.append("level = role.level.value_()\n")
    sp_type = prog.type("struct kvm_mmu_page")
    fields = [f for f in SP_FIELDS if has_member(sp_type, f)]
    for f in fields:
        code.append(f"{f} = sp.{f}.value_()\n")
    code.append('print(f"sp {sp.value_():#x} gfn {gfn:#x} level {level}")\n')
    for n in range(0, len(fields), 3):
        shown = " ".join(f"{f} {{{f}}}" for f in fields[n:n + 3])
        code.append(f'print(f"  {shown}")\n')
    code.append("print(role.format_(dereference=False))\n")
    code.append("""for i in range(512):
    spte = sp.spt[i].value_()
    if not is_shadow_present_pte(spte):
        continue
    pfn = (spte & SPTE_BASE_ADDR_MASK) >> 12
    large = level > 1 and bool(spte & PT_PAGE_SIZE_MASK)
    if level == 1 or large:  # is_last_spte(): maps guest memory
        print(f"[{i}] spte {spte:#x} pfn {pfn:#x} {'large' if large else 'leaf'}")
    else:  # a page table: its own shadow page
        child = to_shadow_page(pfn << 12)
        child_addr = child.value_() if child is not None else 0
        print(f"[{i}] spte {spte:#x} pfn {pfn:#x} table child sp {child_addr:#x}")
""")
    return code.get()


def tree_code(prog: drgn.Program, lay: Layout, vms: list[VM], every: bool, top: int | None,
              depth: int | None) -> str:
    """The drgn code of ``tree``: walk spt[] down from every root (or from one page)."""
    code = DrgnCodeBuilder(prog)
    _constants(code, lay, sptes=True)
    _to_shadow_page(code)
    _present(code, lay)
    limit = "" if depth is None else f"\n    if depth == {depth}:  # --depth\n        return"
    code.append(f'''\n
def walk(sp, index, depth, seen):
    """Print sp, then the shadow pages its present non-leaf SPTEs point to
    (a page reached twice is printed once)."""
    level = sp.role.level.value_()
    slot = f"[{{index}}] " if index is not None else ""
    print(f"{{'    ' * depth}}{{slot}}sp {{sp.value_():#x}} gfn {{sp.gfn.value_():#x}} L{{level}}")
    if sp.value_() in seen:
        return
    seen.add(sp.value_()){limit}
    if level == 1:
        return
    for i in range(512):
        spte = sp.spt[i].value_()
        if is_shadow_present_pte(spte) and not spte & PT_PAGE_SIZE_MASK:
            child = to_shadow_page(spte & SPTE_BASE_ADDR_MASK)
            if child is not None:
                walk(child, i, depth + 1, seen)


''')
    if top is not None:
        code.add_from_import("drgn", "Object")
        code.append(f'walk(Object(prog, "struct kvm_mmu_page *", {top:#x}), None, 0, set())\n')
        return code.get()
    code.add_from_import("drgn.helpers.linux.list", "list_for_each_entry")
    _begin_vms(code, vms, every)
    code.append("tops = {}  # struct kvm_mmu_page address -> the page, in the order found\n")
    _begin_vcpus(code, lay)
    _roots_list(code, lay)
    code.append("""for name, hpa, pgd in vcpu_roots:
    if hpa != INVALID_PAGE and (sp := to_shadow_page(hpa.value_())) is not None:
        tops.setdefault(sp.value_(), sp)
""")
    code.end_block()
    if lay.tdp_mmu_roots and any(vm.mmu == "tdp_mmu" for vm in vms):
        code.append('''if kvm.arch.tdp_mmu_roots.next:  # never initialised in a shadow-paging VM
    for sp in list_for_each_entry("struct kvm_mmu_page",
                                  kvm.arch.tdp_mmu_roots.address_of_(), "link"):
        tops.setdefault(sp.value_(), sp)  # TDP MMU roots
''')
    code.append('''for sp in list_for_each_entry("struct kvm_mmu_page",
                              kvm.arch.active_mmu_pages.address_of_(), "link"):
    if sp.root_count > 0:  # a root no vCPU holds now
        tops.setdefault(sp.value_(), sp)
seen = set()
for sp in tops.values():
    walk(sp, None, 0, seen)
''')
    code.end_block()
    return code.get()
