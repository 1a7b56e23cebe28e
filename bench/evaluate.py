#!/usr/bin/env python3
"""Accuracy benchmark: run reverse_search on a labelled corpus and score it.

The corpus comes from shared/bench/make_corpus.py (see its README for the
labels and the scoring rules used here).  For every distinct (method, size,
mode) the images are hashed once with `build`; each threshold then runs
`find_duplicates` and one `search` with every original as a query.

    python3 bench/evaluate.py
    python3 bench/evaluate.py --settings dhash:8:5 phash:8:10:exact --json out.json
    python3 bench/evaluate.py --bad-inputs      # also check bad_inputs/
    python3 bench/evaluate.py --corpus /work/data/std --corpus /work/data/tough \
        --settings default                      # shipped defaults, both corpora
    python3 bench/evaluate.py --corpus /work/data/tough --settings default \
        --candidates                            # candidate pairs per stage

A setting is METHOD:SIZE:THRESHOLD[:MODE], MODE fast (default) or exact, or
`default`: the tool's shipped defaults (no hash keys in params.json at all).
With several --corpus, each is scored in turn and printed under its name.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from _common import DATA, ROOT, TOOL, load_impl, machine, table, tool_version

DEFAULT_CORPUS = os.path.join(DATA, "corpus")
MAKE_CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "bench",
                           "make_corpus.py")
DEFAULT_SETTINGS = ("dhash:8:5 dhash:8:10 dhash:8:14 "
                    "phash:8:6 phash:8:10 phash:8:14 "
                    "whash:8:5 whash:8:10 ahash:8:5 ahash:8:10 "
                    "dhash:8:10:exact phash:8:10:exact").split()
BAD_INPUT_HASHES = ("dhash", "phash")  # hashed at size 8, fast mode
CLOSE_ENOUGH = 4  # bad input "matches its group" at this distance or less
CANDIDATE_EXTRA = 6  # --candidates also scores threshold + this (verified reach)
BUILD_HINT = """\
No corpus at {corpus} (truth.csv missing). Build it first:
  apt-get update
  python3 {script} {corpus} --cache-dir ~/.cache/ndbench-debs
(or give another corpus with --corpus)."""


# ---- settings ----

@dataclass(frozen=True)
class Setting:
    """One scored configuration: a hash and a distance threshold."""

    method: str
    size: int
    threshold: int
    mode: str = "fast"

    @classmethod
    def parse(cls, text: str) -> Setting:
        if text == "default":
            return cls("default", 0, -1)
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[3:] not in ([], ["fast"], ["exact"]):
            raise argparse.ArgumentTypeError(
                f"bad setting {text!r}: expected METHOD:SIZE:THRESHOLD[:fast|exact]")
        return cls(parts[0], int(parts[1]), int(parts[2]), *parts[3:])

    @property
    def index(self) -> tuple:
        """Settings with the same index share one build."""
        return (self.method, self.size, self.mode)

    @property
    def label(self) -> str:
        if self.method == "default":
            return "default"
        return f"{self.method}:{self.size}:{self.threshold}" + (
            ":exact" if self.mode == "exact" else "")


def index_label(index: tuple) -> str:
    method, size, mode = index
    if method == "default":
        return "default"
    return f"{method}:{size}" + (":exact" if mode == "exact" else "")


# ---- the tool ----

@dataclass
class Tool:
    """Runs reverse_search.py as a subprocess with one params.json per index."""

    work: str
    workers: int
    extra: list = field(default_factory=list)  # more flags for every call
    steps: list = field(default_factory=list)  # (what, seconds) per call

    def params(self, name: str, img_dirs: list, index: tuple) -> str:
        """Write a params.json for one index; returns its path."""
        method, size, mode = index
        folder = os.path.join(self.work, name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "params.json")
        params = {"img_dirs": img_dirs, "input_dir": img_dirs[0],
                  "db_dir": os.path.join(folder, "db"),
                  "bk_dir": os.path.join(folder, "index"),
                  "output_dir": os.path.join(folder, "out"),
                  "html_report": False, "engine": "auto",
                  "workers": self.workers}
        if method != "default":  # else every hash key keeps its default
            params.update(hash_method=method, hash_size=size, hash_mode=mode,
                          distance_threshold=0)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(params, fh, indent=1)
        return path

    def run(self, params: str, operation: str, *args: str, what: str = "") -> str:
        """Run one operation; returns the output folder.  Raises on failure."""
        cmd = [sys.executable, TOOL, operation, *args, "--params", params,
               "--format", "text", "-q", *self.extra]
        # each run's seconds its own: the checks another setting's run made
        # on this index are remembered (bk_dir/verdicts.idx) and would not
        # be made again (the results are the same either way)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(os.path.dirname(params), "index",
                                   "verdicts.idx"))
        start = time.monotonic()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        self.steps.append((what or operation, time.monotonic() - start))
        if done.returncode != 0:
            raise RuntimeError(f"{operation} failed (exit {done.returncode}): "
                               f"{done.stderr.strip()}")
        return os.path.join(os.path.dirname(params), "out")

    def result(self, params: str, operation: str, *args: str, what: str = ""
               ) -> dict:
        """Run an operation and read the JSON document it wrote."""
        out = self.run(params, operation, *args, what=what)
        with open(os.path.join(out, operation + ".json"), encoding="utf-8") as fh:
            return json.load(fh)

    def export(self, params: str, what: str = "") -> list:
        """Rows of export.csv (path, hash, ..., error) as dicts."""
        out = self.run(params, "export", what=what)
        with open(os.path.join(out, "export.csv"), encoding="utf-8",
                  newline="") as fh:
            return list(csv.DictReader(fh))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


# ---- truth ----

@dataclass(frozen=True)
class Item:
    """One row of truth.csv."""

    file: str
    group_id: str
    transform: str
    original: str
    category: str
    content: str


def read_truth(corpus: str) -> dict:
    """Relative path -> Item."""
    with open(os.path.join(corpus, "truth.csv"), encoding="utf-8",
              newline="") as fh:
        return {r["file"]: Item(r["file"], r["group_id"], r["transform"],
                                r["original"], r["category"], r["content"])
                for r in csv.DictReader(fh)}


def relative(corpus: str, path: str) -> str:
    return os.path.relpath(path, corpus).replace(os.sep, "/")


# ---- scoring ----

def pairs(n: int) -> int:
    return n * (n - 1) // 2


@dataclass
class PairScore:
    """Pair counts of find_duplicates against the truth (README scoring).

    Same-group pairs with a `hard` file are neither hits nor false positives:
    like `related` pairs they leave the precision denominator, and they are
    counted for hard recall only."""

    reported: int = 0
    tp: int = 0
    hard: int = 0
    ignored: int = 0  # related pairs, plus hard pairs
    positives: int = 0
    hard_positives: int = 0

    @property
    def fp(self) -> int:
        return self.reported - self.ignored - self.tp

    @property
    def precision(self) -> float | None:
        judged = self.reported - self.ignored
        return self.tp / judged if judged else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.positives if self.positives else None

    @property
    def hard_recall(self) -> float | None:
        return self.hard / self.hard_positives if self.hard_positives else None


def same_group_pairs(cats: Counter) -> tuple[int, int, int]:
    """(true, hard, ignored) pairs among files of one group_id."""
    good = cats["original"] + cats["near_dup"]
    tp, hard = pairs(good), cats["hard"] * good
    return tp, hard, pairs(sum(cats.values())) - tp - hard


def score_pairs(groups: list, truth: dict, keep=lambda item: True) -> PairScore:
    """Score groups (lists of Items), counting only the files `keep` accepts."""
    s = PairScore()
    for members in groups:
        members = [m for m in members if keep(m)]
        s.reported += pairs(len(members))
        by_group = defaultdict(Counter)
        for m in members:
            by_group[m.group_id][m.category] += 1
        for cats in by_group.values():
            tp, hard, other = same_group_pairs(cats)
            s.tp, s.hard = s.tp + tp, s.hard + hard
            s.ignored += other + hard
    everything = defaultdict(Counter)
    for item in truth.values():
        if keep(item):
            everything[item.group_id][item.category] += 1
    for cats in everything.values():
        tp, hard, _ = same_group_pairs(cats)
        s.positives, s.hard_positives = s.positives + tp, s.hard_positives + hard
    return s


def paired_with_original(groups: list, truth: dict) -> dict:
    """Relative path -> was it reported in one group with its original
    (for an original: with any other file of its group; for a distractor:
    reported in any group at all, i.e. a false alarm)."""
    where = {m.file: k for k, members in enumerate(groups) for m in members}
    hit = {}
    for item in truth.values():
        k = where.get(item.file)
        if item.category == "distractor":
            hit[item.file] = k is not None
        elif item.category == "original":
            hit[item.file] = k is not None and any(
                m.group_id == item.group_id and m.file != item.file
                for m in groups[k])
        else:
            hit[item.file] = k is not None and where.get(item.original) == k
    return hit


@dataclass
class SearchScore:
    """search with every original as the query, against its group."""

    queries: int = 0
    near_dups: int = 0
    found: int = 0
    hard: int = 0
    hard_found: int = 0
    false_matches: int = 0
    queries_with_false: int = 0
    found_files: dict = field(default_factory=dict)  # file -> (stage, bits)

    @property
    def recall(self) -> float | None:
        return self.found / self.near_dups if self.near_dups else None

    @property
    def hard_recall(self) -> float | None:
        return self.hard_found / self.hard if self.hard else None


def score_search(doc: dict, corpus: str, truth: dict) -> SearchScore:
    members = defaultdict(list)
    for item in truth.values():
        members[item.group_id].append(item)
    s = SearchScore()
    for q in doc["queries"]:
        query = truth[relative(corpus, q["query"])]
        found = {relative(corpus, m["path"]) for m in q["matches"]}
        found.discard(query.file)
        wanted = [m.file for m in members[query.group_id] if m.category == "near_dup"]
        hard = [m.file for m in members[query.group_id] if m.category == "hard"]
        false = sum(1 for f in found if f not in truth
                    or truth[f].group_id != query.group_id)
        for m in q["matches"]:
            f = relative(corpus, m["path"])
            if f in truth and truth[f].group_id == query.group_id:
                s.found_files[f] = (stage_of(m), m["distance"])
        s.queries += 1
        s.near_dups += len(wanted)
        s.found += len(found.intersection(wanted))
        s.hard += len(hard)
        s.hard_found += len(found.intersection(hard))
        s.false_matches += false
        s.queries_with_false += false > 0
    return s


def stage_of(match: dict) -> str:
    """Which matching stage found a match: from the name of the hash that
    matched (the "variant" the tool reports), else the stage its `how`
    record names, else the whole picture."""
    how = match.get("how")
    if isinstance(how, dict) and how.get("stage") in ("turned window",
                                                      "keypoints"):
        return str(how["stage"])  # their names start with an orientation
    name = match.get("variant") or ""
    for prefix, stage in (("centre", "centre"), ("content", "content box"),
                          ("window", "window")):
        if name.startswith(prefix):
            return stage
    if name:
        return "orientation"
    how = match.get("how")
    if isinstance(how, dict) and how.get("stage"):
        return str(how["stage"])
    return "whole"


def median_distances(rows: list, corpus: str, truth: dict) -> dict:
    """Transform -> median distance of its files to their original."""
    hashes = {relative(corpus, r["path"]): r["hash"] for r in rows if r["hash"]}
    per = defaultdict(list)
    for item in truth.values():
        if item.category not in ("original", "distractor") and \
                item.file in hashes and item.original in hashes:
            per[item.transform].append(hamming(hashes[item.file],
                                               hashes[item.original]))
    return {t: statistics.median(d) for t, d in per.items()}


# ---- running ----

@dataclass
class Result:
    """Everything measured for one setting."""

    setting: str
    pairs: PairScore
    pairs_no_astro: PairScore
    per_content: dict
    groups: int
    paired: dict  # relative path -> bool (see paired_with_original)
    search: SearchScore
    seconds: dict
    index: str = ""  # the build it was scored on


@dataclass
class Build:
    """One hashed index: cost and per-transform distances."""

    index: str
    files: int
    hashed: int
    failed: int
    seconds: float  # as the tool reports it (hashing and storing)
    wall: float  # the whole build command, index file included
    distances: dict

    @property
    def rate(self) -> float:
        return self.hashed / self.seconds if self.seconds else 0.0


def evaluate(corpus: str, settings: list, tool: Tool, truth: dict,
             candidates: list | None = None) -> tuple[list, list]:
    images = os.path.join(corpus, "images")
    originals = sorted(os.path.join(corpus, f) for f, i in truth.items()
                       if i.category == "original")
    contents = sorted({i.content for i in truth.values()})
    builds, results = [], []
    for index in dict.fromkeys(s.index for s in settings):
        name = index_label(index)
        params = tool.params(name.replace(":", "_"), [images], index)
        report = tool.result(params, "build", what=f"build {name}")
        wall = tool.steps[-1][1]
        rows = tool.export(params, what=f"export {name}")
        builds.append(Build(name, report["files"], report["hashed"],
                            report["failed"], report["seconds"], wall,
                            median_distances(rows, corpus, truth)))
        print(f"built {name}: {report['hashed']} images in "
              f"{report['seconds']:.1f} s", file=sys.stderr)
        for s in (s for s in settings if s.index == index):
            flag = ["--distance-threshold", str(s.threshold)] \
                if s.threshold >= 0 else []
            t0 = len(tool.steps)
            dup = tool.result(params, "find_duplicates", *flag,
                              what=f"find_duplicates {s.label}")
            found = tool.result(params, "search", *originals, *flag,
                                what=f"search {s.label}")
            groups = [[truth[relative(corpus, m["path"])] for m in g["images"]
                       if relative(corpus, m["path"]) in truth]
                      for g in dup["groups"]]
            results.append(Result(
                s.label, score_pairs(groups, truth),
                score_pairs(groups, truth, lambda i: i.content != "astro"),
                {c: score_pairs(groups, truth, lambda i, c=c: i.content == c)
                 for c in contents},
                len(groups), paired_with_original(groups, truth),
                score_search(found, corpus, truth),
                {what.split()[0]: sec for what, sec in tool.steps[t0:]},
                name))
            print(f"scored {s.label}", file=sys.stderr)
            if candidates is not None:
                r = s.threshold if s.threshold >= 0 else load_impl().Config(
                    ).distance_threshold
                candidates += candidate_scores(corpus, truth, params, s.label,
                                               [r, r + CANDIDATE_EXTRA])
    return builds, results


# ---- candidates ----

@dataclass
class CandidateScore:
    """Candidate pairs of find_duplicates before grouping and verification
    (every stage, after the adaptive threshold), against the truth."""

    setting: str
    radius: int
    pairs: int = 0
    true: int = 0
    false: int = 0
    hard: int = 0
    positives: int = 0
    hard_positives: int = 0
    stages: dict = field(default_factory=dict)  # stage -> [true, false]
    per_edit: dict = field(default_factory=dict)  # transform -> [found, all]


def candidate_scores(corpus: str, truth: dict, params: str, label: str,
                     radii: list) -> list:
    """Score the tool's candidate_edges at each radius: how many true pairs
    (original or near_dup, same picture) have a candidate edge of their
    own, how many candidates join different pictures, and per edit the
    share of copies with an edge to their original."""
    rs = load_impl()
    cfg = rs.config_from(rs.read_params(params), params, {})
    store = rs._open_store(cfg)
    try:
        flat = rs.load_index(cfg, store, rs.Console(quiet=True))
        rows = store.rows_by_id(int(i) for i in flat.ids)
    finally:
        store.close()
    files = [relative(corpus, rows[int(i)].path) for i in flat.ids]
    items = [truth.get(f) for f in files]
    out = []
    for r in radii:
        got = []
        engine = flat.engine("auto", r, True)
        regions = flat.region_engines("auto", r, True, "")
        rs.duplicate_groups(flat, engine, r, cfg.adaptive_threshold, regions,
                            keep_edge=lambda e: got.append(e) or
                            np.ones(len(e), bool))
        score = CandidateScore(label, r)
        seen = set()
        same = [(int(x), int(y), "exact hash")  # one hash: joined by the index
                for k in range(len(flat.distinct))
                for members in [flat.img_order[flat.img_starts[k]:
                                               flat.img_starts[k + 1]]]
                for i, x in enumerate(members) for y in members[i + 1:]]
        pairs = [list(zip(e.a.tolist(), e.b.tolist(), e.stages()))
                 for e in got] + [same]
        for edges in pairs:
            for a, b, stage in edges:
                x, y = items[a], items[b]
                if x is None or y is None:
                    continue
                key = frozenset((x.file, y.file))
                if key in seen:
                    continue
                seen.add(key)
                score.pairs += 1
                cell = score.stages.setdefault(stage, [0, 0])
                if x.group_id != y.group_id:
                    score.false += 1
                    cell[1] += 1
                elif {x.category, y.category} <= {"original", "near_dup"}:
                    score.true += 1
                    cell[0] += 1
                elif "hard" in (x.category, y.category):
                    score.hard += 1
        good = defaultdict(Counter)
        for item in truth.values():
            good[item.group_id][item.category] += 1
        for cats in good.values():
            tp, hard, _ = same_group_pairs(cats)
            score.positives += tp
            score.hard_positives += hard
        for item in truth.values():
            if item.category in ("near_dup", "hard"):
                cell = score.per_edit.setdefault(item.transform, [0, 0])
                cell[1] += 1
                cell[0] += frozenset((item.file, item.original)) in seen
        out.append(score)
    return out


def candidates_report(scores: list) -> str:
    if not scores:
        return ""
    out = [table(
        ["setting", "radius", "candidates", "true", "false", "hard",
         "recall", "hard recall", "by stage (true/false)"],
        [[s.setting, s.radius, s.pairs, s.true, s.false, s.hard,
          pct(s.true / s.positives if s.positives else None),
          pct(s.hard / s.hard_positives if s.hard_positives else None),
          ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(s.stages.items()))]
         for s in scores], left=(0, 8),
        title="Candidates (find_duplicates before grouping and verification, "
        "every stage): pairs with an edge of their own; recall = true pairs "
        "with an edge / all true pairs (%)")]
    edits = sorted({t for s in scores for t in s.per_edit})
    out.append(table(
        ["edit"] + [f"{s.setting} r={s.radius}" for s in scores],
        [[t] + [pct(s.per_edit[t][0] / s.per_edit[t][1]) if t in s.per_edit
                else "-" for s in scores] for t in edits],
        title="Candidates per edit: % of copies with a candidate edge to "
        "their original"))
    return "\n\n".join(out) + "\n"


def check_bad_inputs(corpus: str, tool: Tool, truth: dict) -> list:
    """What the tool does with each file of bad_inputs/ (fast mode, size 8).

    bad_inputs/ is built together with images/originals, so each file with a
    group_id can be compared with its group's original."""
    with open(os.path.join(corpus, "bad_inputs.csv"), encoding="utf-8",
              newline="") as fh:
        expected = list(csv.DictReader(fh))
    folders = [os.path.join(corpus, "bad_inputs"),
               os.path.join(corpus, "images", "originals")]
    hashed = {}
    for method in BAD_INPUT_HASHES:
        params = tool.params(f"bad_{method}", folders, (method, 8, "fast"))
        tool.run(params, "build", what=f"build bad_inputs {method}")
        hashed[method] = {relative(corpus, r["path"]): r
                          for r in tool.export(params, what=f"export bad {method}")}
    originals = {i.group_id: i.file for i in truth.values()
                 if i.category == "original"}
    checks = []
    for row in expected:
        first = hashed[BAD_INPUT_HASHES[0]].get(row["file"])
        did = ("not scanned" if first is None else
               "hashed" if first["hash"] else f"skipped: {first['error']}")
        ok = (did == "hashed") == (row["expected"] == "hash normally")
        dist = {}
        for method, rows in hashed.items():
            mine, orig = rows.get(row["file"]), rows.get(
                originals.get(row["group_id"], ""))
            if row["group_id"] and mine and orig and mine["hash"] and orig["hash"]:
                dist[method] = hamming(mine["hash"], orig["hash"])
        checks.append({"file": row["file"], "case": row["case"],
                       "expected": row["expected"], "did": did, "ok": ok,
                       "distance": dist})
    return checks


# ---- printing ----

def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def share(r: Result, truth: dict, category: str) -> float | None:
    """Share of the files of a category that find_duplicates grouped with
    their original (distractors: put in any group)."""
    files = [i.file for i in truth.values() if i.category == category]
    return sum(r.paired[f] for f in files) / len(files) if files else None


def summary_table(results: list, truth: dict) -> str:
    return table(
        ["setting", "grouped", "hard grouped", "search R", "search hard R",
         "pair P", "pair R", "distractors"],
        [[r.setting, pct(share(r, truth, "near_dup")),
          pct(share(r, truth, "hard")), pct(r.search.recall),
          pct(r.search.hard_recall), pct(r.pairs.precision),
          pct(r.pairs.recall), pct(share(r, truth, "distractor"))]
         for r in results],
        title="Summary (%): near_dup / hard files grouped with their original, "
        "search recall, pair precision and recall, distractors in any group")


def report(builds: list, results: list, truth: dict, checks: list) -> str:
    out = [summary_table(results, truth), table(
        ["index", "files", "hashed", "failed", "seconds", "images/s",
         "build wall s"],
        [[b.index, b.files, b.hashed, b.failed, f"{b.seconds:.1f}",
          f"{b.rate:.0f}", f"{b.wall:.1f}"] for b in builds],
        title="Hashing cost (build of images/, one per method:size:mode)")]
    out.append(table(
        ["setting", "P", "P no astro", "R", "R no astro", "hard R", "pairs",
         "TP", "FP", "ignored", "groups"],
        [[r.setting, pct(r.pairs.precision), pct(r.pairs_no_astro.precision),
          pct(r.pairs.recall), pct(r.pairs_no_astro.recall),
          pct(r.pairs.hard_recall), r.pairs.reported, r.pairs.tp, r.pairs.fp,
          r.pairs.ignored, r.groups] for r in results],
        title="find_duplicates: pairs inside reported groups (P = precision, "
        "R = recall, %)"))
    contents = sorted(results[0].per_content) if results else []
    out.append(table(
        ["setting"] + [f"{c} {k}" for c in contents for k in ("P", "R")],
        [[r.setting] + [pct(x) for c in contents for x in
                        (r.per_content[c].precision, r.per_content[c].recall)]
         for r in results],
        title="find_duplicates per content (pairs with both files of that "
        "content; P/R %)"))
    out.append(table(
        ["setting", "queries", "R", "hard R", "false matches",
         "queries w/ false", "seconds"],
        [[r.setting, r.search.queries, pct(r.search.recall),
          pct(r.search.hard_recall), r.search.false_matches,
          r.search.queries_with_false, f"{r.seconds.get('search', 0):.2f}"]
         for r in results],
        title="search: every original as a query (R = share of its near_dups "
        "matched, %)"))
    out.append(per_file_table(
        "Per transform: % of files grouped with their original",
        results, truth, lambda i: i.category not in ("original", "distractor"),
        lambda i: f"{i.transform} ({i.category})" if i.category != "near_dup"
        else i.transform))
    out.append(per_file_table(
        "Per category: % grouped with their original (original: with any of "
        "its group; distractor: in any group = false alarm)",
        results, truth, lambda i: True, lambda i: i.category))
    for r in results:
        build = next((b for b in builds if b.index == r.index), None)
        out.append(per_edit_table(r, truth, build))
    transforms = sorted({t for b in builds for t in b.distances})
    out.append(table(
        ["transform"] + [b.index for b in builds],
        [[t] + [fmt_num(b.distances.get(t)) for b in builds]
         for t in transforms],
        title="Median distance of each file to its original (bits)"))
    out.append(table(
        ["setting", "find_duplicates", "search"],
        [[r.setting, f"{r.seconds.get('find_duplicates', 0):.2f}",
          f"{r.seconds.get('search', 0):.2f}"] for r in results],
        title="Seconds per step"))
    if checks:
        methods = list(BAD_INPUT_HASHES)
        out.append(table(
            ["file", "expected", "ok"] + [f"d {m}" for m in methods]
            + ["tool did"],
            [[c["file"].split("/", 1)[-1], c["expected"],
              "yes" if c["ok"] else "NO"]
             + [c["distance"].get(m, "") for m in methods] + [c["did"]]
             for c in checks], left=(0, 1, 3 + len(methods)),
            title=f"bad_inputs/ (fast mode, size 8; d = distance to the "
            f"group's original, close if <= {CLOSE_ENOUGH})"))
    return "\n\n".join(out) + "\n"


def fmt_num(x) -> str:
    return "-" if x is None else f"{x:g}"


def per_edit_table(r: Result, truth: dict, build: Build | None) -> str:
    """One row per edit: grouped with the original (find_duplicates), found
    by a search with the original, the whole-hash distance, the distance of
    the match that found it, and which stages found it (search)."""
    files = defaultdict(list)
    for item in truth.values():
        if item.category not in ("original", "distractor"):
            files[(item.category != "near_dup", item.category,
                   item.transform)].append(item)
    rows = []
    for (_, category, transform), items in sorted(files.items()):
        found = [r.search.found_files[i.file] for i in items
                 if i.file in r.search.found_files]
        stages = Counter(stage for stage, _ in found)
        rows.append([transform + (f" ({category})" if category != "near_dup"
                                  else ""), len(items),
                     pct(sum(r.paired[i.file] for i in items) / len(items)),
                     pct(len(found) / len(items)),
                     fmt_num(build.distances.get(transform) if build else None),
                     fmt_num(statistics.median(d for _, d in found)
                             if found else None),
                     ", ".join(f"{k} {v}" for k, v in stages.most_common())])
    return table(
        ["edit", "files", "grouped", "search", "d whole", "d match", "stages"],
        rows, left=(0, 6),
        title=f"Per edit, {r.setting}: grouped = % in one group with its "
        f"original (find_duplicates); search = % found by a search with the "
        f"original; d whole = median whole-hash distance; d match = median "
        f"distance of the match found; stages = what found them (search)")


def per_file_table(title: str, results: list, truth: dict, which, label) -> str:
    """Rows = labels of the files `which` picks, columns = settings."""
    files = defaultdict(list)
    for item in truth.values():
        if which(item):
            files[label(item)].append(item.file)
    rows = [[name, len(fs)] + [pct(sum(r.paired[f] for f in fs) / len(fs))
                               for r in results]
            for name, fs in sorted(files.items())]
    return table(["", "files"] + [r.setting for r in results], rows,
                 title=title)


def to_json(builds: list, results: list, checks: list) -> dict:
    def score(s):
        return {**asdict(s), **{k: getattr(s, k) for k in dir(type(s))
                                if isinstance(getattr(type(s), k), property)}}
    return {"builds": [{**asdict(b), "images_per_s": b.rate} for b in builds],
            "results": [{"setting": r.setting, "groups": r.groups,
                         "pairs": score(r.pairs),
                         "pairs_no_astro": score(r.pairs_no_astro),
                         "per_content": {c: score(s) for c, s in
                                         r.per_content.items()},
                         "search": score(r.search), "seconds": r.seconds,
                         "paired_with_original": r.paired} for r in results],
            "bad_inputs": checks}


# ---- main ----

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", action="append",
                    help="corpus folder with truth.csv (default: "
                         "bench/data/corpus); repeat it to score several")
    ap.add_argument("--settings", nargs="+", type=Setting.parse,
                    default=[Setting.parse(s) for s in DEFAULT_SETTINGS],
                    metavar="M:S:T[:MODE]",
                    help="method:size:threshold[:fast|exact] (default: "
                         + " ".join(DEFAULT_SETTINGS) + ")")
    ap.add_argument("--workers", type=int, default=0,
                    help="hashing processes (0 = one per core)")
    ap.add_argument("--bad-inputs", action="store_true",
                    help="also report what the tool does with bad_inputs/")
    ap.add_argument("--tool-args", default="", metavar="FLAGS",
                    help="more reverse_search flags for every call, e.g. "
                         "'--engine mih'")
    ap.add_argument("--candidates", action="store_true",
                    help="also score find_duplicates' candidate pairs before "
                         "grouping and verification, per stage and edit, at "
                         f"the threshold and {CANDIDATE_EXTRA} bits past it")
    ap.add_argument("--json", metavar="FILE", help="also save the numbers here")
    ap.add_argument("--work-dir", metavar="DIR",
                    help="keep databases and results here (default: a "
                         "temporary folder, removed afterwards)")
    args = ap.parse_args(argv)
    corpora = [os.path.abspath(c) for c in args.corpus or [DEFAULT_CORPUS]]
    for corpus in corpora:
        if not os.path.isfile(os.path.join(corpus, "truth.csv")):
            print(BUILD_HINT.format(corpus=os.path.relpath(corpus),
                                    script=os.path.relpath(MAKE_CORPUS)),
                  file=sys.stderr)
            return 2
    docs = []
    for n, corpus in enumerate(corpora):
        work = args.work_dir and os.path.join(args.work_dir, str(n))
        doc = run_corpus(corpus, args, work)
        if doc is None:
            return 1
        docs.append(doc)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(docs[0] if len(docs) == 1 else docs, fh, indent=1)
    return 0


def run_corpus(corpus: str, args, work_dir: str | None) -> dict | None:
    """Score one corpus, print its tables; the JSON document, None on failure."""
    truth = read_truth(corpus)
    started = machine()
    with tempfile.TemporaryDirectory(prefix="ndbench-") as tmp:
        tool = Tool(os.path.abspath(work_dir or tmp), args.workers,
                    shlex.split(args.tool_args))
        candidates = [] if args.candidates else None
        try:
            builds, results = evaluate(corpus, args.settings, tool, truth,
                                       candidates)
            checks = check_bad_inputs(corpus, tool, truth) if args.bad_inputs \
                else []
        except RuntimeError as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            return None
    version = tool_version()
    print(f"# {started}")
    print(f"{version}{' ' + args.tool_args if args.tool_args else ''} on "
          f"{os.path.relpath(corpus)} ({len(truth)} images)\n")
    print(report(builds, results, truth, checks), flush=True)
    if candidates:
        print(candidates_report(candidates), flush=True)
    return {"tool": version, "tool_args": args.tool_args, "corpus": corpus,
            **to_json(builds, results, checks)}


if __name__ == "__main__":
    sys.exit(main())
