"""layout.probe() on kernel releases we cannot boot here: 4.19, 5.4 and 5.15.

tests/layouts/kvm-<release>.c are cut-down transcriptions of those releases'
KVM declarations (see the header of each file for where they come from). Each
is compiled with ``gcc -g`` at test time and only its DWARF and ELF symbol
table are loaded into a drgn Program: no core, no memory. That is all probe()
decides from: struct members, and the vm_list symbol. Reads of
physical_mask / page_offset_base / vmemmap_base fault or find no symbol, and
probe() falls back to its x86-64 defaults.

drgn 0.3 ignores a bare ``.o`` as the main module (an ET_REL file has no load
addresses, and as a relocatable module its symbols have none either), so the
object is linked into a shared object, which drgn takes with
``Module.try_file(path, force=True)``; then ``prog.symbol("vm_list")`` resolves.

Only decisions and DWARF facts (member names, role bitfield positions) are
asserted, never offsets, which in these cut-down structs are not the real ones.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import drgn
import pytest

from kvminspect.errors import KvmNotFound
from kvminspect.layout import Layout, has_member, probe

LAYOUTS = Path(__file__).resolve().parent / "layouts"
RELEASES = ["4.19", "5.4", "5.15"]
GCC = shutil.which("gcc")

pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed")


def build(release: str, out: Path, *defines: str) -> Path:
    """Compile tests/layouts/kvm-RELEASE.c and link it into a shared object."""
    src = LAYOUTS / f"kvm-{release}.c"
    obj, lib = out / f"kvm-{release}.o", out / f"kvm-{release}.so"
    cflags = ["-g", "-fno-eliminate-unused-debug-types", "-fPIC", *defines]
    for cmd in (
        [GCC, *cflags, "-c", str(src), "-o", str(obj)],
        [GCC, "-shared", "-nostdlib", "-o", str(lib), str(obj)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return lib


def load(lib: Path) -> drgn.Program:
    """A drgn Program holding only *lib*'s DWARF and symbols."""
    prog = drgn.Program(drgn.host_platform)
    module = prog.main_module(lib.name, create=True)
    module.try_file(str(lib), force=True)
    assert module.debug_file_status == drgn.ModuleFileStatus.HAVE, lib
    return prog


@pytest.fixture(scope="module")
def release_prog(tmp_path_factory):
    """RELEASE -> (Program, probe(Program)), each built once per session."""
    cache: dict[str, tuple[drgn.Program, Layout]] = {}

    def get(release: str) -> tuple[drgn.Program, Layout]:
        if release not in cache:
            prog = load(build(release, tmp_path_factory.mktemp(f"kvm-{release}")))
            cache[release] = (prog, probe(prog))
        return cache[release]

    return get


# What probe() must decide, per release (docs/kernel-layouts.md).
DECISIONS = {
    "4.19": dict(
        vcpu_array=False,  # kvm->vcpus[]
        mmu_is_pointer=False,  # vcpu->arch.mmu embedded
        root_info=False,  # mmu->root_hpa
        root_pgd_name=None,  # no guest pgd in struct kvm_mmu
        prev_pgd_name="cr3",  # prev_roots[].cr3
        root_role=False,  # base_role
        special_roots=("pae_root", "lm_root"),
        tdp_mmu_per_vm=False,
        tdp_mmu_roots=False,
        tdp_mmu_pages_list=False,
        present_bit=False,  # "!= 0 && !mmio" era
        root_mmus=(),  # one embedded vcpu->arch.mmu; nested_mmu is a walker
    ),
    "5.4": dict(
        vcpu_array=False,
        mmu_is_pointer=True,  # root_mmu / guest_mmu
        root_info=False,
        root_pgd_name="root_cr3",
        prev_pgd_name="cr3",
        root_role=False,  # mmu_role
        special_roots=("pae_root", "lm_root"),
        tdp_mmu_per_vm=False,
        tdp_mmu_roots=False,
        tdp_mmu_pages_list=False,
        present_bit=False,
        root_mmus=("root_mmu", "guest_mmu"),  # both read; nested_mmu is a walker
    ),
    "5.15": dict(
        vcpu_array=False,  # still kvm->vcpus[]; the xarray came with 5.16/5.17
        mmu_is_pointer=True,
        root_info=False,  # root_hpa until 5.18
        root_pgd_name="root_pgd",
        prev_pgd_name="pgd",
        root_role=False,
        special_roots=("pae_root", "pml4_root", "pml5_root"),
        tdp_mmu_per_vm=True,  # kvm->arch.tdp_mmu_enabled
        tdp_mmu_roots=True,
        tdp_mmu_pages_list=True,  # kvm->arch.tdp_mmu_pages is a list_head
        present_bit=True,  # SPTE_MMU_PRESENT_MASK era
        root_mmus=("root_mmu", "guest_mmu"),
    ),
}

SP_DECISIONS = {
    # mmu_valid_gen: unsigned long in 4.19, u8 from 5.4; tdp_mmu_page from 5.10
    "4.19": dict(mmu_valid_gen_size=8, tdp_mmu_page=None, bitmap_bytes=64),
    "5.4": dict(mmu_valid_gen_size=1, tdp_mmu_page=None, bitmap_bytes=64),
    "5.15": dict(mmu_valid_gen_size=1, bitmap_bytes=64),  # tdp_mmu_page: below
}

# union kvm_mmu_page_role, in declaration order (the names are DWARF facts)
ROLE_NAMES = {
    "4.19": ("level", "cr4_pae", "quadrant", "direct", "access", "invalid", "nxe"),
    "5.4": ("level", "gpte_is_8_bytes", "quadrant", "direct", "access", "invalid", "nxe"),
    "5.15": ("level", "gpte_is_8_bytes", "quadrant", "direct", "access", "invalid", "efer_nx"),
}
ROLE_TAIL = ("cr0_wp", "smep_andnot_wp", "smap_andnot_wp", "ad_disabled", "guest_mode", "smm")

# (shift, width) from the reference's role table; renamed bits share a slot
REFERENCE_ROLE_BITS = {
    "level": (0, 4),
    "cr4_pae": (4, 1),
    "gpte_is_8_bytes": (4, 1),
    "quadrant": (5, 2),
    "direct": (7, 1),
    "access": (8, 3),
    "invalid": (11, 1),
    "nxe": (12, 1),
    "efer_nx": (12, 1),
    "cr0_wp": (13, 1),
    "smep_andnot_wp": (14, 1),
    "smap_andnot_wp": (15, 1),
    "ad_disabled": (16, 1),
    "guest_mode": (17, 1),
    "smm": (24, 8),
}


@pytest.mark.parametrize("release", RELEASES)
def test_probe_decisions(release_prog, release):
    _, layout = release_prog(release)
    got = {name: getattr(layout, name) for name in DECISIONS[release]}
    assert got == DECISIONS[release]


@pytest.mark.parametrize("release", RELEASES)
def test_shadow_page_decisions(release_prog, release):
    _, layout = release_prog(release)
    got = {name: getattr(layout.sp, name) for name in SP_DECISIONS[release]}
    assert got == SP_DECISIONS[release]


def test_5_15_tdp_mmu_page_and_root_count_union(release_prog):
    prog, layout = release_prog("5.15")
    sp = prog.type("struct kvm_mmu_page")
    assert layout.sp.tdp_mmu_page is not None
    assert layout.sp.tdp_mmu_page == drgn.offsetof(sp, "tdp_mmu_page")
    # root_count and refcount_t tdp_mmu_root_count share an anonymous union
    assert layout.sp.root_count == drgn.offsetof(sp, "tdp_mmu_root_count")
    root_count = next(m for m in sp.members if m.name is None)
    assert root_count.type.kind == drgn.TypeKind.UNION
    assert {m.name for m in root_count.type.members} == {"root_count", "tdp_mmu_root_count"}


@pytest.mark.parametrize("release", RELEASES)
def test_role_field_names(release_prog, release):
    _, layout = release_prog(release)
    names = tuple(b.name for b in layout.sp.role_fields)
    assert names == ROLE_NAMES[release] + ROLE_TAIL


@pytest.mark.parametrize("release", RELEASES)
def test_role_bitfields_match_reference(release_prog, release):
    _, layout = release_prog(release)
    fields = {b.name: (b.shift, b.width) for b in layout.sp.role_fields}
    for name in ("level", "direct", "invalid", "smm"):
        assert fields[name] == REFERENCE_ROLE_BITS[name], name
    assert fields == {name: REFERENCE_ROLE_BITS[name] for name in fields}
    # level 4, direct, smm 1 (SMM address space)
    word = 0x01000084
    decoded = {b.name: b.get(word) for b in layout.sp.role_fields}
    assert (decoded["level"], decoded["direct"], decoded["invalid"], decoded["smm"]) == (4, 1, 0, 1)


def test_struct_page_from_dwarf_or_defaults(release_prog):
    # 4.19's file has vmlinux's struct page; 5.4 and 5.15 leave it out
    prog, layout = release_prog("4.19")
    page = prog.type("struct page")
    assert (layout.page_size, layout.page_private) == (
        drgn.sizeof(page),
        drgn.offsetof(page, "private"),
    )
    assert (layout.page_size, layout.page_private) == (64, 40)
    for release in ("5.4", "5.15"):
        prog, layout = release_prog(release)
        with pytest.raises(LookupError):
            prog.type("struct page")
        assert (layout.page_size, layout.page_private) == (64, 40)


@pytest.mark.parametrize("release", RELEASES)
def test_unreadable_globals_fall_back(release_prog, release):
    prog, layout = release_prog(release)
    # 4.19's file defines the symbols (reads fault); the others lack them
    for name in ("physical_mask", "page_offset_base", "vmemmap_base"):
        if release == "4.19":
            prog.symbol(name)
        else:
            with pytest.raises(LookupError):
                prog.symbol(name)
    assert layout.addr_mask == ((1 << 52) - 1) & ~0xFFF
    assert layout.vmemmap_base == 0xFFFFEA0000000000
    assert layout.page_offset_base == 0xFFFF888000000000


def test_types_without_vm_list_symbol_is_kvm_not_found(tmp_path):
    # the types are all there, but no vm_list symbol: kvm.ko is not loaded
    prog = load(build("5.15", tmp_path, "-Dvm_list=vm_list_renamed_away"))
    prog.type("struct kvm_mmu_page")
    with pytest.raises(KvmNotFound):
        probe(prog)


@pytest.mark.parametrize("release", RELEASES)
def test_nested_mmus_read_for_roots(release_prog, release):
    """DWARF only (no fixture runs a nested guest): from 4.20 vcpu->arch embeds
    root_mmu and guest_mmu, each a struct kvm_mmu with its own root and
    prev_roots[], both read; nested_mmu is embedded too but only walks L2's page
    tables, so it is not among the MMUs whose roots are read."""
    prog, layout = release_prog(release)
    arch = prog.type("struct kvm_vcpu_arch")
    assert has_member(arch, "nested_mmu") and "nested_mmu" not in layout.root_mmus
    offsets = {n: drgn.offsetof(arch, n) for n in layout.root_mmus}
    assert len(set(offsets.values())) == len(layout.root_mmus)
    for n in layout.root_mmus:
        assert arch.member(n).type.unqualified().tag == "kvm_mmu"
    assert bool(layout.root_mmus) == layout.mmu_is_pointer
