"""PgStore: every method, exact in-database search, several writers, locks.

Runs against a throw-away server (tests/pg_server.py); skipped with the
reason when psycopg or the server binaries are missing, failed instead when
REVERSE_SEARCH_REQUIRE_PG=1.  The pure functions are tested without a server.
"""

import dataclasses
import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, rs
from pg_server import PASSWORD, PASSWORD_USER

pgs = rs  # the PostgreSQL section of reverse_search.py

SPEC = rs.HashSpec()  # dhash, 64 bits
SPEC256 = rs.HashSpec(size=16)


def row(path, h=None, size=100, **kw):
    """An ImageRow as sync_store writes it (extra b"" when hashed)."""
    kw.setdefault("extra", None if h is None else b"")
    kw.setdefault("digest", None if h is None else hashlib.blake2b(
        f"{path}{h}".encode("utf-8", "surrogateescape"), digest_size=16).digest())
    return rs.ImageRow(path, size, 1_700_000_000 * 10**9 + size, hash=h,
                       width=None if h is None else 64,
                       height=None if h is None else 48, **kw)


def counts(store):
    """(rows hashed, rows that failed), read as the operations read rows."""
    rows = list(store.iter_rows())
    return (sum(r.hash is not None for r in rows),
            sum(r.error is not None for r in rows))


def writers(store):
    """[(host, root, rows)]: which machine and folder wrote each row."""
    cur = store.db.conn.execute("SELECT host, root, count(*) FROM images "
                             "GROUP BY host, root")
    return [(h, None if r is None else os.fsdecode(bytes(r)), n)
            for h, r, n in cur]


def open_store(url, spec=SPEC, roots=("/c",)):
    store = pgs.PgStore(url, create=True)
    store.use_roots(list(roots))
    store.start_kind(spec)
    return store


def clustered(rng, n, bits):
    """Random hashes plus clusters of near copies and exact duplicates."""
    out = []
    while len(out) < n:
        centre = int.from_bytes(rng.bytes((bits + 7) // 8), "big") % (1 << bits)
        for _ in range(int(rng.integers(1, 12))):
            v = centre
            for _ in range(int(rng.integers(0, 8))):
                v ^= 1 << int(rng.integers(bits))
            out.append(v)
    return out[:n]


def run_all(threads):
    """Start every thread, then wait for them all."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def ident(rows):
    """Rows without their ids (the two stores number rows differently); every
    other ImageRow field, so a field PgStore does not store fails here."""
    return [tuple((k, v) for k, v in dataclasses.asdict(r).items() if k != "id")
            for r in rows]


# ---- no server needed ----

def test_redact_url_drops_every_password():
    cases = {
        "postgresql://u:pw%40x@db.example:5432/photos":
            "postgresql://u@db.example:5432/photos",
        "postgresql://u@h/db?password=pw%40x&sslmode=require":
            "postgresql://u@h/db?sslmode=require",
        "postgres://u:@h/db": "postgres://u@h/db",
        "postgresql://u@h:5/db": "postgresql://u@h:5/db",
        "postgresql://%2Ftmp%2Fsock/db": "postgresql://%2Ftmp%2Fsock/db",
    }
    for url, shown in cases.items():
        assert pgs.redact_url(url) == shown
        assert "pw" not in pgs.redact_url(url)


def test_check_database_url():
    pgs.check_database_url("", "params.json")
    pgs.check_database_url("postgresql://u@h:5432/db", "params.json")
    with pytest.raises(rs.ConfigError, match="PGPASSWORD"):
        pgs.check_database_url("postgresql://u:secret@h/db", "params.json")
    with pytest.raises(rs.ConfigError, match="PGPASSWORD") as err:
        pgs.check_database_url("postgresql://u@h/db?password=secret", "p")
    assert "secret" not in str(err.value)
    with pytest.raises(rs.ConfigError, match="postgresql://"):
        pgs.check_database_url("mysql://u@h/db", "params.json")


def test_missing_driver_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import fails
    with pytest.raises(rs.StoreError, match=r'pip install "psycopg\[binary\]"'):
        pgs.PgStore("postgresql://u@127.0.0.1:1/db")


@pytest.mark.parametrize("bits", [4, 16, 36, 42, 64, 81, 256])
def test_probed_chunks_never_miss_a_neighbour(bits):
    """Pigeonhole: a hash within r differs within budget on some chunk."""
    chunks = pgs.pg_chunks(bits)
    assert sum(c.bits for c in chunks) <= bits
    spans = sorted((c.shift, c.shift + c.bits) for c in chunks)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
    assert spans[-1][1] <= bits
    rng = random.Random(bits)
    for radius in range(0, min(bits, 24) + 1):
        probed = pgs.probed_chunks(chunks, radius)
        for _ in range(300):
            a = rng.getrandbits(bits)
            b = a
            for p in rng.sample(range(bits), rng.randint(0, radius)):
                b ^= 1 << p
            assert any((c.value(a) ^ c.value(b)).bit_count() <= most
                       for _, c, most in probed)


def test_lock_key_is_signed_64_bit():
    keys = {pgs.lock_key(f"/data/{i}") for i in range(1000)}
    assert len(keys) == 1000
    assert all(-2**63 <= k < 2**63 for k in keys)


# ---- one store, every method, against SQLite's Store ----

def test_every_method_matches_sqlite(pg_url, tmp_path):
    bad = os.fsdecode(b"/c/caf\xe9.jpg")  # not UTF-8
    rows = [row("/c/b.jpg", 5, size=10), row("/c/a.jpg", 2**64 - 1, size=20),
            row("/c/sub/z.jpg", 2**63, size=10), row(bad, 7, size=30),
            row("/c/broken.jpg", error="cannot identify image file"),
            row("/c/blank.jpg", 0, size=10, low_detail=True, detail=0.25),
            row("/c/\u00e9t\u00e9.png", 12345, size=40, detail=7.5)]
    pg = open_store(pg_url)
    sq = rs.Store(str(tmp_path / "images.db"), create=True)
    sq.start_kind(SPEC)
    for store in (pg, sq):
        store.upsert(rows[:4], 64)
        store.upsert(rows[4:], 64)
        store.upsert([row("/c/a.jpg", 99, size=20)], 64)  # replaces by path
    assert ident(pg.iter_rows()) == ident(sq.iter_rows())
    assert counts(pg) == counts(sq) == (6, 1)
    assert pg.states() == sq.states()
    assert pg.hash_kind() == sq.hash_kind() == SPEC.kind
    for size in (10, 20, 30, 99):
        digests = pg.hashed_with_size(size)
        assert digests == sq.hashed_with_size(size)
        for d in digests | {b"nope"}:
            a, b = pg.hashed_by_digest(size, d), sq.hashed_by_digest(size, d)
            assert ident([a] if a else []) == ident([b] if b else [])
    assert ident(pg.low_detail_rows()) == ident(sq.low_detail_rows())
    ids, hashes, extra, details = pg.hash_arrays(1, 0)
    sids, shashes, _, sdetails = sq.hash_arrays(1, 0)
    by_id = pg.rows_by_id(ids)
    sby_id = sq.rows_by_id(sids)
    assert sorted((by_id[int(i)].path, int(h)) for i, h in zip(ids, hashes[:, 0])) \
        == sorted((sby_id[int(i)].path, int(h)) for i, h in zip(sids, shashes[:, 0]))
    assert extra.shape == (5, 0, 1) and hashes.dtype == np.uint64
    assert sorted(details.tolist()) == sorted(sdetails.tolist())
    assert details.dtype == sdetails.dtype
    assert set(by_id) == {int(i) for i in ids}
    assert all(by_id[i].id == i for i in by_id)
    # meta and fingerprint
    pg.set_meta(note="x", n=3)
    assert pg.meta()["note"] == "x" and pg.meta()["n"] == "3"
    before = pg.fingerprint()
    assert pg.delete_paths(["/c/b.jpg", bad]) == sq.delete_paths(["/c/b.jpg", bad])
    assert pg.fingerprint() != before
    assert ident(pg.iter_rows()) == ident(sq.iter_rows())
    sq.close()
    pg.close()


def test_states_and_rows_know_their_roots(pg_url):
    store = open_store(pg_url, roots=["/m/a", "/m/a/inner", "/m/b"])
    store.upsert([row("/m/a/1.jpg", 1), row("/m/a/inner/2.jpg", 2),
                  row("/m/b/3.jpg", 3), row("/m/ab/4.jpg", 4),
                  row("/m/b", 5)], 64)
    assert set(store.states(["/m/a"])) == {"/m/a/1.jpg", "/m/a/inner/2.jpg"}
    assert set(store.states(["/m/a/"])) == {"/m/a/1.jpg", "/m/a/inner/2.jpg"}
    assert set(store.states(["/m/b", "/m/ab"])) == {"/m/b/3.jpg", "/m/ab/4.jpg"}
    assert set(store.states([])) == set()
    assert len(store.states()) == 5
    import socket
    host = socket.gethostname()
    assert sorted(writers(store), key=str) == sorted(
        [(host, "/m/a", 1), (host, "/m/a/inner", 1), (host, "/m/b", 1),
         (host, None, 2)], key=str)


def test_paging_reads_everything_once(pg_url, monkeypatch):
    monkeypatch.setattr(pgs, "PG_PAGE", 7)
    store = open_store(pg_url)
    paths = [f"/c/{i:03d}.jpg" for i in range(50)] + \
        [os.fsdecode(b"/c/\xff%d.jpg" % i) for i in range(9)]
    store.upsert([row(p, i) for i, p in enumerate(paths)], 64)
    assert [r.path for r in store.iter_rows()] == paths
    assert sorted(store.states()) == sorted(paths)
    assert len(store.rows_by_id(range(1, 100))) == len(paths)


def test_start_kind_drops_other_kinds_and_bumps(pg_url):
    store = open_store(pg_url)
    store.upsert([row("/c/a.jpg", 1)], 64)
    fp = store.fingerprint()
    store.start_kind(SPEC)  # same kind: keeps rows
    assert counts(store) == (1, 0) and store.fingerprint() == fp
    store.start_kind(SPEC256)
    assert counts(store) == (0, 0) and store.fingerprint() != fp
    assert store.hash_kind() == SPEC256.kind
    assert store.meta()["chunk_layout"].startswith("hash_bytes:")


def chunk_indexes(store):
    return sorted(r[0] for r in store.db.conn.execute(
        "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'images_c%'"))


def test_chunk_indexes_wait_for_the_end_of_a_bulk_load(pg_url):
    store = open_store(pg_url)
    assert chunk_indexes(store) == []  # empty table: built by optimize()
    store.upsert([row("/c/a.jpg", 1)], 64)
    store.optimize()
    assert chunk_indexes(store) == ["images_c0", "images_c1", "images_c2"]
    store.optimize()  # idempotent
    other = open_store(pg_url, spec=SPEC256)  # kind switch empties the table
    assert chunk_indexes(other) == []
    other.upsert([row("/c/a.jpg", 1)], 256)
    open_store(pg_url, spec=SPEC256)  # rows there: update keeps them current
    assert len(chunk_indexes(other)) == 3
    assert "hash_bytes" in other.db.conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'images_c0'"
    ).fetchone()[0]


def test_no_tables_schema_version_and_exists(pg_url):
    assert not pgs.pg_store_exists(pg_url)
    with pytest.raises(rs.StoreError, match="run build first"):
        pgs.PgStore(pg_url)
    store = pgs.PgStore(pg_url, create=True)
    assert store.meta()["schema_version"] == str(pgs.PG_SCHEMA_VERSION)
    assert pgs.pg_store_exists(pg_url)
    store.set_meta(schema_version=99)
    with pytest.raises(rs.StoreError, match="newer reverse_search"):
        pgs.PgStore(pg_url)
    store.close()


def test_machines_creating_the_schema_together(pg_url):
    errors = []

    def create():
        try:
            pgs.PgStore(pg_url, create=True).close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=create) for _ in range(4)]
    run_all(threads)
    assert errors == []
    store = pgs.PgStore(pg_url)
    assert store.meta()["generation"] == "0"


def test_lost_connection_is_a_store_error(pg_url):
    store, admin = open_store(pg_url), open_store(pg_url)
    admin.db.conn.execute("SELECT pg_terminate_backend(%s)",
                       (store.db.conn.info.backend_pid,))
    with pytest.raises(rs.StoreError, match="PostgreSQL database"):
        store.hash_kind()
    with pytest.raises(rs.StoreError, match="PostgreSQL database"):
        store.upsert([row("/c/a.jpg", 1)], 64)


# ---- hashes streamed and searched inside the database ----

def test_hash_blocks_stream_everything(pg_url):
    rng = np.random.default_rng(1)
    spec = rs.HashSpec(orientations=True)
    store, v = open_store(pg_url, spec=spec), spec.variant_count
    values = [int(x) for x in rng.integers(0, 2**63, 1000)]
    packed = [rs.pack_hashes([h ^ k for k in range(1, v + 1)], 64)
              for h in values]
    store.upsert([row(f"/c/{i}.jpg", h, extra=p)
                  for i, (h, p) in enumerate(zip(values, packed))], 64)
    blocks = list(rs.copy_hash_blocks(store.url, "true", 1, v, block=128))
    assert len(blocks) >= 7
    assert all(len(b) == 4 for b in blocks)
    ids = np.concatenate([b[0] for b in blocks])
    hashes = np.concatenate([b[1] for b in blocks])
    var = np.concatenate([b[2] for b in blocks])
    assert list(ids) == sorted(ids) and len(ids) == 1000
    paths = {r.id: r.path for r in store.iter_rows()}
    for i, h, hv in zip(ids, hashes[:, 0], var[:, :, 0]):
        k = int(paths[int(i)][3:-4])
        assert int(h) == values[k]
        assert [int(x) for x in hv] == [values[k] ^ j for j in range(1, v + 1)]
    assert var.shape == (1000, v, 1)
    all_ids, all_hashes, all_var, details = store.hash_arrays(1, v)
    assert details.tolist() == [4.0] * 1000
    assert np.array_equal(all_ids, ids) and np.array_equal(all_var, var)
    with pytest.raises(rs.StoreError, match="run build"):
        store.hash_arrays(1, v - 1)  # settings changed: like SQLite's Store


def test_search_hashes_256_bits(pg_url):
    store = open_store(pg_url, spec=SPEC256)
    rng = np.random.default_rng(2)
    values = clustered(rng, 400, 256)
    store.upsert([row(f"/c/{i}.jpg", h) for i, h in enumerate(values)], 256)
    ids, hashes, _, _ = store.hash_arrays(4, 0)
    by_path = {r.path: r.id for r in store.iter_rows()}
    by_id = {i: h for i, h in zip(ids.tolist(), hashes)}
    assert [int.from_bytes(by_id[by_path[f"/c/{i}.jpg"]].astype(">u8").tobytes(),
                           "big") for i in range(len(values))] == values
    for radius in (0, 3, 9, 20):
        q = values[17] ^ 1 << 200
        want = sorted(((by_path[f"/c/{i}.jpg"], (h ^ q).bit_count())
                       for i, h in enumerate(values)
                       if (h ^ q).bit_count() <= radius), key=lambda x: (x[1], x[0]))
        assert store.search_hashes(q, radius) == want


@pytest.mark.parametrize("plan", ["auto", "mih", "scan"])
@pytest.mark.parametrize("bits", [64, 36])
def test_search_hashes_equals_brute_force(pg_url, monkeypatch, plan, bits):
    spec = SPEC if bits == 64 else rs.HashSpec(size=6)
    assert spec.bits == bits
    if plan != "auto":
        monkeypatch.setattr(pgs, "pg_search_plan", lambda *a: plan)
    rng = np.random.default_rng(bits)
    values = clustered(rng, 1500, bits) + \
        [int(x) % (1 << bits) for x in rng.integers(0, 2**63, 1500)]
    store = open_store(pg_url, spec=spec)
    rows = [row(f"/c/{i:05d}.jpg", h) for i, h in enumerate(values)]
    rows += [row("/c/blank.jpg", values[0], low_detail=True),
             row("/c/bad.jpg", error="truncated")]
    store.upsert(rows, bits)
    ids = {r.path: r.id for r in store.iter_rows()}
    queries = [values[int(i)] for i in rng.integers(0, len(values), 6)]
    queries += [values[3] ^ 0b1011, random.Random(bits).getrandbits(bits)]
    for radius in range(0, 13):
        if radius == 3:
            store.optimize()  # the first radii ran without chunk indexes
        for q in queries:
            want = sorted(((ids[f"/c/{i:05d}.jpg"], (h ^ q).bit_count())
                           for i, h in enumerate(values)
                           if (h ^ q).bit_count() <= radius),
                          key=lambda x: (x[1], x[0]))
            assert store.search_hashes(q, radius) == want, (radius, q)


def test_search_plan_prefers_probes_for_small_radius():
    chunks = pgs.pg_chunks(64)
    assert pgs.pg_search_plan(10_000_000, chunks, 10) == "mih"
    assert pgs.pg_search_plan(10_000_000, chunks, 30) == "scan"
    assert pgs.pg_search_plan(100, chunks, 12) == "scan"


# ---- several writers ----

def _writer(url, name, roots, paths, seed, barrier, errors, deletes=()):
    try:
        store = open_store(url, roots=roots)
        order = list(paths)
        random.Random(seed).shuffle(order)
        barrier.wait()
        for start in range(0, len(order), 37):
            batch = order[start:start + 37]
            store.upsert([row(p, _h(p, name), size=name) for p in batch], 64)
        if deletes:
            store.delete_paths(deletes)
        store.close()
    except Exception as exc:  # noqa: BLE001
        errors.append(exc)


def _h(path, writer):
    return hash((path, writer)) % 2**64


def test_two_writers_lose_and_duplicate_nothing(pg_url):
    """Machines 1 and 2 write their own folders and one they share, in
    random order, at the same time; 1 also deletes some of its files."""
    a = [f"/w/a/{i}.jpg" for i in range(600)]
    b = [f"/w/b/{i}.jpg" for i in range(600)]
    shared = [f"/w/shared/{i}.jpg" for i in range(600)]
    gone = a[:50]
    open_store(pg_url).close()
    gen0 = int(pgs.PgStore(pg_url).meta()["generation"])
    barrier, errors = threading.Barrier(2), []
    threads = [
        threading.Thread(target=_writer, args=(pg_url, 1, ["/w/a", "/w/shared"],
                                               a + shared, 1, barrier, errors,
                                               gone)),
        threading.Thread(target=_writer, args=(pg_url, 2, ["/w/b", "/w/shared"],
                                               b + shared[::-1], 2, barrier,
                                               errors))]
    run_all(threads)
    assert errors == []
    store = pgs.PgStore(pg_url)
    rows = list(store.iter_rows())
    paths = [r.path for r in rows]
    assert len(paths) == len(set(paths))  # no duplicates
    assert set(paths) == set(a[50:] + b + shared)  # nothing lost
    for r in rows:  # every row is whole: one writer's size and hash
        assert r.hash == _h(r.path, r.size)
        assert r.size == (1 if r.path.startswith("/w/a") else
                          2 if r.path.startswith("/w/b") else r.size)
    assert {h for h, _, _ in writers(store)} == {__import__("socket").gethostname()}
    batches = 2 * -(-1200 // 37)
    assert int(store.meta()["generation"]) == gen0 + batches + 1  # + delete
    assert counts(store) == (len(rows), 0)


def test_fingerprint_sees_other_writers(pg_url):
    one, two = open_store(pg_url), open_store(pg_url)
    fp = one.fingerprint()
    two.upsert([row("/c/x.jpg", 1)], 64)
    assert one.fingerprint() != fp
    fp = one.fingerprint()
    two.delete_paths(["/c/x.jpg"])
    assert one.fingerprint() != fp


def test_kind_switch_stops_writers_of_the_old_kind(pg_url):
    old, new = open_store(pg_url), None
    old.upsert([row("/c/a.jpg", 1)], 64)
    new = open_store(pg_url, spec=SPEC256)
    with pytest.raises(rs.StoreError, match="same hash settings"):
        old.upsert([row("/c/b.jpg", 2)], 64)
    assert counts(new) == (0, 0)


# ---- run locks ----

def test_run_lock_same_roots_waits_then_explains(pg_url):
    with pgs.PgRunLock(pg_url, ["/r/photos"], 1):
        start = time.monotonic()
        with pytest.raises(rs.StoreError) as err:
            with pgs.PgRunLock(pg_url, ["/r/photos/"], 0.6):
                pass
        assert time.monotonic() - start >= 0.6
        text = str(err.value)
        assert "/r/photos" in text and "lock_timeout" in text
        assert __import__("socket").gethostname() in text
        for clash in (["/r"], ["/r/photos/2024"], ["/x", "/r/photos"]):
            with pytest.raises(rs.StoreError):
                with pgs.PgRunLock(pg_url, clash, 0):
                    pass
        for fine in (["/r/music"], ["/x"], ["/r/photos2"]):
            with pgs.PgRunLock(pg_url, fine, 0):
                pass
    with pgs.PgRunLock(pg_url, ["/r/photos"], 0):  # released
        pass


def test_run_lock_waits_for_the_other_run(pg_url):
    held = pgs.PgRunLock(pg_url, ["/r/p"], 1).__enter__()
    threading.Timer(0.5, held.__exit__, (None, None, None)).start()
    with pgs.PgRunLock(pg_url, ["/r/p"], 10):
        pass


def test_run_lock_dies_with_its_process(pg_url):
    code = (f"import sys; sys.path[:0] = {[ROOT, os.path.dirname(pgs.__file__)]!r}\n"
            f"import {pgs.__name__} as m, time\n"
            f"lock = m.PgRunLock({pg_url!r}, ['/r/k'], 0).__enter__()\n"
            f"print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(rs.StoreError):
            with pgs.PgRunLock(pg_url, ["/r/k"], 0):
                pass
    finally:
        proc.kill()
        proc.wait()
    with pgs.PgRunLock(pg_url, ["/r/k"], 10):  # the server saw it go
        pass


# ---- passwords ----

def test_password_never_shown(pg_server, monkeypatch):
    url = pg_server.new_database(owner=PASSWORD_USER)
    secret = pg_server.url(url.rsplit("/", 1)[1], PASSWORD_USER, PASSWORD)
    store = pgs.PgStore(secret, create=True)
    assert PASSWORD not in store.path and "rs_pw@127.0.0.1" in store.path
    store.close()
    lock = pgs.PgRunLock(secret, ["/p"], 0)
    assert PASSWORD not in lock.path
    wrong = secret.replace("s3cret", "wrong-" + "s3cret")
    with pytest.raises(rs.StoreError) as err:
        pgs.PgStore(wrong)
    assert "wrong-" not in str(err.value) and PASSWORD not in str(err.value)
    assert "PGPASSWORD" in str(err.value)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # the way README tells
    store = pgs.PgStore(url)
    assert store.path == url
    store.close()
