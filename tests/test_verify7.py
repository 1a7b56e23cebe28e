"""Cheaper checks, the same verdicts.

The matcher (_nearest(...).pairs()) must give exactly the pairs OpenCV's
BFMatcher(NORM_HAMMING).knnMatch(k=2) with the ratio test gives, in the
same order: RANSAC's seeded generator then sees the same input, and the
verdict is the same.  No timings here (bench/bench_verify.py --replay
measures them on the checks the operations make).
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import rs
from test_verify import photo

cv2 = pytest.importorskip("cv2")


def knn_pairs(da, db):
    """The reference: what the matcher did before (knnMatch, ratio test)."""
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    pairs = [(m[0].queryIdx, m[0].trainIdx)
             for m in matcher.knnMatch(da, db, k=2)
             if len(m) == 2 and m[0].distance < rs.RATIO * m[1].distance]
    return np.array(pairs, np.int64).reshape(-1, 2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 600), m=st.integers(0, 600),
       levels=st.integers(1, 256), seed=st.integers(0, 2 ** 32 - 1))
def test_matcher_is_knnmatch_on_drawn_descriptors(n, m, levels, seed):
    """Drawn descriptors, from few distinct byte values (ties everywhere:
    equal nearest and second nearest, equal rows) to random ones, and
    sizes across the product's row blocks."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, levels, dtype=np.uint8)
    da = values[rng.integers(0, levels, (n, 32))]
    db = values[rng.integers(0, levels, (m, 32))]
    if m and n:  # some rows of a are rows of b with a few bits flipped
        near = rng.integers(0, m, n // 2)
        flips = rng.integers(0, 2, (n // 2, 32), dtype=np.uint8) << \
            rng.integers(0, 8, (n // 2, 32), dtype=np.uint8)
        da[: n // 2] = db[near] ^ (flips * (rng.random((n // 2, 32)) < .05))
    got = rs._nearest(da, db).pairs()
    assert got.dtype == np.int64 and got.shape[1] == 2
    assert np.array_equal(got, knn_pairs(da, db))


def test_matcher_is_knnmatch_on_real_keypoints(tmp_path):
    """ORB descriptors of pictures and their edited copies (plain and
    fine keypoints, mirrored too): the same pairs as knnMatch, and some
    (a copy) or few (a different picture)."""
    feats = []
    for seed in (4, 6):
        im = photo(seed, (720, 540))
        w, h = im.size
        for k, edit in enumerate((im, im.crop((90, 40, w - 60, h - 80)),
                                  im.transpose(Image.Transpose.ROTATE_90))):
            path = tmp_path / f"p{seed}_{k}.jpg"
            edit.save(path, quality=85)
            feats.append(rs.load_features(str(path), 10 ** 9))
    a = feats[0]
    found = []
    for b in feats[1:]:
        for da, db in ((a.descriptors, b.descriptors),
                       (a.oriented(True)[1], b.descriptors),
                       (a.fine().descriptors, b.fine().descriptors)):
            got = rs._nearest(da, db).pairs()
            assert np.array_equal(got, knn_pairs(da, db))
            found.append(len(got))
    copies, others = found[:6], found[6:]
    assert min(copies[0], copies[3]) > 200 > 2 * max(others)  # 471, 899; 32


def drawn_features(rng, plain_n, fine_extra, levels, shuffle):
    """Features whose fine keypoints are some of the plain ones (with their
    places and descriptors) plus others, in any order, repeats included:
    what _fine_nearest must not trust blindly."""
    values = rng.integers(0, 256, levels, dtype=np.uint8)

    def drawn(n):
        return (rng.integers(0, 40, (n, 2)).astype(np.float32),
                values[rng.integers(0, levels, (n, 32))])
    points, desc = drawn(plain_n)
    keep = rng.random(plain_n) < 0.8
    more_p, more_d = drawn(fine_extra)
    fine_p = np.vstack([points[keep], more_p])
    fine_d = np.vstack([desc[keep], more_d])
    if len(fine_p) and shuffle:
        order = rng.permutation(len(fine_p))
        fine_p, fine_d = fine_p[order], fine_d[order]
    grey = np.zeros((40, 40), np.uint8)
    fine = rs.Features(40, 40, grey, fine_p, fine_d, fine_of=True)
    return rs.Features(40, 40, grey, points, desc, _fine=fine)


@settings(max_examples=60, deadline=None)
@given(na=st.integers(0, 300), nb=st.integers(0, 300),
       extra_a=st.integers(0, 300), extra_b=st.integers(0, 300),
       levels=st.integers(1, 256), shuffle=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_fine_nearest_is_all_against_all(na, nb, extra_a, extra_b, levels,
                                         shuffle, seed):
    """The fine try's two nearest taken partly from the plain try's are
    those of comparing every fine keypoint with every other: the same
    distances, and the same pairs through the ratio test."""
    rng = np.random.default_rng(seed)
    a = drawn_features(rng, na, extra_a, levels, shuffle)
    b = drawn_features(rng, nb, extra_b, levels, shuffle)
    plain = rs._nearest(a.descriptors, b.descriptors)
    got = rs._fine_nearest(a, b, False, plain)
    want = rs._nearest(a.fine().descriptors, b.fine().descriptors)
    assert np.array_equal(got.d1, want.d1) and np.array_equal(got.d2, want.d2)
    assert np.array_equal(got.pairs(), want.pairs())
    assert np.array_equal(got.pairs(), knn_pairs(a.fine().descriptors,
                                                 b.fine().descriptors))


def test_fine_nearest_on_real_keypoints(tmp_path):
    """Real pictures (a copy with text over it, a different picture), the
    mirror too: the plain keypoints are mostly fine ones, and the fine
    try's pairs are knnMatch's on all fine keypoints."""
    im = photo(8, (720, 540))
    im.save(tmp_path / "a.jpg", quality=90)
    w, h = im.size
    im.crop((0, 0, w * 3 // 4, h)).save(tmp_path / "b.jpg", quality=80)
    photo(12, (600, 600)).save(tmp_path / "c.jpg", quality=85)
    a, b, c = (rs.load_features(str(tmp_path / f"{n}.jpg"), 10 ** 9)
               for n in "abc")
    for other in (b, c):
        for mirror in (False, True):
            plain = rs._nearest(a.oriented(mirror)[1], other.descriptors)
            got = rs._fine_nearest(a, other, mirror, plain)
            fa = a.fine().oriented(mirror)[1]
            assert np.array_equal(got.pairs(),
                                  knn_pairs(fa, other.fine().descriptors))
    shared = a.fine_in_plain(False)
    assert (shared >= 0).sum() > 0.9 * len(a.descriptors)
    assert len(set(shared[shared >= 0])) == (shared >= 0).sum()


def test_same_keypoints_pairs_one_to_one():
    """A keypoint in both sets is paired; one found twice in either set,
    or absent, is not."""
    pts = np.array([[1, 1], [2, 2], [3, 3], [4, 4]], np.float32)
    desc = np.arange(4 * 32, dtype=np.uint8).reshape(4, 32)
    plain = (pts[[0, 1, 2, 2]], desc[[0, 1, 2, 2]])   # the third twice
    fine = (pts[[3, 1, 0, 2]], desc[[3, 1, 0, 2]])
    assert rs._same_keypoints(fine, plain).tolist() == [-1, 1, 0, -1]
    other = desc.copy()
    other[1, 0] ^= 1  # same place, another descriptor: not the same
    assert rs._same_keypoints((pts, other), (pts, desc)).tolist() == \
        [0, -1, 2, 3]
