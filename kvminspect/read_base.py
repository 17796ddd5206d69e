"""The common part of the kernel readers: the program, its layout, problems, lists."""

from __future__ import annotations

import array
import contextlib
from collections.abc import Iterator

import drgn

from kvminspect import spte
from kvminspect.errors import Problem, Problems
from kvminspect.layout import (
    UNKNOWN,
    Layout,
    MissingMember,
    probe,
)
from kvminspect.objects import (
    KERNEL_MIN,
    LIST_POISON,
    MAX_LIST,
    VM,
    Int,
    ShadowPage,
    VCpu,
)


class KernelBase:
    """What every reader shares: the target, its probed layout, the caches, the
    problems met (each owned by the VM being read) and bounded list walks."""

    def __init__(self, prog: drgn.Program, release: str | None = None,
                 layout: Layout | None = None) -> None:
        self.prog = prog
        self.layout: Layout = layout if layout is not None else probe(prog, release)
        self.problems = Problems()
        self.owner: int | None = None  # the VM being read (see reading())
        self._sp_cache: dict[int, ShadowPage | None] = {}
        self._spt_cache: dict[int, array.array | None] = {}
        self._vms: list[VM] | None = None
        self._tdp_quirk: bool | None = None
        self._spte_format: spte.SpteFormat | None = None
        self._role_widths = ({f.name: f.width for f in self.layout.sp.role_fields}
                             if self.layout.sp else {})
        self._vcpus: dict[int, list[VCpu]] = {}
        self._mmu_offsets: tuple[int, ...] | None = None

    @property
    def missing(self) -> tuple[MissingMember, ...]:
        """Members the model reads that this kernel lacks (shown as unknown)."""
        return self.layout.missing

    def value(self, obj: drgn.Object, struct: str, member: str) -> Int:
        """obj.member's integer value, or UNKNOWN when *struct* lacks *member*."""
        if self.layout.lacks(struct, member):
            return UNKNOWN
        return obj.member_(member).value_()

    def problem(self, kind: str, addr: int | None, what: str) -> None:
        """Record an unreadable or inconsistent object (once)."""
        self.problems.add(Problem(kind, addr, what), self.owner)

    @contextlib.contextmanager
    def reading(self, vm: VM | int | None) -> Iterator[None]:
        """Problems met inside belong to *vm* (a VM or its struct kvm address)."""
        outer, self.owner = self.owner, (vm.addr if isinstance(vm, VM) else vm)
        try:
            yield
        finally:
            self.owner = outer

    def list_nodes(self, head: int, kind: str) -> Iterator[int]:
        """Addresses of the nodes of a struct list_head list, bounded and cycle-safe."""
        seen = {head}
        try:
            node = self.prog.read_u64(head)
        except drgn.FaultError as e:
            self.problem(kind, head, f"list head unreadable ({e})")
            return
        if node == 0:  # never initialised (e.g. the TDP MMU lists of a shadow VM)
            return
        while node != head:
            if node in LIST_POISON or node < KERNEL_MIN:
                self.problem(kind, node, "list pointer is poisoned or not a kernel address")
                return
            if node in seen or len(seen) > MAX_LIST:
                self.problem(kind, head, f"list loops at {node:#x}")
                return
            seen.add(node)
            yield node
            try:
                node = self.prog.read_u64(node)
            except drgn.FaultError as e:
                self.problem(kind, node, f"list node unreadable ({e})")
                return
