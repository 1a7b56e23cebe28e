"""What the benchmarks in bench/ share (not a benchmark itself).

    from _common import load_impl, machine, parse_size, timed, PEAK, table

- load_impl(path): the reverse_search.py under test (the checkout's by default),
  imported once as the module `reverse_search`;
- tool_version(path): its --version and git commit;
- machine(): one line for the top of every printed table: date, CPUs, model,
  Python and library versions, the tool's git commit, the load average;
- parse_size("10k"), parse_size("1.5M"): sizes as the --sizes options take them;
- timed(fn, *args, repeat=1): the best of `repeat` calls, wall and CPU seconds
  (this process and its reaped children), and what the last call returned;
- PEAK: peak resident memory of one operation (PEAK.start(), then PEAK.mb());
- table(head, rows): the one table printer, plain text or Markdown;
- log(text): a time-stamped progress line on stderr.

The benchmarks are run as `python3 bench/NAME.py`: Python puts bench/ first
on sys.path, so `import _common` finds this file.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import resource
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOL = os.path.join(ROOT, "reverse_search.py")
DATA = os.path.join(HERE, "data")  # what benchmarks make (git ignores it)


# ---- the tool under test ----

def load_impl(path: str = TOOL):
    """reverse_search imported from `path` (once: later calls with the same
    path return the same module).  It is registered as sys.modules
    ["reverse_search"]: its dataclasses and worker processes look it up."""
    path = os.path.abspath(path)
    loaded = sys.modules.get("reverse_search")
    if loaded is not None and os.path.abspath(loaded.__file__ or "") == path:
        return loaded
    spec = importlib.util.spec_from_file_location("reverse_search", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reverse_search"] = module
    spec.loader.exec_module(module)
    return module


def git_version(path: str = TOOL) -> str:
    """The commit of the checkout `path` is in, '+modified' if it differs."""
    def out(*cmd):
        done = subprocess.run(cmd, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(path)))
        return done.stdout.strip() if done.returncode == 0 else ""
    commit = out("git", "rev-parse", "--short", "HEAD") or "no git"
    dirty = out("git", "status", "--porcelain", "--", os.path.basename(path))
    return commit + ("+modified" if dirty else "")


def tool_version(path: str = TOOL) -> str:
    """'reverse_search VERSION (COMMIT)': its --version and git commit."""
    done = subprocess.run([sys.executable, path, "--version"],
                          capture_output=True, text=True)
    said = done.stdout.strip() if done.returncode == 0 else "?"
    return f"reverse_search {said} ({git_version(path)})"


# ---- the machine ----

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # not on this platform
        return "?"


def machine(tool: str = TOOL) -> str:
    """One line: when, where and what ran (quote it with the table)."""
    import numpy
    import PIL
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')} | {os.cpu_count()} CPUs | "
            f"{cpu_model()} | {platform.system()} {platform.release()} | "
            f"Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"Pillow {PIL.__version__} | reverse_search {git_version(tool)} | "
            f"load {load_average()} (other processes slow wall times; "
            f"ratios in one run hold)")


def parse_size(text: str) -> int:
    """'500' -> 500, '10k' -> 10,000, '1.5M' -> 1,500,000."""
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


# ---- time and memory ----

@dataclass
class Timing:
    """One run: wall seconds and CPU seconds (this process + reaped children)."""

    wall: float = 0.0
    cpu: float = 0.0


def cpu_seconds() -> float:
    """CPU time of this process plus its waited-for children so far."""
    return sum(r.ru_utime + r.ru_stime for r in
               (resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(fn, *args, repeat: int = 1) -> tuple[Timing, object]:
    """(the fastest of `repeat` calls of fn(*args), the last call's result).
    Garbage is collected before each call, so none of it is counted."""
    best, result = None, None
    for _ in range(max(1, repeat)):
        gc.collect()
        cpu, start = cpu_seconds(), time.perf_counter()
        result = fn(*args)
        took = Timing(time.perf_counter() - start, cpu_seconds() - cpu)
        best = took if best is None or took.wall < best.wall else best
    return best, result


class Peak:
    """Peak resident set size of one operation, in MB: Linux's VmHWM, reset
    before each operation through /proc/self/clear_refs; where the reset is
    refused, the process's lifetime peak (ru_maxrss), and `method` says so."""

    def __init__(self):
        self.resettable = self._reset()
        self.method = ("VmHWM, reset per operation" if self.resettable
                       else "ru_maxrss, process lifetime peak")

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self.resettable:
            self._reset()

    def mb(self) -> float:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PEAK = Peak()


# ---- output ----

def shown_width(text: str) -> int:
    """Terminal columns: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(head: list, rows: list, left: tuple = (0,), title: str = "",
          markdown: bool = False) -> str:
    """A table as text: columns in `left` left-aligned, the others right;
    a rule under the head.  markdown=True: a Markdown table (README-ready)."""
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    width = [max(shown_width(r[k]) for r in cells) for k in range(len(head))]

    def line(r: list) -> str:
        pads = [" " * (w - shown_width(c)) for c, w in zip(r, width)]
        parts = [c + p if k in left else p + c
                 for k, (c, p) in enumerate(zip(r, pads))]
        return "| " + " | ".join(parts) + " |" if markdown \
            else "  ".join(parts).rstrip()
    lines = [line(r) for r in cells]
    rule = ("|" + "|".join("-" * (w + 2) for w in width) + "|") if markdown \
        else "  ".join("-" * w for w in width)
    lines.insert(1, rule)
    return "\n".join(([title] if title else []) + lines)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
