"""Large collections (session 8): a search reads only the blocks of the
search tables (search.idx) it needs, checks each block it reads, and finds
exactly what the whole index finds, in the same order.  Nothing here is
timed: bench/bench_peers.py --scale measures the speed."""

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import rs, write_params
from test_scale import clustered

KEY = b"k" * 32


def some_arrays(rng) -> dict:
    """Arrays of every kind a block file holds, some across blocks, one
    empty, one exactly a block."""
    return {"a": rng.integers(0, 2**63, 30000, dtype=np.int64).astype(np.uint64),
            "b": rng.random(1030).astype(np.float32),
            "empty": np.zeros(0, np.int64),
            "block": np.arange(rs.BLOCK_BYTES // 4, dtype=np.uint32),
            "grid": rng.integers(0, 9, (70, 3), dtype=np.int64)}


def test_block_file_gives_back_every_array(tmp_path):
    rng = np.random.default_rng(1)
    arrays = some_arrays(rng)
    path = str(tmp_path / "t.idx")
    rs.write_blocks(path, {"format": 1}, arrays, KEY)
    f = rs.BlockFile(path, KEY)
    assert f.header["format"] == 1
    for name, a in arrays.items():
        assert np.array_equal(f.whole(name), a) and f.whole(name).dtype == a.dtype
    f = rs.BlockFile(path, KEY)  # in parts, on a fresh reader
    idx = rng.integers(0, 30000, 8)
    assert np.array_equal(f.take("a", idx), arrays["a"][idx])
    first = rng.integers(0, 29900, 8)
    count = rng.integers(0, 100, 8)
    want = np.concatenate([arrays["a"][s:s + c] for s, c in zip(first, count)])
    assert np.array_equal(f.ranges("a", first, count), want)
    assert not f.arrays["a"].checked.all()  # only what was read is checked


def flip(path: str, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0x10]))


def test_a_changed_block_is_refused_when_read(tmp_path):
    """One byte of one block changed: reading that block raises
    CacheDamaged, blocks elsewhere still read right."""
    rng = np.random.default_rng(2)
    arrays = some_arrays(rng)
    path = str(tmp_path / "t.idx")
    rs.write_blocks(path, {}, arrays, KEY)
    at = rs.BlockFile(path, KEY).header["arrays"]["a"]["at"]
    flip(path, at + rs.BLOCK_BYTES + 5)  # in a's second block
    f = rs.BlockFile(path, KEY)
    per_block = rs.BLOCK_BYTES // 8
    assert np.array_equal(f.take("a", [0, 1, per_block - 1]),
                          arrays["a"][[0, 1, per_block - 1]])
    with pytest.raises(rs.CacheDamaged):
        f.take("a", [per_block + 3])
    with pytest.raises(rs.CacheDamaged):
        rs.BlockFile(path, KEY).ranges("a", [per_block - 2], [4])
    with pytest.raises(rs.CacheDamaged):
        rs.BlockFile(path, KEY).whole("a")
    assert np.array_equal(f.whole("b"), arrays["b"])


@pytest.mark.parametrize("where", ["digests", "header", "padding"])
def test_changed_digests_header_or_padding_are_refused(tmp_path, where):
    rng = np.random.default_rng(3)
    arrays = some_arrays(rng)
    path = str(tmp_path / "t.idx")
    rs.write_blocks(path, {"fingerprint": "x"}, arrays, KEY)
    spec = rs.BlockFile(path, KEY).header["arrays"]["b"]
    size = os.path.getsize(path)
    at = {"digests": spec["digests_at"] + 3, "header": size - 30,
          "padding": spec["at"] + 1030 * 4 + 7}[where]
    flip(path, at)
    with pytest.raises(rs.CacheDamaged):
        rs.BlockFile(path, KEY).whole("b")


def test_wrong_key_cut_file_or_crafted_header_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    path = str(tmp_path / "t.idx")
    rs.write_blocks(path, {}, some_arrays(rng), KEY)
    with pytest.raises(rs.CacheDamaged):
        rs.BlockFile(path, b"other key")
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.idx")
    with open(cut, "wb") as fh:
        fh.write(data[:len(data) // 2])
    with pytest.raises(rs.CacheDamaged):
        rs.BlockFile(cut, KEY)
    # a header that moves an array somewhere else, signed with another key
    f = rs.BlockFile(path, KEY)
    head = dict(f.header)
    head["arrays"] = dict(head["arrays"])
    head["arrays"]["a"] = dict(head["arrays"]["a"], shape=[10**6])
    del head["arrays"], head["block"], head["mac"]
    crafted = str(tmp_path / "crafted.idx")
    rs.write_blocks(crafted, head, {"a": np.zeros(10**5, np.uint64)}, b"guess")
    with pytest.raises(rs.CacheDamaged):
        rs.BlockFile(crafted, KEY)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_folder_in_place_of_the_tables_is_refused(tmp_path):
    """Not read (a FIFO would block the search), refused at once."""
    os.mkfifo(tmp_path / "fifo.idx")
    (tmp_path / "folder.idx").mkdir()
    for name in ("fifo.idx", "folder.idx"):
        with pytest.raises((rs.CacheDamaged, OSError)):
            rs.BlockFile(str(tmp_path / name), KEY)


def brute_near(values: np.ndarray, queries: np.ndarray, radius: int) -> list:
    d = np.bitwise_count(queries[:, None] ^ values[None, :])
    qi, rows = np.nonzero(d <= radius)
    return list(zip(qi.tolist(), rows.tolist(), d[qi, rows].tolist()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000),
       radius=st.integers(0, 16), asked=st.integers(1, 40),
       bits=st.sampled_from([64, 64, 40, 16]))
def test_table_lookups_equal_brute_force(tmp_path_factory, seed, n, radius,
                                         asked, bits):
    """Every row of a set within radius of each query, by query then row,
    with its distance and hash, for any size, radius, number of queries
    and hash width: a set read whole (scan_near) and a set looked up in
    its tables (the windows)."""
    rng = np.random.default_rng(seed)
    values = clustered(rng, n, 1, flips=4)[:, 0] >> np.uint64(64 - bits)
    flat = rs.FlatIndex.from_arrays(np.arange(n), values[:, None], bits,
                                    windows=values[:, None, None])
    path = str(tmp_path_factory.mktemp("t") / "search.idx")
    flat.kind, flat.key, flat.fingerprint = "k", KEY, "f"
    rs.save_tables(path, flat)
    tables = rs.SearchTables(path, KEY, _spec_of_kind("k", bits), "f")
    queries = np.concatenate([values[rng.integers(0, n, asked // 2)], rng.integers(
        0, 2**63, asked - asked // 2, dtype=np.int64).astype(np.uint64)
        >> np.uint64(64 - bits)])
    want = brute_near(values, queries, radius)
    for name in ("whole", "windows"):
        qi, rows, d, vals = tables.near(name, queries, radius)
        assert list(zip(qi.tolist(), rows.tolist(), d.tolist())) == want
        assert np.array_equal(vals, values[rows])
    for pairs in (0, 10**9):  # scan_near one pass for all, one per query
        qi, rows, d = rs.scan_near(values, queries, radius, bits, pairs)
        assert list(zip(qi.tolist(), rows.tolist(), d.tolist())) == want
    assert "windows.v0" in tables.file and "whole" in tables.file


def _spec_of_kind(kind: str, bits: int = 64):
    """A hash spec of `bits` bits whose kind is `kind` (the tables' header
    names it)."""
    class Spec:
        pass
    Spec.kind, Spec.bits, Spec.words = kind, bits, 1
    return Spec


def flat_with_everything(rng, n: int, v: int, c: int, k: int):
    """A one-word FlatIndex with orientations, centres, content boxes and
    windows, many of them a few bits from image 0's: (flat, query)."""
    base = clustered(rng, n * (1 + v + c + 1 + k), 1, flips=3)[:, 0]
    q = rng.integers(0, 2**63, 1 + v + c + 1 + k, dtype=np.int64).astype(
        np.uint64)

    def near(shape, p_near=0.3):
        """Random hashes, some a few bits from one of the query's."""
        out = base[:math.prod(shape)].reshape(shape).copy()
        pick = rng.random(shape) < p_near
        src = q[rng.integers(0, len(q), shape)]
        bits = rng.integers(0, 64, shape + (6,)).astype(np.uint64)
        on = rng.random(shape + (6,)) < 0.5
        noise = np.bitwise_or.reduce(np.where(on, np.left_shift(
            np.uint64(1), bits), np.uint64(0)), axis=-1)
        return np.where(pick, src ^ noise, out)
    hashes = near((n, 1))
    hashes[rng.integers(0, n, n // 5)] = hashes[rng.integers(0, n, n // 5)]
    boxes = np.where(rng.random(n) < 0.4, rs.pack_box((0.1, 0.1, 0.9, 0.8)),
                     rs.FULL_BOX_WORD).astype(np.uint64)
    flat = rs.FlatIndex.from_arrays(
        np.arange(n) * 3 + 7, hashes, 64, variants=near((n, v, 1)),
        detail=rng.choice(np.array([0.3, 1.9, 2.0, 2.6, 3.5], np.float32), n),
        centres=near((n, c, 1)), content=near((n, 1, 1)), boxes=boxes,
        windows=near((n, k, 1)))
    box = rs.pack_box((0.2, 0.1, 0.9, 0.9)) if rng.random() < 0.5 else \
        rs.FULL_BOX_WORD
    extra = [int(x) for x in q[1:1 + v + c + 1]] + [box] + \
        [int(x) for x in q[2 + v + c:]]
    query = rs.HashResult("q", hash=int(q[0]), detail=float(
        rng.choice([1.0, 2.2, 3.4])), extra=rs.pack_hashes(extra, 64))
    return flat, query


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 400),
       radius=st.integers(0, 16), turned=st.booleans(),
       adaptive=st.booleans())
def test_search_from_tables_is_the_whole_index_search(
        tmp_path_factory, seed, n, radius, turned, adaptive):
    """_search_one from the tables gives the same hits as from the whole
    index (brute-force scans: the engine "scan", the windows scanned), in
    the same order, with the same match codes: every stage (orientations,
    centres, content boxes both ways, windows both ways, turned windows)."""
    rng = np.random.default_rng(seed)
    flat, query = flat_with_everything(rng, n, 3, 2, 5)
    flat.kind, flat.key, flat.fingerprint = "k", KEY, "f"
    path = str(tmp_path_factory.mktemp("t") / "search.idx")
    rs.save_tables(path, flat)
    tables = rs.SearchTables(path, KEY, _spec_of_kind("k"), "f")
    regions = flat.region_engines("scan", radius, False, "")
    regions.turned = turned
    _, want = rs._search_one(query, flat, flat.engine("scan", radius),
                             radius, regions, adaptive)
    index = rs.TableIndex(tables)
    _, got = rs._search_one(query, index, rs.TableEngine(tables, "whole"),
                            radius, index.regions(radius, turned), adaptive)
    assert list(got.items()) == list(want.items())
    assert [int(index.ids[p]) for p in got] == [int(flat.ids[p]) for p in want]


def test_tables_of_another_database_or_kind_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    flat, _ = flat_with_everything(rng, 50, 2, 1, 3)
    flat.kind, flat.key, flat.fingerprint = "k", KEY, "f"
    path = str(tmp_path / "search.idx")
    rs.save_tables(path, flat)
    rs.SearchTables(path, KEY, _spec_of_kind("k"), "f")
    with pytest.raises(rs.CacheDamaged):  # the database changed
        rs.SearchTables(path, KEY, _spec_of_kind("k"), "g")
    with pytest.raises(rs.CacheDamaged):  # other hashes
        rs.SearchTables(path, KEY, _spec_of_kind("j"), "f")


# ---- the whole tool: real images, main() ----

def draw(path, seed: int, size=(160, 120)) -> None:
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        d.ellipse([x, y, x + rng.integers(10, 60), y + rng.integers(10, 60)],
                  fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    im.save(path, quality=90)


def results(folder) -> tuple:
    with open(os.path.join(folder, "out", "search.json"), encoding="utf-8") as fh:
        doc = json.load(fh)
    doc.pop("seconds", None)
    doc.pop("created", None)
    return json.dumps(doc, sort_keys=True)


@pytest.fixture
def small_collection(tmp_path, monkeypatch):
    """Twelve drawn pictures, copies of two of them, a query folder; the
    tables used from the first image on."""
    from PIL import Image
    monkeypatch.setattr(rs, "SEARCH_TABLES_FROM", 0)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "queries").mkdir()
    for seed in range(12):
        draw(tmp_path / "imgs" / f"p{seed}.jpg", seed)
    im = Image.open(tmp_path / "imgs" / "p1.jpg")
    im.resize((120, 90)).save(tmp_path / "imgs" / "p1_small.jpg")
    im.crop((10, 10, 150, 110)).save(tmp_path / "queries" / "p1_crop.jpg")
    im.resize((140, 105)).save(tmp_path / "queries" / "p1_less.jpg")
    Image.open(tmp_path / "imgs" / "p2.jpg").rotate(90, expand=True).save(
        tmp_path / "queries" / "p2_turned.jpg")
    params = write_params(tmp_path, matching="fast")
    assert rs.main(["build", "--params", params, "-q"]) == 0
    return tmp_path, params


def test_search_writes_the_tables_then_answers_from_them(small_collection,
                                                         capsys):
    """The first search reads the whole index and writes search.idx; the
    next reads the tables: the same result files."""
    folder, params = small_collection
    tables = folder / "index" / rs.SEARCH_NAME
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert tables.is_file()
    first = results(folder)
    assert "p1_small.jpg" in first and "imgs/p2.jpg" in first
    stamp = os.stat(tables).st_mtime_ns
    os.unlink(folder / "index" / rs.INDEX_NAME)  # the tables answer alone
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert results(folder) == first
    assert os.stat(tables).st_mtime_ns == stamp  # read, not written again
    assert not (folder / "index" / rs.INDEX_NAME).exists()


def test_no_tables_below_their_size(small_collection, monkeypatch):
    folder, params = small_collection
    monkeypatch.setattr(rs, "SEARCH_TABLES_FROM", 13)  # 13 images stored
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert (folder / "index" / rs.SEARCH_NAME).is_file()
    os.unlink(folder / "index" / rs.SEARCH_NAME)
    monkeypatch.setattr(rs, "SEARCH_TABLES_FROM", 14)
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert not (folder / "index" / rs.SEARCH_NAME).exists()


def test_damaged_tables_give_the_same_results_and_are_rewritten(
        small_collection, capsys):
    folder, params = small_collection
    assert rs.main(["search", "--params", params, "-q"]) == 0
    want = results(folder)
    tables = str(folder / "index" / rs.SEARCH_NAME)
    head = rs.BlockFile(tables, rs.cache_key(rs.Store(
        str(folder / "db" / rs.DB_NAME)))).header
    for name, spec in head["arrays"].items():  # a byte in every array
        if spec["shape"][0]:
            flip(tables, spec["at"] + 2)
    capsys.readouterr()
    assert rs.main(["search", "--params", params]) == 0
    assert "damaged" in capsys.readouterr().err
    assert results(folder) == want
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert results(folder) == want  # from the tables written again
    rs.BlockFile(tables, rs.cache_key(rs.Store(
        str(folder / "db" / rs.DB_NAME)))).whole("windows.v0")


def test_tables_older_than_the_database_are_not_used(small_collection):
    """After an update adds a copy, the search finds it (the tables are
    rebuilt, not read)."""
    from PIL import Image
    folder, params = small_collection
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert "p3_copy.jpg" not in results(folder)
    Image.open(folder / "imgs" / "p1.jpg").save(folder / "imgs" / "p3_copy.jpg",
                                                quality=70)
    assert rs.main(["update", "--params", params, "-q"]) == 0
    assert rs.main(["search", "--params", params, "-q"]) == 0
    assert "p3_copy.jpg" in results(folder)
