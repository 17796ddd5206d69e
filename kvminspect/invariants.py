"""What a shadow page must be given its parent, and what SPTEs must be given the
memslots: invariants arch/x86/kvm/mmu/mmu.c and tdp_mmu.c keep, checked offline.

``check_invariants(k, vg, st)`` (part of ``check --audit``: kvminspect.audit.audit_vm)
runs, over the graph's links and the one pass kvminspect.leaves.collect() made over
the tables:

* check_child_roles: a child's role is what the kernel derives from its parent's
  (kvm_mmu_child_role() from 6.0, "KVM: x86/mmu: Derive shadow MMU page role from
  parent" (2e65e842c57d); kvm_mmu_get_page() from the vCPU's role before;
  tdp_mmu_init_child_sp() / alloc_tdp_mmu_page() for the TDP MMU): level one below,
  the parent's bits copied, direct/access/quadrant/gpte size as the kernel sets them;
* check_child_gfns: a child's gfn is where its parent's SPTE index puts it
  (kvm_mmu_page_get_gfn() of a direct or passthrough parent; the rounding of
  FNAME(fetch)'s base_gfn under an indirect one);
* check_mmio_sptes: an MMIO SPTE of the current memslot generation (check_mmio_spte())
  never covers a gfn a visible memslot maps (kvm_faultin_pfn() makes MMIO SPTEs for
  gfns no usable memslot holds);
* check_leaf_memslots: a present leaf SPTE maps a gfn some memslot holds (the
  fault path maps only memslot pages, and a memslot is zapped before it goes).

Every violation is an ERROR Finding naming the page, its gfn, its parent and the
SPTE index (objects: [page, parent]); what the kernel itself leaves behind is
exempt, each exemption's reason in its function's docstring. Above all, pages the
kernel no longer uses are exempt (dead_pages): obsolete pages (is_obsolete_sp:
role.invalid, or an old mmu_valid_gen after a fast zap) and the pages under them,
which kvm_zap_obsolete_pages() / the TDP MMU's zap of invalid roots tear down
without fixing them first, and which for_each_valid_sp() and the TDP MMU's valid-root
walks never hand to a fault again. A page found wrong is not used as a parent in
turn (its children would repeat the finding); each check reports at most
MAX_REPORTED findings of its kind per VM and counts the rest. Nothing here reads
the kernel beyond the memslots' generation: the pages, links, leaves and MMIO SPTEs
are the graph's and collect()'s.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, NamedTuple

from kvminspect import spte
from kvminspect.check import Finding, FindingKind, Severity, sp_id
from kvminspect.fmt import spte_text
from kvminspect.graph import VMGraph
from kvminspect.layout import known
from kvminspect.model import Kernel
from kvminspect.objects import Memslot, Role, ShadowPage, as_id_of

if TYPE_CHECKING:
    from kvminspect.leaves import AuditState

MAX_REPORTED = 64  # findings of one check per VM spelled out (as kvminspect.audit's)
FIRST, SECOND = itemgetter(0), itemgetter(1)  # of a link's (index, child)
GFN, LEVEL, TDP = attrgetter("gfn"), attrgetter("level"), attrgetter("tdp_mmu_page")
ROLE_WORD = attrgetter("role.word")
SPTE_LEVEL_BITS = 9  # each level of a page table resolves 9 bits of the gfn
KVM_MEMSLOT_INVALID = 1 << 16  # include/linux/kvm_host.h: a memslot being deleted or moved
# role fields kvm_mmu_child_role() sets rather than copies (level: checked on its own,
# from ShadowPage.level; invalid: obsolete pages are exempt)
SET_BY_CHILD_ROLE = frozenset(("level", "access", "direct", "passthrough", "invalid",
                               "quadrant"))
# the guest PTE size bit: has_4_byte_gpte from "KVM: X86: Rename gpte_is_8_bytes to
# has_4_byte_gpte and invert the direction" (5.17, bb3b394d35e8), gpte_is_8_bytes before
GPTE_SIZE = ("has_4_byte_gpte", "gpte_is_8_bytes")


class Link(NamedTuple):
    """parent->spt[slot] points at child: one edge of the graph."""

    parent: ShadowPage
    slot: int  # the SPTE's index in parent->spt[]
    child: ShadowPage


def place(child: ShadowPage, parent: ShadowPage | None, index: int | None) -> str:
    """A page as these findings name it: itself, then where its parent holds it."""
    if parent is None:
        return f"{sp_id(child)} (a root)"
    return f"{sp_id(child)} at spt[{index}] of {sp_id(parent)}"


def capped(found: list[Finding], kind: FindingKind, what: str) -> list[Finding]:
    """The first MAX_REPORTED of *found*, and one finding counting the rest."""
    if len(found) <= MAX_REPORTED:
        return found
    extra = len(found) - MAX_REPORTED
    return found[:MAX_REPORTED] + [Finding(kind, Severity.ERROR, [],
                                           f"and {extra} more {what} (not listed)",
                                           count=extra)]


# -- which pages the kernel still uses ---------------------------------------------


def dead_pages(vg: VMGraph) -> set[int]:
    """Pages the kernel no longer uses: obsolete ones (is_obsolete_sp) and those that
    only obsolete ones reach.

    A fast zap (kvm_mmu_zap_all_fast) makes every shadow page obsolete at once by
    bumping kvm->arch.mmu_valid_gen and zaps them in batches, links and leaves
    intact until their turn (kvm_zap_obsolete_pages); the TDP MMU sets role.invalid
    on its roots only (kvm_tdp_mmu_invalidate_all_roots), and their trees stay
    linked until the invalid roots are zapped. Live: every page reached from a
    non-obsolete page with no parent (a root, an orphan) through non-obsolete pages.
    Empty, at no cost, when no page is obsolete.
    """
    gen = vg.vm.mmu_valid_gen
    if known(gen):
        obsolete = {a for a, sp in vg.nodes.items()
                    if sp.role.invalid or (sp.mmu_valid_gen != gen and vg.obsolete(sp))}
    else:
        obsolete = {a for a, sp in vg.nodes.items() if sp.role.invalid}
    if not obsolete:
        return set()
    children = {c for pairs in vg.links.values() for _, c in pairs}
    live = {a for a in vg.nodes if a not in children and a not in obsolete}
    todo = deque(live)
    links = vg.links
    while todo:
        for _, c in links.get(todo.popleft(), ()):
            if c not in live and c not in obsolete:
                live.add(c)
                todo.append(c)
    return vg.nodes.keys() - live


def parent_links(vg: VMGraph, dead: set[int]) -> list[tuple[ShadowPage, list[tuple[int, int]]]]:
    """(parent, its (index, child) pairs) of every live parent: the graph's links
    and those it kept out for a child of the wrong level (VMGraph.wrong_level),
    parents by level from the top (a page is checked as a child before it is used
    as a parent)."""
    nodes, links, wrong = vg.nodes, vg.links, vg.wrong_level
    out = []
    for p in sorted(dict.fromkeys(p for p in (*links, *wrong) if p not in dead),
                    key=lambda p: -nodes[p].level):
        pairs = links.get(p, [])
        if p in wrong:
            pairs = pairs + wrong[p]
        out.append((nodes[p], pairs))
    return out


# -- a child's role against its parent's ------------------------------------------


def four_byte_gptes(role: Role) -> bool | None:
    """Whether a page shadows a guest with 4-byte PTEs (32-bit, 2-level, non-PAE
    paging): has_4_byte_gpte, or not gpte_is_8_bytes; None when the role has
    neither (older kernels: not checked)."""
    f = role.fields
    if "has_4_byte_gpte" in f:
        return bool(f["has_4_byte_gpte"])
    if "gpte_is_8_bytes" in f:
        return not f["gpte_is_8_bytes"]
    return None


def kvm_mmu_child_role(parent: ShadowPage, index: int, child_direct: bool
                       ) -> dict[str, tuple[int, str]]:
    """The role fields the kernel decides for the child at parent->spt[index]
    (a child that is direct or not as *child_direct* says), as far as the parent
    tells them: name -> (value, why); the fields left out are free (level is
    checked against ShadowPage.level, which corrects 5.10's TDP MMU quirk).

    TDP MMU: tdp_mmu_init_child_sp() copies the parent's role and decrements the
    level (6.x; tdp_mmu_alloc_sp_for_split() then the same for eager splits); 5.10's
    alloc_tdp_mmu_page() took the vCPU's mmu_role.base, which is the root's (roots
    are looked up by role.word) and so every page's: every field but level equal.

    Shadow MMU, kvm_mmu_child_role() (6.0+; before it kvm_mmu_get_page() built the
    same from the vCPU's role, equal to the root's, hence to the parent's): the
    parent's role with level - 1, the given access and direct, passthrough 0 and
    invalid 0, so every other bit (cr0_wp, efer_nx/nxe, smep_andnot_wp or 7.3's
    cr4_smep, smap_andnot_wp, ad_disabled, guest_mode, smm, is_mirror, ...) equal.
    What it sets:
    * direct: a direct parent's children are direct (direct_map() and FNAME(fetch)
      pass true below a direct page; eager splits make direct children), and their
      access is the parent's (ACC_ALL from direct_map(), the same direct_access at
      every level of FNAME(fetch), kvm_mmu_page_get_access() = role.access for a
      direct huge page split); an indirect parent's child takes its access from
      the guest walk: not checked;
    * quadrant: with 4-byte guest PTEs the child (a page table, level 1) shadows
      half of a guest page table, quadrant = spte_index & 1 (the parent PDE's bit
      21; kvm_mmu_get_page() computed the same from the address); else copied,
      which is 0: only a 32-bit guest's pae_root[] roots get a quadrant of their
      own (mmu_alloc_root()), and they have no parent link here;
    * the guest PTE size: copied by kvm_mmu_child_role(), and by kvm_mmu_get_page()
      since "KVM: X86: Remove useless code to set role.gpte_is_8_bytes when
      role.direct" (5.17, 41e35604eaff); before it (gpte_is_8_bytes), a direct
      child had gpte_is_8_bytes = 1.
    """
    p = parent.role.fields
    parents = "the parent's"
    if parent.tdp_mmu_page:
        return {n: (v, parents) for n, v in p.items() if n not in ("level", "invalid")}
    want = {n: (v, parents) for n, v in p.items() if n not in SET_BY_CHILD_ROLE}
    if "passthrough" in p:  # "KVM: X86/MMU: Fix shadowing 5-level NPT for 4-level NPT L1
        want["passthrough"] = (0, "never for a child")  # guest" (5.19, 84e5ffd045f3)
    if parent.role.direct:
        want["direct"] = (1, "under a direct parent")
        want["access"] = (p.get("access", 0), parents)
    four = four_byte_gptes(parent.role)
    if four is None:
        for name in GPTE_SIZE:
            want.pop(name, None)
        return want
    if child_direct and "gpte_is_8_bytes" in p:
        want["gpte_is_8_bytes"] = (1, "for a direct page")
    if "quadrant" in p:
        want["quadrant"] = ((index & 1, "spte_index & 1 with 4-byte guest PTEs") if four
                            else (p["quadrant"], parents))
    return want


def role_mismatches(link: Link) -> list[str]:
    """What of the child's role kvm_mmu_child_role() would not have made, worded."""
    parent, index, child = link
    out = []
    if child.level != parent.level - 1:
        out.append(f"level {child.level}, expected {parent.level - 1}")
    if child.tdp_mmu_page != parent.tdp_mmu_page:
        # tdp_mmu_init_sp() / alloc_tdp_mmu_page() mark every page of a TDP MMU tree
        out.append(f"tdp_mmu_page {int(child.tdp_mmu_page)} under a parent with "
                   f"{int(parent.tdp_mmu_page)}")
    got = child.role.fields
    for name, (want, why) in kvm_mmu_child_role(parent, index, child.role.direct).items():
        have = got.get(name)
        if have is not None and have != want:
            out.append(f"role.{name} {have}, expected {want} ({why})")
    return out


def all_fit(parent: ShadowPage, pairs: list[tuple[int, int]], nodes: dict[int, ShadowPage]
            ) -> bool:
    """Whether every child in *pairs* has the role kvm_mmu_child_role() gives it
    (check_child_roles' judgement, once per distinct (role, level, index parity,
    tdp_mmu_page) of the children, the keys made in C): a parent with 512
    children of one role is judged twice, not 512 times."""
    kids = list(map(nodes.__getitem__, map(SECOND, pairs)))
    keys = list(zip(map(ROLE_WORD, kids), map(LEVEL, kids),
                    map((1).__and__, map(FIRST, pairs)), map(TDP, kids), strict=True))
    for key in set(keys):
        at = keys.index(key)
        if role_mismatches(Link(parent, pairs[at][0], kids[at])):
            return False
    return True


def check_child_roles(vg: VMGraph, parents: list[tuple[ShadowPage, list[tuple[int, int]]]],
                      dead: set[int], bad: set[int]) -> list[Finding]:
    """Each child's role against kvm_mmu_child_role() of its parent and SPTE index
    (see kvm_mmu_child_role for the rules and what each is exempt from).

    A child is reported once, at the first parent (from the top) whose link it
    does not fit, whatever other parents share it. A child whose level is wrong
    is reported through the link the graph kept out, and none of its own links
    is checked (they would all be off by the same level); likewise for any child
    found wrong (*bad* gets it).
    The 5.10 TDP MMU's child role.level (its parent's: "KVM: x86/mmu: Fix TDP MMU
    page table level" (5.14, f1b832550832)) is read corrected (ShadowPage.level).
    The children of one parent are judged once per (role, level, index parity).
    """
    nodes = vg.nodes
    out: list[Finding] = []
    reported: set[int] = set()
    for parent, pairs in parents:
        if parent.addr in bad or all_fit(parent, pairs, nodes):
            continue
        judged: dict[tuple[int, int, int, bool], list[str]] = {}
        for index, c in pairs:
            if c in dead or c in reported:
                continue
            child = nodes[c]
            key = (child.role.word, child.level, index & 1, child.tdp_mmu_page)
            wrong = judged.get(key)
            if wrong is None:
                wrong = judged[key] = role_mismatches(Link(parent, index, child))
            if not wrong:
                continue
            bad.add(c)
            reported.add(c)
            how = ("tdp_mmu_init_child_sp(): the parent's role" if parent.tdp_mmu_page
                   else "kvm_mmu_child_role(): the parent's role with its own access")
            out.append(Finding(
                FindingKind.CHILD_ROLE, Severity.ERROR, [c, parent.addr],
                f"{place(child, parent, index)}: {'; '.join(wrong)} ({how}, level - 1)"))
    return capped(out, FindingKind.CHILD_ROLE, "children with a wrong role")


# -- a child's gfn against its parent's SPTE index --------------------------------


def kvm_mmu_page_get_gfn(parent: ShadowPage, index: int) -> int | None:
    """kvm_mmu_page_get_gfn(parent, index) where the parent alone says it: a direct
    (or TDP MMU) page's gfn + (index << 9 * (level - 1)), a passthrough page's own
    gfn (5.19+); None for an indirect page, whose shadowed_translation[] (sp->gfns
    before "KVM: x86/mmu: Cache the access bits of shadowed translations" (6.0,
    6a97575d5cff)) is written for leaf SPTEs only (rmap_add ->
    kvm_mmu_page_set_translation), from a cache without __GFP_ZERO: behind a link
    it holds a stale leaf's gfn or nothing at all."""
    if parent.tdp_mmu_page or parent.role.direct:
        return parent.gfn + (index << (SPTE_LEVEL_BITS * (parent.level - 1)))
    if parent.role.get("passthrough"):
        return parent.gfn
    return None


def check_child_gfns(vg: VMGraph, parents: list[tuple[ShadowPage, list[tuple[int, int]]]],
                     dead: set[int], bad: set[int]) -> list[Finding]:
    """Each child's gfn where its parent's SPTE index puts it.

    * Under a direct or TDP MMU parent, kvm_mmu_page_get_gfn(parent, index): the
      gfn direct_map() / kvm_tdp_mmu_map() (iter.gfn, tdp_mmu_init_child_sp) give
      the child, and what the kernel itself checks in kvm_mmu_page_set_translation;
      under a passthrough parent, the parent's gfn (FNAME(fetch) links the guest's
      top table, the root's gfn).
    * Under an indirect parent, a direct child (a guest huge page shadowed by
      smaller pages): its gfn is FNAME(fetch)'s base_gfn, the faulting gfn rounded
      to what one parent SPTE maps (or, for an eager split, the huge SPTE's gfn,
      rounded the same): aligned to 1 << 9 * (parent level - 1). Which guest page
      it is only the guest's page table says; the parent records nothing for a
      link (see kvm_mmu_page_get_gfn).
    * An indirect child under an indirect parent shadows the guest page table the
      guest PTE points at: nothing here to check it against.

    A child is reported once (at its first parent from the top that it does not
    fit); children found wrong already (*bad*) are not checked again, and a child
    found at the wrong gfn is not used as a parent (its children derive from the
    gfn the kernel gave it, not the one it has).
    """
    nodes = vg.nodes
    out: list[Finding] = []
    for parent, pairs in parents:
        if parent.addr in bad:
            continue
        shift = SPTE_LEVEL_BITS * (parent.level - 1)
        exact = kvm_mmu_page_get_gfn(parent, 0) is not None
        by_index = parent.tdp_mmu_page or parent.role.direct
        # every child where it belongs (the common case: told in C, no child reported)
        gfns = list(map(GFN, map(nodes.__getitem__, map(SECOND, pairs))))
        if exact and by_index:
            if gfns == [parent.gfn + (i << shift) for i, _ in pairs]:
                continue
        elif exact:
            if gfns.count(parent.gfn) == len(gfns):
                continue
        elif not any(g & ((1 << shift) - 1) for g in gfns):
            continue
        for index, c in pairs:
            if c in dead or c in bad:
                continue
            child = nodes[c]
            if exact:
                want = parent.gfn + (index << shift) if by_index else parent.gfn
                if child.gfn == want:
                    continue
                why = f"kvm_mmu_page_get_gfn(parent, {index}) is {want:#x}"
            elif child.role.direct and child.gfn & ((1 << shift) - 1):
                why = (f"a direct page under an indirect one starts on a multiple of "
                       f"{1 << shift:#x} (FNAME(fetch)'s base_gfn, rounded to what the "
                       "parent's SPTE maps)")
            else:
                continue
            bad.add(c)
            out.append(Finding(
                FindingKind.CHILD_GFN, Severity.ERROR, [c, parent.addr],
                f"{place(child, parent, index)}: gfn {child.gfn:#x}, but {why}"))
    return capped(out, FindingKind.CHILD_GFN, "children at the wrong gfn")


# -- SPTEs against the memslots ----------------------------------------------------


class Slots:
    """The memslots of one VM by address space, for gfn lookups (bisect)."""

    def __init__(self, memslots: Iterable[Memslot]) -> None:
        by_as: dict[int, list[Memslot]] = {}
        for s in memslots:
            if s.npages > 0:
                by_as.setdefault(s.as_id, []).append(s)
        self.slots = {a: sorted(v, key=lambda s: s.base_gfn) for a, v in by_as.items()}
        self.bases = {a: [s.base_gfn for s in v] for a, v in self.slots.items()}

    def find(self, as_id: int, gfn: int) -> Memslot | None:
        """The memslot of address space *as_id* holding *gfn* (__gfn_to_memslot)."""
        bases = self.bases.get(as_id)
        if not bases:
            return None
        i = bisect.bisect_right(bases, gfn) - 1
        if i < 0:
            return None
        s = self.slots[as_id][i]
        return s if gfn < s.base_gfn + s.npages else None


def parent_of(vg: VMGraph, sp: ShadowPage, dead: set[int]) -> tuple[ShadowPage | None,
                                                                     int | None]:
    """The first live parent of *sp* and its index there (None, None for a root)."""
    for p, idx in vg.parents(sp.addr):
        if p not in dead and idx:
            return vg.nodes[p], idx[0]
    return None, None


def check_mmio_sptes(k: Kernel, vg: VMGraph, st: AuditState, dead: set[int]
                     ) -> list[Finding]:
    """No MMIO SPTE the fault path would trust covers a gfn a visible memslot maps.

    The fault path writes an MMIO SPTE (mark_mmio_spte -> make_mmio_spte, with
    the memslot generation) only for KVM_PFN_NOSLOT, a gfn with no usable memslot
    (kvm_faultin_pfn): none at all, or one L2 must not see (!kvm_is_visible_memslot()
    for a guest_mode fault: an internal memslot, id KVM_USER_MEM_SLOTS and up,
    Vms.user_memslots). Exempt:
    * a stale MMIO SPTE: its generation is not the memslots' (check_mmio_spte(),
      and never while KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS): made before the memslot
      appeared, refaulted at the next access (handle_mmio_page_fault -> RET_PF_INVALID);
    * a memslot being deleted or moved (KVM_MEMSLOT_INVALID): kvm_faultin_pfn()
      retries a fault there (6.1 and 6.12, as their sources show), older kernels
      made KVM_PFN_NOSLOT of it (__gfn_to_hva_many), and the memslot's removal
      bumps the generation anyway;
    * an obsolete page or one under obsolete ones (dead_pages), and a page the
      role and gfn checks found wrong (in *dead* too: its role.smm says the
      address space).
    The gfn is the one the SPTE encodes (get_mmio_spte_gfn), the address space the
    page's (role.smm).
    """
    if not st.mmio:
        return []
    vm = vg.vm
    masks = k.spte_masks(vm)
    gens = k.vm_reader.memslots_generation(vm)
    slots = Slots(vm.memslots)
    user = k.vm_reader.user_memslots()
    fmt = k.spte_format
    out: list[Finding] = []
    for sp, i, value in st.mmio:
        if sp.addr in dead:
            continue
        as_id = as_id_of(sp)
        gen = gens.get(as_id)
        if gen is None or not spte.check_mmio_spte(value, gen, masks.layout):
            continue
        gfn = spte.decode_bits(value, sp.level, fmt, masks).mmio_gfn
        if gfn is None:
            continue
        slot = slots.find(as_id, gfn)
        if slot is None or slot.flags & KVM_MEMSLOT_INVALID:
            continue
        if sp.role.get("guest_mode") and slot.id >= user:
            continue
        parent, at = parent_of(vg, sp, dead)
        gen_now = gen & spte.mmio_spte_gen_mask(masks.layout)
        out.append(Finding(
            FindingKind.MMIO_OVER_RAM, Severity.ERROR,
            [sp.addr] + ([parent.addr] if parent is not None else []),
            f"{place(sp, parent, at)}: spt[{i}] = {spte_text(value)} is an MMIO SPTE for gfn "
            f"{gfn:#x} of the current memslot generation ({gen_now:#x}, "
            f"check_mmio_spte() trusts it) but memslot {slot.id} (address space {as_id}) "
            f"maps that gfn: the guest's accesses there are emulated as MMIO"))
    return capped(out, FindingKind.MMIO_OVER_RAM, "MMIO SPTEs over memslot pages")


def check_leaf_memslots(vg: VMGraph, st: AuditState, dead: set[int], bad: set[int]
                        ) -> list[Finding]:
    """Every present leaf SPTE maps a gfn a memslot of its address space holds
    (the whole range, for a large one: a huge page never crosses a memslot's
    edge, kvm_mmu_max_mapping_level / lpage_info).

    The fault path maps only pages of a memslot (kvm_faultin_pfn: no memslot, no
    pfn: an MMIO SPTE or an exit instead), and a memslot's SPTEs are zapped while
    it is marked KVM_MEMSLOT_INVALID, before it leaves the memslots
    (kvm_invalidate_memslot -> kvm_arch_flush_shadow_memslot: kvm_mmu_zap_all_fast
    or the memslot's own zap). Exempt: the leaves of obsolete pages and those under
    them (dead_pages: a fast zap leaves them until kvm_zap_obsolete_pages or the
    zap of the invalid TDP MMU roots reaches them), of pages the two checks above
    found wrong (*bad*: a direct page's leaves' gfns derive from its gfn, and the
    address space from its role.smm), and leaves whose gfn could not be read
    (counted by the leaf-pfn check).
    """
    import numpy as np

    slots = Slots(vg.vm.memslots)
    out: list[Finding] = []
    skip = dead | bad
    find = slots.find
    cols = st.columns()
    # the leaves no memslot holds whole, found for all at once: the memslot whose
    # base_gfn is the last at or below the gfn (Slots.find) must reach past its span
    gfns, as_ids, levels = cols.gfn, cols.as_id, cols.level
    span = np.uint64(1) << (np.uint64(SPTE_LEVEL_BITS) * (levels - 1).astype(np.uint64))
    outside = cols.has_gfn.copy()
    for as_id in np.unique(as_ids).tolist():
        mine = np.flatnonzero(as_ids == as_id)
        held = slots.slots.get(as_id, [])
        if not held:
            continue
        bases = np.array([x.base_gfn for x in held], dtype=np.uint64)
        ends = np.array([x.base_gfn + x.npages for x in held], dtype=np.uint64)
        i = np.searchsorted(bases, gfns[mine], side="right") - 1  # bisect_right - 1
        inside = (i >= 0) & (gfns[mine] + span[mine] <= ends[np.maximum(i, 0)])
        outside[mine[inside]] = False
    for j in np.flatnonzero(outside).tolist():
        leaf = cols[j]
        sp, gfn = leaf.sp, leaf.gfn
        if gfn is None or sp.addr in skip:
            continue
        as_id, level = leaf.as_id, sp.level
        span_ = 1 if level == 1 else 1 << (SPTE_LEVEL_BITS * (level - 1))
        parent, at = parent_of(vg, sp, dead)
        s = find(as_id, gfn)
        what = (f"gfn {gfn:#x}, which no memslot of address space {as_id} holds"
                if s is None and span_ == 1 else
                f"gfns {gfn:#x}-{gfn + span_ - 1:#x}, the first of which no memslot of "
                f"address space {as_id} holds" if s is None else
                f"gfns {gfn:#x}-{gfn + span_ - 1:#x}, past the end of memslot {s.id} "
                f"(gfn {s.base_gfn + s.npages:#x}) of address space {as_id}")
        out.append(Finding(
            FindingKind.LEAF_NO_MEMSLOT, Severity.ERROR,
            [sp.addr] + ([parent.addr] if parent is not None else []),
            f"{place(sp, parent, at)}: spt[{leaf.index}] = {spte_text(leaf.value)} is a present "
            f"leaf mapping {what}"))
    return capped(out, FindingKind.LEAF_NO_MEMSLOT, "leaf SPTEs outside every memslot")


# -- all of it ----------------------------------------------------------------------


def check_invariants(k: Kernel, vg: VMGraph, st: AuditState) -> list[Finding]:
    """The four invariants of one VM, on what the graph and collect() read."""
    dead = dead_pages(vg)
    parents = parent_links(vg, dead)
    # a child of the wrong level is never a parent to check (check_child_roles)
    bad = {c for pairs in vg.wrong_level.values() for _, c in pairs}
    roles = check_child_roles(vg, parents, dead, bad)
    gfns = check_child_gfns(vg, parents, dead, bad)
    return [
        *roles,
        *gfns,
        *check_mmio_sptes(k, vg, st, dead | bad),
        *check_leaf_memslots(vg, st, dead, bad),
    ]
