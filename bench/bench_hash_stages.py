#!/usr/bin/env python3
"""Where a hashing worker's CPU goes, stage by stage, for each image.

    python3 bench/bench_hash_stages.py --images DIR [--count N]
    python3 bench/bench_hash_stages.py --images DIR --tool OTHER/reverse_search.py

Runs the steps of hash_file (read, SHA-256, open + draft, EXIF and traits,
decode, prepare, whole hashes, content box, windows, detail, packing) on N
files of DIR (every file by default, sorted, evenly spaced), in this process
with BLAS in one thread as in a worker, and prints CPU ms per image for each
stage (process time: other load on the machine changes it much less than
wall time), then hash_file itself timed whole over the same files.  The
stages above "decode" are what the decode floor of bench_build.py also pays;
the rest is the hashing.  --tool times hash_file of another checkout (an
older commit, say) beside this one's, taking turns file by file; its stages
are not split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time

from _common import TOOL, load_impl, machine, table


def files_of(folder: str, count: int | None) -> list:
    paths = sorted(os.path.join(top, name) for top, _, names in os.walk(folder)
                   for name in names)
    if count and count < len(paths):
        paths = [paths[k * len(paths) // count] for k in range(count)]
    return paths


def stages(rs, path: str, spec, clock: dict) -> None:
    """hash_image_bytes's steps for one file, each one's CPU added to `clock`."""
    from PIL import Image
    marks = [("", time.process_time())]

    def mark(name):
        marks.append((name, time.process_time()))
    with open(path, "rb") as fh:
        data = fh.read()
    mark("read")
    hashlib.sha256(data).digest()
    mark("sha256")
    im = Image.open(io.BytesIO(data))
    mode = im.mode
    rs.draft(im, spec)
    mark("open + draft")
    rs.Traits.of(im, mode).text()
    orientation = rs._exif_orientation(im)
    mark("EXIF, traits (a PNG decodes here)")
    im.load()
    mark("decode")
    im, outer, grey = rs.prepare(im, spec, orientation)
    mark("prepare (reduce, turn, trim)")
    value, variants, centres = rs.whole_hashes(im, spec, grey)
    mark("whole, 7 turns, 2 centres")
    content = rs.content_hashes(im, spec, value, outer, grey)
    mark("content box")
    windows = rs.window_hashes(im, spec, grey)
    mark("161 windows")
    probe = rs._detail_probe(im)
    rs.low_detail(probe), rs.detail_bits(probe)
    mark("detail")
    rs.pack_hashes(variants + centres + content + windows, spec.bits)
    mark("pack")
    for (_, start), (name, end) in zip(marks, marks[1:]):
        clock[name] = clock.get(name, 0.0) + end - start


def whole_runs(tools: list, paths: list) -> list:
    """CPU seconds of hash_file for each tool, taking turns file by file."""
    jobs = [rs.HashJob(rs.Config().spec, 178956970, 2**30) for rs in tools]
    spent = [0.0] * len(tools)
    for path in paths:
        for k, (rs, job) in enumerate(zip(tools, jobs)):
            start = time.process_time()
            rs.hash_file(rs.HashTask(path), job)
            spent[k] += time.process_time() - start
    return spent


def load_other(path: str):
    """Another checkout's reverse_search, as a module of another name."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("reverse_search_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reverse_search_other"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, metavar="DIR")
    p.add_argument("--count", type=int, default=None,
                   help="files to take, evenly spaced (default: all)")
    p.add_argument("--tool", metavar="PATH",
                   help="another reverse_search.py to time beside this one")
    args = p.parse_args(argv)
    rs = load_impl()
    rs._setup_decoders()
    rs._one_blas_thread()
    spec = rs.Config().spec
    paths = files_of(args.images, args.count)
    for path in paths[:5]:  # caches and first imports out of the way
        stages(rs, path, spec, {})
    clock, failed = {}, 0
    for path in paths:
        try:
            stages(rs, path, spec, clock)
        except Exception:  # a bad file: hash_file would record it
            failed += 1
    done = len(paths) - failed
    print(f"# {machine()}")
    print("command: python3 bench/bench_hash_stages.py " + " ".join(
        sys.argv[1:] if argv is None else argv))
    rows = [(name, f"{1000 * seconds / done:.3f}")
            for name, seconds in clock.items()]
    rows.append(("all stages", f"{1000 * sum(clock.values()) / done:.3f}"))
    print(table(["stage", "CPU ms an image"], rows,
                title=f"{done} images of {args.images} ({failed} failed)"))
    tools = [rs] + ([load_other(args.tool)] if args.tool else [])
    spent = whole_runs(tools, paths)
    names = [TOOL] + ([args.tool] if args.tool else [])
    print(table(["hash_file of", "CPU ms a file"],
                [(n, f"{1000 * s / len(paths):.3f}") for n, s in zip(names, spent)],
                title=f"hash_file whole, {len(paths)} files, taking turns"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
