"""Large collections: the faster paths of find_duplicates and search give
exactly what the plain ones give (engines against brute force, grouping many
components at once against one at a time, results written in bulk against
the per-row writers).  Nothing here is timed: bench/bench_peers.py --scale
measures the speed."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import rs, run_json, write_params


def clustered(rng, n: int, words: int, flips: int = 3) -> np.ndarray:
    """(n, words) uint64 hashes: a few centres, each copy a few bits off."""
    centres = rng.integers(0, 2**64 - 1, (max(1, n // 6), words),
                           dtype=np.uint64, endpoint=True)
    out = centres[rng.integers(0, len(centres), n)]
    for _ in range(flips):
        bit = rng.integers(0, 64, (n, words)).astype(np.uint64)
        on = rng.random((n, words)) < 0.5
        out = out ^ np.where(on, np.left_shift(np.uint64(1), bit), np.uint64(0))
    return out


def brute_cross(queries: np.ndarray, hashes: np.ndarray, radius: int) -> set:
    d = np.bitwise_count(queries[:, None, :] ^ hashes[None, :, :]).sum(axis=2)
    i, j = np.nonzero(d <= radius)
    return {(a, b, int(d[a, b])) for a, b in zip(i.tolist(), j.tolist())}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), words=st.sampled_from([1, 4]),
       parts=st.integers(2, 6), radius=st.integers(0, 12))
def test_mih_cross_equals_brute_force(seed, words, parts, radius):
    """Queries against indexed hashes (orientations and whole hashes
    against the windows): every pair within the radius, each once, in
    (query, hash) order, whatever the word count."""
    rng = np.random.default_rng(seed)
    hashes = np.unique(clustered(rng, 300, words), axis=0)
    queries = np.concatenate([clustered(rng, 40, words), hashes[:20]])
    engine = rs.MIHEngine(hashes, 64 * words, parts)
    got = [(int(a), int(b), int(c)) for i, j, d in engine.cross(queries, radius)
           for a, b, c in zip(i, j, d)]
    assert set(got) == brute_cross(queries, hashes, radius)
    assert len(got) == len(set(got)) and got == sorted(got)


def region_flat(seed: int, n: int = 60, words: int = 1) -> rs.FlatIndex:
    """An index with every kind of extra hash, alike within clusters, and
    details from flat to busy (adaptive limits and window weights vary)."""
    rng = np.random.default_rng(seed)
    whole = clustered(rng, n, words)
    lead = rng.integers(0, n, n)
    extra = lambda k: clustered(rng, n * k, words).reshape(n, k, words)
    variants, centres, windows = extra(7), extra(2), extra(80)
    windows[:, :40] = whole[lead][:, None, :] ^ np.uint64(1)  # crops match
    content = whole[:, None, :] ^ np.uint64(6)
    boxes = np.where(rng.random(n) < 0.3, np.uint64(123),
                     np.uint64(rs.FULL_BOX_WORD))
    detail = rng.choice([0.3, 1.4, 2.5, 3.3, 5.0], n).astype(np.float32)
    return rs.FlatIndex.from_arrays(np.arange(n), whole, 64 * words,
                                    variants=variants, detail=detail,
                                    centres=centres, content=content,
                                    boxes=boxes, windows=windows)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_near_tables_of_many_components_equal_one_at_a_time(seed, adaptive,
                                                            monkeypatch):
    """near_tables cuts its calls by component, any block size: each table
    is what match_distances gives for that component alone."""
    flat = region_flat(seed)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, 60), 9, replace=False))
    comps = [c for c in np.split(rng.permutation(60), cuts) if len(c)]
    one = [rs.near_tables([c], flat, 12, adaptive)[0] for c in comps]
    for block in (1, 50, 10**6):
        monkeypatch.setattr(rs, "NEAR_BLOCK", block)
        many = rs.near_tables(comps, flat, 12, adaptive)
        for c, a, b in zip(comps, one, many):
            assert np.array_equal(a.near, b.near) and a.whole.all()
            k = len(c)
            leads, others = np.repeat(c, k), np.tile(c, k)
            limit = rs.pair_threshold(12, flat.detail[leads],
                                      flat.detail[others]) if adaptive else 12
            want = flat.match_distances(leads, others).effective <= limit
            assert np.array_equal(b.near, want.reshape(k, k))


def distinct_window_cross(windows, queries, radius):
    """What find_duplicates did before WindowRows: the windows made
    distinct (an index of their own), crossed, then expanded to rows."""
    rows = windows.reshape(-1, windows.shape[2])
    view = rs.FlatIndex.from_arrays(np.arange(len(rows)), rows, 64)
    out = []
    for qi, j, d in rs.ScanEngine(view.distinct).cross(queries, radius):
        at, r = view.expand(j)
        out += zip(qi[at].tolist(), r.tolist(), d[at].tolist())
    return out


@pytest.mark.parametrize("name", ["scan", "mih", "bktree", "auto"])
@pytest.mark.parametrize("words", [1, 4])
def test_window_rows_cross_in_the_order_of_distinct_windows(name, words):
    """Equal windows (copies, flat pictures) give each of their rows; the
    order is that of the distinct windows' engine, so every edge list and
    every verification that follows it is as before."""
    rng = np.random.default_rng(words)
    windows = clustered(rng, 40 * 80, words).reshape(40, 80, words)
    windows[5] = windows[3]  # an exact copy: all 80 windows equal
    queries = np.concatenate([clustered(rng, 30, words), windows[3, :10]])
    rows = rs.WindowRows.of(windows, 64 * words, name, 6)
    assert rows.engine.name in ("scan", "mih")
    for radius in (0, 3, 6):
        got = [(int(a), int(b), int(c)) for qi, r, d in rows.cross(queries, radius)
               for a, b, c in zip(qi, r, d)]
        assert got == distinct_window_cross(windows, queries, radius)
        assert all(rows.owner[r] == r // 80 and rows.code[r] ==
                   rs.WINDOW_CODE + r % 80 for _, r, _ in got)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([1, 5, 16, 22, 32, 40]),
       n=st.integers(0, 3000))
def test_stable_order_is_a_stable_argsort(seed, bits, n):
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 2**bits, n, dtype=np.uint64)
    got = rs.stable_order(vals, bits)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.argsort(vals, kind="stable"))


# ---------------------------------------------- the windows' cache file --

def test_checked_order_takes_only_the_order_sorting_would_give():
    rng = np.random.default_rng(5)
    vals = rng.integers(0, 16, 500).astype(np.uint64)
    good = rs.stable_order(vals, 4)
    assert np.array_equal(rs._checked_order(good.astype(np.int32), vals), good)
    swapped = good.copy()
    swapped[[0, -1]] = swapped[[-1, 0]]
    twice = good.copy()
    twice[1] = twice[0]
    ties = good.copy()
    same = np.flatnonzero(vals[good][1:] == vals[good][:-1])[0]
    ties[[same, same + 1]] = ties[[same + 1, same]]  # a tie out of order
    for bad in (swapped, twice, ties, good[:-1], good + 1, good - 1,
                good.astype(np.float64)):
        with pytest.raises(ValueError):
            rs._checked_order(bad, vals)


def window_run(capsys, params):
    """find_duplicates' groups (paths, how each matched)."""
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    return [[(m["path"], m["distance"], m["how"] and m["how"]["region"])
             for m in g["images"]] for g in doc["groups"]]


def test_windows_cache_is_written_read_and_rebuilt_when_not_trusted(
        tmp_path, capsys):
    """The windows' MIH orders are saved in bk_dir/windows.idx and read back
    (the same groups); a damaged file, one from another database state and
    one whose orders (correctly signed) do not sort the windows are each
    sorted again and rewritten, with the same groups."""
    from test_candidates import crop, photo
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for seed in range(1, 7):
        photo(seed).save(imgs / f"p{seed}.jpg", quality=90)
    crop(photo(1), 0.1, 0.05, 0.9, 0.85).save(imgs / "crop.jpg", quality=88)
    params = write_params(tmp_path, engine="mih", matching="fast")
    cache = tmp_path / "index" / rs.WINDOWS_NAME
    first = window_run(capsys, params)
    assert any("window" in str(m[2]) for g in first for m in g)
    assert cache.is_file()
    written = cache.read_bytes()
    assert window_run(capsys, params) == first
    assert cache.read_bytes() == written  # read, not written again

    data = bytearray(written)
    data[-5] ^= 0xFF  # damaged: its checksum fails
    cache.write_bytes(bytes(data))
    assert window_run(capsys, params) == first
    assert cache.read_bytes() == written

    store = rs.Store(str(tmp_path / "db" / rs.DB_NAME))
    key = rs.cache_key(store)
    store.close()
    header, arrays = rs.read_container(str(cache), key)
    wrong = {k: np.roll(v, 1) for k, v in arrays.items()}  # signed, unsorted
    rs.write_container(str(cache), header, wrong, key)
    assert window_run(capsys, params) == first
    assert cache.read_bytes() == written

    other = dict(header, fingerprint="another state of the database")
    rs.write_container(str(cache), other, arrays, key)
    assert window_run(capsys, params) == first
    assert cache.read_bytes() == written


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_container_arrays_read_back_as_written(tmp_path, n):
    """read_container's views of one read: every array as written (dtype,
    shape, values, writable), also when a float32 array leaves the next
    one unaligned; any changed byte is refused."""
    rng = np.random.default_rng(n)
    arrays = {"detail": rng.random(n).astype(np.float32),
              "hashes": rng.integers(0, 2**63, (n, 3)).astype(np.uint64),
              "ids": np.arange(n, dtype=np.int64),
              "small": rng.integers(0, 9, (n, 2, 1)).astype(np.uint16)}
    path = str(tmp_path / "c.idx")
    rs.write_container(path, {"kind": "test"}, arrays, b"key")
    header, back = rs.read_container(path, b"key")
    assert header["kind"] == "test" and list(back) == list(arrays)
    for name, a in arrays.items():
        b = back[name]
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array_equal(a, b) and b.flags.writeable
    data = open(path, "rb").read()
    for at in (len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[at] ^= 1
        open(path, "wb").write(bytes(bad))
        with pytest.raises(ValueError):
            rs.read_container(path, b"key")
    open(path, "wb").write(data + b"\0")
    with pytest.raises(ValueError):
        rs.read_container(path, b"key")


def turned_before(found, variants, windows, flat, radius, weights):
    """_search_turned as it was (a sum over the word axis, small blocks)."""
    r = rs.code_radius(radius, rs.WINDOW_CODE)
    for k, query in enumerate(variants):
        for start in range(len(flat.windows)):
            d = np.bitwise_count(flat.windows[start] ^ query).sum(axis=1)
            for w in np.flatnonzero(d <= r).tolist():
                if weights[start] < np.inf and d[w] * weights[start] <= radius:
                    rs._keep_best(found, start, int(d[w]), weights[start],
                                  int(rs.turned_code(k, w)),
                                  k, rs.WINDOW_CODE + w)
    d = np.bitwise_count(flat.variants[:, :, None, :] ^ windows[None, None]
                         ).sum(axis=3)
    for p, k, w in zip(*np.nonzero(d <= r)):
        p, k, w = int(p), int(k), int(w)
        if weights[p] < np.inf and d[p, k, w] * weights[p] <= radius:
            rs._keep_best(found, p, int(d[p, k, w]), weights[p],
                          int(rs.turned_code(k, w)), rs.WINDOW_CODE + w, k)


@pytest.mark.parametrize("words", [1, 4])
@pytest.mark.parametrize("seed", [1, 2])
def test_search_turned_finds_what_it_found_before(seed, words):
    """One search's turned windows (its orientations against the stored
    windows, the stored orientations against its windows): the same hits,
    one word or four."""
    flat = region_flat(seed, n=300, words=words)
    rng = np.random.default_rng(seed)
    q = int(rng.integers(0, 300))
    variants = flat.windows[q, :7] ^ np.uint64(2)  # a turned crop of q...
    windows = flat.variants[(q + 1) % 300, :3].repeat(30, axis=0)[:80] \
        ^ np.uint64(1)  # ...and the crop of a turned copy of another
    weights = rs.window_weight(3.3, flat.detail)
    got, want = {}, {}
    rs._search_turned(got, variants, windows, flat, 12, weights)
    turned_before(want, variants, windows, flat, 12, weights)
    assert got == want and got
