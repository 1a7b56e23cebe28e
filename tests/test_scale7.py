"""Large collections (session 7): batched engine calls give exactly what
one search per query gave.  Nothing here is timed: bench/bench_peers.py
--scale measures the speed."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import rs
from test_scale import clustered


def farther_one_by_one(group, flat, radius, adaptive, taken):
    """reach_further's candidates as they were found before: a brute-force
    search of each member's whole hash, images in `taken` left out."""
    extra = rs.VERIFY_EXTRA_BITS
    best = {}
    for m in group:
        d = np.bitwise_count(flat.hashes ^ flat.hashes[m]).sum(axis=1)
        for p in np.flatnonzero(d <= radius + extra).tolist():
            if p in taken:
                continue
            limit = rs.pair_threshold(radius, flat.detail[m], flat.detail[p]) \
                if adaptive else radius
            if (m != group[0] or d[p] > limit) and d[p] <= limit + extra:
                best[p] = min(best.get(p, d[p]), d[p])
    return sorted(best, key=lambda p: (best[p], p))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), words=st.sampled_from([1, 2]),
       adaptive=st.booleans(), radius=st.integers(2, 10),
       name=st.sampled_from(["scan", "mih", "auto"]))
def test_farther_images_in_one_cross_equal_one_search_each(
        seed, words, adaptive, radius, name):
    """Every group's far candidates, nearest first, from one engine call
    over all members: the same lists as a search of each member, for any
    exact engine (images of one hash, details from flat to busy)."""
    rng = np.random.default_rng(seed)
    n = 240
    hashes = clustered(rng, n, words, flips=5)
    hashes[rng.integers(0, n, 20)] = hashes[rng.integers(0, n, 20)]
    detail = rng.choice(np.array([0.3, 1.0, 1.6, 2.5, 3.3], np.float32), n)
    flat = rs.FlatIndex.from_arrays(np.arange(n), hashes, 64 * words,
                                    detail=detail)
    perm = rng.permutation(n)[:120].tolist()
    cuts = sorted(set(rng.integers(1, 120, 30).tolist()))
    splits = [g for g in np.split(np.array(perm), cuts) if len(g)]
    splits = [[int(p) for p in g] for g in splits]
    taken = {p for g in splits for p in g}
    engine = flat.engine(name, radius + rs.VERIFY_EXTRA_BITS, True)
    got = rs.farther_images(splits, flat, engine, radius, adaptive)
    assert got == [farther_one_by_one(g, flat, radius, adaptive, taken)
                   for g in splits]
    assert any(got)  # the clusters give candidates to compare


def test_farther_images_of_no_groups():
    flat = rs.FlatIndex.from_arrays(np.arange(3), np.arange(3, dtype=np.uint64
                                                            ).reshape(3, 1), 64)
    assert rs.farther_images([], flat, flat.engine("scan", 14, True), 8,
                             False) == []
    assert rs.farther_images([[0]], flat, flat.engine("mih", 14, True), 0,
                             False) == [[1, 2]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_pairs_sure_to_be_checked_are_checked_whatever_the_verdicts(seed):
    """sure_reach's pairs (verified up front, together) are among the pairs
    reach_further checks, for any verdicts: candidates shared by groups,
    taken by an earlier group or not."""
    rng = np.random.default_rng(seed)
    splits = [[100 + 10 * g + k for k in range(rng.integers(2, 4))]
              for g in range(8)]
    farther = [rng.permutation(12)[:rng.integers(0, 8)].tolist()
               for _ in splits]
    sure = rs.sure_reach(splits, farther)
    assert len(sure) == len(set(sure))
    for _ in range(20):
        taken, checked = set(), set()
        for group, ranked in zip(splits, farther):
            near = [p for p in ranked if p not in taken][:rs.REACH_CHECKS]
            checked.update((group[0], p) for p in near)
            taken.update(p for p in near if rng.random() < 0.5)
        assert set(sure) <= checked
    alone = [[p + 20 * g for p in ranked] for g, ranked in enumerate(farther)]
    assert len(rs.sure_reach(splits, alone)) == sum(
        min(len(r), rs.REACH_CHECKS) for r in alone)  # nothing shared



@pytest.mark.parametrize("use", ["cross", "search", "pairs"])
def test_a_cached_order_is_checked_when_its_table_is_first_used(use):
    """A bucket table's order from a cache is checked on first use, not
    when the engine is made: a right one gives what a fresh engine gives,
    one that does not sort the hashes is refused (ValueError) by every
    way of using the table."""
    rng = np.random.default_rng(7)
    hashes = np.unique(clustered(rng, 2000, 1), axis=0)
    fresh = rs.MIHEngine(hashes, 64, 4)
    queries = hashes[:200] ^ np.uint64(3)

    def run(engine):
        if use == "cross":
            return [a.tolist() for a in next(engine.cross(queries, 5))]
        if use == "search":
            return [a.tolist() for a in engine.search(queries[0], 5)]
        return [a.tolist() for a in next(engine.pairs(5))]
    cached = rs.MIHEngine(hashes, 64, 4, [o.astype(np.int32)
                                          for o in fresh.orders()])
    assert all(c.bits <= fresh.table_bits for c in fresh.chunks)
    assert not any(cached.checked)
    assert run(cached) == run(fresh)
    wrong = rs.MIHEngine(hashes, 64, 4, [np.roll(o, 1) for o in fresh.orders()])
    with pytest.raises(ValueError):
        run(wrong)
    for k in range(len(fresh.chunks)):  # checked in blocks that overlap
        again = rs.MIHEngine(hashes, 64, 4, fresh.orders())
        again._trusted(k, block=7)
        assert again.checked[k]
        with pytest.raises(ValueError):
            rs.MIHEngine(hashes, 64, 4, [np.roll(o, 1) for o in
                                         fresh.orders()])._trusted(k, block=7)
    with pytest.raises(ValueError):  # out of range: refused at once
        rs.MIHEngine(hashes, 64, 4, [o + 1 for o in fresh.orders()])


@pytest.mark.parametrize("words", [1, 2])
@pytest.mark.parametrize("block", [3, 512])
def test_window_hits_are_each_querys_scan(words, block):
    """window_hits: for each query, what _scan_windows yields, in its order
    (image, then window), one word or more, blocks of any size."""
    rng = np.random.default_rng(words)
    windows = clustered(rng, 300 * 20, words, flips=2).reshape(300, 20, words)
    queries = np.concatenate([windows[[3, 70, 71], 5],
                              clustered(rng, 4, words)])
    got = rs.window_hits(windows, queries, 5, block)
    want = [list(rs._scan_windows(windows, q, 5)) for q in queries]
    assert got == want and sum(map(len, want)) > 3


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("budget", [1 << 6, 1 << 10, 1 << 18])
def test_a_one_word_cross_in_small_windows_equals_brute_force(seed, budget):
    """_cross_word, its candidates cut into windows of any size: every pair
    within the radius once, in (query, hash) order, as brute force finds."""
    rng = np.random.default_rng(seed)
    hashes = np.unique(clustered(rng, 3000, 1), axis=0)
    queries = np.concatenate([clustered(rng, 500, 1), hashes[:300]])
    engine = rs.MIHEngine(hashes, 64, 3)
    got = [(int(a), int(b), int(c)) for i, j, d in
           engine._cross_word(queries[:, 0], 5, budget=budget)
           for a, b, c in zip(i, j, d)]
    d = np.bitwise_count(queries[:, None, 0] ^ hashes[None, :, 0])
    i, j = np.nonzero(d <= 5)
    assert got == [(a, b, int(d[a, b])) for a, b in zip(i.tolist(), j.tolist())]
    assert len(got) > 300
