#!/usr/bin/env python3
"""Benchmark of reverse_search build and update speed.

    python3 bench/bench_build.py [--images DIR] [--count N]

Prints images/s for, per image set:
  (a) the seed-style baseline: imagehash.dhash(Image.open(path)) in a loop,
      one SQLite INSERT + COMMIT per row;
  (b) `reverse_search.py build` with 1 worker; (c) with os.cpu_count() workers;
  (d) the decode floor: Image.open + draft('L', (S, S)) + load only, S the
      side the tool's default hash decodes to (96 for phash 8), with
      1 worker (in this process) and with all workers (a pool started as
      the tool starts its own: fork on Linux, spawn elsewhere);
and the ratios b/a, c/a, c/d.  Every run is timed whole (pool start, SQLite,
index file included), one after the other in this process, page cache warm.
A second table gives CPU ms per image (this process + reaped workers), which
other load on the machine hardly changes, and steady-state rates with the
start-up cost of a worker pool (measured on 64 tiny files) taken off.

Also measured: (e) the time of `update` over an unchanged collection of tiny
distinct 64x64 JPEGs (1k, 10k, 100k), (f) the peak memory (ru_maxrss) of the
build and update processes at those sizes, measured in a child process, and
(g) the distribution of dhash-8 distances between `--hash-mode fast` and
`--hash-mode exact` on the JPEG sets, from two `export` CSVs.

Synthetic images are made deterministically into bench/data/build/ (git
ignored): smooth colour fields + gradient + grain, so they compress like
photographs.  When bench/data/corpus_4000/ exists (shared/bench/make_corpus.py
--size small --max-side 4000), its originals + near_dups JPEGs get a row too;
when bench/data/corpus_full_4000/ exists (the same with --size full), its
JPEGs of LARGE_MP megapixels or more (real photographs, 6-12 MP) get one,
hard-linked into bench/data/build/photos_large/.
Scratch databases go to a temporary folder under /tmp.  --count N keeps
exactly N files per synthetic set (extra ones are deleted, missing ones made);
--prepare only makes the data; --parts picks speed, diff and/or scale.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import _common
from _common import Timing, load_impl, machine, table, timed

ROOT = Path(_common.ROOT)
DATA = Path(_common.DATA) / "build"
CORPUS = Path(_common.DATA) / "corpus_4000" / "images"
CORPUS_FULL = Path(_common.DATA) / "corpus_full_4000" / "images"
TOOL_ARGS: list = []  # --tool-args: added to every run of the tool
LARGE_MP = 6.0  # camera-sized: the photos_large set starts here
GENERATOR = 1  # bump when the synthetic images change
TINY_PART = 1000  # tiny files per folder
START_FILES = 64  # over every Hasher.SMALL_JOB (48), so the pool starts
SUMMARY = re.compile(
    r"(?P<op>build|update): (?P<files>\d+) files, (?P<hashed>\d+) hashed, "
    r"(?P<reused>\d+) reused, (?P<unchanged>\d+) unchanged, (?P<failed>\d+) "
    r"failed, (?P<removed>\d+) removed in (?P<seconds>[\d.]+) s")

# Runs reverse_search.main in a fresh process and reports its peak memory:
# RUSAGE_SELF is the build/update process, RUSAGE_CHILDREN its hash workers.
PROBE = r"""
import contextlib, io, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import reverse_search
err = io.StringIO()
start = time.perf_counter()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = reverse_search.main(sys.argv[2:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "stderr": err.getvalue(),
                  "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kb":
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


# ---- result rows ----

@dataclass
class SpeedRow:
    """One image set under each way of hashing it."""

    name: str
    files: int
    megapixels: float
    baseline: Timing = field(default_factory=Timing)    # (a)
    tool_one: Timing = field(default_factory=Timing)    # (b)
    tool_all: Timing = field(default_factory=Timing)    # (c)
    floor_one: Timing = field(default_factory=Timing)   # (d), 1 worker
    floor_all: Timing = field(default_factory=Timing)   # (d), all workers
    tool_all_self: float = 0.0  # (c) images/s in the tool's own summary line

    def rate(self, t: Timing, fixed: Timing | None = None) -> float:
        """Images/s of a run; with `fixed`, its start-up cost taken off."""
        wall = t.wall - (fixed.wall if fixed else 0.0)
        return self.files / wall if wall > 0 else 0.0

    def cpu_ms(self, t: Timing) -> float:
        return 1000 * t.cpu / max(self.files, 1)


@dataclass
class ScaleRow:
    """Build and unchanged-update of N tiny files: time and peak memory."""

    files: int
    build_s: float = 0.0
    build_rate: float = 0.0
    build_main_mb: float = 0.0
    build_worker_mb: float = 0.0
    update_s: list = field(default_factory=list)   # wall, incl. interpreter
    update_tool_s: list = field(default_factory=list)  # summary line
    update_hashed: int = 0   # hashed + reused over all updates: must be 0
    update_main_mb: float = 0.0
    update_worker_mb: float = 0.0


@dataclass
class DiffRow:
    """dhash distance between fast and exact mode over one JPEG set."""

    name: str
    files: int
    exact_rate: float
    counts: list  # files at distance 0, 1, 2, 3, >3


@dataclass
class ImageSet:
    """Folders the tool is pointed at, and the files it will find there."""

    name: str
    roots: list
    extensions: list | None = None  # None: the tool's defaults
    files: list = field(default_factory=list)


# ---- synthetic images ----

PHOTO_SETS = {  # name -> (format, width, height)
    "jpeg_1mp": ("JPEG", 1152, 864),
    "jpeg_12mp": ("JPEG", 4000, 3000),
    "png_1mp": ("PNG", 1152, 864),
}
_GRAIN = {}


def _grain(width: int, height: int):
    """Full-size sensor-like noise around 128, made once per process."""
    import numpy as np
    from PIL import Image
    if (width, height) not in _GRAIN:
        rng = np.random.default_rng(12345)
        tile = np.clip(rng.normal(128, 5, (509, 521, 3)), 0, 255).astype(np.uint8)
        full = np.tile(tile, (height // 509 + 1, width // 521 + 1, 1))
        _GRAIN[(width, height)] = Image.fromarray(
            np.ascontiguousarray(full[:height, :width]))
    return _GRAIN[(width, height)]


def synth_photo(width: int, height: int, seed: int):
    """A photo-like RGB image: gradient + colour fields at 4 scales + grain."""
    import numpy as np
    from PIL import Image, ImageChops
    rng = np.random.default_rng(seed)
    sw, sh = max(width // 4, 16), max(height // 4, 16)
    yy = np.linspace(-.5, .5, sh, dtype=np.float32)[:, None, None]
    xx = np.linspace(-.5, .5, sw, dtype=np.float32)[None, :, None]
    a, b = rng.uniform(-80, 80, (2, 1, 1, 3)).astype(np.float32)
    acc = 128 + a * xx + b * yy
    for grid, amp in ((4, 60), (16, 30), (64, 20), (256, 10)):
        cells = rng.integers(0, 256, (max(grid * sh // sw, 1) + 1, grid, 3),
                             dtype=np.uint8)
        field_ = np.asarray(Image.fromarray(cells).resize((sw, sh),
                                                          Image.BICUBIC))
        acc += field_ * np.float32(amp / 128) - np.float32(amp)
    acc += rng.normal(0, 6, acc.shape).astype(np.float32)
    base = Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8))
    base = base.resize((width, height), Image.BICUBIC)
    grain = ImageChops.offset(_grain(width, height), int(rng.integers(width)),
                              int(rng.integers(height)))
    return ImageChops.add(base, grain, 1.0, -128)


def _make_photo(job: tuple) -> None:
    path, fmt, width, height, seed = job
    im = synth_photo(width, height, seed)
    tmp = path + ".tmp"
    im.save(tmp, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    os.replace(tmp, path)


def _make_tiny_part(job: tuple) -> None:
    """TINY_PART distinct 64x64 JPEGs (random 4x4 colour cells, upscaled)."""
    import numpy as np
    from PIL import Image
    folder, part = job
    os.makedirs(folder, exist_ok=True)
    cells = np.random.default_rng([GENERATOR, 7, part]).integers(
        0, 256, (TINY_PART, 4, 4, 3), dtype=np.uint8)
    for i in range(TINY_PART):
        path = os.path.join(folder, f"t{part:03d}_{i:04d}.jpg")
        if not os.path.exists(path):
            Image.fromarray(cells[i]).resize((64, 64), Image.BICUBIC).save(
                path + ".tmp", "JPEG", quality=85)
            os.replace(path + ".tmp", path)


def _pool_run(func, jobs: list) -> None:
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(os.cpu_count() or 1) as pool:
        for _ in pool.imap_unordered(func, jobs):
            pass


def ensure_photo_set(name: str, count: int) -> ImageSet:
    """bench/data/build/<name>/ with exactly `count` deterministic images."""
    fmt, width, height = PHOTO_SETS[name]
    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    stamp = folder / ".generator.json"
    want = {"generator": GENERATOR, "format": fmt, "size": [width, height]}
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        stamp.write_text(json.dumps(want))
    names = {f"{name}_{i:05d}{ext}" for i in range(count)}
    for extra in {p.name for p in folder.iterdir()} - names - {stamp.name}:
        (folder / extra).unlink()
    seed0 = zlib.crc32(name.encode())
    jobs = [(str(folder / n), fmt, width, height, seed0 + i)
            for i, n in enumerate(sorted(names)) if not (folder / n).exists()]
    if jobs:
        print(f"  making {len(jobs)} {name} images ...", file=sys.stderr)
    _pool_run(_make_photo, jobs)
    return ImageSet(name, [str(folder)])


def ensure_tiny(parts: int) -> list:
    """Folders bench/data/build/tiny/p000 ... of TINY_PART files each."""
    folders = [str(DATA / "tiny" / f"p{p:03d}") for p in range(parts)]
    jobs = [(f, p) for p, f in enumerate(folders)
            if not os.path.isdir(f) or len(os.listdir(f)) != TINY_PART]
    if jobs:
        print(f"  making {len(jobs) * TINY_PART} tiny images ...",
              file=sys.stderr)
    _pool_run(_make_tiny_part, jobs)
    return folders


def ensure_start_set() -> str:
    """START_FILES tiny JPEGs: the least work that still starts the tool's
    worker pool (smaller jobs are hashed in-process, see Hasher.SMALL_JOB)."""
    folder = DATA / f"start{START_FILES}"
    if not folder.is_dir() or len(os.listdir(folder)) != START_FILES:
        import numpy as np
        from PIL import Image
        folder.mkdir(parents=True, exist_ok=True)
        cells = np.random.default_rng([GENERATOR, 4]).integers(
            0, 256, (START_FILES, 4, 4, 3), dtype=np.uint8)
        for i in range(START_FILES):
            Image.fromarray(cells[i]).resize((64, 64), Image.BICUBIC).save(
                folder / f"s{i:03d}.jpg", "JPEG", quality=85)
    return str(folder)


def ensure_large_photos() -> ImageSet | None:
    """bench/data/build/photos_large/: hard links to the real JPEG photos
    of LARGE_MP or more in the full corpus (a copy where links fail)."""
    from PIL import Image
    if not CORPUS_FULL.is_dir():
        return None
    folder = DATA / "photos_large"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(CORPUS_FULL.rglob("*.jpg")):
        with Image.open(path) as im:
            if im.size[0] * im.size[1] < LARGE_MP * 1e6:
                continue
        target = folder / "__".join(path.relative_to(CORPUS_FULL).parts)
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return ImageSet("photos_large", [str(folder)])


def list_files(image_set: ImageSet) -> ImageSet:
    """Fill image_set.files with what the tool's walk will find, sorted."""
    import reverse_search as rs
    exts = image_set.extensions or rs.DEFAULT_EXTENSIONS
    walk = rs.Walk(list(image_set.roots), [e.lower() for e in exts])
    image_set.files = sorted(f.path for f in walk if not f.error)
    return image_set


def all_jpeg(files: list) -> bool:
    return all(f.lower().endswith((".jpg", ".jpeg", ".jpe", ".jfif"))
               for f in files)


def megapixels(files: list) -> float:
    from PIL import Image
    total = 0
    for path in files:
        with Image.open(path) as im:
            total += im.size[0] * im.size[1]
    return total / max(len(files), 1) / 1e6


def warm_cache(files: list) -> None:
    for path in files:
        with open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass


# ---- the measured runs ----

def run_baseline(files: list, scratch: Path) -> float:
    """(a) seconds for dhash(Image.open(path)) + one INSERT + COMMIT per row."""
    import imagehash
    from PIL import Image
    db_path = scratch / "baseline.db"
    db_path.unlink(missing_ok=True)
    start = time.perf_counter()
    db = sqlite3.connect(db_path)
    db.execute("CREATE TABLE images (path TEXT PRIMARY KEY, hash TEXT)")
    for path in files:
        value = str(imagehash.dhash(Image.open(path)))
        db.execute("INSERT INTO images VALUES (?, ?)", (path, value))
        db.commit()
    db.close()
    return time.perf_counter() - start


@functools.lru_cache(maxsize=None)
def _floor_side() -> int:
    import reverse_search
    return reverse_search.Config().spec.work_side


def _floor_decode(path: str) -> int:
    """The decode floor of one file: open, draft to the grey size that the
    tool's default hash asks for, load: no less than the tool must decode."""
    from PIL import Image
    side = _floor_side()
    with Image.open(path) as im:
        im.draft("L", (side, side))
        im.load()
        return im.size[0]


def run_floor(files: list, workers: int) -> float:
    """(d) seconds to decode every file at draft size; if workers > 1, in a
    pool started the way the tool starts its own (fork on Linux)."""
    import reverse_search
    start = time.perf_counter()
    if workers <= 1:
        for path in files:
            _floor_decode(path)
    else:
        ctx = multiprocessing.get_context(reverse_search.start_method())
        pool = ctx.Pool(workers)
        for _ in pool.imap_unordered(_floor_decode, files, chunksize=4):
            pass
        pool.close()
        pool.join()  # reaped workers count in RUSAGE_CHILDREN
    return time.perf_counter() - start


def tool_args(op: str, image_set: ImageSet, scratch: Path, tag: str,
              workers: int, mode: str = "fast") -> list:
    """Command line of one reverse_search run with its own db/index/output."""
    params = scratch / "params.json"
    if not params.exists():
        params.write_text("{}\n")
    args = [op, "--params", str(params), "--img-dirs", *image_set.roots,
            "--db-dir", str(scratch / tag / "db"),
            "--bk-dir", str(scratch / tag / "index"),
            "--output-dir", str(scratch / tag / "out"),
            "--workers", str(workers), "--hash-mode", mode]
    if image_set.extensions:
        args += ["--extensions", *image_set.extensions]
    return args + TOOL_ARGS


def run_tool(args: list) -> tuple[float, dict]:
    """Run reverse_search.main in this process: (wall seconds, summary)."""
    import reverse_search
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        code = reverse_search.main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"reverse_search {args[0]} failed ({code}): "
                           f"{err.getvalue().strip()}")
    return seconds, parse_summary(err.getvalue())


def parse_summary(text: str) -> dict:
    m = SUMMARY.search(text)
    if not m:
        return {}
    return {k: float(v) if k == "seconds" else v if k == "op" else int(v)
            for k, v in m.groupdict().items()}


def run_probe(args: list) -> dict:
    """Run reverse_search.main in a child process; wall time and ru_maxrss."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), *args],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"reverse_search {args[0]} failed: "
                           f"{result['stderr'].strip()}")
    result["wall"] = wall
    result["summary"] = parse_summary(result["stderr"])
    return result


def fresh(scratch: Path, tag: str) -> None:
    shutil.rmtree(scratch / tag, ignore_errors=True)


def tool_build(image_set: ImageSet, scratch: Path, tag: str, workers: int,
               mode: str = "fast") -> dict:
    """One clean `build` in this process; its summary line, checked."""
    fresh(scratch, tag)
    _, summary = run_tool(tool_args("build", image_set, scratch, tag, workers,
                                    mode))
    if summary.get("hashed") != len(image_set.files):
        raise RuntimeError(f"{image_set.name}: tool hashed "
                           f"{summary.get('hashed')} of {len(image_set.files)}")
    return summary


def measure_startup(scratch: Path, repeat: int) -> tuple[Timing, Timing]:
    """Fixed cost of a run with N workers: (tool, floor) on a few tiny files."""
    import reverse_search
    small_job = reverse_search.Hasher.SMALL_JOB[reverse_search.start_method()]
    if small_job > START_FILES:
        print(f"  warning: Hasher.SMALL_JOB is {small_job}: the start-up "
              f"run with {START_FILES} files does not start the pool",
              file=sys.stderr)
    image_set = list_files(ImageSet("start", [ensure_start_set()]))
    n = os.cpu_count() or 1
    tool = timed(tool_build, image_set, scratch, "start", n, repeat=repeat)[0]
    floor = timed(run_floor, image_set.files, n, repeat=repeat)[0]
    return tool, floor


def measure_speed(image_set: ImageSet, scratch: Path, repeat: int
                  ) -> SpeedRow:
    """(a)-(d) for one set, each the best of `repeat` whole runs."""
    files, n, name = image_set.files, os.cpu_count() or 1, image_set.name
    row = SpeedRow(name, len(files), megapixels(files))
    warm_cache(files)
    summary = {}

    def tool(workers: int, tag: str) -> None:
        summary.update(tool_build(image_set, scratch, tag, workers))

    row.baseline = timed(run_baseline, files, scratch, repeat=repeat)[0]
    row.tool_one = timed(tool, 1, f"{name}-w1", repeat=repeat)[0]
    row.tool_all = timed(tool, n, f"{name}-fast", repeat=repeat)[0]
    row.tool_all_self = len(files) / summary["seconds"]
    row.floor_one = timed(run_floor, files, 1, repeat=repeat)[0]
    row.floor_all = timed(run_floor, files, n, repeat=repeat)[0]
    return row


def measure_scale(count: int, scratch: Path) -> ScaleRow:
    """(e) + (f): build `count` tiny files, then two unchanged updates."""
    roots = ensure_tiny(count // TINY_PART)
    image_set = ImageSet(f"tiny_{count}", roots)
    warm_cache([os.path.join(r, f) for r in roots for f in os.listdir(r)])
    tag, n = f"tiny-{count}", os.cpu_count() or 1
    fresh(scratch, tag)
    row = ScaleRow(count)
    build = run_probe(tool_args("build", image_set, scratch, tag, n))
    row.build_s = build["wall"]
    row.build_rate = build["summary"]["hashed"] / build["wall"]
    row.build_main_mb = build["self_kb"] / 1024
    row.build_worker_mb = build["children_kb"] / 1024
    for _ in range(2):
        update = run_probe(tool_args("update", image_set, scratch, tag, n))
        s = update["summary"]
        row.update_s.append(update["wall"])
        row.update_tool_s.append(s["seconds"])
        row.update_hashed += s["hashed"] + s["reused"]
        if s["unchanged"] != count:
            raise RuntimeError(f"update saw {s['unchanged']} unchanged of "
                               f"{count}")
        row.update_main_mb = max(row.update_main_mb, update["self_kb"] / 1024)
        row.update_worker_mb = max(row.update_worker_mb,
                                   update["children_kb"] / 1024)
    fresh(scratch, tag)
    return row


def export_hashes(image_set: ImageSet, scratch: Path, tag: str) -> dict:
    """path -> hash (int) from `export` of the database built under tag."""
    args = tool_args("export", image_set, scratch, tag, 1)
    run_tool(args)
    with open(scratch / tag / "out" / "export.csv", newline="",
              encoding="utf-8") as fh:
        return {r["path"]: int(r["hash"], 16) for r in csv.DictReader(fh)
                if r["hash"]}


def measure_diff(image_set: ImageSet, scratch: Path) -> DiffRow:
    """(g) fast vs exact dhash over the same files (fast db from measure_speed)."""
    n = os.cpu_count() or 1
    tag = f"{image_set.name}-exact"
    fresh(scratch, tag)
    seconds, _ = run_tool(tool_args("build", image_set, scratch, tag, n,
                                    mode="exact"))
    fast = export_hashes(image_set, scratch, f"{image_set.name}-fast")
    exact = export_hashes(image_set, scratch, tag)
    counts = [0] * 5
    for path, value in exact.items():
        counts[min(bin(value ^ fast[path]).count("1"), 4)] += 1
    return DiffRow(image_set.name, len(exact), len(image_set.files) / seconds,
                   counts)


# ---- report ----

def libraries() -> str:
    """What decodes and hashes here, beyond machine()'s line."""
    import imagehash
    from PIL import features
    turbo = features.check_feature("libjpeg_turbo")
    return (f"libjpeg-turbo {'yes' if turbo else 'no'}, ImageHash "
            f"{imagehash.__version__}")


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")




def report_speed(rows: list, workers: int, startup: tuple) -> None:
    n = workers
    print(f"\nBuild throughput, images/s (whole runs, best of --repeat; "
          f"N = {n} workers)")
    print(table(
        ["set", "files", "MP", "(a) base", "(b) tool 1w", f"(c) tool {n}w",
         "(d) floor 1w", f"(d) floor {n}w", "b/a", "c/a", "c/d", "b/d1w"],
        [[r.name, r.files, f"{r.megapixels:.1f}",
          *(f"{r.rate(t):.1f}" for t in (r.baseline, r.tool_one, r.tool_all,
                                         r.floor_one, r.floor_all)),
          f"{div(r.rate(r.tool_one), r.rate(r.baseline)):.1f}x",
          f"{div(r.rate(r.tool_all), r.rate(r.baseline)):.1f}x",
          f"{div(r.rate(r.tool_all), r.rate(r.floor_all)):.2f}",
          f"{div(r.rate(r.tool_one), r.rate(r.floor_one)):.2f}"] for r in rows]))
    tool0, floor0 = startup
    print(f"\nStart-up cost with {n} workers ({START_FILES} tiny files): tool "
          f"{tool0.wall:.2f} s wall / {tool0.cpu:.2f} s CPU, floor pool "
          f"{floor0.wall:.2f} s / {floor0.cpu:.2f} s CPU")
    print("CPU ms per image (this process + workers) and steady-state images/s "
          "(start-up cost taken off)")
    print(table(
        ["set", "(a) cpu", "(b) cpu", "(c) cpu", "(d) cpu 1w", f"(d) cpu {n}w",
         "b/d1w cpu", f"c/d{n}w cpu", "(c) steady", "(d) steady", "c/d steady",
         "(c) self"],
        [[r.name, *(f"{r.cpu_ms(t):.1f}" for t in (
            r.baseline, r.tool_one, r.tool_all, r.floor_one, r.floor_all)),
          f"{div(r.floor_one.cpu, r.tool_one.cpu):.2f}",
          f"{div(r.floor_all.cpu, r.tool_all.cpu):.2f}",
          f"{r.rate(r.tool_all, tool0):.1f}", f"{r.rate(r.floor_all, floor0):.1f}",
          f"{div(r.rate(r.tool_all, tool0), r.rate(r.floor_all, floor0)):.2f}",
          f"{r.tool_all_self:.1f}"] for r in rows]))
    print("(x/y cpu = CPU the floor needs / CPU the tool needs; (c) self = "
          "images/s of the tool's own summary line)")


def report_scale(rows: list) -> None:
    print("\nTiny 64x64 JPEGs: build, then two updates of the unchanged "
          "collection (wall s, child process incl. interpreter start)")
    print(table(
        ["files", "build s", "build img/s", "build RSS main MB",
         "build RSS worker MB", "update s (1st, 2nd)", "tool s (1st, 2nd)",
         "decoded", "update RSS MB"],
        [[r.files, f"{r.build_s:.1f}", f"{r.build_rate:.0f}",
          f"{r.build_main_mb:.0f}", f"{r.build_worker_mb:.0f}",
          ", ".join(f"{s:.2f}" for s in r.update_s),
          ", ".join(f"{s:.2f}" for s in r.update_tool_s),
          r.update_hashed, f"{r.update_main_mb:.0f}"] for r in rows]))


def report_diff(rows: list) -> None:
    print("\ndhash 8: distance between fast and exact mode (% of files)")
    print(table(
        ["set", "files", "exact build img/s", "d=0", "1", "2", "3", ">3"],
        [[r.name, r.files, f"{r.exact_rate:.1f}",
          *(f"{100 * c / max(r.files, 1):.1f}" for c in r.counts)]
         for r in rows]))


def report_targets(speed: list, scale: list) -> None:
    print("\nTargets")
    checks = []
    for r in speed:
        c_a = div(r.rate(r.tool_all), r.rate(r.baseline))
        if "12mp" in r.name:
            checks.append((f"{r.name}: c/a >= 10x", c_a, c_a >= 10))
        elif "1mp" in r.name:
            checks.append((f"{r.name}: c/a >= 5x", c_a, c_a >= 5))
        c_d = div(r.rate(r.tool_all), r.rate(r.floor_all))
        checks.append((f"{r.name}: c within 15 % of floor (c/d >= 0.85)",
                       c_d, c_d >= .85))
    for r in scale:
        if r.files >= 100_000:
            checks.append((f"update of {r.files} unchanged < 5 s (worst run)",
                           max(r.update_s), max(r.update_s) < 5))
        checks.append((f"update of {r.files} unchanged decodes nothing",
                       r.update_hashed, r.update_hashed == 0))
    if len(scale) >= 2:
        lo, hi = scale[0], scale[-1]
        growth = hi.build_main_mb - lo.build_main_mb
        checks.append((f"build main RSS grows < 10 MB from {lo.files} to "
                       f"{hi.files} files (MB)", growth, growth < 10))
        growth = hi.build_worker_mb - lo.build_worker_mb
        checks.append((f"build worker RSS grows < 10 MB from {lo.files} to "
                       f"{hi.files} files (MB)", growth, growth < 10))
    for text, value, ok in checks:
        print(f"  [{'ok' if ok else 'MISS'}] {text}: {value:.2f}")


# ---- command line ----

def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", metavar="DIR", action="append", default=[],
                   help="benchmark the images under DIR instead of the "
                        "synthetic sets (repeatable)")
    p.add_argument("--count", type=int, default=200,
                   help="images per synthetic set (default 200)")
    p.add_argument("--sets", nargs="+",
                   default=[*PHOTO_SETS, "photos_large", "corpus"],
                   choices=[*PHOTO_SETS, "photos_large", "corpus"],
                   help="which image sets to time (default: all)")
    p.add_argument("--repeat", type=int, default=1,
                   help="take the best of this many runs (default 1)")
    p.add_argument("--scale", type=int, nargs="*",
                   default=[1_000, 10_000, 100_000],
                   help="tiny-file collection sizes for update time and "
                        "memory, multiples of 1000 ([] skips)")
    p.add_argument("--parts", nargs="+", choices=("speed", "diff", "scale"),
                   default=["speed", "diff", "scale"],
                   help="what to measure: speed (a)-(d), diff (g: fast vs "
                        "exact; needs speed), scale (e, f); default all")
    p.add_argument("--tool-args", default="",
                   help="more reverse_search flags for every run of the "
                        "tool, e.g. \"--tool-args=--no-centre-hashes\"")
    p.add_argument("--prepare", action="store_true",
                   help="only make the synthetic and tiny images, then exit")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch folder under /tmp")
    args = p.parse_args(argv)
    if any(n <= 0 or n % TINY_PART for n in args.scale):
        p.error(f"--scale sizes must be positive multiples of {TINY_PART}")
    return args


def image_sets(args: argparse.Namespace) -> list:
    if args.images:
        sets = [ImageSet(Path(d).name or d, [os.path.abspath(d)])
                for d in args.images]
    else:
        sets = [ensure_photo_set(name, args.count) for name in PHOTO_SETS
                if name in args.sets]
    if "photos_large" in args.sets and not args.images:
        sets.append(ensure_large_photos())
    if CORPUS.is_dir() and "corpus" in args.sets:
        sets.append(ImageSet("corpus_4000_jpeg",
                             [str(CORPUS / "originals"), str(CORPUS / "near_dups")],
                             [".jpg", ".jpeg"]))
    return [s for s in map(list_files, filter(None, sets)) if s.files]


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    TOOL_ARGS[:] = args.tool_args.split()
    load_impl()  # `import reverse_search` below finds the checkout's
    workers = os.cpu_count() or 1
    if args.prepare:
        image_sets(args)
        ensure_start_set()
        ensure_tiny(max(args.scale, default=0) // TINY_PART)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="bench_build-", dir="/tmp"))
    print(f"# {machine()} | {libraries()}")
    print("command: python3 bench/bench_build.py " + " ".join(sys.argv[1:]))
    speed, scale, diff = [], [], []
    try:
        sets = image_sets(args) if "speed" in args.parts else []
        startup = measure_startup(scratch, args.repeat) if sets else None
        for image_set in sets:
            print(f"  {image_set.name}: {len(image_set.files)} files (load "
                  f"{os.getloadavg()[0]:.2f}) ...", file=sys.stderr)
            speed.append(measure_speed(image_set, scratch, args.repeat))
            if "diff" in args.parts and all_jpeg(image_set.files):
                diff.append(measure_diff(image_set, scratch))
        for count in args.scale if "scale" in args.parts else []:
            print(f"  tiny files: {count} (load {os.getloadavg()[0]:.2f}) ...",
                  file=sys.stderr)
            scale.append(measure_scale(count, scratch))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other "
          f"processes on the machine skew wall times; CPU columns much less)")
    if speed:
        report_speed(speed, workers, startup)
    if diff:
        report_diff(diff)
    if scale:
        report_scale(scale)
    report_targets(speed, scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
