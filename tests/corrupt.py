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


# -- the MMU audit's invariants (check --audit), one broken each ------------------


def _audit_state(k: Kernel):
    """The VM's graph and every present leaf SPTE (kvminspect.audit.collect)."""
    from kvminspect.audit import collect
    from kvminspect.graph import build

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
    "leaf-wrong-pfn": leaf_wrong_pfn,
    "rmap-removed": rmap_removed,
    "unsync-level2": unsync_level2,
    "writable-shadowed": writable_shadowed,
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
