"""Cheaper checks, the same verdicts.

The matcher (_ratio_matches) must give exactly the pairs OpenCV's
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
    got = rs._ratio_matches(da, db)
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
            got = rs._ratio_matches(da, db)
            assert np.array_equal(got, knn_pairs(da, db))
            found.append(len(got))
    copies, others = found[:6], found[6:]
    assert min(copies[0], copies[3]) > 50 > max(others)
