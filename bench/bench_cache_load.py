#!/usr/bin/env python3
"""Load time of the index caches in bk_dir, side by side in one run.

    python3 bench/bench_cache_load.py                  # 10k, 100k, 1M hashes
    python3 bench/bench_cache_load.py --sizes 100k --repeat 5

BK-tree (bktree.idx), three ways to get the tree back:
  unpickle  what reverse_search did up to issue 14: pickle.loads of the
            pickled nested tuples, plus the engine's value -> position map
            (reproduced here; unpickling runs code from the file, which is
            why it went); the file read is not counted
  links     what it does now: two integer arrays (parent, distance), read
            with their HMAC checked, each link checked against the hashes,
            then the nested nodes grown from them
  rebuild   no cache: pybktree inserts every hash again
hashes.idx, read_container of FlatIndex.arrays():
  parse     numpy's reader alone (as before: no checksum, shapes only)
  checked   now: HMAC over the whole file, then parse, then _check_arrays

Hashes are random 64-bit values (distinct); times are wall seconds, best of
--repeat, with a warm page cache.  Only ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile

import numpy as np

from _common import TOOL, load_impl, machine, parse_size, table, timed


def bench(rs, n: int, repeat: int, folder: str) -> list:
    rng = np.random.default_rng(n)
    hashes = np.unique(rng.integers(0, 2**64 - 1, n, dtype=np.uint64,
                                    endpoint=True)).reshape(-1, 1)
    flat = rs.FlatIndex.from_arrays(np.arange(1, len(hashes) + 1), hashes, 64)
    flat.kind, flat.fingerprint, flat.key = "bench", "bench", os.urandom(32)
    rows = []
    path = os.path.join(folder, "bktree.idx")
    t_build, engine = timed(lambda: rs.load_bktree(flat, path))  # + save
    blob = pickle.dumps(engine.tree, protocol=pickle.HIGHEST_PROTOCOL)

    def unpickle():  # the old BKTreeEngine(hashes, tree): tree, values, map
        with rs._no_gc():
            tree = pickle.loads(blob)
            values = rs.words_to_ints(flat.distinct)
            {v: p for p, v in enumerate(values)}
        return tree
    t_old, old = timed(unpickle, repeat=repeat)
    t_new, new = timed(lambda: rs.load_bktree(flat, path), repeat=repeat)
    assert new.tree.tree == old.tree, "the two trees differ"
    t_rebuild, _ = timed(lambda: rs.BKTreeEngine(flat.distinct))
    size = os.path.getsize(path) / 2**20
    rows += [(n, "bktree", "unpickle (before)", t_old.wall,
              f"{len(blob) / 2**20:.1f} MiB pickle"),
             (n, "bktree", "links (now)", t_new.wall, f"{size:.1f} MiB file"),
             (n, "bktree", "rebuild (no cache)", t_rebuild.wall,
              f"first build + save {t_build.wall:.2f} s")]
    index = os.path.join(folder, "hashes.idx")
    rs.write_container(index, {"bench": 1}, flat.arrays(), flat.key)

    def parse_only():
        with open(index, "rb") as fh:
            fh.seek(len(rs.INDEX_MAGIC))
            fh.seek(int.from_bytes(fh.read(8), "little"), os.SEEK_CUR)
            return [np.lib.format.read_array(fh, allow_pickle=False)
                    for _ in flat.arrays()]

    def checked():
        header, arrays = rs.read_container(index, flat.key)
        rs._check_arrays(rs.FlatIndex(**arrays, bits=64), rs.HashSpec())
    t_parse, _ = timed(parse_only, repeat=repeat)
    t_checked, _ = timed(checked, repeat=repeat)
    size = os.path.getsize(index) / 2**20
    rows += [(n, "hashes.idx", "parse (before)", t_parse.wall, f"{size:.1f} MiB"),
             (n, "hashes.idx", "MAC + parse + checks (now)", t_checked.wall, "")]
    for name in (path, index):
        os.unlink(name)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10k,100k,1M")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--impl", default=TOOL, help="reverse_search.py to test")
    args = p.parse_args(argv)
    rs = load_impl(args.impl)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 100_000))  # pickle.dumps
    print(f"# {machine(args.impl)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as folder:
        for n in map(parse_size, args.sizes.split(",")):
            rows += [(f"{n:,}", cache, how, f"{seconds:.3f}", note)
                     for n, cache, how, seconds, note
                     in bench(rs, n, args.repeat, folder)]
    print(table(["hashes", "cache", "how", "seconds", "note"], rows,
                left=(1, 2, 4)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
