#!/usr/bin/env python3
"""The single-file executable: size and start-up, one printed table (run by
hand, never a test).  Compares builds side by side, interleaved, so the
ratios hold on a shared machine.

    python build_exe.py && cp dist/reverse_search /tmp/plain
    python build_exe.py --with-map && cp dist/reverse_search /tmp/with-map
    python bench/bench_exe.py /tmp/plain /tmp/with-map [--reps 5]

For each executable: its size, and the median wall time of
- `--version`: the onefile start (unpacking every bundled library into a
  temporary folder, then Python and the script's imports), the part a
  bigger bundle makes slower on every double-click;
- a double-click's find_duplicates on 12 small pictures (one group): start,
  hashing, matching and the report, with review_idle_minutes at its least
  and the page's Done pressed as soon as it opens (a stand-in browser).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "examples"))
from make_examples import picture  # noqa: E402


def version_seconds(exe: str) -> float:
    start = time.perf_counter()
    subprocess.run([exe, "--version"], check=True, capture_output=True)
    return time.perf_counter() - start


def stand_in_browser(folder: str) -> tuple:
    record = os.path.join(folder, "opened.txt")
    stub = os.path.join(folder, "browser.sh")
    with open(stub, "w", encoding="utf-8") as fh:
        fh.write(f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{record}'\n")
    os.chmod(stub, 0o755)
    return stub, record


def double_click_seconds(exe: str, work: str) -> float:
    """A double-click in a fresh folder, until the process has ended."""
    app = tempfile.mkdtemp(dir=work)
    photos = os.path.join(app, "photos")
    os.mkdir(photos)
    for seed in range(1, 12):
        picture(seed, (320, 240)).save(os.path.join(photos, f"p{seed}.jpg"))
    picture(1, (320, 240)).save(os.path.join(photos, "copy.png"))
    with open(os.path.join(app, "params.json"), "w", encoding="utf-8") as fh:
        json.dump({"img_dirs": ["photos"], "workers": 1,
                   "review_idle_minutes": 0.05}, fh)
    copy = shutil.copy2(exe, os.path.join(app, os.path.basename(exe)))
    stub, record = stand_in_browser(app)
    start = time.perf_counter()
    proc = subprocess.Popen([copy], cwd=app, env=dict(os.environ, BROWSER=stub),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if os.path.exists(record):
            with open(record, encoding="utf-8") as fh:
                m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", fh.read())
            if m:
                conn = http.client.HTTPConnection("127.0.0.1", int(m[1]), timeout=30)
                conn.request("POST", "/api/stop", body=b"{}", headers={
                    "X-Review-Token": m[2], "Content-Type": "application/json",
                    "Origin": f"http://127.0.0.1:{m[1]}"})
                conn.getresponse().read()
                break
        time.sleep(0.05)
    proc.wait(timeout=300)
    seconds = time.perf_counter() - start
    shutil.rmtree(app, ignore_errors=True)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exes", nargs="+", help="built executables to compare")
    ap.add_argument("--reps", type=int, default=5)
    ns = ap.parse_args()
    times = {exe: {"version": [], "click": []} for exe in ns.exes}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(ns.reps):  # interleaved: load changes hit all alike
            for exe in ns.exes:
                times[exe]["version"].append(version_seconds(exe))
                times[exe]["click"].append(double_click_seconds(exe, work))
    print(f"{'executable':<40} {'MiB':>7} {'--version s':>12} {'double-click s':>15}")
    for exe in ns.exes:
        t = times[exe]
        print(f"{exe:<40} {os.path.getsize(exe) / 2**20:>7.1f} "
              f"{statistics.median(t['version']):>12.2f} "
              f"{statistics.median(t['click']):>15.2f}")
    print(f"medians of {ns.reps}; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
