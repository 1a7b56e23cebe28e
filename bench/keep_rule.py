#!/usr/bin/env python3
"""Keep-rule benchmark: does find_duplicates keep the original?

Copies a labelled corpus's images (shared/bench/make_corpus.py) once into a
work folder, sets the files' modification times as a scenario says, runs the
tool's find_duplicates and counts, over the reported groups that hold a
corpus original, how many keep it (or its byte-identical copy).  What was
kept instead is tallied by the corpus's transform name.

    python3 bench/keep_rule.py --corpus /work/data/std
    python3 bench/keep_rule.py --corpus /work/data/std --mtimes equal \
        --keep-rule most_pixels largest_file oldest folder_order

Scenarios (--mtimes): `corpus` (as generated: every original is written a
fraction of a second before its copies), `copies-newer` (each copy a day after
its original, as when copies are made later), `equal` (all files the same
time, as after a copy that does not keep times), `random` (times in random
order over a year: the age of a file says nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

from _common import DATA, TOOL, machine, table

SCENARIOS = ("corpus", "copies-newer", "equal", "random")
DAY = 86400


def prepare(corpus: str, work: str, scenario: str) -> dict:
    """Copy the images once; set their mtimes; return truth by path."""
    images = os.path.join(work, "images")
    if not os.path.isdir(images):
        shutil.copytree(os.path.join(corpus, "images"), images)
    with open(os.path.join(corpus, "truth.csv"), newline="") as fh:
        truth = {os.path.join(work, r["file"]): r for r in csv.DictReader(fh)}
    rng, base = random.Random(15), 1_700_000_000
    for path, row in truth.items():
        if scenario == "corpus":
            st = os.stat(os.path.join(corpus, row["file"]))
            times = (st.st_atime_ns, st.st_mtime_ns)
        else:
            t = {"copies-newer": base + (0 if path.endswith(row["original"])
                                         else DAY),
                 "equal": base,
                 "random": base + rng.randrange(365 * DAY)}[scenario]
            times = (t * 10**9, t * 10**9)
        os.utime(path, ns=times)
    return truth


def run(tool: str, work: str, keep_rule: list, tool_args: list) -> dict:
    """update (the new mtimes), then find_duplicates; its JSON document."""
    for operation in ("update", "find_duplicates"):
        args = [sys.executable, tool, operation, "--img-dirs",
                os.path.join(work, "images"), "--db-dir",
                os.path.join(work, "db"), "--bk-dir",
                os.path.join(work, "index"), "--output-dir",
                os.path.join(work, "out"), "--no-html-report", "--format",
                "json", "-q", *tool_args]
        if keep_rule and operation == "find_duplicates":
            args += ["--keep-rule", *keep_rule]
        done = subprocess.run(args, capture_output=True, text=True,
                              check=False)
        if done.returncode:
            sys.exit(f"{tool} {operation} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def score(doc: dict, truth: dict) -> tuple[int, int, Counter]:
    """(groups holding an original, groups keeping it, kept instead)."""
    held = kept = 0
    instead = Counter()
    for group in doc["groups"]:
        rows = [truth.get(i["path"]) for i in group["images"]]
        if not any(r and r["transform"] == "original" for r in rows):
            continue
        held += 1
        keep = next(r for r, i in zip(rows, group["images"]) if i["keep"])
        if keep and keep["transform"] in ("original", "exact_copy"):
            kept += 1
        else:
            instead[keep["transform"] if keep else "?"] += 1
    return held, kept, instead


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="folder with truth.csv")
    ap.add_argument("--work-dir", default=os.path.join(DATA, "keep_rule"))
    ap.add_argument("--mtimes", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    ap.add_argument("--keep-rule", nargs="+", default=[],
                    help="criteria (default: the tool's default)")
    ap.add_argument("--tool", default=TOOL, help="the reverse_search.py to run")
    ap.add_argument("--tool-args", default="", help="more flags for the tool")
    opts = ap.parse_args()
    print(f"# {machine(opts.tool)}")
    print(f"tool {opts.tool}, keep_rule {opts.keep_rule or 'default'}")
    rows = []
    for scenario in opts.mtimes:
        truth = prepare(opts.corpus, opts.work_dir, scenario)
        doc = run(opts.tool, opts.work_dir, opts.keep_rule,
                  opts.tool_args.split())
        held, kept, instead = score(doc, truth)
        share = f"{kept} ({100 * kept / max(1, held):.0f} %)"
        rows.append([scenario, held, share, ", ".join(
            f"{k} {n}" for k, n in instead.most_common())])
    print(table(["mtimes", "groups", "original kept", "kept instead"], rows,
                left=(0, 3)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
