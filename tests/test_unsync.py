"""Tests for kvminspect.unsync: the offline replay of KVM's unsync walk.

The reference test (test_reference_*) spells out, by hand from
arch/x86/kvm/mmu/mmu.c (Debian 6.1.192 and 6.12.117, identical here), what
mmu_sync_children() does to a small hierarchy. The rest covers the walk's
edge cases, corrupt input, and random hierarchies with hypothesis.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvminspect import unsync
from kvminspect.unsync import (
    ENOSPC,
    INVALID_INDEX,
    KVM_PAGE_ARRAY_NR,
    Entry,
    Replay,
    Slot,
    WalkPage,
    find_next_bit,
    replay_sync,
    replay_zap,
)

BASE = 0xFFFF888100000000  # a plausible direct-map address for struct kvm_mmu_page


def bits(*idx: int) -> int:
    """An unsync_child_bitmap with the given bits set."""
    return sum(1 << i for i in set(idx))


def mk(sp: int, level: int, children: Mapping[int, int | Slot] | None = None, *,
       set_bits: list[int] | None = None, unsync: bool = False, gfn: int | None = None,
       uc: int | None = None) -> WalkPage:
    """A WalkPage; *children* maps slot -> child sp (a present, non-large SPTE) or a Slot.

    By default every slot's bit is set and unsync_children is the number of set bits.
    """
    slots = {i: c if isinstance(c, Slot) else Slot(True, False, c)
             for i, c in (children or {}).items()}
    on = sorted(slots) if set_bits is None else set_bits
    return WalkPage(sp=sp, level=level, gfn=(sp >> 12) & 0xFFFF if gfn is None else gfn,
                    unsync=unsync, unsync_children=len(set(on)) if uc is None else uc,
                    bitmap=bits(*on), slots=slots)


def leaf(sp: int, gfn: int, unsync: bool = True) -> WalkPage:
    """A level-1 shadow page (unsync by default)."""
    return mk(sp, 1, unsync=unsync, gfn=gfn)


def entries(batch) -> list[tuple[int, int, int]]:
    """A batch's kvm_mmu_pages entries as (sp, level, idx) tuples."""
    return [(e.sp, e.level, e.idx) for e in batch.pages]


def leaf_rows(batch) -> list[tuple[int, int, list[tuple[int, int]], list[int]]]:
    """A batch's leaves as (sp, gfn, parents, idx) tuples."""
    return [(lf.sp, lf.gfn, lf.parents, lf.idx) for lf in batch.leaves]


def pages_of(*ps: WalkPage) -> dict[int, WalkPage]:
    """The snapshot mapping keyed by sp."""
    return {p.sp: p for p in ps}


# ---------------------------------------------------------------------------------------
# 1. The reference example, worked by hand from the kernel source
# ---------------------------------------------------------------------------------------

R, A, B, C, D = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
B_SLOTS = [3, 17, 40, 41, 42, 100, 101, 150, 200, 201, 202, 250, 300,  # L0..L12
           301, 350, 400, 401, 450, 500, 511]                          # L13..L19
L = [0x10000 + k * 0x100 for k in range(20)]  # L[k] sits at B slot B_SLOTS[k], gfn 0x1000 + k
M0, M1 = 0x20000, 0x20100  # under D, slots 0 and 1, gfn 0x2000 / 0x2001


def reference_pages() -> dict[int, WalkPage]:
    """root R (level 4) -> A (level 3, R slot 5) -> B (level 2, A slot 7) -> 20 unsync leaves;
    second branch R slot 9 -> C (level 3) -> D (level 2, C slot 2) -> leaves M0 (0), M1 (1).
    Bitmaps and counters are what mark_unsync() would have left: one bit per unsync child."""
    ps = [mk(R, 4, {5: A, 9: C}), mk(A, 3, {7: B}), mk(B, 2, dict(zip(B_SLOTS, L, strict=True))),
          mk(C, 3, {2: D}), mk(D, 2, {0: M0, 1: M1}),
          leaf(M0, 0x2000), leaf(M1, 0x2001)]
    ps += [leaf(sp, 0x1000 + k) for k, sp in enumerate(L)]
    return pages_of(*ps)


# Walk 1 (mmu_unsync_walk(R)): pvec.nr = 0; R.unsync_children = 2 != 0, so
# mmu_pages_add(R, INVALID_INDEX) -> entry 1.  __mmu_unsync_walk(R) visits R's set bits in
# ascending order: bit 5 -> A has unsync_children, so mmu_pages_add(A, 5) -> entry 2 and
# recurse; A bit 7 -> B has unsync_children: mmu_pages_add(B, 7) -> entry 3, recurse; B's
# bits are unsync level-1 children: nr_unsync_leaf++ and mmu_pages_add(L[k], slot), L[k]
# becoming entry 4 + k.  mmu_pages_add returns nr == KVM_PAGE_ARRAY_NR (16) when adding
# L[12] (slot 300), so B's walk returns -ENOSPC, A's and R's pass it up ("else return ret"),
# and R bit 9 (branch C) is not looked at.  No bit was cleared during the walk.
BATCH1 = [
    (R, 4, -1), (A, 3, 5), (B, 2, 7),
    (0x10000, 1, 3), (0x10100, 1, 17), (0x10200, 1, 40), (0x10300, 1, 41), (0x10400, 1, 42),
    (0x10500, 1, 100), (0x10600, 1, 101), (0x10700, 1, 150), (0x10800, 1, 200), (0x10900, 1, 201),
    (0x10a00, 1, 202), (0x10b00, 1, 250), (0x10c00, 1, 300),
]
# for_each_sp: mmu_pages_first sets parent[2] = R and the sentinel parent[3] = NULL; then
# mmu_pages_next: A (level 3): idx[2] = 5, parent[1] = A; B (level 2): idx[1] = 7,
# parent[0] = B; L[0]: idx[0] = 3, stop -> visit.  Each leaf's path is therefore
# [(B, 2), (A, 3), (R, 4)] with idx [slot, 7, 5].  kvm_unlink_unsync_page clears
# L[k]->unsync and mmu_pages_clear_parents clears B's bit for the slot: B.unsync_children
# goes 20 -> 19 ... -> 7, never 0, so A and R are not touched.
PATH_B = [(B, 2), (A, 3), (R, 4)]  # (mmu_page_path.parent[k], k + 2)
BATCH1_LEAVES = [
    (0x10000, 0x1000, PATH_B, [3, 7, 5]),
    (0x10100, 0x1001, PATH_B, [17, 7, 5]),
    (0x10200, 0x1002, PATH_B, [40, 7, 5]),
    (0x10300, 0x1003, PATH_B, [41, 7, 5]),
    (0x10400, 0x1004, PATH_B, [42, 7, 5]),
    (0x10500, 0x1005, PATH_B, [100, 7, 5]),
    (0x10600, 0x1006, PATH_B, [101, 7, 5]),
    (0x10700, 0x1007, PATH_B, [150, 7, 5]),
    (0x10800, 0x1008, PATH_B, [200, 7, 5]),
    (0x10900, 0x1009, PATH_B, [201, 7, 5]),
    (0x10a00, 0x100a, PATH_B, [202, 7, 5]),
    (0x10b00, 0x100b, PATH_B, [250, 7, 5]),
    (0x10c00, 0x100c, PATH_B, [300, 7, 5]),
]
# Walk 2: the loop calls mmu_unsync_walk(R) again: pvec.nr = 0, R (unsync_children still 2)
# re-added with idx -1.  R bit 5 -> A (1) -> entry 2, A bit 7 -> B (7) -> entry 3; B's
# remaining bits 301..511 are L[13..19] -> entries 4..10; B returns 7, A returns 7 (n += 7).
# R bit 9 -> C (1) -> entry 11, C bit 2 -> D (2) -> entry 12, D bits 0 and 1 -> M0, M1 ->
# entries 13, 14; D returns 2, C returns 2.  R returns 7 + 2 = 9 (nonzero: loop body runs).
BATCH2 = [
    (R, 4, -1), (A, 3, 5), (B, 2, 7),
    (0x10d00, 1, 301), (0x10e00, 1, 350), (0x10f00, 1, 400), (0x11000, 1, 401), (0x11100, 1, 450),
    (0x11200, 1, 500), (0x11300, 1, 511),
    (C, 3, 9), (D, 2, 2), (M0, 1, 0), (M1, 1, 1),
]
# for_each_sp: L[13..18] clear B's bits (7 -> 1).  L[19] (slot 511) takes B to 0, so
# clear_parents goes up: A bit 7 (A: 1 -> 0), then R bit 5 (R: 2 -> 1) and stops.  Next entry
# C (level 3): idx[2] = 9, parent[1] = C; D: idx[1] = 2, parent[0] = D; M0: idx[0] = 0 ->
# visit with path [(D, 2), (C, 3), (R, 4)]; D bit 0 (2 -> 1).  M1: D bit 1 (-> 0), C bit 2
# (-> 0), R bit 9 (-> 0), then parent[3] is the NULL sentinel: return.
PATH_D = [(D, 2), (C, 3), (R, 4)]
BATCH2_LEAVES = [
    (0x10d00, 0x100d, PATH_B, [301, 7, 5]),
    (0x10e00, 0x100e, PATH_B, [350, 7, 5]),
    (0x10f00, 0x100f, PATH_B, [400, 7, 5]),
    (0x11000, 0x1010, PATH_B, [401, 7, 5]),
    (0x11100, 0x1011, PATH_B, [450, 7, 5]),
    (0x11200, 0x1012, PATH_B, [500, 7, 5]),
    (0x11300, 0x1013, PATH_B, [511, 7, 5]),
    (M0, 0x2000, PATH_D, [0, 2, 9]),
    (M1, 0x2001, PATH_D, [1, 2, 9]),
]
# Walk 3: R.unsync_children == 0 -> mmu_unsync_walk returns 0 and the loop ends.


def test_reference_batches() -> None:
    """The exact kvm_mmu_pages contents and mmu_page_path of each leaf, batch by batch."""
    pages = reference_pages()
    result = replay_sync(R, pages)
    assert result.errors == []
    assert not result.truncated
    assert len(result.batches) == 2
    b1, b2 = result.batches
    assert entries(b1) == BATCH1
    assert len(b1.pages) == KVM_PAGE_ARRAY_NR
    assert b1.ret == -ENOSPC
    assert leaf_rows(b1) == BATCH1_LEAVES
    assert entries(b2) == BATCH2
    assert b2.ret == 9
    assert leaf_rows(b2) == BATCH2_LEAVES


def test_reference_final_state() -> None:
    """After the loop every counter and bitmap is 0 and every leaf is synced."""
    result = replay_sync(R, reference_pages())
    for sp in (R, A, B, C, D):
        assert (result.final[sp].unsync_children, result.final[sp].bitmap) == (0, 0)
    assert not any(result.final[sp].unsync for sp in L + [M0, M1])


def test_reference_state_after_first_batch() -> None:
    """max_batches=1: the state after batch 1 (B 20 -> 7 with bits 301..511 left)."""
    result = replay_sync(R, reference_pages(), max_batches=1)
    assert result.truncated
    assert [entries(b) for b in result.batches] == [BATCH1]
    assert any("max_batches" in e for e in result.errors)
    f = result.final
    assert (f[B].unsync_children, f[B].bitmap) == (7, bits(*B_SLOTS[13:]))
    assert (f[A].unsync_children, f[A].bitmap) == (1, bits(7))
    assert (f[R].unsync_children, f[R].bitmap) == (2, bits(5, 9))
    assert [f[sp].unsync for sp in L] == [False] * 13 + [True] * 7


def test_reference_zap_is_the_same_walk() -> None:
    """mmu_zap_unsync_children() runs the same loop, so the same batches come out."""
    pages = reference_pages()
    assert replay_zap(R, pages).batches == replay_sync(R, pages).batches


def test_reference_input_untouched() -> None:
    """The replay works on copies."""
    pages = reference_pages()
    before = copy.deepcopy(pages)
    replay_sync(R, pages)
    replay_zap(R, pages)
    assert pages == before


# ---------------------------------------------------------------------------------------
# 2. Edge cases
# ---------------------------------------------------------------------------------------

def test_root_without_unsync_children() -> None:
    """mmu_unsync_walk() returns 0 at once: no batch, even with a stale bitmap."""
    pages = pages_of(mk(R, 4, {3: A}, uc=0), mk(A, 3))
    result = replay_sync(R, pages)
    assert result.batches == []
    assert not result.truncated
    assert result.final[R].bitmap == bits(3)  # never walked, so never cleared
    clean = replay_sync(R, pages_of(mk(R, 4)))
    assert (clean.batches, clean.errors) == ([], [])


def test_large_and_not_present_sptes_clear_their_bit() -> None:
    """!is_shadow_present_pte || is_large_pte: clear_unsync_child_bit, no leaf."""
    x, y = 0x6000, 0x7000
    pages = pages_of(mk(R, 2, {1: Slot(True, True, y), 2: Slot(False, False, None), 3: x}),
                     leaf(x, 0x42), leaf(y, 0x43))
    result = replay_sync(R, pages)
    assert result.errors == []
    assert [entries(b) for b in result.batches] == [[(R, 2, -1), (x, 1, 3)]]
    assert leaf_rows(result.batches[0]) == [(x, 0x42, [(R, 2)], [3])]
    assert result.batches[0].ret == 1
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)
    assert y not in result.final  # the large SPTE's target is never even looked at


def test_only_stale_bits_give_no_batch_but_are_cleared() -> None:
    """A walk that finds no leaf returns 0: no batch, yet the bits it passed are cleared."""
    pages = pages_of(mk(R, 2, {1: Slot(True, True, None), 2: Slot(False, False, None)}))
    result = replay_sync(R, pages)
    assert (result.batches, result.errors) == ([], [])
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)


def test_leaf_reachable_twice_from_one_parent() -> None:
    """mmu_pages_add skips an unsync page already listed, but the walk still counts it."""
    x = 0x6000
    pages = pages_of(mk(R, 2, {4: x, 9: x}), leaf(x, 0x42))
    result = replay_sync(R, pages)
    assert result.errors == []
    # walk 1: bit 4 -> x added; bit 9 -> x unsync, already listed, nr_unsync_leaf = 2.
    # for_each_sp clears R bit 4 only (R: 2 -> 1).  Walk 2: bit 9 -> x is synced and has
    # no unsync_children -> clear_unsync_child_bit; the walk returns 0: no second batch.
    assert [entries(b) for b in result.batches] == [[(R, 2, -1), (x, 1, 4)]]
    assert result.batches[0].ret == 2
    assert leaf_rows(result.batches[0]) == [(x, 0x42, [(R, 2)], [4])]
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)
    assert replay_zap(R, pages).batches == result.batches


def test_leaf_shared_by_two_level2_parents() -> None:
    """Dedup across parents: the second parent stays listed, with no leaf after it."""
    p, q, x, y = 0x6000, 0x7000, 0x8000, 0x9000
    pages = pages_of(mk(R, 3, {1: p, 2: q}), mk(p, 2, {0: x, 1: y}), mk(q, 2, {5: x}),
                     leaf(x, 0x42), leaf(y, 0x43))
    result = replay_sync(R, pages)
    assert result.errors == []
    # walk 1: R(-1), p(1), x(0), y(1), q(2); q's bit 5 finds x listed (not re-added) but
    # counts it: ret = 2 + 1.  x clears p bit 0 (p: 2 -> 1); y clears p bit 1 (-> 0), then
    # R bit 1 (R: 2 -> 1).  q's entry only updates the path.  Walk 2: R bit 2 -> q (1) is
    # added, its bit 5 -> x synced -> cleared, q returns 0 -> R bit 2 cleared; returns 0.
    assert [entries(b) for b in result.batches] == [
        [(R, 3, -1), (p, 2, 1), (x, 1, 0), (y, 1, 1), (q, 2, 2)]]
    assert result.batches[0].ret == 3
    assert leaf_rows(result.batches[0]) == [(x, 0x42, [(p, 2), (R, 3)], [0, 1]),
                                            (y, 0x43, [(p, 2), (R, 3)], [1, 1])]
    for sp in (R, p, q):
        assert (result.final[sp].unsync_children, result.final[sp].bitmap) == (0, 0)
    assert replay_zap(R, pages).batches == result.batches


def test_level2_parent_with_only_synced_children() -> None:
    """__mmu_unsync_walk(p) returns 0: p's bits and then R's bit for p are cleared."""
    p, q, s0, s1, x = 0x6000, 0x7000, 0x8000, 0x9000, 0xA000
    pages = pages_of(mk(R, 3, {4: p, 6: q}), mk(p, 2, {0: s0, 1: s1}), mk(q, 2, {3: x}),
                     leaf(s0, 1, unsync=False), leaf(s1, 2, unsync=False), leaf(x, 0x42))
    result = replay_sync(R, pages)
    assert result.errors == []
    # p was added to pvec before its walk returned 0 and stays there.
    assert [entries(b) for b in result.batches] == [
        [(R, 3, -1), (p, 2, 4), (q, 2, 6), (x, 1, 3)]]
    assert leaf_rows(result.batches[0]) == [(x, 0x42, [(q, 2), (R, 3)], [3, 6])]
    assert (result.final[p].unsync_children, result.final[p].bitmap) == (0, 0)
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)


def test_level2_parent_with_only_synced_children_alone() -> None:
    """Same without the unsync branch: no batch, but the grandparent's bit is cleared."""
    p, s0 = 0x6000, 0x8000
    pages = pages_of(mk(R, 3, {4: p}), mk(p, 2, {0: s0}), leaf(s0, 1, unsync=False))
    result = replay_sync(R, pages)
    assert (result.batches, result.errors) == ([], [])
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)
    assert (result.final[p].unsync_children, result.final[p].bitmap) == (0, 0)


def test_level5_root() -> None:
    """A 5-level root: the sentinel goes in parent[4], the last mmu_page_path slot."""
    p4, p3, p2, x = 0x6000, 0x7000, 0x8000, 0x9000
    pages = pages_of(mk(R, 5, {511: p4}), mk(p4, 4, {0: p3}), mk(p3, 3, {1: p2}),
                     mk(p2, 2, {2: x}), leaf(x, 0x42))
    result = replay_sync(R, pages)
    assert result.errors == []
    assert leaf_rows(result.batches[0]) == [
        (x, 0x42, [(p2, 2), (p3, 3), (p4, 4), (R, 5)], [2, 1, 0, 511])]
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)


def test_zap_of_a_level1_page_does_nothing() -> None:
    """mmu_zap_unsync_children(): "if (parent->role.level == PG_LEVEL_4K) return 0"."""
    pages = pages_of(mk(R, 1, unsync=True))
    result = replay_zap(R, pages)
    assert (result.batches, result.errors, result.truncated) == ([], [], False)
    # even with (corrupt) unsync children it never walks
    corrupt = replay_zap(R, pages_of(mk(R, 1, {0: 0x6000}), leaf(0x6000, 1)))
    assert (corrupt.batches, corrupt.errors) == ([], [])


def test_find_next_bit() -> None:
    """find_next_bit() over the 512-bit bitmap."""
    assert find_next_bit(0, 0) == 512
    assert find_next_bit(bits(0), 0) == 0
    assert find_next_bit(bits(5, 9), 6) == 9
    assert find_next_bit(bits(511), 0) == 511
    assert find_next_bit(bits(511), 512) == 512


# ---------------------------------------------------------------------------------------
# Corrupt input: one error line naming the page, the object skipped, the replay goes on
# ---------------------------------------------------------------------------------------

def good_branch() -> list[WalkPage]:
    """R slot 0 -> level-1 leaf x (R is level 2)."""
    return [leaf(0x6000, 0x42)]


def test_child_with_wrong_level() -> None:
    """A child whose level is not parent level - 1 is skipped; its bit stays set."""
    x, bad = 0x6000, 0x7000
    pages = pages_of(mk(R, 3, {0: bad, 1: x}), mk(bad, 1, unsync=True), mk(x, 2, {0: 0x8000}),
                     leaf(0x8000, 0x42))
    result = replay_sync(R, pages)
    assert [e for e in result.errors if hex(bad) in e and "level" in e]
    assert [lf.sp for b in result.batches for lf in b.leaves] == [0x8000]
    assert result.final[R].bitmap == bits(0)


def test_child_missing_from_snapshot() -> None:
    """A child page absent from the mapping is skipped."""
    pages = pages_of(mk(R, 2, {0: 0xDEAD000, 1: 0x6000}), *good_branch())
    result = replay_sync(R, pages)
    assert any("0xdead000" in e and "not in the page snapshot" in e for e in result.errors)
    assert [lf.sp for b in result.batches for lf in b.leaves] == [0x6000]


def test_child_pointing_back_up_the_path() -> None:
    """A cycle (child is an ancestor, or the page itself) is reported and not followed."""
    p = 0x6000
    pages = pages_of(mk(R, 3, {0: p}), mk(p, 2, {0: R, 1: p, 2: 0x7000}), leaf(0x7000, 0x42))
    result = replay_sync(R, pages)
    assert any(hex(p) in e and "back up" in e and hex(R) in e for e in result.errors)
    assert [lf.sp for b in result.batches for lf in b.leaves] == [0x7000]
    assert not result.truncated


def test_unsync_children_over_512() -> None:
    """An impossible counter: the page is skipped (as root: nothing is walked)."""
    p = 0x6000
    pages = pages_of(mk(R, 3, {0: p}), mk(p, 2, {0: 0x7000}, uc=600), leaf(0x7000, 1))
    result = replay_sync(R, pages)
    assert any(hex(p) in e and "unsync_children 600" in e for e in result.errors)
    assert result.batches == []
    as_root = replay_sync(p, pages)
    assert as_root.batches == [] and any(hex(p) in e for e in as_root.errors)


@pytest.mark.parametrize("level", [0, 6, -1])
def test_bad_level(level: int) -> None:
    """role.level outside 1..5, as the root or as a child."""
    p = 0x6000
    pages = pages_of(mk(R, 2, {0: p}), mk(p, level, {0: 0x7000}), leaf(0x7000, 1))
    result = replay_sync(p, pages)
    assert result.batches == [] and any(hex(p) in e and "level" in e for e in result.errors)
    result = replay_sync(R, pages)
    assert result.batches == [] and any(hex(p) in e and "level" in e for e in result.errors)


def test_bit_set_but_slot_absent() -> None:
    """A set bit without a slot: reported, then treated as not present (bit cleared)."""
    pages = pages_of(mk(R, 2, {0: 0x6000}, set_bits=[0, 7]), *good_branch())
    result = replay_sync(R, pages)
    assert any(hex(R) in e and "bit 7" in e for e in result.errors)
    assert [entries(b) for b in result.batches] == [[(R, 2, -1), (0x6000, 1, 0)]]
    assert (result.final[R].unsync_children, result.final[R].bitmap) == (0, 0)


def test_unresolvable_child() -> None:
    """Present, non-large SPTE whose child page could not be found (child None)."""
    pages = pages_of(mk(R, 2, {0: Slot(True, False, None), 1: 0x6000}), *good_branch())
    result = replay_sync(R, pages)
    assert any(hex(R) in e and "unresolvable" in e for e in result.errors)
    assert [lf.sp for b in result.batches for lf in b.leaves] == [0x6000]


def test_unsync_non_leaf_and_level1_parent() -> None:
    """Only level-1 pages go unsync, and level-1 pages have no unsync children."""
    p, q = 0x6000, 0x7000
    pages = pages_of(mk(R, 3, {0: p, 1: q}), mk(p, 2, unsync=True),
                     mk(q, 2, {0: 0x8000}), mk(0x8000, 1, {0: 0x9000}, unsync=True))
    result = replay_sync(R, pages)
    assert any(hex(p) in e and "unsync but level 2" in e for e in result.errors)
    assert any("0x8000" in e and "level-1 page with unsync_children" in e
               for e in result.errors)
    assert result.batches == []


def test_counter_bitmap_mismatch_is_reported() -> None:
    """unsync_children != popcount(bitmap) is flagged; the kernel's logic still applies."""
    pages = pages_of(mk(R, 2, {0: 0x6000}, uc=3), *good_branch())
    result = replay_sync(R, pages)
    assert any(hex(R) in e and "unsync_children 3" in e for e in result.errors)
    assert [lf.sp for b in result.batches for lf in b.leaves] == [0x6000]
    assert result.final[R].unsync_children == 2  # 3 - 1: the kernel does not resync it


def test_counter_underflow_wraps_like_u32() -> None:
    """More bits than the counter: clear_unsync_child_bit WARNs and the u32 wraps."""
    pages = pages_of(mk(R, 2, {0: Slot(False, False, None), 1: Slot(False, False, None)},
                        uc=1))
    result = replay_sync(R, pages)
    assert any("underflow" in e for e in result.errors)
    assert result.final[R].unsync_children == 0xFFFFFFFF
    assert result.batches == []


def test_garbage_objects_never_raise() -> None:
    """Wrong types anywhere: errors, never exceptions."""
    weird = [
        (R, {R: None}),
        ("root", {}),
        (None, None),
        (R, [1, 2, 3]),
        (R, {R: WalkPage(R, 2, None, None, 1, bits(0), None)}),  # type: ignore[arg-type]
        (R, {R: WalkPage(R, 2, 0, False, 1, bits(0), {0: "x"})}),  # type: ignore[dict-item]
        (R, {R: WalkPage(R, 2, 0, False, 1, bits(0), {0: Slot(True, False, "x")})}),  # type: ignore[arg-type]
        (R, {R: WalkPage(R, 2, 0, False, 1, -1, {})}),
        (R, {R: WalkPage(R, True, 0, False, 1, 1 << 600, {})}),  # type: ignore[arg-type]
        (R, {R: WalkPage(0x9999, 2, 0, False, 1, bits(0), {})}),
    ]
    for root, pages in weird:
        for fn in (replay_sync, replay_zap):
            result = fn(root, pages)  # type: ignore[arg-type]
            assert isinstance(result, Replay)
            assert result.errors, (root, pages)
            assert result.batches == []


def test_batch_without_progress_stops_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety net: a batch that changes nothing would loop forever in the kernel."""
    monkeypatch.setattr(unsync.Walker, "kvm_unlink_unsync_page", lambda self, sp: None)
    monkeypatch.setattr(unsync.Walker, "mmu_pages_clear_parents", lambda self: None)
    result = replay_sync(R, pages_of(mk(R, 2, {0: 0x6000}), *good_branch()))
    assert result.truncated
    assert len(result.batches) == 1
    assert any("changed nothing" in e for e in result.errors)


def test_internal_error_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a bug inside the walker comes back as an error line."""
    def boom(self, sp, pvec):
        raise RuntimeError("boom")
    monkeypatch.setattr(unsync.Walker, "mmu_unsync_walk", boom)
    result = replay_sync(R, reference_pages())
    assert result.truncated and any("boom" in e for e in result.errors)


# ---------------------------------------------------------------------------------------
# 3. Property-based tests
# ---------------------------------------------------------------------------------------

def mark_unsync(pages: dict[int, dict], parents_of: dict[int, list[tuple[int, int]]],
                sp: int, idx: int) -> None:
    """mark_unsync() on the generator's mutable page specs."""
    page = pages[sp]
    if page["bitmap"] >> idx & 1:
        return
    page["bitmap"] |= 1 << idx
    page["uc"] += 1
    if page["uc"] > 1:
        return
    for parent, slot in parents_of.get(sp, []):
        mark_unsync(pages, parents_of, parent, slot)


@st.composite
def trees(draw) -> tuple[int, dict[int, WalkPage]]:
    """A consistent shadow hierarchy: levels fit, leaves may be shared, bits and counters
    are what kvm_unsync_page() / mark_unsync() would leave, plus stale bits."""
    root_level = draw(st.integers(2, 5))
    wide = draw(st.booleans())  # big enough for -ENOSPC and several batches
    specs: dict[int, dict] = {}
    by_level: dict[int, list[int]] = {lv: [] for lv in range(1, 6)}
    parents_of: dict[int, list[tuple[int, int]]] = {}

    def new(level: int) -> int:
        sp = BASE + 0x100 * (len(specs) + 1)
        specs[sp] = {"level": level, "uc": 0, "bitmap": 0, "slots": {},
                     "unsync": level == 1 and draw(st.sampled_from([True, True, wide, False])),
                     "gfn": len(specs)}
        by_level[level].append(sp)
        if level > 1:
            if wide:
                n = draw(st.integers(8, 30) if level == 2 else st.integers(1, 3))
            else:
                n = draw(st.integers(0, 24 if level == 2 else 3))
            for i in draw(st.lists(st.integers(0, 511), unique=True, min_size=n, max_size=n)):
                kind = draw(st.sampled_from(["new", "new", "new", "share", "np", "large"]))
                if kind == "np":
                    specs[sp]["slots"][i] = Slot(False, False, None)
                elif kind == "large":
                    specs[sp]["slots"][i] = Slot(True, True, None)
                else:
                    pool = by_level[level - 1]
                    if kind == "share" and pool:
                        child = draw(st.sampled_from(pool))
                    elif len(specs) < 150:
                        child = new(level - 1)
                    else:
                        continue
                    specs[sp]["slots"][i] = Slot(True, False, child)
                    parents_of.setdefault(child, []).append((sp, i))
        return sp

    root = new(root_level)
    for sp, spec in specs.items():
        if spec["unsync"]:
            for parent, slot in parents_of.get(sp, []):
                mark_unsync(specs, parents_of, parent, slot)
    # stale bits: set by mark_unsync() earlier, the SPTE since zapped or the child synced
    nonleaf = [sp for sp, spec in specs.items() if spec["slots"]]
    for _ in range(draw(st.integers(0, 4))):
        if nonleaf:
            sp = draw(st.sampled_from(nonleaf))
            mark_unsync(specs, parents_of, sp, draw(st.sampled_from(sorted(specs[sp]["slots"]))))
    pages = {sp: WalkPage(sp=sp, level=s["level"], gfn=s["gfn"], unsync=s["unsync"],
                          unsync_children=s["uc"], bitmap=s["bitmap"], slots=s["slots"])
             for sp, s in specs.items()}
    return root, pages


def reachable_unsync_leaves(root: int, pages: Mapping[int, WalkPage]) -> set[int]:
    """Unsync level-1 pages reachable from root through present, non-large SPTEs."""
    seen, todo, out = set(), [root], set()
    while todo:
        sp = todo.pop()
        if sp in seen:
            continue
        seen.add(sp)
        page = pages[sp]
        if page.level == 1:
            if page.unsync:
                out.add(sp)
            continue
        todo += [s.child for s in page.slots.values() if s.present and not s.large]
    return out


def check_common(root: object, pages: object, result: Replay, max_batches: int) -> None:
    """Properties that hold for any input whatsoever."""
    assert isinstance(result, Replay)
    assert len(result.batches) <= max_batches
    for batch in result.batches:
        assert 1 <= len(batch.pages) <= KVM_PAGE_ARRAY_NR
        assert batch.pages[0] == Entry(root, batch.pages[0].level, INVALID_INDEX)  # type: ignore[arg-type]
        assert all(0 <= e.idx < 512 for e in batch.pages[1:])
        assert batch.ret != 0
        for lf in batch.leaves:
            assert isinstance(pages, Mapping)
            src = pages[lf.sp]
            assert src.level == 1 and src.unsync
    assert all(isinstance(e, str) and "\n" not in e for e in result.errors)


FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(trees())
def test_consistent_trees(tree: tuple[int, dict[int, WalkPage]]) -> None:
    """Valid hierarchies: every reachable unsync leaf synced exactly once, paths right."""
    root, pages = tree
    before = copy.deepcopy(pages)
    result = replay_sync(root, pages)
    assert pages == before
    check_common(root, pages, result, 10_000)
    assert result.errors == [] and not result.truncated
    reported = [lf.sp for b in result.batches for lf in b.leaves]
    assert len(reported) == len(set(reported))
    assert set(reported) == reachable_unsync_leaves(root, pages)
    root_level = pages[root].level
    for batch in result.batches:
        for lf in batch.leaves:
            assert [lv for _, lv in lf.parents] == list(range(2, root_level + 1))
            assert lf.parents[-1][0] == root
            below = lf.sp
            for (parent, _), idx in zip(lf.parents, lf.idx, strict=True):
                assert pages[parent].slots[idx].child == below
                below = parent
    final = result.final
    assert (final[root].unsync_children, final[root].bitmap) == (0, 0)
    for sp, page in final.items():
        assert page.unsync_children == page.bitmap.bit_count(), hex(sp)
        if sp in reported:
            assert not page.unsync
    zap = replay_zap(root, pages)
    assert zap.batches == result.batches and zap.errors == []
    assert pages == before


CORRUPTIONS = ["level", "uc", "bitflip", "redirect", "delete", "unsync", "slot", "noslot",
               "sp", "none"]


@st.composite
def corrupted(draw) -> tuple[int, dict[int, WalkPage]]:
    """A consistent tree with random damage: bad levels and counters, cycles, holes."""
    root, pages = draw(trees())
    pages = dict(pages)
    addrs = sorted(pages)
    for _ in range(draw(st.integers(1, 6))):
        sp = draw(st.sampled_from(addrs))
        if sp not in pages:
            continue
        p = pages[sp]
        how = draw(st.sampled_from(CORRUPTIONS))
        slots = dict(p.slots)
        if how == "level":
            p = WalkPage(sp, draw(st.integers(-1, 7)), p.gfn, p.unsync, p.unsync_children,
                         p.bitmap, p.slots)
        elif how == "uc":
            p = WalkPage(sp, p.level, p.gfn, p.unsync, draw(st.integers(0, 700)), p.bitmap,
                         p.slots)
        elif how == "bitflip":
            p = WalkPage(sp, p.level, p.gfn, p.unsync, p.unsync_children,
                         p.bitmap ^ (1 << draw(st.integers(0, 511))), p.slots)
        elif how == "redirect" and slots:
            i = draw(st.sampled_from(sorted(slots)))
            target = draw(st.one_of(st.sampled_from([root, sp]), st.sampled_from(addrs),
                                    st.just(0xDEAD000)))
            slots[i] = Slot(True, False, target)
            p = WalkPage(sp, p.level, p.gfn, p.unsync, p.unsync_children, p.bitmap, slots)
        elif how == "delete" and sp != root:
            del pages[sp]
            continue
        elif how == "unsync":
            p = WalkPage(sp, p.level, p.gfn, not p.unsync, p.unsync_children, p.bitmap,
                         p.slots)
        elif how == "slot" and slots:
            i = draw(st.sampled_from(sorted(slots)))
            slots[i] = Slot(draw(st.booleans()), draw(st.booleans()),
                            draw(st.none() | st.sampled_from(addrs)))
            p = WalkPage(sp, p.level, p.gfn, p.unsync, p.unsync_children, p.bitmap, slots)
        elif how == "noslot" and slots:
            del slots[draw(st.sampled_from(sorted(slots)))]
            p = WalkPage(sp, p.level, p.gfn, p.unsync, p.unsync_children, p.bitmap, slots)
        elif how == "sp":
            p = WalkPage(sp + 8, p.level, p.gfn, p.unsync, p.unsync_children, p.bitmap,
                         p.slots)
        pages[sp] = p
    return root, pages


@FAST
@given(corrupted(), st.sampled_from([1, 2, 5, 10_000]))
def test_corrupted_trees(tree: tuple[int, dict[int, WalkPage]], max_batches: int) -> None:
    """Damaged hierarchies: no exception, bounded, inputs unchanged, leaves genuine."""
    root, pages = tree
    before = copy.deepcopy(pages)
    for fn in (replay_sync, replay_zap):
        result = fn(root, pages, max_batches=max_batches)
        check_common(root, pages, result, max_batches)
        assert pages == before
        reported = [lf.sp for b in result.batches for lf in b.leaves]
        assert len(reported) == len(set(reported))  # a leaf is never synced twice


ADDRS = [0x1000 * k for k in range(1, 7)]
junk_slots = st.dictionaries(
    st.integers(-2, 520),
    st.one_of(st.builds(Slot, st.booleans(), st.booleans(),
                        st.one_of(st.none(), st.sampled_from(ADDRS + [0xDEAD000]))),
              st.none(), st.integers()),
    max_size=6)
junk_pages = st.builds(
    WalkPage,
    sp=st.sampled_from(ADDRS),
    level=st.one_of(st.integers(1, 5), st.integers(-3, 9), st.none()),
    gfn=st.one_of(st.integers(0, 1 << 40), st.none()),
    unsync=st.booleans(),
    unsync_children=st.one_of(st.integers(0, 6), st.integers(-5, 1 << 33)),
    bitmap=st.one_of(st.sets(st.sampled_from([0, 1, 2, 3, 255, 511]))
                     .map(lambda s: bits(*s)), st.integers(-3, 1 << 520)),
    slots=st.one_of(junk_slots, st.none()),
)


@FAST
@given(st.one_of(st.sampled_from(ADDRS), st.none(), st.text(max_size=3)),
       st.dictionaries(st.sampled_from(ADDRS), st.one_of(junk_pages, st.none(), st.integers()),
                       max_size=6),
       st.integers(1, 50))
def test_junk_never_raises(root: object, pages: dict, max_batches: int) -> None:
    """Arbitrary garbage: the replay always returns, within its bounds."""
    before = copy.deepcopy(pages)
    for fn in (replay_sync, replay_zap):
        result = fn(root, pages, max_batches=max_batches)  # type: ignore[arg-type]
        check_common(root, pages, result, max_batches)
        assert pages == before
