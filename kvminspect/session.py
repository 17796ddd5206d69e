"""A session: one opened target, the selected VM, and per-target caches."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvminspect import graph
from kvminspect.errors import LookupFailed, Problem
from kvminspect.model import VM, Kernel, ShadowPage
from kvminspect.target import Target


@dataclass
class Session:
    """State shared by the commands of one REPL or one-shot run."""

    target: Target
    selected: VM | None = None
    printed: set[Problem] = field(default_factory=set)  # warned on stderr already
    _graphs: dict[int, graph.VMGraph] = field(default_factory=dict)

    @property
    def kernel(self) -> Kernel:
        return self.target.kernel

    def select(self, ident: str) -> VM:
        self.selected = self.kernel.vm_by_id(ident)
        return self.selected

    def vms(self, ident: str | None = None) -> list[VM]:
        """The VMs a command works on: --vm ID, else the selected VM, else all."""
        if ident is not None:
            return [self.kernel.vm_by_id(ident)]
        if self.selected is not None:
            return [self.selected]
        return self.kernel.vms()

    def graph(self, vm: VM) -> graph.VMGraph:
        """The shadow-page graph of *vm* (built once per session).

        A VM whose MMU kvminspect cannot read (VM.unsupported: TDX) gets an
        empty graph and a one-line problem saying so.
        """
        if vm.addr not in self._graphs:
            if vm.unsupported:
                with self.kernel.reading(vm):
                    self.kernel.problem("struct kvm", vm.addr,
                                        f"{vm.unsupported} not supported: its MMU is not read")
                self._graphs[vm.addr] = graph.VMGraph(vm, [], graph.nx.DiGraph())
            else:
                self._graphs[vm.addr] = graph.build(self.kernel, vm)
        return self._graphs[vm.addr]

    def find_sp(self, addr: int, vms: list[VM]) -> tuple[VM, ShadowPage]:
        """The VM and shadow page at *addr*, which must be in one of *vms*' graphs."""
        for vm in vms:
            g = self.graph(vm)
            if addr in g.graph:
                return vm, g.sp(addr)
        raise LookupFailed(f"{addr:#x} is not a shadow page of "
                           + ("this VM" if len(vms) == 1 else "any VM"))

    def prompt(self) -> str:
        vm = f" vm{self.selected.index}" if self.selected else ""
        return f"kvminspect({self.target.name}{vm})> "
