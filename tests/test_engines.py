"""Every engine returns exactly what a brute-force scan returns."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import brute_groups, brute_pairs, rs

ENGINES = ["scan", "mih", "bktree"]


@st.composite
def hash_sets(draw):
    """Random and clustered hashes, with many identical ones, 64 or 256 bits."""
    bits = draw(st.sampled_from([64, 256, 36, 42]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(1, 120))
    centres = [int(rng.integers(0, 2**62)) << 2 | int(rng.integers(0, 4))
               for _ in range(draw(st.integers(1, 8)))]
    values = []
    for _ in range(n):
        v = centres[int(rng.integers(len(centres)))] % (1 << bits)
        if bits > 64:
            v = int.from_bytes(rng.bytes(bits // 8), "big") if rng.random() < 0.3 \
                else v | v << 64 | v << 128
        for _ in range(int(rng.integers(0, 6))):  # a few flipped bits
            v ^= 1 << int(rng.integers(bits))
        values.append(v % (1 << bits))
    radius = draw(st.integers(0, bits))
    return bits, values, radius


def flat_of(bits, values, tmp_path=None):
    words = (bits + 63) // 64
    hashes = np.stack([rs.int_to_words(v, words) for v in values])
    flat = rs.FlatIndex.from_arrays(np.arange(len(values)), hashes, bits)
    flat.kind, flat.fingerprint = f"test/{bits}", "fp"
    return flat


def image_pairs(flat, engine, radius):
    """Pairs of image positions that the engine says are within radius."""
    out = set()
    for i, j, d in engine.pairs(radius):
        for a, b in zip(i, j):
            for x in flat.images_of([a])[0]:
                for y in flat.images_of([b])[0]:
                    out.add((min(x, y), max(x, y)))
    for group in flat.images_of(range(len(flat.distinct))):  # identical hashes
        out |= {(min(x, y), max(x, y)) for x in group for y in group if x != y}
    return out


@pytest.mark.parametrize("name", ENGINES)
@settings(max_examples=60, deadline=None)
@given(data=hash_sets(), query_seed=st.integers(0, 2**32 - 1))
def test_search_equals_brute_force(tmp_path_factory, name, data, query_seed):
    bits, values, radius = data
    flat = flat_of(bits, values)
    engine = flat.engine(name, radius, bktree_path=str(
        tmp_path_factory.mktemp("bk") / "bk.idx"))
    rng = np.random.default_rng(query_seed)
    queries = [values[int(rng.integers(len(values)))],
               int.from_bytes(rng.bytes(32), "big") % (1 << bits)]
    for q in queries:
        pos, dist = engine.search(rs.int_to_words(q, flat.distinct.shape[1]), radius)
        got = {p: int(d) for images, d in zip(flat.images_of(pos), dist) for p in images}
        want = {p: (v ^ q).bit_count() for p, v in enumerate(values)
                if (v ^ q).bit_count() <= radius}
        assert got == want


@pytest.mark.parametrize("name", ENGINES)
@settings(max_examples=60, deadline=None)
@given(data=hash_sets())
def test_pairs_equal_brute_force(tmp_path_factory, name, data):
    bits, values, radius = data
    flat = flat_of(bits, values)
    engine = flat.engine(name, radius, all_pairs=True, bktree_path=str(
        tmp_path_factory.mktemp("bk") / "bk.idx"))
    assert image_pairs(flat, engine, radius) == brute_pairs(values, radius)
    for i, j, d in engine.pairs(radius):  # reported distances are true ones
        for a, b, dist in zip(i, j, d):
            va = rs.words_to_ints(flat.distinct[[a]])[0]
            vb = rs.words_to_ints(flat.distinct[[b]])[0]
            assert (va ^ vb).bit_count() == dist


@settings(max_examples=60, deadline=None)
@given(data=hash_sets())
def test_groups_are_the_connected_components(data):
    bits, values, radius = data
    flat = flat_of(bits, values)
    groups = rs.duplicate_groups(flat, flat.engine("auto", radius, True), radius)
    got = sorted(sorted(int(p) for p in g) for g in groups)
    parent = list(range(len(values)))  # reference union-find, plain Python

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for i, j in brute_pairs(values, radius):
        parent[root(i)] = root(j)
    comps = {}
    for p in range(len(values)):
        comps.setdefault(root(p), []).append(p)
    assert got == sorted(c for c in comps.values() if len(c) > 1)


@pytest.mark.parametrize("parts", [2, 3, 4, 5, 8])
def test_mih_is_exact_for_every_chunk_count(parts):
    rng = np.random.default_rng(parts)
    base = rng.integers(0, 2**63, size=50, dtype=np.uint64)
    values = [int(b) ^ (1 << int(k)) for b in base for k in rng.integers(0, 64, 4)]
    flat = flat_of(64, values)
    engine = rs.MIHEngine(flat.distinct, 64, parts)
    for radius in (0, 1, 3, 7, 12):
        for q in values[:20]:
            pos, _ = engine.search(rs.int_to_words(q, 1), radius)
            want = {p for p, v in enumerate(rs.words_to_ints(flat.distinct))
                    if (v ^ q).bit_count() <= radius}
            assert set(pos.tolist()) == want


def test_choose_engine_prefers_scan_when_small_and_mih_when_large():
    assert rs.choose_engine(1000, 64, 1, 5, False) == "scan"
    assert rs.choose_engine(1_000_000, 64, 1, 5, False) == "mih"
    assert rs.choose_engine(1_000_000, 64, 1, 4, True) == "mih"


def test_chunks_cover_every_bit_once_and_never_cross_a_word():
    for bits, words in [(64, 1), (256, 4), (144, 3), (42, 1), (196, 4)]:
        for parts in (2, 3, 5, 7, 16):
            chunks = rs.plan_chunks(bits, words, parts)
            covered = []
            for c in chunks:
                assert 0 <= c.shift and c.shift + c.bits <= 64
                covered += [(words - 1 - c.word) * 64 + c.shift + b for b in range(c.bits)]
            assert sorted(covered) == list(range(bits))


def test_pair_threshold_tightens_for_low_detail():
    assert rs.pair_threshold(12, 3.3, 2.0) == 12
    assert rs.pair_threshold(12, 3.3, 1.25) == 6
    assert rs.pair_threshold(12, 0.2, 3.0) == 6   # never below half
    assert rs.pair_threshold(12, 1.625, 4.0) == 9


@settings(max_examples=40, deadline=None)
@given(data=hash_sets(), seed=st.integers(0, 2**32 - 1))
def test_adaptive_groups_equal_brute_force(data, seed):
    bits, values, radius = data
    rng = np.random.default_rng(seed)
    detail = rng.uniform(0, 4, len(values)).astype(np.float32)
    words = (bits + 63) // 64
    hashes = np.stack([rs.int_to_words(v, words) for v in values])
    flat = rs.FlatIndex.from_arrays(np.arange(len(values)), hashes, bits, detail=detail)
    groups = rs.duplicate_groups(flat, flat.engine("auto", radius, True), radius, True)
    got = sorted(sorted(int(p) for p in g) for g in groups)
    # reference: distinct hashes joined when within the threshold of their
    # least detailed images; identical hashes always together
    ref = {}
    for p, v in enumerate(values):
        ref.setdefault(v, []).append(p)
    keys = list(ref)
    least = {k: min(detail[p] for p in ref[k]) for k in keys}
    parent = {k: k for k in keys}

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if (a ^ b).bit_count() <= rs.pair_threshold(radius, least[a], least[b]):
                parent[root(a)] = root(b)
    comps = {}
    for k in keys:
        comps.setdefault(root(k), []).extend(ref[k])
    assert got == sorted(sorted(c) for c in comps.values() if len(c) > 1)


def flat_with_centres(bits, values, seed):
    """values as main hashes; each centre region a shuffle of them, so the
    centre views pair up other images than the main hashes do."""
    rng = np.random.default_rng(seed)
    words = (bits + 63) // 64
    centres = [[values[k] for k in rng.permutation(len(values))]
               for _ in rs.CENTRES]
    as_words = lambda vs: np.stack([rs.int_to_words(v, words) for v in vs])
    flat = rs.FlatIndex.from_arrays(
        np.arange(len(values)), as_words(values), bits,
        centres=np.stack([as_words(c) for c in centres], axis=1))
    flat.kind, flat.fingerprint = f"test/{bits}", "fp"
    return flat, centres


def view_distance(values, centres, i, j):
    return min((values[i] ^ values[j]).bit_count(),
               *((c[i] ^ c[j]).bit_count() for c in centres))


@pytest.mark.parametrize("name", ENGINES)
@settings(max_examples=30, deadline=None)
@given(data=hash_sets(), seed=st.integers(0, 2**32 - 1))
def test_groups_with_centre_views_equal_brute_force(tmp_path_factory, name,
                                                    data, seed):
    bits, values, radius = data
    flat, centres = flat_with_centres(bits, values, seed)
    bk = str(tmp_path_factory.mktemp("bk") / "bk.idx")
    groups = rs.duplicate_groups(flat, flat.engine(name, radius, True, bk), radius,
                                 views=flat.view_engines(name, radius, True, bk))
    got = sorted(sorted(int(p) for p in g) for g in groups)
    assert got == brute_groups(
        len(values), lambda i, j: view_distance(values, centres, i, j) <= radius)


@pytest.mark.parametrize("name", ENGINES)
@settings(max_examples=30, deadline=None)
@given(data=hash_sets(), seed=st.integers(0, 2**32 - 1))
def test_search_with_centre_views_equals_brute_force(tmp_path_factory, name,
                                                     data, seed):
    """Every image whose whole picture or a centre region is within the
    radius, shown with its whole-picture distance whenever that matches."""
    bits, values, radius = data
    flat, centres = flat_with_centres(bits, values, seed)
    bk = str(tmp_path_factory.mktemp("bk") / "bk.idx")
    engine = flat.engine(name, radius, False, bk)
    views = flat.view_engines(name, radius, False, bk)
    q = int(np.random.default_rng(seed).integers(len(values)))
    query = rs.HashResult("q", hash=values[q], extra=rs.pack_hashes(
        [c[q] for c in centres], bits))
    _, hits = rs._search_one(query, flat, engine, radius, views)
    got = {p: (h.bits, h.code) for p, h in hits.items()}
    want = {}
    for p, v in enumerate(values):
        d = [(values[q] ^ v).bit_count()] + \
            [(c[q] ^ c[p]).bit_count() for c in centres]
        if d[0] <= radius:
            want[p] = (d[0], -1)
        elif min(d[1:]) <= radius:
            k = int(np.argmin(d[1:]))
            want[p] = (d[1 + k], len(rs.VARIANTS) + k)
    assert got == want


@pytest.mark.parametrize("size", [8, 16])
def test_hash_arrays_read_in_blocks_give_what_was_written(tmp_path, size):
    """The index is read from SQLite a block of rows at a time (bounded
    memory); any block size gives the hashes, centres and details stored."""
    spec = rs.HashSpec(size=size, centres=True)
    store = rs.Store(str(tmp_path / "images.db"), create=True)
    store.start_kind(spec)
    rng = np.random.default_rng(size)
    written = {}
    for i in range(11):
        values = [int.from_bytes(rng.bytes(spec.bits // 8), "big")
                  for _ in range(1 + spec.extra_count)]
        written[f"/c/{i}.jpg"] = (values, float(i) / 4)
        store.upsert([rs.ImageRow(
            f"/c/{i}.jpg", 10 + i, 1, bytes(16), values[0], 64, 48, None,
            extra=rs.pack_hashes(values[1:], spec.bits), detail=i / 4)],
            spec.bits)
    whole = store.hash_arrays(spec.words, spec.extra_count)
    ids, hashes, extra, details = whole
    rows = store.rows_by_id(ids)
    for k, row_id in enumerate(ids):
        values, detail = written[rows[int(row_id)].path]
        assert rs.words_to_ints(hashes[k:k + 1]) == values[:1]
        assert rs.words_to_ints(extra[k]) == values[1:]
        assert details[k] == detail
    for block in (1, 3, 64):
        for a, b in zip(whole, store.hash_arrays(spec.words, spec.extra_count,
                                                 block=block)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    store.close()
