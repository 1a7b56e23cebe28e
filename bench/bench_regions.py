#!/usr/bin/env python3
"""Benchmark of region matching (centres, content boxes, windows) at scale.

    python3 bench/bench_regions.py                  # 10k and 100k images
    python3 bench/bench_regions.py --sizes 100k --radius 12 --engine auto

Synthetic hash sets shaped like real ones: near-duplicate clusters (members
0-6 bits from a random centre); each image's 2 centre hashes lie 0-8 bits
from its own whole hash and its 80 windows 10-24 bits (as the tough corpus
shows: crops of 10-20 % move a photo's hash 12-22 bits; a window is the same
scene, not a random hash); a fifth of the images have a content box, 0-6 bits
from another image's whole (screenshots of pictures in the collection).  For each size: index build (FlatIndex and the
region views with their engines), find_duplicates (duplicate_groups over
every stage, adaptive threshold on), the set-up a search run needs (its
engines and region views: a search scans the windows rather than index
them), one search (every stage of one query, median of --queries), the
candidate pairs by stage, and the peak memory of each size's run (VmHWM,
reset per size).  Times are wall clock, best of --repeat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from _common import PEAK, TOOL, load_impl, machine, parse_size, table, timed


def flip(rng, hashes: np.ndarray, low: int, high: int) -> np.ndarray:
    """Each 64-bit hash with low..high random bits flipped."""
    out = hashes.copy()
    count = rng.integers(low, high + 1, out.shape)
    for k in range(high):
        bit = rng.integers(0, 64, out.shape).astype(np.uint64)
        out ^= np.where(count > k, np.uint64(1) << bit, np.uint64(0))
    return out


def make_flat(rs, n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2**63, max(1, n // 5), dtype=np.uint64) << \
        np.uint64(1) | rng.integers(0, 2, max(1, n // 5), dtype=np.uint64)
    whole = flip(rng, centres[rng.integers(0, len(centres), n)], 0, 6)
    k = len(rs.WINDOWS)
    windows = flip(rng, np.repeat(whole, k), 10, 24).reshape(n, k, 1)
    cent = flip(rng, np.repeat(whole, 2), 0, 8).reshape(n, 2, 1)
    content = flip(rng, whole[rng.integers(0, n, n)], 0, 6).reshape(n, 1, 1)
    boxed = rng.random(n) < 0.2
    boxes = np.where(boxed, np.uint64(rs.pack_box((0.1, 0.2, 0.9, 0.7))),
                     np.uint64(rs.FULL_BOX_WORD)).astype(np.uint64)
    detail = rng.uniform(1.5, 3.8, n).astype(np.float32)
    flat = rs.FlatIndex.from_arrays(
        np.arange(n, dtype=np.int64), whole.reshape(n, 1), 64, detail=detail,
        centres=cent, content=content, boxes=boxes, windows=windows)
    flat.kind, flat.fingerprint = "bench/64", f"bench-{n}"
    return flat


def run(rs, n: int, radius: int, engine: str, queries: int, repeat: int) -> list:
    PEAK.start()
    flat = make_flat(rs, n)
    bk = os.path.join("/tmp", f"bench-regions-{os.getpid()}.idx")

    def build_pairs():
        flat.engines.clear()
        flat.views.clear()
        main = flat.engine(engine, radius, True, bk)
        return main, flat.region_engines(engine, radius, True, bk)
    t_build, (main, regions) = timed(build_pairs)
    t_dups, groups = timed(rs.duplicate_groups, flat, main, radius, True,
                           regions, repeat=repeat)
    edges = rs.candidate_edges(flat, main, radius, regions)
    stages = {}
    for s in edges.stages():
        stages[s] = stages.get(s, 0) + 1
    flat.engines.clear()
    flat.views.clear()
    t0 = time.perf_counter()
    s_main = flat.engine(engine, radius, False, bk)
    s_regions = flat.region_engines(engine, radius, False, bk)
    t_setup = time.perf_counter() - t0
    rng = np.random.default_rng(2)
    times = []
    words = 1
    for q in rng.integers(0, n, queries).tolist():
        extra = list(flat.centres[q, :, 0]) + [flat.content[q, 0, 0],
                                              flat.boxes[q]] + \
            list(flat.windows[q, :, 0])
        result = rs.HashResult("q", hash=int(flat.hashes[q, 0]),
                               extra=rs.pack_hashes([int(x) for x in extra],
                                                       64 * words),
                               detail=float(flat.detail[q]))
        t0 = time.perf_counter()
        rs._search_one(result, flat, s_main, radius, s_regions, True)
        times.append(time.perf_counter() - t0)
    return [n, radius, main.name, regions.windows.engine.name,
            f"{t_build.wall:.2f}", f"{t_dups.wall:.2f}", f"{t_setup:.2f}",
            f"{1000 * np.median(times):.1f}",
            len(groups), len(edges),
            ", ".join(f"{k} {v}" for k, v in sorted(stages.items())),
            f"{PEAK.mb():.0f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["10k", "100k"])
    ap.add_argument("--radius", type=int, default=12)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--impl", default=TOOL, help="reverse_search.py to test")
    args = ap.parse_args(argv)
    rs = load_impl(args.impl)
    started = machine(args.impl)
    head = ["images", "radius", "engine", "window engine", "index build s",
            "find_duplicates s", "search setup s", "search ms", "groups",
            "candidate pairs",
            "by stage", "peak MB"]
    rows = [run(rs, parse_size(s), args.radius, args.engine, args.queries,
                args.repeat) for s in args.sizes]
    print(f"# {started}")
    print(f"# peak MB = {PEAK.method}; times: wall, best of {args.repeat}")
    print(table(head, rows, left=(2, 3, 10)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
