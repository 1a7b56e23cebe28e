#!/usr/bin/env python3
"""Do two versions of reverse_search.py behave the same?  Runs every operation
(build, update, search, find_duplicates, export, move, undo) with --format json
(and text, with --text) on a copy of a collection, with each version; compares stdout,
stderr and every file written (result files, plan, manifest), after replacing
the run's own folder by <T> and blanking the fields that say when or how long.

    python3 bench/same_ops.py OLD.py NEW.py IMAGES QUERIES [--text]

Exit code 0 when everything agrees, 1 otherwise (the first differences shown).
"""
import difflib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

VOLATILE = [
    (re.compile(r'("(?:seconds|created|actions_sha256|plan_sha256|elapsed|started|finished|time|mtime_iso|moved_at|restored_at)": )("[^"]*"|[-0-9.e]+)'), r'\1X'),
    (re.compile(r'\d+(\.\d+)? s\b'), 'N s'),
    (re.compile(r'\(\d+ images/s\)'), '(N images/s)'),
    (re.compile(r'\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:?\d\d|Z)?'), 'DATE'),
    (re.compile(r'manifest-undone-[0-9T:-]+'), 'manifest-undone-DATE'),
    (re.compile(r'\d{8}-\d{6}'), 'STAMP'),
]


def norm(text, root):
    text = text.replace(root, "<T>")
    for rx, to in VOLATILE:
        text = rx.sub(to, text)
    return text


def run_all(tool, images, queries, fmt):
    root = tempfile.mkdtemp(prefix="sameops-")
    col = os.path.join(root, "col")
    shutil.copytree(images, col, symlinks=True)
    qs = os.path.join(root, "q")
    shutil.copytree(queries, qs, symlinks=True)
    common = ["--params", os.path.join(root, "params.json"), "--img-dirs", col,
              "--db-dir", os.path.join(root, "db"), "--bk-dir", os.path.join(root, "bk"),
              "--output-dir", os.path.join(root, "out"),
              "--quarantine-dir", os.path.join(root, "quar"), "--format", fmt,
              "--workers", "2", "--no-html-report"]
    steps = [["build"], ["update"], ["search", qs], ["find_duplicates"], ["export"],
             ["move", "--yes"], ["update"], ["undo", "--yes"], ["update"], ["find_duplicates"]]
    out = {}
    for k, step in enumerate(steps):
        args = [sys.executable, tool, step[0], *step[1:], *common]
        p = subprocess.run(args, capture_output=True, text=True, errors="replace")
        out[f"{k:02d} {step[0]} rc"] = str(p.returncode)
        out[f"{k:02d} {step[0]} stdout"] = norm(p.stdout, root)
        out[f"{k:02d} {step[0]} stderr"] = norm(p.stderr, root)
        for dirpath, _, files in os.walk(root):
            if "/db" in dirpath[len(root):] or "/bk" in dirpath[len(root):]:
                continue
            for f in files:
                full = os.path.join(dirpath, f)
                rel = norm(os.path.relpath(full, root), root)
                if rel.startswith(("col/", "q/", "quar/")) and not rel.endswith(".jsonl"):
                    with open(full, "rb") as fh:
                        out[f"{k:02d} file {rel}"] = hashlib.sha256(fh.read()).hexdigest()
                    continue
                with open(full, errors="replace") as fh:
                    out[f"{k:02d} file {rel}"] = norm(fh.read(), root)
    shutil.rmtree(root)
    return out


def main():
    old, new, images, queries = sys.argv[1:5]
    fmts = ["json", "text"] if "--text" in sys.argv else ["json"]
    bad = 0
    for fmt in fmts:
        a = run_all(old, images, queries, fmt)
        b = run_all(new, images, queries, fmt)
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                bad += 1
                print(f"DIFF [{fmt}] {key}")
                if bad < 4:
                    for line in list(difflib.unified_diff((a.get(key) or "").splitlines(),
                                                          (b.get(key) or "").splitlines(), lineterm=""))[:30]:
                        print("   ", line[:200])
        print(f"[{fmt}] compared {len(a)} outputs: {'SAME' if not bad else f'{bad} differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
