"""Offline replay of KVM's shadow-MMU unsync walk (arch/x86/kvm/mmu/mmu.c), drgn-free.

``replay_sync(root, pages)`` replays ``mmu_sync_children(vcpu, root)`` and
``replay_zap(root, pages)`` replays ``mmu_zap_unsync_children(kvm, root)`` on a
snapshot of struct kvm_mmu_page objects, in the kernel's exact order:

    while (mmu_unsync_walk(parent, &pages)) {        # one Batch per iteration
            for_each_sp(pages, sp, parents, i) {     # one Leaf per level-1 entry
                    kvm_unlink_unsync_page(kvm, sp); # sp->unsync = 0
                    kvm_sync_page(...) / kvm_mmu_prepare_zap_page(...);
                    mmu_pages_clear_parents(&parents);
            }
    }

The walk code (mmu_pages_add, clear_unsync_child_bit, __mmu_unsync_walk,
mmu_unsync_walk, mmu_pages_next, mmu_pages_first, mmu_pages_clear_parents and
the loops of mmu_sync_children / mmu_zap_unsync_children) is the same in
Debian's 6.1.192 and 6.12.117 apart from WARN_ON -> WARN_ON_ONCE and
``to_shadow_page(ent & SPTE_BASE_ADDR_MASK)`` -> ``spte_to_child_sp(ent)``,
which compute the same thing.

The replay works on a private copy of ``unsync``, ``unsync_children`` and
``unsync_child_bitmap``; the input mappings and WalkPage objects are never
modified. Leaves are assumed to sync cleanly: kvm_sync_page() builds SPTEs
with can_unsync = false, so mmu_try_to_unsync_pages() returns -EPERM before
it could mark anything unsync, and syncing never sets a bitmap bit (a failed
sync zaps the leaf, which only clears its parent SPTEs).

The input comes from crash dumps and may be corrupt: no exception escapes,
every walk is bounded (levels strictly decrease, KVM_PAGE_ARRAY_NR entries per
batch, ``max_batches`` batches, and a batch that changes nothing stops the
loop), and each problem becomes a one-line message in ``Replay.errors``
naming the page's address. Where the kernel would follow a bad pointer the
replay skips the object instead (leaving its bit set) and carries on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from kvminspect.fmt import hx
from kvminspect.spte import PG_LEVEL_4K, SPTE_ENT_PER_PAGE  # bits of unsync_child_bitmap

KVM_PAGE_ARRAY_NR = 16  # entries in struct kvm_mmu_pages
INVALID_INDEX = -1  # idx of the first kvm_mmu_pages entry (the walk's root)
PT64_ROOT_MAX_LEVEL = 5  # entries in struct mmu_page_path
ENOSPC = 28  # mmu_unsync_walk() returns -ENOSPC when kvm_mmu_pages fills up
_BITMAP_LIMIT = 1 << SPTE_ENT_PER_PAGE
_U32 = 0xFFFFFFFF  # unsync_children is an unsigned int


class _Skip:
    """Marker: a slot the replay cannot use; its bit is left alone."""


SKIP = _Skip()


@dataclass(frozen=True)
class Slot:
    """What the walk needs from ``sp->spt[i]``."""

    # bit 11 since 5.13, "KVM: x86/mmu: Use a dedicated bit to track shadow/MMU-present
    # SPTEs" (edea7c4fc215)
    present: bool  # is_shadow_present_pte(): bit 11 (SPTE_MMU_PRESENT_MASK) in 6.1 and 6.12
    large: bool  # is_large_pte(): bit 7
    child: int | None  # spte_to_child_sp(): the child struct kvm_mmu_page (None: unresolvable)


@dataclass
class WalkPage:
    """A snapshot of one struct kvm_mmu_page: the fields the unsync walk reads."""

    sp: int  # kernel address of the struct kvm_mmu_page
    level: int  # role.level
    gfn: int
    unsync: bool
    unsync_children: int
    bitmap: int  # unsync_child_bitmap as a 512-bit int, bit i = slot i
    slots: Mapping[int, Slot]  # spt[i] for the set bits; a missing index is not present


@dataclass
class Entry:
    """One ``kvm_mmu_pages.page[]`` entry: a page and its slot in its parent."""

    sp: int
    level: int
    idx: int  # INVALID_INDEX (-1) for the first entry, the walk's root


@dataclass
class Leaf:
    """One page visited by for_each_sp(): an unsync level-1 page being synced (or zapped)."""

    sp: int
    gfn: int
    # (mmu_page_path.parent[k], k + 2) for k = 0.. up to the NULL sentinel: the
    # level-2 parent first, the walk's root last.
    parents: list[tuple[int, int]]
    # mmu_page_path.idx[k] for the same k: idx[0] is the leaf's slot in parents[0],
    # idx[k] the slot of parents[k - 1] in parents[k].
    idx: list[int] = field(default_factory=list)
    # its position in the batch's kvm_mmu_pages vector (pages->page[pos]): what the
    # systemtap script prints as "Current sp : [pos]addr"; -1 when not known
    pos: int = -1


@dataclass
class Batch:
    """One iteration of the sync/zap loop: what mmu_unsync_walk() put in kvm_mmu_pages."""

    pages: list[Entry]
    leaves: list[Leaf]
    ret: int = 0  # mmu_unsync_walk()'s result: unsync leaves counted, or -ENOSPC


@dataclass
class Replay:
    """The result of replay_sync() / replay_zap()."""

    root: int
    batches: list[Batch]
    errors: list[str]
    truncated: bool = False  # stopped by max_batches or by a batch that changed nothing
    # the replay's copy of every page it read, as it stands after the loop
    final: dict[int, WalkPage] = field(default_factory=dict)


def _is_int(value: object) -> TypeGuard[int]:
    """True for a real integer (bool is not one here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def find_next_bit(bitmap: int, start: int, size: int = SPTE_ENT_PER_PAGE) -> int:
    """find_next_bit(): the first set bit at or after *start*, or *size* if none."""
    if start >= size:
        return size
    rest = bitmap >> start
    if rest == 0:
        return size
    bit = start + (rest & -rest).bit_length() - 1
    return bit if bit < size else size


@dataclass
class _State:
    """The replay's private, mutable copy of one page's unsync fields."""

    level: int
    gfn: int
    unsync: bool
    unsync_children: int
    bitmap: int
    slots: Mapping[int, Slot]


class Walker:
    """The kernel's unsync machinery, applied to copies of a page snapshot."""

    def __init__(self, pages: Mapping[int, WalkPage], zap: bool) -> None:
        self.pages = pages
        self.zap = zap
        self.errors: list[str] = []
        self._seen: set[str] = set()
        self.state: dict[int, _State] = {}
        self.bad: set[int] = set()
        self.zapped: set[int] = set()
        self.mutations = 0
        self.on_path: list[int] = []
        # struct mmu_page_path, a local of mmu_sync_children() kept across batches
        self.parent: list[int | None] = [None] * PT64_ROOT_MAX_LEVEL
        self.idx: list[int | None] = [None] * PT64_ROOT_MAX_LEVEL

    # -- bookkeeping ------------------------------------------------------------------

    def error(self, message: str) -> None:
        """Record one error line, once."""
        if message not in self._seen:
            self._seen.add(message)
            self.errors.append(message)

    def page(self, sp: object, via: str = "") -> _State | None:
        """The private copy of page *sp*, made and validated on first use; None if unusable."""
        if _is_int(sp) and sp in self.state:
            return self.state[sp]
        where = f" ({via})" if via else ""
        if not _is_int(sp):
            self.error(f"sp {hx(sp)}{where}: page address is not an integer")
            return None
        if sp in self.bad:
            return None
        try:
            src = self.pages.get(sp)
        except Exception as exc:  # a broken mapping must not stop the replay
            src = None
            self.error(f"sp {sp:#x}{where}: lookup failed: {exc!r}")
        if src is None:
            self.bad.add(sp)
            self.error(f"sp {sp:#x}{where}: not in the page snapshot")
            return None
        try:
            state = self._validate(sp, src, where)
        except Exception as exc:  # e.g. a field whose comparison raises
            state = None
            self.error(f"sp {sp:#x}{where}: unusable snapshot: {exc!r}; page skipped")
        if state is None:
            self.bad.add(sp)
            return None
        self.state[sp] = state
        return state

    def _validate(self, sp: int, src: Any, where: str) -> _State | None:
        """Check one snapshot against what a struct kvm_mmu_page can hold (*src*
        is whatever the mapping held: validated here, never trusted)."""
        name = f"sp {sp:#x}{where}"
        try:
            addr = src.sp
            level = src.level
            gfn = src.gfn
            unsync = bool(src.unsync)
            children = src.unsync_children
            bitmap = src.bitmap
            slots = src.slots
        except Exception as exc:
            self.error(f"{name}: unreadable snapshot: {exc!r}")
            return None
        problems = []
        if addr != sp:
            problems.append(f"snapshot is keyed {sp:#x} but says sp={hx(addr)}")
        if not _is_int(level) or not 1 <= level <= PT64_ROOT_MAX_LEVEL:
            problems.append(f"role.level {level!r} is not 1..{PT64_ROOT_MAX_LEVEL}")
        if not _is_int(children) or not 0 <= children <= SPTE_ENT_PER_PAGE:
            problems.append(f"unsync_children {children!r} is not 0..{SPTE_ENT_PER_PAGE}")
        if not _is_int(bitmap) or not 0 <= bitmap < _BITMAP_LIMIT:
            problems.append("unsync_child_bitmap is not a 512-bit value")
        if not isinstance(slots, Mapping):
            problems.append("slots is not a mapping")
        if problems:
            self.error(f"{name}: " + "; ".join(problems) + "; page skipped")
            return None
        if not _is_int(gfn):
            self.error(f"{name}: gfn {gfn!r} is not an integer; reported as -1")
        if bitmap.bit_count() != children:
            self.error(f"{name}: unsync_children {children} but {bitmap.bit_count()} "
                       "bits set in unsync_child_bitmap")
        return _State(level=level, gfn=gfn if _is_int(gfn) else -1, unsync=unsync,
                      unsync_children=children, bitmap=bitmap, slots=slots)

    def slot(self, sp: int, st: _State, i: int) -> Slot | None | _Skip:
        """``sp->spt[i]``: the Slot, None when absent (= not present), SKIP when unusable."""
        try:
            slot = st.slots.get(i)
        except Exception as exc:
            self.error(f"sp {sp:#x}: slot {i} unreadable: {exc!r}; skipped")
            return SKIP
        if slot is None:
            self.error(f"sp {sp:#x}: unsync_child_bitmap bit {i} set but slot {i} absent "
                       "from the snapshot; treated as not present")
            return None
        try:
            present, large, child = bool(slot.present), bool(slot.large), slot.child
        except Exception as exc:
            self.error(f"sp {sp:#x}: slot {i} malformed: {exc!r}; skipped")
            return SKIP
        if child is not None and not _is_int(child):
            self.error(f"sp {sp:#x}: slot {i} child {child!r} is not an address; skipped")
            return SKIP
        return Slot(present, large, child)

    # -- the kernel's helpers -----------------------------------------------------------

    def clear_unsync_child_bit(self, sp: int, idx: int) -> None:
        """clear_unsync_child_bit(): --sp->unsync_children and clear bit *idx*."""
        st = self.state[sp]
        st.unsync_children -= 1
        if st.unsync_children < 0:
            self.error(f"sp {sp:#x}: unsync_children underflows clearing bit {idx} "
                       "(the kernel WARNs and wraps to 0xffffffff)")
        st.bitmap &= ~(1 << idx)
        self.mutations += 1

    def mmu_pages_add(self, pvec: list[tuple[int, int]], sp: int, idx: int) -> bool:
        """mmu_pages_add(): append (sp, idx) unless sp is unsync and listed; True when full."""
        if self.state[sp].unsync:
            for other, _ in pvec:
                if other == sp:
                    return False
        pvec.append((sp, idx))
        return len(pvec) == KVM_PAGE_ARRAY_NR

    def child_of(self, sp: int, st: _State, i: int, slot: Slot) -> int | None:
        """spte_to_child_sp() with the checks the kernel does not make; None to skip."""
        child = slot.child
        if child is None:
            self.error(f"sp {sp:#x}: slot {i} is a present non-leaf SPTE but its child "
                       "page is unresolvable; skipped")
            return None
        if child in self.on_path:
            self.error(f"sp {sp:#x}: slot {i} points back up the walk's path to "
                       f"sp {hx(child)}; skipped")
            return None
        cst = self.page(child, via=f"child of sp {sp:#x} slot {i}")
        if cst is None:
            return None
        if cst.level != st.level - 1:
            self.error(f"sp {child:#x}: level {cst.level} but it is the child of level-"
                       f"{st.level} sp {sp:#x} at slot {i}; skipped")
            return None
        return child

    def _mmu_unsync_walk(self, sp: int, pvec: list[tuple[int, int]]) -> int:
        """__mmu_unsync_walk(): collect sp's unsync descendants into pvec, depth first."""
        st = self.state[sp]
        nr_unsync_leaf = 0
        i = find_next_bit(st.bitmap, 0)
        while i < SPTE_ENT_PER_PAGE:  # for_each_set_bit() re-reads the bitmap each step
            ret = self._walk_slot(sp, st, i, pvec)
            if ret < 0:
                return ret
            nr_unsync_leaf += ret
            i = find_next_bit(st.bitmap, i + 1)
        return nr_unsync_leaf

    def _walk_slot(self, sp: int, st: _State, i: int, pvec: list[tuple[int, int]]) -> int:
        """The body of __mmu_unsync_walk()'s loop for bit *i*: leaves counted, or -ENOSPC."""
        slot = self.slot(sp, st, i)
        if isinstance(slot, _Skip):
            return 0
        if (slot is None or not slot.present or slot.large
                or (self.zap and slot.child in self.zapped)):
            # !is_shadow_present_pte(ent) || is_large_pte(ent); a zapped leaf's parent
            # SPTEs were dropped by kvm_mmu_unlink_parents()
            self.clear_unsync_child_bit(sp, i)
            return 0
        child = self.child_of(sp, st, i, slot)
        if child is None:
            return 0
        cst = self.state[child]
        if cst.unsync_children:
            if cst.level == PG_LEVEL_4K:
                self.error(f"sp {child:#x}: level-1 page with unsync_children "
                           f"{cst.unsync_children}; skipped")
                return 0
            if self.mmu_pages_add(pvec, child, i):
                return -ENOSPC
            self.on_path.append(child)
            ret = self._mmu_unsync_walk(child, pvec)
            self.on_path.pop()
            if ret == 0:
                self.clear_unsync_child_bit(sp, i)
            return ret  # > 0 adds to nr_unsync_leaf, < 0 (-ENOSPC) unwinds
        if cst.unsync:
            if cst.level != PG_LEVEL_4K:
                self.error(f"sp {child:#x}: unsync but level {cst.level} (only level-1 "
                           "pages go unsync); skipped")
                return 0
            if self.mmu_pages_add(pvec, child, i):
                return -ENOSPC  # nr_unsync_leaf++ is moot: the caller returns -ENOSPC
            return 1
        self.clear_unsync_child_bit(sp, i)
        return 0

    def mmu_unsync_walk(self, sp: int, pvec: list[tuple[int, int]]) -> int:
        """mmu_unsync_walk(): empty pvec, add sp with INVALID_INDEX, walk it."""
        pvec.clear()
        if not self.state[sp].unsync_children:
            return 0
        self.mmu_pages_add(pvec, sp, INVALID_INDEX)
        self.on_path = [sp]
        return self._mmu_unsync_walk(sp, pvec)

    def mmu_pages_next(self, pvec: list[tuple[int, int]], i: int) -> int:
        """mmu_pages_next(): record parents up to the next level-1 entry; its index."""
        n = i + 1
        while n < len(pvec):
            sp, idx = pvec[n]
            level = self.state[sp].level
            self.idx[level - 1] = idx
            if level == PG_LEVEL_4K:
                break
            self.parent[level - 2] = sp
            n += 1
        return n

    def mmu_pages_first(self, pvec: list[tuple[int, int]]) -> int:
        """mmu_pages_first(): the root into mmu_page_path with a NULL sentinel above it."""
        if not pvec:
            return 0
        sp, _ = pvec[0]
        level = self.state[sp].level  # >= 2: replay_* never walks a level-1 root
        self.parent[level - 2] = sp
        self.parent[level - 1] = None  # sentinel; level <= 5 keeps it in parent[0..4]
        return self.mmu_pages_next(pvec, 0)

    def mmu_pages_clear_parents(self) -> None:
        """mmu_pages_clear_parents(): clear the path's bits upwards while counts reach 0."""
        level = 0
        while level < PT64_ROOT_MAX_LEVEL:
            idx = self.idx[level]
            sp = self.parent[level]
            if sp is None:
                return
            if idx is None or idx == INVALID_INDEX:
                self.error(f"sp {sp:#x}: mmu_page_path idx[{level}] is {idx!r}; "
                           "clear_parents stopped")
                return
            self.clear_unsync_child_bit(sp, idx)
            level += 1
            if self.state[sp].unsync_children:
                return

    def path_parents(self) -> tuple[list[tuple[int, int]], list[int]]:
        """mmu_page_path as it stands: (parent, level) and idx, up to the sentinel."""
        parents: list[tuple[int, int]] = []
        idxs: list[int] = []
        for k in range(PT64_ROOT_MAX_LEVEL):
            parent = self.parent[k]
            if parent is None:
                break
            parents.append((parent, k + 2))
            idx = self.idx[k]
            idxs.append(INVALID_INDEX if idx is None else idx)
        return parents, idxs

    def kvm_unlink_unsync_page(self, sp: int) -> None:
        """kvm_unlink_unsync_page(): sp->unsync = 0 (and, for a zap, drop its parent SPTEs)."""
        self.state[sp].unsync = False
        if self.zap:
            self.zapped.add(sp)  # kvm_mmu_unlink_parents() in __kvm_mmu_prepare_zap_page()
        self.mutations += 1

    def for_each_sp(self, pvec: list[tuple[int, int]], batch: Batch) -> None:
        """The second for_each_sp() loop of mmu_sync_children() / mmu_zap_unsync_children()."""
        i = self.mmu_pages_first(pvec)
        while i < len(pvec):
            sp, _ = pvec[i]
            parents, idxs = self.path_parents()
            batch.leaves.append(Leaf(sp=sp, gfn=self.state[sp].gfn, parents=parents, idx=idxs,
                                     pos=i))
            self.kvm_unlink_unsync_page(sp)
            self.mmu_pages_clear_parents()
            i = self.mmu_pages_next(pvec, i)

    def snapshot(self) -> dict[int, WalkPage]:
        """The private copies as new WalkPage objects (unsync_children as the u32 it is)."""
        return {
            sp: WalkPage(sp=sp, level=st.level, gfn=st.gfn, unsync=st.unsync,
                         unsync_children=st.unsync_children & _U32, bitmap=st.bitmap,
                         slots=st.slots)
            for sp, st in self.state.items()
        }


def _replay(root: int, pages: Mapping[int, WalkPage], zap: bool, max_batches: int) -> Replay:
    """The loop shared by mmu_sync_children() and mmu_zap_unsync_children()."""
    walker = Walker(pages, zap)
    replay = Replay(root=root, batches=[], errors=walker.errors)
    try:
        if not _is_int(max_batches) or max_batches < 0:
            walker.error(f"sp {hx(root)}: max_batches {max_batches!r} invalid; using 10000")
            max_batches = 10_000
        if not isinstance(pages, Mapping):
            walker.error(f"sp {hx(root)}: page snapshot is not a mapping")
            return replay
        st = walker.page(root, via="root")
        if st is None:
            return replay
        if st.level == PG_LEVEL_4K:
            if zap:  # mmu_zap_unsync_children(): "if (parent->role.level == PG_LEVEL_4K)"
                return replay
            if st.unsync_children:
                walker.error(f"sp {root:#x}: level-1 root with unsync_children "
                             f"{st.unsync_children}; not walked")
                return replay
        pvec: list[tuple[int, int]] = []
        while True:
            before = walker.mutations
            ret = walker.mmu_unsync_walk(root, pvec)
            if ret == 0:
                break
            if len(replay.batches) >= max_batches:
                walker.error(f"sp {root:#x}: stopped after max_batches={max_batches} batches")
                replay.truncated = True
                break
            batch = Batch(pages=[Entry(sp, walker.state[sp].level, idx) for sp, idx in pvec],
                          leaves=[], ret=ret)
            replay.batches.append(batch)
            walker.for_each_sp(pvec, batch)
            if walker.mutations == before:
                walker.error(f"sp {root:#x}: batch {len(replay.batches)} changed nothing; "
                             "the kernel would loop forever here, replay stopped")
                replay.truncated = True
                break
    except Exception as exc:  # belt and braces: corrupt input must never raise
        walker.error(f"sp {hx(root)}: replay aborted by an internal error: {exc!r}")
        replay.truncated = True
    try:
        replay.final = walker.snapshot()
    except Exception as exc:
        walker.error(f"sp {hx(root)}: final snapshot failed: {exc!r}")
    return replay


def replay_sync(root: int, pages: Mapping[int, WalkPage], *,
                max_batches: int = 10_000) -> Replay:
    """Replay mmu_sync_children(vcpu, root) on a copy of *pages*.

    Each ``while (mmu_unsync_walk(root, &pages))`` iteration becomes one Batch holding
    the kvm_mmu_pages entries in order; each level-1 entry visited by for_each_sp()
    becomes a Leaf with mmu_page_path as it stood, after which the leaf is marked
    synced (kvm_unlink_unsync_page) and mmu_pages_clear_parents() runs.
    """
    return _replay(root, pages, zap=False, max_batches=max_batches)


def replay_zap(root: int, pages: Mapping[int, WalkPage], *,
               max_batches: int = 10_000) -> Replay:
    """Replay mmu_zap_unsync_children(kvm, root) on a copy of *pages*.

    Same loop as replay_sync() except that a level-1 root returns at once, and each
    zapped leaf's parent SPTEs become non-present (kvm_mmu_unlink_parents), so a later
    walk clears a bit that still points at it through the not-present branch. The
    batches and bitmaps come out the same as for a sync.
    """
    return _replay(root, pages, zap=True, max_batches=max_batches)
