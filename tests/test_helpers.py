"""kvminspect.helpers (the drgn helpers) against the model, on every fixture with VMs.

The helpers read the kernel through plain drgn Objects, one kernel rule each; the
model (kvminspect.model.Kernel) reads the same structures by offset, in bulk.
Both must find the same VMs, vCPUs, roots and shadow pages, page by page: address,
gfn, role word, level and children (index, SPTE, child shadow page).
"""

from __future__ import annotations

import doctest
import inspect
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import drgn
import pytest

from kvminspect import drgn_code, helpers, spte
from kvminspect.helpers import (
    INVALID_PAGE,
    for_each_active_mmu_page,
    for_each_tdp_mmu_page,
    for_each_tdp_mmu_root,
    for_each_vm,
    is_last_spte,
    is_shadow_present_pte,
    sp_children,
    spte_format,
    spte_to_pfn,
    to_shadow_page,
    vcpu_mmu_roots,
    vm_vcpus,
)
from kvminspect.model import VM, Kernel, RootRef, ShadowPage
from kvminspect.target import DEBUG_NAMES, decompressed
from tests.conftest import ALL, VMCORES, open_fixture, truth

ROOT = Path(__file__).resolve().parent.parent
# every fixture whose host runs VMs (not "no-vm", not "no-kvm")
WITH_VMS = [n for n in ALL if truth(n).get("special") not in ("no-vm", "no-kvm")]


def model_pages(k: Kernel, vm: VM) -> dict[int, ShadowPage]:
    """Every shadow page the model has for *vm*: its vCPUs' roots (PAE roots'
    pages too), the TDP MMU roots and the page lists, then their children."""
    start: list[int] = []
    for v in k.vcpus(vm):
        for ref in (v.root, *v.prev_roots):
            assert ref is not None
            if ref.sp is not None:
                start.append(ref.sp.addr)
            start.extend(addr for _, addr in ref.pae_roots)
    start += k.tdp_roots(vm) + k.active_pages(vm)
    pages: dict[int, ShadowPage] = {}
    queue = deque(start)
    while queue:
        addr = queue.popleft()
        if addr in pages:
            continue
        sp = k.shadow_page(addr)
        assert sp is not None, hex(addr)
        pages[addr] = sp
        queue.extend(child for _, _, child in k.links(sp) if child is not None)
    return pages


def helper_pages(prog: drgn.Program, kvm: drgn.Object) -> dict[int, tuple[drgn.Object, int]]:
    """Every shadow page the helpers find for *kvm*, with the level the walk read it
    at: down from the vCPUs' roots and the TDP MMU roots first (a child one level
    below its parent: 5.10's TDP MMU children carry their parent's role.level),
    then from the page lists (role.level)."""
    pages: dict[int, tuple[drgn.Object, int]] = {}

    def walk(tops: list[drgn.Object]) -> None:
        queue = deque((sp, sp.role.level.value_()) for sp in tops)
        while queue:
            sp, level = queue.popleft()
            if sp.value_() in pages:
                continue
            pages[sp.value_()] = (sp, level)
            queue.extend((child, level - 1) for _, _, child in sp_children(sp, level) if child)

    roots = [sp for vcpu in vm_vcpus(kvm) for root in vcpu_mmu_roots(vcpu)
             if root.hpa != INVALID_PAGE and (sp := to_shadow_page(prog, root.hpa))]
    walk(roots + list(for_each_tdp_mmu_root(kvm)))
    # the lists: the shadow MMU's pages (a PAE guest's pae_root[] pages among
    # them) and 5.10-6.1's TDP MMU pages
    walk(list(for_each_active_mmu_page(kvm)) + list(for_each_tdp_mmu_page(kvm)))
    return pages


def _root(ref: RootRef) -> tuple[int | None, int]:
    return ref.hpa, ref.pgd


@pytest.mark.parametrize("name", WITH_VMS)
def test_vms_and_vcpus_are_the_models(name: str) -> None:
    t = open_fixture(name)
    k = t.kernel
    kvms = list(for_each_vm(t.prog))
    assert [kvm.value_() for kvm in kvms] == [vm.addr for vm in k.vms()] != []
    for vm, kvm in zip(k.vms(), kvms, strict=True):
        assert [v.value_() for v in vm_vcpus(kvm)] == [v.addr for v in k.vcpus(vm)] != []


@pytest.mark.parametrize("name", WITH_VMS)
def test_vcpu_roots_are_the_models(name: str) -> None:
    """vcpu_mmu_roots(): mmu->root then prev_roots[], as (hpa, pgd), and the shadow
    page behind each hpa (to_shadow_page: NULL for a PAE or dummy root)."""
    t = open_fixture(name)
    k = t.kernel
    specials = 0
    for vm, kvm in zip(k.vms(), for_each_vm(t.prog), strict=True):
        for v, vcpu in zip(k.vcpus(vm), vm_vcpus(kvm), strict=True):
            roots = vcpu_mmu_roots(vcpu)
            assert roots[0].name == "root" and roots[0].current
            assert not any(r.current for r in roots[1:])
            assert [r.name for r in roots[1:]] == [f"prev_roots[{i}]"
                                                   for i in range(len(v.prev_roots))]
            refs = [v.root, *v.prev_roots]
            assert all(ref is not None for ref in refs)
            got = [(None if r.hpa == INVALID_PAGE else r.hpa, r.pgd) for r in roots]
            assert got == [_root(ref) for ref in refs if ref is not None]
            for r, ref in zip(roots, refs, strict=True):
                assert ref is not None
                if r.hpa == INVALID_PAGE:
                    continue
                sp = to_shadow_page(t.prog, r.hpa)
                assert sp.value_() == (ref.sp.addr if ref.sp is not None else 0)
                specials += ref.special is not None
    # a 32-bit PAE guest's root is __pa(mmu->pae_root), which has no shadow page
    assert specials > 0 if name.endswith("-pae") else True


@pytest.mark.parametrize("name", WITH_VMS)
def test_shadow_pages_are_the_models_page_by_page(name: str) -> None:
    """Every shadow page: the same set of pages; per page its gfn, role word,
    level and children (sp_children against Kernel.links)."""
    t = open_fixture(name)
    k = t.kernel
    compared = 0
    for vm, kvm in zip(k.vms(), for_each_vm(t.prog), strict=True):
        want = model_pages(k, vm)
        got = helper_pages(t.prog, kvm)
        assert sorted(got) == sorted(want)
        for addr, sp in want.items():
            obj, level = got[addr]
            assert obj.gfn.value_() == sp.gfn, hex(addr)
            # the role word, not role.level: 5.10's TDP MMU children carry their
            # parent's level there, and the model shows their real one
            assert obj.role.word.value_() == sp.role.word, hex(addr)
            assert level == sp.level, hex(addr)
            if sp.level != sp.role.level:
                assert sp.tdp_mmu_page and sp.level == sp.role.level - 1
            children = [(i, v, child.value_()) for i, v, child in sp_children(obj, level)]
            assert children == [(i, v, c or 0) for i, v, c in k.links(sp)], hex(addr)
            compared += 1
    zapped = all(vm.get("zapped") for vm in truth(name).get("vms", [truth(name)]))
    assert compared > 0 or zapped


@pytest.mark.parametrize("name", WITH_VMS)
def test_spte_rules_are_the_models(name: str) -> None:
    """spte_format(): the presence rule and SPTE_BASE_ADDR_MASK the helpers probe
    are the model's (layout.probe); the per-SPTE helpers agree with spte.decode."""
    t = open_fixture(name)
    k = t.kernel
    fmt = spte_format(t.prog)
    assert fmt == k.spte_format
    assert spte_format(t.prog) is fmt  # probed once per program (prog.cache)
    for vm in k.vms():
        for addr in k.active_pages(vm)[:8] + k.tdp_roots(vm)[:2]:
            sp = k.shadow_page(addr)
            assert sp is not None
            table = k.sptes(sp)
            assert table is not None
            for value in table:
                d = spte.decode(value, sp.level, fmt)
                assert is_shadow_present_pte(t.prog, value) == d.present
                assert spte_to_pfn(t.prog, value) == d.pfn
                if d.present:
                    assert is_last_spte(value, sp.level) == d.leaf


def test_sp_children_of_a_level_1_page_is_empty() -> None:
    t = open_fixture("6.1-shadow")
    vm = t.kernel.vms()[0]
    addr = next(a for a in t.kernel.active_pages(vm) if t.kernel.shadow_page(a).level == 1)
    sp = drgn.Object(t.prog, "struct kvm_mmu_page *", addr)
    assert list(sp_children(sp)) == []
    assert any(spte.is_shadow_present_pte(v, spte_format(t.prog)) for v in helpers.sp_sptes(sp))


def drgn_program(name: str) -> drgn.Program:
    """Fixture *name* opened as a drgn script gets it: the core and the debug files."""
    fixture = VMCORES / name
    prog = drgn.Program()
    prog.set_core_dump(str(decompressed(fixture / "vmcore.xz")))
    debug = [str(decompressed(p)) for p in sorted(fixture.iterdir())
             if DEBUG_NAMES.match(p.name.removesuffix(".xz"))]
    try:
        prog.load_debug_info(debug, main=True)
    except drgn.MissingDebugInfoError:
        pass  # kvm.ko of a host that never loaded it
    return prog


def test_no_vm_and_no_kvm() -> None:
    """A host with kvm loaded but no VM has none; without kvm.ko there is no vm_list."""
    assert list(for_each_vm(drgn_program("6.1-no-vm"))) == []
    with pytest.raises(LookupError):  # drgn: KeyError, "vm_list" not found
        list(for_each_vm(drgn_program("6.1-no-kvm")))


# -- the helpers' documentation ------------------------------------------------------------

PUBLIC = [name for name, obj in vars(helpers).items()
          if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
          and getattr(obj, "__module__", None) == helpers.__name__]
# the examples run on the bundled sample's VM, these on the 6.1 TDP MMU one
TDP_EXAMPLES = {"for_each_tdp_mmu_root", "for_each_tdp_mmu_page"}


def test_every_public_helper_is_exported_with_an_example() -> None:
    assert sorted(helpers.__all__) == sorted([*PUBLIC, "INVALID_PAGE"])
    assert len(PUBLIC) >= 15
    for name in PUBLIC:
        doc = inspect.getdoc(getattr(helpers, name)) or ""
        assert ">>>" in doc, name
        if inspect.isfunction(getattr(helpers, name)):
            assert ":return:" in doc or ":param" in doc, name


def _example_globs(fixture: str) -> dict[str, object]:
    """What a helper's examples name: prog, the first VM's kvm, its first vcpu and
    the shadow page of that vCPU's root, and the helpers."""
    prog = open_fixture(fixture).prog
    kvm = next(for_each_vm(prog))
    vcpu = next(vm_vcpus(kvm))
    return {"prog": prog, "kvm": kvm, "vcpu": vcpu,
            "sp": to_shadow_page(prog, vcpu_mmu_roots(vcpu)[0].hpa),
            **{n: getattr(helpers, n) for n in helpers.__all__}}


@pytest.mark.parametrize("name", PUBLIC)
def test_the_examples_print_what_they_say(name: str) -> None:
    """Each helper's ``>>>`` example, run as a doctest on a real vmcore."""
    globs = _example_globs("6.1-tdp" if name in TDP_EXAMPLES else "6.1-shadow")
    test = doctest.DocTestParser().get_doctest(
        inspect.getdoc(getattr(helpers, name)) or "", globs, name, None, 0)
    assert test.examples
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)


# -- standalone: a plain drgn script, and the code --drgn prints ------------------------------


def test_drgn_code_prints_the_helpers_own_rules() -> None:
    """--drgn prints the helpers' to_shadow_page and kvminspect.spte's rules, not a
    copy: the printed functions are their source, the constants their values."""
    t = open_fixture("5.10-shadow")
    from drgn.commands import DrgnCodeBuilder

    code = DrgnCodeBuilder(t.prog)
    drgn_code.rules(code, t.prog, sptes=True)
    text = code.get()
    assert drgn_code.source(helpers.to_shadow_page).split('"""')[-1] in text
    assert "@takes_program_or_default" not in text and ">>>" not in text
    assert drgn_code.source(spte.is_shadow_present_not_mmio, "is_shadow_present_pte") in text
    assert f"SPTE_BASE_ADDR_MASK = {spte_format(t.prog).addr_mask:#x}" in text
    assert f"SPTE_MMIO_MASK = {spte.SPTE_MMIO_MASK:#x}" in text
    assert "SPTE_MMU_PRESENT_MASK" not in text  # 5.10: presence is "not MMIO"
    scope: dict[str, Any] = {"prog": t.prog}
    exec(compile(text, "<--drgn>", "exec"), scope)
    present = scope["is_shadow_present_pte"]
    for value in (0, 0x2ed6827, spte.SPTE_MMIO_MASK | 0x827):
        assert present(value) == is_shadow_present_pte(t.prog, value)
    assert scope["to_shadow_page"](t.prog, 0).value_() == to_shadow_page(t.prog, 0).value_()


README_SECTION = re.search(r"^## drgn helpers\n(.*?)^## ", (ROOT / "README.md").read_text(),
                           re.M | re.S)


@pytest.mark.slow
def test_the_readme_script_runs_in_drgn(tmp_path: Path) -> None:
    """The README's example script, run by drgn's own CLI on the bundled sample as the
    README says (the files decompressed), prints each vCPU root's shadow page, and
    first the lines the README shows."""
    assert README_SECTION, "README.md has a '## drgn helpers' section"
    script = re.search(r"```python\n(.*?)^```", README_SECTION[1], re.M | re.S)
    assert script
    (tmp_path / "roots.py").write_text(script[1])
    fixture = VMCORES / "6.1-shadow"
    argv = [sys.executable, "-m", "drgn", "-q",
            "-c", str(decompressed(fixture / "vmcore.xz"))]
    for p in sorted(fixture.iterdir()):
        if DEBUG_NAMES.match(p.name.removesuffix(".xz")):
            argv += ["-s", str(decompressed(p))]
    p = subprocess.run([*argv, str(tmp_path / "roots.py")], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    k = open_fixture("6.1-shadow").kernel
    want = [f"sp {ref.sp.addr:#x}" for vm in k.vms() for v in k.vcpus(vm)
            for ref in (v.root, *v.prev_roots) if ref is not None and ref.sp is not None]
    got = re.findall(r"sp 0x[0-9a-f]+", p.stdout)
    assert got == want and want
    shown = re.search(r"```text\n(.*?)^```", README_SECTION[1], re.M | re.S)
    assert shown  # the output the README shows is the output's first lines
    assert p.stdout.splitlines()[:len(shown[1].splitlines())] == shown[1].splitlines()
