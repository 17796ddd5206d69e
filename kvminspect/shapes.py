"""One JSON shape per kernel object, used by every command and renderer.

Each function turns one model object into the dict every document uses for
it: a VM (struct kvm), a vCPU (struct kvm_vcpu), a root reference
(mmu->root, prev_roots[i], pae_root[i]), a shadow page (struct
kvm_mmu_page), an SPTE, a root holder and a check finding. The same object
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

from typing import Any

from kvminspect.check import Finding
from kvminspect.graph import Holder, VMGraph
from kvminspect.layout import INVALID_PAGE, NoValue
from kvminspect.model import VM, MmuRoots, RootRef, ShadowPage, Spte, VCpu
from kvminspect.read_vmstate import VmState
from kvminspect.render import hx
from kvminspect.rmap import RmapEntry
from kvminspect.spte import SpteBits
from kvminspect.walk import Walk

SCHEMA_VERSION = 1


def value(v: Any) -> Any:
    """An integer or string field: itself, or "unknown" / "unreadable"."""
    return v.name if isinstance(v, NoValue) else v


def vm_ref(vm: VM) -> dict[str, Any]:
    """The fields that open every per-VM document: which VM this is."""
    return {"index": vm.index, "kvm": hx(vm.addr), "pid": value(vm.pid), "mmu": vm.mmu,
            "vendor": vm.vendor, "mmu_valid_gen": value(vm.mmu_valid_gen)}


def vm_json(vm: VM, state: VmState | None = None) -> dict[str, Any]:
    """struct kvm: its owner, vCPUs, MMU-wide counters and memslots; with *state*
    (vm, vms) also "mmu_state" (vm_state_json)."""
    extra = {"mmu_state": vm_state_json(state)} if state is not None else {}
    return {
        **vm_ref(vm), "stats_id": vm.stats_id, "guest_name": vm.guest_name,
        "comm": vm.comm, "task_state": vm.task_state,
        "online_vcpus": value(vm.online_vcpus), "created_vcpus": value(vm.created_vcpus),
        "vm_type": vm.vm_type, "n_used_mmu_pages": value(vm.n_used_mmu_pages),
        "n_max_mmu_pages": value(vm.n_max_mmu_pages),
        "n_requested_mmu_pages": value(vm.n_requested_mmu_pages),
        "indirect_shadow_pages": value(vm.indirect_shadow_pages),
        "memslots": [{"as_id": s.as_id, "id": s.id, "base_gfn": hx(s.base_gfn),
                      "npages": s.npages, "userspace_addr": hx(s.userspace_addr),
                      "flags": s.flags} for s in vm.memslots],
        **extra,
    }


def vm_state_json(st: VmState) -> dict[str, Any]:
    """What explains stuck vCPUs VM-wide (kvminspect.read_vmstate): the MMU
    notifier's invalidation (names: "mmu_invalidate" from 6.3, "mmu_notifier"
    before), NX huge pages and the shadow-page hash (null: none allocated)."""
    inv, nx, h = st.invalidation, st.nx, st.hash
    out: dict[str, Any] = {
        "invalidate": {"names": inv.prefix, "seq": value(inv.seq),
                       "in_progress": value(inv.in_progress),
                       "range_start": hx(inv.range_start), "range_end": hx(inv.range_end)},
        "nx_huge_pages": {"param": value(nx.param), "possible_nx_huge_pages": value(nx.possible),
                          "by_mmu": nx.by_mmu},
    }
    if st.hash_read:  # 'vm' only: 'vms' does not walk the chains
        out["mmu_page_hash"] = None if h is None else {
            "buckets": h.buckets, "used": h.used, "pages": h.pages, "longest": h.longest,
            "histogram": {str(k): v for k, v in h.histogram.items()}}
    return out


def vcpu_ref(v: VCpu) -> dict[str, Any]:
    """Which vCPU: struct kvm_vcpu, vcpu_id, vcpu_idx (-1 before 5.11)."""
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
    if r is None:
        return "unreadable"
    return "INVALID_PAGE" if r.hpa is None or r.hpa == INVALID_PAGE else hex(r.hpa)


def holder_json(h: Holder) -> dict[str, Any]:
    """Who holds a root: {"holder": "vcpu0.prev_roots[1]", "kind", "vcpu_idx", ...}."""
    return h.to_json()


def sp_json(sp: ShadowPage, g: VMGraph) -> dict[str, Any]:
    """struct kvm_mmu_page: the fields every command shows for a shadow page."""
    return {
        "sp": hx(sp.addr), "gfn": hx(sp.gfn), "level": sp.level, "direct": sp.role.direct,
        "tdp_mmu_page": sp.tdp_mmu_page, "unsync": value(sp.unsync),
        "unsync_children": value(sp.unsync_children), "invalid": sp.role.invalid,
        "obsolete": g.obsolete(sp), "root_count": value(sp.root_count),
        "smm": bool(sp.role.get("smm")), "guest_mode": bool(sp.role.get("guest_mode")),
        "orphan": g.is_orphan(sp.addr) if sp.addr in g else False,
        "holders": [holder_json(h) for h in g.roots.get(sp.addr, [])],
    }


def root_json(r: RootRef | None, g: VMGraph) -> dict[str, Any]:
    """A root reference (mmu->root or prev_roots[i]): always the same keys.

    "state": "page" (a shadow page), "invalid_page", "pae_root" / "pml4_root" /
    "pml5_root" (a special root: its pae_root[i] pages follow), "dummy" (6.6:
    no memslot behind the guest's CR3), or "unreadable".
    """
    if r is None:
        return {"pgd": "unreadable", "hpa": "unreadable", "state": "unreadable",
                "page": None, "pae_roots": []}
    if r.hpa is None:
        state = "invalid_page"
    elif r.sp is not None:
        state = "page"
    else:
        state = r.special or "unreadable"
    page = sp_json(r.sp, g) if r.sp is not None and r.sp.addr in g else None
    return {"pgd": hx(r.pgd), "hpa": root_hpa(r), "state": state, "page": page,
            "pae_roots": [{"index": i, "page": sp_json(g.sp(a), g)}
                          for i, a in r.pae_roots if a in g]}


def role_json(sp: ShadowPage) -> dict[str, Any]:
    """union kvm_mmu_page_role: the word, each 1-bit field a boolean, others integers."""
    out: dict[str, Any] = {"word": hx(sp.role.word)}
    for name, v in sp.role.fields.items():
        out[name] = bool(v) if sp.role.width(name) == 1 else v
    return out


def spte_json(e: Spte, child: ShadowPage | None) -> dict[str, Any]:
    """One present SPTE of spt[]: what it maps, or the child page table it points to."""
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


def walk_json(w: Walk) -> dict[str, Any]:
    """One address walked through one root (kvminspect.walk.Walk): each level's
    table, index and SPTE, where and why it stopped, and the memslot check."""
    c = w.check
    return {
        "addr": hx(w.addr), "kind": w.kind, "root": w.root, "root_table": hx(w.root_addr),
        "root_invalid": w.root_invalid,
        "steps": [{"level": st.level, "table": hx(st.table), "table_gfn": hx(st.table_gfn),
                   "index": st.index,
                   "value": "unreadable" if st.value is None else hx(st.value),
                   "bits": spte_bits_json(st.bits), "reserved": st.reserved,
                   "child": hx(st.child)} for st in w.steps],
        "stop": w.stop, "why": w.why, "offset": hx(w.offset), "pfn": hx(w.pfn),
        "reserved_checked": w.checked_reserved,
        "memslot": None if c is None else {
            "gfn": hx(c.gfn), "as_id": c.slot.as_id if c.slot else None,
            "slot": c.slot.id if c.slot else None, "hva": hx(c.hva),
            "host_pfn": hx(c.host_pfn), "verdict": c.verdict, "why": c.why},
    }


def rmap_entry_json(e: RmapEntry, sp: ShadowPage | None) -> dict[str, Any]:
    """One SPTE that maps a gfn (kvminspect.rmap.RmapEntry): where it is (sptep,
    shadow page and index), the mapping level, its value and bits, and its source."""
    return {"as_id": e.as_id, "gfn": hx(e.gfn), "level": e.level,
            "size": {1: "4K", 2: "2M", 3: "1G"}.get(e.level, str(e.level)),
            "sptep": hx(e.sptep), "sp": hx(e.sp), "sp_gfn": hx(sp.gfn) if sp else None,
            "sp_level": sp.level if sp else None, "index": e.index,
            "value": "unreadable" if e.value is None else hx(e.value),
            "bits": spte_bits_json(e.bits), "source": e.source}


def finding_json(f: Finding) -> dict[str, Any]:
    """One check finding: its check id, severity, the objects it names, the message."""
    return f.to_json()
