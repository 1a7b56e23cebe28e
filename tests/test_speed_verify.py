"""Verification in worker processes gives the results of one process.

find_duplicates and search verify the pairs they are sure to check ahead,
together, in the hashing workers (Judge.prefetch); the results must be
those of checking one pair after another in one process, byte for byte.
No timings here (bench/bench_peers.py measures them).
"""

import json
import os
import re
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageDraw

from conftest import rs, write_params
from test_verify import photo

pytest.importorskip("cv2")


@pytest.fixture
def copies(tmp_path):
    """Four originals, each with copies only verification joins (a crop, a
    quarter turn, a mirrored crop, a frame), plus unrelated pictures; the
    originals also serve as queries."""
    imgs, queries = tmp_path / "imgs", tmp_path / "queries"
    imgs.mkdir()
    queries.mkdir()
    for seed in (3, 5, 7, 9):
        im = photo(seed, (640, 480))
        im.save(imgs / f"o{seed}.jpg", quality=92)
        im.save(queries / f"o{seed}.jpg", quality=92)
        w, h = im.size
        im.crop((int(w * .15), int(h * .15), int(w * .85), int(h * .85))).save(
            imgs / f"o{seed}_crop.jpg", quality=90)
        im.transpose(Image.Transpose.ROTATE_90).save(imgs / f"o{seed}_turn.png")
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop(
            (0, 0, int(w * .8), int(h * .8))).save(imgs / f"o{seed}_mirror.jpg")
        framed = Image.new("RGB", (w + 100, h + 180), (248, 248, 244))
        framed.paste(im, (50, 50))
        ImageDraw.Draw(framed).text((60, h + 80), f"no. {seed}", fill=(30, 30, 30))
        framed.save(imgs / f"o{seed}_framed.jpg", quality=90)
    for seed in (21, 22, 23):
        photo(seed, (640, 480)).save(imgs / f"other{seed}.jpg", quality=90)
    return tmp_path


def results(folder, names):
    """The result files, with the run times and the two settings that
    differ on purpose (workers, output_dir) taken out."""
    return {n: re.sub(r'"(seconds|created|workers|output_dir)": [^,\n]*', "",
                      (folder / n).read_text(encoding="utf-8")) for n in names}


def spy_on_batches(monkeypatch):
    """How many pairs each prefetch left verified by worker processes."""
    sent = []
    prefetch = rs.Judge.prefetch

    def watched(self, pairs):
        before = len(self.ready)
        prefetch(self, pairs)
        if self.pool is not None and self.pool.crew:
            sent.append(len(self.ready) - before)
    monkeypatch.setattr(rs.Judge, "prefetch", watched)
    return sent


def test_find_duplicates_in_workers_is_byte_for_byte_one_process(
        copies, monkeypatch):
    sent = spy_on_batches(monkeypatch)
    names = ("find_duplicates.json", "find_duplicates.csv", "plan.json",
             "plan.csv")
    out = {}
    for workers in (1, 2, 1, 2):
        params = write_params(copies, workers=workers, html_report=False,
                              output_dir=f"out{workers}")
        if not os.path.exists(copies / "db"):
            assert rs.main(["build", "--params", params, "-q"]) == 0
        # checks remembered from the run before are not made again
        # (VerdictMemory): this compares making them
        (copies / "index" / rs.VERDICTS_NAME).unlink(missing_ok=True)
        assert rs.main(["find_duplicates", "--params", params, "-q"]) == 0
        files = results(copies / f"out{workers}", names)
        assert out.setdefault(workers, files) == files  # and every run alike
    assert out[1] == out[2]
    assert sum(sent) >= 4 and max(sent) >= 2  # workers did verify, together
    doc = json.loads((copies / "out2" / "find_duplicates.json").read_text())
    verified = [m for g in doc["groups"] for m in g["images"]
                if m["how"] and m["how"]["verified"]]
    assert len(verified) >= 4  # a turn of each original, at least: verified
    assert not any("other" in m["path"] for g in doc["groups"]
                   for m in g["images"])


def test_search_in_workers_is_byte_for_byte_one_process(copies, monkeypatch):
    sent = spy_on_batches(monkeypatch)
    out = {}
    for workers in (1, 2):
        params = write_params(copies, workers=workers, html_report=False,
                              output_dir=f"out{workers}")
        if workers == 1:
            assert rs.main(["build", "--params", params, "-q"]) == 0
        (copies / "index" / rs.VERDICTS_NAME).unlink(missing_ok=True)
        assert rs.main(["search", "--params", params, "-q"]) == 0
        out[workers] = results(copies / f"out{workers}",
                               ("search.json", "search.csv"))
    assert out[1] == out[2]
    assert sent and max(sent) >= 8  # every query's checks in one batch
    doc = json.loads((copies / "out2" / "search.json").read_text())
    assert all(any(m["how"]["verified"] for m in q["matches"])
               for q in doc["queries"])


# ---- the pairs verified ahead are exactly those checked one by one ----

class Ahead:
    """A judge for EdgeJudge whose verdicts are a fixed function of the pair
    (no pictures): it counts checks made one by one and pairs verified
    ahead, and fails if a pair is verified twice."""

    def __init__(self, accept, workers):
        self.accept, self.workers = accept, workers
        self.ready, self.done, self.ahead = {}, set(), 0

    def verdict(self, a, b):
        assert (a, b) not in self.done, "a pair verified twice"
        self.done.add((a, b))
        return rs.Verdict(self.accept(a, b), "stub")

    def prefetch(self, pairs):
        for a, b in dict.fromkeys(pairs):
            if (a, b) not in self.ready:
                self.ready[(a, b)] = self.verdict(a, b)
                self.ahead += 1

    def check(self, a, b):
        return self.ready.pop((a, b), None) or self.verdict(a, b)

    def known(self, a, b):  # for EdgeJudge's rehearsals
        return self.ready.get((a, b))


class SmallBatches(rs.EdgeJudge):
    AHEAD_PAIRS = 5  # several batches even in short lists


def edge_judge(n, judge, same=None):
    """same: each image's distinct hash (images of one hash are joined by
    the index, not by an edge); by default every image has its own."""
    same = np.arange(n) if same is None else np.asarray(same, np.int64)
    first = np.array([int(np.flatnonzero(same == h)[0]) if (same == h).any()
                      else 0 for h in range(n)], np.int64)
    flat = types.SimpleNamespace(ids=np.arange(n), detail=np.full(n, 4.0),
                                 boxes=np.full(n, rs.FULL_BOX_WORD, np.uint64),
                                 distinct_of_images=lambda: same,
                                 first_images=lambda: first)
    store = types.SimpleNamespace(rows_by_id=lambda ids: {
        int(i): types.SimpleNamespace(path=f"p{int(i)}") for i in ids})
    return SmallBatches(judge, flat, store, 12)


EDGE_LISTS = st.integers(4, 40).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1),
                                   st.integers(0, 12)), min_size=1, max_size=120),
    st.integers(0, 2 ** 32 - 1),
    st.lists(st.integers(0, n - 1), min_size=n, max_size=n)))


@settings(max_examples=150, deadline=None)
@given(EDGE_LISTS)
def test_edges_verified_ahead_are_the_edges_checked_one_by_one(case):
    n, raw, seed, hashes = case
    same = [min(k, h) for k, h in enumerate(hashes)]  # some images share one
    raw = [(a, b, d) for a, b, d in raw if a != b]
    if not raw:
        return
    a, b, d = (np.array(c, np.int64) for c in zip(*raw))
    code = np.full(len(a), rs.CENTRE_CODE)  # every edge weak: verified
    edges = rs.Edges(a, b, d, d.astype(float), code, np.zeros(len(a), bool))

    def accept(x, y):  # about half the pairs, the same answer every time
        return hash((x, y, seed)) % 2 == 0
    serial, parallel = Ahead(accept, 1), Ahead(accept, 2)
    kept_serial = edge_judge(n, serial, same)(edges)
    kept_parallel = edge_judge(n, parallel, same)(edges)
    assert kept_serial.tolist() == kept_parallel.tolist()
    assert serial.done == parallel.done  # nothing verified that was not needed
    assert not parallel.ready  # every pair verified ahead was used
    assert parallel.ahead == len(parallel.done)  # each one verified ahead


# ---- the index's grouping of equal hashes: one stable sort ----

@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2 ** 64 - 1) | st.integers(0, 6), max_size=300))
def test_group_sorted_is_unique_then_a_stable_sort_of_its_inverse(values):
    values = np.array(values, dtype=np.uint64)
    distinct, order, starts = rs._group_sorted(values)
    want, inverse = np.unique(values, return_inverse=True)
    want_starts = np.zeros(len(want) + 1, dtype=np.int64)
    np.cumsum(np.bincount(inverse, minlength=len(want)), out=want_starts[1:])
    assert distinct.dtype == np.uint64 and distinct.shape == (len(want), 1)
    assert np.array_equal(distinct[:, 0], want)
    assert np.array_equal(order, np.argsort(inverse, kind="stable"))
    assert np.array_equal(starts, want_starts)


# ---- a search's scan of the stored windows: blocks without a hit skipped ----

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.integers(1, 5), st.integers(0, 64),
       st.integers(1, 16), st.integers(0, 2 ** 32 - 1))
def test_scan_windows_is_every_window_within_radius_in_order(n, k, radius,
                                                             block, seed):
    rng = np.random.default_rng(seed)
    query = rng.integers(0, 2 ** 63, 1, dtype=np.uint64)
    windows = rng.integers(0, 2 ** 63, (n, k, 1), dtype=np.uint64)
    near = rng.random((n, k)) < 0.1  # a few windows a couple of bits away
    windows[near, 0] = query[0] ^ np.uint64(3)
    want = [(p, w, int((int(windows[p, w, 0]) ^ int(query[0])).bit_count()))
            for p in range(n) for w in range(k)
            if (int(windows[p, w, 0]) ^ int(query[0])).bit_count() <= radius]
    assert list(rs._scan_windows(windows, query, radius, block)) == want
