"""--drgn: the drgn code that reads what roots, sp and tree show.

Like drgn's crash commands (``ps --drgn``), each command can print a drgn
script instead of its output; the script reads the same kernel objects through
drgn's API (struct kvm on vm_list, struct kvm_vcpu, struct kvm_mmu roots and
prev_roots, struct kvm_mmu_page and its spt[] SPTEs) and prints what it found.
The code is written for the target's own KVM layout (kvminspect's probe: which
members this kernel has), so it runs as printed on that kernel: it teaches the
structures by construction. Built with drgn's DrgnCodeBuilder.

The kernel's rules in it are not a second copy: the constants are printed from
kvminspect.spte and kvminspect.helpers (SPTE_BASE_ADDR_MASK and the presence
rule as helpers.spte_format() probes them on this kernel), and the functions
(to_shadow_page, is_shadow_present_pte, is_large_pte, is_last_spte,
spte_to_pfn) are those modules' own source, printed with inspect.getsource.
The script needs drgn only.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from collections.abc import Callable

import drgn
from drgn.commands import DrgnCodeBuilder

from kvminspect import helpers, spte
from kvminspect.errors import UsageError
from kvminspect.layout import Layout, has_member
from kvminspect.model import VM


def print_code(args: argparse.Namespace, make: Callable[[], str]) -> None:
    """--drgn: print the code *make* builds (instead of the command's output)."""
    if getattr(args, "json", False):
        raise UsageError("--drgn prints code, --json a document: give one of them")
    print(make(), end="")


# what the constants a printed function uses mean, in the order they are printed
CONSTANTS = {
    "INVALID_PAGE": "an empty root (hpa)",
    "PAGE_SHIFT": "",
    "PG_LEVEL_4K": "the level of a table of 4 KiB pages",
    "SPTE_ENT_PER_PAGE": "u64 SPTEs in a page table",
    "SPTE_BASE_ADDR_MASK": "the pfn bits of an SPTE (physical_mask & PAGE_MASK)",
    "PT_PAGE_SIZE_MASK": "is_large_pte()",
    # "KVM: x86/mmu: Use a dedicated bit to track shadow/MMU-present SPTEs" (5.13, edea7c4fc215)
    "SPTE_MMU_PRESENT_MASK": "is_shadow_present_pte() from 5.13",
    "SPTE_SPECIAL_MASK": "is_shadow_present_pte() before 5.13: MMIO SPTEs are not present",
    "SPTE_MMIO_MASK": "",
}


def source(fn: Callable[..., object], name: str | None = None) -> str:
    """The source of *fn* as a script's top-level function: without its
    decorators (a drgn helper's ``@takes_program_or_default``) and its
    docstring's ``>>>`` examples (they use the other helpers), renamed *name*."""
    lines = textwrap.dedent(inspect.getsource(fn)).splitlines(keepends=True)
    kept: list[str] = []
    example = False
    for line in lines:
        if line.lstrip().startswith(">>>"):
            example = True
        elif example and not line.strip():
            example = False
            continue
        if not example and not line.startswith("@"):
            kept.append(line)
    text = "".join(kept)
    if name is not None:
        text = text.replace(f"def {fn.__name__}(", f"def {name}(", 1)
    return text


def rules(code: DrgnCodeBuilder, prog: drgn.Program, sptes: bool) -> None:
    """The constants and functions of the kernel's rules the script uses, from
    kvminspect.spte and kvminspect.helpers: to_shadow_page(), and with *sptes*
    is_shadow_present_pte() (this release's rule, as helpers.spte_format()
    probes it), is_large_pte(), is_last_spte() and spte_to_pfn()."""
    fmt = helpers.spte_format(prog)
    values = {"INVALID_PAGE": helpers.INVALID_PAGE, "SPTE_BASE_ADDR_MASK": fmt.addr_mask}
    rules: list[tuple[Callable[..., object], str | None]] = [(helpers.to_shadow_page, None)]
    used = {"INVALID_PAGE"}
    if sptes:
        present = spte.is_shadow_present_bit if fmt.present_bit else spte.is_shadow_present_not_mmio
        rules += [(present, "is_shadow_present_pte"), (spte.is_large_pte, None),
                  (spte.is_last_spte, None), (spte.spte_to_pfn, None)]
        # spte_to_pfn's default mask, and the loops over sp->spt[]
        used |= {"SPTE_BASE_ADDR_MASK", "SPTE_ENT_PER_PAGE"}
    functions = [source(fn, name) for fn, name in rules]
    for fn, _ in rules:
        used |= set(inspect.unwrap(fn).__code__.co_names)
    for name, what in CONSTANTS.items():
        if name in used:
            value = values[name] if name in values else getattr(spte, name)
            mask = name.endswith("_MASK") or name == "INVALID_PAGE"
            shown = f"{value:#x}" if mask else str(value)
            code.append(f"{name} = {shown}" + (f"  # {what}\n" if what else "\n"))
    code.add_import("operator")
    code.add_from_import("drgn", "IntegerLike", "Object", "Program")  # to_shadow_page's
    code.add_from_import("drgn.helpers.linux.mm", "pfn_to_page")
    for text in functions:
        code.append("\n\n" + text)


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
    # "KVM: Convert the kvm->vcpus array to a xarray" (5.17, c5b077549136)
    if lay.vcpu_array:
        code.add_from_import("drgn", "cast")
        code.add_from_import("drgn.helpers.linux.xarray", "xa_load")
        code.append('vcpu = cast("struct kvm_vcpu *", xa_load(kvm.vcpu_array.address_of_(), i))\n')
    else:
        code.append("vcpu = kvm.vcpus[i]\n")
    # "x86/kvm/mmu: make vcpu->mmu a pointer to the current MMU" (4.20, 44dd3ffa7bb3)
    code.append("mmu = vcpu.arch.mmu" + ("" if lay.mmu_is_pointer else ".address_of_()")
                + "  # root_mmu, or guest_mmu while in L2\n")


def _roots_list(code: DrgnCodeBuilder, lay: Layout) -> None:
    """``vcpu_roots``: (name, hpa, pgd) of mmu's root and each prev_roots[] entry."""
    # "KVM: x86: use struct kvm_mmu_root_info for mmu->root" (5.18, b9e5603c2a3a)
    if lay.root_info:
        current = "mmu.root.hpa, mmu.root.pgd"
    else:
        # "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code" (5.8)
        pgd = f"mmu.{lay.root_pgd_name}" if lay.root_pgd_name else "0"
        current = f"mmu.root_hpa, {pgd}"
    # prev_roots[].pgd: "KVM: x86: Replace "cr3" with "pgd" in "new cr3/pgd" related code" (5.8)
    code.append(f'''vcpu_roots = [("root", {current})] + [
    (f"prev_roots[{{j}}]", prev.hpa, prev.{lay.prev_pgd_name})
    for j, prev in enumerate(mmu.prev_roots)
]
''')


def roots_code(prog: drgn.Program, lay: Layout, vms: list[VM], every: bool) -> str:
    """The drgn code of ``roots``: per vCPU, mmu->root and prev_roots[] with their pages."""
    code = DrgnCodeBuilder(prog)
    rules(code, prog, sptes=False)
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
sp = to_shadow_page(prog, hpa)
if not sp:
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
    rules(code, prog, sptes=True)
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
    code.append("""for i in range(SPTE_ENT_PER_PAGE):
    spte = sp.spt[i].value_()
    if not is_shadow_present_pte(spte):
        continue
    pfn = spte_to_pfn(spte)
    large = level > 1 and is_large_pte(spte)
    if is_last_spte(spte, level):  # maps guest memory
        print(f"[{i}] spte {spte:#018x} pfn {pfn:#x} {'large' if large else 'leaf'}")
    else:  # a page table: its own shadow page (NULL, 0, if none)
        child = to_shadow_page(prog, pfn << PAGE_SHIFT)
        print(f"[{i}] spte {spte:#018x} pfn {pfn:#x} table child sp {child.value_():#x}")
""")
    return code.get()


def tree_code(prog: drgn.Program, lay: Layout, vms: list[VM], every: bool, top: int | None,
              depth: int | None) -> str:
    """The drgn code of ``tree``: walk spt[] down from every root (or from one page)."""
    code = DrgnCodeBuilder(prog)
    rules(code, prog, sptes=True)
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
    for i in range(SPTE_ENT_PER_PAGE):
        spte = sp.spt[i].value_()
        if is_shadow_present_pte(spte) and not is_last_spte(spte, level):
            child = to_shadow_page(prog, spte_to_pfn(spte) << PAGE_SHIFT)
            if child:
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
    if hpa != INVALID_PAGE and (sp := to_shadow_page(prog, hpa)):
        tops.setdefault(sp.value_(), sp)
""")
    code.end_block()
    # "kvm: x86/mmu: Allocate and free TDP MMU roots" (5.10, 02c00b3a2f7e)
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
