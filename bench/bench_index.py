#!/usr/bin/env python3
"""Benchmark of the reverse_search index engines on synthetic hash sets.

For each data set and size: build time (FlatIndex.from_arrays, then each
engine), index save/load time (write_container / read_container), search time
per query for every engine and radius, find_duplicates time (duplicate_groups)
per engine and radius, and peak memory.  Every result is checked against brute
force; a difference is printed as MISMATCH (that is a bug in the engine).

    python3 bench/bench_index.py                         # 10k, 100k, 1M
    python3 bench/bench_index.py --sizes 10M --ops build,search --engines scan,mih,auto
    python3 bench/bench_index.py --impl /tmp/x/reverse_search.py    # a variant
    python3 bench/bench_index.py --sizes 1M --ops calibrate        # COST_* fit

Times are wall clock (time.perf_counter), best of --repeat for build/save/load
and per query.  Peak memory is the process's peak resident set (VmHWM in
/proc/self/status, reset before each operation through /proc/self/clear_refs),
so it counts numpy arrays and Python objects alike; where the reset is refused
it falls back to resource.getrusage ru_maxrss (the lifetime peak) and says so.
Rows marked '~' are extrapolated from a timed sample, not run to the end.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from _common import (PEAK, TOOL, load_average, load_impl, log, machine,
                     parse_size, table, timed)

ENGINE_NAMES = ("scan", "mih", "bktree", "auto")
FULL_PAIR_CHECK = 20_000   # brute-force all pairs up to this many distinct hashes
PAIR_SAMPLE = 200          # items whose neighbours are checked beyond that
CLUSTER_MEAN = 5           # images per near-duplicate cluster, on average
COMMON_SHARE = 0.05        # skewed: share of images that carry a common hash
COMMON_COUNT = 8           # skewed: how many common hashes


# ---- results ----

@dataclass
class Row:
    """One measurement: a line of the table."""

    dataset: str
    bits: int
    n: int                  # images
    u: int                  # distinct hashes
    op: str                 # build | save | load | search | dups
    engine: str
    radius: int | None
    value: float            # wall seconds, or wall ms per query for search
    unit: str
    cpu: float | None = None  # the same in process CPU time (less hurt by load)
    p95: float | None = None
    peak_mb: float | None = None
    exact: str = "-"
    note: str = ""
    extrapolated: bool = False

    def cells(self) -> list:
        mark = "~" if self.extrapolated else ""
        return [self.dataset, str(self.bits), human(self.n), human(self.u),
                self.op, self.engine, "" if self.radius is None else str(self.radius),
                f"{mark}{self.value:.4g} {self.unit}",
                "" if self.cpu is None else f"{mark}{self.cpu:.4g}",
                "" if self.p95 is None else f"{self.p95:.4g}",
                "" if self.peak_mb is None else f"{self.peak_mb:.0f}",
                self.exact, self.note]


HEADER = ["dataset", "bits", "N", "U", "op", "engine", "r", "time", "cpu", "p95 ms",
          "peak MB", "exact", "note"]


def human(n: int) -> str:
    for unit, size in (("M", 10**6), ("k", 10**3)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def mismatch(text: str) -> str:
    """Report an exactness failure loudly; returns the table cell."""
    print(f"\n!!!!!! MISMATCH: {text}\n", file=sys.stderr, flush=True)
    return "MISMATCH"


# ---- stopping a run early ----

class Abort(Exception):
    """A run stopped early; `estimate` is its projected total in seconds."""

    def __init__(self, estimate: float = math.inf):
        super().__init__(estimate)
        self.estimate = estimate


class deadline:
    """Raise Abort after `seconds` of wall clock (SIGALRM)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        def fire(*_):
            raise Abort()
        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


# ---- data ----

def random_words(rng, n: int, words: int) -> np.ndarray:
    return rng.integers(0, 2**64 - 1, size=(n, words), dtype=np.uint64,
                        endpoint=True)


def flip_bits(rng, hashes: np.ndarray, most: int) -> np.ndarray:
    """A copy with 0..most random bits flipped per row (uniform count; a
    position drawn twice counts once, so a few rows flip fewer)."""
    n, words = hashes.shape
    want = rng.integers(0, most + 1, size=n)
    mask = np.zeros_like(hashes)
    rows = np.arange(n)
    for c in range(most):
        sel = rows[want > c]
        pos = rng.integers(0, 64 * words, size=len(sel))
        mask[sel, words - 1 - pos // 64] |= np.left_shift(
            np.uint64(1), (pos % 64).astype(np.uint64))
    return hashes ^ mask


def make_hashes(kind: str, n: int, words: int, rng) -> np.ndarray:
    """(n, words) uint64 hashes of one synthetic kind."""
    if kind == "uniform":
        return random_words(rng, n, words)
    if kind == "clusters":  # random centres, members 0-6 bits away from them
        centres = random_words(rng, max(1, n // CLUSTER_MEAN), words)
        return flip_bits(rng, centres[rng.integers(0, len(centres), n)], 6)
    if kind == "skewed":    # 5 % of images share a few hashes (flat images)
        hashes = random_words(rng, n, words)
        common = random_words(rng, COMMON_COUNT, words)
        weight = 1 / np.arange(1, COMMON_COUNT + 1)
        pick = np.flatnonzero(rng.random(n) < COMMON_SHARE)
        hashes[pick] = common[rng.choice(COMMON_COUNT, len(pick),
                                         p=weight / weight.sum())]
        return hashes
    raise ValueError(f"unknown data set {kind}")


def make_queries(rng, hashes: np.ndarray, count: int) -> np.ndarray:
    """Half near-duplicates of stored hashes (0-10 bits off), half random."""
    near = count // 2
    base = hashes[rng.integers(0, len(hashes), near)]
    return np.concatenate([flip_bits(rng, base, 10),
                           random_words(rng, count - near, hashes.shape[1])])


def brute_distances(distinct: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Distance of every row to `query`, computed without reverse_search."""
    counts = np.bitwise_count(distinct ^ query)
    return counts.sum(axis=1, dtype=np.int64)


def brute_pairs(distinct: np.ndarray, radius: int) -> tuple:
    """All (i, j, d), i < j, d <= radius, by comparing every pair."""
    u, found = len(distinct), []
    rows = max(1, 2**24 // max(1, u * distinct.shape[1]))
    for lo in range(0, u, rows):
        block = distinct[lo:lo + rows]
        d = np.bitwise_count(block[:, None, :] ^ distinct[None, :, :]).sum(
            axis=2, dtype=np.int64)
        i, j = np.nonzero(d <= radius)
        keep = j > i + lo
        found.append((i[keep] + lo, j[keep], d[i[keep], j[keep]]))
    return tuple(np.concatenate([f[k] for f in found]) for k in range(3))


# ---- cases ----

@dataclass
class Case:
    """One data set at one size, with its index, queries and truth."""

    name: str
    bits: int
    hashes: np.ndarray
    flat: object
    queries: np.ndarray
    truth: list             # per query: (positions, distances) at max radius
    folder: str
    args: argparse.Namespace
    rs: object              # the reverse_search module under test
    rows: list = field(default_factory=list)

    @property
    def u(self) -> int:
        return len(self.flat.distinct)

    def row(self, op, engine, radius, value, unit, **kw) -> Row:
        row = Row(self.name, self.bits, len(self.hashes), self.u, op, engine,
                  radius, value, unit, **kw)
        self.rows.append(row)
        log("  " + "  ".join(c for c in row.cells() if c))
        return row

    def find(self, op, engine, radius):
        return next((r for r in self.rows if (r.op, r.engine, r.radius)
                     == (op, engine, radius)), None)

    def engine(self, name: str, radius: int, all_pairs: bool):
        """flat.engine(...), recording a build row when it built one (not
        for auto, which rebuilds an engine already timed)."""
        before = set(map(str, self.flat.engines))
        PEAK.start()
        t0 = time.perf_counter()
        engine = self.flat.engine(name, radius, all_pairs,
                                  os.path.join(self.folder, "bktree.idx"))
        seconds = time.perf_counter() - t0
        if set(map(str, self.flat.engines)) != before and name != "auto":
            note = "incl. links + write" if engine.name == "bktree" else ""
            self.row("build", label(engine), None, seconds, "s",
                     peak_mb=PEAK.mb(), note=note)
            if engine.name == "bktree":  # and the load of what it wrote
                self.flat.engines.clear()
                t0 = time.perf_counter()
                engine = self.flat.engine("bktree", radius, all_pairs,
                                          os.path.join(self.folder, "bktree.idx"))
                self.row("load", "bktree", None, time.perf_counter() - t0, "s",
                         note="from links")
        return engine


def label(engine, asked: str = "") -> str:
    """Engine name for the table (mih with its chunk count; auto->name)."""
    name = f"mih/m={len(engine.chunks)}" if engine.name == "mih" else engine.name
    return f"auto->{name}" if asked == "auto" else name


def make_case(rs, name: str, bits: int, n: int, args, rng) -> Case:
    kind = name.split("-")[0]
    words = -(-bits // 64)
    hashes = make_hashes(kind, n, words, rng)
    ids = np.arange(1, n + 1, dtype=np.int64)
    best, flat = math.inf, None
    PEAK.start()
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        flat = rs.FlatIndex.from_arrays(ids, hashes, bits)
        best = min(best, time.perf_counter() - t0)
    queries = make_queries(rng, hashes, args.queries)
    top = max(args.radii + args.dup_radii)
    truth = []
    for q in queries:
        d = brute_distances(flat.distinct, q)
        pos = np.flatnonzero(d <= top)
        truth.append((pos, d[pos]))
    case = Case(name, bits, hashes, flat, queries, truth,
                tempfile.mkdtemp(prefix="bench-index-"), args, rs)
    case.row("build", "flat", None, best, "s", peak_mb=PEAK.mb(),
             note="FlatIndex.from_arrays")
    return case


# ---- operations ----

def bench_save_load(case: Case) -> None:
    """write_container / read_container of flat.arrays()."""
    path = os.path.join(case.folder, "hashes.idx")
    arrays = case.flat.arrays()
    save = load = math.inf
    for _ in range(case.args.repeat):
        t0 = time.perf_counter()
        case.rs.write_container(path, {"format": "bench"}, arrays)
        save = min(save, time.perf_counter() - t0)
        t0 = time.perf_counter()
        header, back = case.rs.read_container(path)
        load = min(load, time.perf_counter() - t0)
    same = all(np.array_equal(arrays[k], back[k]) for k in arrays)
    size = os.path.getsize(path) / 2**20
    case.row("save", "-", None, save, "s", note=f"{size:.1f} MiB, fsync")
    case.row("load", "-", None, load, "s", exact="ok" if same else
             mismatch(f"{case.name}: read_container differs from what was written"),
             note="warm page cache")
    os.unlink(path)


def bench_search(case: Case, name: str, radius: int) -> None:
    """Median ms per query of one engine at one radius, checked."""
    if name == "bktree" and case.u > case.args.bktree_max:
        return
    engine = case.engine(name, radius, False)
    if name == "auto":
        done = case.find("search", label(engine), radius)
        if done:
            copy_auto(case, done, "search", radius)
            return
    times, cpus, bad, args = [], [], [], case.args
    PEAK.start()
    start = time.perf_counter()
    for k, q in enumerate(case.queries):
        best = cpu = math.inf
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            pos, dist = engine.search(q, radius)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        times.append(best)
        cpus.append(cpu)
        tp, td = case.truth[k]
        tp, td = tp[td <= radius], td[td <= radius]
        pos, dist = np.asarray(pos, np.int64), np.asarray(dist, np.int64)
        order = np.argsort(pos, kind="stable")
        if not (np.array_equal(pos[order], tp) and np.array_equal(dist[order], td)):
            bad.append((k, len(np.setdiff1d(tp, pos)), len(np.setdiff1d(pos, tp)),
                        len(pos) - len(np.unique(pos))))
        if time.perf_counter() - start > args.search_budget and k + 1 >= 10:
            break
    ms = np.array(times) * 1e3
    exact = "ok"
    if bad:
        k, missing, extra, dup = bad[0]
        exact = mismatch(f"{case.name} N={len(case.hashes)} search {label(engine, name)} "
                         f"r={radius}: {len(bad)}/{len(times)} queries differ "
                         f"(first: query {k}, {missing} missing, {extra} extra, "
                         f"{dup} repeated)")
    note = "" if len(times) == len(case.queries) else \
        f"{len(times)}/{len(case.queries)} queries (time budget)"
    case.row("search", label(engine, name), radius, float(np.median(ms)), "ms/q",
             cpu=float(np.median(cpus)) * 1e3, p95=float(np.percentile(ms, 95)), peak_mb=PEAK.mb(), exact=exact,
             note=note)


def copy_auto(case: Case, done: Row, op: str, radius: int) -> None:
    """auto returned the engine of an earlier row: same object, same numbers."""
    row = case.row(op, f"auto->{done.engine}", radius, done.value, done.unit,
                   cpu=done.cpu,       p95=done.p95, peak_mb=done.peak_mb, exact=done.exact,
                   note=f"same engine as the {done.engine} row",
                   extrapolated=done.extrapolated)
    return row


class Recorder:
    """An engine whose pairs() are kept for checking as they are yielded."""

    def __init__(self, engine):
        self.engine, self.name, self.blocks = engine, engine.name, []

    def pairs(self, radius):
        for block in self.engine.pairs(radius):
            self.blocks.append(tuple(np.asarray(b, np.int64) for b in block))
            yield block

    def __getattr__(self, name):  # cross(), hashes, ... of the engine itself
        return getattr(self.engine, name)


def default_of(engine, param: str):
    """Default of a keyword of engine.pairs (or of the cross() it calls)."""
    for method in ("pairs", "cross"):
        fn = getattr(engine, method, None)
        if fn is not None and param in inspect.signature(fn).parameters:
            return inspect.signature(fn).parameters[param].default
    raise KeyError(param)


def bench_dups(case: Case, name: str, radius: int) -> None:
    """duplicate_groups wall time of one engine at one radius, checked;
    extrapolated from a timed sample when the full run would be too long."""
    if name == "bktree" and case.u > case.args.bktree_max:
        return
    engine = case.engine(name, radius, True)
    if name == "auto":
        done = case.find("dups", label(engine), radius)
        if done:
            copy_auto(case, done, "dups", radius)
            return
    args = case.args
    estimate, exact = None, "-"
    if radius > 0 and case.u > 1:
        if engine.name == "scan":
            estimate, exact = pilot_scan(case, engine, radius)
        elif engine.name == "bktree":
            estimate, exact = pilot_bktree(case, engine, radius)
    if estimate is not None and estimate > args.pairs_limit:
        case.row("dups", label(engine, name), radius, estimate, "s", exact=exact,
                 note="~extrapolated from a sample (pairs only)", extrapolated=True)
        return
    recorder = Recorder(engine)
    PEAK.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with watch_mih(case.rs, engine, radius, args.pairs_limit, args.pilot), \
                deadline(max(3 * args.pairs_limit, 60)):
            groups = case.rs.duplicate_groups(case.flat, recorder, radius)
    except Abort as stop:
        took = time.perf_counter() - t0
        case.row("dups", label(engine, name), radius, stop.estimate, "s",
                 peak_mb=PEAK.mb(), extrapolated=True,
                 note=f"~extrapolated from {took:.0f} s of pairs (pairs only)")
        return
    seconds, cpu, peak = time.perf_counter() - t0, time.process_time() - c0, PEAK.mb()
    pairs = sum(len(b[0]) for b in recorder.blocks)
    exact = check_pairs(case, label(engine, name), radius, recorder.blocks, groups)
    note = f"{pairs} pairs, {len(groups)} groups"
    case.row("dups", label(engine, name), radius, seconds, "s", cpu=cpu, peak_mb=peak,
             exact=exact, note=note + (" (r=0: no engine call)" if radius == 0 else ""))


def pilot_scan(case: Case, engine, radius: int):
    """(projected seconds, check) from the first blocks of ScanEngine.pairs."""
    u, words = case.u, case.flat.distinct.shape[1]
    block = default_of(engine, "block_bytes")
    rows = max(1, block // max(1, 8 * u * words))
    total, done, found = u * (u + 1) / 2, 0, []
    t0 = time.perf_counter()
    for k, blk in enumerate(engine.pairs(radius)):
        found.append(tuple(np.asarray(b, np.int64) for b in blk))
        start = k * rows
        done += sum(u - s for s in range(start, min(u, start + rows)))
        if time.perf_counter() - t0 > case.args.pilot:
            break
    seconds = time.perf_counter() - t0
    covered = np.arange(0, min(u, (k + 1) * rows))
    return seconds * total / done, check_partial(case, "scan", radius, found, covered)


def pilot_bktree(case: Case, engine, radius: int):
    """(projected seconds, check) from tree.find on random distinct hashes."""
    rng = np.random.default_rng(7)
    sample = rng.permutation(case.u)[:2000]
    seconds, bad = 0.0, 0
    for k, p in enumerate(sample):
        value = engine.values[p]
        t0 = time.perf_counter()
        hits = [(engine.position[v], d) for d, v in engine.tree.find(value, radius)]
        hits = [(q, d) for q, d in hits if q > p]
        seconds += time.perf_counter() - t0
        d = brute_distances(case.flat.distinct, case.flat.distinct[p])
        want = np.flatnonzero(d <= radius)
        want = want[want > p]
        if sorted(q for q, _ in hits) != want.tolist():
            bad += 1
        if seconds > case.args.pilot and k >= 20:
            break
    exact = f"ok({k + 1} items)" if not bad else mismatch(
        f"{case.name} bktree r={radius}: {bad}/{k + 1} sampled items' "
        f"neighbours differ from brute force")
    return seconds / (k + 1) * case.u, exact


class watch_mih:
    """While MIHEngine.pairs runs, count its steps (calls of
    _expand_windows) and Abort once the projection exceeds `limit`."""

    def __init__(self, rs, engine, radius: int, limit: float, pilot: float):
        self.rs, self.engine, self.radius = rs, engine, radius
        self.limit, self.pilot = limit, pilot

    def __enter__(self):
        self.original = None
        rs = self.rs
        if self.engine.name != "mih" or not hasattr(rs, "_expand_windows"):
            return self
        try:
            budget = default_of(self.engine, "budget")
            u, steps = len(self.engine.hashes), 0
            most = self.radius // len(self.engine.chunks)
            for chunk in self.engine.chunks:
                masks = len(self.engine.masks(chunk.bits, most))
                steps += math.ceil(u / max(1, budget // (4 * masks)))
        except (KeyError, AttributeError, TypeError):
            return self
        original, t0, calls = rs._expand_windows, time.perf_counter(), [0]

        def counted(*a, **kw):
            calls[0] += 1
            took = time.perf_counter() - t0
            if calls[0] > 1 and took > self.pilot:
                projected = took * steps / (calls[0] - 1)
                if projected > self.limit:
                    raise Abort(projected)
            return original(*a, **kw)

        self.original, rs._expand_windows = original, counted
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            self.rs._expand_windows = self.original


def check_pairs(case: Case, engine: str, radius: int, blocks: list,
                groups: list) -> str:
    """Pairs equal brute force (all pairs when small, sampled items beyond),
    and the groups equal the connected components of the true pairs."""
    u, distinct = case.u, case.flat.distinct
    i, j, d = (np.concatenate([b[k] for b in blocks]) if blocks
               else np.zeros(0, np.int64) for k in range(3))
    problems = validity(distinct, radius, i, j, d)
    if radius > 0 and u <= FULL_PAIR_CHECK:
        ti, tj, _ = brute_pairs(distinct, radius)
        got, want = np.unique(i * u + j), ti * u + tj
        missing, extra = len(np.setdiff1d(want, got)), len(np.setdiff1d(got, want))
        if missing or extra:
            problems.append(f"{missing} pairs missing, {extra} extra")
        problems += check_groups(case, ti, tj, groups)
        checked = "ok"
    elif radius > 0:
        covered = np.random.default_rng(11).permutation(u)[:PAIR_SAMPLE]
        problems += completeness(distinct, radius, i * u + j, covered, False)
        checked = f"ok({len(covered)} items)"
    else:
        problems += check_groups(case, i, j, groups) if u <= FULL_PAIR_CHECK else []
        checked = "ok"
    if problems:
        return mismatch(f"{case.name} N={len(case.hashes)} dups {engine} "
                        f"r={radius}: " + "; ".join(problems))
    return checked


def check_partial(case: Case, engine: str, radius: int, blocks: list,
                  covered: np.ndarray) -> str:
    """Checks of an unfinished pairs() run over the items it covered."""
    u, distinct = case.u, case.flat.distinct
    i, j, d = (np.concatenate([b[k] for b in blocks]) if blocks
               else np.zeros(0, np.int64) for k in range(3))
    sample = np.random.default_rng(11).permutation(covered)[:PAIR_SAMPLE]
    problems = validity(distinct, radius, i, j, d)
    problems += completeness(distinct, radius, i * u + j, sample, True)
    if problems:
        return mismatch(f"{case.name} dups {engine} r={radius} (sample): "
                        + "; ".join(problems))
    return f"ok({len(sample)} items)"


def validity(distinct, radius, i, j, d) -> list:
    """What is wrong with reported pairs themselves."""
    problems = []
    if len(i) and (i >= j).any():
        problems.append("pairs with i >= j")
    if len(np.unique(i * len(distinct) + j)) != len(i):
        problems.append(f"{len(i) - len(np.unique(i * len(distinct) + j))} "
                        f"pairs reported twice")
    if len(i):
        true = np.bitwise_count(distinct[i] ^ distinct[j]).sum(axis=1, dtype=np.int64)
        if (true != d).any():
            problems.append(f"{int((true != d).sum())} wrong distances")
        if (true > radius).any():
            problems.append(f"{int((true > radius).sum())} pairs beyond radius")
    return problems


def completeness(distinct, radius, keys, sample, only_after: bool) -> list:
    """Every true pair of each sampled item must be among the keys."""
    u, keys, missing = len(distinct), np.sort(keys), 0
    for s in sample:
        near = np.flatnonzero(brute_distances(distinct, distinct[s]) <= radius)
        near = near[near > s] if only_after else near[near != s]
        want = np.minimum(near, s) * u + np.maximum(near, s)
        at = np.searchsorted(keys, want)
        missing += int((at >= len(keys)).sum()) + int(
            (keys[np.minimum(at, len(keys) - 1)] != want)[at < len(keys)].sum())
    return [f"{missing} true pairs of {len(sample)} sampled items missing"] \
        if missing else []


def check_groups(case: Case, a, b, groups) -> list:
    """Groups must be the components (with two or more images) of the pairs."""
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
    except ImportError:
        return []
    u, flat = case.u, case.flat
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(u, u))
    _, labels = connected_components(graph, directed=False)
    per = labels[np.repeat(np.arange(u), np.diff(flat.img_starts))]
    images = np.empty(len(flat.img_order), np.int64)
    images[flat.img_order] = per
    want = {}
    for pos, lab in enumerate(images):
        want.setdefault(lab, []).append(pos)
    want = {frozenset(v) for v in want.values() if len(v) >= 2}
    got = {frozenset(np.asarray(g).tolist()) for g in groups}
    if got != want:
        return [f"groups differ from components ({len(got)} vs {len(want)})"]
    return []


def auto_summary(rows: list) -> list:
    """Lines saying, per case and radius, whether auto chose the fastest."""
    lines = []
    for r in rows:
        if not r.engine.startswith("auto->") or (r.op == "dups" and r.radius == 0):
            continue
        rivals = [x for x in rows if (x.dataset, x.n, x.bits, x.op, x.radius) ==
                  (r.dataset, r.n, r.bits, r.op, r.radius) and
                  x.engine.split("/")[0] in ("scan", "mih")]
        if not rivals:
            continue
        best = min(rivals, key=lambda x: x.value)
        verdict = "fastest" if best.engine == r.engine[6:] else \
            f"SLOWER x{r.value / best.value:.1f} than {best.engine}"
        lines.append(f"{r.dataset:<12} {human(r.n):>5} {r.op:<6} r={r.radius:<2} "
                     f"auto->{r.engine[6:]:<8} {verdict}")
    return lines


# ---- calibration ----

def calibrate(case: Case) -> list:
    """Time MIH search and pairs with forced chunk counts and fit the
    plan_mih cost model (COST_CALL, COST_PROBE, COST_CAND) to it; the scan
    cost per word from the scan engine.  Returns report lines."""
    from scipy.optimize import nnls
    rs, flat, args = case.rs, case.flat, case.args
    u, bits, words = case.u, case.bits, flat.distinct.shape[1]
    lines, feats, times = [], [], []
    scan = rs.ScanEngine(flat.distinct)
    t = [timed(scan.search, q, 10)[0].wall for q in case.queries[:50]]
    cost_scan = statistics.median(t) / (u * words)
    lines.append(f"scan search: {cost_scan:.3g} s per hash word "
                 f"(COST_SCAN now {rs.COST_SCAN:.3g})")
    for parts in range(2, 9):
        engine = rs.MIHEngine(flat.distinct, bits, parts)
        for radius in args.radii:
            most = radius // len(engine.chunks)
            if any(rs._ball(c.bits, most) > 2e6 for c in engine.chunks):
                continue
            t = [timed(engine.search, q, radius)[0].wall
                 for q in case.queries[:60]]
            med = statistics.median(t)
            probes = sum(rs._ball(c.bits, most) for c in engine.chunks)
            cands = sum(rs._ball(c.bits, most) * u / 2**c.bits for c in engine.chunks)
            feats.append((len(engine.chunks), probes, cands))
            times.append(med)
            lines.append(f"mih search m={len(engine.chunks)} r={radius:<2} "
                         f"{med * 1e3:8.3f} ms  probes={probes} model cands={cands:.0f}"
                         f"  plan m={rs.plan_mih(u, bits, words, radius, False)[0]}")
    # relative least squares: each row divided by its own time
    x, y = np.array(feats, float), np.array(times)
    coef, _ = nnls(x / y[:, None], np.ones(len(y)))
    err = np.median(np.abs(x @ coef / y - 1))
    lines.append(f"fit search: COST_CALL={coef[0]:.3g} COST_PROBE={coef[1]:.3g} "
                 f"COST_CAND={coef[2]:.3g} (median rel. error {err:.0%}); now "
                 f"{rs.COST_CALL:.3g} {rs.COST_PROBE:.3g} {rs.COST_CAND:.3g}")
    return lines


# ---- main ----

def run_case(case: Case, ops: set, engines: list) -> None:
    args = case.args
    if "save" in ops:
        bench_save_load(case)
    if "search" in ops:
        for name in engines:
            for radius in args.radii:
                bench_search(case, name, radius)
            case.flat.engines.clear()
    if "dups" in ops:
        for name in engines:
            for radius in args.dup_radii:
                bench_dups(case, name, radius)
            case.flat.engines.clear()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    sizes = lambda s: [parse_size(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--sizes", type=sizes, default=sizes("10k,100k,1M"),
                   help="images per 64-bit data set (10k,100k,1M; 10M on request)")
    p.add_argument("--wide-sizes", type=sizes, default=sizes("100k"),
                   help="sizes of the 256-bit data sets ('' for none)")
    p.add_argument("--datasets", default="uniform,clusters,skewed",
                   help="64-bit kinds: uniform, clusters, skewed")
    p.add_argument("--wide-datasets", default="uniform,clusters",
                   help="256-bit kinds")
    p.add_argument("--radii", type=ints, default=ints("0,2,5,8,10"),
                   help="search radii")
    p.add_argument("--dup-radii", type=ints, default=ints("0,2,4,8,10"),
                   help="find_duplicates radii")
    p.add_argument("--engines", default="scan,mih,bktree,auto")
    p.add_argument("--ops", default="save,search,dups",
                   help="save, search, dups, calibrate (build always runs)")
    p.add_argument("--repeat", type=int, default=3,
                   help="best of this many runs for build, save/load, each query")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--search-budget", type=float, default=5.0,
                   help="seconds per (engine, radius) before fewer queries are used")
    p.add_argument("--pairs-limit", type=float, default=30.0,
                   help="seconds: longer find_duplicates runs are extrapolated")
    p.add_argument("--pilot", type=float, default=5.0,
                   help="seconds of sampling behind an extrapolation")
    p.add_argument("--bktree-max", type=sizes, default=[1_000_000],
                   help="largest distinct count given to the BK-tree")
    p.add_argument("--impl", default=TOOL, help="reverse_search.py to test")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    args.bktree_max = args.bktree_max[0]
    bad = [e for e in args.engines.split(",") if e not in ENGINE_NAMES]
    if bad:
        p.error(f"unknown engine {bad[0]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rs = load_impl(args.impl)
    started = machine(args.impl)
    ops = set(args.ops.split(","))
    engines = [e for e in ENGINE_NAMES if e in args.engines.split(",")]
    plan = [(k, 64, n) for n in args.sizes for k in args.datasets.split(",") if k]
    plan += [(f"{k}-256", 256, n) for n in args.wide_sizes
             for k in args.wide_datasets.split(",") if k]
    rng = np.random.default_rng(args.seed)
    rows, extra = [], []
    t_start = time.perf_counter()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100_000))
    for kind, bits, n in plan:
        log(f"{kind} {bits}-bit N={human(n)}")
        case = make_case(rs, kind, bits, n, args, rng)
        try:
            run_case(case, ops, engines)
            if "calibrate" in ops:
                extra += [f"[{kind} N={human(n)}] {x}" for x in calibrate(case)]
        finally:
            rows += case.rows
            shutil.rmtree(case.folder, ignore_errors=True)
            del case
    print(f"# bench_index  {started}")
    print(f"# load average at the end {load_average()} (the cpu column is "
          f"process CPU time, which other processes hardly change)")
    print(f"# impl {args.impl}; peak MB = {PEAK.method}; times: build/save/load "
          f"best of {args.repeat}, search median of per-query best of {args.repeat}")
    print(table(HEADER, [r.cells() for r in rows], left=range(len(HEADER))))
    lines = auto_summary(rows)
    if lines:
        print("\n# does 'auto' (choose_engine) pick the faster of scan and mih?")
        print("\n".join(lines))
    if extra:
        print("\n# calibration")
        print("\n".join(extra))
    bad = [r for r in rows if r.exact == "MISMATCH"]
    print(f"\n# {len(rows)} rows, {len(bad)} MISMATCH, "
          f"{time.perf_counter() - t_start:.0f} s total")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
