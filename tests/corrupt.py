"""Make corrupted copies of a real vmcore fixture, one damaged kernel object each.

The objects are found through drgn on the real fixture; their virtual
addresses are translated to physical ones through the kernel's page tables
(follow_phys on init_mm) and then to file offsets through the ELF program
headers, where the bytes are patched. The copy keeps the fixture's debug
files (symlinked), so it is a kvminspect target on its own.

    python3 -m tests.corrupt FIXTURE CASE OUTDIR     # one case
    python3 -m tests.corrupt FIXTURE --list          # the cases
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import drgn
from drgn.helpers.linux.mm import follow_phys

from kvminspect.model import VM, Kernel
from kvminspect.target import Target, decompressed, fixture_parts, open_core

VMCORES = Path(__file__).resolve().parent / "vmcores"
UNMAPPED = 0xFFFFC8FFFFF00000  # vmalloc space nothing maps in these small hosts


@dataclass
class Patch:
    """Bytes to write at a kernel virtual address."""

    addr: int
    data: bytes
    what: str  # the object damaged, for the tests' expectations


class Core:
    """The ELF core of a fixture with its program headers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            ehdr = f.read(64)
            phoff, = struct.unpack_from("<Q", ehdr, 32)
            phnum, = struct.unpack_from("<H", ehdr, 56)
            f.seek(phoff)
            self.loads = []
            for _ in range(phnum):
                t, _, off, _, pa, filesz, _, _ = struct.unpack("<IIQQQQQQ", f.read(56))
                if t == 1:
                    self.loads.append((pa, filesz, off))

    def offset(self, phys: int) -> int:
        """File offset of physical address *phys*."""
        for pa, size, off in self.loads:
            if pa <= phys < pa + size:
                return off + phys - pa
        raise ValueError(f"physical address {phys:#x} is not in the dump")


def phys(prog: drgn.Program, va: int) -> int:
    """Kernel virtual to physical, through init_mm's page tables."""
    return follow_phys(prog["init_mm"].address_of_(), va).value_()


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & (2**64 - 1))


def u32(v: int) -> bytes:
    return struct.pack("<I", v & (2**32 - 1))


def _vm(k: Kernel) -> VM:
    return k.vms()[0]


def _root_sp(k: Kernel, vcpu: int = 0):
    return k.vcpus(_vm(k))[vcpu].root.sp


def _child(k: Kernel, sp, depth: int):
    """The first child page *depth* levels below *sp*."""
    for _ in range(depth):
        sp = k.shadow_page(k.children(sp)[0].child)
    return sp


def garbage_page_table(k: Kernel) -> list[Patch]:
    """The root's level-3 page table filled with garbage."""
    sp = _child(k, _root_sp(k), 1)
    junk = bytes((i * 151 + 7) & 0xFF for i in range(4096))
    return [Patch(sp.spt, junk, f"spt of {sp.addr:#x}")]


def active_list_loop(k: Kernel) -> list[Patch]:
    """kvm->arch.active_mmu_pages: the 5th node's next points back at the 2nd."""
    nodes = [a + k.layout.sp.link for a in k.active_pages(_vm(k))]
    return [Patch(nodes[4], u64(nodes[1]), "kvm->arch.active_mmu_pages")]


def active_list_self_loop(k: Kernel) -> list[Patch]:
    """kvm->arch.active_mmu_pages: the 3rd node's next points at itself."""
    nodes = [a + k.layout.sp.link for a in k.active_pages(_vm(k))]
    return [Patch(nodes[2], u64(nodes[2]), "kvm->arch.active_mmu_pages")]


def vm_list_loop(k: Kernel) -> list[Patch]:
    """vm_list: the VM's node points at itself."""
    node = _vm(k).addr + drgn.offsetof(k.prog.type("struct kvm"), "vm_list")
    return [Patch(node, u64(node), "vm_list")]


def vm_list_unmapped(k: Kernel) -> list[Patch]:
    """vm_list's head points into unmapped memory: no VM can be read."""
    head = k.prog.symbol("vm_list").address
    return [Patch(head, u64(UNMAPPED), "vm_list")]


def tdp_roots_loop(k: Kernel) -> list[Patch]:
    """kvm->arch.tdp_mmu_roots: the root's link points at itself."""
    node = k.tdp_roots(_vm(k))[0] + k.layout.sp.link
    return [Patch(node, u64(node), "kvm->arch.tdp_mmu_roots")]


def vcpu_mmu_unmapped(k: Kernel) -> list[Patch]:
    """vcpu[1]->arch.mmu points into unmapped memory."""
    v = drgn.Object(k.prog, "struct kvm_vcpu *", k.vcpus(_vm(k))[1].addr)
    return [Patch(v.arch.mmu.address_of_().value_(), u64(UNMAPPED), f"vcpu {v.value_():#x}")]


def spt_unmapped(k: Kernel) -> list[Patch]:
    """A level-2 page's sp->spt points into unmapped memory."""
    sp = _child(k, _root_sp(k), 2)
    return [Patch(sp.addr + k.layout.sp.spt, u64(UNMAPPED), f"spt of {sp.addr:#x}")]


def prev_root_unmapped(k: Kernel) -> list[Patch]:
    """vcpu[0]->arch.mmu->prev_roots[1].hpa beyond the end of memory."""
    v = drgn.Object(k.prog, "struct kvm_vcpu *", k.vcpus(_vm(k))[0].addr)
    hpa = v.arch.mmu.prev_roots[1].hpa.address_of_().value_()
    return [Patch(hpa, u64(0x7FFF_F000_0000), "prev_roots[1]")]


def _role_word(k: Kernel, sp, level: int) -> bytes:
    lvl = next(f for f in k.layout.sp.role_fields if f.name == "level")
    word = (sp.role.word & ~(((1 << lvl.width) - 1) << lvl.shift)) | (level << lvl.shift)
    return u32(word)


def level_zero(k: Kernel) -> list[Patch]:
    """The level-3 page of vcpu0's root claims level 0."""
    sp = _child(k, _root_sp(k), 1)
    return [Patch(sp.addr + k.layout.sp.role, _role_word(k, sp, 0), f"{sp.addr:#x}")]


def level_too_big(k: Kernel) -> list[Patch]:
    """vcpu0's root claims level 7."""
    sp = _root_sp(k)
    return [Patch(sp.addr + k.layout.sp.role, _role_word(k, sp, 7), f"{sp.addr:#x}")]


def unsync_children_huge(k: Kernel) -> list[Patch]:
    """The level-2 page of vcpu0's root has unsync_children = 1000."""
    sp = _child(k, _root_sp(k), 2)
    return [Patch(sp.addr + k.layout.sp.unsync_children, u32(1000), f"{sp.addr:#x}")]


def spte_cycle(k: Kernel) -> list[Patch]:
    """A level-2 SPTE points back at the root's page table (a cycle)."""
    root = _root_sp(k)
    pd = _child(k, root, 2)
    spt = k.sptes(pd)
    i = next(i for i, v in enumerate(spt) if k.spte_present(v))
    flags = spt[i] & ~k.layout.addr_mask
    root_hpa = k.vcpus(_vm(k))[0].root.hpa
    return [Patch(pd.spt + 8 * i, u64(root_hpa | flags), f"{pd.addr:#x}")]


def wrong_child_level(k: Kernel) -> list[Patch]:
    """The root's level-3 child claims level 2."""
    sp = _child(k, _root_sp(k), 1)
    return [Patch(sp.addr + k.layout.sp.role, _role_word(k, sp, 2), f"{sp.addr:#x}")]


def private_mismatch(k: Kernel) -> list[Patch]:
    """The struct page of the root's level-3 page table names the level-2 page
    below it as its owner (page->private): to_shadow_page() of the root's SPTE
    leads to the level-2 page, while the level-3 page's sp->spt is that page."""
    l3 = _child(k, _root_sp(k), 1)
    l2 = _child(k, l3, 1)
    lay = k.layout
    pfn = (l3.spt - lay.page_offset_base) >> 12
    at = lay.vmemmap_base + pfn * lay.page_size + lay.page_private
    return [Patch(at, u64(l2.addr), f"struct page of {l3.addr:#x}'s spt -> {l2.addr:#x}")]


def reload_request_cleared(k: Kernel) -> list[Patch]:
    """A zapped fixture: vcpu0's reload request (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, or
    MMU_RELOAD in 5.10) cleared from vcpu->requests: its obsolete root stays."""
    from kvminspect.check import RELOAD_REQUESTS

    v = k.vcpus(_vm(k))[0]
    table = k.vcpu_reader.request_table()
    assert table is not None and isinstance(v.requests, int)
    mask = sum(1 << b for b, n in table.names.items() if n in RELOAD_REQUESTS)
    assert v.requests & mask, "vcpu0 has no reload request to clear"
    off = drgn.offsetof(k.prog.type("struct kvm_vcpu"), "requests")
    return [Patch(v.addr + off, u64(v.requests & ~mask), f"vcpu0 {v.addr:#x} requests")]


def _fault_in_invalidation(k: Kernel, exit_code: int, address: int, error: int,
                           first: int, last: int) -> list[Patch]:
    """vcpu0's VMCB says its last exit was *exit_code* at *address* (exit_info_2,
    error code exit_info_1), and struct kvm has one MMU notifier invalidation in
    progress over [first, last) in its range's unit."""
    vm = _vm(k)
    v = k.vcpus(vm)[0]
    svm = drgn.container_of(drgn.Object(k.prog, "struct kvm_vcpu *", v.addr),
                            "struct vcpu_svm", "vcpu")
    control = svm.vmcb.control
    patches = [Patch(control.exit_code.address_, u32(exit_code), "vcpu0 exit_code")]
    if "exit_code_hi" in {m.name for m in control.type_.members}:
        patches.append(Patch(control.exit_code_hi.address_, u32(0), "vcpu0 exit_code_hi"))
    else:  # 7.0+: one u64 exit_code
        patches[0] = Patch(control.exit_code.address_, u64(exit_code), "vcpu0 exit_code")
    patches += [Patch(control.exit_info_1.address_, u64(error), "vcpu0 exit_info_1"),
                Patch(control.exit_info_2.address_, u64(address), "vcpu0 exit_info_2")]
    kvm = k.kvm_object(vm)
    prefix, count = (("mmu_invalidate", "in_progress")
                     if "mmu_invalidate_seq" in {m.name for m in kvm.type_.type.members}
                     else ("mmu_notifier", "count"))
    for member, val in ((f"{prefix}_{count}", 1), (f"{prefix}_range_start", first),
                        (f"{prefix}_range_end", last)):
        obj = kvm.member_(member)
        data = val.to_bytes(drgn.sizeof(obj), "little")
        patches.append(Patch(obj.address_, data, f"kvm->{member} = {val:#x}"))
    return patches


def _gfn_or_hva(k: Kernel, gfn: int) -> int:
    """gfn, or its hva where the range counts hvas (to 6.7)."""
    from kvminspect.read_vmstate import RangeUnit

    vm = _vm(k)
    if k.vm_state(vm, hash_chains=False).invalidation.unit is RangeUnit.HVA:
        slot = vm.memslot_of(gfn)
        assert slot is not None, f"gfn {gfn:#x} is in no memslot"
        return slot.hva_of(gfn)
    return gfn


def npf_in_invalidation(k: Kernel) -> list[Patch]:
    """A TDP host: vcpu0 last exited on an NPF at gpa 0x200000 (the guest's data
    window), inside an invalidation in progress over that gfn."""
    at = _gfn_or_hva(k, 0x200)
    return _fault_in_invalidation(k, 0x400, 0x200000, 0x100000004, at, at + 1)


def npf_outside_invalidation(k: Kernel) -> list[Patch]:
    """The same NPF, the invalidation over another page (gfn 0x300)."""
    at = _gfn_or_hva(k, 0x300)
    return _fault_in_invalidation(k, 0x400, 0x200000, 0x100000004, at, at + 1)


def pf_in_invalidation(k: Kernel) -> list[Patch]:
    """A shadow-paging host: vcpu0 last exited on a #PF intercept (SVM_EXIT_EXCP_BASE
    + PF_VECTOR) at guest virtual 0x200000, which the guest maps to gfn 0x200,
    inside an invalidation in progress over it."""
    at = _gfn_or_hva(k, 0x200)
    return _fault_in_invalidation(k, 0x4E, 0x200000, 0x2, at, at + 1)


def owner_task_unmapped(k: Kernel) -> list[Patch]:
    """The VM owner's struct pid points its task list into unmapped memory, as a
    dump filtered with makedumpfile -d 31 (tasks' slab pages dropped) reads."""
    from drgn.helpers.linux.pid import find_pid

    pid = find_pid(k.prog, _vm(k).pid)
    first = pid.tasks[0].first  # PIDTYPE_PID
    return [Patch(first.address_, u64(UNMAPPED), f"struct pid {pid.value_():#x} tasks[0]")]


# -- the MMU audit's invariants (check --audit), one broken each ------------------


def _audit_state(k: Kernel):
    """The VM's graph and every present leaf SPTE (kvminspect.audit.collect)."""
    from kvminspect.graph import build
    from kvminspect.leaves import collect

    vg = build(k, _vm(k))
    return vg, collect(k, vg)


def leaf_wrong_pfn(k: Kernel) -> list[Patch]:
    """The leaf SPTE mapping the data page (gfn 0x200) of the first level-1 page
    that has one points at the next host page (pfn + 1)."""
    _, st = _audit_state(k)
    leaf = next(x for x in st.leaves if x.gfn == 0x200 and x.sp.level == 1)
    return [Patch(leaf.sptep, u64(leaf.value + 0x1000), f"{leaf.sp.addr:#x} {leaf.index}")]


def rmap_removed(k: Kernel) -> list[Patch]:
    """The rmap head of the vCPU 0 stack page's gfn (0x10, one SPTE: no
    pte_list_desc) emptied: that leaf SPTE has no rmap entry."""
    from kvminspect.rmap import RmapReader, gfn_to_index

    r = RmapReader(k)
    slot = next(s for s in r.slots(_vm(k)) if s.holds(0x10) and s.as_id == 0)
    head = slot.rmap[0] + 8 * gfn_to_index(0x10, slot.base_gfn, 1)
    sptep = k.prog.read_u64(head)
    assert sptep & 1 == 0, "gfn 0x10 has more than one SPTE"
    sp = r.sp_of_sptep(sptep)
    return [Patch(head, u64(0), f"{sp:#x} (the rmap head of its spt[{(sptep & 4095) // 8}], "
                  "gfn 0x10)")]


def unsync_level2(k: Kernel) -> list[Patch]:
    """An indirect level-2 page that has unsync_children (so its parents' bits
    are set already) marked unsync itself."""
    vg, _ = _audit_state(k)
    sp = next(s for s in vg.pages() if s.level == 2 and not s.role.direct
              and s.unsync_children and not s.unsync)
    return [Patch(sp.addr + k.layout.sp.unsync, b"\x01", f"{sp.addr:#x}")]


def writable_shadowed(k: Kernel) -> list[Patch]:
    """A synced indirect level-1 page's sp->gfn set to the gfn of vCPU 0's stack
    page (0x10), which a writable leaf SPTE maps: that SPTE now maps a shadowed
    guest page table."""
    vg, st = _audit_state(k)
    mapping = {x.sp.addr for x in st.leaves if x.gfn == 0x10 and x.value & 2}
    assert mapping
    sp = next(s for s in vg.pages() if s.level == 1 and not s.role.direct and not s.unsync
              and not vg.obsolete(s) and s.gfn != 0x10 and s.addr not in mapping)
    return [Patch(sp.addr + k.layout.sp.gfn, u64(0x10), f"{sp.addr:#x}")]


# -- the kernel's own accounting (kvminspect.accounting), one counter off each -----


def _kvm(k: Kernel) -> drgn.Object:
    return drgn.Object(k.prog, "struct kvm *", _vm(k).addr)


def _plus_one(obj: drgn.Object, what: str) -> Patch:
    """The integer *obj* (u64, or an atomic64_t's counter) one more than it is."""
    from kvminspect.layout import bare_type

    if bare_type(obj.type_).kind == drgn.TypeKind.STRUCT:  # atomic64_t
        obj = obj.counter
    return Patch(obj.address_of_().value_(), u64(obj.value_() + 1),
                 f"{what} {obj.value_()} -> {obj.value_() + 1}")


def stat_pages(k: Kernel) -> list[Patch]:
    """kvm->stat.pages_4k one more than the present 4K leaf SPTEs (lpages before 5.15)."""
    stat = _kvm(k).stat
    name = "pages_4k" if "pages_4k" in _vm(k).stat else "lpages"
    return [_plus_one(getattr(stat, name), f"kvm->stat.{name}")]


def used_mmu_pages(k: Kernel) -> list[Patch]:
    """kvm->arch.n_used_mmu_pages (kvm->stat.mmu_shadow_pages in 7.3) one more than the
    shadow pages."""
    outer, inner = k.layout.used_pages_path.split(".")
    return [_plus_one(getattr(getattr(_kvm(k), outer), inner), f"kvm->{outer}.{inner}")]


def tdp_mmu_pages(k: Kernel) -> list[Patch]:
    """kvm->arch.tdp_mmu_pages (the count, 6.2-7.2) one more than the pages linked."""
    return [_plus_one(_kvm(k).arch.tdp_mmu_pages, "kvm->arch.tdp_mmu_pages")]


def stat_pages_mmu_lock_held(k: Kernel) -> list[Patch]:
    """stat-pages, in a dump taken with kvm->mmu_lock held for write (the qrwlock's
    writer byte, _QW_LOCKED): mid-update, as far as anyone can tell."""
    cnts = _kvm(k).mmu_lock.raw_lock.cnts.counter
    return [*stat_pages(k), Patch(cnts.address_of_().value_(), u32(0xFF), "mmu_lock held")]


# -- a page against its parent, SPTEs against the memslots (kvminspect.invariants) ---
#
# Each case's first Patch names the damaged page and where it is: "PAGE gfn GFN
# parent PARENT at INDEX" (and "spte J" for a damaged SPTE of PAGE), which
# tests/test_invariants.py reads back. The "-invalid" variants set role.invalid on
# that page too.


def _single_parent(vg, sp) -> tuple[int, int] | None:
    """(parent, index) when exactly one SPTE of a non-obsolete page points at *sp*."""
    ps = vg.parents(sp.addr)
    if len(ps) != 1 or len(ps[0][1]) != 1 or vg.obsolete(vg.sp(ps[0][0])):
        return None
    return ps[0][0], ps[0][1][0]


def _live_page(vg, pred) -> tuple:
    """The first non-obsolete page *pred* holds for, with one parent SPTE:
    (page, parent, index)."""
    for sp in vg.pages():
        if vg.obsolete(sp) or not pred(sp):
            continue
        place = _single_parent(vg, sp)
        if place is not None:
            return sp, place[0], place[1]
    raise LookupError("no such page in this fixture")


def _field(k: Kernel, name: str):
    return next(f for f in k.layout.sp.role_fields if f.name == name)


def _role_patch(k: Kernel, sp, word: int, invalid: bool, what: str) -> Patch:
    """sp->role.word = *word* (and role.invalid, when *invalid*)."""
    if invalid:
        word |= 1 << _field(k, "invalid").shift
    return Patch(sp.addr + k.layout.sp.role, u32(word), what)


def _where(sp, parent: int, index: int, gfn: int | None = None) -> str:
    return f"{sp.addr:#x} gfn {sp.gfn if gfn is None else gfn:#x} parent {parent:#x} at {index}"


def child_role_bit(k: Kernel, invalid: bool = False) -> list[Patch]:
    """role.cr0_wp of a level-1 page with one parent flipped: not its parent's
    (kvm_mmu_child_role copies it)."""
    vg, _ = _audit_state(k)
    sp, parent, index = _live_page(vg, lambda s: s.level == 1)
    word = sp.role.word ^ (1 << _field(k, "cr0_wp").shift)
    return [_role_patch(k, sp, word, invalid, _where(sp, parent, index))]


def child_level_wrong(k: Kernel, invalid: bool = False) -> list[Patch]:
    """A level-2 page with one level-3 parent (a level-1 page under a PAE root)
    claims one level more: not its parent's minus one."""
    vg, _ = _audit_state(k)
    level = 2 if any(s.level == 3 for s in vg.pages()) else 1
    sp, parent, index = _live_page(vg, lambda s: s.level == level)
    return [_role_patch(k, sp, int.from_bytes(_role_word(k, sp, sp.role.level + 1), "little"),
                        invalid, _where(sp, parent, index))]


def child_gfn_moved(k: Kernel, invalid: bool = False) -> list[Patch]:
    """A direct level-1 page's sp->gfn moved: under a direct (or TDP MMU) parent by
    0x100000 (no memslot there: its leaves' gfns leave the memslot too), under an
    indirect one by 0x100 (off the 512-gfn boundary FNAME(fetch) rounds to)."""
    vg, _ = _audit_state(k)

    def direct(s) -> bool:
        return s.tdp_mmu_page or s.role.direct

    try:
        sp, parent, index = _live_page(vg, lambda s: s.level == 1 and direct(s) and all(
            direct(vg.sp(p)) for p in vg.predecessors(s.addr)))
        gfn = sp.gfn + 0x100000
    except LookupError:  # (6.1-shadow-large: a 2 MiB guest page two page tables share)
        sp = next(s for s in vg.pages() if s.level == 1 and direct(s) and not vg.obsolete(s)
                  and vg.predecessors(s.addr))
        parent, (index, *_) = vg.parents(sp.addr)[0]
        gfn = sp.gfn + 0x100
    out = [Patch(sp.addr + k.layout.sp.gfn, u64(gfn), _where(sp, parent, index, gfn))]
    if invalid:
        out.append(_role_patch(k, sp, sp.role.word, True, "role.invalid"))
    return out


def _leaf_page(k: Kernel, vg, st):
    """A level-1 page with one parent and a present leaf of a gfn a memslot holds:
    (page, parent, index, the leaf)."""
    slots = _vm(k).memslots
    leaves = {}
    for x in st.leaves:
        if x.sp.level == 1 and x.gfn is not None and any(
                s.as_id == x.as_id and s.base_gfn <= x.gfn < s.base_gfn + s.npages
                for s in slots):
            leaves.setdefault(x.sp.addr, x)
    sp, parent, index = _live_page(vg, lambda s: s.addr in leaves)
    return sp, parent, index, leaves[sp.addr]


def mmio_over_ram(k: Kernel, invalid: bool = False, stale: bool = False) -> list[Patch]:
    """A present 4K leaf SPTE (of a level-1 page with one parent) replaced by the
    MMIO SPTE make_mmio_spte() would write for its gfn, with the memslots' current
    generation (*stale*: two generations back, which check_mmio_spte refuses)."""
    from kvminspect import spte

    vg, st = _audit_state(k)
    sp, parent, index, leaf = _leaf_page(k, vg, st)
    vm = _vm(k)
    gen = k.vm_reader.memslots_generation(vm)[leaf.as_id] - (2 if stale else 0)
    value = spte.make_mmio_spte(leaf.gfn, 7, gen, k.spte_masks(vm))
    out = [Patch(leaf.sptep, u64(value), f"{_where(sp, parent, index)} spte {leaf.index} "
                 f"mmio gfn {leaf.gfn:#x}")]
    if invalid:
        out.append(_role_patch(k, sp, sp.role.word, True, "role.invalid"))
    return out


NO_MEMSLOT_GFN = 0x100000  # beyond every fixture's memslots


def leaf_no_memslot(k: Kernel, invalid: bool = False) -> list[Patch]:
    """A present leaf SPTE for a gfn no memslot holds: in a direct (TDP MMU or
    shadow-MMU direct) level-2 page, a 2 MiB leaf at the first empty index past
    the memslots (a copy of a 4K leaf with PS set, its pfn rounded to 2 MiB); in
    an indirect level-1 page, a copy of a 4K leaf at an empty index, with
    shadowed_translation[index] (sp->gfns[index] before 6.0) saying gfn 0x100000."""
    from kvminspect import spte

    vg, st = _audit_state(k)
    vm = _vm(k)
    end = max(s.base_gfn + s.npages for s in vm.memslots)
    template = st.leaves[0].value
    empty = k.spte_masks(vm).layout.nonpresent
    direct = [s for s in vg.pages() if s.level == 2 and (s.tdp_mmu_page or s.role.direct)]
    if direct:
        sp, parent, index = _live_page(vg, lambda s: s in direct)
        spt = k.sptes(sp)
        i = next(i for i in range(512) if sp.gfn + (i << 9) >= end and spt[i] in (0, empty))
        pfn = ((template & k.layout.addr_mask) >> 12) & ~511
        value = (template & ~k.layout.addr_mask) | spte.PT_PAGE_SIZE_MASK | (pfn << 12)
        out = [Patch(sp.spt + 8 * i, u64(value),
                     f"{_where(sp, parent, index)} spte {i} leaf gfn {sp.gfn + (i << 9):#x}")]
    else:
        sp, parent, index = _live_page(
            vg, lambda s: s.level == 1 and not s.role.direct and not s.tdp_mmu_page
            and any(x.sp.addr == s.addr for x in st.leaves))
        spt = k.sptes(sp)
        i = next(i for i in range(512) if spt[i] in (0, empty))
        template = next(x.value for x in st.leaves if x.sp.addr == sp.addr)
        obj = drgn.Object(k.prog, "struct kvm_mmu_page *", sp.addr)
        try:  # "KVM: x86/mmu: Cache the access bits of shadowed translations" (6.0, 6a97575d5cff)
            array_at, entry = obj.shadowed_translation.value_(), NO_MEMSLOT_GFN << 12 | 7
        except AttributeError:
            array_at, entry = obj.gfns.value_(), NO_MEMSLOT_GFN
        out = [Patch(sp.spt + 8 * i, u64(template),
                     f"{_where(sp, parent, index)} spte {i} leaf gfn {NO_MEMSLOT_GFN:#x}"),
               Patch(array_at + 8 * i, u64(entry), "its gfn")]
    if invalid:
        out.append(_role_patch(k, sp, sp.role.word, True, "role.invalid"))
    return out


def mmio_stale(k: Kernel) -> list[Patch]:
    """mmio-over-ram with an MMIO generation two behind the memslots' (stale)."""
    return mmio_over_ram(k, stale=True)


def _in_invalid_page(case: Callable[..., list[Patch]]) -> Callable[[Kernel], list[Patch]]:
    """*case* with role.invalid set on the damaged page too."""
    def invalid(k: Kernel) -> list[Patch]:
        return case(k, invalid=True)
    invalid.__doc__ = f"{case.__name__} in a page with role.invalid set"
    return invalid


INVARIANT_CASES: dict[str, Callable[[Kernel], list[Patch]]] = {
    "child-role-bit": child_role_bit,
    "child-level-wrong": child_level_wrong,
    "child-gfn-moved": child_gfn_moved,
    "mmio-over-ram": mmio_over_ram,
    "leaf-no-memslot": leaf_no_memslot,
}


CASES: dict[str, Callable[[Kernel], list[Patch]]] = {
    "garbage-page-table": garbage_page_table,
    "active-list-loop": active_list_loop,
    "active-list-self-loop": active_list_self_loop,
    "vm-list-loop": vm_list_loop,
    "vm-list-unmapped": vm_list_unmapped,
    "tdp-roots-loop": tdp_roots_loop,
    "vcpu-mmu-unmapped": vcpu_mmu_unmapped,
    "spt-unmapped": spt_unmapped,
    "prev-root-unmapped": prev_root_unmapped,
    "level-zero": level_zero,
    "level-too-big": level_too_big,
    "unsync-children-huge": unsync_children_huge,
    "spte-cycle": spte_cycle,
    "wrong-child-level": wrong_child_level,
    "private-mismatch": private_mismatch,
    "reload-request-cleared": reload_request_cleared,
    "owner-task-unmapped": owner_task_unmapped,
    "npf-in-invalidation": npf_in_invalidation,
    "npf-outside-invalidation": npf_outside_invalidation,
    "pf-in-invalidation": pf_in_invalidation,
    "leaf-wrong-pfn": leaf_wrong_pfn,
    "rmap-removed": rmap_removed,
    "unsync-level2": unsync_level2,
    "writable-shadowed": writable_shadowed,
    "stat-pages": stat_pages,
    "used-mmu-pages": used_mmu_pages,
    "tdp-mmu-pages": tdp_mmu_pages,
    "stat-pages-mmu-lock-held": stat_pages_mmu_lock_held,
    **INVARIANT_CASES,
    **{f"{name}-invalid": _in_invalid_page(f) for name, f in INVARIANT_CASES.items()},
    "mmio-stale": mmio_stale,
}


def make(fixture: str, case: str, out: Path) -> list[Patch]:
    """Write fixture *fixture* with damage *case* into directory *out*."""
    src = VMCORES / fixture
    target: Target = open_core(str(src), [])
    k = Kernel(target.prog)
    patches = CASES[case](k)
    core_src, debug = fixture_parts(src)
    plain = decompressed(core_src)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / "vmcore"
    shutil.copyfile(plain, dst)
    core = Core(dst)
    with open(dst, "r+b") as f:
        for p in patches:
            pos = 0
            while pos < len(p.data):  # page by page: virtual pages need not be contiguous
                va = p.addr + pos
                n = min(len(p.data) - pos, 4096 - (va & 0xFFF))
                f.seek(core.offset(phys(target.prog, va)))
                f.write(p.data[pos:pos + n])
                pos += n
    for d in debug:
        link = out / d.name
        if not link.exists():
            os.symlink(d.resolve(), link)
    return patches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fixture")
    ap.add_argument("case", nargs="?", choices=sorted(CASES))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list or not a.case:
        print("\n".join(f"{n:22} {f.__doc__}" for n, f in CASES.items()))
        return
    for p in make(a.fixture, a.case, a.out):
        print(f"patched {len(p.data)} bytes at {p.addr:#x} ({p.what})", file=sys.stderr)


if __name__ == "__main__":
    main()
