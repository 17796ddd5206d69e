"""diff: what changed in KVM's MMU between two vmcores of one host (A before, B after).

    kvminspect diff A B [-s PATH]... [--vm ID] [--json]   one shot: A and B as -c takes
    kvminspect -c A diff B [--vm ID] [--json]             the same (A is the target)
    diff B                                                in a REPL: A is its target

B is opened with the -s paths A was opened with, once per session, and must
be a dump of A's kernel (its release and build id; else one line, exit 1). A
VM is matched by its struct kvm address (with the same owner pid: a freed
struct kvm's address is reused), else by its owner pid; a VM on one side only
is listed as added or removed. --vm ID selects in both dumps: a pid, name or
struct kvm address names a VM in each (the two must pair: same struct kvm and
owner, same owner pid, or that name), an index (a position on A's vm_list)
names A's VM, found in B as above; a VM missing or ambiguous in either dump is
one line, exit 1. A vCPU is matched by vcpu_idx (vcpu_id on kernels
without it: "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd)).
A shadow page is matched by what it shadows, never by its address
alone (struct kvm_mmu_page addresses are reused): its gfn, its role word
without role.invalid (a fast zap sets that bit on the roots it keeps) and,
for shadow-MMU pages, its mmu_valid_gen (a page made after a fast zap is a
new page, not the obsolete one it replaces). Pages with one key are paired
at the same address first; the rest are paired in address order (a page
rebuilt at another address: its "sp" changed), except that a page already
invalid in A is never paired with another address (it cannot come back).
The comparison is kvminspect.diff's (typed results); this module reads the two
targets and renders the results as text (JSON: kvminspect.shapes.vm_diff_json).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import finish, kvm_command, session_of, vm_header
from kvminspect.commands.roots import Row, root_view_rows
from kvminspect.diff import (
    Change,
    FieldValue,
    PageChange,
    PageField,
    Status,
    VcpuChange,
    VmDiff,
    VmPair,
    pair_of,
    pair_vms,
    partner,
    vm_diff,
)
from kvminspect.errors import KvminspectError, LookupFailed, Problem
from kvminspect.fmt import hx
from kvminspect.objects import VM
from kvminspect.render import Grid, console, plural, say
from kvminspect.results import PageView
from kvminspect.session import Session
from kvminspect.shapes import vm_diff_json

# The one-shot 'kvminspect diff A B' is read by kvminspect.options.split_first_core, by
# diff's options (kvminspect.registry) and the global ones, without importing this module.


# -- text (kvminspect.diff's results; JSON: kvminspect.shapes.vm_diff_json) -----


def word(v: FieldValue | None) -> str:
    """A value for people: yes/no, '-' for none, a NoValue's name."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "-" if v is None else str(v)


def arrow(c: Change[Any]) -> str:
    return f"{word(c.old)} -> {word(c.new)}"


def hex_arrow(c: Change[Any]) -> str:
    """An address (or word) old -> new."""
    return f"{hx(c.old) or '-'} -> {hx(c.new) or '-'}"


def changes_line(changes: dict[str, Change[Any]]) -> str:
    """The changes as "name a -> b, name a -> b"."""
    return " ".join(changes_units(changes))


def changes_units(changes: dict[str, Change[Any]]) -> list[str]:
    """Each change as "name a -> b," (the last without its comma): what a
    narrow line wraps between, never inside."""
    items = [f"{k} {arrow(c)}" for k, c in changes.items()]
    return [item + ("," if n < len(items) - 1 else "") for n, item in enumerate(items)]


def header(d: VmDiff) -> str:
    if d.status in (Status.ADDED, Status.REMOVED):
        side = "B" if d.status is Status.ADDED else "A"
        return vm_header(d.vm, f"{d.status.value} (only in {side})")
    how = "-" if d.matched_by is None else d.matched_by.value
    if d.status is Status.UNCHANGED:
        return vm_header(d.vm, f"no changes (matched by {how})")
    n = [plural(len(d.vcpus), "vCPU", "vCPUs"),
         plural(len(d.pages_zapped), "page zapped", "pages zapped"),
         f"{len(d.pages_added)} added", f"{len(d.pages_changed)} changed"]
    return vm_header(d.vm, f"changed (matched by {how}): " + ", ".join(n))


def roots_table(vcpus: list[VcpuChange]) -> Grid:
    """Per changed vCPU root: a 'before' row and an 'after' row (roots.root_view_rows)."""
    t = Grid()
    # narrow: CR3 under VCPU, HPA under PGD, GFN/LVL and FLAGS under SP (WHEN keeps
    # its column: an 'after' row has no ROOT to stack it under); narrower: PGD and
    # HPA under ROOT too
    under = {"CR3": "VCPU", "PGD": "ROOT", "HPA": "PGD", "GFN/LVL": "SP", "FLAGS": "SP"}
    for col in ("VCPU", "CR3", "ROOT", "WHEN", "PGD", "HPA", "SP", "GFN/LVL", "FLAGS"):
        t.add_column(col, text=col == "FLAGS", carry=col in ("VCPU", "CR3", "ROOT", "WHEN"),
                     under=under.get(col, False), stage=2 if col == "PGD" else 1)
    for v in vcpus:
        cr3 = v.cr3
        first = [f"vcpu[{v.vcpu.vcpu_idx}]",
                 hex_arrow(cr3) if cr3.changed else hx(cr3.new) or "-"]
        if v.status is not Status.CHANGED or not v.roots:  # added, removed, or only CR3
            t.add_row(*first, "" if v.status is Status.CHANGED else v.status.value,
                      "", "", "", "", "", "")
        for r in v.roots:
            slot = str(r.slot)  # on the first row of the pair only
            for when, root in (("before", r.old), ("after", r.new)):
                rows: list[Row] = ([("-",) * 5] if root is None
                                   else root_view_rows(root, Counter()))
                for j, row in enumerate(rows):
                    t.add_row(*(first if j == 0 else ["", ""]), slot if j == 0 else "",
                              when if j == 0 else "", *row)
                first, slot = ["", ""], ""
    return t


def _page_cells(p: PageView, sp: str, role: str, rest: str) -> tuple[str, ...]:
    return (sp, hx(p.sp.gfn), str(p.sp.level), role, rest)


def pages_table(pages: Sequence[PageView]) -> Grid:
    """Shadow pages zapped or added: address, gfn, level, role word, flags."""
    t = Grid()
    for col in ("SP", "GFN", "LVL", "ROLE", "FLAGS"):  # narrow: GFN, LVL under SP
        t.add_column(col, text=col == "FLAGS", under="SP" if col in ("GFN", "LVL") else False)
    for p in pages:
        t.add_row(*_page_cells(p, hx(p.sp.addr), hx(p.sp.role.word), " ".join(p.flags())))
    return t


def changed_table(pages: Sequence[PageChange]) -> Grid:
    """Matched pages that changed, as in B: address, gfn, level, role word (each
    old -> new if it changed), then the other changed fields, old -> new."""
    t = Grid()
    for col in ("SP", "GFN", "LVL", "ROLE", "CHANGES"):  # narrow: GFN, LVL under SP
        t.add_column(col, text=col == "CHANGES", under="SP" if col in ("GFN", "LVL") else False)
    for p in pages:
        c = p.changes
        sp = hex_arrow(c[PageField.SP]) if PageField.SP in c else hx(p.new.sp.addr)
        role = hex_arrow(c[PageField.ROLE]) if PageField.ROLE in c else hx(p.new.sp.role.word)
        rest = changes_line({f.value: ch for f, ch in c.items() if not f.address})
        t.add_row(*_page_cells(p.new, sp, role, rest))
    return t


def show(d: VmDiff) -> None:
    """One VM's sections: counters, kvm->stat, vCPU roots, pages zapped/added/changed."""
    c = console()
    if d.status is not Status.CHANGED:
        return
    counts: dict[str, Change[Any]] = dict(d.counters)
    if d.pages.changed:
        counts["shadow pages"] = d.pages
    if counts:
        say("  " + changes_line(counts), units=changes_units(counts))
    if d.stat:
        say("  kvm->stat: " + changes_line(dict(d.stat)),
            units=["kvm->stat:", *changes_units(dict(d.stat))])
    sections: list[tuple[str, Sequence[Any], Callable[[Any], Grid]]] = [
        ("vCPU roots", d.vcpus, roots_table),
        ("shadow pages zapped", d.pages_zapped, pages_table),
        ("shadow pages added", d.pages_added, pages_table),
        ("shadow pages changed", d.pages_changed, changed_table),
    ]
    for title, items, table in sections:
        if items:
            c.print(f"{title} ({len(items)}):", markup=False)
            c.print(table(items), markup=False)


# -- the command ----------------------------------------------------------------


def _labelled(problems: list[Problem], side: str) -> Iterator[Problem]:
    for p in problems:
        yield Problem(p.kind, p.addr, f"{p.what} (in {side})")


class DifferentKernels(KvminspectError):
    """A and B are dumps of two kernels (release or build id): nothing of one's
    kvm is the other's. One line, exit 1."""


def same_kernel(a: Session, b: Session, path: str) -> None:
    """DifferentKernels unless B (at *path*) is a dump of A's kernel: the same
    release and, where both dumps give one, the same vmlinux build id."""
    ra, rb = a.target.release, b.target.release
    if ra and rb and ra != rb:
        raise DifferentKernels(f"{path}: kernel {rb}, but A's is {ra}: diff compares two "
                               "vmcores of one kernel")
    ia, ib = a.target.build_id, b.target.build_id
    if ia and ib and ia != ib:
        raise DifferentKernels(f"{path}: kernel {rb} build id {ib}, but A's build id is {ia}: "
                               "diff compares two vmcores of one kernel")


def _is_index(ident: str) -> bool:
    """Whether --vm ID is a VM index, as Kernel.vm_by_id reads one (a number below
    0x10000): a position on one dump's vm_list, which the other dump's need not share."""
    try:
        return int(ident.strip(), 0) < 0x10000
    except ValueError:
        return False


def _vm_in(s: Session, side: str, ident: str) -> VM:
    """The VM --vm *ident* names in one dump (*side* "A" or "B"), or a LookupFailed
    that says which dump lacks it or has several."""
    try:
        return s.kernel.vm_by_id(ident)
    except LookupFailed as e:
        raise LookupFailed(f"{side} ({s.target.name}): {e}") from None


def selected(a: Session, b: Session, ident: str | None) -> VmPair:
    """The VM --vm *ident* selects in both dumps (without --vm: the VM selected in
    A's REPL). A pid, name or struct kvm address is looked up in each dump, and the
    two must be one VM (kvminspect.diff.pair_of); an index, or A's selected VM, is
    A's VM, found in B by the rules that pair every VM (kvminspect.diff.partner).
    LookupFailed (one line, exit 1) when either dump lacks it or has several."""
    va = a.selected if ident is None else _vm_in(a, "A", ident)
    assert va is not None
    if ident is None or _is_index(ident):
        try:
            return VmPair(va, *partner(va, b.kernel.vms()))
        except LookupFailed as e:
            raise LookupFailed(f"B ({b.target.name}): {e}") from None
    vb = _vm_in(b, "B", ident)
    how = pair_of(va, vb, ident.strip())
    if how is None:
        raise LookupFailed(f"VM {ident.strip()!r} is two VMs: A's has pid {va.pid}, B's pid "
                           f"{vb.pid} (a struct kvm address another VMM reused)")
    return VmPair(va, vb, how)


def _vm_diff(a: Session, b: Session, pair: VmPair) -> VmDiff:
    """kvminspect.diff.vm_diff of *pair*, each side's graph read (and its problems
    recorded) against its own VM."""
    ga = gb = None
    if pair.old is not None and pair.new is not None:
        with a.kernel.reading(pair.old):
            ga = a.graph(pair.old)
        with b.kernel.reading(pair.new):
            gb = b.graph(pair.new)
    return vm_diff(pair, ga, gb)


@kvm_command(argument("core", metavar="B",
                      help="the vmcore after (a file or fixture directory, as -c takes)"))
def _cmd_diff(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """what changed between this vmcore (A, before) and B (after)

    One shot: 'kvminspect diff A B' (or 'kvminspect -c A diff B'); in a REPL, 'diff B'
    compares the REPL's target with B. B is read with the same -s debug paths, and must
    be a dump of the same kernel (release and build id: else one line, exit 1). Per VM
    (matched by struct kvm address, else by owner pid; VMs on one side only are
    added/removed): mmu_valid_gen and the struct kvm counters
    old -> new, kvm->stat's MMU counters, per vCPU (by vcpu_idx) each root and
    prev_roots[] entry that changed (before and after rows), and the shadow pages
    zapped, added and changed (unsync, unsync_children, root_count, invalid,
    obsolete, orphan), matched by gfn and role word (role.invalid aside) and, for
    shadow pages, mmu_valid_gen: never by address, which is reused. --vm selects in
    both dumps: pid:PID, a name or a struct kvm address names a VM in each (the two
    must pair: by struct kvm, owner pid or that name), an index names A's VM, found
    in B as every VM is; missing or ambiguous in either dump: one line, exit 1.
    """
    a = session_of(kwargs)
    b = a.other(args.core)
    same_kernel(a, b, args.core)
    if args.vm is None and a.selected is None:
        pairs = pair_vms(a.kernel.vms(), b.kernel.vms())
    else:
        pairs = [selected(a, b, args.vm)]
    diffs = [_vm_diff(a, b, p) for p in pairs]
    a_vms = [p.old for p in pairs if p.old is not None]
    b_vms = [p.new for p in pairs if p.new is not None]
    problems = [*_labelled(a.kernel.problems.of(v.addr for v in a_vms), "A"),
                *_labelled(b.kernel.problems.of(v.addr for v in b_vms), "B")]
    missing = tuple(dict.fromkeys((*a.kernel.missing, *b.kernel.missing)))

    def human() -> None:
        c = console()
        if not diffs:
            c.print("no VMs in A or B (vm_list is empty)")
        for d in diffs:
            say(header(d))
            show(d)

    finish(a, args, "diff", {"vms": [vm_diff_json(d) for d in diffs]}, human, a_vms,
           problems=problems, missing=missing)
