"""Benchmark: rebuilding the shadow-page graph vs a naive drgn-Object walk.

Run by hand: python3 -m benchmarks.bench_graph [FIXTURE ...]
For each fixture, in the same run: the baseline reads every struct kvm_mmu_page
field and every spt[] entry through drgn Objects (what a first drgn script
does); kvminspect reads each struct and each page table as one block. Both
start from a fresh Program so neither has a warm cache. Prints times and the
ratio baseline / kvminspect.
"""

from __future__ import annotations

import sys
import time

import drgn
from drgn.helpers.linux.list import list_for_each_entry

from kvminspect import graph
from kvminspect.model import Kernel
from tests.conftest import FIXTURES, VMCORES


def naive(prog: drgn.Program) -> int:
    """Every shadow page on active_mmu_pages: fields and SPTEs via Objects."""
    n = 0
    for kvm in list_for_each_entry("struct kvm", prog["vm_list"].address_of_(), "vm_list"):
        for sp in list_for_each_entry("struct kvm_mmu_page",
                                      kvm.arch.active_mmu_pages.address_of_(), "link"):
            _ = (sp.gfn.value_(), sp.role.level.value_(), sp.unsync.value_(),
                 sp.unsync_children.value_(), [w.value_() for w in sp.unsync_child_bitmap])
            n += sum(1 for i in range(512) if sp.spt[i].value_() & (1 << 11))
    return n


def ours(prog: drgn.Program) -> int:
    k = Kernel(prog)
    n = 0
    for vm in k.vms():
        g = graph.build(k, vm)
        n += sum(1 for sp in g.pages() for v in (k.sptes(sp) or ()) if k.spte_present(v))
    return n


def fresh(name: str) -> drgn.Program:
    from kvminspect.target import open_core

    return open_core(str(VMCORES / name), []).prog


def timed(fn, prog) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(prog)
    return time.perf_counter() - t, n


def main() -> None:
    names = sys.argv[1:] or [n for n in FIXTURES if "shadow" in n]
    print(f"{'fixture':22} {'pages':>5} {'naive s':>8} {'kvminspect s':>12} {'ratio':>6}")
    for name in names:
        tb, nb = timed(naive, fresh(name))
        to, no = timed(ours, fresh(name))
        pages = len(Kernel(fresh(name)).active_pages(Kernel(fresh(name)).vms()[0]))
        print(f"{name:22} {pages:5} {tb:8.3f} {to:12.3f} {tb / to:6.1f}x"
              + ("" if nb == no else f"  (present SPTEs differ: {nb} vs {no})"))


if __name__ == "__main__":
    main()
