#!/usr/bin/env python3
"""Do two versions of reverse_search.py give the same results?

Runs find_duplicates (and search, with --queries) of each version over the
same database and index folders and compares every result file byte for
byte: <operation>.json and .csv, plan.json and plan.csv.  Only the fields
that say when or how long (seconds, created) may differ.

    python3 bench/same_results.py OLD.py --params P.json [--queries DIR] [FLAGS...]

The database must exist (run build first); each version writes its results
into its own folder under a temporary directory.  Exit code 0 when every
file is the same, 1 otherwise (the first difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from _common import TOOL as NEW

VOLATILE = re.compile(rb'("seconds": |"created": )[^,\n]*')


def run(tool: str, params: str, out: str, operation: str, extra: list) -> None:
    cmd = [sys.executable, tool, operation, "--params", params, "-q",
           "--output-dir", out, *extra]
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.decode()[-2000:]}")


def same(a: str, b: str) -> str | None:
    """None when the files agree (volatile fields and the output folder
    aside), else why not."""
    def text(path):
        with open(path, "rb") as fh:
            data = fh.read().replace(os.fsencode(os.path.dirname(path)), b"OUT")
        return VOLATILE.sub(rb"\1", data)
    x, y = text(a), text(b)
    if x == y:
        return None
    at = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q),
              min(len(x), len(y)))
    return (f"differ at byte {at}: {x[max(0, at - 80):at + 80]!r} | "
            f"{y[max(0, at - 80):at + 80]!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the other reverse_search.py")
    ap.add_argument("--params", required=True)
    ap.add_argument("--queries", help="also compare search of these")
    args, args.extra = ap.parse_known_args(argv)  # the rest: for both versions
    ops = [("find_duplicates", [])]
    if args.queries:
        ops.append(("search", [args.queries]))
    bad = 0
    with tempfile.TemporaryDirectory(prefix="same-results-") as tmp:
        for op, more in ops:
            outs = []
            for name, tool in (("old", args.old), ("new", NEW)):
                out = os.path.join(tmp, f"{name}-{op}")
                run(tool, args.params, out, op, more + args.extra)
                outs.append(out)
            files = [f"{op}.json", f"{op}.csv"]
            if op == "find_duplicates":
                files += ["plan.json", "plan.csv"]
            for f in files:
                why = same(*(os.path.join(o, f) for o in outs))
                print(f"{f}: {'same' if why is None else why}")
                bad += why is not None
            with open(os.path.join(outs[1], f"{op}.json")) as fh:
                doc = json.load(fh)
            print(f"  ({len(doc.get('groups', doc.get('queries', [])))} "
                  f"{'groups' if 'groups' in doc else 'queries'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
