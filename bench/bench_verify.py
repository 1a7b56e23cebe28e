#!/usr/bin/env python3
"""Verification benchmark: does it accept copies and refuse different
pictures, and what do features cost, stored at build time or found per run?

    python3 bench/bench_verify.py --corpus /work/data/tough
    python3 bench/bench_verify.py --corpus /work/data/std --pairs 300
    python3 bench/bench_verify.py --corpus /work/data/std --checks
    python3 bench/bench_verify.py --corpus /work/data/std --checks --record std.json
    python3 bench/bench_verify.py --replay std.json --against OLD/reverse_search.py

--checks: the checks the operations themselves make.  The corpus is built
into a temporary folder with the shipped defaults, then find_duplicates and
a search of every original run here, in one process (workers 1), and every
check is counted by who asked for it (find_duplicates' edges, a group's lead
with its members, the lead with members linked through the group, a search
query, a report line) and by verdict, with its CPU time (features found
on first use included).  The refused checks are the waste to cut.
--record FILE writes each of those checks (its two paths and its verdict)
to FILE.  --replay FILE makes them again in their order, in one process, and
says whether every verdict is the recorded one (accepted and geometry: what
the operations use; a refusal's reason and inliers counted apart) and the
CPU seconds; --against OLD.py runs another version pair by pair beside it.

Pairs, from the corpus's truth.csv: every original with each of its copies
(accepted % per edit), and different pictures: an original with distractors,
with other originals, dark astro frames with each other, a copy with another
original, and two copies of different originals made by the same edit (the
same screenshot template, frame, caption band, sticker: the hardest case).

Costs, on the same images: the build's hashing per image (hash_file, the
shipped defaults) beside finding features per image (load_features), the
bytes the features would take if stored, and one verification per pair.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback

from _common import load_impl, machine, table, timed

rs = load_impl()


def read_truth(corpus: str) -> list:
    with open(os.path.join(corpus, "truth.csv"), newline="",
              encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def pairs_of(rows: list, per_kind: int, seed: int) -> list:
    """(a, b, kind, is_copy) for the copies and the different pictures."""
    rng = random.Random(seed)
    copies = [(r["original"], r["file"], r["transform"], True) for r in rows
              if r["category"] in ("near_dup", "hard") and r["file"] != r["original"]]
    originals = sorted({r["original"] for r in rows if r["category"] == "original"})
    distractors = [r["file"] for r in rows if r["category"] == "distractor"]
    dark = [r["original"] for r in rows
            if r["category"] == "original" and r.get("content") == "astro"]
    diff = []
    for o in originals:
        diff += [(o, d, "distractor", False) for d in rng.sample(distractors, 4)]
        diff += [(o, p, "other original", False)
                 for p in rng.sample(originals, 3) if p != o]
    diff += [(a, b, "dark frames", False)
             for k, a in enumerate(dark) for b in dark[k + 1:]]
    group_of = {r["file"]: r["original"] for r in rows}
    for a, b, _, _ in rng.sample(copies, min(per_kind * 4, len(copies))):
        other = rng.choice(originals)
        if other != group_of[b]:
            diff.append((other, b, "copy vs other original", False))
    by_edit = collections.defaultdict(list)
    for _, f, edit, _ in copies:
        by_edit[edit].append(f)
    for edit, files in sorted(by_edit.items()):
        files = sorted(files)
        for k in range(min(per_kind, len(files))):
            a, b = files[k], files[(k + 7) % len(files)]
            if group_of[a] != group_of[b]:
                diff.append((a, b, f"same edit: {edit}", False))
    return copies + diff


def costs(paths: list, corpus: str) -> dict:
    """Per image: hashing as build does it, features, stored feature bytes."""
    job = rs.HashJob(rs.Config().spec, 10 ** 9, 2 ** 30)
    hash_s, feat_s, sizes = [], [], []
    for p in paths:
        full = os.path.join(corpus, p)
        hash_s.append(timed(rs.hash_file, rs.HashTask(full), job)[0].wall)
        took, f = timed(rs.load_features, full, 10 ** 9)
        feat_s.append(took.wall)
        sizes.append(f.points.nbytes + f.descriptors.nbytes)
    return {"hash_ms": 1000 * statistics.median(hash_s),
            "feature_ms": 1000 * statistics.median(feat_s),
            "bytes": statistics.median(sizes)}


# who asked for a check: the first of these functions on the stack
CALLERS = (("through_copies", "find_duplicates: refused member with a copy of the lead"),
           ("reach_further", "find_duplicates: reach past the group"),
           ("trusted", "find_duplicates: lead with its members"),
           ("joiners", "find_duplicates: lead with linked members"),
           ("how", "find_duplicates: report line"),
           ("duplicate_groups", "find_duplicates: edges"),
           ("query_result", "search: candidates"))


def verdict_record(verdict) -> dict:
    """A verdict as JSON: what the operations use (accepted, geometry) and
    what they do not (reason and inliers of a refusal)."""
    g = verdict.geometry
    return {"accepted": verdict.accepted, "reason": verdict.reason,
            "inliers": verdict.inliers,
            "geometry": None if g is None else g.as_json()}


def counted_checks(corpus: str, record: list | None = None) -> list:
    """(caller, accepted, reason, CPU seconds) of every check that
    find_duplicates and a search of every original make on the corpus;
    each check's paths and verdict appended to `record` if given."""
    made = []
    check = rs.Verifier.check

    def spy(self, path_a, path_b, plain=False):
        names = {f.name for f in traceback.extract_stack(limit=16)}
        who = next((label for name, label in CALLERS if name in names), "?")
        who += " (first try only)" if plain else ""
        started = time.process_time()
        verdict = check(self, path_a, path_b, plain)
        made.append((who, verdict.accepted, verdict.reason,
                     time.process_time() - started))
        if record is not None:
            record.append({"a": path_a, "b": path_b, "who": who,
                           "plain": plain,
                           **verdict_record(verdict)})
        return verdict
    originals = sorted(os.path.join(corpus, r["file"]) for r in read_truth(
        corpus) if r["category"] == "original")
    rs.Verifier.check = spy
    try:
        with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
            params = os.path.join(tmp, "params.json")
            with open(params, "w", encoding="utf-8") as fh:
                json.dump({"img_dirs": [os.path.join(corpus, "images")],
                           "db_dir": os.path.join(tmp, "db"),
                           "bk_dir": os.path.join(tmp, "index"),
                           "output_dir": os.path.join(tmp, "out"),
                           "html_report": False}, fh)
            flags = ["--params", params, "-q", "--format", "json"]
            with open(os.devnull, "w") as null:
                out, sys.stdout = sys.stdout, null
                try:
                    for op in (["build"], ["find_duplicates"],
                               ["search", *originals]):
                        code = rs.main(op + flags + ["--workers",
                                                     "0" if op == ["build"]
                                                     else "1"])
                        if code:
                            raise SystemExit(f"{op[0]} failed ({code})")
                finally:
                    sys.stdout = out
    finally:
        rs.Verifier.check = check
    return made


def checks_table(made: list) -> str:
    by = collections.defaultdict(list)
    for who, accepted, reason, cpu in made:
        by[(who, "accepted" if accepted else "refused")].append(cpu)
        if not accepted:  # "implausible scale (0.05)": one line for all
            by[(who, "  " + reason.split(" (")[0])].append(cpu)
    lines = [[who, what, len(s), f"{sum(s):.1f}",
              f"{1000 * statistics.mean(s):.0f}"]
             for (who, what), s in sorted(by.items())]
    total = [c for *_, c in made]
    lines.append(["ALL", "", len(total), f"{sum(total):.1f}",
                  f"{1000 * statistics.mean(total):.0f}" if total else "-"])
    return table(["asked by", "verdict", "checks", "CPU s", "ms each"], lines,
                 title="Checks made by the operations (workers 1, features "
                 "found on first use counted in the check)")


def load_other(path: str, k: int = 0):
    """Another reverse_search.py, imported beside the one under test."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        f"reverse_search_against{k}", os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def replay(path: str, against: list | None) -> int:
    """Every recorded check again, in its order, in one process (features
    found on first use, as in a run): is each verdict the recorded one, and
    what does it cost?  With `against` (other reverse_search.py files),
    those too, pair by pair (the order turns round at each pair), so all
    see the same load."""
    with open(path, encoding="utf-8") as fh:
        recorded = json.load(fh)
    tools = [("this", rs)] + [(os.path.basename(os.path.dirname(
        os.path.abspath(path))) + "/" + os.path.basename(path),
        load_other(path, k)) for k, path in enumerate(against or [])]
    verifiers = {name: m.Verifier(10 ** 9, cache_size=10 ** 6)
                 for name, m in tools}
    cpu = {(name, kind): 0.0 for name, _ in tools
           for kind in ("accepted", "refused")}
    differ = {name: [] for name, _ in tools}
    reasons = {name: 0 for name, _ in tools}
    for k, check in enumerate(recorded):
        turn = k % len(tools)
        for name, _ in tools[turn:] + tools[:turn]:
            started = time.process_time()
            plain = {"plain": True} if check.get("plain") else {}
            verdict = verifiers[name].check(check["a"], check["b"], **plain)
            took = time.process_time() - started
            got = verdict_record(verdict)
            cpu[(name, "accepted" if check["accepted"] else "refused")] += took
            if (got["accepted"], got["geometry"]) != (check["accepted"],
                                                      check["geometry"]):
                differ[name].append((check, got))
            elif got != {key: check[key] for key in got}:
                reasons[name] += 1
    print(f"# {machine()}")
    print(f"replay of {len(recorded)} checks recorded in {path}\n")
    n_acc = sum(c["accepted"] for c in recorded)
    lines = [[name, f"{cpu[(name, 'accepted')]:.1f}",
              f"{cpu[(name, 'refused')]:.1f}",
              f"{cpu[(name, 'accepted')] + cpu[(name, 'refused')]:.1f}",
              len(differ[name]), reasons[name]] for name, _ in tools]
    print(table(["version", f"CPU s: {n_acc} accepted",
                 f"{len(recorded) - n_acc} refused", "all",
                 "verdicts differ", "same verdict, other reason"], lines))
    for name, wrong in differ.items():
        for check, got in wrong[:20]:
            print(f"  {name}: {check['a']} / {check['b']}: recorded "
                  f"{check['accepted']} ({check['reason']}), now "
                  f"{got['accepted']} ({got['reason']})")
    return 1 if any(differ.values()) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", help="folder with truth.csv")
    ap.add_argument("--pairs", type=int, default=25,
                    help="pairs per kind of different pictures (default 25)")
    ap.add_argument("--cost-images", type=int, default=150,
                    help="images timed for the cost table (default 150)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--checks", action="store_true",
                    help="count the checks find_duplicates and search make "
                         "(see above) instead of verifying labelled pairs")
    ap.add_argument("--record", metavar="FILE",
                    help="with --checks: write every check (paths, verdict) "
                         "as JSON to FILE, for --replay")
    ap.add_argument("--replay", metavar="FILE",
                    help="verify the checks recorded in FILE again: same "
                         "verdicts? CPU seconds (exit 1 if a verdict differs)")
    ap.add_argument("--against", metavar="OLD.py", action="append",
                    help="with --replay: another reverse_search.py, pair by "
                         "pair beside this one (may be given more than once)")
    args = ap.parse_args(argv)
    if rs._cv2() is None:
        print("OpenCV is not installed: pip install opencv-python-headless")
        return 2
    if args.replay:
        return replay(args.replay, args.against)
    if not args.corpus:
        ap.error("--corpus is needed (or --replay)")
    started = machine()
    if args.checks:
        record = [] if args.record else None
        made = counted_checks(args.corpus, record)
        if record is not None:
            with open(args.record, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
        print(f"# {started}")
        print(f"reverse_search {rs.__version__}: checks on {args.corpus}\n")
        print(checks_table(made))
        return 0
    rows = read_truth(args.corpus)
    pairs = pairs_of(rows, args.pairs, args.seed)
    verifier = rs.Verifier(10 ** 9, cache_size=10 ** 6)
    tally = collections.defaultdict(lambda: [0, 0])
    seconds, wrong = [], []
    for a, b, kind, is_copy in pairs:
        pa, pb = (os.path.join(args.corpus, p) for p in (a, b))
        verifier.features(pa), verifier.features(pb)  # not timed: see costs
        took, verdict = timed(verifier.check, pa, pb)
        seconds.append(took.wall)
        tally[(is_copy, kind)][0] += verdict.accepted
        tally[(is_copy, kind)][1] += 1
        if verdict.accepted != is_copy:
            wrong.append((kind, a, b, verdict.reason))
    print(f"# {started}")
    print(f"reverse_search {rs.__version__}: verification on {args.corpus}\n")
    lines = []
    for (is_copy, kind), (yes, n) in sorted(
            tally.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        label = ("copy: " if is_copy else "different: ") + kind
        lines.append([label, n, f"{100 * yes / n:.1f}"])
    for name, is_copy, digits in (("ALL copies", True, 1),
                                  ("ALL different pictures", False, 2)):
        both = [v for (c, _), v in tally.items() if c == is_copy]
        n = sum(n for _, n in both)
        lines.append([name, n,
                      f"{100 * sum(y for y, _ in both) / max(1, n):.{digits}f}"])
    print(table(["pairs", "n", "accepted %"], lines))
    paths = sorted({p for a, b, _, _ in pairs for p in (a, b)})
    paths = paths[:args.cost_images]
    c = costs(paths, args.corpus)
    verify_ms = 1000 * statistics.median(seconds)
    print(table(["cost", "median"], [
        ["hashing per image (build today)", f"{c['hash_ms']:.1f} ms"],
        ["features per image (decode + ORB)", f"{c['feature_ms']:.1f} ms"],
        ["  stored at build: build time x",
         f"{(c['hash_ms'] + c['feature_ms']) / c['hash_ms']:.2f}"],
        ["  stored at build: bytes per image", f"{c['bytes']:.0f}"],
        ["  stored at build: at 100,000 images",
         f"{c['bytes'] * 1e5 / 2 ** 30:.2f} GiB"],
        ["verification per pair (features ready)", f"{verify_ms:.1f} ms"],
        ["on demand: a pair, both features found",
         f"{verify_ms + 2 * c['feature_ms']:.1f} ms"]],
        title=f"\nCosts (median over {len(paths)} images / {len(seconds)} "
        f"pairs, one process)"))
    if wrong:
        print("\nWrong verdicts:")
        for kind, a, b, why in wrong:
            print(f"  {kind}: {a} / {b}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
