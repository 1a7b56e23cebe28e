#!/usr/bin/env python3
"""reverse_search against other near-duplicate finders, end to end.

Each tool indexes a labelled corpus (shared/bench/make_corpus.py) from
scratch and reports its groups of near-duplicates, run as whole processes
(interpreter start, hashing, grouping and every file written included):

  reverse_search   `build`, then `find_duplicates` (HTML report included),
                   shipped defaults, a fresh database each time
  czkawka          its Python bindings (pip install -r requirements-bench.txt),
                   ImageSimilarity at its default similarity level
  imagededup       PHash, defaults (only when it is installed: it pulls in
                   PyTorch, so it is not in requirements-bench.txt)

The tools take turns (A B C, A B C, ...) for --reps rounds, so load from
other users of the machine falls on all of them alike; the table gives the
median of each column, and the 1-minute load average around every run.

    python3 bench/bench_peers.py                      # /work/data/std-like corpus
    python3 bench/bench_peers.py --corpus DIR --reps 5 --json out.json
    python3 bench/bench_peers.py --tools reverse_search,czkawka
    python3 bench/bench_peers.py --tools reverse_search,czkawka --against OLD.py

--against OLD.py adds another version of reverse_search.py to the turns, a
row of its own: before and after in one run, under the same load.

--scale 100k,1M runs reverse_search alone end to end at those sizes on a
synthetic database (bench/data/scale/<N>/, made once through the script's own
Store: 62 % unrelated images, the rest in near-duplicate clusters of 2-6 with
up to 3 bits changed per hash, centre hashes alike; the 400 images of the 50
largest clusters are real 64x64 JPEGs so the report's first page has
pictures): `find_duplicates` (r=8) with a missing index file, again with the
index file, again without the HTML report, and `search` of one image (warm,
then with the index folder's files dropped from the page cache first), each
a whole process: wall, CPU, peak memory (the process and its children).
--against OLD.py runs another version of the script after each run of this
one (interleaved) and adds the ratio of their wall times; --only search runs
only the runs whose name holds that text.

Scores against truth.csv (bench/evaluate.py's rules): pair precision (pairs
inside reported groups that are true, `related` and `hard` pairs left out),
pair recall (the issue's "near-dup recall": true pairs reported / all true
pairs), and near-dups found (share of near_dup files reported in one group
with their original).  Wall and CPU seconds are the process's own plus
its reaped children (the hashing workers), from os.wait4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from _common import (DATA, TOOL, load_impl, log, machine, parse_size, table,
                     tool_version)
from evaluate import paired_with_original, read_truth, relative, score_pairs

DEFAULT_CORPUS = os.environ.get("NDBENCH_CORPUS", "/work/data/std")
TOOLS = ("reverse_search", "czkawka", "imagededup")

# Each peer runs in a fresh interpreter and writes its groups as a JSON list
# of lists of paths to argv[2].
CZKAWKA = r"""
import json, sys, czkawka
finder = czkawka.ImageSimilarity()
finder.set_directories([sys.argv[1]])
if len(sys.argv) > 3:
    finder.set_similarity(int(sys.argv[3]))
groups = finder.find_similar()
with open(sys.argv[2], "w") as fh:
    json.dump([[str(p) for p in g] for g in groups], fh)
"""

IMAGEDEDUP = r"""
import json, os, sys
from imagededup.methods import PHash
dups = PHash(verbose=False).find_duplicates(image_dir=sys.argv[1], scores=False,
                                            recursive=True)
seen, groups = set(), []
for key, others in sorted(dups.items()):   # key -> its duplicates: pairs
    for other in others:
        pair = tuple(sorted((key, other)))
        if pair not in seen:
            seen.add(pair)
            groups.append([os.path.join(sys.argv[1], p) for p in pair])
with open(sys.argv[2], "w") as fh:
    json.dump(groups, fh)
"""


@dataclass
class Run:
    """One whole run of one tool: one or more processes."""

    wall: float = 0.0
    cpu: float = 0.0
    peak_mb: float = 0.0
    load: float = 0.0     # 1-minute load average when it started
    steps: dict = field(default_factory=dict)  # step -> wall s
    precision: float | None = None
    recall: float | None = None
    near_dup_recall: float | None = None
    groups: int = 0
    pairs: int = 0
    result: str = ""      # digest of the groups found, to compare rounds


def measure_process(cmd: list, cwd: str | None = None
                    ) -> tuple[float, float, float]:
    """Run a command; (wall s, CPU s with reaped children, peak RSS MB of
    the process itself, from os.wait4: _common.timed cannot tell one
    child's peak from another's)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, use = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed "
                           f"(exit {proc.returncode}): "
                           f"{err.decode(errors='replace').strip()[-2000:]}")
    return wall, use.ru_utime + use.ru_stime, use.ru_maxrss / 1024


def run_steps(run: Run, steps: list) -> None:
    for name, cmd in steps:
        wall, cpu, peak = measure_process(cmd)
        run.wall += wall
        run.cpu += cpu
        run.peak_mb = max(run.peak_mb, peak)
        run.steps[name] = wall


def run_reverse_search(images: str, work: str, extra: list,
                       script: str = TOOL) -> tuple[Run, list]:
    params = os.path.join(work, "params.json")
    with open(params, "w", encoding="utf-8") as fh:
        json.dump({"img_dirs": [images], "input_dir": images,
                   "db_dir": os.path.join(work, "db"),
                   "bk_dir": os.path.join(work, "index"),
                   "output_dir": os.path.join(work, "out")}, fh)
    base = [sys.executable, script, "--params", params, "-q", *extra]
    run = Run(load=os.getloadavg()[0])
    run_steps(run, [("build", base[:2] + ["build"] + base[2:]),
                    ("find_duplicates", base[:2] + ["find_duplicates"] + base[2:])])
    with open(os.path.join(work, "out", "find_duplicates.json"),
              encoding="utf-8") as fh:
        doc = json.load(fh)
    return run, [[m["path"] for m in g["images"]] for g in doc["groups"]]


def run_peer(script: str, images: str, work: str, args: list
             ) -> tuple[Run, list]:
    out = os.path.join(work, "groups.json")
    run = Run(load=os.getloadavg()[0])
    run_steps(run, [("all", [sys.executable, "-c", script, images, out, *args])])
    with open(out, encoding="utf-8") as fh:
        return run, json.load(fh)


def score(run: Run, groups: list, corpus: str, truth: dict) -> None:
    items = [[truth[f] for f in (relative(corpus, p) for p in g) if f in truth]
             for g in groups]
    s = score_pairs(items, truth)
    run.precision, run.recall = s.precision, s.recall
    run.groups, run.pairs = len(items), s.reported
    canon = sorted(sorted(relative(corpus, p) for p in g) for g in groups)
    run.result = hashlib.sha256(json.dumps(canon).encode()).hexdigest()[:12]
    hit = paired_with_original(items, truth)
    near = [f for f, i in truth.items() if i.category == "near_dup"]
    run.near_dup_recall = sum(hit[f] for f in near) / len(near) if near else None


def available(tool: str) -> bool:
    if tool == "reverse_search":
        return True
    import importlib.util
    return importlib.util.find_spec(tool) is not None


def version(tool: str) -> str:
    """The tool's name and version (reverse_search's with its commit)."""
    if tool == "reverse_search":
        return tool_version()
    from importlib.metadata import version as dist_version
    return f"{tool} {dist_version(tool)}"


def median(values: list):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def runs_table(runs: dict, label: dict) -> str:
    ref = "czkawka" if "czkawka" in runs else next(iter(runs))
    head = ["tool", "wall s", "CPU s", f"wall / {ref}", "peak MB",
            "pair precision", "pair recall", "near-dups found", "groups",
            "results per round", "load 1m"]
    first = median([r.wall for r in runs[ref]])
    rows = []
    for tool, rs in runs.items():
        wall = median([r.wall for r in rs])
        rows.append([label[tool], fmt(wall, ".2f"),
                     fmt(median([r.cpu for r in rs]), ".2f"),
                     fmt(wall / first if wall and first else None, ".2f"),
                     fmt(median([r.peak_mb for r in rs]), ".0f"),
                     fmt(median([r.precision for r in rs]), ".3f"),
                     fmt(median([r.recall for r in rs]), ".3f"),
                     fmt(median([r.near_dup_recall for r in rs]), ".3f"),
                     fmt(median([r.groups for r in rs]), ".0f"),
                     "same" if len({r.result for r in rs}) == 1 else
                     f"{len({r.result for r in rs})} different",
                     fmt(median([r.load for r in rs]), ".2f")])
    return table(head, rows, left=(0, 9), markdown=True)


# ---- scale ----

SCALE_GENERATOR = 3     # bump when the fixture changes
SCALE_CLUSTERED = 0.38  # share of images in clusters (1M: ~110k groups)
SCALE_REAL = 50         # largest clusters (8 images each) made real files


def scale_hashes(n: int, slots: int, rng):
    """(n, slots) uint64 hashes (the main one, then every stored extra) and
    the cluster sizes: members are their cluster's first row with 0-3 bits
    changed in each hash."""
    import numpy as np
    sizes = [8] * SCALE_REAL
    left = int(n * SCALE_CLUSTERED) - sum(sizes)
    while left > 1:
        k = min(int(rng.choice([2, 2, 2, 3, 3, 4, 5, 6])), left)
        sizes.append(k)
        left -= k
    base = rng.integers(0, 2**64 - 1, (n, slots), dtype=np.uint64,
                        endpoint=True)
    one = np.uint64(1)
    at = 0
    for k in sizes:
        flips = rng.integers(0, 64, (k - 1, slots, 3)).astype(np.uint64)
        keep = rng.integers(0, 4, (k - 1, slots, 1)) > np.arange(3)
        masks = np.where(keep, np.left_shift(one, flips), np.uint64(0))
        base[at + 1:at + k] = base[at] ^ np.bitwise_or.reduce(masks, axis=2)
        at += k
    return base, sizes


def make_scale_fixture(rs, n: int, folder: str) -> str:
    """A params.json over a synthetic database of n images (made once)."""
    import numpy as np
    from PIL import Image
    folder = os.path.abspath(folder)
    params = os.path.join(folder, "params.json")
    stamp = os.path.join(folder, "fixture.json")
    spec = rs.config_from({}, params, {}).spec  # the shipped hash kind
    want = {"generator": SCALE_GENERATOR, "n": n, "kind": spec.kind}
    if os.path.exists(stamp):
        with open(stamp) as fh:
            if json.load(fh) == want:
                return params
    shutil.rmtree(folder, ignore_errors=True)
    images = os.path.join(folder, "images")
    os.makedirs(images)
    with open(params, "w") as fh:
        json.dump({"img_dirs": [images], "input_dir": images,
                   "db_dir": os.path.join(folder, "db"),
                   "bk_dir": os.path.join(folder, "index"),
                   "output_dir": os.path.join(folder, "out"),
                   "distance_threshold": 8, "workers": 2}, fh)
    cfg = rs.config_from(rs.read_params(params), params, {})
    rng = np.random.default_rng([SCALE_GENERATOR, n])
    hashes, sizes = scale_hashes(n, 1 + spec.extra_count, rng)
    if spec.content_count:  # no content box: its hash is the whole one
        at = 1 + spec.variant_count + spec.centre_count
        hashes[:, at] = hashes[:, 0]
        hashes[:, at + 1] = rs.FULL_BOX_WORD
    extras = hashes[:, 1:].astype(">u8")
    traits = rs.Traits(format="JPEG").text()
    real = sum(sizes[:SCALE_REAL])
    colours = rng.integers(0, 256, (real, 4, 4, 3), dtype=np.uint8)
    store = rs.Store(cfg.db_path, create=True)
    store.start_kind(cfg.spec)
    bits, batch = cfg.spec.bits, 50_000
    for lo in range(0, n, batch):
        rows = []
        for k in range(lo, min(n, lo + batch)):
            path = os.path.join(images, f"p{k // 1000:04d}", f"i{k:07d}.jpg")
            rows.append(rs.ImageRow(
                path, 20_000 + k % 9973, 1_700_000_000_000_000_000 + k,
                k.to_bytes(32, "big"), int(hashes[k, 0]), 64, 64, None, None,
                extras[k].tobytes(), False, 3.3, traits))
            if k < real:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(colours[k]).resize((64, 64)).save(path)
        store.upsert(rows, bits)
        print(f"  fixture {n}: {min(n, lo + batch)} rows", file=sys.stderr,
              flush=True)
    store.record_coverage(cfg.img_dirs, spec.kind)  # no walk of the folder
    store.close()
    with open(stamp, "w") as fh:
        json.dump(want, fh)
    return params


def drop_from_page_cache(folder: str) -> None:
    """The files in folder out of the page cache (posix_fadvise DONTNEED:
    as after a reboot, for these files only; pages another process maps
    stay)."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def scale(sizes: list, reps: int, against: str | None = None,
          only: str = "") -> int:
    """The --scale table; with `against` (another reverse_search.py), each
    run of this checkout's script is followed by the same run of that one
    (interleaved, so load falls on both alike), and the ratio is shown.
    only: just the runs whose name holds this text (e.g. "search")."""
    rs = load_impl()
    started = machine()
    tools = [("this", TOOL)] + ([("against", os.path.abspath(against))]
                                if against else [])
    rows = []
    for n in sizes:
        folder = os.path.join(DATA, "scale", str(n))
        params = make_scale_fixture(rs, n, folder)
        query = os.path.join(folder, "images", "p0000", "i0000005.jpg")
        cases = [("find_duplicates, index file missing", ["find_duplicates"],
                  True),
                 ("find_duplicates", ["find_duplicates"], False),
                 ("find_duplicates, no HTML report",
                  ["find_duplicates", "--no-html-report"], False),
                 ("search, one image", ["search", query], False),
                 ("search, one image, index out of the page cache",
                  ["search", query], False)]
        for name, args, cold in [c for c in cases if only in c[0]]:
            took = {label: [] for label, _ in tools}
            for _ in range(1 if cold else reps):
                for label, tool in tools:
                    if cold:
                        shutil.rmtree(os.path.join(folder, "index"),
                                      ignore_errors=True)
                    if "page cache" in name:
                        drop_from_page_cache(os.path.join(folder, "index"))
                    load = os.getloadavg()[0]
                    cmd = [sys.executable, tool, "--params", params, "-q", *args]
                    took[label].append((*measure_process(cmd), load))
            for label, _ in tools:
                t = took[label]
                row = [f"{n:,}", name] + [label] * bool(against) + [
                    fmt(median([x[k] for x in t]), f) for k, f in
                    ((0, ".2f"), (1, ".2f"), (2, ".0f"), (3, ".2f"))]
                if against:
                    this, other = (median([x[0] for x in took[k]])
                                   for k in ("this", "against"))
                    row.append(fmt(this / other if label == "this" else None,
                                   ".2f"))
                rows.append(row)
                log("  " + "  ".join(row))
        if "find_duplicates" not in only and only:
            continue
        with open(os.path.join(folder, "out", "find_duplicates.json")) as fh:
            doc = json.load(fh)
        rows.append([f"{n:,}", f"({doc['group_count']:,} groups, "
                     f"{doc['duplicates']:,} duplicates)"] +
                    [""] * (4 + 2 * bool(against)))
    print(f"# {started}")
    print(f"# median of {reps} runs (1 for a missing index)"
          + (f"; 'against' is {against}, run after each 'this'" if against
             else "") + "\n")
    head = ["images", "run"] + ["script"] * bool(against) + \
        ["wall s", "CPU s", "peak MB", "load 1m"] + \
        ["wall / against"] * bool(against)
    print(table(head, rows, left=(1, 2) if against else (1,), markdown=True))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=DEFAULT_CORPUS,
                    help="corpus folder with truth.csv and images/ (default: "
                         "$NDBENCH_CORPUS or /work/data/std)")
    ap.add_argument("--reps", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help="comma-separated, in this order (default: all that "
                         "are installed)")
    ap.add_argument("--tool-args", default="", metavar="FLAGS",
                    help="more reverse_search flags for both of its commands, "
                         "e.g. '--no-html-report'")
    ap.add_argument("--czkawka-level", type=int, default=None,
                    help="czkawka similarity level 0-50 (default: its own)")
    ap.add_argument("--json", metavar="FILE", help="also save every run here")
    ap.add_argument("--scale", metavar="SIZES", default="",
                    help="instead: reverse_search alone on synthetic databases "
                         "of these sizes, e.g. 100k,1M (see above)")
    ap.add_argument("--only", metavar="TEXT", default="",
                    help="with --scale: only the runs whose name holds TEXT, "
                         "e.g. 'search'")
    ap.add_argument("--against", metavar="OLD.py",
                    help="also run this other reverse_search.py, interleaved: "
                         "a row of its own in the table (with --scale: and "
                         "the ratio)")
    args = ap.parse_args(argv)
    if args.scale:
        return scale([parse_size(x) for x in args.scale.split(",") if x],
                     args.reps, args.against, args.only)
    corpus = os.path.abspath(args.corpus)
    if not os.path.isfile(os.path.join(corpus, "truth.csv")):
        print(f"bench_peers: no truth.csv in {corpus}; build a corpus with "
              f"shared/bench/make_corpus.py or give --corpus", file=sys.stderr)
        return 2
    truth = read_truth(corpus)
    images = os.path.join(corpus, "images")
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TOOLS]
    if unknown:
        print(f"bench_peers: unknown tool(s) {unknown}; choose from {TOOLS}",
              file=sys.stderr)
        return 2
    tools = [t for t in wanted if available(t)]
    for t in set(wanted) - set(tools):
        print(f"bench_peers: {t} is not installed, left out", file=sys.stderr)
    against = os.path.abspath(args.against) if args.against else None
    if against:  # another version, in turn with this one
        tools.insert(tools.index("reverse_search") + 1 if "reverse_search"
                     in tools else 0, "against")
    extra = args.tool_args.split()
    czk_args = [] if args.czkawka_level is None else [str(args.czkawka_level)]
    label = {t: tool_version(against) if t == "against" else version(t)
             for t in tools}
    if "czkawka" in label:
        label["czkawka"] += (f", level {args.czkawka_level}"
                             if czk_args else ", its default level")
    runs = {t: [] for t in tools}
    started = machine()
    for rep in range(args.reps):
        for tool in tools:
            work = tempfile.mkdtemp(prefix=f"peers-{tool}-")
            try:
                if tool == "reverse_search":
                    run, groups = run_reverse_search(images, work, extra)
                elif tool == "against":
                    run, groups = run_reverse_search(images, work, extra,
                                                     against)
                elif tool == "czkawka":
                    run, groups = run_peer(CZKAWKA, images, work, czk_args)
                else:
                    run, groups = run_peer(IMAGEDEDUP, images, work, [])
            except RuntimeError as exc:
                print(f"bench_peers: {tool}: {exc}", file=sys.stderr)
                return 1
            finally:
                shutil.rmtree(work, ignore_errors=True)
            score(run, groups, corpus, truth)
            runs[tool].append(run)
            steps = ", ".join(f"{k} {v:.2f}" for k, v in run.steps.items())
            log(f"round {rep + 1}/{args.reps} {tool}: wall {run.wall:.2f} s "
                f"({steps}), CPU {run.cpu:.2f} s, load {run.load:.2f}")
    print(f"# {started}")
    print(f"# {len(truth)} files in {corpus}; medians of {args.reps} "
          f"interleaved rounds; load 1m at the end: {os.getloadavg()[0]:.2f}\n")
    print(runs_table(runs, label))
    if "reverse_search" in runs:
        rs = runs["reverse_search"]
        print("\nreverse_search steps (median wall s): " + ", ".join(
            f"{k} {median([r.steps[k] for r in rs]):.2f}" for k in rs[0].steps))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"corpus": corpus, "machine": started, "labels": label,
                       "runs": {t: [vars(r) for r in rs]
                                for t, rs in runs.items()}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
