"""rate: root reloads per second per vCPU (kvm_mmu_load), through a tracefs kprobe.

The one command that changes its target: it adds a kprobe event on
kvm_mmu_load (kvm.ko) with a hist trigger keyed by thread, reads the counts
each second, and always removes both on the way out (Ctrl-C and errors too).
It runs on the host itself (--live): through --qemu or on a vmcore there is no
tracefs to write to.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import kvm_command, per_vm, session_of, vm_header
from kvminspect.errors import KvminspectError, UsageError
from kvminspect.model import VM
from kvminspect.render import Grid, console
from kvminspect.session import Session
from kvminspect.shapes import vcpu_ref

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
GROUP, EVENT = "kvminspect", "kvm_mmu_load"
PROBE = f"p:{GROUP}/{EVENT} kvm:kvm_mmu_load"
HIST = "hist:keys=common_pid:vals=hitcount:sort=common_pid"
BUCKETS = range(0, 100, 10)  # systemtap's @hist_linear(x, 0, 100, 10)


def tracefs() -> Path:
    """The mounted tracefs, with kprobe_events; TargetError-style one line if not."""
    for d in TRACEFS:
        if os.path.exists(os.path.join(d, "kprobe_events")):
            return Path(d)
    raise KvminspectError("rate needs tracefs with kprobes (mount -t tracefs nodev "
                          "/sys/kernel/tracing; CONFIG_KPROBE_EVENTS)")


def _write(path: Path, text: str, append: bool = False) -> None:
    """One write(2) to a tracefs file, as `echo TEXT >[>] PATH` does (no seek: tracefs
    files refuse the one Python's append mode makes)."""
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise KvminspectError(f"rate: cannot write {path}: {e.strerror or e}") from None


@contextmanager
def kprobe(tfs: Path) -> Iterator[Path]:
    """The kvm_mmu_load kprobe event with its hist trigger; both removed on exit."""
    event = tfs / "events" / GROUP / EVENT
    _write(tfs / "kprobe_events", PROBE, append=True)
    try:
        _write(event / "trigger", HIST)
        try:
            yield event / "hist"
        finally:
            _write(event / "trigger", "!" + HIST)
    finally:
        _write(tfs / "kprobe_events", f"-:{GROUP}/{EVENT}", append=True)


HIST_LINE = re.compile(r"common_pid:\s*(?:\S+\s*\[\s*(\d+)\]|(\d+))\s*\}?\s*hitcount:\s*(\d+)")


def parse_hist(text: str) -> dict[int, int]:
    """common_pid -> hitcount of a hist file: '{ common_pid: vmm [ 113] } hitcount: 5'
    (the kernel prints a pid key with its comm) or '{ common_pid: 113 } hitcount: 5'."""
    return {int(m.group(1) or m.group(2)): int(m.group(3)) for m in HIST_LINE.finditer(text)}


def read_hist(path: Path) -> dict[int, int]:
    """common_pid -> hitcount from a hist file."""
    return parse_hist(path.read_text())


def histogram(values: list[int]) -> dict[str, int]:
    """Linear buckets 0-100 by 10 of per-second counts (>=100 in the last)."""
    out = {f"{b}-{b + 9}": 0 for b in BUCKETS}
    out[">=100"] = 0
    for v in values:
        out[">=100" if v >= 100 else f"{v // 10 * 10}-{v // 10 * 10 + 9}"] += 1
    return out


def count(hist: Path, per: dict[int, list[int]], seconds: int,
          each: Callable[[int, dict[int, int]], None]) -> None:
    """Append each second's kvm_mmu_load calls of each thread of *per* (tid -> counts),
    *seconds* times, calling *each* after every second; what was counted stays in
    *per* if it is interrupted."""
    tids = list(per)
    last = read_hist(hist)
    for n in range(1, seconds + 1):
        time.sleep(1)
        now = read_hist(hist)
        sec = {t: now.get(t, 0) - last.get(t, 0) for t in tids}
        for t in tids:
            per[t].append(sec[t])
        last = now
        each(n, sec)


@kvm_command(
    argument("--seconds", type="count", default=10, metavar="N",
             help="how long to count (default 10; Ctrl-C stops early)"),
)
def _cmd_rate(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """root reloads (kvm_mmu_load) per second per vCPU, with a histogram; adds a kprobe

    Changes the target: adds a kprobe event on kvm_mmu_load with a hist trigger keyed
    by thread (tracefs), and removes both when it stops (at the end, on Ctrl-C or an
    error). Prints each second the calls per vCPU thread, and every 10 seconds a linear
    histogram (0-100 by 10) of the per-second counts, like systemtap's @hist_linear.
    Runs on the host itself (--live); not through --qemu or on a vmcore.
    """
    s = session_of(kwargs)
    if s.target.name != "live":
        raise UsageError("rate runs on the host itself (--live): it needs that host's tracefs,"
                         " which a vmcore or --qemu does not give")
    if args.seconds < 1:
        raise UsageError("rate needs --seconds 1 or more")
    tfs = tracefs()

    def collect(s: Session, vm: VM) -> list[tuple[Any, list[int]]]:
        vcpus = [(v, v.tid) for v in s.kernel.vcpus(vm) if isinstance(v.tid, int)]
        text = not getattr(args, "json", False)

        def each(n: int, sec: dict[int, int]) -> None:
            if text:
                console().print(f"  {n:>3}s  " + "  ".join(
                    f"vcpu[{v.vcpu_idx}] {sec[tid]}" for v, tid in vcpus), markup=False)
            if text and n % 10 == 0:
                console().print(hist_table([x for xs in per.values() for x in xs]),
                                markup=False)

        per: dict[int, list[int]] = {tid: [] for _, tid in vcpus}
        with kprobe(tfs) as hist:
            try:
                count(hist, per, args.seconds, each)
            except KeyboardInterrupt:
                pass  # the kprobe is removed on the way out; what was counted is shown
        return [(v, per[tid]) for v, tid in vcpus]

    per_vm(kwargs, args, "rate", collect=collect,
           header=lambda vm, data: vm_header(vm, "kvm_mmu_load calls per second"),
           show=lambda vm, data: console().print(
               hist_table([x for _, xs in data for x in xs]), markup=False),
           to_json=lambda vm, data: {"seconds": args.seconds, "vcpus": [
               {**vcpu_ref(v), "tid": v.tid, "per_second": xs, "histogram": histogram(xs)}
               for v, xs in data]})


def hist_table(values: list[int]) -> Grid:
    """The linear histogram of per-second counts, as a table."""
    t = Grid(title="calls/s  seconds")
    t.add_column("CALLS/S")
    t.add_column("SECONDS", justify="right")
    for bucket, n in histogram(values).items():
        t.add_row(bucket, str(n))
    return t
