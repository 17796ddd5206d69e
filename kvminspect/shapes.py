"""One JSON shape per kernel object, used by every command and renderer.

Each function turns one model object (kvminspect.objects), or a view of one
a command computed (kvminspect.results), into the dict every document uses
for it: a VM (struct kvm), a vCPU (struct kvm_vcpu), a root reference
(mmu->root, prev_roots[i], pae_root[i]: RootView), a shadow page (struct
kvm_mmu_page: PageView), an SPTE, a root holder and a check finding. The
text renderers take the same objects, never these dicts. The same object
has the same field names and types wherever it appears; the schema
(kvminspect/schema.json, SCHEMA_VERSION) describes them all.

Values: kernel addresses, hpa, pgd, cr3 and gfns are "0x…" strings; counts,
levels and ids are integers; flags are booleans. Three states are never
confused with a value or with each other: a root the kernel marked invalid
is "INVALID_PAGE" (its hpa), a member this kernel lacks is "unknown", and
memory that could not be read is "unreadable" (its object is named in the
document's "errors"). null means "none": no thread yet, no shadow page.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

from kvminspect.accounting import TdpPages
from kvminspect.check import Finding, Severity
from kvminspect.diagnose import VcpuDiagnosis, VmDiagnosis
from kvminspect.diff import Change, FieldValue, PageChange, PageField, VcpuChange, VmDiff
from kvminspect.fmt import hpa_text, hx
from kvminspect.graph import Holder
from kvminspect.layout import NoValue
from kvminspect.model import VM, MmuRoots, RootRef, ShadowPage, VCpu
from kvminspect.objects import LastExit
from kvminspect.read_vmstate import Invalidation, VmState
from kvminspect.results import (
    Exported,
    PageView,
    RootView,
    SpDetail,
    SpteRow,
    TreeNode,
    UnsyncRoot,
    VcpuRoots,
    VcpuWatch,
    VmStats,
)
from kvminspect.results import root_hpa as _root_hpa
from kvminspect.rmap import LEVEL_NAMES, RMAP_BUCKETS, RmapEntry, RmapHistogram, Skipped
from kvminspect.spte import SpteBits
from kvminspect.walk import Walk, memslot_why

# 2: the VM's tdp_mmu_pages and tdp_mmu_roots; SPTE values in messages at one width
# and counts in them with their singular (README: JSON, "Schema changes")
SCHEMA_VERSION = 2


def value(v: Any) -> Any:
    """An integer or string field: itself, or "unknown" / "unreadable"."""
    return v.name if v.__class__ is NoValue else v  # NoValue has no subclasses


def vm_ref(vm: VM) -> dict[str, Any]:
    """The fields that open every per-VM document: which VM this is."""
    return {"index": vm.index, "kvm": hx(vm.addr), "pid": value(vm.pid), "mmu": vm.mmu,
            "vendor": vm.vendor, "mmu_valid_gen": value(vm.mmu_valid_gen)}


def vm_json(vm: VM, tdp: TdpPages | None, state: VmState | None = None) -> dict[str, Any]:
    """struct kvm: its owner, vCPUs, MMU-wide counters and memslots; *tdp*: its TDP
    MMU's pages (accounting.tdp_mmu_pages: null for a VM without the TDP MMU); with
    *state* (vm, vms) also "mmu_state" (vm_state_json)."""
    extra = {"mmu_state": vm_state_json(state)} if state is not None else {}
    return {
        **vm_ref(vm), "stats_id": vm.stats_id, "guest_name": vm.guest_name,
        "comm": value(vm.comm), "task_state": value(vm.task_state),
        "online_vcpus": value(vm.online_vcpus), "created_vcpus": value(vm.created_vcpus),
        "vm_type": vm.vm_type, "n_used_mmu_pages": value(vm.n_used_mmu_pages),
        "n_max_mmu_pages": value(vm.n_max_mmu_pages),
        "n_requested_mmu_pages": value(vm.n_requested_mmu_pages),
        "indirect_shadow_pages": value(vm.indirect_shadow_pages),
        "tdp_mmu_pages": None if tdp is None else tdp.pages,
        "tdp_mmu_roots": None if tdp is None else tdp.roots,
        "memslots": [{"as_id": s.as_id, "id": s.id, "base_gfn": hx(s.base_gfn),
                      "npages": s.npages, "userspace_addr": hx(s.userspace_addr),
                      "flags": s.flags} for s in vm.memslots],
        **extra,
    }


def invalidation_json(inv: Invalidation) -> dict[str, Any]:
    """struct kvm's MMU notifier state (read_vmstate.Invalidation): which names the
    kernel uses, the sequence, the count in progress, the range and its unit."""
    return {"names": inv.prefix, "seq": value(inv.seq), "in_progress": value(inv.in_progress),
            "range_start": hx(inv.range_start), "range_end": hx(inv.range_end),
            "unit": inv.unit.value}


def vm_state_json(st: VmState) -> dict[str, Any]:
    """What explains stuck vCPUs VM-wide (kvminspect.read_vmstate): the MMU
    notifier's invalidation (names: "mmu_invalidate" from 6.0, "mmu_notifier"
    before; unit: what range_start/range_end count, "hva" to 6.7, "gfn" from 6.8,
    "unknown" without a range), NX huge pages and the shadow-page hash (null:
    none allocated).

    names: "KVM: Rename mmu_notifier_* to mmu_invalidate_*" (6.0, 20ec3ebd707c)
    unit: "KVM: Use gfn instead of hva for mmu_notifier_retry" (6.8, 8569992d64b8)
    null: "KVM: x86/mmu: Defer allocation of shadow MMU's hashed page list" (6.17, 9c4fe6d1509b)
    """
    inv, nx, h = st.invalidation, st.nx, st.hash
    out: dict[str, Any] = {
        "invalidate": invalidation_json(inv),
        "nx_huge_pages": {"param": value(nx.param), "possible_nx_huge_pages": value(nx.possible),
                          "by_mmu": nx.by_mmu},
    }
    if st.hash_read:  # 'vm' only: 'vms' does not walk the chains
        out["mmu_page_hash"] = None if h is None else {
            "buckets": h.buckets, "used": h.used, "pages": h.pages, "longest": h.longest,
            "histogram": {str(k): v for k, v in h.histogram.items()}}
    return out


def vcpu_ref(v: VCpu) -> dict[str, Any]:
    """Which vCPU: struct kvm_vcpu, vcpu_id, vcpu_idx (-1 on kernels without it).

    vcpu_idx: "KVM: remember position in kvm->vcpus array" (before 5.10, 8750e72a79dd)
    """
    return {"vcpu": hx(v.addr), "vcpu_id": value(v.vcpu_id), "vcpu_idx": v.vcpu_idx}


def vcpu_json(v: VCpu) -> dict[str, Any]:
    """struct kvm_vcpu: thread, CPU, state, guest CR3 and its current MMU."""
    return {
        **vcpu_ref(v), "tid": value(v.tid), "comm": value(v.comm), "cpu": value(v.cpu),
        "mode": value(v.mode), "mp_state": value(v.mp_state), "cr3": hx(v.cr3),
        "mmu": v.mmu_name, "root_level": v.root_level, "direct": v.direct,
        "root_hpa": root_hpa(v.root), "requests": hx(v.requests),
        "request_names": list(v.request_names), "other_mmu": other_mmu_json(v.other_mmu),
    }


def other_mmu_json(o: MmuRoots | None) -> dict[str, Any] | None:
    """The vCPU's struct kvm_mmu that vcpu->arch.mmu does not point at (guest_mmu,
    or root_mmu while in L2): its name, root level and root hpa; None if none."""
    if o is None:
        return None
    return {"mmu": o.name, "root_level": o.root_level, "direct": o.direct,
            "root_hpa": root_hpa(o.root)}


def root_hpa(r: RootRef | None) -> str:
    """A root's hpa: "0x…", "INVALID_PAGE", or "unreadable" (its MMU could not be read)."""
    return hpa_text(_root_hpa(r))


def holder_json(h: Holder) -> dict[str, Any]:
    """Who holds a root: {"holder": "vcpu0.prev_roots[1]", "kind", "vcpu_idx", ...}."""
    return h.to_json()


def page_json(p: PageView) -> dict[str, Any]:
    """struct kvm_mmu_page (kvminspect.results.PageView): the fields every command
    shows for a shadow page. Made once per page of a tree: kept cheap."""
    sp = p.sp
    role = sp.role
    bits = role.fields  # PageView.smm and .guest_mode, without two calls each
    return {
        "sp": hx(sp.addr), "gfn": hx(sp.gfn), "level": sp.level, "direct": role.direct,
        "tdp_mmu_page": sp.tdp_mmu_page, "unsync": value(sp.unsync),
        "unsync_children": value(sp.unsync_children), "invalid": role.invalid,
        "obsolete": p.obsolete, "root_count": value(sp.root_count),
        "smm": bool(bits.get("smm")), "guest_mode": bool(bits.get("guest_mode")),
        "orphan": p.orphan, "holders": [h.to_json() for h in p.holders] if p.holders else [],
    }


def root_view_json(r: RootView) -> dict[str, Any]:
    """A root reference (kvminspect.results.RootView: mmu->root or prev_roots[i]):
    always the same keys.

    "state": "page" (a shadow page), "invalid_page", "pae_root" / "pml4_root" /
    "pml5_root" (a special root: its pae_root[i] pages follow), "dummy" (6.6:
    no memslot behind the guest's CR3), or "unreadable".

    "dummy": "KVM: x86/mmu: Use dummy root, backed by zero page, for !visible guest
    roots" (6.6, 0e3223d8d00a)
    """
    return {"pgd": hx(r.pgd), "hpa": hpa_text(r.hpa), "state": r.state.value,
            "page": None if r.page is None else page_json(r.page),
            "pae_roots": [{"index": e.index, "page": page_json(e.page)} for e in r.pae_roots]}


def vcpu_roots_json(v: VcpuRoots) -> dict[str, Any]:
    """One vCPU's roots (roots): mmu->root and prev_roots[], then those of its other
    MMU (guest_mmu, or root_mmu while the vCPU runs a nested guest)."""
    vcpu, o = v.vcpu, v.other_mmu
    return {**vcpu_ref(vcpu), "cr3": hx(vcpu.cr3), "mmu": vcpu.mmu_name,
            "root": root_view_json(v.root),
            "prev_roots": [root_view_json(r) for r in v.prev_roots],
            "other_mmu": None if o is None else {
                "mmu": o.mmu, "root": root_view_json(o.root),
                "prev_roots": [root_view_json(r) for r in o.prev_roots]}}


def tree_node_json(n: TreeNode) -> dict[str, Any]:
    """A tree node (tree): its page, slot in the parent, whether it is a reference
    to a page shown above, children cut by --depth, and its children."""
    d = page_json(n.page)  # filled in place: once per page of a tree
    d["index"], d["ref"], d["children_omitted"] = n.slot, n.ref, n.children_omitted
    d["children"] = [tree_node_json(c) for c in n.children] if n.children else []
    return d


_BOOL_TEXT = ("false", "true")
# LeafTexts.run(): what siblings written by one template share (all but address and
# gfn; mmu_valid_gen: is_obsolete_sp's answer); their address and gfn
_SIBLING_KEY = attrgetter("role.word", "level", "tdp_mmu_page", "unsync", "unsync_children",
                          "root_count", "mmu_valid_gen")
_ADDR, _GFN = attrgetter("addr"), attrgetter("gfn")


def plain_siblings(sps: list[ShadowPage], slots: Sequence[int]
                   ) -> tuple[list[int], list[int]] | None:
    """The addresses and gfns of *sps* (a parent's children at *slots*) when
    the pages differ only in those (role word, level, flags, counts and
    mmu_valid_gen the same, so what a renderer shows of one page's state holds
    for all, is_obsolete_sp too) and they and the slots are plain ints; else
    None."""
    if len(set(map(_SIBLING_KEY, sps))) != 1:
        return None
    addrs, gfns = list(map(_ADDR, sps)), list(map(_GFN, sps))
    if not set(map(type, addrs)) == set(map(type, gfns)) == set(map(type, slots)) == {int}:
        return None
    return addrs, gfns


class LeafTexts:
    """The one-line JSON text of tree_node_json() (render.compact's, the same
    bytes) of a node with no holders and no children shown, by one template:
    most pages of a big tree, ten times faster than the dict and the encoder.
    What a page's role decides (direct, invalid, smm, guest_mode) is made once
    per role word: one LeafTexts per rendering (its pages share a few roles).
    A field that is not a plain bool or int (UNKNOWN, UNREADABLE, a damaged
    value) makes the text None, for the encoder to write.

    The template is the page's address and gfn, then the fields a page shares
    with its siblings (_shared()), its slot, then ref and the children cut:
    run() writes a parent's plain children (a TDP MMU's level-1 tables, 512 to
    a level-2 table) with those made once for all of them.
    """

    HEAD = '{"sp": "'
    GFN = '", "gfn": "'

    def __init__(self) -> None:
        self._roles: dict[int, tuple[str, str, str] | None] = {}

    def node(self, n: TreeNode) -> str | None:
        """page()'s text of a tree node without holders or children shown; None
        for any other."""
        p = n.page
        if n.children or p.holders:
            return None
        return self.page(p.sp, p.obsolete, p.orphan, n.slot, n.ref, n.children_omitted)

    def page(self, sp: ShadowPage, obsolete: bool, orphan: bool, index: int | None,
             ref: bool = False, omitted: int = 0) -> str | None:
        """The text of a node of *sp* (slot *index* in its parent), or None."""
        addr, gfn = sp.addr, sp.gfn
        shared = self._shared(sp, obsolete, orphan, ref, omitted)
        if (shared is None or type(addr) is not int or type(gfn) is not int
                or (index is not None and type(index) is not int)):
            return None
        middle, end = shared
        # (f"{x:#x}" is hex(x), negative too; an int's text is json's)
        return (f'{self.HEAD}{addr:#x}{self.GFN}{gfn:#x}{middle}'
                f'{"null" if index is None else index}{end}')

    def run(self, sps: list[ShadowPage], indexes: Sequence[int], obsolete: bool,
            orphan: bool) -> str | None:
        """page()'s texts of *sps* at slots *indexes* of one parent (no ref, no
        children cut), joined by ", ", when they differ only in address and
        gfn (role, level, flags, counts and mmu_valid_gen the same: *obsolete*
        is then one answer for all); else None, for page() one by one. The
        shared parts are made once, the rest joined in C (hex(), str())."""
        plain = plain_siblings(sps, indexes)
        if plain is None:
            return None
        shared = self._shared(sps[0], obsolete, orphan, False, 0)
        if shared is None:
            return None
        addrs, gfns = plain
        middle, end = shared
        n = len(sps)
        return "".join(chain.from_iterable(zip(
            repeat(", " + self.HEAD, n), map(hex, addrs), repeat(self.GFN, n), map(hex, gfns),
            repeat(middle, n), map(str, indexes), repeat(end, n), strict=True)))[2:]

    def _shared(self, sp: ShadowPage, obsolete: bool, orphan: bool, ref: bool,
                omitted: int) -> tuple[str, str] | None:
        """The template's text between the gfn and the slot, and after the slot,
        for *sp*'s role and fields (None if one is not a plain bool or int)."""
        try:
            parts = self._roles[sp.role.word]
        except KeyError:
            parts = self._roles[sp.role.word] = self._role_parts(sp)
        level, tdp, unsync, children, count = (
            sp.level, sp.tdp_mmu_page, sp.unsync, sp.unsync_children, sp.root_count)
        if (parts is None or type(level) is not int or type(tdp) is not bool
                or type(unsync) is not bool or type(children) is not int
                or type(count) is not int or type(obsolete) is not bool
                or type(orphan) is not bool or type(ref) is not bool
                or type(omitted) is not int):
            return None
        b = _BOOL_TEXT
        direct, invalid, modes = parts
        return (f'", "level": {level}, "direct": {direct}, "tdp_mmu_page": {b[tdp]}, '
                f'"unsync": {b[unsync]}, "unsync_children": {children}, "invalid": {invalid}, '
                f'"obsolete": {b[obsolete]}, "root_count": {count}, {modes}, "orphan": '
                f'{b[orphan]}, "holders": [], "index": ',
                f', "ref": {b[ref]}, "children_omitted": {omitted}, "children": []}}')

    @staticmethod
    def _role_parts(sp: ShadowPage) -> tuple[str, str, str] | None:
        """The text of *sp*'s role's direct and invalid, then smm and guest_mode
        (PageView's), as page_json() has them; None if not plain bools."""
        role = sp.role
        if type(role.direct) is not bool or type(role.invalid) is not bool:
            return None
        b = _BOOL_TEXT
        bits = role.fields
        return (b[role.direct], b[role.invalid], f'"smm": {b[bool(bits.get("smm"))]}, '
                f'"guest_mode": {b[bool(bits.get("guest_mode"))]}')


def export_node_json(p: PageView, root: bool) -> dict[str, Any]:
    """A node of export's graph: page_json() with holders by name (GraphML holds no
    objects), then "addr" (the page again) and "root"."""
    d = page_json(p)
    d["holders"] = [str(h) for h in p.holders]
    d["addr"] = d["sp"]
    d["root"] = root
    return d


def role_json(sp: ShadowPage) -> dict[str, Any]:
    """union kvm_mmu_page_role: the word, each 1-bit field a boolean, others integers."""
    out: dict[str, Any] = {"word": hx(sp.role.word)}
    for name, v in sp.role.fields.items():
        out[name] = bool(v) if sp.role.width(name) == 1 else v
    return out


def sp_detail_json(d: SpDetail) -> dict[str, Any]:
    """Everything sp shows of one shadow page (kvminspect.results.SpDetail):
    page_json() and its role, spt, bitmap, parents and present SPTEs."""
    sp = d.page.sp
    return {
        **page_json(d.page), "role": role_json(sp), "spt": hx(sp.spt),
        "unsync_child_bitmap": sp.bitmap_indexes(), "mmu_valid_gen": value(sp.mmu_valid_gen),
        "on_active_list": d.on_active_list,
        "parents": [{"sp": hx(p.sp), "level": p.level, "indexes": p.indexes}
                    for p in d.parents],
        "sptes": [spte_json(r) for r in d.sptes], "non_present": d.non_present,
    }


def spte_json(r: SpteRow) -> dict[str, Any]:
    """One present SPTE of spt[]: what it maps, or the child page table it points to."""
    e, child = r.spte, r.child
    return {"index": e.index, "value": hx(e.value), "leaf": e.leaf, "large": e.large,
            "pfn": hx(e.pfn), "writable": bool(e.value & 2), "child": hx(e.child),
            "child_gfn": hx(child.gfn) if child else None,
            "child_level": child.level if child else None,
            "bits": spte_bits_json(e.bits)}


def spte_bits_json(b: SpteBits | None) -> dict[str, Any] | None:
    """Every bit of one SPTE, decoded by the kernel's own masks (kvminspect.spte):
    booleans, null where this kernel's masks cannot say (or the format has no
    such bit: EPT has no U/S and no NX); "flags" is the text column."""
    if b is None:
        return None
    return {
        "present": b.present, "leaf": b.leaf, "large": b.large, "mmio": b.mmio,
        "frozen": b.frozen, "r": b.r, "w": b.w, "x": b.x, "xu": b.xu, "user": b.user,
        "nx": b.nx, "ad": b.ad, "accessed": b.accessed, "dirty": b.dirty,
        "host_writable": b.host_writable, "mmu_writable": b.mmu_writable,
        "access_tracked": b.access_tracked, "saved": b.saved, "encrypted": b.encrypted,
        "mmio_gen": b.mmio_gen, "mmio_gfn": hx(b.mmio_gfn), "mmio_access": b.mmio_access,
        "flags": b.flags(),
    }


def exported_json(e: Exported) -> dict[str, Any]:
    """What export wrote (after the VM's opening fields): file, format, nodes, edges."""
    return {"file": e.file, "format": e.format, "nodes": e.nodes, "edges": e.edges}


def replay_json(u: UnsyncRoot) -> dict[str, Any]:
    """One page's replay of the unsync walk (unsync): its batches (struct
    kvm_mmu_pages), leaves with their mmu_page_path parents, and walk errors."""
    r = u.replay
    return {
        "sp": hx(r.root), "zap": u.zap, "holders": [holder_json(h) for h in u.holders],
        "batches": [{
            "pages": [{"sp": hx(e.sp), "level": e.level, "idx": e.idx} for e in b.pages],
            "leaves": [{"sp": hx(leaf.sp), "gfn": hx(leaf.gfn),
                        "parents": [{"sp": hx(p), "level": lvl} for p, lvl in leaf.parents]}
                       for leaf in b.leaves],
        } for b in r.batches],
        "errors": list(r.errors),
    }


def stats_json(s: VmStats) -> dict[str, Any]:
    """kvm->stat's MMU counters and each vCPU's vcpu->stat ones (stats)."""
    return {"stat": s.stat, "vcpus": [{**vcpu_ref(v.vcpu), "stat": v.stat} for v in s.vcpus]}


def watch_vcpu_json(w: VcpuWatch) -> dict[str, Any]:
    """What watch saw of one vCPU's roots across its samples."""
    return {**vcpu_ref(w.vcpu), "switches": w.switches, "prev_root_hits": w.prev_root_hits,
            "new_roots": w.new_roots, "unsettled": w.unsettled,
            "cr3s": [hx(c) for c in w.cr3s]}


def walk_json(w: Walk) -> dict[str, Any]:
    """One address walked through one root (kvminspect.walk.Walk): each level's
    table, index and SPTE, where and why it stopped, and the memslot check."""
    c = w.check
    return {
        "addr": hx(w.addr), "kind": w.kind.value, "root": w.root, "root_table": hx(w.root_addr),
        "root_invalid": w.root_invalid,
        "steps": [{"level": st.level, "table": hx(st.table), "table_gfn": hx(st.table_gfn),
                   "index": st.index,
                   "value": "unreadable" if st.value is None else hx(st.value),
                   "bits": spte_bits_json(st.bits), "reserved": st.reserved,
                   "child": hx(st.child)} for st in w.steps],
        "stop": w.stop.value, "why": w.why, "offset": hx(w.offset), "pfn": hx(w.pfn),
        "reserved_checked": w.checked_reserved,
        "memslot": None if c is None else {
            "gfn": hx(c.gfn), "as_id": c.slot.as_id if c.slot else None,
            "slot": c.slot.id if c.slot else None, "hva": hx(c.hva),
            "host_pfn": hx(c.host_pfn), "verdict": c.verdict.value, "why": memslot_why(c)},
    }


def rmap_entry_json(e: RmapEntry, sp: ShadowPage | None) -> dict[str, Any]:
    """One SPTE that maps a gfn (kvminspect.rmap.RmapEntry): where it is (sptep,
    shadow page and index), the mapping level, its value and bits, and its source:
    "rmap", or the TDP MMU root walked ("tdp_mmu_roots sp 0x…")."""
    return {"as_id": e.as_id, "gfn": hx(e.gfn), "level": e.level,
            "size": LEVEL_NAMES.get(e.level, str(e.level)),
            "sptep": hx(e.sptep), "sp": hx(e.sp), "sp_gfn": hx(sp.gfn) if sp else None,
            "sp_level": sp.level if sp else None, "index": e.index,
            "value": "unreadable" if e.value is None else hx(e.value),
            "bits": spte_bits_json(e.bits),
            "source": "rmap" if e.tdp_root is None else f"tdp_mmu_roots sp {e.tdp_root:#x}"}


def skipped_json(s: Skipped) -> dict[str, Any]:
    """An rmap object rmap could not follow (kvminspect.rmap.Skipped): where, and why."""
    return {"object": hex(s.addr), "why": s.why}


def rmap_histogram_json(h: RmapHistogram) -> dict[str, Any]:
    """A VM's rmap length histogram (kvminspect.rmap.RmapHistogram, debugfs
    mmu_rmaps_stat): the kernel's bucket labels, then per level the heads, the
    counts per bucket (as the kernel bins them, by ffs(length)), the exact lengths
    and the entries; has_rmaps false (and no levels) for a VM without rmaps."""
    return {
        "has_rmaps": h.has_rmaps, "buckets": list(RMAP_BUCKETS),
        "levels": [{"level": lv.level, "size": lv.name, "heads": lv.heads,
                    "counts": list(lv.buckets), "entries": lv.entries, "longest": lv.longest,
                    "lengths": [{"length": n, "heads": c} for n, c in lv.lengths.items()]}
                   for lv in h.levels],
        "entries": h.entries, "max_mmu_rmap_size": h.max_rmap_size,
        "unreadable": [{"as_id": a.as_id, "base_gfn": hx(a.base_gfn), "npages": a.npages,
                        "level": a.level} for a in h.unreadable],
        "skipped": [skipped_json(x) for x in h.skipped],
    }


def finding_json(f: Finding) -> dict[str, Any]:
    """One check finding (kvminspect.check.Finding): its check id, severity, the
    objects it names, the message."""
    return {"check": f.check.value, "severity": f.severity.value,
            "objects": [hex(a) for a in f.objects], "message": f.message}


def summary_json(counts: dict[Severity, int]) -> dict[str, int]:
    """A VM's findings counted by severity (kvminspect.check.summary):
    {"error": n, "warning": n, "info": n}."""
    return {s.value: counts.get(s, 0) for s in Severity}


def change_json(c: Change[Any]) -> dict[str, Any]:
    """A value before and after (kvminspect.diff.Change): {"old", "new"}."""
    return {"old": value(c.old), "new": value(c.new)}


def diff_page_json(p: PageView) -> dict[str, Any]:
    """A shadow page in a diff: page_json() and its role word (half of what matches it)."""
    return {**page_json(p), "role": hx(p.sp.role.word)}


def _field_json(f: PageField, v: FieldValue) -> Any:
    return hx(v) if f.address else value(v)


def page_change_json(c: PageChange) -> dict[str, Any]:
    """A matched page (kvminspect.diff.PageChange) as it is in B, with "changes":
    each changed field (sp, role, unsync, ...) -> {"old", "new"}."""
    return {**diff_page_json(c.new), "changes": {
        f.value: {"old": _field_json(f, ch.old), "new": _field_json(f, ch.new)}
        for f, ch in c.changes.items()}}


def vcpu_change_json(v: VcpuChange) -> dict[str, Any]:
    """A vCPU in a diff (kvminspect.diff.VcpuChange): its id fields (as in B), cr3
    old/new, status, and each changed root slot's root in A and in B (null: none)."""
    return {**vcpu_ref(v.vcpu), "cr3": {"old": hx(v.cr3.old), "new": hx(v.cr3.new)},
            "status": v.status.value,
            "roots": [{"slot": str(r.slot),
                       "old": None if r.old is None else root_view_json(r.old),
                       "new": None if r.new is None else root_view_json(r.new)}
                      for r in v.roots]}


def vm_diff_json(d: VmDiff) -> dict[str, Any]:
    """One VM's entry of a diff document (kvminspect.diff.VmDiff): the VM as in A
    (as in B if added), status, how it was matched, both sides' vm_ref, and what
    changed (empty for a VM on one side only)."""
    return {
        **vm_ref(d.vm), "status": d.status.value,
        "matched_by": None if d.matched_by is None else d.matched_by.value,
        "before": None if d.old is None else vm_ref(d.old),
        "after": None if d.new is None else vm_ref(d.new),
        "pages": change_json(d.pages),
        "counters": {k: change_json(c) for k, c in d.counters.items()},
        "stat": {k: change_json(c) for k, c in d.stat.items()},
        "vcpus": [vcpu_change_json(v) for v in d.vcpus],
        "pages_added": [diff_page_json(p) for p in d.pages_added],
        "pages_zapped": [diff_page_json(p) for p in d.pages_zapped],
        "pages_changed": [page_change_json(c) for c in d.pages_changed],
    }


def last_exit_json(e: LastExit | None) -> dict[str, Any] | None:
    """A vCPU's last exit as the vendor module keeps it (Kernel.last_exit), or null."""
    if e is None:
        return None
    return {"vendor": e.vendor.value, "code": hx(e.code), "name": e.name,
            "info1": hx(e.info1), "info2": hx(e.info2), "address": hx(e.address),
            "address_kind": e.address_kind.value, "stale": e.stale, "source": e.source,
            "nested": e.nested, "detail": list(e.detail)}


def vcpu_diagnosis_json(v: VcpuDiagnosis) -> dict[str, Any]:
    """One vCPU of diagnose: stuck or not, why, and the evidence."""
    c, f = v.vcpu, v.fault
    return {**vcpu_ref(c), "stuck": v.stuck, "reasons": [r.value for r in v.reasons],
            "mp_state": value(c.mp_state), "mode": value(c.mode),
            "requests": list(c.request_names), "root": v.root.value,
            "root_hpa": root_hpa(c.root), "reload_pending": v.reload_pending,
            "last_exit": last_exit_json(v.last_exit),
            "fault": None if f is None else {
                "address": hx(f.address), "kind": f.kind, "gfn": hx(f.gfn), "hva": hx(f.hva),
                "how": f.how, "inside_invalidation": f.inside}}


def diagnosis_json(d: VmDiagnosis) -> dict[str, Any]:
    """One VM of diagnose (kvminspect.diagnose.VmDiagnosis): the verdict, every
    finding (the text folds info ones), what the audit reached, the
    invalidation, mmu_lock and each vCPU."""
    inv, lock = d.invalidation, d.mmu_lock
    return {
        "verdict": d.verdict.value, "summary": summary_json(d.counts),
        "findings": [finding_json(f) for f in d.findings],
        "audit": {"pages": d.audit.pages, "leaves": d.audit.leaves,
                  "unchecked": d.audit.unchecked},
        "rmaps": rmap_histogram_json(d.rmaps),
        "invalidation": invalidation_json(inv),
        "mmu_lock": {"rwlock": lock.rwlock, "writer": lock.writer, "readers": lock.readers,
                     "error": lock.error},
        "vcpus": [vcpu_diagnosis_json(v) for v in d.vcpus],
    }
