"""A session: one opened target, the selected VM, and per-target caches."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import drgn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvminspect import graph
from kvminspect.errors import LookupFailed, Problem
from kvminspect.graph import VMGraph
from kvminspect.layout import known
from kvminspect.model import VM, Kernel, ShadowPage
from kvminspect.target import Target, open_core

T = TypeVar("T")
CHECK_ERRORS = 3  # the exit status when check found error findings (README: Exit status)


@dataclass
class Session:
    """State shared by the commands of one REPL or one-shot run."""

    target: Target
    selected: VM | None = None
    printed: set[Problem] = field(default_factory=set)  # warned on stderr already
    _graphs: dict[int, graph.VMGraph] = field(default_factory=dict)
    _others: dict[str, Session] = field(default_factory=dict)  # diff's B, by path
    _results: dict[tuple[Hashable, ...], Any] = field(default_factory=dict)  # memo()'s
    progress: bool = False  # a progress bar for slow graph builds (set by begin())
    py_globals: dict = field(default_factory=dict)  # the py command's names
    failed: int = 0  # the exit status of the first command that failed (0: none did)
    output_failed: bool = False  # the output could not be written (a script then stops)
    check_errors: bool = False  # a check found error findings

    def exit_status(self) -> int:
        """A script's exit status: the first failure's, else CHECK_ERRORS if a
        check found errors, else 0."""
        return self.failed or (CHECK_ERRORS if self.check_errors else 0)
    interactive: bool = False  # a REPL (selections last); False: one command and out
    paging: bool = True  # the REPL pages long output on a terminal ('pager off')
    # the process ends after this session's command (the one-shot CLI): graphs may
    # be frozen out of the cyclic GC's way (graph.build's freeze)
    freeze_graphs: bool = False

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

    def begin(self, progress: bool = False) -> None:
        """Before each command: on a live target, read the kernel anew (the layout
        is kept); the selected VM stays selected if it still exists. *progress*:
        the command may show a progress bar (see graph()), i.e. not under --json."""
        self.progress = progress
        if not self.target.fresh():
            return
        self._graphs.clear()
        self._results.clear()
        if self.selected is not None:
            old = self.selected
            self.selected = next((v for v in self.kernel.vms() if v.addr == old.addr), None)
            if self.selected is None:
                self.kernel.problem("struct kvm", old.addr,
                                    "the selected VM is gone (destroyed since it was selected)")

    def graph(self, vm: VM) -> graph.VMGraph:
        """The shadow-page graph of *vm* (built once per reading).

        A VM whose MMU kvminspect cannot read (VM.unsupported: TDX) gets an
        empty graph and a one-line problem saying so. On a live target a
        reading torn by a change of the MMU under it is retried once, then
        reported.
        """
        if vm.addr not in self._graphs:
            k = self.kernel
            if vm.unsupported:
                with k.reading(vm):
                    k.problem("struct kvm", vm.addr,
                              f"{vm.unsupported} not supported: its MMU is not read")
                self._graphs[vm.addr] = graph.VMGraph(vm, [])
            else:
                with progress_bar(k, vm, self.progress):
                    self._graphs[vm.addr] = (self._live_graph(vm) if self.target.live
                                             else graph.build(k, vm, self.freeze_graphs))
        return self._graphs[vm.addr]

    def memo(self, key: tuple[Hashable, ...], make: Callable[[], T]) -> T:
        """make()'s result, made once per reading as the graphs are: for the
        session on a vmcore (a REPL's second 'diagnose' prints what the first
        found, without reading again), anew after begin() on a live target.
        *key* names the command, the VM and whatever else the result depends on."""
        if key not in self._results:
            self._results[key] = make()
        return cast(T, self._results[key])

    def _live_graph(self, vm: VM) -> VMGraph:
        """graph.build on a running kernel: retried once if the MMU changed meanwhile."""
        k = self.kernel
        for attempt in (1, 2):
            try:
                before = k.change_marks(vm)
                g = graph.build(k, vm)
                if k.change_marks(vm) == before:
                    return g
            except drgn.FaultError:  # freed under us
                g = graph.VMGraph(vm, [])
            if attempt == 1:
                k.forget(vm)
        with k.reading(vm):
            k.problem("struct kvm", vm.addr, "the MMU changed while it was read, twice "
                      "(mmu_valid_gen, the notifier sequence or a page list moved): shown "
                      "as last read")
        return g

    def find_sp(self, addr: int, vms: list[VM]) -> tuple[VM, ShadowPage]:
        """The VM and shadow page at *addr*, which must be in one of *vms*' graphs."""
        for vm in vms:
            g = self.graph(vm)
            if addr in g:
                return vm, g.sp(addr)
        where = "this VM" if len(vms) == 1 else "any VM"
        searched = {vm.addr for vm in vms}
        for vm in self.kernel.vms():  # another VM's page: say whose
            if vm.addr not in searched and addr in self.graph(vm):
                raise LookupFailed(f"{addr:#x} is not a shadow page of {where}: it is VM "
                                   f"{vm.index}'s (pid {vm.pid}; use --vm {vm.index})")
        raise LookupFailed(f"{addr:#x} is not a shadow page of {where}")

    def other(self, path: str) -> Session:
        """A session on another vmcore or fixture directory (diff's B), opened
        with this target's -s paths; kept for this session (a vmcore is read once)."""
        key = str(Path(path).resolve())
        if key not in self._others:
            self._others[key] = Session(open_core(path, list(self.target.symbols)))
        return self._others[key]

    def prompt(self) -> str:
        vm = f" vm{self.selected.index}" if self.selected else ""
        return f"kvminspect({self.target.name}{vm})> "


PROGRESS_AFTER = 1.0  # seconds a graph build runs before its progress bar shows


@contextlib.contextmanager
def progress_bar(k: Kernel, vm: VM, enabled: bool) -> Iterator[None]:
    """A rich progress bar on stderr while *vm*'s graph is built, shown once the
    build has taken PROGRESS_AFTER seconds; only on a terminal and when
    *enabled* (never under --json). The total is the VM's own count of shadow
    pages (n_used_mmu_pages) when the kernel has it: kvm->arch.n_used_mmu_pages, or
    kvm->stat.mmu_shadow_pages in 7.3, as the 7.3 fixture's DWARF shows (commit not found)."""
    if not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        yield
        return
    start = time.monotonic()
    total = vm.n_used_mmu_pages if known(vm.n_used_mmu_pages) and vm.n_used_mmu_pages else None
    bar: list[Progress] = []

    def tick(pages: int) -> None:
        if not bar:
            if time.monotonic() - start < PROGRESS_AFTER:
                return
            p = Progress(TextColumn(f"vm{vm.index}: reading shadow pages"), BarColumn(),
                         MofNCompleteColumn(), TimeElapsedColumn(),
                         console=Console(file=sys.stderr), transient=True)
            p.add_task("pages", total=total, completed=pages)
            p.start()
            p.refresh()  # shown now; rich refreshes it ten times a second from here
            bar.append(p)
        bar[0].update(bar[0].task_ids[0], completed=pages)

    k.on_progress = tick
    try:
        yield
    finally:
        k.on_progress = None
        if bar:
            bar[0].stop()
