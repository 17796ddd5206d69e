"""watch: sample every vCPU's roots on a live target and report root switches."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import kvm_command, per_vm, session_of, vm_header
from kvminspect.errors import UsageError
from kvminspect.fmt import hx
from kvminspect.model import VM, VCpu
from kvminspect.render import Grid, console
from kvminspect.results import VcpuWatch
from kvminspect.session import Session
from kvminspect.shapes import watch_vcpu_json

# one sample of a vCPU's MMU: ((root hpa, pgd), ((hpa, pgd) of each prev_roots[i]))
Sample = tuple[tuple[int | None, int], tuple[tuple[int | None, int], ...]]


@dataclass
class Track:
    """One vCPU across the samples: its roots (mmu->root, prev_roots[]) as read."""

    vcpu: VCpu
    cr3s: list[int] = field(default_factory=list)  # root pgds, in the order first seen
    switches: int = 0  # samples whose root differs from the sample before
    hits: int = 0  # ... and whose new root was in the previous sample's prev_roots
    misses: int = 0  # ... or was not: kvm_mmu_load() had to find or make the root
    unsettled: int = 0  # samples caught mid-switch (two reads differed, or no root)
    last: tuple[int | None, int] | None = None  # (root hpa, pgd)
    cached: set[int] = field(default_factory=set)  # prev_roots hpas of the last sample

    def add(self, roots: Sample | None) -> None:
        """One sample of this vCPU: (root, prev_roots) of its struct kvm_mmu.

        A sample whose root is INVALID_PAGE (kvm_mmu_free_roots() ran and
        kvm_mmu_load() has not yet) or unreadable shows no settled root: it is
        counted as unsettled and skipped.
        """
        if roots is None or roots[0][0] is None:
            self.unsettled += 1
            return
        (hpa, pgd), prev = roots
        now = (hpa, pgd)
        if pgd not in self.cr3s:
            self.cr3s.append(pgd)
        if self.last is not None and now != self.last:
            self.switches += 1
            if now[0] is not None and now[0] in self.cached:
                self.hits += 1  # fast_pgd_switch() found it in prev_roots
            else:
                self.misses += 1
        self.last = now
        self.cached = {h for h, _ in prev if h is not None}

    def result(self) -> VcpuWatch:
        """What was seen, once the samples are taken."""
        return VcpuWatch(self.vcpu, self.switches, self.hits, self.misses, self.unsettled,
                         tuple(self.cr3s))


def _roots_of(v: VCpu) -> Sample | None:
    """(root, prev_roots) from an ordinary reading (kernels before 5.18: mmu->root_hpa).

    "KVM: x86: use struct kvm_mmu_root_info for mmu->root" (5.18, b9e5603c2a3a)
    """
    if v.root is None:
        return None
    return (v.root.hpa, v.root.pgd), tuple((r.hpa, r.pgd) for r in v.prev_roots)


def sample(s: Session, vm: VM, interval: float, count: int) -> list[VcpuWatch]:
    """*count* samples of *vm*'s vCPUs' roots, *interval* seconds apart, each vCPU's
    root and prev_roots read in one block (Kernel.mmu_roots) so they agree."""
    vcpus = s.kernel.vcpus(vm)
    tracks = [Track(v) for v in vcpus]
    for n in range(count):
        if n:
            time.sleep(interval)
            s.begin()  # a fresh reading of the live kernel
        k = s.kernel
        for t in tracks:
            roots = k.mmu_roots(t.vcpu)
            if roots is None and not k.layout.root_info:
                fresh = {v.addr: v for v in k.vcpus(vm)}.get(t.vcpu.addr)
                roots = _roots_of(fresh) if fresh else None
            t.add(roots)
    return [t.result() for t in tracks]


def watch_table(seen: list[VcpuWatch]) -> Grid:
    """Per vCPU: switches seen, prev_roots hits and misses, the CR3s it was on."""
    t = Grid()
    for col in ("VCPU", "SWITCHES", "PREV_ROOTS HITS", "NEW ROOTS", "UNSETTLED", "CR3s"):
        t.add_column(col, text=col == "CR3s")
    for w in seen:
        t.add_row(f"vcpu[{w.vcpu.vcpu_idx}]", str(w.switches), str(w.prev_root_hits),
                  str(w.new_roots), str(w.unsettled), " ".join(hx(c) for c in w.cr3s))
    return t


@kvm_command(
    argument("--interval", type=float, default=0.5, metavar="S",
             help="seconds between samples (default 0.5)"),
    argument("--count", type="count", default=10, metavar="N", help="samples (default 10)"),
)
def _cmd_watch(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """sample every vCPU's roots on a live target: root switches, CR3s, prev_roots hits

    Live targets only (--live, --qemu): reads each vCPU's mmu->root and prev_roots[]
    N times, S seconds apart, and reports per vCPU how often its root changed between
    two samples, which CR3s (root pgds) it was on, and for each change whether the new
    root was one of the previous sample's prev_roots (a fast_pgd_switch() cache hit) or
    not (kvm_mmu_load() found or built the root). A vCPU caught between
    kvm_mmu_free_roots() and kvm_mmu_load() (root INVALID_PAGE) is counted as unsettled.
    Switches between two samples that leave no trace are not seen: a sample is a
    reading, not a trace.
    """
    s = session_of(kwargs)
    if not s.target.live:
        raise UsageError("watch needs a live target (--live or --qemu): a vmcore does not move")
    if args.interval < 0 or args.count < 2:
        raise UsageError("watch needs --count 2 or more and a non-negative --interval")
    per_vm(kwargs, args, "watch",
           collect=lambda s, vm: sample(s, vm, args.interval, args.count),
           header=lambda vm, tracks: vm_header(
               vm, f"{args.count} samples, {args.interval:g} s apart"),
           show=lambda vm, tracks: console().print(watch_table(tracks), markup=False),
           to_json=lambda vm, tracks: {"samples": args.count, "interval": args.interval,
                                       "vcpus": [watch_vcpu_json(w) for w in tracks]})
