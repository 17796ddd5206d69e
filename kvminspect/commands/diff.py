"""diff: what changed in KVM's MMU between two vmcores of one host (A before, B after).

    kvminspect diff A B [-s PATH]... [--vm ID] [--json]   one shot: A and B as -c takes
    kvminspect -c A diff B [--vm ID] [--json]             the same (A is the target)
    diff B                                                in a REPL: A is its target

B is opened with the -s paths A was opened with, once per session. A VM is
matched by its struct kvm address (with the same owner pid: a freed struct
kvm's address is reused), else by its owner pid; a VM on one side only is
listed as added or removed. A vCPU is matched by vcpu_idx (vcpu_id before
5.11). A shadow page is matched by what it shadows, never by its address
alone (struct kvm_mmu_page addresses are reused): its gfn, its role word
without role.invalid (a fast zap sets that bit on the roots it keeps) and,
for shadow-MMU pages, its mmu_valid_gen (a page made after a fast zap is a
new page, not the obsolete one it replaces). Pages with one key are paired
at the same address first; the rest are paired in address order (a page
rebuilt at another address: its "sp" changed), except that a page already
invalid in A is never paired with another address (it cannot come back).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from drgn import Program
from drgn.commands import argument

from kvminspect.commands import finish, kvm_command, session_of, sp_flags, vm_header
from kvminspect.commands.roots import root_rows
from kvminspect.commands.stats import vm_mmu_stat
from kvminspect.errors import LookupFailed, Problem, UsageError
from kvminspect.graph import VMGraph
from kvminspect.layout import known
from kvminspect.model import VM, ShadowPage, VCpu
from kvminspect.render import Grid, console, hx
from kvminspect.session import Session
from kvminspect.shapes import root_json, sp_json, value, vcpu_ref, vm_ref

# struct kvm / kvm_arch counters compared old -> new (VM fields of shapes.vm_json)
COUNTERS = ("mmu_valid_gen", "n_used_mmu_pages", "n_max_mmu_pages", "n_requested_mmu_pages",
            "indirect_shadow_pages", "online_vcpus", "created_vcpus")
# shadow-page fields (shapes.sp_json) whose change makes a matched page "changed"
PAGE_FIELDS = ("sp", "role", "unsync", "unsync_children", "root_count", "invalid",
               "obsolete", "orphan")
# the options of diff that take a value (the one-shot form finds A among the words)
VALUE_OPTIONS = ("--vm",)


# -- the one-shot command line --------------------------------------------------


def split_first_core(words: list[str]) -> tuple[str, list[str]]:
    """'kvminspect diff A B ...': A, and the words of 'diff B ...' (A removed).

    A and B are the first two words that are neither options nor an option's
    value; UsageError unless both are there.
    """
    cores, skip = [], False
    for i, w in enumerate(words):
        if skip:
            skip = False
        elif w.startswith("-"):
            skip = w in VALUE_OPTIONS
        else:
            cores.append(i)
    if len(cores) < 2:
        raise UsageError("diff needs two vmcores: kvminspect diff A B (or -c A diff B)")
    return words[cores[0]], words[:cores[0]] + words[cores[0] + 1:]


# -- matching -------------------------------------------------------------------


def _same_owner(a: VM, b: VM) -> bool:
    return a.pid == b.pid or not known(a.pid) or not known(b.pid)


def pair_vms(a: list[VM], b: list[VM]) -> list[tuple[VM | None, VM | None, str | None]]:
    """(A's VM, B's VM, "kvm" / "pid") pairs: matched by struct kvm address (same
    owner), else by owner pid; then (A, None, None) removed, (None, B, None) added.
    In A's order, the added VMs last (in B's order)."""
    left = list(b)
    match: dict[int, tuple[VM, str]] = {}
    for how, same in (("kvm", lambda x, y: x.addr == y.addr and _same_owner(x, y)),
                      ("pid", lambda x, y: known(x.pid) and x.pid == y.pid)):
        for va in a:
            if va.addr in match:
                continue
            vb = next((v for v in left if same(va, v)), None)
            if vb is not None:
                left.remove(vb)
                match[va.addr] = (vb, how)
    out: list[tuple[VM | None, VM | None, str | None]] = []
    for va in a:
        vb, how = match.get(va.addr, (None, None))
        out.append((va, vb, how))
    return out + [(None, vb, None) for vb in left]


def page_key(sp: ShadowPage) -> tuple:
    """What a shadow page shadows: gfn, role without role.invalid, and (not for TDP
    MMU pages, which are not obsoleted by generation) the page's mmu_valid_gen."""
    role = tuple((k, v) for k, v in sp.role.fields.items() if k != "invalid")
    return (sp.gfn, role, None if sp.tdp_mmu_page else sp.mmu_valid_gen)


def pair_pages(ga: VMGraph, gb: VMGraph
               ) -> tuple[list[tuple[ShadowPage, ShadowPage]], list[ShadowPage],
                          list[ShadowPage]]:
    """(matched pairs, zapped (A only), added (B only)) by page_key: same address
    first, then in address order (never an A page already invalid)."""
    def groups(g: VMGraph) -> dict[tuple, list[ShadowPage]]:
        out: dict[tuple, list[ShadowPage]] = {}
        for sp in g.nodes.values():
            out.setdefault(page_key(sp), []).append(sp)
        return out

    old, new = groups(ga), groups(gb)
    pairs, zapped, added = [], [], []
    for key in old.keys() | new.keys():
        la = sorted(old.get(key, []), key=lambda s: s.addr)
        lb = sorted(new.get(key, []), key=lambda s: s.addr)
        at = {s.addr: s for s in lb}
        rest_a = []
        for s in la:
            if s.addr in at:
                pairs.append((s, at.pop(s.addr)))
            else:
                rest_a.append(s)
        rest_b = sorted(at.values(), key=lambda s: s.addr)
        for s in rest_a:
            if rest_b and not s.role.invalid:
                pairs.append((s, rest_b.pop(0)))
            else:
                zapped.append(s)
        added.extend(rest_b)
    order = lambda s: (-s.level, s.gfn, s.addr)  # noqa: E731
    return (sorted(pairs, key=lambda p: order(p[1])), sorted(zapped, key=order),
            sorted(added, key=order))


# -- one VM's changes, as JSON (every object through kvminspect.shapes) ---------


def pair(old: Any, new: Any) -> dict[str, Any]:
    return {"old": old, "new": new}


def page_json(sp: ShadowPage, g: VMGraph) -> dict[str, Any]:
    """A shadow page in a diff: shapes.sp_json and its role word (half of its key)."""
    return {**sp_json(sp, g), "role": hx(sp.role.word)}


def changed_page_json(a: ShadowPage, ga: VMGraph, b: ShadowPage, gb: VMGraph
                      ) -> dict[str, Any] | None:
    """A matched page as it is in B, with "changes" (field -> old/new); None if none."""
    old, new = page_json(a, ga), page_json(b, gb)
    changes = {f: pair(old[f], new[f]) for f in PAGE_FIELDS if old[f] != new[f]}
    return {**new, "changes": changes} if changes else None


def _page_view(p: dict[str, Any] | None) -> tuple | None:
    return None if p is None else (p["sp"], p["gfn"], p["level"], p["invalid"], p["obsolete"])


def root_view(d: dict[str, Any]) -> tuple:
    """What a root change is (shapes.root_json): pgd, hpa, state, the page (address,
    gfn, level, invalid, obsolete) and its pae_root[] pages; not the page's counts,
    which the page's own changes show."""
    return (d["pgd"], d["hpa"], d["state"], _page_view(d["page"]),
            tuple((e["index"], _page_view(e["page"])) for e in d["pae_roots"]))


def _vcpu_key(v: VCpu) -> int | str:
    """vcpu_idx (vcpu_id before 5.11: maybe "unknown")."""
    return v.vcpu_idx if v.vcpu_idx >= 0 else value(v.vcpu_id)


def _vcpu_order(k: int | str) -> tuple[int, str]:
    return (k, "") if isinstance(k, int) else (1 << 30, k)


def _slots(v: VCpu, g: VMGraph) -> dict[str, dict[str, Any]]:
    out = {"root": root_json(v.root, g)}
    out.update((f"prev_roots[{i}]", root_json(r, g)) for i, r in enumerate(v.prev_roots))
    return out


def vcpu_changes(ga: VMGraph, gb: VMGraph) -> list[dict[str, Any]]:
    """Per vCPU (by vcpu_idx) whose root, prev_roots[] or CR3 changed, or that is on
    one side only: its id (as in B), status, cr3 old/new and the changed roots."""
    old = {_vcpu_key(v): v for v in ga.vcpus}
    new = {_vcpu_key(v): v for v in gb.vcpus}
    out = []
    for k in sorted(old.keys() | new.keys(), key=_vcpu_order):
        va, vb = old.get(k), new.get(k)
        entry = {**vcpu_ref(vb or va), "cr3": pair(hx(va.cr3) if va else None,
                                                   hx(vb.cr3) if vb else None)}
        if va is None or vb is None:
            out.append({**entry, "status": "added" if va is None else "removed", "roots": []})
            continue
        sa, sb = _slots(va, ga), _slots(vb, gb)
        roots = [{"slot": s, "old": sa.get(s), "new": sb.get(s)}
                 for s in {**sa, **sb}
                 if s not in sa or s not in sb or root_view(sa[s]) != root_view(sb[s])]
        if roots or va.cr3 != vb.cr3:
            out.append({**entry, "status": "changed", "roots": roots})
    return out


def counter_changes(a: VM, b: VM) -> dict[str, dict[str, Any]]:
    """The struct kvm counters (COUNTERS) that changed, old -> new."""
    return {c: pair(value(getattr(a, c)), value(getattr(b, c))) for c in COUNTERS
            if value(getattr(a, c)) != value(getattr(b, c))}


def stat_changes(a: VM, b: VM) -> dict[str, dict[str, int | None]]:
    """kvm->stat's MMU counters (the stats command's) that changed, old -> new."""
    sa, sb = vm_mmu_stat(a.stat), vm_mmu_stat(b.stat)
    return {k: pair(sa.get(k), sb.get(k)) for k in {**sa, **sb} if sa.get(k) != sb.get(k)}


def vm_diff(a: Session, va: VM | None, b: Session, vb: VM | None, how: str | None
            ) -> dict[str, Any]:
    """One VM's entry of the document: the VM as in A (as in B if added), then its
    status, both sides' vm_ref, and what changed (matched VMs only)."""
    doc: dict[str, Any] = {
        **vm_ref(va or vb), "status": "added" if va is None else "removed",
        "matched_by": how, "before": vm_ref(va) if va else None,
        "after": vm_ref(vb) if vb else None, "pages": pair(None, None), "counters": {},
        "stat": {}, "vcpus": [], "pages_added": [], "pages_zapped": [], "pages_changed": []}
    if va is None or vb is None:
        return doc
    with a.kernel.reading(va):
        ga = a.graph(va)
    with b.kernel.reading(vb):
        gb = b.graph(vb)
    pairs, zapped, added = pair_pages(ga, gb)
    changed = [c for sa, sb in pairs if (c := changed_page_json(sa, ga, sb, gb))]
    doc.update({
        "pages": pair(len(ga), len(gb)), "counters": counter_changes(va, vb),
        "stat": stat_changes(va, vb), "vcpus": vcpu_changes(ga, gb),
        "pages_added": [page_json(s, gb) for s in added],
        "pages_zapped": [page_json(s, ga) for s in zapped], "pages_changed": changed})
    what = ("counters", "stat", "vcpus", "pages_added", "pages_zapped", "pages_changed")
    doc["status"] = "changed" if any(doc[k] for k in what) else "unchanged"
    return doc


# -- text -----------------------------------------------------------------------


def word(v: Any) -> str:
    """A JSON value for people: yes/no, '-' for none."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "-" if v is None else str(v)


def arrow(p: dict[str, Any]) -> str:
    return f"{word(p['old'])} -> {word(p['new'])}"


def changes_line(changes: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k} {arrow(p)}" for k, p in changes.items())


def header(d: dict[str, Any], vm: VM) -> str:
    if d["status"] in ("added", "removed"):
        return vm_header(vm, f"{d['status']} (only in {'B' if d['status'] == 'added' else 'A'})")
    if d["status"] == "unchanged":
        return vm_header(vm, f"no changes (matched by {d['matched_by']})")
    n = [f"{len(d['vcpus'])} vCPUs", f"{len(d['pages_zapped'])} pages zapped",
         f"{len(d['pages_added'])} added", f"{len(d['pages_changed'])} changed"]
    return vm_header(vm, "changed (matched by " + d["matched_by"] + "): " + ", ".join(n))


def roots_table(vcpus: list[dict[str, Any]]) -> Grid:
    """Per changed vCPU root: a 'before' row and an 'after' row (roots.root_rows)."""
    t = Grid()
    for col in ("VCPU", "CR3", "ROOT", "WHEN", "PGD", "HPA", "SP", "GFN/LVL", "FLAGS"):
        t.add_column(col, text=col == "FLAGS", carry=col in ("VCPU", "CR3", "ROOT", "WHEN"))
    for v in vcpus:
        cr3 = v["cr3"]["new"] if v["cr3"]["old"] == v["cr3"]["new"] else arrow(v["cr3"])
        first = [f"vcpu[{v['vcpu_idx']}]", word(cr3)]
        if v["status"] != "changed" or not v["roots"]:  # added, removed, or only CR3
            t.add_row(*first, "" if v["status"] == "changed" else v["status"],
                      "", "", "", "", "", "")
        for r in v["roots"]:
            for when in ("old", "new"):
                rows = root_rows(r[when], Counter()) if r[when] else [("-",) * 5]
                for j, row in enumerate(rows):
                    t.add_row(*(first if j == 0 else ["", ""]),
                              r["slot"] if when == "old" and j == 0 else "",
                              ("before" if when == "old" else "after") if j == 0 else "",
                              *row)
                first = ["", ""]
    return t


def pages_table(pages: list[dict[str, Any]], changes: bool) -> Grid:
    """Shadow pages (page_json): address, gfn, level, role word, then their flags
    or (*changes*) what changed, old -> new."""
    t = Grid()
    for col in ("SP", "GFN", "LVL", "ROLE", "CHANGES" if changes else "FLAGS"):
        t.add_column(col, text=col in ("CHANGES", "FLAGS"))
    for p in pages:
        c = p.get("changes", {})
        sp = arrow(c["sp"]) if "sp" in c else p["sp"]
        role = arrow(c["role"]) if "role" in c else p["role"]
        rest = changes_line({k: v for k, v in c.items() if k not in ("sp", "role")}) \
            if changes else " ".join(sp_flags(p))
        t.add_row(sp, p["gfn"], str(p["level"]), role, rest)
    return t


def show(d: dict[str, Any]) -> None:
    """One VM's sections: counters, kvm->stat, vCPU roots, pages zapped/added/changed."""
    c = console()
    if d["status"] != "changed":
        return
    pages = d["pages"]
    counts = {**d["counters"]}
    if pages["old"] != pages["new"]:
        counts["shadow pages"] = pages
    if counts:
        c.print("  " + changes_line(counts), markup=False)
    if d["stat"]:
        c.print("  kvm->stat: " + changes_line(d["stat"]), markup=False)
    sections: list[tuple[str, list, Callable[[list], Grid]]] = [
        ("vCPU roots", d["vcpus"], roots_table),
        ("shadow pages zapped", d["pages_zapped"], lambda p: pages_table(p, False)),
        ("shadow pages added", d["pages_added"], lambda p: pages_table(p, False)),
        ("shadow pages changed", d["pages_changed"], lambda p: pages_table(p, True)),
    ]
    for title, items, table in sections:
        if items:
            c.print(f"{title} ({len(items)}):", markup=False)
            c.print(table(items), markup=False)


# -- the command ----------------------------------------------------------------


def _labelled(problems: list[Problem], side: str) -> Iterator[Problem]:
    for p in problems:
        yield Problem(p.kind, p.addr, f"{p.what} (in {side})")


def _selected(a: Session, b: Session, ident: str | None,
              pairs: list[tuple[VM | None, VM | None, str | None]]
              ) -> list[tuple[VM | None, VM | None, str | None]]:
    """The pairs --vm ID (or A's selected VM) names: by A's ID, else by B's (a VM
    only in B); all without either."""
    if ident is None and a.selected is None:
        return pairs
    try:
        (va,) = a.vms(ident)
        return [p for p in pairs if p[0] is not None and p[0].addr == va.addr]
    except LookupFailed:
        if ident is None:
            raise
        try:
            vb = b.kernel.vm_by_id(ident)
        except LookupFailed:
            raise LookupFailed(f"no VM {ident!r} in A or B") from None
        return [p for p in pairs if p[1] is not None and p[1].addr == vb.addr]


@kvm_command(argument("core", metavar="B",
                      help="the vmcore after (a file or fixture directory, as -c takes)"))
def _cmd_diff(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    """what changed between this vmcore (A, before) and B (after)

    One shot: 'kvminspect diff A B' (or 'kvminspect -c A diff B'); in a REPL, 'diff B'
    compares the REPL's target with B. B is read with the same -s debug paths, and must
    be of the same kernel. Per VM (matched by struct kvm address, else by owner pid;
    VMs on one side only are added/removed): mmu_valid_gen and the struct kvm counters
    old -> new, kvm->stat's MMU counters, per vCPU (by vcpu_idx) each root and
    prev_roots[] entry that changed (before and after rows), and the shadow pages
    zapped, added and changed (unsync, unsync_children, root_count, invalid,
    obsolete, orphan), matched by gfn and role word (role.invalid aside) and, for
    shadow pages, mmu_valid_gen: never by address, which is reused. --vm takes A's ID
    (a VM only in B: its pid:PID or address).
    """
    a = session_of(kwargs)
    b = a.other(args.core)
    ra, rb = a.target.release, b.target.release
    if ra and rb and ra != rb:
        raise UsageError(f"{args.core}: kernel {rb}, but A's is {ra}: diff compares two "
                         "vmcores of one host")
    pairs = _selected(a, b, args.vm, pair_vms(a.kernel.vms(), b.kernel.vms()))
    items = [(va, vb, vm_diff(a, va, b, vb, how)) for va, vb, how in pairs]
    a_vms = [va for va, _, _ in pairs if va is not None]
    b_vms = [vb for _, vb, _ in pairs if vb is not None]
    problems = [*_labelled(a.kernel.problems.of(v.addr for v in a_vms), "A"),
                *_labelled(b.kernel.problems.of(v.addr for v in b_vms), "B")]
    missing = tuple(dict.fromkeys((*a.kernel.missing, *b.kernel.missing)))

    def human() -> None:
        c = console()
        if not items:
            c.print("no VMs in A or B (vm_list is empty)")
        for va, vb, d in items:
            c.print(header(d, va or vb), markup=False)
            show(d)

    finish(a, args, "diff", {"vms": [d for _, _, d in items]}, human, a_vms,
           problems=problems, missing=missing)
