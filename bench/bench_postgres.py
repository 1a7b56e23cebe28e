#!/usr/bin/env python3
"""Benchmark of the PostgreSQL store: ingest rate and in-database search.

    python3 bench/bench_postgres.py                 # 1M rows, own server
    python3 bench/bench_postgres.py --sizes 1M,10M  # ~15 min more on 2 cores
    python3 bench/bench_postgres.py --url postgresql://me@host/db   # a server
                                   # of yours (its tables are replaced!)

Rows go in through PgStore.upsert in batches (COPY into a temp table, then
INSERT ... ON CONFLICT), exactly as update writes them, into a table that
grows to each size in turn.  Then, per radius, query time of the multi-index
search (chunk probes + bit_count, from the chunk indexes) and of a plain
bit_count scan over every row; each scan result is checked against the
probing result (a difference is printed as MISMATCH).  Times are wall clock:
median and 90th percentile per query.  Hashes: 64-bit dhash-like values, 30%
in clusters of near copies, the rest uniform; queries are stored hashes with
r/2 bits flipped, and random values.

The server started here is a throw-away cluster from tests/pg_server.py with
durability off (fsync, synchronous_commit) and shared_buffers 2GB, like a
database server with the collection in memory.  Other processes on the
machine (loadavg is printed) slow every number down.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np

from _common import ROOT, load_impl, log, machine, parse_size, table, timed

rs = load_impl()
# tests/pg_server.py starts the throw-away server
sys.path.insert(0, os.path.join(ROOT, "tests"))
RADII = (0, 4, 8, 10)


def make_rows(start: int, stop: int, rng: random.Random) -> list:
    """Rows as update writes them: path, size, mtime, digest, hash, ..."""
    rows = []
    for i in range(start, stop):
        if i % 10 < 3 and i >= 10:  # a near copy of an earlier image
            h = rng.getrandbits(64) if i % 97 == 0 else _near(i, rng)
        else:
            h = rng.getrandbits(64)
        _remember(i, h)
        rows.append(rs.ImageRow(f"/bench/d{i % 4096:04d}/img{i:09d}.jpg",
                                50_000 + i % 9_000_000, 1_700_000_000 * 10**9 + i,
                                i.to_bytes(16, "big"), h, 1024, 768,
                                extra=b""))
    return rows


_SEEN = []


def _remember(i: int, h: int) -> None:
    if i % 16 == 0:
        _SEEN.append(h)


def _near(i: int, rng: random.Random) -> int:
    h = _SEEN[rng.randrange(len(_SEEN))] if _SEEN else rng.getrandbits(64)
    for _ in range(rng.randint(0, 6)):
        h ^= 1 << rng.randrange(64)
    return h


def backend_cpu(store) -> float:
    """CPU seconds the server process of this connection has used (Linux;
    0 where /proc cannot tell): unlike wall time, other load cannot inflate
    it."""
    try:
        with open(f"/proc/{store.db.conn.info.backend_pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def ingest(store, have: int, want: int, batch: int, rng) -> tuple:
    """Rows per second: (upsert wall clock, upsert + making the rows, upsert
    by CPU time of client + server: what an idle machine would reach)."""
    spent = made = cpu = 0.0
    for start in range(have, want, batch):
        t = time.perf_counter()
        rows = make_rows(start, min(want, start + batch), rng)
        made += time.perf_counter() - t
        t, c, s = time.perf_counter(), time.process_time(), backend_cpu(store)
        store.upsert(rows, 64)
        spent += time.perf_counter() - t
        cpu += time.process_time() - c + backend_cpu(store) - s
        done = min(want, start + batch)
        if done % (batch * 50) == 0:
            log(f"  {done:,} rows, {(done - have) / spent:,.0f} rows/s")
    n = want - have
    return n / spent, n / (spent + made), n / cpu if cpu else 0.0


def query_times(store, queries: list, radius: int, plan: str) -> tuple:
    """([seconds per query], [results]) with the plan forced."""
    saved = rs.pg_search_plan
    rs.pg_search_plan = lambda *a: plan
    try:
        store.search_hashes(queries[0], radius)  # warm the plan cache
        out = [timed(store.search_hashes, q, radius) for q in queries]
    finally:
        rs.pg_search_plan = saved
    return [t.wall for t, _ in out], [r for _, r in out]


def ms(values: list) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"{1000 * statistics.median(values):.1f} / {1000 * p90:.1f}"


def sizes_of(store) -> str:
    row = store.db.conn.execute(
        "SELECT pg_size_pretty(pg_relation_size('images')), "
        "pg_size_pretty(pg_indexes_size('images'))").fetchone()
    return f"table {row[0]}, indexes {row[1]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M", help="comma list, e.g. 1M,10M")
    ap.add_argument("--batch", type=int, default=20_000,
                    help="rows per upsert call")
    ap.add_argument("--queries", type=int, default=40,
                    help="probing queries per radius")
    ap.add_argument("--scan-queries", type=int, default=3,
                    help="full-scan queries per radius (each reads every row)")
    ap.add_argument("--url", help="an existing database (tables replaced)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    server = None
    url = args.url
    if not url:
        from pg_server import PgServer
        server = PgServer(settings={
            "shared_buffers": "2GB", "max_wal_size": "8GB",
            "checkpoint_timeout": "30min", "work_mem": "64MB",
            "maintenance_work_mem": "1GB"}).start()
        url = server.new_database()
    try:
        return run(url, sizes, args)
    finally:
        if server:
            server.stop()


def run(url: str, sizes: list, args) -> int:
    rng = random.Random(args.seed)
    started = machine()
    store = rs.PgStore(url, create=True)
    store.db.conn.execute("DROP TABLE IF EXISTS images, meta")
    store.close()
    store = rs.PgStore(url, create=True)
    store.use_roots(["/bench"])
    store.start_kind(rs.HashSpec())
    version = store.db.conn.execute("SHOW server_version").fetchone()[0]
    lines, ingests, have, bad = [], [], 0, 0
    for size in sizes:
        have_before = have  # 0: a bulk load into an empty table
        up, total, by_cpu = ingest(store, have, size, args.batch, rng)
        have = size
        vac, _ = timed(store.optimize)
        how = "bulk: into an empty table, chunk indexes built at the end" \
            if not have_before else f"update: {have_before:,} rows and their " \
            f"indexes there"
        ingests.append([f"{have_before:,} -> {size:,}", how, f"{up:,.0f}",
                        f"{by_cpu:,.0f}", f"{total:,.0f}", f"{vac.wall:.1f} s",
                        sizes_of(store)])
        log(" | ".join(ingests[-1]))
        qrng = np.random.default_rng(args.seed + size)
        for radius in RADII:
            queries = []
            for k in range(args.queries):
                if k % 4 == 3:
                    queries.append(int(qrng.integers(0, 2**63)) * 2 + k % 2)
                else:
                    h = _SEEN[int(qrng.integers(len(_SEEN)))]
                    for p in qrng.choice(64, radius // 2, replace=False):
                        h ^= 1 << int(p)
                    queries.append(h)
            mih, found = query_times(store, queries, radius, "mih")
            scan, truth = query_times(store, queries[:args.scan_queries],
                                      radius, "scan")
            bad += sum(a != b for a, b in zip(found, truth))
            hits = statistics.mean(len(f) for f in found)
            auto = rs.pg_search_plan(size, rs.pg_chunks(64), radius)
            lines.append([f"{size:,}", f"r={radius}", ms(mih), ms(scan),
                          f"{hits:.1f}", auto])
            log(" | ".join(lines[-1]))
    store.close()
    print(f"# {started}")
    print(f"# PostgreSQL {version}, psycopg {rs._psycopg().__version__}; "
          f"load at the end {os.getloadavg()[0]:.1f}\n")
    print(table(["rows", "how", "upsert rows/s (wall)",
                 "rows/s by CPU time (client + server)",
                 "rows/s incl. making ImageRows", "optimize()", "size after"],
                ingests, left=(1, 6), markdown=True))
    print()
    print(table(["rows", "radius", "mih median / p90 ms",
                 "bit_count scan median / p90 ms", "hits/query", "auto picks"],
                lines, left=(1, 5), markdown=True))
    check = f"MISMATCH in {bad} queries" if bad else \
        "scan == mih for every checked query"
    print(f"\n# {check}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
