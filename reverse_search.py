#!/usr/bin/env python3
"""reverse_search: find a picture, or its near-duplicates, in your own folders.

Reads params.json, hashes the images under ``img_dirs`` into a database
(SQLite in ``db_dir``, or PostgreSQL), keeps a rebuildable index of the hashes
in ``bk_dir`` and runs one operation: build, update, search, find_duplicates,
export, move, undo or review.

    python reverse_search.py                  # the operation in params.json
    python reverse_search.py search photo.jpg --distance-threshold 6
    python reverse_search.py --help

Hamming distances are counted in bits (XOR, then popcount).  Every engine
returns exactly the set a brute-force comparison of all hashes returns.

Contents (one banner section each; a section uses only the ones
above it):

    1. Errors - the exception family: one message and an exit code each
    2. Utilities - how names, sizes and times are shown; Console; helpers
    3. Files - every file the tool writes: fresh, renamed into place
    4. Records - the data model: a stored row, its hashes, match codes
    5. Connection strings - database_url read as libpq reads it; never a password
    6. Config - every params.json key, once; defaults < params.json < flags
    7. Hashing - decoding, hashes and their regions; worker processes
    8. Workers - processes that hash (and verify) with a bounded queue
    9. Finding files - walking img_dirs: what is an image, links, errors
    10. Verification - ORB keypoints and geometry: is a candidate a copy?
    11. Store: SQLite - the database (the truth) and the Store interface
    12. Index - exact engines (scan, MIH, BK-tree) over the stored hashes
    13. Store: PostgreSQL - the same interface over PostgreSQL
    14. Reports - how a report publishes itself: files, stdout, the HTML page
    15. Operations: build and update - hash the collection into the store; Console
    16. Operations: search - find each query: candidates, verification, matches
    17. Keep rule - which file of a group a person would keep, and why
    18. Plan - plan.json / plan.csv: what move will do, read back and checked
    19. Operations: find_duplicates - pairs, groups, their keeper, the plan
    20. Operations: move and undo - quarantine with a manifest; put back
    21. Operations: export - every stored file with its hash
    22. Review - the local review page: server, session, actions
    23. Command line - flags, dispatch, main(), the double-clicked executable
    24. Templates - the HTML of the report and of the review page
"""

from __future__ import annotations

import abc
import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import difflib
import errno
import functools
import hashlib
import html
import io
import json
import math
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import sqlite3
import stat
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Iterator, NamedTuple, Protocol, Sequence
from urllib.parse import unquote

__version__ = "1.0.0"

PARAMS_NAME = "params.json"
DB_NAME = "images.db"
INDEX_NAME = "hashes.idx"
BKTREE_NAME = "bktree.idx"
WINDOWS_NAME = "windows.idx"  # the region windows' MIH tables (their orders)
SCHEMA_VERSION = 2  # 2: traits (format, camera EXIF, greyscale) for the keep rule
INDEX_FORMAT = 3
INDEX_MAGIC = b"REVERSE-SEARCH-INDEX\n"


# ============================================================================
# Errors
# ============================================================================

class ReverseSearchError(Exception):
    """A failure the user can act on: printed as one message, no traceback."""

    exit_code = 1


class ConfigError(ReverseSearchError):
    """Bad params.json or command line."""

    exit_code = 2


class StoreError(ReverseSearchError):
    """The database, index or output folder cannot be used."""


class SkipFile(ReverseSearchError):
    """One image cannot be hashed; it is recorded and the run goes on."""


class FileRefused(ReverseSearchError):
    """One file is not moved or restored; it stays, and the run goes on."""


class PlanError(ReverseSearchError):
    """The plan as a whole cannot be used; nothing has moved."""


# What pip installs for a module the script imports (requirements.txt).
PACKAGES = {"PIL": "Pillow", "imagehash": "ImageHash", "numpy": "numpy",
            "pybktree": "pybktree", "threadpoolctl": "threadpoolctl",
            "psycopg": "psycopg[binary]"}


def missing_package(module: str | None) -> ReverseSearchError:
    """A module the run needs is not where this Python looks: most often
    the project's virtual environment is not active."""
    top = (module or "?").split(".")[0]
    return ReverseSearchError(
        f"this Python ({sys.executable}) has no {PACKAGES.get(top, top)}: "
        f"install the requirements with `python -m pip install -r "
        f"requirements.txt`, in the project's virtual environment if you "
        f"made one (activate it first: `. .venv/bin/activate`; on Windows "
        f"`.venv\\Scripts\\activate`)")


try:  # numpy is used everywhere below; without it, say how to get it
    import numpy as np
except ModuleNotFoundError as _exc:
    if __name__ != "__main__":
        raise
    sys.exit(f"reverse_search: error: {missing_package(_exc.name)}")


# ============================================================================
# Utilities
# ============================================================================
#
# Small helpers every later section uses: how a path or a size is shown to a
# person (hostile names stay text), times, the Console that says notices and
# progress on stderr (stdout carries only results), and _no_gc.

class _no_gc:
    """Pause the garbage collector while building many small objects."""

    def __enter__(self):
        import gc
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        import gc
        if self.was:
            gc.enable()


def shown(path: str) -> str:
    """A path safe to print: undecodable bytes become \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8",
                                                           "backslashreplace")


# What text output escapes besides shown(): control characters (terminal
# escape sequences, CR, newlines, tabs) and the bidi overrides that make a
# name read backwards.  JSON and CSV keep names exact.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """shown(text) safe for a terminal: \\x1b, \\r, \\n, \\u202e, ..."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape")
                            .decode("ascii"), shown(text))


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def counted(n: int, noun: str) -> str:
    """'1 file', '2 files': a count with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _iso(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(mtime_ns / 1e9))

_ESCAPED_BYTE = re.compile(r"\\x([0-9a-fA-F]{2})")


def real_path(path: str) -> str:
    """The file behind a shown() path: \\xNN escapes back to the raw bytes."""
    if "\\x" not in path or os.path.lexists(path):
        return path
    raw, pos = b"", 0
    for m in _ESCAPED_BYTE.finditer(path):
        raw += path[pos:m.start()].encode("utf-8", "surrogateescape")
        raw += bytes([int(m.group(1), 16)])
        pos = m.end()
    raw += path[pos:].encode("utf-8", "surrogateescape")
    try:
        return os.fsdecode(raw)
    except UnicodeDecodeError:  # Windows: such bytes name no file there
        return path


class Console:
    """Notices and progress on stderr; stdout carries only results."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def notice(self, text: str) -> None:
        if not self.quiet:  # file names in it may hold terminal escapes
            print(printable(text), file=sys.stderr, flush=True)

    def progress(self, total: int | None, what: str):
        if self.quiet or not sys.stderr.isatty():
            return _NoProgress()
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoProgress()
        tqdm.monitor_interval = 0  # no monitor thread: workers may be forked
        return tqdm(total=total, desc=what, unit="img", file=sys.stderr,
                    dynamic_ncols=True, leave=False)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


# ============================================================================
# Files
# ============================================================================
#
# A file is created fresh under a random temporary name beside its target
# (O_CREAT | O_EXCL | O_NOFOLLOW: never an existing file, never through a
# link), written, flushed and renamed over its own name.  A reader sees the
# old file or the new one, never half of either; a symbolic or hard link
# planted at the name is replaced, never written through.  Appends (the
# quarantine manifest, the desktop log) open with O_NOFOLLOW and refuse any
# file that is not a plain file with one name.  A user's image is moved or
# restored by transfer(): a hard link when both names are on one file system
# (the same bytes, nothing copied), else a copy to a temporary name, fsync,
# a SHA-256 check, then a rename that never replaces a file; the source goes
# last.

def _read_json(path: str, missing: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path}: {exc}.") from None

TEMP_MARK = ".rstmp-"  # temporary names: .rstmp-<tag of target>-<random>
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has no symlink opens
_CLOEXEC = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_COPY_BLOCK = 1 << 20


def _name_tag(path: str) -> str:
    """Ties a temporary name to its target, so leftovers can be found."""
    name = os.fsencode(os.path.basename(path))
    return hashlib.sha1(name).hexdigest()[:8]


def temp_name(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".",
                        f"{TEMP_MARK}{_name_tag(path)}-{uuid.uuid4().hex[:12]}")


def create_temp(path: str) -> tuple[int, str]:
    """(fd, name) of a new, empty file beside `path`; mode 0666 less umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    while True:
        tmp = temp_name(path)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 48 random bits taken: draw again
            continue


def _atomic_write(path: str, write, binary: bool = False,
                  replace: bool = True, sync: bool = False) -> None:
    """Create `path` fresh: write(fh) fills a temporary file (text or binary),
    renamed over `path` (or, replace=False, put there only if the name is
    free: FileExistsError otherwise).  sync: on disk before the rename (the
    index, the manifest); results and thumbnails skip it (a crash leaves the
    old file or an empty one, and thousands of fsyncs are slow)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with (os.fdopen(fd, "wb") if binary else
              os.fdopen(fd, "w", encoding="utf-8", newline="")) as fh:
            write(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            place_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def place_new(tmp: str, path: str) -> None:
    """Rename tmp to path unless path exists (FileExistsError then).  A hard
    link makes the check and the rename one step where links work."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):  # no hard links here (FAT, SMB)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", path) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def open_append(path: str):
    """A binary file to append to; never through a link, never a file with
    other names (a hard link to someone's photo)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if os.path.islink(path):
            raise OSError(errno.ELOOP, "is a symbolic link; the tool never "
                          "writes through one: move it away", path) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EPERM, "is not a plain file with one name; the "
                      "tool never appends to it: move it away", path)
    return os.fdopen(fd, "ab")


def append_line(path: str, line: str) -> None:
    """One line, on disk before this returns."""
    with open_append(path) as fh:
        fh.write(line.encode("utf-8", "surrogateescape") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def own_folder(path: str) -> None:
    """A folder the tool makes inside its own output: a real folder, never a
    link planted in its place (that would carry writes elsewhere)."""
    if os.path.islink(path):
        os.unlink(path)  # the link only: what it points to is not touched
    os.makedirs(path, exist_ok=True)


def sync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (POSIX; Windows has no folder fds)."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder or ".", os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sweep_temps(path: str) -> int:
    """Remove temporary files an interrupted transfer to `path` left (only
    names this tool makes, tagged with this target)."""
    folder, gone = os.path.dirname(path) or ".", 0
    mark = f"{TEMP_MARK}{_name_tag(path)}-"
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(mark) and len(name) == len(mark) + 12:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    gone += 1
    return gone


def sweep_stale_temps(folder: str, hours: float = 1.0) -> None:
    """Temporary files of runs killed mid-write (results, thumbnails) that
    are over an hour old: a run still writing its own is never that slow."""
    cutoff = time.time() - hours * 3600
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TEMP_MARK):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)


def transfer(src: str, dst: str, sha256: str, replace: bool = False) -> None:
    """Move the plain file src to dst, which must not exist (replace=True:
    may exist and is replaced).  On one file system a hard link (the same
    bytes); across file systems a copy to a temporary name, fsync and a
    SHA-256 check against `sha256` first.  src is removed last: a failure or
    a kill at any point leaves src whole (and at most a temporary file,
    removed by the next transfer to dst)."""
    sweep_temps(dst)
    if not replace and _link_moved(src, dst):
        return
    fd, tmp = create_temp(dst)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _copy_digest(src, out)
            out.flush()
            os.fsync(out.fileno())
        if got != sha256:
            raise FileRefused("changed while being copied (SHA-256 differs); "
                              "the file stays where it was")
        if sha256_of(tmp) != sha256:
            raise FileRefused("the copy reads back wrong (SHA-256 differs); "
                              "the file stays where it was")
        st = os.stat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        with contextlib.suppress(OSError):
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        if replace:
            os.replace(tmp, dst)
        else:
            place_new(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(os.path.dirname(dst))
    os.unlink(src)
    sync_folder(os.path.dirname(src))


def _link_moved(src: str, dst: str) -> bool:
    """True if src now lives at dst through a hard link (one file system)."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):  # other file system, or no links
        return False
    sync_folder(os.path.dirname(dst))
    os.unlink(src)
    sync_folder(os.path.dirname(src))
    return True


def _copy_digest(src: str, out) -> str:
    """Copy src into the open file `out`; the SHA-256 of what was read."""
    digest = hashlib.sha256()
    with open(src, "rb") as fh:
        for block in iter(lambda: fh.read(_COPY_BLOCK), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


_JSON_FLAT = frozenset((str, int, float, bool, type(None)))


@functools.lru_cache(maxsize=None)
def _flat_encoder(level: int) -> json.JSONEncoder:
    """Encodes a list of flat objects at `level` in one C call: the item
    separator carries the newline and indentation of the objects' members."""
    return json.JSONEncoder(ensure_ascii=False,
                            separators=(",\n" + " " * (level + 2), ": "))


def json_text(obj, level: int = 0) -> str:
    """json.dumps(obj, indent=1, ensure_ascii=False), byte for byte.

    Python's json module encodes in C only without indentation; indented, a
    million-image result took 45 s (18 s of CPU).  Here a list of flat
    objects (the bulk of every result) is one C call: a raw newline in its
    output can only be a separator (strings escape theirs), and one that
    follows '}' starts the next object, so its indentation is fixed by a
    plain replace."""
    if isinstance(obj, dict):
        if not obj or not all(type(k) is str for k in obj):
            return json.dumps(obj, indent=1, ensure_ascii=False).replace(
                "\n", "\n" + " " * level)
        pad = "\n" + " " * (level + 1)
        return ("{" + pad + ("," + pad).join(
            json.encoder.encode_basestring(k) + ": " + (
                _json_scalar(v) if type(v) in _JSON_FLAT
                else json_text(v, level + 1))
            for k, v in obj.items()) + "\n" + " " * level + "}")
    if isinstance(obj, (list, tuple)) and obj:
        inner, outer = " " * (level + 1), " " * (level + 2)
        if all(type(d) is dict and d and all(type(k) is str for k in d)
               and all(type(v) in _JSON_FLAT for v in d.values()) for d in obj):
            body = _flat_encoder(level).encode(obj)[2:-2].replace(
                "},\n" + outer + "{", f"\n{inner}}},\n{inner}{{\n{outer}")
            return (f"[\n{inner}{{\n{outer}" + body + f"\n{inner}}}\n"
                    + " " * level + "]")
        pad = "\n" + inner
        return ("[" + pad + ("," + pad).join(json_text(v, level + 1) for v in obj)
                + "\n" + " " * level + "]")
    return json.dumps(obj, indent=1, ensure_ascii=False)


def _json_scalar(value) -> str:
    """json.dumps of a str, int, bool or None without building an encoder
    (a third of the time of a result whose matches carry nested objects)."""
    if type(value) is str:
        return json.encoder.encode_basestring(value)
    if type(value) is int:
        return int.__repr__(value)
    if value is None or type(value) is bool:
        return "null" if value is None else "true" if value else "false"
    return json.dumps(value)  # floats: NaN and Infinity as json spells them


# ============================================================================
# Records
# ============================================================================
#
# The data model.  A picture is stored as one row (ImageRow) of the images
# table: its path, size, mtime and SHA-256, and its hash: a 64-bit pHash (by
# default) of the whole picture, then, packed in one BLOB, the hashes of its
# 7 other orientations (VARIANTS), of 2 centred regions (CENTRES), of its
# content box (the picture inside a screenshot, post or frame, with the box as
# one word) and of 161 region windows (WINDOWS).  A match code names which of
# these matched (-1: the whole picture; an index into MATCH_NAMES otherwise)
# and stage_of() names its matching stage.  HashSpec says which hash and which
# of these extra hashes a database holds; a database holds one kind only.

@dataclass
class ImageRow:
    """One file of the collection, as stored."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    digest: bytes | None = None
    hash: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    id: int | None = None
    # every extra hash (orientations, centres, content box, windows), packed
    # in split_extra's order; the column is named variants in both databases
    extra: bytes | None = None
    low_detail: bool = False       # too flat to compare (blank, 1x1, ...)
    detail: float = 4.0            # information in the picture (see detail_bits)
    traits: str | None = None      # Traits.text(); None: hashed before schema 2


@dataclass(slots=True)  # one per stored file: keep it small
class RowState:
    """What update needs to know about a stored file to skip it."""

    size: int
    mtime_ns: int
    ok: bool  # hashed, with everything this version stores


@dataclass(frozen=True)
class HashSpec:
    """Which hash, how big, and how images are decoded for it."""

    method: str = "phash"
    size: int = 8
    binbits: int = 3
    mode: str = "fast"
    orientations: bool = False  # also hash the 7 other orientations
    trim: bool = False          # cut uniform borders first (fast mode only)
    centres: bool = False       # also hash the central regions (CENTRES)
    content: bool = False       # also hash the content box (content_box)
    windows: bool = False       # also hash the region windows (WINDOWS)

    @property
    def variant_count(self) -> int:
        return len(VARIANTS) if self.orientations else 0

    @property
    def centre_count(self) -> int:
        return len(CENTRES) if self.centres else 0

    @property
    def content_count(self) -> int:
        """Slots of the content box: its hash, then its box (pack_box)."""
        return 2 if self.content else 0

    @property
    def window_count(self) -> int:
        return len(WINDOWS) if self.windows else 0

    @property
    def extra_count(self) -> int:
        """Hashes stored beside the main one: orientations, centres, the
        content box (hash and box), then the windows."""
        return self.variant_count + self.centre_count + self.content_count + \
            self.window_count

    @property
    def regions(self) -> bool:
        """Region hashes (centres, content box, windows): matched by the
        local index, since PostgreSQL's own columns hold main hashes only."""
        return self.centres or self.content or self.windows

    @property
    def trims(self) -> bool:
        return self.trim and self.mode == "fast"

    @property
    def bits(self) -> int:
        if self.method == "colorhash":
            return 14 * self.binbits
        if self.method == "whash_db4":  # db4 pads: LL band is wider than size
            side = 8 * self.size
            for _ in range(3):  # three levels from image_scale 8 * size
                side = (side + 7) // 2
            return side * side
        return self.size ** 2

    @property
    def words(self) -> int:
        return (self.bits + 63) // 64

    @property
    def kind(self) -> str:
        """Equal kinds give comparable hashes; anything else means rehash."""
        size = f"b{self.binbits}" if self.method == "colorhash" else self.size
        extras = "+orient" * self.orientations + "+trim" * self.trims + \
            "+centre" * self.centres + "+content" * self.content + \
            f"+win{len(WINDOWS)}" * self.windows
        return f"{self.method}/{size}/{self.mode}{extras}"

    def describe(self) -> str:
        size = (f"binbits {self.binbits}" if self.method == "colorhash"
                else f"size {self.size}")
        extras = ", 8 orientations" * self.orientations + \
            ", borders trimmed" * self.trims + ", centre hashes" * self.centres \
            + ", content box" * self.content + \
            f", {len(WINDOWS)} region windows" * self.windows
        return f"{self.method} ({size}, {self.bits} bits, {self.mode} mode{extras})"

    @property
    def work_side(self) -> int:
        """Pixels on the short side that the hash's own resize starts from:
        3x its grid is plenty for its antialiasing, and lets libjpeg decode
        a 1 MP photo at 1/8 scale (18 % faster than 1/4 at 4x)."""
        target = {"phash": 4 * self.size, "phash_simple": 4 * self.size,
                  "whash": 8 * self.size, "whash_db4": 8 * self.size,
                  "colorhash": 32}.get(self.method, self.size + 1)
        return max(64, 3 * target)


# The 7 other orientations (the dihedral group of the square, less identity).
# It is closed under inverses, so hashing the variants of one side of a pair
# finds a mirrored or rotated copy whichever side is the original.
VARIANTS = ("FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM", "ROTATE_90", "ROTATE_180",
            "ROTATE_270", "TRANSPOSE", "TRANSVERSE")

VARIANT_NAMES = ("mirrored", "flipped upside down", "rotated 90", "rotated 180",
                 "rotated 270", "mirrored and rotated", "mirrored and rotated")


# Central regions hashed as well (share of width and height kept, centred).
# A region is compared only with the same region of other pictures, at the
# full threshold: the middle of a picture survives what changes its edges
# (crops, the corners a small rotation fills, captions, corner watermarks,
# thin frames).  Measured on the public corpus (README): pairs found +4 %,
# false pairs +1.5x at the same threshold, fewer than raising it by 2 bits.
CENTRES = (0.9, 0.8)

CENTRE_NAMES = tuple(f"centre {round(100 * f)} %" for f in CENTRES)


# Region windows: spans of each axis as (start, stop) fractions; a window is
# one span of x by one of y.  The whole of a copy is matched against the
# windows of the other picture, so a crop finds the window it lies inside.
# Wide windows: 90 % and 80 % of the side in steps of 5 % of the side, each
# span of x by each of y, less the whole picture (9 x 9 - 1 = 80): measured
# on the tough corpus, the nearest one is within 8 bits of a crop's whole
# hash for 91-99 % of the 12-25 % crops (crop_20, crop_axis_25,
# crop_side_15, crop_corner_12); the same scales at 3 positions (offsets 0,
# half, all) found 22-61 %: the position step matters more than the count.
WIDE_SPANS = ((0.0, 1.0),
              (0.0, 0.9), (0.05, 0.95), (0.1, 1.0),
              (0.0, 0.8), (0.05, 0.85), (0.1, 0.9), (0.15, 0.95), (0.2, 1.0))

# Narrow windows: 60 % of the side in steps of 5 % (9 x 9 = 81), for the
# crops that keep about 55-65 % of each side (a 40 % crop keeps a third of
# the picture: no wide window is within 12 bits of it).  Measured on the
# tough corpus's crop_40: the nearest narrow window is within 8 bits for
# 59 % (10 % steps: 34 %), 10 bits for 79 %; crops of other amounts made
# from its 76 originals, within 8 bits: 30 % removed 26 %, 35 % 39 %,
# 40 % 64 %, 45 % 30 %.  Windows of 65 % instead: 35 % 75 %, 40 % 41 %.
NARROW_SPANS = tuple((round(0.05 * k, 2), round(0.05 * k + 0.6, 2))
                     for k in range(9))

WINDOW_SPANS = WIDE_SPANS + NARROW_SPANS

WINDOWS = tuple((x, y) for y in WIDE_SPANS for x in WIDE_SPANS
                if (x, y) != (WIDE_SPANS[0], WIDE_SPANS[0])) + \
    tuple((x, y) for y in NARROW_SPANS for x in NARROW_SPANS)


def _window_name(x: tuple, y: tuple) -> str:
    """"window 80 % x 100 % at 5 %, 0 %": share of width and height kept,
    then the offset of its left and top edges."""
    return (f"window {round(100 * (x[1] - x[0]))} % x "
            f"{round(100 * (y[1] - y[0]))} % at {round(100 * x[0])} %, "
            f"{round(100 * y[0])} %")

WINDOW_NAMES = tuple(_window_name(x, y) for x, y in WINDOWS)

CONTENT_NAME = "content box"


# Turned windows: another orientation of one picture (its stored variant
# hash) against a window of the other: a crop that was also turned or
# mirrored (a phone photo's quarter turn of a cropped copy).  Measured on
# the tough corpus (quarter turns of 6 % crops): the best variant against
# the best window is within 6 bits for 91 % (median 4), against the whole
# picture 47 % (median 8).  Verified mode only: 1,127 more hashes compared
# per pair make chance matches likelier, and verification refuses them.
TURNED_NAMES = tuple(f"{VARIANT_NAMES[k]}, {name}" for k in range(len(VARIANTS))
                     for name in WINDOW_NAMES)

MATCH_NAMES = VARIANT_NAMES + CENTRE_NAMES + (CONTENT_NAME,) + WINDOW_NAMES \
    + TURNED_NAMES


# match codes (index into MATCH_NAMES; -1: the whole picture as stored)
CENTRE_CODE = len(VARIANTS)

CONTENT_CODE = CENTRE_CODE + len(CENTRES)

WINDOW_CODE = CONTENT_CODE + 1

TURNED_CODE = WINDOW_CODE + len(WINDOWS)  # + variant * len(WINDOWS) + window

STAGES = ("exact hash", "orientation", "centre", "content box", "region window",
          "keypoints", "turned window", "keypoints through a copy")


# "keypoints": no hash of the pair is near, but the pair is linked through
# the group and verification finds the one picture in the other (the group's
# lead and a member it does not hash near: a quarter turn of a crop, a copy
# near only another copy of the lead; in a search, an image near a copy the
# query found); never given by stage_of (no code).
# "keypoints through a copy": the same, but verified against a copy of the
# lead within half the threshold of it by the whole picture (the lead itself
# may carry an edit the member lacks: text over a third of it)


def stage_of(code: int) -> str:
    """The matching stage a match code belongs to (STAGES)."""
    if code < 0:
        return STAGES[0]
    if code < CENTRE_CODE:
        return STAGES[1]
    if code < CONTENT_CODE:
        return STAGES[2]
    if code >= TURNED_CODE:
        return STAGES[6]
    return STAGES[3] if code == CONTENT_CODE else STAGES[4]


def code_box(code: int) -> tuple:
    """(left, top, right, bottom) fractions of the picture that a fixed
    region code hashes (the content box is per image: see unpack_box)."""
    if CENTRE_CODE <= code < CONTENT_CODE:
        keep = CENTRES[code - CENTRE_CODE]
        return ((1 - keep) / 2, (1 - keep) / 2, (1 + keep) / 2, (1 + keep) / 2)
    if code >= WINDOW_CODE:
        (x0, x1), (y0, y1) = WINDOWS[(code - WINDOW_CODE) % len(WINDOWS)]
        return (x0, y0, x1, y1)
    return (0.0, 0.0, 1.0, 1.0)


# A box as one 64-bit word: four 16-bit fractions (left, top, right,
# bottom), stored in the slot after the content box's hash.
BOX_SCALE = 65535

FULL_BOX = (0, 0, BOX_SCALE, BOX_SCALE)


def pack_box(box: Sequence[float]) -> int:
    value = 0
    for f in box:
        value = value << 16 | min(BOX_SCALE, max(0, round(f * BOX_SCALE)))
    return value


def unpack_box(value: int) -> tuple:
    return tuple(((int(value) >> s) & 0xFFFF) / BOX_SCALE for s in (48, 32, 16, 0))

FULL_BOX_WORD = pack_box((0.0, 0.0, 1.0, 1.0))


# ============================================================================
# Connection strings
# ============================================================================
#
# database_url is read exactly as libpq reads it (a URL or key=value words),
# so the tool checks what the driver will use; a password in it is refused
# and never shown: results and messages print redact_url()'s form.

#
# libpq reads a URL's user:password up to the first "@" before any "/", so
# "#" and "?" belong to the password there (urlsplit would end the host at
# them and miss it).  Any password is refused in database_url, and every form
# of connection string (URL or key=value) is redacted wherever it is shown.

CONNINFO_SECRETS = ("password", "sslpassword")  # libpq keys that hold secrets

URL_PREFIXES = ("postgresql://", "postgres://")  # libpq's, case-sensitive


def is_database_url(text: str) -> bool:
    return text.startswith(URL_PREFIXES)


def parse_conninfo(text: str) -> dict:
    """{libpq key: value} of a URL or key=value connection string, as libpq
    reads it (psycopg's conninfo_to_dict asks libpq itself; without psycopg,
    a parser written after libpq's fe-connect.c).  ValueError when libpq
    would refuse it, with no part of the text in the message (libpq quotes
    the whole URL, password included)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return _parse_conninfo(text)
    try:
        return conninfo_to_dict(text)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's message
        raise ValueError(_unquoted(str(exc))) from None


def _unquoted(message: str) -> str:
    """libpq's message with every quoted part (a piece of the URL) cut."""
    return re.sub(r'"[^"]*"', '"..."', message.strip().split("\n")[0])


def _parse_conninfo(text: str) -> dict:
    return _parse_uri(text) if is_database_url(text) else _parse_keywords(text)


def _parse_uri(text: str) -> dict:
    """conninfo_uri_parse_options: credentials, hosts[:ports], /dbname, ?k=v."""
    rest, out = text.split("://", 1)[1], {}
    cred = re.match(r"[^@/]*@", rest)  # the first "@" before any "/"
    if cred:
        user, colon, password = rest[:cred.end() - 1].partition(":")
        rest = rest[cred.end():]
        if user:
            out["user"] = _pct_decode(user)
        if colon and password:
            out["password"] = _pct_decode(password)
    hosts, ports, pos = [], [], 0
    while True:
        if rest.startswith("[", pos):  # [IPv6]
            end = rest.find("]", pos)
            if end <= pos + 1:
                raise ValueError("unterminated or empty [IPv6] host")
            host, pos = rest[pos + 1:end], end + 1
            if rest[pos:pos + 1] not in ("", ":", "/", "?", ","):
                raise ValueError("unexpected character after an [IPv6] host")
        else:
            host = re.compile(r"[^:/?,]*").match(rest, pos).group()
            pos += len(host)
        hosts.append(host)
        port = ""
        if rest.startswith(":", pos):
            port = re.compile(r"[^/?,]*").match(rest, pos + 1).group()
            pos += 1 + len(port)
        ports.append(port)
        if not rest.startswith(",", pos):
            break
        pos += 1
    for key, values in (("host", hosts), ("port", ports)):
        if ",".join(values):
            out[key] = _pct_decode(",".join(values))
    term = rest[pos:pos + 1]
    if term == "/":
        dbname, term, query = rest[pos + 1:].partition("?")
        if dbname:
            out["dbname"] = _pct_decode(dbname)
    else:
        query = rest[pos + 1:]
    if term:
        out.update(_uri_params(query))
    return out


def _uri_params(query: str) -> dict:
    out = {}
    for item in query.split("&") if query else []:
        if item.count("=") != 1:
            raise ValueError("a URL parameter without exactly one \"=\"")
        key, value = (_pct_decode(x) for x in item.split("="))
        if key == "ssl" and value == "true":  # libpq's JDBC-style alias
            key, value = "sslmode", "require"
        out[key] = value
    return out


def _pct_decode(text: str) -> str:
    """libpq's conninfo_uri_decode: %XX only, and never %00."""
    if re.search(r"%(?![0-9a-fA-F]{2})|%00", text):
        raise ValueError("an invalid percent-encoded token")
    return unquote(text, errors="surrogateescape")


def _parse_keywords(text: str) -> dict:
    """conninfo_parse: key = value pairs, values bare or 'quoted', with
    backslash escapes in both."""
    out, pos, n = {}, 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return out
        m = re.compile(r"([^=\s]*)\s*=\s*").match(text, pos)
        if not m:
            raise ValueError('missing "=" in a key=value connection string')
        key, pos, value = m.group(1), m.end(), []
        quoted = text.startswith("'", pos)
        pos += quoted
        while True:
            if pos >= n:
                if quoted:
                    raise ValueError("unterminated quoted string")
                break
            c = text[pos]
            pos += 1
            if c == "\\":
                value.append(text[pos:pos + 1])
                pos += 1
            elif quoted and c == "'" or not quoted and c.isspace():
                break
            else:
                value.append(c)
        out[key] = "".join(value)


def redact_url(text: str) -> str:
    """A connection string (URL or key=value) without any password: what
    results and messages show."""
    if not text:
        return text
    if is_database_url(text):
        return _redact_uri(text)
    try:
        info = _parse_keywords(text)
    except ValueError:
        return "(connection string not shown: libpq cannot read it)"
    return " ".join(f"{k}={_kv_quote(v)}" for k, v in info.items()
                    if k not in CONNINFO_SECRETS)


def _redact_uri(url: str) -> str:
    scheme, rest = url.split("://", 1)
    cred = re.match(r"[^@/]*@", rest)  # libpq's rule, as _parse_uri
    if cred:
        user = rest[:cred.end() - 1].partition(":")[0]
        rest = (user + "@" if user else "") + rest[cred.end():]
    base, mark, query = rest.partition("?")
    kept = []
    for item in query.split("&") if query else []:
        try:
            key = _pct_decode(item.partition("=")[0])
        except ValueError:
            continue
        if item.count("=") == 1 and key not in CONNINFO_SECRETS:
            kept.append(item)
    return f"{scheme}://{base}" + ("?" + "&".join(kept) if kept else "")


def _kv_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_database_url(url: str, where: str) -> None:
    """ConfigError unless `url` is a connection string libpq reads (URL or
    key=value) that holds no password."""
    if not url:
        return
    try:
        info = parse_conninfo(url)
    except ValueError as exc:
        info, why = None, f" (libpq: {exc})"
    else:
        why = "" if is_database_url(url) or info else " (it is empty)"
    if why:
        raise ConfigError(f"{where}: key 'database_url' is not a connection "
                          f"string PostgreSQL reads{why}; write it as "
                          f"postgresql://user@host:5432/dbname.")
    found = [k for k in CONNINFO_SECRETS if info.get(k)]
    if found:
        raise ConfigError(f"{where}: key 'database_url' holds a "
                          f"{_secret_place(url, found[0])}; results and "
                          f"reports would show it. Remove it and give it to "
                          f"libpq another way: {_password_ways(info)}")


def _secret_place(url: str, key: str) -> str:
    if key == "password" and is_database_url(url) and \
            re.match(r"[^@/]*:[^@/]*@", url.split("://", 1)[1]):
        return "password (between 'user:' and '@')"
    return f"'{key}' setting"


def _password_ways(info: dict) -> str:
    """The three places libpq reads a password from, filled in for `info`."""
    fields = [(info.get(k) or "*").split(",")[0]  # the first host's
              for k in ("host", "port", "dbname", "user")]
    entry = ":".join(re.sub(r"([:\\])", r"\\\1", f) for f in fields)
    pgpass = "%APPDATA%\\postgresql\\pgpass.conf" if os.name == "nt" \
        else "~/.pgpass (chmod 600)"
    return (f"the PGPASSWORD environment variable; or the line "
            f"'{entry}:PASSWORD' in {pgpass}; or a service file "
            f"(~/.pg_service.conf with password=PASSWORD in a [NAME] "
            f"section, and database_url postgresql://?service=NAME).")


# ============================================================================
# Config
# ============================================================================

OPERATIONS = ("build", "update", "search", "find_duplicates", "export", "move",
              "undo", "review")
HASH_METHODS = ("ahash", "phash", "phash_simple", "dhash", "dhash_vertical",
                "whash", "whash_db4", "colorhash")
HASH_MODES = ("fast", "exact")
MATCHINGS = ("verified", "fast")
ENGINES = ("auto", "scan", "mih", "bktree")
FORMATS = ("text", "json", "csv")
GROUPINGS = ("representative", "connected")
KEEP_CRITERIA = ("most_pixels", "oldest", "camera_exif", "original_format",
                 "unedited", "largest_file", "newest", "folder_order",
                 "shortest_path")
DEFAULT_EXTENSIONS = [".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp",
                      ".dib", ".tif", ".tiff", ".webp", ".avif", ".heic",
                      ".heif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
                      ".jp2", ".j2k", ".pcx", ".psd"]


def _key(default, help_text, *, choices=None, minimum=None, maximum=None,
         path=False):
    """A config field: default plus what --help, validation and README use."""
    meta = {"help": help_text, "choices": choices, "minimum": minimum,
            "maximum": maximum, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every setting, with its default.  params.json and flags override it."""

    operation: str = _key(
        "search", "what to run", choices=OPERATIONS)
    img_dirs: list = _key(
        ["examples/images"], "folders of your collection (searched recursively)",
        path=True)
    input_dir: str = _key(
        "examples/queries", "folder (or single image) to search for", path=True)
    db_dir: str = _key(
        "db", "folder of the SQLite database", path=True)
    bk_dir: str = _key(
        "index", "folder of the index cache (rebuilt when missing or stale)",
        path=True)
    output_dir: str = _key(
        "results", "folder where result files are written", path=True)
    hash_method: str = _key(
        "phash", "perceptual hash (phash: best precision and recall measured, "
        "see README)", choices=HASH_METHODS)
    hash_size: int = _key(
        8, "hash side: 8 gives 64-bit hashes, 16 gives 256-bit",
        minimum=2, maximum=32)
    colorhash_binbits: int = _key(
        3, "bits per colour bin for colorhash (hash has 14 * binbits bits)",
        minimum=1, maximum=8)
    hash_mode: str = _key(
        "fast", "fast: reduced-size decoding, EXIF rotation, alpha and 16-bit "
        "handled; exact: plain ImageHash values, bit for bit",
        choices=HASH_MODES)
    match_orientations: bool = _key(
        True, "also find mirrored, flipped and 90/180/270-degree rotated "
        "copies (stores 7 more hashes per image; with matching verified, "
        "each such match is checked on the pixels)")
    matching: str = _key(
        "verified", "verified: matches that hashes alone cannot vouch for "
        "(another orientation, a region, a larger distance) are checked on "
        "the pixels with OpenCV keypoints and kept only if one picture is "
        "found in the other, which also says where; fast: hashes only",
        choices=MATCHINGS)
    centre_hashes: bool = _key(
        True, "also hash the central 90 % and 80 % of each picture and match "
        "on those too: finds cropped, slightly rotated, captioned and "
        "watermarked copies (stores 2 more hashes per image)")
    content_box: bool = _key(
        True, "also hash the picture found inside a screenshot, web post, "
        "slide, print frame or caption band (the largest photographic "
        "rectangle) and match it against whole pictures (2 more stored "
        "values per image)")
    region_windows: bool = _key(
        True, "also hash windows of each picture (90 %, 80 % and 60 % of "
        "each side, in steps of 5 %: 161 windows, 1,288 bytes per image) and "
        "match the whole of one picture against the windows of the other, at "
        "two thirds of the threshold: finds copies cropped by 5-25 % on any "
        "sides, and many cropped by 35-45 %")
    trim_borders: bool = _key(
        True, "cut uniform borders (letterboxing, frames, padding, caption "
        "bands) before hashing; fast mode only")
    distance_method: str = _key(
        "hamming", "distance between hashes (bits that differ)",
        choices=("hamming",))
    distance_threshold: int = _key(
        12, "largest distance that counts as a match (0 = identical hash)",
        minimum=0)
    adaptive_threshold: bool = _key(
        True, "compare pictures with little detail (dark frames, nearly blank "
        "pages) with a tighter threshold, down to half, since their hashes "
        "collide more")
    stop_on_first_match: bool = _key(
        False, "search: report only the nearest match of each query")
    grouping: str = _key(
        "representative", "find_duplicates: representative = every member "
        "within the threshold of the group's first image, the one near the "
        "most others; connected = chains of near pairs (can join different "
        "pictures)", choices=GROUPINGS)
    keep_rule: list = _key(
        ["most_pixels", "oldest", "camera_exif", "original_format", "unedited",
         "largest_file", "folder_order"],
        "which file of a group is kept, criteria in order "
        f"({', '.join(KEEP_CRITERIA)}; folder_order = order of img_dirs)")
    protected_dirs: list = _key(
        [], "folders whose files move never touches", path=True)
    quarantine_dir: str = _key(
        "quarantine", "move puts duplicates here, mirroring their paths; undo "
        "puts them back", path=True)
    not_duplicates: str = _key(
        "not_duplicates.csv", "CSV of path pairs that are different pictures "
        "(kept out of results; missing file = none)", path=True)
    engine: str = _key(
        "auto", "search engine: auto picks the fastest exact one",
        choices=ENGINES)
    workers: int = _key(
        0, "processes that hash images (0 = one per CPU core)", minimum=0)
    output_format: str = _key(
        "text", "what is printed on stdout", choices=FORMATS)
    html_report: bool = _key(
        True, "search and find_duplicates also write an HTML page with "
        "thumbnails to output_dir")
    extensions: list = _key(
        DEFAULT_EXTENSIONS, "file name endings to consider ([] = every file)")
    follow_symlinks: bool = _key(
        True, "follow symbolic links to files and folders")
    max_image_pixels: int = _key(
        178956970, "images with more pixels are skipped before decoding",
        minimum=1)
    max_decode_mb: int = _key(
        1024, "memory one image may take while it is decoded, per hashing "
        "process (MiB); larger ones are skipped before decoding, so a small "
        "file cannot take gigabytes", minimum=16)
    max_file_mb: int = _key(
        1024, "files larger than this many MiB are skipped", minimum=1)
    lock_timeout: float = _key(
        10.0, "seconds to wait for another run that is writing the database",
        minimum=0)
    review_port: int = _key(
        0, "review: port of the review page on 127.0.0.1 (0 = a free port "
        "chosen each run)", minimum=0, maximum=65535)
    review_idle_minutes: float = _key(
        30.0, "review: the server stops after this many minutes without a "
        "request from the page", minimum=0.05, maximum=10080)
    database_url: str = _key(
        "", "PostgreSQL database instead of SQLite: postgresql://user@host:5432/"
        "dbname or libpq's key=value form (password in PGPASSWORD, ~/.pgpass "
        "or a service file, never here); empty = SQLite in db_dir")
    # where each key came from (a params file or the command line), for errors
    sources: dict = field(default_factory=dict, init=False, repr=False,
                          compare=False)

    # ---- derived values (not keys) ----
    @property
    def spec(self) -> HashSpec:
        return HashSpec(self.hash_method, self.hash_size,
                        self.colorhash_binbits, self.hash_mode,
                        self.match_orientations, self.trim_borders,
                        self.centre_hashes, self.content_box,
                        self.region_windows)

    @property
    def db_path(self) -> str:
        return os.path.join(self.db_dir, DB_NAME)

    @property
    def db_name(self) -> str:
        """What reports show: the database URL, or the SQLite file."""
        return redact_url(self.database_url) if self.database_url else self.db_path

    @property
    def worker_count(self) -> int:
        return min(self.workers or os.cpu_count() or 1, most_workers())


def most_workers() -> int:
    """Hashing is CPU-bound: processes beyond twice the cores only add
    memory (each may hold an image being decoded) and switching."""
    return max(2, 2 * (os.cpu_count() or 1))


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.init}


@dataclass
class Run:
    """One invocation: the settings plus what only the command line gives."""

    config: Config
    queries: list
    quiet: bool = False
    open_report: bool = False
    notices: list = field(default_factory=list)  # said once the run starts
    verbose: bool = False
    yes: bool = False  # move without asking


def default_params_path() -> str:
    """params.json beside the script, or beside the executable when frozen."""
    if getattr(sys, "frozen", False):
        here = os.path.dirname(os.path.abspath(sys.executable))
    else:
        here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, PARAMS_NAME)


def default_params() -> dict:
    return {name: f.default if f.default is not dataclasses.MISSING
            else f.default_factory() for name, f in CONFIG_FIELDS.items()}


def desktop_params() -> dict:
    """The defaults a double-clicked executable writes beside itself: no
    example collection there, so the user's Pictures folder (a `photos`
    folder beside the executable when there is none: not the executable's own
    folder, which holds the quarantine), and find_duplicates, its main job."""
    pictures = os.path.join(os.path.expanduser("~"), "Pictures")
    return dict(default_params(), operation="find_duplicates",
                img_dirs=[pictures if os.path.isdir(pictures) else "photos"],
                input_dir="find")


def write_default_params(path: str, desktop: bool = False) -> None:
    params = desktop_params() if desktop else default_params()
    text = json.dumps(params, indent=2) + "\n"
    if params["img_dirs"] == ["photos"]:  # a folder to drop pictures into
        with contextlib.suppress(OSError):
            os.makedirs(os.path.join(os.path.dirname(path), "photos"))
    _atomic_write(path, lambda fh: fh.write(text), replace=False, sync=True)  # never


    # overwrite: a params.json that appeared meanwhile is the user's


def read_params(path: str) -> dict:
    """The JSON object in params.json, or a ConfigError that says why not."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror}).") from None
    try:
        text = data.decode("utf-8-sig")  # tolerate the BOM Notepad writes
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}). Save the file as UTF-8.") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Invalid \\escape"):
            raise ConfigError(_backslash_advice(path, text, exc)) from None
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}. Check quotes, commas and brackets there.") from None
    except RecursionError:
        raise ConfigError(f"{path}: brackets nested too deeply to be settings; "
                          f"params.json needs one object of keys and values "
                          f"(README.md lists them).") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a JSON object like {{\"img_dirs\": [\"photos\"]}}, "
            f"found a {_json_type(raw)}.")
    return raw


def _backslash_advice(path: str, text: str, exc) -> str:
    """A Windows path written with single backslashes, and the line fixed."""
    line = text.splitlines()[exc.lineno - 1].strip()
    # a lone backslash becomes two; one already doubled stays as it is
    fixed = re.sub(r"\\\\|\\", lambda m: "\\\\", line)
    return (f"{path}: line {exc.lineno}: a single backslash (\\) starts an "
            f"escape in JSON, so Windows paths need \\\\ or /. Write the "
            f"line as: {fixed}")


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object"


def _check_value(name: str, value, where: str):
    """Type-check one key; returns the value in its Python type."""
    f = CONFIG_FIELDS[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    expected = {"str": "a string", "int": "a whole number", "bool": "true or false",
                "float": "a number", "list": "a list of strings"}[kind]
    ok = {"str": isinstance(value, str),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "bool": isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "list": isinstance(value, list) and all(isinstance(v, str) for v in value)}
    if kind == "list" and isinstance(value, str):
        value, ok["list"] = [value], True  # one folder given as a plain string
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{_origin(name, where)} is {value}; expected "
                          f"{expected} (NaN and Infinity are not numbers "
                          f"here).")
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value, ok["int"] = int(value), True
    if not ok[kind]:
        shown_value = "" if name == "database_url" else \
            " " + json.dumps(value)[:60]  # it may hold a password
        raise ConfigError(f"{_origin(name, where)} must be {expected}, "
                          f"got {_json_type(value)}{shown_value}.")
    if kind in ("int", "float") and abs(value) > LARGEST_NUMBER:
        raise ConfigError(f"{_origin(name, where)} is {value:.3g}, far beyond "
                          f"any sensible value; README.md lists each key's "
                          f"range.")
    if kind in ("str", "list"):
        _check_backslashes(name, value, where)
    return float(value) if kind == "float" else value


# Larger numbers are mistakes (1e300 pixels, a timeout of 3e10 years) that
# would switch a guard off or overflow SQLite's 64-bit integers.
LARGEST_NUMBER = 2 ** 53


def _origin(name: str, where: str) -> str:
    """Who gave a key: the flag on the command line, else the params file."""
    if where == "command line":
        return f"command line: --{name.replace('_', '-')}"
    return f"{where}: key '{name}'"


def _check_backslashes(name: str, value, where: str) -> None:
    """JSON reads "C:\\temp" as C:, a tab, "emp": a path with a control
    character is an unescaped Windows path, never a real folder name."""
    if not CONFIG_FIELDS[name].metadata["path"] or where == "command line":
        return
    for text in [value] if isinstance(value, str) else value:
        if re.search(r"[\x00-\x1f]", text):
            raise ConfigError(
                f"{_origin(name, where)} is {json.dumps(text)}, which holds a "
                f"control character: in JSON a backslash starts an escape "
                f"(\\t is a tab). Write Windows paths with \\\\ or /, e.g. "
                f"{json.dumps(_as_written(text).replace(chr(92), '/'))}.")


def _as_written(text: str) -> str:
    """The path as the user typed it, before JSON turned \\t into a tab."""
    back = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\b": "\\b",
            "\f": "\\f"}
    return "".join(back.get(c, c) for c in text)


def _check_range(name: str, value, where: str) -> None:
    meta = CONFIG_FIELDS[name].metadata
    choices, lo, hi = meta["choices"], meta["minimum"], meta["maximum"]
    if choices and value not in choices:
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{_origin(name, where)} is '{value}', expected one "
                          f"of {', '.join(choices)}.{hint}")
    if lo is not None and value < lo or hi is not None and value > hi:
        span = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise ConfigError(f"{_origin(name, where)} is {value}, expected {span}.")


def config_from(raw: dict, params_path: str, overrides: dict) -> Config:
    """Defaults < params.json < command-line flags, checked as they merge."""
    base = os.path.dirname(os.path.abspath(params_path))
    values = {name: _resolve(name, value, base)  # default paths: beside params
              for name, value in default_params().items()}
    problems = []  # every mistake at once: one edit, not one run per typo
    for name, value in raw.items():
        if name not in CONFIG_FIELDS:
            near = difflib.get_close_matches(name, CONFIG_FIELDS, n=1)
            hint = f"did you mean '{near[0]}'?" if near else \
                "remove it (README.md lists every key)."
            problems.append(f"{params_path}: unknown key '{name}': {hint}")
            continue
        with _collected(problems):
            value = _check_value(name, value, params_path)
            _check_range(name, value, params_path)
            values[name] = _resolve(name, value, base)
    for name, value in overrides.items():
        with _collected(problems):
            value = _check_value(name, value, "command line")
            _check_range(name, value, "command line")
            values[name] = _resolve(name, value, os.getcwd())
    if problems:
        raise ConfigError("\n".join(problems))
    cfg = Config(**values)
    cfg.sources = {name: "command line" if name in overrides else params_path
                   for name in CONFIG_FIELDS}
    _check_hash_settings(cfg, params_path)
    _check_folder_roles(cfg)
    if cfg.database_url:  # an SQLite run never enters the PostgreSQL code
        check_database_url(cfg.database_url, cfg.sources["database_url"])
    return cfg


class _collected:
    """Add a ConfigError's message to `problems` and go on."""

    def __init__(self, problems: list):
        self.problems = problems

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, ConfigError):
            self.problems.append(str(exc))
            return True
        return False


def _resolve(name: str, value, base: str):
    """Paths in params.json are relative to its folder; flags to the cwd."""
    if not CONFIG_FIELDS[name].metadata["path"]:
        return value
    fix = lambda p: os.path.abspath(os.path.join(base, os.path.expanduser(p)))
    return [fix(p) for p in value] if isinstance(value, list) else fix(value)


def _check_hash_settings(cfg: Config, where: str) -> None:
    said = lambda name: _origin(name, cfg.sources.get(name, where))
    if cfg.hash_method.startswith("whash") and cfg.hash_size & (cfg.hash_size - 1):
        raise ConfigError(f"{said('hash_size')} is {cfg.hash_size}, but "
                          f"{cfg.hash_method} needs a power of 2 (2, 4, 8, 16, 32).")
    if cfg.distance_threshold > cfg.spec.bits:
        raise ConfigError(
            f"{said('distance_threshold')} is {cfg.distance_threshold}, but "
            f"{cfg.spec.describe()} hashes have only {cfg.spec.bits} bits.")
    if not cfg.img_dirs:
        raise ConfigError(f"{said('img_dirs')} is empty; list at least one "
                          f"folder of images.")
    bad = [c for c in cfg.keep_rule if c not in KEEP_CRITERIA]
    if bad or not cfg.keep_rule:
        raise ConfigError(f"{said('keep_rule')} has {bad or 'nothing'}; use "
                          f"criteria from {', '.join(KEEP_CRITERIA)}.")


def _check_folder_roles(cfg: Config) -> None:
    """The quarantine and the results are never part of the collection:
    quarantined files and thumbnails would be indexed, and moves or undos
    could reach them."""
    for name in ("quarantine_dir", "output_dir"):
        mine = os.path.normcase(os.path.realpath(getattr(cfg, name)))
        for root in cfg.img_dirs:
            other = os.path.normcase(os.path.realpath(root))
            how = "is" if mine == other else "is inside" if \
                mine.startswith(other.rstrip(os.sep) + os.sep) else "contains" \
                if other.startswith(mine.rstrip(os.sep) + os.sep) else None
            if how:
                raise ConfigError(
                    f"{_origin(name, cfg.sources.get(name, PARAMS_NAME))} "
                    f"({getattr(cfg, name)}) {how} the img_dirs folder {root}; "
                    f"give it a folder of its own outside your images, e.g. "
                    f"\"{os.path.basename(getattr(cfg, name)) or name}\" beside "
                    f"params.json.")


def check_folders(cfg: Config, names: Sequence[str],
                  absent_ok: Sequence[str] = ()) -> None:
    """The folders an operation reads from must exist and be folders; every
    one that does not is named in one message."""
    problems = []
    for name in names:
        where = _origin(name, cfg.sources.get(name, PARAMS_NAME))
        paths = cfg.img_dirs if name == "img_dirs" else [getattr(cfg, name)]
        for path in paths:
            if name == "input_dir" and os.path.isfile(path):
                continue  # a single query image is fine
            if not os.path.exists(path):
                if path in absent_ok:
                    continue
                problems.append(f"{where}: folder {path} does not exist. "
                                f"Create it or correct the path.")
            elif not os.path.isdir(path):
                problems.append(f"{where}: {path} is a file, not a folder.")
    for name in ("db_dir", "bk_dir", "output_dir"):
        path = getattr(cfg, name)
        where = _origin(name, cfg.sources.get(name, PARAMS_NAME))
        if os.path.exists(path) and not os.path.isdir(path):
            problems.append(f"{where}: {path} is a file, not a folder.")
    if problems:
        raise ConfigError("\n".join(problems))


# ============================================================================
# Hashing
# ============================================================================

def died_while_hashing(task: HashTask, exitcode: int | None) -> HashResult:
    """The result of a task whose worker died: the file is recorded as failed
    (update tries it again), the run goes on."""
    result = HashResult(task.path)
    with contextlib.suppress(OSError):
        st = os.stat(task.path)
        result.size, result.mtime_ns = st.st_size, st.st_mtime_ns
    how = f"killed by signal {-exitcode}" if exitcode and exitcode < 0 \
        else f"exit code {exitcode}"
    result.error = (f"the hashing process died while decoding this file "
                    f"({how}; the out-of-memory killer does this; see "
                    f"max_decode_mb)")
    return result


@functools.lru_cache(maxsize=None)  # asked for up to 10 hashes per image
def _hash_function(spec: HashSpec):
    import imagehash
    s = spec.size
    fast = spec.mode == "fast"
    scale = 8 * s if fast else None  # fixed scale: resize-proof
    return {
        "ahash": lambda im: imagehash.average_hash(im, s),
        "phash": (lambda im: phash_numpy(im, s)) if fast else
                 (lambda im: imagehash.phash(im, s)),
        "phash_simple": lambda im: imagehash.phash_simple(im, s),
        "dhash": lambda im: imagehash.dhash(im, s),
        "dhash_vertical": lambda im: imagehash.dhash_vertical(im, s),
        "whash": lambda im: imagehash.whash(im, s, image_scale=scale),
        "whash_db4": lambda im: imagehash.whash(im, s, image_scale=scale,
                                                mode="db4"),
        "colorhash": lambda im: imagehash.colorhash(im, spec.binbits),
    }[spec.method]


@functools.lru_cache(maxsize=None)
def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the n-point DCT-II matrix, scaled as
    scipy.fftpack.dct scales it (2 cos, no normalisation)."""
    i, j = np.arange(k)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * i * (2 * j + 1) / (2 * n))


def phash_numpy(im, size: int):
    """imagehash.phash with the DCT as two small matrix products.  Bit for
    bit the same on every photo of the public corpus (only the low
    frequencies are computed), and it spares each process the 0.4 s import
    of scipy.  Exact mode keeps calling imagehash itself."""
    import imagehash
    from PIL import Image
    side = 4 * size
    small = im.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    rows = _dct_rows(side, size)
    low = rows @ pixels @ rows.T
    return imagehash.ImageHash(low > np.median(low))


# ---- every whole-picture pHash of an image at once, bit for bit ----
#
# The default hash wants 10 Lanczos resizes of each image to 32x32 (8
# orientations, 2 centres).  Pillow spent 0.12 ms of CPU on each, mostly
# on its weights (sines), computed afresh on every call.  Its 8-bit resize
# is integer arithmetic: weights rounded to 22 fraction bits, one pass per
# axis, each rounded to 8 bits.  Here the same integer weights are read
# from Pillow once per size and the passes done as matrix products in
# float64, where integers below 2**53 are exact (these stay below 2**31):
# the pixels are Pillow's, bit for bit.  The weights are mirror images of
# themselves, so a flipped copy's resize is the resize flipped, and a
# turned copy's is the resize transposed when Pillow passes its axes in
# the matching order: 8 orientations from 1 or 2 resizes.  Which axis
# Pillow passes first depends on its version (13 starts with the height of
# tall pictures), so each process checks which rule its Pillow follows.

EXACT_SIDE = 1024  # longer sides are rare strips: hashed the plain way


@functools.lru_cache(maxsize=1)
def _one_blas_thread() -> None:
    """BLAS in one thread: a hashing process is one of a crew that fills
    the cores, and OpenBLAS's own threads spin and fight it (these
    products, in one process on 2 busy cores: 9 ms of wall, not 0.6)."""
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(1, user_api="blas")
    except Exception:  # absent or unable: still right, only slower when busy
        return


@functools.lru_cache(maxsize=256)  # photos share a few sizes
def _resize_weights(n: int, out: int) -> np.ndarray | None:
    """(out, n) weights of Pillow's 8-bit Lanczos resize of n pixels to
    `out`, as integers scaled by 2**22, rounded as Pillow rounds them;
    None if they are not their own mirror image.  Read from Pillow itself:
    its 32-bit resize uses the same weights unrounded, so an image holding
    2**22 on its diagonal, resized along one axis, holds each weight as the
    8-bit resize rounds it."""
    from PIL import Image
    if n == out:  # Pillow skips the pass: weights that change nothing
        return np.eye(n) * 2.0 ** 22
    probe = Image.fromarray(np.eye(n, dtype=np.int32) * 2 ** 22)  # mode I
    weights = np.asarray(probe.resize((out, n), Image.Resampling.LANCZOS),
                         dtype=np.float64).T
    return weights if np.array_equal(weights[::-1], weights[:, ::-1]) \
        else None


@functools.lru_cache(maxsize=256)
def _weight_bands(n: int, out: int, parts: int = 2) -> tuple | None:
    """_resize_weights(n, out) in `parts` bands: (outputs, the inputs they
    weigh, those weights transposed), each output's weights being a run of
    inputs (a Lanczos kernel); None as _resize_weights."""
    weights = _resize_weights(n, out)
    if weights is None:
        return None
    step, bands = -(-out // parts), []
    for start in range(0, out, step):
        rows = slice(start, min(start + step, out))
        used = np.flatnonzero(weights[rows].any(axis=0))
        cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else \
            slice(0, 0)
        bands.append((rows, cols, np.ascontiguousarray(weights[rows, cols].T)))
    return tuple(bands)


def _resize_pass(a: np.ndarray, bands: tuple, out: int) -> np.ndarray:
    """One pass of Pillow's 8-bit resize along the last axis of `a`:
    rounded half up, then clipped to 0..255, as Pillow does."""
    sums = np.empty((len(a), out))
    # each half of the outputs from only the inputs it weighs: the same
    # exact sums sooner (159 rows of 240 to 32: 72 us, not 314 for the
    # whole product; whole_hashes 0.37 -> 0.31 ms an image of the corpus)
    for rows, cols, weights in bands:
        sums[:, rows] = a[:, cols] @ weights
    return np.clip(np.floor((sums + 2.0 ** 21) / 2.0 ** 22), 0, 255)


def _exact_resize(a: np.ndarray, out: int, rows_first: bool):
    """Pillow's resize of grey pixels `a` to out x out, rows (x) first or
    columns first; None when the weights do not allow it."""
    wx, wy = _weight_bands(a.shape[1], out), _weight_bands(a.shape[0], out)
    if wx is None or wy is None:
        return None
    if rows_first:
        return _resize_pass(_resize_pass(a, wx, out).T, wy, out).T
    return _resize_pass(_resize_pass(a.T, wy, out).T, wx, out)


# Which axis Pillow passes first, by version: rows always up to 12; from 13
# the columns when the height shrinks and the width is under the mean of
# the two heights (found on noise of 3,000 shapes; tests check it).
PASS_ORDERS = (lambda h, w, out: True,
               lambda h, w, out: not (h > out and 2 * w < h + out))

# Small shapes (h, w) on both sides of each rule's edges, by the output side:
# checked once a process (3 ms; larger shapes cost a worker 0.5 s to start).
def _order_probes(out: int) -> tuple:
    return ((out + 3, out + 1), (out + 4, out + 2), (2 * out - 4, out + 13),
            (2 * out - 4, out + 15), (out // 2 + 4, out // 3 + 1),
            (out // 3 + 1, out // 2 + 4), (3 * out, out + 8), (out + 8, 3 * out))


def _noise(h: int, w: int) -> np.ndarray:
    """Grey noise, the same every time, without numpy.random (whose import
    costs a hashing process 30-50 ms)."""
    x = np.arange(h * w, dtype=np.uint64) + np.uint64(h * 65536 + w)
    x = x * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(40)
    return (x & np.uint64(255)).astype(np.uint8).reshape(h, w)


@functools.lru_cache(maxsize=None)
def _pass_order(out: int):
    """The rule of PASS_ORDERS this Pillow follows, checked on noise of
    _order_probes; None: none does, or this Pillow cannot be asked (every
    hash is then made the plain way)."""
    for rule in PASS_ORDERS:
        try:
            if all(_follows(rule, h, w, out) for h, w in _order_probes(out)):
                return rule
        except Exception:  # a Pillow that resizes 32-bit images otherwise
            return None
    return None


def _follows(rule, h: int, w: int, out: int) -> bool:
    """Whether Pillow resizes noise of h x w pixels as `rule` says."""
    from PIL import Image
    noise = _noise(h, w)
    want = Image.fromarray(noise).resize((out, out), Image.Resampling.LANCZOS)
    got = _exact_resize(noise.astype(np.float64), out, rule(h, w, out))
    return got is not None and np.array_equal(got, np.asarray(want))


# What a database records of the Pillow that hashed it: hashes made under
# another rule differ for tall pictures (Pillow 13: 7 of 76 phone-shaped
# photos' phash by 2 bits, 24 dhash by 1-6), so they are not mixed.
RESIZE_RULES = ("rows first (Pillow 12 and earlier)",
                "columns first for tall pictures (Pillow 13)")


def resize_rule(version: str | None = None) -> str:
    """The way this process's Pillow resizes, named; with `version`, the
    way that Pillow version does (databases that recorded only it)."""
    if version is not None:
        major = version.split(".")[0]
        return RESIZE_RULES[int(major) >= 13] if major.isdigit() else \
            f"Pillow {version}'s own"
    import PIL
    rule = _pass_order(32)
    return RESIZE_RULES[PASS_ORDERS.index(rule)] if rule is not None \
        else f"Pillow {PIL.__version__}'s own"


# Pillow's transposes of VARIANTS as numpy sees them: (axes swapped after
# left and right, top and bottom are reversed); ROTATE_90 turns anticlockwise.
_ORIENTED = ((False, True, False), (False, False, True), (True, True, False),
             (False, True, True), (True, False, True), (True, False, False),
             (True, True, True))


def _oriented_resizes(a: np.ndarray, out: int, count: int, rule) -> list:
    """The picture and its first `count` VARIANTS, each resized as Pillow
    resizes it, or None.  A turned copy's rows are our columns: Pillow
    passes them first when its rule says rows first for the turned shape."""
    h, w = a.shape
    orders = (rule(h, w, out), not rule(w, h, out))
    done = {}
    smalls = []
    for swap, flip_x, flip_y in ((False, False, False),) + _ORIENTED[:count]:
        rows_first = orders[swap]
        if rows_first not in done:
            done[rows_first] = _exact_resize(a, out, rows_first)
            if done[rows_first] is None:
                return None
        small = done[rows_first][::-1 if flip_y else 1, ::-1 if flip_x else 1]
        smalls.append(small.T if swap else small)
    return smalls


def _phash_stack(smalls: np.ndarray, size: int) -> list:
    """phash_numpy's hash of each of (n, 4 size, 4 size) resized pixels:
    the same matrix products slice by slice, the same median."""
    rows = _dct_rows(4 * size, size)
    low = np.matmul(np.matmul(rows, smalls), rows.T).reshape(len(smalls), -1)
    return _bits_to_ints(low > _row_medians(low)[:, None])


def _bits_to_ints(bits: np.ndarray) -> list:
    """Each row of booleans as the int hash_to_int makes of it (64 bits:
    one view of the packed bytes, 3 us for 161 rows, not 44)."""
    packed = np.packbits(bits, axis=1)
    if bits.shape[1] == 64:
        return packed.view(">u8").ravel().tolist()
    pad = -bits.shape[1] % 8
    return [int.from_bytes(row.tobytes(), "big") >> pad for row in packed]


def _row_medians(a: np.ndarray) -> np.ndarray:
    """np.median(a, axis=1), the same steps without its overhead (18 us a
    call, now 5): the middle value, or the two middle values summed, halved."""
    half = a.shape[1] // 2
    # sorted whole, the same middle values sooner than np.partition picks
    # them (numpy's vectorised sort: 161 rows of 64 in 26 us, not 57)
    middle = np.sort(a, axis=1)
    if a.shape[1] % 2:
        return middle[:, half]
    return (middle[:, half - 1] + middle[:, half]) / 2.0


def whole_hashes(im, spec: HashSpec, pixels: np.ndarray | None = None) -> tuple:
    """(hash, variants, centres) of a prepared picture (`pixels`: its grey
    pixels, when known)."""
    smalls = None
    if spec.method == "phash" and spec.mode == "fast" and im.mode == "L" \
            and max(im.size) <= EXACT_SIDE:
        smalls = _exact_smalls(im, spec, pixels)
    if smalls is None:
        return _plain_whole_hashes(im, spec)
    values = _phash_stack(np.ascontiguousarray(smalls), spec.size)
    n = 1 + spec.variant_count
    return values[0], tuple(values[1:n]), tuple(values[n:])


def _exact_smalls(im, spec: HashSpec,
                  pixels: np.ndarray | None = None) -> list | None:
    """The resized pixels whole_hashes hashes (as Pillow gives them), or
    None where that cannot be done exactly here."""
    side = 4 * spec.size
    rule = _pass_order(side)
    if rule is None:
        return None
    _one_blas_thread()
    a = np.asarray(im if pixels is None else pixels, dtype=np.float64)
    smalls = _oriented_resizes(a, side, spec.variant_count, rule)
    for keep in CENTRES[:spec.centre_count]:
        if smalls is None:
            return None
        left, top, right, bottom = centre_box(*im.size, keep)
        crop = a[top:bottom, left:right]
        smalls.append(_exact_resize(crop, side, rule(*crop.shape, side)))
        if smalls[-1] is None:
            return None
    return smalls


def _plain_whole_hashes(im, spec: HashSpec, pixels=None) -> tuple:
    """whole_hashes the straightforward way: one hash per copy (the
    reference the fast path must equal, and every other hash method);
    `pixels` is not read."""
    from PIL import Image
    return (_checked_hash(im, spec), tuple(
        _checked_hash(im.transpose(getattr(Image.Transpose, t)), spec)
        for t in VARIANTS[:spec.variant_count]), tuple(
        _checked_hash(centre_region(im, keep), spec)
        for keep in CENTRES[:spec.centre_count]))


def hash_to_int(image_hash) -> int:
    """An ImageHash as an int whose hex equals str(image_hash)."""
    bits = np.asarray(image_hash.hash, dtype=bool).ravel()
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value >> (-bits.size % 8)


def hash_hex(value: int, bits: int) -> str:
    return format(value, f"0{(bits + 3) // 4}x")


_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM",
           5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def turned_code(variant, window):
    """The match code of orientation `variant` of one picture against
    window `window` (0-based) of the other."""
    return TURNED_CODE + np.asarray(variant) * len(WINDOWS) + np.asarray(window)


@dataclass
class Hashed:
    """An image's hash, its variants' hashes, and its displayed size."""

    hash: int
    variants: tuple
    width: int
    height: int
    low_detail: bool = False
    detail: float = 4.0
    centres: tuple = ()
    traits: str = ""
    regions: tuple = ()  # content box hash and box word, then the windows


# What the keep rule reads besides size and time, taken from the file's header
# while it is open for hashing (no extra decode): its format, whether a camera
# wrote it (EXIF Make or Model; editors and converters often drop EXIF), and
# whether it is greyscale (a colour copy of the same picture is the original).
LOSSY_FORMATS = frozenset({"JPEG", "MPO", "HEIF", "AVIF", "WEBP"})
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "DIB", "TIFF", "PPM", "TGA", "QOI"})
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L",
                        "F"})


@dataclass
class Traits:
    format: str = "?"
    camera: bool = False
    grey: bool = False

    def text(self) -> str:
        return " ".join([self.format] + ["camera"] * self.camera +
                        ["grey"] * self.grey)

    @classmethod
    def parse(cls, text: str | None) -> Traits | None:
        if text is None:
            return None
        words = text.split()
        return cls(words[0] if words else "?", "camera" in words,
                   "grey" in words)

    @classmethod
    def of(cls, im, mode: str | None = None) -> Traits:
        """The traits of opened image `im`; `mode`: its mode before a draft."""
        try:
            exif = im.getexif()
            camera = bool(exif.get(0x010F) or exif.get(0x0110))
        except Exception:  # damaged EXIF is common and harmless
            camera = False
        return cls(im.format or "?", camera, (mode or im.mode) in GREY_MODES)


def hash_image_bytes(data: bytes, spec: HashSpec, max_pixels: int,
                     max_decode: int = 1024 * 2**20) -> Hashed:
    """Hashes of an encoded image, or SkipFile."""
    from PIL import Image
    im = Image.open(io.BytesIO(data))
    width, height, mode = *im.size, im.mode
    if width * height > max_pixels:
        raise SkipFile(f"too many pixels: {width}x{height} is over "
                       f"max_image_pixels ({max_pixels:,}); not decoded")
    if spec.mode == "fast":
        draft(im, spec)  # a JPEG is decoded at 1/2 to 1/8: it costs that
    check_decode_memory(im, max_decode)
    # only now: a PNG's EXIF may follow its pixels, so Pillow decodes them
    # all to look (the public corpus's refused 30000x30000 PNG: 2.5 s of CPU
    # and 874 MB, a quarter of its whole build)
    traits = Traits.of(im, mode).text()
    outer = grey = None
    if spec.mode == "fast":
        orientation = _exif_orientation(im)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        im, outer, grey = prepare(im, spec, orientation)
    else:
        im.load()
    value, variants, centres = whole_hashes(im, spec, grey)
    regions = ()
    if spec.content:
        regions += content_hashes(im, spec, value, outer, grey)
    if spec.windows:
        regions += window_hashes(im, spec, grey)
    probe = _detail_probe(im)
    return Hashed(value, variants, width, height, low_detail(probe),
                  detail_bits(probe), centres, traits, regions)


def content_hashes(im, spec: HashSpec, whole: int, outer=None,
                   pixels: np.ndarray | None = None) -> tuple:
    """(hash of the content box, the box packed as a word); the whole
    picture's hash and FULL_BOX_WORD when the box is the whole picture.
    `outer` is where `im` lies in the displayed picture (trimmed borders);
    `pixels`: its grey pixels, when known."""
    w, h = im.size
    factor = max(1, max(w, h) // CONTENT_SIDE)  # the box needs no more
    if factor > 1 or pixels is None:
        grey = im if im.mode == "L" else im.convert("L")
        pixels = np.asarray(grey.reduce(factor) if factor > 1 else grey)
    l, t, r, b = (min(v * factor, side) for v, side in
                  zip(content_box(pixels), (w, h, w, h)))
    if (l, t, r, b) == (0, 0, w, h) or (r - l) * (b - t) > CONTENT_MOST * w * h:
        return whole, FULL_BOX_WORD
    ol, ot, ow, oh = outer or (0, 0, w, h)
    box = ((ol + l) / ow, (ot + t) / oh, (ol + r) / ow, (ot + b) / oh)
    return _checked_hash(im.crop((l, t, r, b)), spec), pack_box(box)


CONTENT_MOST = 0.9  # a box keeping more of the picture adds nothing
CONTENT_SIDE = 160  # pixels on the long side the box is looked for at
FULL_EDGE = 0.9  # an edge across this share of a line runs across the page


# ---- the content box: the picture inside a screenshot, post, slide or frame
#
# Pictures placed on a page (a phone screenshot, a web post, a slide, a
# print frame, a caption band) sit on lines that are not photographic: a
# background colour covers most of them (bars, text lines, frames, bands)
# or they are smooth (gradients, shadows).  From each side, we walk over
# such lines (a few busy ones, text, are allowed in between) and cut at the
# last long straight edge among them: the picture's border.  No edge, no
# cut: a photo's own smooth sky has no straight border, so it stays.
# Rows first, then columns within the rows kept, three times.  Measured on
# the tough corpus: the box's hash is within 12 bits of the original for
# 61-79 % of screenshots, posts, print frames and caption bands (0-12 % for
# the whole picture), and it differs from the whole for 5 of 76 originals.

def content_box(a: np.ndarray, passes: int = 3, most: float = 0.75) -> tuple:
    """(left, top, right, bottom) pixels of the photographic rectangle of a
    grey image, or the whole image."""
    a = a.astype(np.int16)
    h, w = a.shape
    t, b, l, r = 0, h, 0, w
    span = (0, w)
    for _ in range(passes):
        t, b = _cut_pair(a[:, l:r], most)
        if b - t < 0.15 * h:
            return (0, 0, w, h)
        l, r = _cut_pair(a[t:b].T, most)
        if r - l < 0.15 * w:
            return (0, 0, w, h)
        if (l, r) == (0, w) or (l, r) == span:  # rows would not change
            break
        span = (l, r)
    return (l, t, r, b)


def _cut_pair(a: np.ndarray, most: float) -> tuple:
    """(first, end) rows of `a` kept by _side_cut from both ends.  When the
    two cuts cross (a smooth picture, fog or sky, let one walk run through
    it to the far border), each side is walked again only up to where the
    other leaves the least picture, and the result holding more
    photographic lines is kept."""
    n, least = len(a), max(1, int(0.15 * len(a)))
    plain = _plain_lines(a)
    t = _side_cut(a, plain, most)
    b = _side_cut(a[::-1], plain[::-1], most)
    if n - b - t >= least:
        return t, n - b
    options = [(_side_cut(a, plain, most, n - b - least), n - b),
               (t, n - _side_cut(a[::-1], plain[::-1], most, n - t - least))]
    # the option holding more photographic lines: the other one is page
    return max(options, key=lambda o: (o[1] - o[0] >= least,
                                       int((~plain[o[0]:o[1]]).sum()),
                                       o[1] - o[0]))


def _plain_lines(a: np.ndarray) -> np.ndarray:
    """Rows that are not photographic: half or more of the row within 12
    grey levels (a background colour: three adjacent bins of 4 levels), or
    90 % of it smooth (steps of 3 levels or less: gradients, shadows)."""
    m = a.shape[1]
    half = -(-m // 2)
    # the fullest 3 bins start at some pixel's bin: in each sorted row, do
    # any `half` pixels in a row span 2 bins or less (a histogram of each
    # row by np.bincount took 3x as long; with _edge_runs' 4 calls,
    # content_box takes 0.38 ms an image of the public corpora, not 0.56)
    bins = np.sort(a >> 2, axis=1)
    background = (bins[:, half - 1:] - bins[:, :m - half + 1] <= 2).any(axis=1)
    smooth = np.count_nonzero(np.abs(a[:, 1:] - a[:, :-1]) <= 3, axis=1) / \
        max(m - 1, 1) >= 0.9
    return background | smooth


def _edge_runs(a: np.ndarray, step: int = 8) -> np.ndarray:
    """For each row y: the longest run of pixels where rows y-1 and y+1
    differ by `step` or more (a border blurred over two rows), as a share
    of the row."""
    pad = np.vstack([a[:1], a, a[-1:]])
    edge = np.abs(pad[2:] - pad[:-2]) >= step
    # a run's length at each pixel: its 1-based place less the place of the
    # last pixel before it that is no edge (4 numpy calls, not 10)
    place = np.arange(1, edge.shape[1] + 1)
    gap = np.maximum.accumulate(np.where(edge, 0, place), axis=1)
    return (place - gap).max(axis=1) / edge.shape[1]


def _side_cut(a: np.ndarray, plain: np.ndarray, most: float,
              stop: int | None = None, need: float = 0.5) -> int:
    """Rows to cut from the start of `a`: after the last long straight
    edge (half the row or more) inside the leading run of plain rows (which
    ends by `stop` when given)."""
    # a line of text is a few % of the line length high (not of the count
    # of lines: a tall screenshot would let a whole picture band through)
    limit, allowed = int(len(a) * most), max(2, int(0.04 * a.shape[1]))
    if stop is not None:
        limit = max(0, min(limit, stop))
    run = gap = 0
    for y in range(limit):
        if plain[y]:
            run, gap = y + 1, 0
        else:
            gap += 1
            if gap > allowed:  # more than a line of text: the picture
                break
    if run < 2:
        return 0
    stop = min(run + 2, len(a) - 1)
    runs = _edge_runs(a[:stop + 1])[1:stop]  # runs[i]: the edge at row i + 1
    # the last edge across (nearly) the whole line, else the last long one:
    # a border across the page outranks the edges inside the picture
    strong = np.flatnonzero(runs >= FULL_EDGE)
    if not len(strong):
        strong = np.flatnonzero(runs >= need)
    if len(strong):
        return int(strong[-1]) + 2
    # no contrast (a picture as bright as the page): a straight start of
    # texture will do, where quiet page meets a textured picture, at the
    # end of a stretch of plain rows (the last such end first)
    ends = np.flatnonzero(plain[:run] & ~plain[1:run + 1]) + 1
    for at in ends[::-1].tolist():
        if _texture_step(a, at) >= need:
            return at
    return 0


def _texture_step(a: np.ndarray, at: int, busy: int = 6) -> float:
    """Share of the columns that are quiet (steps under `busy` levels) in
    the 3 rows before row `at` and textured in one of the 3 from it: a
    straight line where texture starts.  A photo's own smooth sky ends in
    a ragged line (trees, hills), which few columns share."""
    if at < 3 or at + 3 > len(a):
        return 0.0
    steps = np.abs(np.diff(a[at - 3:at + 3], axis=1)) >= busy
    return float((~steps[:3].any(axis=0) & steps[3:].any(axis=0)).mean())


# ---- region windows: every window's pHash from two matrix products ----

def window_hashes(im, spec: HashSpec, pixels: np.ndarray | None = None) -> tuple:
    """The hashes of WINDOWS, in order (`pixels`: the grey pixels of `im`,
    when known)."""
    if spec.method == "phash" and spec.mode == "fast":
        if pixels is None:
            pixels = np.asarray(im if im.mode == "L" else im.convert("L"))
        return _phash_windows(pixels.astype(np.float32), spec.size)
    w, h = im.size
    return tuple(_checked_hash(im.crop((round(x0 * w), round(y0 * h),
                                        max(round(x0 * w) + 1, round(x1 * w)),
                                        max(round(y0 * h) + 1, round(y1 * h)))),
                               spec) for (x0, x1), (y0, y1) in WINDOWS)


def _phash_windows(a: np.ndarray, size: int) -> tuple:
    """pHash of every window at once.  A window's pHash is the low DCT of
    its Lanczos resize, D R_y A R_x' D': both factors depend on one axis
    only, so stacking them for the spans of each axis gives every window
    of a family (wide spans by wide spans, narrow by narrow) from two
    products of about a million multiplications (1.0 ms for the 161
    windows of a 1 MP photo, against 0.1 ms per window by crop and
    resize).  The weights are Pillow's Lanczos weights in floating point
    (Pillow rounds to 8 bits after each pass): a window differs from the
    plain phash of its crop by 0-2 bits."""
    ys = _span_matrix(a.shape[0], size)
    xs = _span_matrix(a.shape[1], size)
    # BLAS in one thread (threads of its own fight the other workers), in
    # float32: 0.46 ms an image of the public corpora, against 0.69 in
    # float64 and 2.5 for einsum's own loops in float64; rounding sets the
    # bits only where middle values (nearly) tie: 25 of the 472,374 window
    # hashes of the two public corpora differ from einsum's (344 bits)
    _one_blas_thread()
    rows = ys @ a
    out = []
    for first, spans in ((0, WIDE_SPANS), (len(WIDE_SPANS), NARROW_SPANS)):
        at = slice(first * size, (first + len(spans)) * size)
        low = rows[at] @ xs[at].T
        k = len(spans)
        blocks = low.reshape(k, size, k, size).transpose(0, 2, 1, 3).reshape(
            k * k, size * size)
        out.append(blocks[1:] if first == 0 else blocks)  # less the whole
    blocks = np.concatenate(out)  # in the order of WINDOWS
    # _row_medians: np.median's steps, without importing numpy.ma (30-50
    # ms a hashing process) or its overhead
    return tuple(_bits_to_ints(blocks > _row_medians(blocks)[:, None]))


@functools.lru_cache(maxsize=64)  # photos share a few shapes
def _span_matrix(n: int, size: int, dtype=np.float32) -> np.ndarray:
    """(spans * size, n): for each span of WINDOW_SPANS, the low DCT rows
    times the Lanczos resize of that span of n pixels to 4 * size."""
    out = np.zeros((len(WINDOW_SPANS) * size, n))
    for k, (f0, f1) in enumerate(WINDOW_SPANS):
        start = round(f0 * n)
        stop = max(start + 1, round(f1 * n))
        out[k * size:(k + 1) * size, start:stop] = _span_block(stop - start,
                                                               size)
    return out.astype(dtype)


# A span's length recurs across sides (80 % of 150 is 90 % of 133): its block
# is made once.  On the public corpus (149 sides) _span_matrix missed its
# cache on 16 % of images at 1.2 ms each, mostly in np.sinc.
@functools.lru_cache(maxsize=1024)
def _span_block(length: int, size: int) -> np.ndarray:
    """(size, length): the low DCT rows times the Lanczos resize of
    `length` pixels to 4 * size."""
    return _dct_rows(4 * size, size) @ _lanczos_matrix(length, 4 * size)


def _lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of Pillow's Lanczos resize (support 3,
    stretched when shrinking), normalised, in floating point."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 3.0 * stretch
    centre = (np.arange(out_size)[:, None] + 0.5) * scale
    j = np.arange(in_size)[None, :]
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    x = (j - centre + 0.5) / stretch
    w = np.sinc(x) * np.sinc(x / 3) * ((j >= first) & (j < last) & (np.abs(x) < 3))
    total = w.sum(axis=1, keepdims=True)
    return w / np.where(total == 0, 1.0, total)


# Peak bytes per pixel while an image is decoded and flattened to 8 bits:
# Pillow keeps 1 byte for 1, L and P and 4 for RGB (padded) and the rest,
# and to_8bit's copies come on top (P to RGB; transparency composited over
# white in RGBA; 16-bit and float greys scaled through float64).  Measured
# with ru_maxrss on 24 MP images, Pillow 13 (README, limits): RGB PNG 3.9,
# RGBA PNG 15.3, GIF 4.5, 16-bit grey PNG 25, RGB WebP 15.4, RGBA WebP 23.
PEAK_BYTES = {"1": 1, "L": 1, "P": 5, "RGB": 4, "RGBX": 4, "CMYK": 8,
              "YCbCr": 8, "LAB": 8, "HSV": 8, "RGBA": 16, "RGBa": 16,
              "LA": 16, "La": 16, "PA": 16, "I;16": 26, "I;16L": 26,
              "I;16B": 26, "I;16N": 26, "I": 28, "F": 28}
# libwebp decodes into a buffer of its own, which Pillow then copies.
FORMAT_EXTRA_BYTES = {"WEBP": 12}


def decode_bytes(im) -> int:
    """About the most memory decoding `im` and flattening it will take,
    from its header (after any draft), before a byte is decoded."""
    per = PEAK_BYTES.get(im.mode, 28)
    if im.mode == "P" and "transparency" in im.info:
        per = PEAK_BYTES["RGBA"]
    per += FORMAT_EXTRA_BYTES.get(im.format, 0)
    return im.size[0] * im.size[1] * per


def check_decode_memory(im, budget: int) -> None:
    """SkipFile when decoding would take more than `budget` bytes: a small
    file (a 38-byte WebP of 16383x10920 pixels) must not take gigabytes."""
    need = decode_bytes(im)
    if need > budget:
        raise SkipFile(
            f"decoding would take about {need / 2**20:,.0f} MiB "
            f"({im.size[0]}x{im.size[1]} {im.format or ''} {im.mode}), over "
            f"max_decode_mb ({budget // 2**20:,}); not decoded")


def draft(im, spec: HashSpec) -> None:
    """Let a JPEG decode at the smallest scale (1/2, 1/4, 1/8) that is still
    as large as the hash needs: other formats decode only at full size."""
    if im.format == "JPEG":
        im.draft("L" if spec.method != "colorhash" else "RGB",
                 (spec.work_side, spec.work_side))


def centre_region(im, keep: float):
    """The centred box holding `keep` of the width and of the height."""
    return im.crop(centre_box(*im.size, keep))


def centre_box(w: int, h: int, keep: float) -> tuple:
    """(left, top, right, bottom) of centre_region."""
    left, top = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
    return (left, top, max(left + 1, w - left), max(top + 1, h - top))


def _detail_probe(im):
    """A small grey copy for the detail scores (exact mode has full size)."""
    factor = min(im.size) // 128
    return _grey(im.reduce(factor) if factor >= 2 else im)


def _grey(im):
    """`im` in mode L: itself if it is (convert would copy it)."""
    return im if im.mode == "L" else im.convert("L")


def detail_bits(im) -> float:
    """How much a picture has to say: the entropy, in bits (0 to 4), of the
    16-level histogram of a 32x32 grey thumbnail.  Photos score about 3.3,
    dark frames with one bright blob about 1.3: their hashes look alike
    even when the pictures differ, so they get a tighter threshold."""
    from PIL import Image
    a = np.asarray(_grey(im).resize((32, 32), Image.BOX))
    p = np.bincount(a.ravel() // 16, minlength=16) / a.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def pair_threshold(radius: int, detail_a, detail_b):
    """The threshold for one pair when adaptive_threshold is on: full at 2
    bits of detail or more, down to half at 1.25 bits or less."""
    least = np.minimum(detail_a, detail_b)
    scale = np.clip((least - DETAIL_LOW) / (DETAIL_FULL - DETAIL_LOW), 0.5, 1.0)
    return np.floor(radius * scale).astype(np.int64)


DETAIL_LOW, DETAIL_FULL = 0.5, 2.0  # measured on the public corpus (README)

# A match through another orientation counts its distance double (so it must
# lie within half the threshold): eight orientations tried make a chance
# match eight times likelier.
VARIANT_WEIGHT = 2


def variant_radius(radius) -> int:
    return radius // VARIANT_WEIGHT


# A window match counts its distance 1.5 times (it must lie within two
# thirds of the threshold, 8 bits at 12): each picture is tried against 80
# windows of the other, and a crop's nearest window is within 8 bits for
# 91-99 % of 12-25 % crops (WINDOW_SPANS), within 6 bits for 70-95 %.
# Unrelated pictures of the tough corpus (whole of one against the windows
# of the other, before verification): 1.9 per 1,000 pairs within 6 bits,
# 3.4 within 8, 6.1 within 10.
WINDOW_WEIGHT = 1.5


def code_weight(code: int) -> float:
    """What a distance counts for a match through match `code`:
    VARIANT_WEIGHT for another orientation, WINDOW_WEIGHT for a window, else
    1 (as stored, -1, a centre to the same centre, a content box)."""
    if 0 <= code < len(VARIANTS):
        return VARIANT_WEIGHT
    return WINDOW_WEIGHT if code >= WINDOW_CODE else 1


def window_weight(detail_a, detail_b):
    """What a window match's distance counts between pictures of these
    details: WINDOW_WEIGHT from WINDOW_DETAIL bits of detail up, growing to
    4/3 of it at DETAIL_FULL (8 bits allowed at threshold 12, down to 6),
    and never below DETAIL_FULL (inf): there hashes collide
    (pair_threshold), and 161 windows per picture multiply the collisions.
    On the tough corpus 29 of 35 false window pairs joined dark telescope
    frames (detail 0.2-1.6); on the standard corpus the false ones left
    were pictures of 2.1-2.5 bits, 8 bits apart."""
    least = np.minimum(detail_a, detail_b)
    scale = np.clip(0.75 + 0.25 * (least - DETAIL_FULL) /
                    (WINDOW_DETAIL - DETAIL_FULL), 0.75, 1.0)
    return np.where(least >= DETAIL_FULL, WINDOW_WEIGHT / scale, np.inf)


def window_effective(bits, detail_a, detail_b):
    """bits * window_weight, inf where windows do not count (0 * inf is no
    number)."""
    weight = window_weight(detail_a, detail_b)
    return np.where(np.isinf(weight), np.inf,
                    np.asarray(bits) * np.where(np.isinf(weight), 0, weight))


WINDOW_DETAIL = 3.0  # bits of detail from which windows reach 2/3 of the threshold


def code_weights(codes: np.ndarray) -> np.ndarray:
    """code_weight of each of an array of match codes."""
    codes = np.asarray(codes)
    return np.where((codes >= 0) & (codes < len(VARIANTS)), VARIANT_WEIGHT,
                    np.where(codes >= WINDOW_CODE, WINDOW_WEIGHT, 1.0))


def code_radius(radius: int, code: int) -> int:
    """The Hamming radius that a match through match `code` may reach."""
    return int(radius / code_weight(code))


def low_detail(im) -> bool:
    """Blank, nearly uniform or tiny pictures: their hashes are noise and
    collide with every other flat picture, so they are not compared."""
    from PIL import Image
    if min(im.size) < 8:
        return True
    small = np.asarray(_grey(im).resize((16, 16), Image.BOX),
                       dtype=np.int16)
    return int(small.max()) - int(small.min()) < LOW_DETAIL_RANGE


LOW_DETAIL_RANGE = 6  # grey levels between the darkest and lightest 16x16 cell


def _checked_hash(im, spec: HashSpec) -> int:
    value = _hash_function(spec)(im)
    if value.hash.size != spec.bits:  # whash_db4 in exact mode on small images
        raise SkipFile(f"{spec.method} gives a {value.hash.size}-bit hash for "
                       f"this image, not {spec.bits}; use hash_mode fast")
    return hash_to_int(value)


def pack_hashes(values: Sequence[int], bits: int) -> bytes:
    """Several hashes as one BLOB of big-endian 64-bit words."""
    if bits <= 64:  # one numpy call, not 172 to_bytes (24 us an image, now 7)
        return np.array(values, dtype=">u8").tobytes()
    size = 8 * ((bits + 63) // 64)
    return b"".join(v.to_bytes(size, "big") for v in values)


def _exif_orientation(im) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # damaged EXIF is common and harmless: ignore it
        return 1


def prepare_image(im, spec: HashSpec, orientation: int = 1,
                  with_box: bool = False):
    """Decode small, flatten to 8-bit L or RGB, apply the EXIF rotation.
    with_box: also (left, top, width, height) of the kept part within the
    untrimmed picture, in its pixels."""
    im, outer, _ = prepare(im, spec, orientation)
    return (im, outer) if with_box else im


class Prepared(NamedTuple):
    """A picture ready to hash: the image, where it lies in the untrimmed
    picture (left, top, width, height) and its grey pixels (None in colour:
    read once, not by each hash: 3 copies an image fewer)."""

    im: object
    outer: tuple
    grey: np.ndarray | None


def prepare(im, spec: HashSpec, orientation: int = 1) -> Prepared:
    """prepare_image's picture, where it lies, and its grey pixels."""
    from PIL import Image
    grey = spec.method != "colorhash"
    side = spec.work_side
    draft(im, spec)
    im.seek(0)  # first frame of an animation
    im = to_8bit(im)
    factor = min(im.size) // side
    if factor >= 2:
        im = im.reduce(factor)
    if orientation in _ORIENT:
        im = im.transpose(getattr(Image.Transpose, _ORIENT[orientation]))
    im = im.convert("L") if grey else im.convert("RGB")
    w, h = im.size
    pixels = np.asarray(im) if grey else None
    box = (0, 0, w, h)
    if spec.trims:
        box = _trim_box(np.asarray(im.convert("L")) if pixels is None
                        else pixels)
    left, top, right, bottom = box
    if box != (0, 0, w, h):
        im = im.crop(box)
        pixels = None if pixels is None else pixels[top:bottom, left:right]
    return Prepared(im, (left, top, w, h), pixels)


def trim_borders(im, tolerance: int = 12, most: float = 0.4):
    """Cut uniform margins (letterboxing, frames, padding) off each side.

    A line belongs to a margin when every pixel is within `tolerance` of the
    outermost line's median; at most `most` of a side goes, and nothing is
    cut when less than 30 % of the picture would remain."""
    box = trim_box(im, most)
    return im if box == (0, 0, *im.size) else im.crop(box)


def trim_box(im, most: float = 0.4) -> tuple:
    """(left, top, right, bottom) that trim_borders keeps."""
    return _trim_box(np.asarray(_grey(im)), most)


def _trim_box(a: np.ndarray, most: float = 0.4) -> tuple:
    """trim_box of grey pixels `a`."""
    h, w = a.shape
    top = _margin(a, most)
    bottom = _margin(a[::-1], most)
    left = _margin(a.T, most)
    right = _margin(a.T[::-1], most)
    if h - top - bottom < 0.3 * h or w - left - right < 0.3 * w:
        return (0, 0, w, h)
    return (left, top, w - right, h - bottom)


def _margin(a: np.ndarray, most: float, tolerance: int = 12) -> int:
    """How many leading rows of `a` are uniform in the colour of the first,
    plus one: after reduction the border's edge rarely falls on a pixel
    edge, and the row where it blends into the picture must go too."""
    limit = int(len(a) * most)
    a = a[:max(limit, 2)]  # a longer run would be cut to `limit` anyway
    first = np.sort(a[0])  # its median, as np.median gives it, 4x sooner
    ref = (int(first[(len(first) - 1) // 2]) + int(first[len(first) // 2])) / 2
    if len(a) < 2 or not _uniform_rows(a[:2], ref, tolerance).all():
        return 0  # a photo's edge, no run: trim_box 0.105 -> 0.086 ms an image
    uniform = _uniform_rows(a, ref, tolerance)
    run = int(np.argmin(uniform)) if not uniform.all() else len(a)
    return min(run + 1, limit) if run >= 2 else 0


def _uniform_rows(a: np.ndarray, ref: float, tolerance: int) -> np.ndarray:
    """Which rows of `a` lie within `tolerance` of `ref`, every pixel."""
    return (a.max(axis=1) <= ref + tolerance) & (a.min(axis=1) >= ref - tolerance)


def to_8bit(im):
    """L or RGB with 8 bits per channel: transparency over white, 16 bits scaled."""
    from PIL import Image
    mode = im.mode
    if mode in ("L", "RGB"):
        im.load()
        return im
    if mode == "P" and "transparency" not in im.info or mode == "1":
        return im.convert("RGB" if mode == "P" else "L")
    if mode in ("P", "PA", "RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(im)
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _scale_to_8bit(im):
    """16-bit, 32-bit and float greys to 0..255 by scaling, never clipping."""
    from PIL import Image
    a = np.asarray(im).astype(np.float64)
    lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
    if im.mode.startswith("I;16") or 255 < hi <= 65535 and lo >= 0:
        a = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


@dataclass
class HashTask:
    """A file to hash; known digests let a moved or copied file skip decoding."""

    path: str
    known: frozenset = frozenset()

    def run(self, job: HashJob) -> HashResult:
        return hash_file(self, job)

    def died(self, exitcode: int | None) -> HashResult:
        return died_while_hashing(self, exitcode)


@dataclass
class HashResult(ImageRow):
    """A file as hashing found it: the row to store.  reused: its bytes are
    a stored file's, whose hashes it takes (not decoded again)."""

    reused: bool = False


@dataclass(frozen=True)
class HashJob:
    """What every worker needs, sent once when it starts."""

    spec: HashSpec
    max_pixels: int
    max_bytes: int
    max_decode: int = 1024 * 2**20


_SPECIAL_FILES = {stat.S_IFIFO: "a FIFO (named pipe)",
                  stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket",
                  stat.S_IFDIR: "a folder"}


def special_file(mode: int) -> str | None:
    """What a file that is not a regular file is, for the skip reason."""
    if stat.S_ISREG(mode):
        return None
    return "not a regular file: " + _SPECIAL_FILES.get(stat.S_IFMT(mode),
                                                        "a special file")


def open_regular(path: str):
    """`path` opened for reading if it is a regular file, else SkipFile.
    Checked before opening (a tape rewinds on open) and after (it may have
    been swapped); O_NONBLOCK: opening a FIFO never waits for a writer."""
    why = special_file(os.stat(path).st_mode)
    if why:
        raise SkipFile(why)
    fd = os.open(path, os.O_RDONLY | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    why = special_file(os.fstat(fd).st_mode)
    if why:
        os.close(fd)
        raise SkipFile(why)
    with contextlib.suppress(OSError, AttributeError):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def hash_file(task: HashTask, job: HashJob) -> HashResult:
    """Read a file once, digest its bytes, decode from the same buffer."""
    result = HashResult(task.path)
    try:
        with open_regular(task.path) as fh:
            st = os.fstat(fh.fileno())
            result.size, result.mtime_ns = st.st_size, st.st_mtime_ns
            too_big = SkipFile(f"file is over max_file_mb "
                               f"({job.max_bytes // 2**20} MiB)")
            if st.st_size > job.max_bytes:
                raise too_big  # not read at all
            data = fh.read(job.max_bytes + 1)  # and if it grew meanwhile
            if len(data) > job.max_bytes:
                raise too_big
        # sha256 has CPU instructions on current x86 and ARM: 3x blake2b there
        result.digest = hashlib.sha256(data).digest()[:16]
        if result.digest in task.known:
            result.reused = True
            return result
        if not data:
            raise SkipFile("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF, palette, pywt border notes
            hashed = hash_image_bytes(data, job.spec, job.max_pixels,
                                      job.max_decode)
        result.hash, result.width, result.height = \
            hashed.hash, hashed.width, hashed.height
        result.extra = pack_hashes(
            hashed.variants + hashed.centres + hashed.regions, job.spec.bits)
        result.low_detail, result.detail = hashed.low_detail, hashed.detail
        result.traits = hashed.traits
    except SkipFile as exc:
        result.error = str(exc)
    except OSError as exc:
        result.error = describe_os_error(exc)
    except MemoryError:
        result.error = "out of memory while decoding"
    except Exception as exc:  # any decoder failure: record it, go on
        result.error = describe_image_error(exc, task.path)
    return result


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file vanished or is a broken link"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno is None:  # Pillow's own OSErrors carry only a message
        return describe_image_error(exc)
    return f"cannot read: {exc.strerror or exc}"


# Formats we recognise by name but do not decode: listed as skipped, not read.
NOT_DECODED = dict.fromkeys((".svg", ".svgz"),
                            "SVG drawings are not supported (vector, no pixels)")
NOT_DECODED.update(dict.fromkeys(
    (".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".dng", ".pef",
     ".srw", ".raw"), "camera RAW files are not supported; hash their JPEGs"))
UNSUPPORTED = dict(NOT_DECODED, **dict.fromkeys(
    (".heic", ".heif"), "HEIC/HEIF needs pillow-heif: pip install pillow-heif"))


def describe_image_error(exc: Exception, path: str = "") -> str:
    from PIL import Image, UnidentifiedImageError
    if isinstance(exc, UnidentifiedImageError):
        ext = os.path.splitext(path)[1].lower()
        return UNSUPPORTED.get(
            ext, "not an image Pillow can read (unknown format or damaged)")
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels: {exc}"
    text = str(exc).split("\n")[0][:200]
    if "truncated" in text or "broken data stream" in text:
        return f"truncated or damaged image ({text})"
    return f"cannot decode: {type(exc).__name__}: {text}"


# ============================================================================
# Workers
# ============================================================================
#
# Hashing (and verification) runs in worker processes, each with its own pipe
# and a few tasks at a time.  A worker that dies fails only the task it was on
# (recorded; update tries the file again); its queued tasks go to the others
# and a new worker takes its place.

_JOB: HashJob | None = None


def _worker_init(job: HashJob) -> None:
    global _JOB
    _JOB = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _setup_decoders()


def _worker_main(conn, job: HashJob) -> None:
    """A worker: run each task of each chunk received (hash a file, or
    verify a pair: task.run), one result sent per task as soon as it is done
    (so the parent knows which task a worker that dies was on); None or a
    closed pipe ends it."""
    _worker_init(job)
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for task in chunk:
            conn.send(task.run(job))


def _setup_decoders() -> None:
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None  # we refuse by our own limit, before decoding
    try:
        import pillow_heif
        pillow_heif.register_heif_opener()
    except ImportError:
        pass


# Workers are forked on Linux while this process has no other thread: one is
# ready in milliseconds and shares the modules already imported.  Elsewhere
# they are spawned (macOS and Windows, where fork is unsafe or absent).  The
# environment variable picks one, so tests run the Windows path on Linux.
START_METHOD_ENV = "REVERSE_SEARCH_START_METHOD"


def start_method() -> str:
    import threading
    chosen = os.environ.get(START_METHOD_ENV, "")
    if chosen in multiprocessing.get_all_start_methods():
        return chosen
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _start_worker(ctx, job: HashJob) -> Worker:
    """A worker that ignores Ctrl-C from birth: an ignored signal stays
    ignored across fork and exec, so one pressed while it starts prints
    nothing."""
    import gc
    import threading
    here, there = ctx.Pipe()
    process = ctx.Process(target=_worker_main, args=(there, job), daemon=True)
    if threading.current_thread() is not threading.main_thread():
        process.start()
    else:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.freeze()  # forked workers then leave the parent's objects' pages shared
        try:
            process.start()
        finally:
            gc.unfreeze()
            signal.signal(signal.SIGINT, previous)
    there.close()
    return Worker(process, here)


@dataclass
class Worker:
    """A hashing process, its pipe, and the tasks sent to it not yet done
    (in order: the first is the one it is working on)."""

    process: multiprocessing.process.BaseProcess
    conn: object
    busy: list = field(default_factory=list)

    def stop(self, wait: bool) -> None:
        with contextlib.suppress(OSError, ValueError):
            if wait:
                self.conn.send(None)
            else:
                self.process.kill()
        self.process.join(30 if wait else 5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class Hasher:
    """Hashes files in worker processes, or here when there are few.

    Workers are plain processes with a pipe each, not a multiprocessing.Pool:
    a Pool loses the task of a worker that is killed (by the out-of-memory
    killer, say) and waits for its result for ever.  Here a dead worker's
    current task is failed with the reason, the tasks it had queued go back
    to the others, and a new worker takes its place."""

    # This many deaths in a row with no result between: something kills
    # every worker, so stop rather than fail every file one by one.
    MOST_DEATHS_IN_A_ROW = 8

    def __init__(self, job: HashJob, workers: int):
        self.job = job
        self.workers = workers
        self.crew = []
        self.ctx = None
        self.deaths = 0

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, exc_type, *rest) -> None:
        for worker in self.crew:
            worker.stop(wait=exc_type is None)
        self.crew = []

    # Fewer tasks than this are hashed here: starting a spawned worker costs
    # about as much as hashing 30-60 photos, a forked one about 1.
    SMALL_JOB = {"fork": 8, "spawn": 48, "forkserver": 48}

    def small_job(self) -> int:
        return self.SMALL_JOB[start_method()]

    def map(self, tasks: list) -> Iterator[HashResult]:
        """Results in completion order."""
        if self.workers <= 1 or len(tasks) < self.small_job() and not self.crew:
            _setup_decoders()
            for task in tasks:
                yield task.run(self.job)
            return
        if self.ctx is None:
            self.ctx = multiprocessing.get_context(start_method())
        while len(self.crew) < self.workers:
            self.crew.append(_start_worker(self.ctx, self.job))
        # Bigger chunks cost less to pass between processes; 16 per worker
        # or more keep the last chunks from leaving a worker idle at the end.
        chunk = max(1, min(self.MOST_CHUNK, len(tasks) // (16 * self.workers)))
        todo = list(reversed(tasks))  # popped from the end
        while todo or any(w.busy for w in self.crew):
            for worker in list(self.crew):
                if todo and len(worker.busy) <= chunk:  # one chunk queued ahead
                    yield from self._feed(worker, todo, chunk)
            yield from self._collect(todo)

    MOST_CHUNK = 16  # tasks sent at once

    def _take(self, worker: Worker, todo: list, count: int) -> list:
        """The next `count` tasks for this worker (todo's end is next)."""
        return [todo.pop() for _ in range(min(count, len(todo)))]

    def _feed(self, worker: Worker, todo: list, chunk: int):
        part = self._take(worker, todo, chunk)
        try:
            worker.conn.send(part)
            worker.busy += part
        except OSError:  # it died idle: nothing of this part was started
            todo.extend(reversed(part))
            yield from self._replace(worker, todo)

    def _collect(self, todo: list) -> Iterator[HashResult]:
        """The results that are ready; dead workers replaced."""
        from multiprocessing.connection import wait
        waiting = [w for w in self.crew if w.busy]
        wait([w.conn for w in waiting] + [w.process.sentinel for w in waiting])
        for worker in waiting:
            while worker.busy and worker.conn.poll():
                try:
                    result = worker.conn.recv()
                except (EOFError, OSError):  # died: its pipe is closed
                    break
                worker.busy.pop(0)
                self.deaths = 0
                yield result
            if not worker.process.is_alive():
                yield from self._replace(worker, todo)

    def _replace(self, worker: Worker, todo: list) -> Iterator[HashResult]:
        worker.process.join(5)
        code = worker.process.exitcode
        lost, worker.busy = worker.busy, []
        worker.stop(wait=False)
        self.crew.remove(worker)
        self.deaths += 1
        if lost:
            todo.extend(reversed(lost[1:]))  # the others go first, to others
            yield lost[0].died(code)
        if self.deaths >= self.MOST_DEATHS_IN_A_ROW:
            raise StoreError(
                f"{self.deaths} hashing processes in a row died (the last: "
                f"exit code {code}); stopping. Everything hashed so far is "
                f"saved. Lower workers or max_decode_mb, or free memory, then "
                f"run update.")
        self.crew.append(_start_worker(self.ctx, self.job))


# ============================================================================
# Finding files
# ============================================================================
#
# Walking img_dirs: the file name endings asked for, links followed (each
# folder once, so a loop ends), folders that cannot be read recorded and
# reported, never a crash.

@dataclass
class FoundFile:
    path: str
    size: int
    mtime_ns: int
    error: str | None = None


@dataclass
class Walk:
    """Walks img_dirs; remembers folders it could not read."""

    roots: list
    extensions: list
    follow_symlinks: bool = True
    skip_dirs: tuple = ()
    unreadable: list = field(default_factory=list)

    def __iter__(self) -> Iterator[FoundFile]:
        seen_dirs = set()
        skip = {os.path.normcase(os.path.abspath(d)) for d in self.skip_dirs}
        for root in self.roots:
            yield from self._walk(root, seen_dirs, skip)

    def _walk(self, top: str, seen_dirs: set, skip: set) -> Iterator[FoundFile]:
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
                key = (st.st_dev, st.st_ino)
                if key in seen_dirs:  # symlink loop or overlapping roots
                    continue
                seen_dirs.add(key)
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                self.unreadable.append((folder, describe_os_error(exc)))
                continue
            subdirs = []
            for entry in entries:
                found = self._entry(entry, skip, subdirs)
                if found is not None:
                    yield found
            stack.extend(reversed(subdirs))

    def _entry(self, entry, skip: set, subdirs: list) -> FoundFile | None:
        try:
            is_link = entry.is_symlink()
            if is_link and not self.follow_symlinks:
                return None
            if entry.is_dir():
                if os.path.normcase(entry.path) not in skip:
                    subdirs.append(entry.path)
                return None
            ext = os.path.splitext(entry.name)[1].lower()
            if self.extensions and ext in NOT_DECODED:
                st = entry.stat(follow_symlinks=False)
                return FoundFile(entry.path, st.st_size, st.st_mtime_ns,
                                 NOT_DECODED[ext])
            if self.extensions and ext not in self.extensions:
                return None
            if is_link and not os.path.exists(entry.path):
                st = entry.stat(follow_symlinks=False)
                return FoundFile(entry.path, 0, st.st_mtime_ns,
                                 "broken symbolic link")
            st = entry.stat()
            return FoundFile(entry.path, st.st_size, st.st_mtime_ns,
                             special_file(st.st_mode))  # FIFOs, devices
        except OSError as exc:
            return FoundFile(entry.path, 0, 0, describe_os_error(exc))


# ============================================================================
# Verification
# ============================================================================
#
# A hash says two pictures look alike as a whole; it cannot see one picture
# inside another (a screenshot, a post, a frame), a crop, or a quarter turn.
# Verification checks a candidate pair on the pixels: ORB keypoints of both
# pictures at VERIFY_SIDE pixels, matched by Hamming distance (ratio test),
# then a similarity transform (scale, any rotation, shift; mirrored tried
# too) fitted by RANSAC.  A pair is accepted when enough matches agree on a
# sane transform AND the pixels agree where the pictures overlap: two
# different photos in the same template (two screenshots of one app, two
# posts, two polaroid frames) share many keypoints on the template, but their
# pictures disagree over one large region, which is what PIXEL_CHECK finds.
# OpenCV is optional: without it the tool runs hashes only, and says so.

VERIFY_SIDE = 512      # long side the features are found at (prototype: 25 ms a pair)
VERIFY_FEATURES = 1000  # ORB keypoints per picture
MIN_INLIERS = 12       # matches that agree on the transform
RATIO = 0.8            # Lowe's ratio test on the two nearest descriptors
MAX_SCALE = 6.0        # one picture at most 6x the other's size (36x the area)
MIN_SPREAD = 0.01      # inliers must span 1 % of the overlap on each side
MIN_INSIDE = 0.5       # at least half of one picture lies inside the other
MAX_STRETCH = 2.0      # an affine fit may squash one axis at most 2x the other
GRID = 12              # pixel check: cells across the overlap
MAX_DISAGREE = 0.2     # largest region of disagreeing cells, share of the informative ones
MAX_OCCLUDED = 0.18    # ... or an occlusion: share of the overlap's cells (stickers 11-15 %)
MAX_PATCH = 0.35       # ... and of the informative ones (stickers, text: 20-31 %)
MIN_COUNTED = 12       # informative cells needed to judge (of GRID x GRID)
FLAT_STD = 5.0         # a cell with less grey-level spread is flat
FLAT_TOLERANCE = 24.0  # two flat cells agree within this many grey levels
# The second try, when too few keypoints agree: FAST's contrast threshold
# lowered from 10 to 5 grey levels, twice the keypoints.  Measured on the
# tough corpus's failures (text over dark frames and fog, 40 % crops of
# fog): 7 of 9 pairs accepted, 0 of 90 different pictures (dark frames,
# distractors, text over other dark frames).
FINE_FAST = 5
_TOO_FEW = ("too few matching keypoints", "no transform fits the matches",
            "too few keypoints agree on one transform")
CELL_NCC = 0.5         # two textured cells agree at this correlation or more (0.3 let


                       # two screenshots of one app through: skies correlate)


@functools.lru_cache(maxsize=None)
def _cv2():
    """OpenCV, or None when it is not installed (hashes-only matching)."""
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)  # our own workers use the cores; OpenCV's pool fought them
    return cv2


@dataclass(frozen=True)
class Geometry:
    """Where one picture lies in the other, in the OTHER picture's pixels.

    inner: "a" when picture a lies inside b (box in b's pixels), "b" when b
    lies inside a (box in a's pixels), "" when each is mostly the other.
    share: the inner picture's part of the outer one's area (0..1)."""

    inner: str
    box: tuple          # (left, top, right, bottom) pixels of the outer picture
    scale: float        # size of b over size of a
    turn: int           # 0, 90, 180 or 270 degrees clockwise, a to b
    angle: float        # the rest of the rotation, degrees clockwise
    mirror: bool
    share: float
    inliers: int
    outer_size: tuple = (0, 0)  # displayed pixels of the picture holding the box

    @property
    def box_fraction(self) -> tuple:
        """The box as shares (0..1) of the outer picture's width and height."""
        w, h = self.outer_size
        if not w or not h:
            return ()
        x0, y0, x1, y1 = self.box
        return (x0 / w, y0 / h, x1 / w, y1 / h)

    def swapped(self) -> Geometry:
        """The same finding with a and b exchanged (when one lies inside the
        other: the box stays in the outer picture's pixels).  A mirrored
        turn is a reflection, its own inverse; a plain turn reverses."""
        turn = self.turn if self.mirror else (360 - self.turn) % 360
        return dataclasses.replace(
            self, inner={"a": "b", "b": "a"}[self.inner], scale=1 / self.scale,
            turn=turn, angle=self.angle if self.mirror else -self.angle)

    def describe(self) -> str:
        """What b is, said of b: "holds the picture, 31 % of its area",
        "cropped to 64 %", "turned 90°", "mirrored"."""
        parts = []
        pct = round(100 * self.share)
        if self.inner == "a" and self.share < 0.9:
            parts.append(f"holds the picture, {pct} % of its area")
        elif self.inner == "b" and self.share < 0.9:
            parts.append(f"cropped to {pct} %")
        elif not self.inner:
            parts.append(f"overlaps it, {pct} % of its area")
        if self.turn:  # said as Pillow's orientation names say it
            parts.append({90: "turned 90° clockwise", 180: "turned 180°",
                          270: "turned 90° anticlockwise"}[self.turn])
        if abs(self.angle) >= 0.5:
            parts.append(f"tilted {self.angle:+.0f}°")
        if self.mirror:
            parts.append("mirrored")
        if not parts:
            parts.append("same framing")
        return ", ".join(parts)

    def as_json(self) -> dict:
        return {"inner": self.inner, "box": [round(v, 1) for v in self.box],
                "box_fraction": [round(v, 4) for v in self.box_fraction],
                "scale": round(self.scale, 3), "turn": self.turn,
                "angle": round(self.angle, 1), "mirror": self.mirror,
                "share": round(self.share, 3), "inliers": self.inliers}


@dataclass
class Verdict:
    accepted: bool
    reason: str          # why not, or "verified"
    inliers: int = 0
    geometry: Geometry | None = None


@dataclass
class Features:
    """One picture's keypoints at the work size (a grey copy kept for the
    pixel check; its mirrored keypoints found only when asked for)."""

    width: int           # displayed size (EXIF rotation applied)
    height: int
    grey: np.ndarray     # work size, uint8
    points: np.ndarray   # (n, 2) float32, work pixels
    descriptors: np.ndarray
    _mirrored: tuple | None = None
    _box: tuple | None = None
    _fine: Features | None = None
    fine_of: bool = False  # these are the fine keypoints
    _plain_rows: dict = field(default_factory=dict)  # mirror -> fine_in_plain

    def fine(self) -> Features:
        """The same picture with the fine keypoints (FINE_FAST, twice as
        many), found once."""
        if self._fine is None:
            self._fine = dataclasses.replace(
                self, _mirrored=None, _fine=None, fine_of=True,
                _plain_rows={})
            self._fine.points, self._fine.descriptors = _orb_features(
                self.grey, True)
        return self._fine

    def fine_in_plain(self, mirror: bool) -> np.ndarray:
        """For each fine keypoint (of the mirror if asked), the plain one it
        is (the same place and descriptor), or -1.  FAST's lower threshold
        finds the plain corners again and ORB keeps the strongest, so most
        plain keypoints are fine ones (all 1,000 in most pictures)."""
        if mirror not in self._plain_rows:
            self._plain_rows[mirror] = _same_keypoints(
                self.fine().oriented(mirror), self.oriented(mirror))
        return self._plain_rows[mirror]

    @property
    def box(self) -> tuple | None:
        """The content box (content_box) in work pixels, None when the
        picture is all content."""
        if self._box is None:
            h, w = self.grey.shape
            factor = max(1, max(w, h) // CONTENT_SIDE)
            small = _cv2().resize(self.grey, (max(1, w // factor),
                                             max(1, h // factor)),
                                  interpolation=_cv2().INTER_AREA)
            l, t, r, b = content_box(small)
            sh, sw = small.shape
            whole = (r - l) * (b - t) > CONTENT_MOST * sw * sh
            self._box = () if whole else (l * w / sw, t * h / sh,
                                          r * w / sw, b * h / sh)
        return self._box or None

    @property
    def factor(self) -> float:
        """Work pixels per displayed pixel."""
        return self.grey.shape[1] / self.width

    def oriented(self, mirror: bool) -> tuple:
        """(points, descriptors) of the picture or of its left-right mirror
        (points in the mirror's own pixels)."""
        if not mirror:
            return self.points, self.descriptors
        if self._mirrored is None:
            self._mirrored = _orb_features(np.ascontiguousarray(
                self.grey[:, ::-1]), self.fine_of)
        return self._mirrored


def _same_keypoints(fine: tuple, plain: tuple) -> np.ndarray:
    """Index of each of `fine`'s keypoints among `plain`'s ((points,
    descriptors) both), -1 if absent; a keypoint found twice in either set
    is left out (-1), so the pairing is one to one."""
    def once(points, desc) -> tuple:  # sorted keys found once, their indices
        raw = np.hstack([points.view(np.uint8).reshape(len(points), 8),
                         desc.reshape(len(points), desc.shape[-1])])
        keys = np.ascontiguousarray(raw).view(f"V{raw.shape[1]}").ravel()
        keys, first, count = np.unique(keys, return_index=True,
                                       return_counts=True)
        return keys[count == 1], first[count == 1]
    (fine_keys, fine_at), (plain_keys, plain_at) = once(*fine), once(*plain)
    out = np.full(len(fine[1]), -1, np.int64)
    if len(plain_keys):
        k = np.minimum(np.searchsorted(plain_keys, fine_keys),
                       len(plain_keys) - 1)
        same = plain_keys[k] == fine_keys
        out[fine_at[same]] = plain_at[k[same]]
    return out


def _orb_features(grey: np.ndarray, fine: bool = False) -> tuple:
    cv2 = _cv2()
    orb = cv2.ORB_create(nfeatures=VERIFY_FEATURES * (1 + fine),
                         fastThreshold=FINE_FAST if fine else 10,
                         edgeThreshold=15)
    keypoints, desc = orb.detectAndCompute(grey, None)
    points = np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2)
    return points, desc if desc is not None else np.zeros((0, 32), np.uint8)


def load_features(path: str, max_pixels: int) -> Features:
    """Decode small (JPEG draft), EXIF-rotate, grey, ORB.  SkipFile if not."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(path)
            if im.size[0] * im.size[1] > max_pixels:
                raise SkipFile("too many pixels")
            orientation = _exif_orientation(im)
            if im.format == "JPEG":
                im.draft("L", (VERIFY_SIDE, VERIFY_SIDE))
            im.seek(0)
            im = to_8bit(im)
            if orientation in _ORIENT:
                im = im.transpose(getattr(Image.Transpose, _ORIENT[orientation]))
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise SkipFile(describe_image_error(exc, path)) from exc
    width, height = im.size
    scale = VERIFY_SIDE / max(width, height)
    if scale < 1:
        im = im.resize((max(1, round(width * scale)),
                        max(1, round(height * scale))), Image.BILINEAR)
    grey = np.asarray(im.convert("L"))
    return Features(width, height, grey, *_orb_features(grey))


def verify_features(a: Features, b: Features, plain: bool = False) -> Verdict:
    """Is b the picture a (cropped, framed, turned, mirrored, scaled)?
    When too few keypoints agree, once more with the fine keypoints of both
    (Features.fine): fog, snow, dark frames and heavy text leave few
    corners above ORB's usual contrast.  plain: only the first try (not
    mirrored, plain keypoints), for pairs whose whole hashes say they share
    framing and orientation already (find_duplicates' reach past a group)."""
    best, mirrored = Verdict(False, "too few matching keypoints"), False
    near = {}
    for mirror in (False,) if plain else (False, True):
        near[mirror] = _nearest(a.oriented(mirror)[1], b.descriptors)
        verdict = _verify_oriented(a, b, mirror, near[mirror])
        if verdict.accepted:
            return verdict
        if verdict.inliers > best.inliers:
            best, mirrored = verdict, mirror
    if plain or best.reason not in _TOO_FEW:
        return best
    # the fine keypoints cost 3-4x a plain check: only the likelier mirror
    fine = _verify_oriented(a.fine(), b.fine(), mirrored,
                            _fine_nearest(a, b, mirrored, near[mirrored]))
    return fine if fine.accepted or fine.inliers > best.inliers else best


@dataclass
class Nearest:
    """Each descriptor's two nearest among `columns` others, by Hamming
    distance: d1 <= d2 (float64, inf where there are fewer) and their
    indices i1, i2 (-1 where none)."""

    d1: np.ndarray
    i1: np.ndarray
    d2: np.ndarray
    i2: np.ndarray
    columns: int

    def pairs(self) -> np.ndarray:
        """(k, 2) index pairs that pass Lowe's ratio test: knnMatch's with
        k=2, in its order.  A row that passes has one nearest (d1 < RATIO
        x d2 <= d2), so how ties are broken cannot matter."""
        if len(self.d1) < 2 or self.columns < 2:
            return np.zeros((0, 2), np.int64)
        ok = np.flatnonzero(self.d1 < RATIO * self.d2)
        return np.stack([ok, self.i1[ok]], axis=1).astype(np.int64)

    def take(self, rows: np.ndarray, columns: np.ndarray) -> Nearest:
        """These rows, their indices renumbered by `columns` (old index ->
        new; -1 stays -1 when columns[-1] is -1)."""
        return Nearest(self.d1[rows], columns[self.i1[rows]], self.d2[rows],
                       columns[self.i2[rows]], self.columns)

    def merged(self, other: Nearest) -> Nearest:
        """The two nearest over both sets of columns (apart, their indices
        of one numbering): the smaller of the firsts, and the smaller of
        the other first and the two seconds."""
        first = other.d1 < self.d1
        d2 = np.minimum(np.maximum(self.d1, other.d1),
                        np.minimum(self.d2, other.d2))
        one_two = np.where(self.d1 <= other.d2, self.i1, other.i2)
        two_one = np.where(other.d1 <= self.d2, other.i1, self.i2)
        return Nearest(np.minimum(self.d1, other.d1),
                       np.where(first, other.i1, self.i1), d2,
                       np.where(first, one_two, two_one),
                       self.columns + other.columns)


def _nearest(da: np.ndarray, db: np.ndarray) -> Nearest:
    """Each descriptor of da's two nearest in db.

    One float32 matrix product of the bits as +-1 (a dot product is 256 -
    2 x the Hamming distance; the sums are small integers, so exact), rows
    in blocks that stay in the cache: 7.4 against cv2.BFMatcher.knnMatch's
    11 ms for 1,000 x 1,000, 27 against 37 ms for the fine 2,000 x 2,000
    (load 4).  The nearest is the first of equals, as knnMatch's."""
    n = len(da)
    d1, d2 = np.full(n, np.inf), np.full(n, np.inf)
    i1, i2 = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if n and len(db):
        bits = 8 * da.shape[1]
        signs_b = _signs(db).T.copy()
        for start in range(0, n, MATCH_BLOCK):
            dots = _signs(da[start:start + MATCH_BLOCK]) @ signs_b
            rows, at = np.arange(len(dots)), slice(start, start + len(dots))
            i1[at] = dots.argmax(axis=1)
            d1[at] = (bits - dots[rows, i1[at]].astype(np.float64)) / 2
            if len(db) > 1:
                dots[rows, i1[at]] = -np.inf
                i2[at] = dots.argmax(axis=1)
                d2[at] = (bits - dots[rows, i2[at]].astype(np.float64)) / 2
    return Nearest(d1, i1, d2, i2, len(db))


def _fine_nearest(a: Features, b: Features, mirror: bool,
                  plain: Nearest) -> Nearest:
    """The fine keypoints' two nearest (a's, of the mirror if asked, among
    b's), taking from `plain` (the plain ones' two nearest) what it holds.

    Most plain keypoints are fine ones (Features.fine_in_plain).  A fine
    keypoint that is a plain one whose two nearest are both plain keypoints
    of b that are fine ones has those two nearest among them too: only the
    fine keypoints of b that are not plain ones remain to compare it with
    (~1,000 x 1,000 of 2,000 x 2,000: 3 products of 1,000 x 1,000, not 4).
    Exactly the two nearest of comparing all with all (the values, and
    the nearest wherever it passes the ratio test)."""
    da, db = a.fine().oriented(mirror)[1], b.fine().descriptors
    rows, cols = a.fine_in_plain(mirror), b.fine_in_plain(False)
    back = np.full(len(b.descriptors) + 1, -1, np.int64)  # plain -> fine; -1 -> -1
    back[cols[cols >= 0]] = np.flatnonzero(cols >= 0)
    known = rows >= 0
    if known.any():  # ... and the plain two nearest both fine ones of b
        k = rows[known]
        known[known] = (back[plain.i1[k]] >= 0) & (back[plain.i2[k]] >= 0)
    out = Nearest(np.empty(len(da)), np.empty(len(da), np.int64),
                  np.empty(len(da)), np.empty(len(da), np.int64), len(db))
    rest, known = np.flatnonzero(~known), np.flatnonzero(known)
    new = np.flatnonzero(cols < 0)
    both = plain.take(rows[known], back).merged(
        _nearest(da[known], db[new]).take(slice(None), np.append(new, -1)))
    rest_near = _nearest(da[rest], db)
    for at, part in ((known, both), (rest, rest_near)):
        out.d1[at], out.i1[at], out.d2[at], out.i2[at] = \
            part.d1, part.i1, part.d2, part.i2
    return out


MATCH_BLOCK = 256  # rows of one product: 256 x 2,000 float32 stay in L2


def _signs(desc: np.ndarray) -> np.ndarray:
    """Binary descriptors as rows of +1 and -1 (float32), one per bit."""
    return np.unpackbits(desc, axis=1).astype(np.float32) * 2 - 1


def _verify_oriented(a: Features, b: Features, mirror: bool,
                     near: Nearest) -> Verdict:
    """One try: a (mirrored if asked) against b, given the two nearest of
    each of a's keypoints among b's."""
    points = a.oriented(mirror)[0]
    pairs = near.pairs()
    if len(pairs) < MIN_INLIERS:
        return Verdict(False, "too few matching keypoints", len(pairs))
    src, dst = points[pairs[:, 0]], b.points[pairs[:, 1]]
    verdict = Verdict(False, "no transform fits the matches")
    # a similarity first; an affine map (a squashed or stretched copy) when
    # that fails: it has two more ways to fit noise, so it comes second
    for fit in (_cv2().estimateAffinePartial2D, _cv2().estimateAffine2D):
        transform, mask = fit(src, dst, method=_cv2().RANSAC,
                              ransacReprojThreshold=4.0, maxIters=2000,
                              confidence=0.995)
        if transform is not None:
            verdict = _check_transform(transform, mask, src, dst, a, b, mirror)
            if verdict.accepted:
                return verdict
    return verdict


def _check_transform(transform, mask, src, dst, a: Features, b: Features,
                     mirror: bool) -> Verdict:
    inl = mask.ravel().astype(bool)
    n = int(inl.sum())
    grey = a.grey[:, ::-1] if mirror else a.grey
    why = _degenerate(transform, src[inl], dst[inl], grey.shape, b.grey.shape)
    if why:
        return Verdict(False, why, n)
    if not _pixels_agree(grey, b.grey, transform,
                         lambda: _focus_boxes(a, b, transform, mirror)):
        return Verdict(False, "the pixels differ where the pictures overlap", n)
    return Verdict(True, "verified", n, _geometry(transform, a, b, mirror, n))


def _pixels_agree(grey_a: np.ndarray, grey_b: np.ndarray, transform,
                  focus) -> bool:
    """The pixel check.  Agree: the largest disagreeing region is at most
    MAX_DISAGREE of the informative cells, or it is an occlusion: at most
    MAX_OCCLUDED of the whole overlap and MAX_PATCH of the informative
    cells (a sticker or text over a picture with much sky or dark
    background: 15 % of the tough corpus's stickers and text overlays
    failed the first rule alone).  And in both cases the picture inside a
    page agrees by the first rule (`focus()`: the content boxes of either
    picture in b's pixels): two different photos in one screenshot
    template share the page, not the picture (3 of 60 such pairs of the
    tough corpus passed the first rule over the whole page)."""
    cells = disagreement_cells(grey_a, grey_b, transform)
    if cells is None:
        return False
    bad, counted, inside = cells
    if counted.sum() < MIN_COUNTED:
        return False  # too little to compare: not proven, so not accepted
    largest = _largest_region(bad)
    occluded = largest > MAX_DISAGREE * counted.sum()
    if occluded and (largest > MAX_OCCLUDED * inside.sum() or
                     largest > MAX_PATCH * counted.sum()):
        return False
    for mask in _box_cells(focus(), grey_b.shape):
        here = counted & mask
        if here.sum() < MIN_COUNTED:  # a plain picture: nothing to tell
            if occluded:
                return False
        elif _largest_region(bad & mask) > MAX_DISAGREE * here.sum():
            return False
    return True


def _largest_region(bad: np.ndarray) -> int:
    cv2 = _cv2()
    count, _, stats, _ = cv2.connectedComponentsWithStats(
        bad.astype(np.uint8), connectivity=4)
    return int(stats[1:, cv2.CC_STAT_AREA].max()) if count > 1 else 0


def _box_cells(boxes: list, shape: tuple) -> list:
    """GRID x GRID masks of the cells whose centres lie in each box (work
    pixels of a picture of `shape`)."""
    h, w = shape
    cy = (np.arange(GRID) + 0.5) * h / GRID
    cx = (np.arange(GRID) + 0.5) * w / GRID
    return [((cy[:, None] >= y0) & (cy[:, None] <= y1) &
             (cx[None, :] >= x0) & (cx[None, :] <= x1))
            for x0, y0, x1, y1 in boxes]


def _focus_boxes(a: Features, b: Features, transform, mirror: bool) -> list:
    """The content boxes of a (carried by the transform) and of b, in b's
    work pixels: where the picture lies when one is a page holding it."""
    out = []
    if b.box is not None:
        out.append(b.box)
    if a.box is not None:
        x0, y0, x1, y1 = a.box
        if mirror:
            w = a.grey.shape[1]
            x0, x1 = w - x1, w - x0
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        moved = corners @ transform[:, :2].T + transform[:, 2]
        out.append((*moved.min(axis=0), *moved.max(axis=0)))
    return out


def _scale_angle(transform: np.ndarray) -> tuple:
    """Scale (square root of the area ratio) and rotation (degrees) of the
    similarity nearest to the transform."""
    m = transform[:, :2]
    scale = math.sqrt(abs(float(np.linalg.det(m))))
    return scale, math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))


def _stretch(transform: np.ndarray) -> float:
    """How unevenly the transform scales: 1 for a similarity."""
    high, low = np.linalg.svd(transform[:, :2], compute_uv=False)
    return float(high / low) if low > 1e-9 else math.inf


def _overlap(transform: np.ndarray, shape_a: tuple, shape_b: tuple):
    """a's frame carried into b and clipped to b: (box, a's share seen, b's
    share covered), or None when they do not overlap."""
    ha, wa = shape_a
    hb, wb = shape_b
    corners = np.array([[0, 0], [wa, 0], [wa, ha], [0, ha]], np.float64)
    moved = corners @ transform[:, :2].T + transform[:, 2]
    x0, y0 = np.maximum(moved.min(axis=0), 0)
    x1, y1 = np.minimum(moved.max(axis=0), (wb, hb))
    if x1 <= x0 or y1 <= y0:
        return None
    area = (x1 - x0) * (y1 - y0)
    scale = _scale_angle(transform)[0]
    return (x0, y0, x1, y1), min(1.0, area / scale ** 2 / (wa * ha)), \
        area / (wb * hb)


def _degenerate(transform, src, dst, shape_a, shape_b) -> str:
    """Why a fitted transform cannot be a copy, or ""."""
    scale, _ = _scale_angle(transform)
    if len(src) < MIN_INLIERS:
        return "too few keypoints agree on one transform"
    if not 1 / MAX_SCALE <= scale <= MAX_SCALE:
        return f"implausible scale ({scale:.2f})"
    if np.linalg.det(transform[:, :2]) < 0 or _stretch(transform) > MAX_STRETCH:
        return "implausible stretch or reflection"
    overlap = _overlap(transform, shape_a, shape_b)
    if overlap is None:
        return "the pictures would not overlap"
    box, seen_a, covered_b = overlap
    if max(seen_a, covered_b) < MIN_INSIDE:
        return "the pictures would overlap only at an edge"
    area_b = (box[2] - box[0]) * (box[3] - box[1])
    if _span(dst) < MIN_SPREAD * area_b or \
            _span(src) < MIN_SPREAD * area_b / scale ** 2:
        return "the agreeing keypoints are bunched in one spot"
    return ""


def _span(points: np.ndarray) -> float:
    low, high = points.min(axis=0), points.max(axis=0)
    return float((high[0] - low[0]) * (high[1] - low[1]))


def disagreeing_region(grey_a: np.ndarray, grey_b: np.ndarray,
                       transform: np.ndarray) -> float:
    """The largest connected region of GRID x GRID cells where a (carried into
    b's frame, brightness matched) and b differ, as a share of the cells with
    something to compare.  A sticker or a caption is a small region; a
    different picture in the same template is one large region."""
    cells = disagreement_cells(grey_a, grey_b, transform)
    if cells is None or cells[1].sum() < MIN_COUNTED:
        return 1.0  # too little to compare: not proven, so not accepted
    return _largest_region(cells[0]) / float(cells[1].sum())


def disagreement_cells(grey_a: np.ndarray, grey_b: np.ndarray,
                       transform: np.ndarray):
    """(bad, counted, inside): GRID x GRID maps of the cells where a (carried
    into b's frame, brightness matched) and b differ, of the cells with
    something to compare, of the cells inside the overlap; None when the
    pictures hardly overlap."""
    cv2 = _cv2()
    hb, wb = grey_b.shape
    warped = cv2.warpAffine(np.ascontiguousarray(grey_a), transform, (wb, hb),
                            flags=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.full(grey_a.shape, 255, np.uint8), transform,
                            (wb, hb), flags=cv2.INTER_NEAREST)
    size = (max(GRID, wb // 2), max(GRID, hb // 2))  # halved: noise averaged
    x = cv2.resize(warped, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    y = cv2.resize(grey_b, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    m = cv2.resize(inside, size, interpolation=cv2.INTER_AREA) >= 250
    if m.sum() < 16:
        return None
    spread = x[m].std()
    gain = y[m].std() / spread if spread > 1 else 1.0
    x = (x - x[m].mean()) * gain + y[m].mean()
    return _cell_disagreement(x, y, m)


def _cell_disagreement(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple:
    """GRID x GRID bool maps: disagreeing cells, cells that count, cells
    inside the overlap.  Flat cells that agree say nothing: they do not
    count.  A cell is the block [i*h//GRID, (i+1)*h//GRID) x (the same
    across); only its pixels inside the overlap (m) are compared, and only
    when they are 80 % of it.  Every cell's sums in one pass (np.add.reduceat
    of the masked products, float64): 0.9 against 6.0 ms of CPU for the
    cell-by-cell loop, the same maps at all 1,569 pixel checks of the
    tough corpus's find_duplicates."""
    h, w = x.shape
    rows = np.arange(GRID) * h // GRID
    cols = np.arange(GRID) * w // GRID
    size = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))
    inside = m.astype(np.float64)
    a, b = x * inside, y * inside

    def sums(v):
        return np.add.reduceat(np.add.reduceat(v, rows, axis=0), cols, axis=1)
    n = sums(inside)
    within = (size >= 4) & (n >= 0.8 * size)
    n = np.maximum(n, 1)
    ma, mb = sums(a) / n, sums(b) / n
    va = np.maximum(sums(a * a) / n - ma * ma, 0)
    vb = np.maximum(sums(b * b) / n - mb * mb, 0)
    sa, sb = np.sqrt(va), np.sqrt(vb)
    cov = sums(a * b) / n - ma * mb
    bad = _cells_differ(ma, mb, sa, sb, cov) & within
    counted = within & (bad | (sa >= FLAT_STD) | (sb >= FLAT_STD))
    return bad, counted, within


def _cells_differ(ma, mb, sa, sb, cov) -> np.ndarray:
    """Which cells differ, from each cell's means, standard deviations and
    covariance (arrays): two flat cells by their mean grey, texture against
    flat always, two textured cells by their correlation."""
    flat = (sa < FLAT_STD) & (sb < FLAT_STD)
    lopsided = (sa < FLAT_STD / 2) | (sb < FLAT_STD / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ncc = cov / (sa * sb)
    return np.where(flat, np.abs(ma - mb) > FLAT_TOLERANCE,
                    lopsided | (ncc < CELL_NCC))


def _geometry(transform, a: Features, b: Features, mirror: bool,
              inliers: int) -> Geometry:
    """The transform in displayed pixels: which picture holds the other,
    where, how turned."""
    scale_work, angle = _scale_angle(transform)
    scale = scale_work * a.factor / b.factor
    turn = round(angle / 90) % 4 * 90
    rest = angle - round(angle / 90) * 90
    box, seen_a, covered_b = _overlap(transform, a.grey.shape, b.grey.shape)
    if seen_a >= 0.9 or covered_b < 0.9:  # a inside b (or partial): box in b
        inner, share = ("a" if seen_a >= 0.9 else ""), covered_b
        box = tuple(v / b.factor for v in box)
        outer = (b.width, b.height)
    else:  # b inside a: b's frame carried back into a
        inverse = _cv2().invertAffineTransform(transform)
        box, _, kept = _overlap(inverse, b.grey.shape, a.grey.shape)
        if mirror:  # the box is in the mirror's pixels: back to a's own
            w = a.grey.shape[1]
            box = (w - box[2], box[1], w - box[0], box[3])
        inner, share = "b", kept
        box = tuple(v / a.factor for v in box)
        outer = (a.width, a.height)
    return Geometry(inner, tuple(float(v) for v in box), float(scale), turn,
                    float(rest), mirror, float(share), inliers, outer)


class Verifier:
    """verify() for pairs of files, each file's features found once a run."""

    def __init__(self, max_pixels: int, cache_size: int = 4096):
        _one_blas_thread()  # the matcher's products: one of a crew of workers
        self.max_pixels = max_pixels
        self.cache: dict = {}
        self.cache_size = cache_size  # 4096 x ~300 KB: bounded memory
        self.checked = 0

    def features(self, path: str) -> Features | None:
        if path not in self.cache:
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            try:
                self.cache[path] = load_features(path, self.max_pixels)
            except (SkipFile, OSError, MemoryError):
                self.cache[path] = None
        return self.cache[path]

    def check(self, path_a: str, path_b: str, plain: bool = False) -> Verdict:
        a, b = self.features(path_a), self.features(path_b)
        if a is None or b is None:
            return Verdict(False, "could not be read for verification")
        self.checked += 1
        return verify_features(a, b, plain)


# ---- verification in worker processes ----
#
# A check costs 30-100 ms of CPU (ORB matching and the pixel check), and
# find_duplicates on the 1,452-image corpus makes ~900: they run in the
# hashing workers (Hasher), whose tasks run themselves.  A pair's verdict
# does not depend on where it is computed (ORB, the matcher and RANSAC's
# seeded generator are deterministic), so results stay byte for byte those
# of one process.  Each process keeps each file's features for the run; a
# worker forked mid-run starts with those its parent found so far.

@dataclass(frozen=True)
class VerifyJob:
    """What a verifying worker needs: the pixel limit and the run it serves
    (its features are kept for that run only)."""

    max_pixels: int
    run: str


_VERIFIERS: dict = {}  # VerifyJob.run -> this process's Verifier for that run


def verifier_for(job: VerifyJob) -> Verifier:
    if job.run not in _VERIFIERS:
        _VERIFIERS[job.run] = Verifier(job.max_pixels)
    return _VERIFIERS[job.run]


@dataclass
class PairVerdict:
    path_a: str
    path_b: str
    verdict: Verdict


@dataclass(frozen=True)
class VerifyTask:
    """Is path_b the picture path_a?  Run by a worker (Hasher)."""

    path_a: str
    path_b: str
    plain: bool = False  # verify_features(plain=True)

    def run(self, job: VerifyJob) -> PairVerdict:
        return PairVerdict(self.path_a, self.path_b, verifier_for(job).check(
            self.path_a, self.path_b, self.plain))

    def died(self, exitcode: int | None) -> PairVerdict:
        return PairVerdict(self.path_a, self.path_b, Verdict(
            False, f"the verifying process died (exit code {exitcode})"))


class VerifyPool(Hasher):
    """The hashing workers, for pairs: a check costs 5-10 hashes, so two
    are worth a forked worker (seven a spawned one).

    A pair goes to the worker that has seen more of its two files, among
    the next AFFINITY pairs: each process finds a file's features once a
    run (Verifier.features), so a file sent to both is decoded and its
    keypoints found twice."""

    SMALL_JOB = {"fork": 2, "spawn": 8, "forkserver": 8}
    # one check at a time (and one queued): a check is 30-100 ms, so the
    # last of a round no longer waits behind a chunk of a busy worker's
    MOST_CHUNK = 1
    # tough corpus: features found 1,569 -> 1,492 (64 -> 256) for 1,298
    # files in 2,217 checks, their CPU 45.7 -> 44.1 s
    AFFINITY = 256

    def __init__(self, job: VerifyJob, workers: int):
        super().__init__(job, workers)
        self.seen: dict = {}  # worker's pid -> the files sent to it

    def _take(self, worker: Worker, todo: list, count: int) -> list:
        seen = self.seen.setdefault(worker.process.pid, set())
        part = []
        for _ in range(min(count, len(todo))):
            near = todo[-self.AFFINITY:]  # the end is next: ties go to it
            at = max(range(len(near)), key=lambda i: (
                (near[i].path_a in seen) + (near[i].path_b in seen), i))
            task = todo.pop(len(todo) - len(near) + at)
            seen.update((task.path_a, task.path_b))
            part.append(task)
        return part


# ============================================================================
# Store: SQLite
# ============================================================================
#
# SQLite is the truth; everything else is rebuilt from it.  Hashes of up to
# 64 bits are stored as signed 64-bit integers (SQLite has no unsigned type),
# longer ones as big-endian BLOBs.  Paths that are not valid UTF-8 (possible on
# Linux) are stored as BLOBs of their raw bytes, so every file keeps its row.

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id        INTEGER PRIMARY KEY,
    path      TEXT NOT NULL UNIQUE,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    digest    BLOB,
    hash,
    variants  BLOB,
    low_detail INTEGER NOT NULL DEFAULT 0,
    detail    REAL,
    width     INTEGER,
    height    INTEGER,
    error     TEXT,
    hashed_at REAL,
    traits    TEXT
);
CREATE INDEX IF NOT EXISTS images_size ON images(size);
"""


def path_to_db(path: str):
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def path_from_db(value) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def signed64(value: int) -> int:
    """A hash of up to 64 bits as the signed 64-bit integer both databases
    store (neither has an unsigned type)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def hash_to_db(value: int | None, bits: int):
    """A hash as either database stores it: signed64, or the big-endian
    bytes of whole 64-bit words when it is longer."""
    if value is None:
        return None
    if bits <= 64:
        return signed64(value)
    return value.to_bytes(8 * ((bits + 63) // 64), "big")


def hash_from_db(value) -> int | None:
    """hash_to_db's inverse; bytes are big-endian whatever the length
    (PostgreSQL sends BIGINT hashes as int8send's 8 bytes)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return int.from_bytes(value, "big")
    return value + (1 << 64) if value < 0 else value


def image_row(r: Sequence, path_of=path_from_db) -> ImageRow:
    """An ImageRow from a row of ROW_COLUMNS (Store) or PG_ROW_COLUMNS
    (PgStore): the same columns in the same order; path_of decodes the
    path as its database stores it."""
    return ImageRow(path_of(r[0]), r[1], r[2], r[3], hash_from_db(r[4]),
                    r[5], r[6], r[7], r[8], r[9], bool(r[10]),
                    4.0 if r[11] is None else r[11], r[12])


def kind_meta(spec: HashSpec) -> dict:
    """What a database records about the hashes it holds, and what made them."""
    import PIL
    import imagehash
    return dict(hash_kind=spec.kind, hash_method=spec.method,
                hash_size=spec.size, hash_bits=spec.bits, hash_mode=spec.mode,
                colorhash_binbits=spec.binbits, pillow=PIL.__version__,
                resize=resize_rule(),
                imagehash=getattr(imagehash, "__version__", "?"),
                tool=__version__)


def stored_resize(meta: dict) -> str | None:
    """The resize rule a database's hashes were made under (databases
    older than the record: from the Pillow version they noted), or None."""
    if "resize" in meta:
        return meta["resize"]
    return resize_rule(meta["pillow"]) if "pillow" in meta else None


def comparable(meta: dict, spec: HashSpec) -> bool:
    """Whether the hashes a database recorded under `meta` compare with
    this process's: the same kind, made by a Pillow resizing the same way."""
    return meta.get("hash_kind") == spec.kind and \
        stored_resize(meta) in (None, resize_rule())


# ---- which folders a database covers ----
# A database records the img_dirs roots it was hashed for (per machine on
# PostgreSQL), with the hash kind they were hashed in.  A run whose img_dirs
# name a folder not covered yet hashes that folder first; a run answers only
# from rows under its own img_dirs.  Rows of a folder dropped from img_dirs are
# kept, not searched: putting it back costs no hashing (hours for a big
# collection), and `build` drops them.

COVERAGE_KEY = "img_dirs"


def _inside(path: str, folder: str) -> bool:
    folder = folder.rstrip(os.sep) + os.sep
    return os.path.normcase(path).startswith(os.path.normcase(folder))


def _root_range(root: str) -> tuple[bytes, bytes]:
    """[lo, hi): the path bytes of every file under folder `root`."""
    lo = os.fsencode(root.rstrip(os.sep) + os.sep)
    return lo, lo[:-1] + bytes([lo[-1] + 1])


def covers(folder: str, path: str) -> bool:
    """Whether `path` is `folder` or lies under it."""
    return os.path.normcase(path.rstrip(os.sep)) == \
        os.path.normcase(folder.rstrip(os.sep)) or _inside(path, folder)


def outside(paths: Iterable[str], folders: Sequence[str]) -> list:
    """The paths of `paths` under none of `folders`."""
    return [p for p in paths if not any(covers(f, p) for f in folders)]


def outermost(folders: Iterable[str]) -> list:
    """The folders not inside another one, sorted."""
    folders = sorted(set(folders))
    return [f for f in folders
            if not any(covers(g, f) for g in folders if g != f)]


@dataclass
class Coverage:
    """The img_dirs roots a database (or this machine's part of one) holds
    hashes of.  `unknown`: it also holds rows of folders it never recorded
    (written before coverage was recorded); they are never answered from."""

    kind: str
    roots: list
    unknown: bool = False

    def to_meta(self) -> str:
        return json.dumps({"kind": self.kind, "roots": self.roots,
                           "unknown": self.unknown})

    @classmethod
    def from_meta(cls, text: str, kind: str) -> Coverage:
        value = json.loads(text)
        if value.get("kind") != kind:  # hashes of another kind: rehashed
            return cls(kind, [])
        return cls(kind, list(value.get("roots", [])),
                   bool(value.get("unknown")))


class Scoped:
    """What both stores share about coverage and scope.  A store answers
    (hash_arrays, searches, failed and low-detail rows) only from rows under
    its scope, set by set_scope; None: every row, the common case, at no cost.
    Each store gives _coverage_text, _legacy_coverage, _rows_outside and
    _scope_sql."""

    scope = None        # the img_dirs of this run, when rows outside exist
    scope_roots = ()    # the img_dirs of this run
    scope_kind = ""

    def coverage(self, kind: str) -> Coverage:
        text = self._coverage_text()
        if text is None:
            return self._legacy_coverage(kind)
        return Coverage.from_meta(text, kind)

    def uncovered(self, roots: Sequence[str], kind: str) -> list:
        """The folders of `roots` the database holds no hashes for yet."""
        return outside(roots, self.coverage(kind).roots)

    def record_coverage(self, roots: Sequence[str], kind: str) -> None:
        """After a complete walk of `roots`: they are covered."""
        old = self.coverage(kind)
        unknown = old.unknown and self._rows_outside(old.roots + list(roots))
        self._set_coverage(Coverage(kind, outermost(old.roots + list(roots)),
                                    unknown))
        if self.scope_kind:
            self.set_scope(self.scope_roots, self.scope_kind)

    def set_scope(self, roots: Sequence[str], kind: str) -> None:
        self.scope_roots, self.scope_kind = list(roots), kind
        cov = self.coverage(kind)
        needed = cov.unknown or outside(cov.roots, roots)
        self.scope = list(roots) if needed else None

    def _scope_tag(self) -> str:
        """Part of the fingerprint: an index holds the rows of one scope."""
        if self.scope is None:
            return ""
        text = "\0".join(sorted(self.scope))
        return ":" + hashlib.blake2b(os.fsencode(text), digest_size=6).hexdigest()


class HashArrays(NamedTuple):
    """The comparable images of a database as arrays, in id order: what an
    index is built from (hash_arrays).  W: 64-bit words per hash; E: extra
    hashes per image (orientations, centres, content box, windows)."""

    ids: np.ndarray     # (N,) int64: images.id
    hashes: np.ndarray  # (N, W) uint64
    extra: np.ndarray   # (N, E, W) uint64, in split_extra's order
    detail: np.ndarray  # (N,) float32 (see detail_bits)


def join_hash_blocks(blocks: list, words: int, extra: int) -> HashArrays:
    """One HashArrays from HashArrays of blocks of rows."""
    if not blocks:
        return HashArrays(np.zeros(0, np.int64), np.zeros((0, words), np.uint64),
                          np.zeros((0, extra, words), np.uint64),
                          np.zeros(0, np.float32))
    return HashArrays(*(np.concatenate(part) for part in zip(*blocks)))


APPLICATION_ID = 0x72737263  # "rsrc" in the SQLite header: one of ours


def describe_db_error(exc: sqlite3.Error, path: str) -> str:
    """What went wrong with the SQLite database at `path`, and what to do."""
    name = getattr(exc, "sqlite_errorname", "")  # Python 3.11+
    text, folder = str(exc), os.path.dirname(path) or "."
    if "FULL" in name or "full" in text:
        return (f"db_dir {folder} is full ({text}): free some space there, "
                f"or choose another db_dir, and run again (files hashed so "
                f"far are kept).")
    if "READONLY" in name or "readonly" in text or "read-only" in text:
        return (f"the database {path} is read-only ({text}): build and "
                f"update write to it; give write access to it and to "
                f"{folder}, or choose another db_dir (search and export "
                f"only read it).")
    if "CORRUPT" in name or "NOTADB" in name or "malformed" in text or \
            "not a database" in text:
        return (f"the database {path} is damaged ({text}): run build, which "
                f"hashes your images again and replaces it (a database it "
                f"does not know as its own must be moved away first; keep a "
                f"copy if you want to try sqlite3's .recover).")
    if "IOERR" in name or "I/O" in text:
        return (f"cannot read or write the database {path} ({text}): check "
                f"the disk of db_dir and its free space.")
    if "BUSY" in name or "locked" in text:
        return (f"the database {path} is busy ({text}): another program "
                f"holds it; try again when it has finished.")
    return f"the database {path} cannot be used: {text}."


def marked_ours(path: str) -> bool:
    """Whether the SQLite header of `path` carries our APPLICATION_ID (read
    from the bytes: true even when later pages are damaged)."""
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        head = fh.read(100)
        return head.startswith(b"SQLite format 3\0") and \
            int.from_bytes(head[68:72], "big") == APPLICATION_ID
    return False


def _foreign(db: sqlite3.Connection, version: int) -> str | None:
    """Why the database is another program's, or None if it is ours (or
    still empty).  Ours carry APPLICATION_ID; older ones are known by their
    tables."""
    app = db.execute("PRAGMA application_id").fetchone()[0]
    if app == APPLICATION_ID:
        return None
    if app:
        return f"it is marked as another program's (application id {app:#x})"
    tables = {name for name, in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version == 0 and tables <= {"meta", "images"}:
        return None  # new, or our first schema step was cut short
    if {"meta", "images"} <= tables and db.execute(
            "SELECT 1 FROM meta WHERE key = 'db_id'").fetchone():
        return None
    shown_tables = ", ".join(sorted(tables)[:5]) or "none"
    return f"its tables are {shown_tables}"


class HashStore(Protocol):
    """What the operations ask of a database, the one interface of Store
    (SQLite, below) and PgStore (PostgreSQL).  Each write is one
    transaction; reads answer only from rows under the scope (set_scope);
    rows come back as ImageRow, paths as the file system gives them."""

    path: str  # what reports and messages show (a URL without password)

    def close(self) -> None: ...
    def snapshot(self) -> None: ...
    def end_snapshot(self) -> None: ...

    # ---- meta: the hash kind and what changes with every write ----
    def meta(self) -> dict: ...
    def hash_kind(self) -> str | None: ...
    def fingerprint(self) -> str: ...

    # ---- coverage and scope (Scoped) ----
    def coverage(self, kind: str) -> Coverage: ...
    def uncovered(self, roots: Sequence[str], kind: str) -> list: ...
    def record_coverage(self, roots: Sequence[str], kind: str) -> None: ...
    def set_scope(self, roots: Sequence[str], kind: str) -> None: ...

    # ---- writes ----
    def start_kind(self, spec: HashSpec) -> None: ...
    def use_roots(self, roots: Sequence[str]) -> None: ...
    def upsert(self, rows: Sequence[ImageRow], bits: int) -> None: ...
    def delete_paths(self, paths: Iterable[str]) -> int: ...

    # ---- reads ----
    def states(self, roots: Sequence[str] | None = None) -> dict: ...
    def hashed_with_size(self, size: int) -> set: ...
    def hashed_by_digest(self, size: int, digest: bytes
                         ) -> ImageRow | None: ...
    def hash_arrays(self, words: int, extra: int) -> HashArrays: ...
    def low_detail_rows(self) -> list: ...
    def failed_rows(self) -> list: ...
    def rows_by_id(self, ids: Iterable[int]) -> dict: ...
    def rows_by_path(self, paths: Iterable[str]) -> dict: ...
    def iter_rows(self) -> Iterator[ImageRow]: ...


class NearRow(NamedTuple):
    """A stored row a search found: its images.id and Hamming distance."""

    id: int
    bits: int


class ServerHashStore(HashStore, Protocol):
    """A HashStore whose hashes stay on a server (PgStore): it also searches
    them there and tidies up after writes.  Operations ask for these only
    when database_url is set."""

    def search_hashes(self, query: int, radius: int) -> list[NearRow]: ...
    def count_comparable(self) -> int: ...
    def optimize(self) -> None: ...


class Store(Scoped):
    """The SQLite database of one collection, behind a few small methods."""

    ROW_COLUMNS = ("path, size, mtime_ns, digest, hash, width, height, error, id, "
                   "variants, low_detail, detail, traits")

    def __init__(self, path: str, create: bool = False):
        self.path = path
        if not create and not os.path.exists(path):
            raise StoreError(f"no database at {path}; run build first.")
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.db = sqlite3.connect(path, timeout=30)
            self.db.execute("PRAGMA busy_timeout = 30000")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            foreign = _foreign(self.db, version)
            if foreign:
                self.db.close()
                raise StoreError(
                    f"{path} is not a reverse_search database ({foreign}); it "
                    f"was left as it is. Choose another db_dir, or move that "
                    f"file away.")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} was written by a newer reverse_search (schema "
                    f"{version}, this one knows {SCHEMA_VERSION}); upgrade, or "
                    f"use another db_dir.")
            self._migrate(version)
        except sqlite3.Error as exc:
            raise StoreError(describe_db_error(exc, path)) from None

    def _migrate(self, version: int) -> None:
        if version == SCHEMA_VERSION:
            return
        if version == 1:  # rows hashed before have no traits: update rehashes them
            with self.db:
                self.db.execute("ALTER TABLE images ADD COLUMN traits TEXT")
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        with self.db:  # version 0: a new file
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('db_id', ?)",
                            (uuid.uuid4().hex,))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                            (COVERAGE_KEY, Coverage("", []).to_meta()))

    def snapshot(self) -> None:
        """From here to close(), every read sees one state of the database
        (a read transaction): an update running beside a search cannot take
        away a row between the index and the rows it points to.  Writers
        wait for it (busy_timeout), so hold it only while reading."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN")

    def end_snapshot(self) -> None:
        if self.db.in_transaction:
            self.db.commit()

    def close(self) -> None:
        self.db.close()

    # ---- meta ----
    def meta(self) -> dict:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(k, str(v)) for k, v in values.items()])

    def hash_kind(self) -> str | None:
        return self.meta().get("hash_kind")

    def fingerprint(self) -> str:
        """Changes whenever the stored hashes change (every write bumps it)."""
        meta = self.meta()
        count = self.db.execute("SELECT count(*) FROM images").fetchone()[0]
        return f"{meta['db_id']}:{meta['generation']}:{count}{self._scope_tag()}"

    # ---- coverage (Scoped) ----
    def _coverage_text(self) -> str | None:
        return self.meta().get(COVERAGE_KEY)

    def _set_coverage(self, cov: Coverage) -> None:
        self.set_meta(**{COVERAGE_KEY: cov.to_meta()})

    def _legacy_coverage(self, kind: str) -> Coverage:
        """A database from before coverage was recorded: the folders of this
        run that hold rows count as covered; others may hold rows too."""
        if self.hash_kind() != kind:
            return Coverage(kind, [])
        found = [r for r in self.scope_roots if self.db.execute(
            "SELECT EXISTS (SELECT 1 FROM images WHERE "
            f"{self._ranges_sql([r])[0]})", self._ranges_sql([r])[1]
        ).fetchone()[0]]
        return Coverage(kind, found, True)

    def _rows_outside(self, roots: Sequence[str]) -> bool:
        sql, params = self._ranges_sql(roots)
        return bool(self.db.execute("SELECT EXISTS (SELECT 1 FROM images "
                                    f"WHERE NOT ({sql}))", params).fetchone()[0])

    @staticmethod
    def _ranges_sql(roots: Sequence[str]) -> tuple[str, list]:
        """A condition true for rows under `roots`: byte ranges of the path,
        for paths stored as TEXT and as BLOB (SQLite compares them apart)."""
        parts, params = [], []
        for root in roots:
            lo, hi = _root_range(root)
            ranges = [(lo, hi)]
            with contextlib.suppress(UnicodeDecodeError):
                ranges.append((lo.decode("utf-8"), hi.decode("utf-8")))
            for a, b in ranges:
                parts.append("(path >= ? AND path < ?)")
                params += [a, b]
        return " OR ".join(parts) or "0", params

    def _scope_sql(self) -> tuple[str, list]:
        if self.scope is None:
            return "1", []
        sql, params = self._ranges_sql(self.scope)
        return f"({sql})", params

    # ---- writes: each call is one transaction ----
    def start_kind(self, spec: HashSpec) -> None:
        """Record the hash kind; drop hashes of any other kind or made by a
        Pillow that resized another way."""
        if not comparable(self.meta(), spec):
            with self.db:
                self.db.execute("DELETE FROM images")
                self._bump()
        with self.db:  # the secret that signs the cache files, made once
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('index_key', ?)",
                            (os.urandom(32).hex(),))
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self.set_meta(**kind_meta(spec))

    def upsert(self, rows: Sequence[ImageRow], bits: int) -> None:
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT INTO images (path, size, mtime_ns, digest, hash, variants, "
                "low_detail, detail, width, height, error, hashed_at, traits) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
                "mtime_ns=excluded.mtime_ns, digest=excluded.digest, "
                "hash=excluded.hash, variants=excluded.variants, "
                "low_detail=excluded.low_detail, detail=excluded.detail, "
                "width=excluded.width, "
                "height=excluded.height, error=excluded.error, "
                "hashed_at=excluded.hashed_at, traits=excluded.traits",
                [(path_to_db(r.path), r.size, r.mtime_ns, r.digest,
                  hash_to_db(r.hash, bits), r.extra, int(r.low_detail),
                  r.detail, r.width, r.height, r.error, now, r.traits)
                 for r in rows])
            self._bump()

    def delete_paths(self, paths: Iterable[str]) -> int:
        keys = [(path_to_db(p),) for p in paths]
        with self.db:
            self.db.executemany("DELETE FROM images WHERE path = ?", keys)
            self._bump()
        return len(keys)

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                        "WHERE key = 'generation'")

    # ---- reads ----
    def use_roots(self, roots) -> None:
        pass  # one machine: rows need no owner

    def states(self, roots=None) -> dict:
        """path -> RowState for every stored file under `roots` (all when
        None): what update compares, and what it may delete."""
        sql, params = ("1", []) if roots is None else self._ranges_sql(roots)
        return {path_from_db(p): RowState(s, m, bool(ok)) for p, s, m, ok in
                self.db.execute("SELECT path, size, mtime_ns, error IS NULL "
                                "AND traits IS NOT NULL FROM images WHERE "
                                f"{sql}", params)}

    def hashed_with_size(self, size: int) -> set:
        """Digests of the hashed files of this size (moved or copied files)."""
        cur = self.db.execute("SELECT digest FROM images WHERE size = ? AND "
                              "hash IS NOT NULL AND traits IS NOT NULL", (size,))
        return {digest for digest, in cur}

    def hashed_by_digest(self, size: int, digest: bytes) -> ImageRow | None:
        cur = self.db.execute(f"SELECT {self.ROW_COLUMNS} FROM images WHERE "
                              "size = ? AND digest = ? AND hash IS NOT NULL "
                              "AND traits IS NOT NULL LIMIT 1", (size, digest))
        row = cur.fetchone()
        return None if row is None else image_row(row)

    def hash_arrays(self, words: int, extra: int, block: int = 1 << 16
                    ) -> HashArrays:
        """Every comparable image (hashed, not low-detail) in scope."""
        scope, params = self._scope_sql()
        cur = self.db.execute("SELECT id, hash, variants, detail FROM images "
                              "WHERE hash IS NOT NULL AND low_detail = 0 "
                              f"AND {scope} ORDER BY id", params)
        # A block of rows at a time: Python objects for every row would cost
        # 190 bytes each (190 MB at a million); the arrays cost 36.
        blocks = []
        while rows := cur.fetchmany(block):
            blocks.append(self._hash_block(rows, words, extra))
        return join_hash_blocks(blocks, words, extra)

    def _hash_block(self, rows: list, words: int, extra: int) -> HashArrays:
        n = len(rows)
        ids = np.fromiter((r[0] for r in rows), np.int64, n)
        if words == 1:
            hashes = np.fromiter((r[1] for r in rows), np.int64, n).view(np.uint64)
        else:
            hashes = np.frombuffer(b"".join(r[1] for r in rows),
                                   dtype=">u8").astype(np.uint64)
        found = np.frombuffer(b"".join(r[2] or b"" for r in rows),
                              dtype=">u8").astype(np.uint64)
        if found.size != n * extra * words:
            raise StoreError(f"{self.path}: stored extra hashes (orientations, "
                             f"centres) do not match the settings; run build.")
        details = np.fromiter((4.0 if r[3] is None else r[3] for r in rows),
                              np.float32, n)
        return HashArrays(ids, hashes.reshape(n, words),
                          found.reshape(n, extra, words), details)

    def low_detail_rows(self) -> list:
        return self._rows_where("low_detail = 1")

    def failed_rows(self) -> list:
        return self._rows_where("error IS NOT NULL")

    def _rows_where(self, condition: str) -> list:
        scope, params = self._scope_sql()
        cur = self.db.execute(f"SELECT {self.ROW_COLUMNS} FROM images WHERE "
                              f"{condition} AND {scope} ORDER BY path", params)
        return list(map(image_row, cur))

    def rows_by_id(self, ids: Iterable[int]) -> dict:
        ids = sorted({int(i) for i in ids})
        rows = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            marks = ",".join("?" * len(part))
            cur = self.db.execute(f"SELECT {self.ROW_COLUMNS} FROM images "
                                  f"WHERE id IN ({marks})", part)
            rows.update((r.id, r) for r in map(image_row, cur))
        return rows

    def rows_by_path(self, paths: Iterable[str]) -> dict:
        keys = sorted({path_to_db(p) for p in paths}, key=repr)
        rows = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            marks = ",".join("?" * len(part))
            cur = self.db.execute(f"SELECT {self.ROW_COLUMNS} FROM images "
                                  f"WHERE path IN ({marks})", part)
            rows.update((r.path, r) for r in map(image_row, cur))
        return rows

    def iter_rows(self) -> Iterator[ImageRow]:
        cur = self.db.execute(f"SELECT {self.ROW_COLUMNS} FROM images ORDER BY path")
        return map(image_row, cur)


class RunLock:
    """One writer per database: a second run waits, then stops with a message."""

    def __init__(self, db_path: str, timeout: float):
        self.path = db_path + ".lock"
        self.timeout = timeout
        self.fh = None

    def __enter__(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:  # never created or opened through a planted link
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW |
                         _CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM,
                             errno.ENOSPC) and not os.path.islink(self.path):
                raise StoreError(
                    f"cannot write in db_dir {os.path.dirname(self.path)} "
                    f"({exc.strerror}): build, update, move and undo write "
                    f"the database there; give write access or free space, "
                    f"or choose another db_dir (search and export only read "
                    f"it).") from None
            why = "is a symbolic link" if os.path.islink(self.path) else \
                f"cannot be opened ({exc.strerror})"
            raise StoreError(f"the lock file {self.path} {why}; remove it "
                             f"(no run is using it then).") from None
        self.fh = os.fdopen(fd, "r+b")
        deadline = time.monotonic() + self.timeout
        while not self._try_lock():
            if time.monotonic() >= deadline:
                self.fh.close()
                raise StoreError(
                    f"another reverse_search run is writing {self.path[:-5]} "
                    f"(waited {self.timeout:g} s, see lock_timeout); try again "
                    f"when it has finished.")
            time.sleep(0.1)
        return self

    def _try_lock(self) -> bool:
        try:
            if os.name == "nt":
                import msvcrt
                msvcrt.locking(self.fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def __exit__(self, *exc) -> None:
        self.fh.close()  # closing releases the lock on every platform


# ============================================================================
# Index
# ============================================================================
#
# The index file in bk_dir is a cache of the database: a header (format, tool
# version, hash kind, database fingerprint) and numpy arrays, loaded without
# pickle.  Engines work on the distinct hashes only; images that share a hash
# are found through img_order/img_starts (a CSR map, outside any tree).
# From SEARCH_TABLES_FROM images a search reads search.idx instead, a block
# file read in part (see "search tables" below).

def bit_distance(a: int, b: int) -> int:
    """Hamming distance of two hashes held as Python ints."""
    return (a ^ b).bit_count()


def distances(hashes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of (N, W) uint64 hashes to one query."""
    if hashes.shape[1] == 1:
        return np.bitwise_count(hashes[:, 0] ^ query[0])
    return np.bitwise_count(hashes ^ query).sum(axis=1, dtype=np.uint16)


def row_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance of row i of a to row i of b."""
    return np.bitwise_count(a ^ b).sum(axis=1, dtype=np.uint16)


def int_to_words(value: int, words: int) -> np.ndarray:
    return np.array([(value >> (64 * (words - 1 - w))) & (2**64 - 1)
                     for w in range(words)], dtype=np.uint64)


def words_to_ints(hashes: np.ndarray) -> list:
    if hashes.shape[1] == 1:
        return hashes[:, 0].tolist()
    return [int.from_bytes(row.astype(">u8").tobytes(), "big") for row in hashes]


MAC_HOLE = "0" * 64  # where the header's MAC goes, same length as the MAC


class _Signing:
    """A file whose every write also goes into a MAC."""

    def __init__(self, fh, mac):
        self.fh, self.mac = fh, mac

    def write(self, data) -> int:
        self.mac.update(data)
        return self.fh.write(data)


def write_container(path: str, header: dict, arrays: dict, key: bytes = b""
                    ) -> None:
    """Header plus arrays, created fresh and renamed into place.

    The header carries an HMAC-SHA256 of itself and every byte after it,
    keyed by `key` (a secret kept in the database): a file changed by
    anything but this tool (a flipped bit, a crafted array) does not load."""
    import hmac
    header = dict(header, arrays=list(arrays), mac=MAC_HOLE)
    blob = json.dumps(header).encode("utf-8")
    hole = blob.index(MAC_HOLE.encode()) + len(INDEX_MAGIC) + 8

    def write(fh):
        fh.write(INDEX_MAGIC + len(blob).to_bytes(8, "little") + blob)
        out = _Signing(fh, hmac.new(key, blob, "sha256"))
        for array in arrays.values():
            np.lib.format.write_array(out, np.ascontiguousarray(array),
                                      allow_pickle=False)
        fh.seek(hole)
        fh.write(out.mac.hexdigest().encode())
    _atomic_write(path, write, binary=True, sync=True)


def _npy_view(body: bytearray, at: int) -> tuple[np.ndarray, int]:
    """The .npy array written at `at` of body, as a view of it (a copy only
    when its place in the file leaves it unaligned), and where it ends.
    Never an object array: nothing is unpickled."""
    if bytes(body[at:at + 6]) != b"\x93NUMPY" or len(body) < at + 12 \
            or body[at + 6] not in (1, 2, 3):
        raise ValueError("not an array")
    width = 2 if body[at + 6] == 1 else 4
    end = at + 8 + width + int.from_bytes(body[at + 8:at + 8 + width], "little")
    fp = io.BytesIO(bytes(body[at:end]))
    np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if body[at + 6] == 1 else \
        np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    if dtype.hasobject or fortran or min(shape, default=0) < 0:
        raise ValueError("an array of a kind this tool never writes")
    stop = end + math.prod(shape) * dtype.itemsize
    if stop > len(body):
        raise ValueError("an array cut short")
    array = np.frombuffer(body, dtype, math.prod(shape), end).reshape(shape)
    if not array.flags.aligned:
        array = array.copy()
    return array, stop


def read_container(path: str, key: bytes = b"") -> tuple[dict, dict]:
    """(header, arrays); ValueError or OSError when the file is not one of
    ours: wrong magic or MAC, or arrays other than the header lists.

    The file is read once into memory, its MAC taken there, and the arrays
    are views of it (np.frombuffer: no second read, no copy; numpy's .npy
    reader read the file again after the MAC and copied every array: the
    1.4 GB index of 1,000,000 images 4.9-5.3 -> 1.9-2.1 s of CPU)."""
    import hmac
    with open(path, "rb") as fh:
        if fh.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
            raise ValueError("not an index file")
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 2**20:
            raise ValueError("damaged header")
        blob = fh.read(size)
        header = json.loads(blob.decode("utf-8"))
        mac = header.get("mac") if isinstance(header, dict) else None
        if not isinstance(mac, str) or len(mac) != len(MAC_HOLE):
            raise ValueError("no checksum")
        body = bytearray(max(0, os.fstat(fh.fileno()).st_size - fh.tell()))
        if fh.readinto(body) != len(body) or fh.read(1):
            raise ValueError("the file changed while it was read")
    found = hmac.new(key, blob.replace(f'"mac": "{mac}"'.encode(),
                                       f'"mac": "{MAC_HOLE}"'.encode(), 1),
                     "sha256")
    found.update(body)
    if not hmac.compare_digest(found.hexdigest(), mac):
        raise ValueError("checksum does not match")
    arrays, at = {}, 0
    for name in header["arrays"]:
        arrays[name], at = _npy_view(body, at)
    if at != len(body):
        raise ValueError("data after the arrays")
    return header, arrays


# ---- engines: each answers search() and pairs() over distinct hashes ----

class ScanEngine:
    """Vectorised popcount over every hash: no build cost, exact."""

    name = "scan"

    def __init__(self, hashes: np.ndarray):
        self.hashes = hashes

    def search(self, query: np.ndarray, radius: int):
        d = distances(self.hashes, query)
        pos = np.flatnonzero(d <= radius)
        return pos, d[pos]

    def pairs(self, radius: int):
        """All (i, j, d) with i < j and d <= radius."""
        return self.cross(self.hashes, radius, upper=True)

    def cross(self, queries: np.ndarray, radius: int, upper: bool = False,
              block_bytes: int = 2 * 2**20):
        """(query row, hash position, d) for every pair within radius; with
        upper, queries are the hashes themselves and only i < j is kept.
        Blocks of a few MiB stay in the CPU cache."""
        h, n = self.hashes, len(self.hashes)
        one_word = h.shape[1] == 1  # 64-bit: no sum over a word axis
        rows = max(1, block_bytes // max(1, 8 * n * h.shape[1]))
        for start in range(0, len(queries), rows):
            stop = min(len(queries), start + rows)
            first = start if upper else 0  # below the diagonal is done
            if one_word:
                d = np.bitwise_count(queries[start:stop, 0, None] ^ h[None, first:, 0])
            else:
                d = np.bitwise_count(queries[start:stop, None, :] ^
                                     h[None, first:, :]).sum(axis=2, dtype=np.uint16)
            i, j = np.nonzero(d <= radius)
            dist = d[i, j]
            i, j = i + start, j + first
            if upper:
                keep = j > i
                i, j, dist = i[keep], j[keep], dist[keep]
            yield i, j, dist


def _flip_masks(bits: int, most: int) -> np.ndarray:
    """Every value of `bits` bits with at most `most` bits set."""
    from itertools import combinations
    out = [0]
    for k in range(1, min(most, bits) + 1):
        out.extend(sum(1 << b for b in combo)
                   for combo in combinations(range(bits), k))
    return np.array(out, dtype=np.uint64)


def _ball(bits: int, most: int) -> int:
    return sum(math.comb(bits, k) for k in range(min(most, bits) + 1))


@dataclass
class Chunk:
    """A run of bits of every hash: word column, shift and width."""

    word: int
    shift: int
    bits: int

    def values(self, hashes: np.ndarray) -> np.ndarray:
        col = hashes[:, self.word] >> np.uint64(self.shift)
        return col & np.uint64((1 << self.bits) - 1)


def plan_chunks(total_bits: int, words: int, parts: int) -> list:
    """Split the hash into about `parts` chunks that never cross a word."""
    bounds = [round(k * total_bits / parts) for k in range(parts + 1)]
    chunks = []
    for lo, hi in zip(bounds, bounds[1:]):
        while lo < hi:  # bit p lives in word (words-1-p//64) at shift p%64
            word_end = (lo // 64 + 1) * 64
            top = min(hi, word_end)
            chunks.append(Chunk(words - 1 - lo // 64, lo % 64, top - lo))
            lo = top
    return chunks


def chunk_radii(widths: list, radius: int) -> list:
    """Per-chunk search radius by the pigeonhole principle with remainder: a
    hash within `radius` is within r_k of the query on some chunk k when
    sum(r_k + 1) > radius, so with radius = m*q + a only a + 1 chunks need q
    and the other m - a - 1 (the widest) need q - 1 (-1: not probed)."""
    m = len(widths)
    q, a = divmod(radius, m)
    radii = [q] * m
    for k in sorted(range(m), key=lambda k: -widths[k])[:m - a - 1]:
        radii[k] = q - 1
    return radii


def probed_chunks(chunks: list, radius: int) -> list:
    """[(k, chunk, most)]: the chunks a search within `radius` probes, each
    with the most bits its probes differ in (chunk_radii), for MIHEngine,
    plan_mih and PostgreSQL's search alike (any chunks with .bits)."""
    radii = chunk_radii([c.bits for c in chunks], radius)
    return [(k, c, most) for k, (c, most) in enumerate(zip(chunks, radii))
            if most >= 0]


class MIHEngine:
    """Multi-index hashing: a hash within r bits of the query agrees with it
    within a few bits on at least one of m chunks (chunk_radii).  Probe those
    chunk neighbourhoods, then verify the candidates with popcount."""

    name = "mih"

    def __init__(self, hashes: np.ndarray, total_bits: int, parts: int,
                 orders: list | None = None):
        """orders: each chunk's order as a cache file held it (checked:
        ValueError unless it is the one this engine would make; for a
        bucket table, when the table is first used, see _trusted)."""
        self.hashes, self.total_bits, self.parts = hashes, total_bits, parts
        self.chunks = plan_chunks(total_bits, hashes.shape[1], parts)
        # a direct bucket table while it is not much larger than the data
        self.table_bits = mih_table_bits(len(hashes))
        orders = orders or [None] * len(self.chunks)
        if len(orders) != len(self.chunks):
            raise ValueError("orders do not fit the chunks")
        self.checked = [o is None for o in orders]  # cached orders: not yet
        self.tables = [self._table(c, o) for c, o in zip(self.chunks, orders)]
        self._masks = {}

    def _trusted(self, k: int, ordered: np.ndarray | None = None,
                 block: int = 1 << 20) -> None:
        """ValueError unless table k's order (from a cache) sorts the
        hashes.  Checked on first use, where _cross_word reads the hashes in
        that order anyway (`ordered`: the hashes in it, as rows), not when
        the engine is made: one random read of 16,100,000 windows per chunk
        less (100,000 images: 1.6 s of CPU); in blocks, so the check adds
        little memory to the cross's."""
        if self.checked[k]:
            return
        order, chunk = self.tables[k][0], self.chunks[k]
        if ordered is None:
            ordered = self.hashes[order]
        for lo in range(0, len(order), block):  # blocks overlap by one
            _check_ranked(order[lo:lo + block + 1],
                          chunk.values(ordered[lo:lo + block + 1]))
        self.checked[k] = True

    def orders(self) -> list:
        """Each chunk's order (what a cache file of the tables holds)."""
        return [t[0] for t in self.tables]

    def _table(self, chunk: Chunk, order: np.ndarray | None = None):
        """(order, sorted values or None, bucket starts or None)."""
        vals = chunk.values(self.hashes)
        if order is None:
            order = stable_order(vals, chunk.bits)
        elif chunk.bits <= self.table_bits:  # sorted on first use (_trusted)
            order = _order_in_range(order, vals)
        else:
            order = _checked_order(order, vals)
        if chunk.bits <= self.table_bits:
            counts = np.bincount(vals.astype(np.int64), minlength=1 << chunk.bits)
            starts = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
            return order, None, starts
        return order, vals[order], None

    def masks(self, bits: int, most: int) -> np.ndarray:
        key = (bits, most)
        if key not in self._masks:
            self._masks[key] = _flip_masks(bits, most)
        return self._masks[key]

    def _ranges(self, k: int, probes: np.ndarray):
        """(first, count) into table k's order for each probe value."""
        order, sorted_vals, starts = self.tables[k]
        if starts is not None:
            p = probes.astype(np.intp)
            first = starts[p]
            return first, starts[p + 1] - first
        lo = np.searchsorted(sorted_vals, probes, "left")
        hi = np.searchsorted(sorted_vals, probes, "right")
        return lo, hi - lo

    def search(self, query: np.ndarray, radius: int):
        found = []
        for k, chunk, most in probed_chunks(self.chunks, radius):
            self._trusted(k)
            qv = chunk.values(query[None, :])[0]
            first, count = self._ranges(k, qv ^ self.masks(chunk.bits, most))
            found.append(self.tables[k][0][_expand(first, count)])
        cand = np.unique(np.concatenate(found))
        d = distances(self.hashes[cand], query)
        keep = d <= radius
        return cand[keep], d[keep]

    def pairs(self, radius: int, budget: int = 4_000_000):
        """All (i, j, d), i < j, d <= radius; each pair once.  Works on the
        occupied buckets of each chunk: pairs inside a bucket, then each
        unordered pair of buckets (v, w = v ^ mask > v), probed once."""
        n = len(self.hashes)
        found = []
        for k, _, most in probed_chunks(self.chunks, radius):
            self._trusted(k)
            order, sorted_vals, starts = self.tables[k]
            ordered = self.hashes[order]  # verify in bucket order, map back

            def verify(a, b):
                d = row_distances(ordered[a], ordered[b])
                near = np.flatnonzero(d <= radius)
                i, j = order[a[near]], order[b[near]]
                found.append((np.minimum(i, j), np.maximum(i, j), d[near]))
            if starts is not None:
                size = np.diff(starts)
                occupied = np.flatnonzero(size)
                first, count = starts[occupied], size[occupied]
                occupied = occupied.astype(np.uint64)
            else:
                occupied, first, count = np.unique(
                    sorted_vals, return_index=True, return_counts=True)
            # inside one bucket: position p pairs with p+1 .. the bucket's end
            end = np.repeat(first + count, count)
            pos = np.arange(n, dtype=np.int64)
            for sel, idx in _expand_windows(pos + 1, end - pos - 1, budget):
                verify(sel, idx)
            self._bucket_pairs(k, most, occupied, first, count, budget,
                               verify)
        yield from _dedupe_pairs(found, n)

    def _bucket_pairs(self, k, most, occupied, first, count, budget, verify):
        """Items of bucket v against those of w = v ^ mask, for w > v only:
        that is when v has a 0 at the mask's top bit."""
        masks = self.masks(self.chunks[k].bits, most)[1:]
        if not len(masks):
            return
        top = np.floor(np.log2(masks.astype(np.float64))).astype(np.int64)
        for t in range(self.chunks[k].bits):
            mt = masks[top == t]
            if not len(mt):
                continue
            vs = np.flatnonzero(((occupied >> np.uint64(t)) & np.uint64(1)) == 0)
            step = max(1, budget // (4 * len(mt)))
            for lo in range(0, len(vs), step):
                own = vs[lo:lo + step]
                w = (occupied[own, None] ^ mt[None, :]).ravel()
                wfirst, wcount = self._ranges(k, w)
                live = np.flatnonzero(wcount)
                owner = own[live // len(mt)]
                wfirst, wcount = wfirst[live], wcount[live]
                for rsel, apos in _expand_windows(first[owner], count[owner],
                                                  budget):
                    for ssel, bpos in _expand_windows(wfirst[rsel],
                                                      wcount[rsel], budget):
                        verify(apos[ssel], bpos)

    def cross(self, queries: np.ndarray, radius: int, budget: int = 4_000_000):
        """(query row, hash position, d) for every pair within radius, each
        once (orientation variants against the stored hashes)."""
        if self.hashes.shape[1] == 1:
            yield from self._cross_word(queries[:, 0], radius)
            return
        found = []
        for k, chunk, most in probed_chunks(self.chunks, radius):
            self._trusted(k)
            masks = self.masks(chunk.bits, most)
            vals = chunk.values(queries)
            order = self.tables[k][0]
            step = max(1, budget // (4 * len(masks)))
            for start in range(0, len(queries), step):
                items = np.arange(start, min(len(queries), start + step))
                probes = (vals[items, None] ^ masks[None, :]).ravel()
                owners = np.repeat(items, len(masks))
                first, count = self._ranges(k, probes)
                for sel, idx in _expand_windows(first, count, budget):
                    i, j = owners[sel], order[idx]
                    d = row_distances(queries[i], self.hashes[j])
                    near = d <= radius
                    found.append((i[near], j[near], d[near]))
        yield from _dedupe_pairs(found, len(self.hashes))

    def _cross_word(self, column: np.ndarray, radius: int,
                    budget: int = 1 << 18):
        """cross() of one-word hashes: 1-D arrays, each candidate's query
        value repeated from its probe and the hashes read in bucket order
        (700,000 orientations against the 8,000,000 windows of 100,000
        images: 8.9 -> 5.4 s of CPU, side by side), in steps that stay in
        the CPU's cache (1<<18 candidates, not 4,000,000: 2.35 -> 1.55 s
        for 200,000 queries against 8,000,000 hashes)."""
        found = []
        for k, chunk, most in probed_chunks(self.chunks, radius):
            masks = self.masks(chunk.bits, most)
            vals = chunk.values(column[:, None])
            order = self.tables[k][0]
            ordered = self.hashes[order, 0]
            self._trusted(k, ordered[:, None])
            step = max(1, budget // (4 * len(masks)))
            for start in range(0, len(column), step):
                stop = min(len(column), start + step)
                probes = (vals[start:stop, None] ^ masks[None, :]).ravel()
                first, count = self._ranges(k, probes)
                live = np.flatnonzero(count)
                for a, b, idx in _ranges_in_windows(first[live], count[live],
                                                    budget):
                    # each candidate's query value repeated from its probe;
                    # which probe only for the few within radius (one read
                    # of every candidate less: 200,000 queries against the
                    # 16,100,000 windows of 100,000 images, 3.08 -> 2.91 s
                    # of CPU, medians of 5 alternations)
                    asked = column[start + live[a:b] // len(masks)]
                    c = count[live[a:b]]
                    d = np.bitwise_count(np.repeat(asked, c) ^ ordered[idx])
                    near = np.flatnonzero(d <= radius)
                    j = live[a + np.searchsorted(np.cumsum(c), near, "right")]
                    found.append((start + j // len(masks), order[idx[near]],
                                  d[near].astype(np.uint16)))
        yield from _dedupe_pairs(found, len(self.hashes))


def stable_order(vals: np.ndarray, bits: int) -> np.ndarray:
    """np.argsort(vals, kind="stable") as int64, for values of `bits`
    bits: value and position packed in one word and sorted (numpy sorts
    plain words 3x faster than it argsorts them: 8,000,000 windows' chunk
    1.4 -> 0.8-1.1 s)."""
    n = len(vals)
    if bits > 32 or n >= 1 << 32:
        return np.argsort(vals, kind="stable").astype(np.int64)
    packed = (vals.astype(np.uint64) << np.uint64(32)) | \
        np.arange(n, dtype=np.uint64)
    packed.sort()
    return (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _checked_order(order: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """order as int64 if it is stable_order(vals): every position once,
    (value, position) strictly increasing along it; else ValueError."""
    order = _order_in_range(order, vals)
    _check_ranked(order, vals[order])
    return order


def _order_in_range(order: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """order as int64 if it has vals' shape and only positions of vals."""
    if order.shape != vals.shape or order.dtype.kind not in "iu":
        raise ValueError("an order of the wrong shape or type")
    order = order.astype(np.int64)
    if len(order) and (order.min() < 0 or order.max() >= len(order)):
        raise ValueError("an order out of range")
    return order


def _check_ranked(order: np.ndarray, ranked: np.ndarray) -> None:
    """ValueError unless (ranked, order) rises strictly along the order
    (ranked: the values in that order), which with _order_in_range makes
    it stable_order of the values."""
    up = (ranked[1:] > ranked[:-1]) | ((ranked[1:] == ranked[:-1]) &
                                       (order[1:] > order[:-1]))
    if not up.all():  # (also: no position twice, so a permutation)
        raise ValueError("an order that does not sort the hashes")


def mih_table_bits(n: int) -> int:
    """Chunks up to this wide get a direct bucket table (not much larger
    than the data); wider ones are searched in sorted values."""
    return min(22, max(16, n.bit_length() + 2))


def _group_sorted(values: np.ndarray) -> tuple:
    """(distinct values as a column, positions grouped by value in their
    own order, CSR starts): np.unique's sort and a stable sort of its
    inverse in one stable sort (2-4x faster on the 8,000,000 windows of
    100,000 images)."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    first = np.ones(len(ranked), dtype=bool)
    np.not_equal(ranked[1:], ranked[:-1], out=first[1:])
    at = np.flatnonzero(first)
    return ranked[at].reshape(-1, 1), order, np.append(at, len(ranked))


def _expand(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenate the ranges [first, first + count)."""
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(first - (np.cumsum(count) - count), count)
    return offsets + np.arange(total, dtype=np.int64)


def _ranges_in_windows(first, count, budget):
    """(a, b, elements) of the ranges [first, first + count) (all
    nonempty), ranges a to b at a time, about `budget` elements each."""
    if not len(count):
        return
    ends = np.cumsum(count)
    cuts = np.searchsorted(ends, np.arange(budget, int(ends[-1]), budget), "left")
    bounds = np.unique(np.concatenate(([0], cuts + 1, [len(count)])))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        c = count[a:b]
        lo = int(ends[a] - count[a])
        base = np.repeat(first[a:b] - (ends[a:b] - c - lo), c)
        yield a, b, base + np.arange(int(ends[b - 1]) - lo, dtype=np.int64)


def _expand_windows(first, count, budget):
    """(range index per element, element) of the ranges [first, first +
    count), in windows of about `budget` elements cut at range boundaries."""
    live = np.flatnonzero(count)
    count = count[live]
    for a, b, idx in _ranges_in_windows(first[live], count, budget):
        yield np.repeat(live[a:b], count[a:b]), idx


def _dedupe_pairs(found: list, n: int):
    if not found:
        return
    i = np.concatenate([f[0] for f in found])
    j = np.concatenate([f[1] for f in found])
    d = np.concatenate([f[2] for f in found])
    key, first = np.unique(i * n + j, return_index=True)
    yield i[first], j[first], d[first]


# ---- block files: arrays read in part, each block checked when first read ----
#
# A search of a large collection reads a few thousand scattered blocks of
# its tables (search.idx), not the whole file: reading and MACing all of
# hashes.idx was 8 of the 10 s of one search at 1,000,000 images.  So a
# block file is checked a block at a time.  Layout: BLOCK_MAGIC padded to
# one block; each array's bytes from a block boundary, zero-padded to the
# next; then each array's block digests (the first DIGEST_BYTES of the
# SHA-256 of each BLOCK_BYTES of it); then the header (JSON) and its length
# (8 bytes, little-endian).  The header names every array (dtype, shape,
# where it starts, where its digests start, the SHA-256 of its digests) and
# carries an HMAC-SHA256 of itself keyed by the database's secret, as
# write_container's do.  Trust is a chain: the header's MAC (the key), then
# an array's digests against the header's SHA-256 of them, then a block
# against its digest (a second preimage of a truncated SHA-256: 2^128 work,
# against the 2^256 of the whole-file MAC, which no one can do either).  A
# block is copied out of the file into the reader's own memory and checked
# there, and only that copy is used, so the file changing after the check
# changes nothing (as read_container's one read did).  A changed, cut or
# crafted file raises CacheDamaged before any of its wrong bytes is used.

BLOCK_MAGIC = b"REVERSE-SEARCH-BLOCKS\n"
BLOCK_BYTES = 4096  # the least a scattered read costs (one page)
DIGEST_BYTES = 16


class CacheDamaged(ValueError):
    """A block file that is not what this tool wrote (ValueError: any
    cache loader's 'damaged, rebuild it')."""


def _block_digests(raw: np.ndarray) -> bytes:
    """The digest of each BLOCK_BYTES of raw (uint8), concatenated; the
    last block zero-padded, as the file holds it."""
    view, sha = memoryview(raw), hashlib.sha256
    full = len(raw) - len(raw) % BLOCK_BYTES
    out = [sha(view[at:at + BLOCK_BYTES]).digest()[:DIGEST_BYTES]
           for at in range(0, full, BLOCK_BYTES)]
    if full < len(raw):
        out.append(sha(bytes(view[full:]).ljust(BLOCK_BYTES, b"\0"))
                   .digest()[:DIGEST_BYTES])
    return b"".join(out)


def write_blocks(path: str, header: dict, arrays: dict, key: bytes) -> None:
    """A block file of `arrays` (name -> array, or a function making it,
    called when it is written so only one is in memory at a time), created
    fresh and renamed into place."""
    import hmac

    def write(fh):
        fh.write(BLOCK_MAGIC.ljust(BLOCK_BYTES, b"\0"))
        at, layout, digests = BLOCK_BYTES, {}, []
        for name, array in arrays.items():
            array = np.ascontiguousarray(array() if callable(array) else array)
            if array.dtype.kind not in "uif" or array.ndim < 1:
                raise ValueError(f"{name}: not a plain array")
            raw = array.reshape(-1).view(np.uint8)
            pad = -len(raw) % BLOCK_BYTES
            fh.write(raw.data)
            fh.write(b"\0" * pad)
            digests.append(_block_digests(raw))
            layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                            "at": at, "digests": hashlib.sha256(
                                digests[-1]).hexdigest()}
            at += len(raw) + pad
        for spec, digest in zip(layout.values(), digests):
            spec["digests_at"] = at
            fh.write(digest)
            at += len(digest)
        blob = json.dumps(dict(header, arrays=layout, block=BLOCK_BYTES,
                               mac=MAC_HOLE)).encode("utf-8")
        mac = hmac.new(key, blob, "sha256").hexdigest().encode()
        hole = blob.rindex(MAC_HOLE.encode())  # "mac" is the last key
        fh.write(blob[:hole] + mac + blob[hole + len(mac):])
        fh.write(len(blob).to_bytes(8, "little"))
    # no fsync (6 GB at 1,000,000 images): a file that a crash leaves half
    # on disk fails its digests when read, and is written again
    _atomic_write(path, write, binary=True)


@dataclass
class _BlockArray:
    """One array of a block file: where it lies, and what is checked."""

    dtype: np.dtype
    shape: tuple
    at: int
    nbytes: int
    digests: np.ndarray   # (blocks, DIGEST_BYTES) uint8, checked
    own: np.ndarray       # (nbytes,) uint8: the checked copy of each block
    checked: np.ndarray   # (blocks,) bool

    def view(self) -> np.ndarray:
        return self.own[:self.nbytes].view(self.dtype).reshape(self.shape)


def _own_pages(nbytes: int) -> np.ndarray:
    """nbytes of zeroed memory, given a page when first written: np.empty
    of a large array asks for huge pages, and a few thousand scattered
    blocks then took 2 MB each (100,000 images: 2.1 s and 970 MB)."""
    import mmap
    memory = mmap.mmap(-1, max(1, nbytes))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, np.uint8, nbytes)


class BlockFile:
    """A block file opened for reading: its header checked, its arrays
    read in part (take, ranges) or whole, each block checked on first use.
    Only arrays of plain numbers: nothing is unpickled or executed."""

    def __init__(self, path: str, key: bytes):
        # read, not mapped: a mapping's page faults bring in 64 KB around
        # each block (1,000,000 images: 1.4 GB peak, 0.9 GB read, not 0.1)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) |
                     getattr(os, "O_BINARY", 0))  # a FIFO must not block
        self.fh = os.fdopen(fd, "rb", buffering=0)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CacheDamaged("not a file")
            self.header, self.size = self._open(key)
        except BaseException:
            self.close()
            raise
        if hasattr(os, "posix_fadvise"):  # only the blocks asked for
            os.posix_fadvise(self.fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        self.arrays: dict = {}

    def _open(self, key: bytes) -> tuple:
        """(header, where it starts) of the file, its MAC checked."""
        size = os.fstat(self.fh.fileno()).st_size
        if size < BLOCK_BYTES + 8 or \
                self._read(0, len(BLOCK_MAGIC)) != BLOCK_MAGIC:
            raise CacheDamaged("not a block file")
        length = int.from_bytes(self._read(size - 8, 8), "little")
        if not 0 < length < min(2**24, size - BLOCK_BYTES - 8):
            raise CacheDamaged("damaged header")
        blob = self._read(size - 8 - length, length)
        return self._checked_header(blob, key), size - 8 - length

    def _read(self, at: int, size: int, into=None) -> bytes:
        """size bytes at `at` (into a writable buffer when given)."""
        self.fh.seek(at)
        into = bytearray(size) if into is None else into
        got = self.fh.readinto(into)
        while got < size:
            more = self.fh.readinto(memoryview(into)[got:])
            if not more:
                raise CacheDamaged("the file is cut short")
            got += more
        return into

    def close(self) -> None:
        self.fh.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    @staticmethod
    def _checked_header(blob: bytes, key: bytes) -> dict:
        import hmac
        try:
            header = json.loads(blob.decode("utf-8"))
            mac = header["mac"]
            hole = blob.rindex(mac.encode())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CacheDamaged("damaged header") from None
        blank = blob[:hole] + MAC_HOLE.encode() + blob[hole + len(mac):]
        if len(mac) != len(MAC_HOLE) or not hmac.compare_digest(
                hmac.new(key, blank, "sha256").hexdigest(), mac):
            raise CacheDamaged("checksum does not match")
        if header.get("block") != BLOCK_BYTES or \
                not isinstance(header.get("arrays"), dict):
            raise CacheDamaged("from another version")
        return header

    def __contains__(self, name: str) -> bool:
        return name in self.header["arrays"]

    def _array(self, name: str) -> _BlockArray:
        """The array's record, its digests checked (on its first use)."""
        if name in self.arrays:
            return self.arrays[name]
        spec = self.header["arrays"].get(name)
        try:
            dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
            at, dat = int(spec["at"]), int(spec["digests_at"])
        except (TypeError, KeyError, ValueError):
            raise CacheDamaged(f"no array {name}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        blocks = -(-nbytes // BLOCK_BYTES)
        if dtype.kind not in "uif" or min(shape, default=0) < 0 or \
                BLOCK_BYTES % dtype.itemsize or at % BLOCK_BYTES or \
                not BLOCK_BYTES <= at <= at + blocks * BLOCK_BYTES <= self.size or \
                not 0 <= dat <= dat + blocks * DIGEST_BYTES <= self.size:
            raise CacheDamaged(f"array {name} out of place")
        digests = bytes(self._read(dat, blocks * DIGEST_BYTES))
        if hashlib.sha256(digests).hexdigest() != spec.get("digests"):
            raise CacheDamaged(f"array {name}: digests do not match")
        record = _BlockArray(dtype, shape, at, nbytes, np.frombuffer(
            digests, np.uint8).reshape(blocks, DIGEST_BYTES),
            _own_pages(blocks * BLOCK_BYTES), np.zeros(blocks, bool))
        self.arrays[name] = record
        return record

    def _check(self, a: _BlockArray, blocks: np.ndarray) -> None:
        """Read the blocks (sorted, unique) not checked yet out of the file,
        a run of neighbours at a time, then check each copy against its
        digest (one compare for all: 14,000 blocks 0.32 -> 0.05 s)."""
        todo = blocks[~a.checked[blocks]]
        if not len(todo):
            return
        own = a.own.reshape(-1, BLOCK_BYTES)
        cut = np.flatnonzero(np.diff(todo) != 1) + 1
        for b0, b1 in zip(todo[np.r_[0, cut]].tolist(),
                          (todo[np.r_[cut - 1, len(todo) - 1]] + 1).tolist()):
            self._read(a.at + b0 * BLOCK_BYTES, (b1 - b0) * BLOCK_BYTES,
                       memoryview(own[b0:b1]).cast("B"))
        sha = hashlib.sha256
        got = b"".join([sha(own[b]).digest()[:DIGEST_BYTES]
                        for b in todo.tolist()])
        if not np.array_equal(np.frombuffer(got, np.uint8).reshape(
                -1, DIGEST_BYTES), a.digests[todo]):
            raise CacheDamaged("a block does not match its digest")
        a.checked[todo] = True

    def shape(self, name: str) -> tuple:
        return self._array(name).shape

    def whole(self, name: str) -> np.ndarray:
        """The whole array, every block checked."""
        a = self._array(name)
        self._check(a, np.arange(len(a.checked)))
        return a.view()

    def take(self, name: str, index: np.ndarray) -> np.ndarray:
        """Elements `index` of a 1-D array (only their blocks checked)."""
        a = self._array(name)
        index = np.asarray(index, np.int64)
        if len(a.shape) != 1 or len(index) and (
                index.min() < 0 or index.max() >= a.shape[0]):
            raise CacheDamaged("an index out of range")
        self._check(a, np.unique(index * a.dtype.itemsize // BLOCK_BYTES))
        return a.view()[index]

    def ranges(self, name: str, first: np.ndarray, count: np.ndarray
               ) -> np.ndarray:
        """Elements [first, first + count) of a 1-D array, concatenated."""
        a = self._array(name)
        first, count = np.asarray(first, np.int64), np.asarray(count, np.int64)
        live = count > 0
        first, count = first[live], count[live]
        if not len(first):
            return a.view()[:0]
        if count.min() < 0 or first.min() < 0 or \
                (first + count).max() > a.shape[0]:
            raise CacheDamaged("a range out of range")
        size = a.dtype.itemsize
        b0 = first * size // BLOCK_BYTES
        b1 = ((first + count) * size - 1) // BLOCK_BYTES
        self._check(a, np.unique(_expand(b0, b1 - b0 + 1)))
        return a.view()[_expand(first, count)]


class BKTreeEngine:
    """pybktree over the distinct hashes, with an integer popcount distance.

    The tree's shape is kept as two plain arrays (links): node p's parent
    and its distance to it.  Nodes are the distinct hashes in order, which is
    also the order they were added, so every parent comes before its child."""

    name = "bktree"

    def __init__(self, hashes: np.ndarray, links: tuple | None = None):
        import pybktree
        self.tree_hashes = hashes
        self.values = words_to_ints(hashes)
        self.position = {v: p for p, v in enumerate(self.values)}
        with _no_gc():  # millions of small tuples: the collector only slows
            if links is None:
                self.tree = pybktree.BKTree(bit_distance, self.values)
            else:
                self.tree = pybktree.BKTree(bit_distance)
                self.tree.tree = self._grow(*links)

    def _grow(self, parent: np.ndarray, dist: np.ndarray):
        """pybktree's nested (item, {distance: child}) nodes from the links,
        which must describe a tree over these hashes (ValueError if not)."""
        n = len(self.values)
        if parent.shape != (n,) or dist.shape != (n,) or n == 0:
            raise ValueError("links do not fit the hashes")
        p = parent.astype(np.int64)
        child = np.arange(1, n)
        if n > 1 and not ((p[1:] >= 0) & (p[1:] < child)).all():
            raise ValueError("a parent does not come before its child")
        d = row_distances(self.tree_hashes[1:], self.tree_hashes[p[1:]])
        if not np.array_equal(d, dist[1:]):
            raise ValueError("links disagree with the hashes")
        nodes = [(v, {}) for v in self.values]
        kids = [node[1] for node in nodes]
        for up, far, node in zip(p[1:].tolist(), d.tolist(), nodes[1:]):
            kids[up][far] = node
        if sum(map(len, kids)) != n - 1:  # two children at one distance
            raise ValueError("links disagree with the hashes")
        return nodes[0]

    def links(self) -> dict:
        """{"parent", "dist"} arrays of the tree (what bktree.idx holds)."""
        n = len(self.values)
        parent, dist = np.zeros(n, np.int64), np.zeros(n, np.uint16)
        stack = [self.tree.tree] if n else []
        while stack:
            item, children = stack.pop()
            up = self.position[item]
            for far, node in children.items():
                parent[self.position[node[0]]] = up
                dist[self.position[node[0]]] = far
                stack.append(node)
        return {"parent": parent, "dist": dist}

    def search(self, query: np.ndarray, radius: int):
        q = words_to_ints(query[None, :])[0]
        hits = self.tree.find(q, radius)
        pos = np.array([self.position[v] for _, v in hits], dtype=np.int64)
        return pos, np.array([d for d, _ in hits], dtype=np.int64)

    def pairs(self, radius: int):
        return self.cross(self.tree_hashes, radius, upper=True)

    def cross(self, queries: np.ndarray, radius: int, upper: bool = False):
        for p, value in enumerate(words_to_ints(queries)):
            hits = [(self.position[v], d) for d, v in self.tree.find(value, radius)]
            hits = [(q, d) for q, d in hits if q > p or not upper]
            if hits:
                j = np.array([q for q, _ in hits], dtype=np.int64)
                yield np.full(len(j), p), j, np.array([d for _, d in hits])


# Costs in seconds, fitted on the reference machine with
# `bench/bench_index.py --ops calibrate`; only their ratios matter: they
# choose between exact engines and chunk counts.
COST_SCAN = 1.17e-9          # search: per hash word scanned
COST_CALL = 1.2e-5           # search: per chunk probed (numpy call overhead)
COST_PROBE = 7.8e-8          # search: per probe into a bucket table
COST_PROBE_SORTED = 1.8e-7   # search: per probe by binary search
COST_CAND = 1.4e-7           # search: per candidate verified
PAIR_SCAN = 8.7e-9           # pairs: per pair and word, scanning all pairs
PAIR_PROBE = 3.3e-8          # pairs: per probe into a bucket table
PAIR_PROBE_SORTED = 1.9e-7   # pairs: per probe by binary search
PAIR_CAND = 9.5e-8           # pairs: per candidate verified


def plan_mih(n: int, total_bits: int, words: int, radius: int,
             all_pairs: bool) -> tuple[int, float]:
    """(chunk count, estimated seconds) of the cheapest multi-index plan."""
    table_bits = mih_table_bits(n)
    best = (2, math.inf)
    for parts in range(2, min(total_bits, 64) + 1):
        chunks = plan_chunks(total_bits, words, parts)
        if max(c.bits for c in chunks) > 32:
            continue
        cost = 0.0
        for _, c, most in probed_chunks(chunks, radius):
            probes, cands = _ball(c.bits, most), n / 2**c.bits
            table = c.bits <= table_bits
            if all_pairs:
                cost += n * probes * ((PAIR_PROBE if table else PAIR_PROBE_SORTED)
                                      + cands * PAIR_CAND)
            else:
                cost += COST_CALL + probes * (
                    (COST_PROBE if table else COST_PROBE_SORTED) + cands * COST_CAND)
        if cost < best[1]:
            best = (parts, cost)
    return best


def choose_engine(n: int, total_bits: int, words: int, radius: int,
                  all_pairs: bool) -> str:
    """'scan' or 'mih', whichever the cost model says is cheaper."""
    scan = n * n / 2 * words * PAIR_SCAN if all_pairs else n * words * COST_SCAN
    mih = plan_mih(n, total_bits, words, radius, all_pairs)[1]
    return "mih" if mih < scan else "scan"


@dataclass
class RegionView:
    """Region hashes of many images (the content boxes) as an index of
    their own: row i of `index` belongs to image `owner[i]` of the main
    index and matched through match code `code[i]`."""

    index: FlatIndex
    owner: np.ndarray
    code: np.ndarray
    engine: object = None

    def rows_of(self, distinct_pos: np.ndarray) -> tuple:
        """(index into distinct_pos, row) for every row behind each of the
        view's distinct hashes."""
        return self.index.expand(distinct_pos)


@dataclass
class WindowRows:
    """The region windows of every image (K per image) as rows of one
    exact engine, for find_duplicates: not made distinct first, since
    sorting 8,000,000 windows (100,000 images) to find the few equal ones
    cost more than it saved (the region engines 9.1 -> 3.3 s of CPU).  Row
    r is window code[r] of image owner[r]."""

    hashes: np.ndarray  # (N * K, W)
    owner: np.ndarray
    code: np.ndarray
    engine: object
    resorted: object = field(default=None, repr=False)  # (engine): sorted anew

    @classmethod
    def of(cls, windows: np.ndarray, bits: int, name: str, radius: int,
           orders=None) -> WindowRows | None:
        """Rows of (N, K, W) windows with engine `name` (a BK-tree, which
        holds distinct hashes, is replaced by the automatic choice).
        orders(parts) -> the MIH tables' orders from a cache, or None."""
        n, k, words = windows.shape
        if not n * k:
            return None
        hashes = windows.reshape(-1, words)
        if name not in ("scan", "mih"):
            name = choose_engine(len(hashes), bits, words, radius, True)
        if name == "scan":
            engine = ScanEngine(hashes)
        else:
            parts = plan_mih(len(hashes), bits, words, radius, True)[0]
            engine = MIHEngine(hashes, bits, parts,
                               orders(parts) if orders else None)
        return cls(hashes, np.repeat(np.arange(n), k),
                   np.tile(np.arange(WINDOW_CODE, WINDOW_CODE + k), n), engine)

    def cross(self, queries: np.ndarray, radius: int) -> Iterator[tuple]:
        """(query row, window row, bits) of every pair within radius, in
        the order of the distinct windows' engine: by query, window hash,
        then row."""
        try:
            found = list(self.engine.cross(queries, radius))
        except ValueError:  # a cached order that does not sort the windows
            self.engine = MIHEngine(self.hashes, self.engine.total_bits,
                                    self.engine.parts)
            if self.resorted is not None:
                self.resorted(self.engine)
            found = list(self.engine.cross(queries, radius))
        for qi, rows, d in found:
            h = self.hashes[rows]
            order = np.lexsort((rows,) + tuple(h[:, w] for w in reversed(
                range(h.shape[1]))) + (qi,))
            yield qi[order], rows[order], d[order]


@dataclass
class Regions:
    """What region matching needs for one radius: the centre views with
    their engines, the content box view and the window view (or None)."""

    centres: list
    radius: int
    content: RegionView | None = None
    windows: WindowRows | None = None
    scan_windows: bool = False  # search: scan flat.windows, no index of them
    turned: bool = False  # also orientations against windows (TURNED_CODE)
    tables: object = None  # SearchTables: windows and orientations from them


class MatchDistances(NamedTuple):
    """The best match of one image to each of others (match_distances)."""

    effective: np.ndarray  # what it counts: bits weighed by the match code
    bits: np.ndarray       # Hamming distance of the two hashes that matched
    code: np.ndarray       # the match code (MATCH_NAMES; -1: as stored)


@dataclass
class FlatIndex:
    """Image ids and hashes, plus the distinct hashes the engines search."""

    ids: np.ndarray         # (N,) database ids
    hashes: np.ndarray      # (N, W) uint64
    variants: np.ndarray    # (N, V, W) uint64: the other orientations
    centres: np.ndarray     # (N, C, W) uint64: the central regions (CENTRES)
    detail: np.ndarray      # (N,) float32: detail_bits of each image
    distinct: np.ndarray    # (U, W) uint64, sorted
    img_order: np.ndarray   # image positions grouped by distinct hash
    img_starts: np.ndarray  # (U + 1,) CSR offsets into img_order
    bits: int
    content: np.ndarray | None = None  # (N, 1 or 0, W): the content box hash
    boxes: np.ndarray | None = None    # (N,) uint64: its box (pack_box)
    windows: np.ndarray | None = None  # (N, K, W): the region windows
    kind: str = ""
    fingerprint: str = ""
    key: bytes = b""        # the database's key for the cache files' MACs
    say: object = field(default=lambda text: None, repr=False)  # notices
    engines: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)

    def __post_init__(self):
        n, words = self.hashes.shape
        if self.content is None:
            self.content = np.zeros((n, 0, words), dtype=np.uint64)
        if self.boxes is None:
            self.boxes = np.full(n, FULL_BOX_WORD, dtype=np.uint64)
        if self.windows is None:
            self.windows = np.zeros((n, 0, words), dtype=np.uint64)

    @classmethod
    def from_arrays(cls, ids: np.ndarray, hashes: np.ndarray, bits: int,
                    variants: np.ndarray | None = None,
                    detail: np.ndarray | None = None,
                    centres: np.ndarray | None = None,
                    content: np.ndarray | None = None,
                    boxes: np.ndarray | None = None,
                    windows: np.ndarray | None = None):
        if hashes.shape[1] == 1:
            distinct, order, starts = _group_sorted(hashes[:, 0])
        else:
            distinct, inverse = np.unique(hashes, axis=0, return_inverse=True)
            inverse = inverse.ravel()
            order = np.argsort(inverse, kind="stable")
            starts = np.zeros(len(distinct) + 1, dtype=np.int64)
            np.cumsum(np.bincount(inverse, minlength=len(distinct)),
                      out=starts[1:])
        none = np.zeros((len(ids), 0, hashes.shape[1]), dtype=np.uint64)
        if detail is None:
            detail = np.full(len(ids), 4.0, dtype=np.float32)
        return cls(ids=ids, hashes=hashes, bits=bits,
                   variants=none if variants is None else variants,
                   centres=none if centres is None else centres,
                   detail=detail, distinct=distinct, img_order=order,
                   img_starts=starts, content=content, boxes=boxes,
                   windows=windows)

    def arrays(self) -> dict:
        return {"ids": self.ids, "hashes": self.hashes, "variants": self.variants,
                "centres": self.centres,
                "detail": self.detail, "distinct": self.distinct,
                "img_order": self.img_order, "img_starts": self.img_starts,
                "content": self.content, "boxes": self.boxes,
                "windows": self.windows}

    def expand(self, distinct_pos: np.ndarray) -> tuple:
        """(index into distinct_pos, image position) for every image behind
        each of the given distinct hashes."""
        s, distinct_pos = self.img_starts, np.asarray(distinct_pos, np.int64)
        counts = s[distinct_pos + 1] - s[distinct_pos]
        images = self.img_order[_expand(s[distinct_pos], counts)]
        return np.repeat(np.arange(len(counts)), counts), images

    def first_images(self) -> np.ndarray:
        """The first image position of each distinct hash."""
        return self.img_order[self.img_starts[:-1]]

    def has_box(self) -> np.ndarray:
        """Image positions whose content box is not the whole picture."""
        if not self.content.shape[1]:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.boxes != np.uint64(FULL_BOX_WORD))

    def region_view(self, name: str) -> RegionView | None:
        """The content boxes ("content") of every image, indexed as the
        main hashes are, with each row's owner image and match code; None
        when the index holds none.  (The windows: WindowRows.)"""
        if name not in self.views:
            owner = self.has_box()
            hashes = self.content[owner, 0] if len(owner) else None
            code = np.full(len(owner), CONTENT_CODE)
            view = None
            if hashes is not None and len(hashes):
                index = FlatIndex.from_arrays(
                    self.ids[owner], np.ascontiguousarray(hashes), self.bits,
                    detail=self.detail[owner])
                index.kind = f"{self.kind}/{name}"
                index.fingerprint, index.key, index.say = \
                    self.fingerprint, self.key, self.say
                view = RegionView(index, owner, code)
            self.views[name] = view
        return self.views[name]

    def region_engines(self, name: str, radius: int, all_pairs: bool,
                       bktree_path: str) -> Regions:
        """The centre views, the content box view and the window view, each
        with its engine for its radius.  A search (not all_pairs) scans the
        windows instead: indexing 161 windows per image costs seconds at
        100,000 images (sorting them, the multi-index tables), a scan of
        them 30 ms per query."""
        stem, ext = os.path.splitext(bktree_path)
        out = Regions(self.view_engines(name, radius, all_pairs, bktree_path),
                      radius, scan_windows=not all_pairs)
        out.content = self.region_view("content")
        if out.content is not None:
            out.content.engine = out.content.index.engine(
                name, radius, all_pairs, f"{stem}-content{ext}")
        if all_pairs:
            out.windows = load_window_rows(
                self, name, code_radius(radius, WINDOW_CODE),
                os.path.join(os.path.dirname(bktree_path), WINDOWS_NAME)
                if bktree_path else "")
        return out

    def distinct_detail(self) -> np.ndarray:
        """The least detail among the images of each distinct hash."""
        if not len(self.distinct):
            return np.zeros(0, dtype=np.float32)
        return np.minimum.reduceat(self.detail[self.img_order],
                                   self.img_starts[:-1])

    def distinct_of_images(self) -> np.ndarray:
        """For each image position, the position of its distinct hash."""
        out = np.empty(len(self.ids), dtype=np.int64)
        out[self.img_order] = np.repeat(np.arange(len(self.distinct)),
                                        np.diff(self.img_starts))
        return out

    def match_distances(self, lead, others, limit=None,
                        windows: bool = True) -> MatchDistances:
        """The best match from image `lead` to each of `others`
        (or, lead an array as long as others, from each lead to its other:
        many groups in one call, 20x faster than a call each at 1M images),
        the best over both images' orientations.  Centre regions come last:
        with a `limit`, only where nothing else is within it, so a copy
        shows its whole-picture distance whenever that matches.  windows
        False: the best without the region windows (never nearer)."""
        others = np.asarray(others, dtype=np.int64)
        h, v = self.hashes, self.variants
        bits = row_distances(h[others], np.broadcast_to(h[lead], h[others].shape))
        best = bits.astype(np.int64)
        which = np.full(len(others), -1)
        for k in range(v.shape[1]):
            for d in (row_distances(v[others, k], np.broadcast_to(
                    h[lead], h[others].shape)), row_distances(
                    h[others], np.broadcast_to(v[lead, k], h[others].shape))):
                better = d.astype(np.int64) * VARIANT_WEIGHT < best
                best = np.where(better, d.astype(np.int64) * VARIANT_WEIGHT, best)
                bits = np.where(better, d, bits)
                which = np.where(better, k, which)
        c = self.centres
        open_ = np.ones(len(others), bool) if limit is None else best > limit
        for k in range(c.shape[1]):  # centre to the same centre, weight 1
            d = row_distances(c[others, k], np.broadcast_to(c[lead, k],
                                                            h[others].shape))
            better = (d.astype(np.int64) < best) & open_
            best = np.where(better, d.astype(np.int64), best)
            bits = np.where(better, d, bits)
            which = np.where(better, len(VARIANTS) + k, which)
        best = best.astype(np.float64)
        for d, code, weighed in self._region_distances(lead, others, windows):
            better = (weighed < best) & open_
            best = np.where(better, weighed, best)
            bits = np.where(better, d, bits)
            which = np.where(better, code, which)
        return MatchDistances(best, bits, which)

    def _region_distances(self, lead: int, others: np.ndarray,
                          windows: bool = True):
        """(bits, code, effective distance) from `lead` to each of `others`
        through the content boxes (box to whole, whole to box, box to box:
        65535 bits where an image has no box) and through the windows (whole
        to the nearest window, both ways, weighed by window_weight)."""
        h = self.hashes
        if self.content.shape[1]:
            boxed = self.boxes != np.uint64(FULL_BOX_WORD)
            far = np.uint16(65535)
            cl, co = self.content[lead, 0], self.content[others, 0]
            pairs = [(np.broadcast_to(cl, co.shape), h[others], boxed[lead]),
                     (np.broadcast_to(h[lead], co.shape), co, boxed[others]),
                     (np.broadcast_to(cl, co.shape), co,
                      boxed[others] & boxed[lead])]
            for a, b, ok in pairs:
                d = np.where(ok, row_distances(a, b), far)
                yield d, np.full(len(others), CONTENT_CODE), d.astype(float)
        k = self.windows.shape[1] if windows else 0
        if k:
            mine = self.windows[lead]  # (K, W) against the others' wholes
            theirs = self.windows[others]  # (M, K, W) against the lead's
            d1 = np.bitwise_count(h[others][:, None, :] ^ mine).sum(
                axis=2, dtype=np.uint16)
            d2 = np.bitwise_count(theirs ^ h[lead][..., None, :]).sum(
                axis=2, dtype=np.uint16)
            for d in (d1, d2):
                at = np.argmin(d, axis=1)
                d = d[np.arange(len(others)), at]
                yield d, WINDOW_CODE + at, window_effective(
                    d, self.detail[lead], self.detail[others])

    def view(self, k: int) -> FlatIndex:
        """Centre region k of every image, indexed as the main hashes are
        (same image positions), for matching centre to centre."""
        if k not in self.views:
            view = FlatIndex.from_arrays(
                self.ids, np.ascontiguousarray(self.centres[:, k]), self.bits,
                detail=self.detail)
            view.kind = f"{self.kind}/centre{k}"
            view.fingerprint, view.key, view.say = \
                self.fingerprint, self.key, self.say
            self.views[k] = view
        return self.views[k]

    def view_engines(self, name: str, radius: int, all_pairs: bool,
                     bktree_path: str) -> list:
        """(view, engine) for each centre region."""
        stem, ext = os.path.splitext(bktree_path)
        return [(self.view(k), self.view(k).engine(
                    name, radius, all_pairs, f"{stem}-centre{k}{ext}"))
                for k in range(self.centres.shape[1])]

    def image_pairs(self, engine, radius: int) -> Iterator[tuple]:
        """(image positions a, b, distances) joining every near pair: each
        pair of distinct hashes joins their first images, and images that
        share a hash are joined to the first of them at distance 0."""
        first = self.img_order[self.img_starts[:-1]]
        if radius > 0 and len(self.distinct) > 1:
            for a, b, d in engine.pairs(radius):
                yield first[a], first[b], d
        lead = np.repeat(first, np.diff(self.img_starts))
        same = np.flatnonzero(lead != self.img_order)
        if len(same):
            yield lead[same], self.img_order[same], np.zeros(len(same), np.int64)

    def images_of(self, distinct_pos: np.ndarray) -> list:
        """Image positions behind each distinct hash position."""
        s = self.img_starts
        return [self.img_order[s[p]:s[p + 1]] for p in distinct_pos]

    def engine(self, name: str, radius: int, all_pairs: bool = False,
               bktree_path: str = ""):
        """The engine `name` ('auto' picks), built once and kept."""
        n, words = len(self.distinct), self.distinct.shape[1]
        if name == "auto":
            name = choose_engine(n, self.bits, words, radius, all_pairs)
        key = name
        if name == "mih":
            key = ("mih", plan_mih(n, self.bits, words, radius, all_pairs)[0])
        if key not in self.engines:
            if name == "scan":
                self.engines[key] = ScanEngine(self.distinct)
            elif name == "mih":
                self.engines[key] = MIHEngine(self.distinct, self.bits, key[1])
            else:
                self.engines[key] = load_bktree(self, bktree_path)
        return self.engines[key]


def index_header(kind: str, bits: int, fingerprint: str, engine: str) -> dict:
    return {"format": INDEX_FORMAT, "tool": __version__, "kind": kind,
            "bits": bits, "fingerprint": fingerprint, "engine": engine}


def _check_header(header: dict, spec: HashSpec, fingerprint: str, engine: str):
    """None when the header fits, else why the file must be rebuilt."""
    if header.get("format") != INDEX_FORMAT or header.get("engine") != engine:
        return "is from another version"
    if header.get("kind") != spec.kind:
        return f"holds {header.get('kind')} hashes"
    if header.get("fingerprint") != fingerprint:
        return "is older than the database"
    return None


def cache_key(store: HashStore) -> bytes:
    """The secret that signs the cache files (b"" in a database written
    before it was kept: the MAC is then a plain checksum)."""
    with contextlib.suppress(ValueError):
        return bytes.fromhex(store.meta().get("index_key", ""))
    return b""


def save_index(cfg: Config, store: HashStore, ui: Console | None = None
               ) -> FlatIndex:
    """Rebuild the index file from the database."""
    spec = cfg.spec
    fingerprint = store.fingerprint()
    stored = store.hash_arrays(spec.words, spec.extra_count)
    flat = FlatIndex.from_arrays(stored.ids, stored.hashes, spec.bits,
                                 detail=stored.detail,
                                 **split_extra(stored.extra, spec))
    flat.kind, flat.fingerprint, flat.key = spec.kind, fingerprint, \
        cache_key(store)
    if ui is not None:
        flat.say = ui.notice
    _save_cache(os.path.join(cfg.bk_dir, INDEX_NAME),
                index_header(spec.kind, spec.bits, fingerprint, "flat"),
                flat.arrays(), flat)
    return flat


def split_extra(extra: np.ndarray, spec: HashSpec) -> dict:
    """The stored extra hashes (N, spec.extra_count, W) by kind, in their
    order: orientations, centres, the content box (hash, then its box word
    in the slot's last word), the windows."""
    v, c = spec.variant_count, spec.centre_count
    k = v + c + spec.content_count
    out = {"variants": extra[:, :v], "centres": extra[:, v:v + c],
           "content": extra[:, v + c:v + c + 1 if spec.content else v + c],
           "windows": extra[:, k:]}
    if spec.content:
        out["boxes"] = np.ascontiguousarray(extra[:, v + c + 1, -1])
    return out


def load_index(cfg: Config, store: HashStore, ui: Console) -> FlatIndex:
    """The index file if it matches the database, else a rebuilt one."""
    spec, path = cfg.spec, os.path.join(cfg.bk_dir, INDEX_NAME)
    fingerprint = store.fingerprint()
    try:
        header, arrays = read_container(path, cache_key(store))
        reason = _check_header(header, spec, fingerprint, "flat")
        if reason is None:
            flat = FlatIndex(**arrays, bits=spec.bits)
            _check_arrays(flat, spec)
            flat.kind, flat.fingerprint, flat.key, flat.say = \
                spec.kind, fingerprint, cache_key(store), ui.notice
            return flat
    except FileNotFoundError:
        reason = "is missing"
    except Exception as exc:  # any failure to load: damaged, rebuild it
        reason = f"is damaged ({_load_failure(exc)})"
    ui.notice(f"index {path} {reason}: rebuilding it from the database.")
    return save_index(cfg, store, ui)


def _load_failure(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)[:80] or type(exc).__name__


def _check_arrays(flat: FlatIndex, spec: HashSpec) -> None:
    """ValueError unless the arrays are an index of `spec` hashes: types,
    shapes, ids in increasing order, a CSR map that is a permutation and
    agrees with the hashes, and sorted distinct hashes."""
    n, u, words = len(flat.ids), len(flat.distinct), spec.words
    types = {"ids": np.int64, "hashes": np.uint64, "variants": np.uint64,
             "centres": np.uint64, "content": np.uint64, "boxes": np.uint64,
             "windows": np.uint64, "detail": np.float32,
             "distinct": np.uint64, "img_order": np.int64,
             "img_starts": np.int64}
    if any(getattr(flat, k).dtype != t for k, t in types.items()):
        raise ValueError("arrays of the wrong type")
    ok = (flat.hashes.shape == (n, words) and flat.distinct.shape == (u, words)
          and flat.variants.shape == (n, spec.variant_count, words)
          and flat.centres.shape == (n, spec.centre_count, words)
          and flat.content.shape == (n, int(spec.content), words)
          and flat.windows.shape == (n, spec.window_count, words)
          and flat.boxes.shape == (n,)
          and flat.detail.shape == (n,)
          and flat.img_order.shape == (n,) and flat.img_starts.shape == (u + 1,))
    if not ok:
        raise ValueError("arrays do not fit together")
    starts, order = flat.img_starts, flat.img_order
    per_hash = np.diff(starts)
    if n and not (starts[0] == 0 and starts[-1] == n and (per_hash > 0).all()
                  and (flat.ids[1:] > flat.ids[:-1]).all()
                  and (order >= 0).all() and (order < n).all()
                  and (np.bincount(order, minlength=n) == 1).all()
                  and np.isfinite(flat.detail).all()):
        raise ValueError("ids or image order out of range")
    if n and not np.array_equal(flat.hashes[order],
                                np.repeat(flat.distinct, per_hash, axis=0)):
        raise ValueError("hashes disagree with the distinct hashes")
    if u > 1:
        a, b = flat.distinct[:-1], flat.distinct[1:]
        first = np.argmax(a != b, axis=1)  # the first word that differs
        rows = np.arange(u - 1)
        if not (b[rows, first] > a[rows, first]).all():
            raise ValueError("distinct hashes are not sorted")


def load_bktree(flat: FlatIndex, path: str) -> BKTreeEngine:
    """The BK-tree from its links in `path` if they fit the index, else a
    new one (saved when bk_dir takes it).  Nothing in the file is run: it
    holds two integer arrays, checked against the hashes."""
    try:
        header, arrays = read_container(path, flat.key)
        if header.get("fingerprint") == flat.fingerprint and \
                header.get("kind") == flat.kind and \
                header.get("engine") == "bktree":
            return BKTreeEngine(flat.distinct, (arrays["parent"],
                                                arrays["dist"]))
    except FileNotFoundError:
        pass
    except Exception:  # damaged or crafted: a cache is rebuilt, never trusted
        pass
    engine = BKTreeEngine(flat.distinct)
    header = index_header(flat.kind, flat.bits, flat.fingerprint, "bktree")
    _save_cache(path, header, engine.links(), flat)
    return engine


def load_window_rows(flat: FlatIndex, name: str, radius: int, path: str
                     ) -> WindowRows | None:
    """flat's WindowRows, its MIH tables' orders read from the cache file
    `path` when it fits the database and they check out (_checked_order;
    a bucket table's on first use, MIHEngine._trusted: then sorted anew
    in WindowRows.cross), else sorted here and saved there (100,000
    images, 16,100,000 windows: 6.8 -> 3.3 s of CPU for the region
    engines, a 193 MB file)."""
    found = {}

    def save(engine: MIHEngine) -> None:
        small = np.int32 if len(engine.hashes) < 2**31 else np.int64
        header = dict(index_header(flat.kind, flat.bits, flat.fingerprint,
                                   "windows"), parts=found["parts"])
        _save_cache(path, header, {f"order{k}": o.astype(small) for k, o in
                                   enumerate(engine.orders())}, flat)

    def orders(parts: int) -> list | None:
        found["parts"] = parts
        try:
            header, arrays = read_container(path, flat.key)
        except Exception:  # missing, damaged or crafted: sort again
            return None
        if header.get("fingerprint") != flat.fingerprint or \
                header.get("kind") != flat.kind or \
                header.get("engine") != "windows" or \
                header.get("parts") != parts or \
                sorted(arrays) != [f"order{k}" for k in range(len(arrays))]:
            return None
        found["read"] = True
        return [arrays[f"order{k}"] for k in range(len(arrays))]

    try:
        rows = WindowRows.of(flat.windows, flat.bits, name, radius,
                             orders if path else None)
    except ValueError:  # a cache whose orders do not sort the windows
        found.pop("read", None)
        rows = WindowRows.of(flat.windows, flat.bits, name, radius)
    engine = rows.engine if rows is not None else None
    if isinstance(engine, MIHEngine) and path:
        rows.resorted = save
        if not found.get("read"):
            save(engine)
    return rows


def _save_cache(path: str, header: dict, arrays: dict, flat: FlatIndex) -> None:
    """Write a cache file; a bk_dir that cannot take it (read-only, full)
    costs only the time to rebuild it next run."""
    try:
        write_container(path, header, arrays, flat.key)
    except OSError as exc:
        flat.say(f"cannot save the index cache {path} "
                 f"({exc.strerror or exc}; check bk_dir): searching from "
                 f"memory, and the next run rebuilds it.")


# ---- search tables: what one search reads of a large index ----
#
# search.idx (a block file) holds, for each set of stored one-word hashes a
# search looks up, multi-index tables: for each chunk of the hash, the
# hashes sorted by that chunk's value ("S.vJ"), their rows ("S.rJ") and
# each value's first position ("S.sJ", 2**bits + 1).  A lookup within r
# bits probes the chunks' neighbourhoods (chunk_radii) and reads only their
# buckets, so a search of 1,000,000 images reads a few MB, not the 1.4 GB
# of hashes.idx.  Sets, and what a row is:
#   whole      image position p (the images' whole hashes)
#   centreK    p (centre region K)
#   content    i: image content.owner[i], whose content box is not whole
#   variants   p * V + k (orientation k of image p)
#   windows    p * K + w (window w of image p)
# with "ids" and "detail" of each image.  A cache like hashes.idx: rebuilt
# when the database changes, never trusted unchecked (BlockFile).

SEARCH_NAME = "search.idx"
# The sets with tables: the others are read whole (a few MB each at
# 1,000,000 images) and scanned (scan_near); the windows, 161 per image,
# are looked up in their tables (8 queries: a few thousand blocks of 1.3 GB)
TABLED = ("windows",)
# Below this many images a search reads hashes.idx whole and writes no
# tables: at 100,000 both ways took 0.6 s inside the tool (the tables cost
# 12 s to write after each change), at 1,000,000 the tables 2.2 s, the
# whole index 10-15 s.
SEARCH_TABLES_FROM = 250_000


def table_parts(rows: int, bits: int) -> int:
    """Chunks of one set's tables: about log2(rows) bits each (a few rows
    to a bucket), at most 22 (a bucket table of 16 MB), at least 8."""
    return -(-bits // min(22, max(8, rows.bit_length())))


# scan_near: up to this many query-value pairs, a popcount of each (one
# pass per query) beats one pass for all (1,000,000 values: 16 queries
# 16 ms either way, 161 queries 190 against 53 ms)
SCAN_DIRECT_PAIRS = 16_000_000


def scan_near(values: np.ndarray, queries: np.ndarray, radius: int,
              bits: int, direct_pairs: int = SCAN_DIRECT_PAIRS) -> tuple:
    """(query index, row, bits) of every value ((M,) uint64) within radius
    of each query ((Q,) uint64), by query, then row: one pass over the
    values.  Few queries: popcount against each.  Many (a query's 161
    windows): multi-index hashing turned round, over the queries' chunk
    neighbourhoods (a bit per chunk value: chunks of about 22 bits, so
    161 windows mark a few % of them), the values only looked up there
    (161 windows against 7,000,000 stored orientations: a table of each
    chunk read 216 MB of it, block by block, 0.5 s; this reads 56 MB)."""
    found = []
    if len(queries) * len(values) <= direct_pairs or len(queries) <= 4:
        for k, q in enumerate(queries.tolist()):
            d = np.bitwise_count(values ^ np.uint64(q))
            rows = np.flatnonzero(d <= radius)
            found.append((np.full(len(rows), k), rows, d[rows]))
    else:
        chunks, buf = plan_chunks(bits, 1, -(-bits // 22)), \
            np.empty_like(values)
        for _, chunk, most in probed_chunks(chunks, radius):
            probes = (chunk.values(queries[:, None])[:, None] ^
                      _flip_masks(chunk.bits, most)).ravel()
            owner = np.repeat(np.arange(len(queries)),
                              len(probes) // len(queries))
            # a flag per chunk value (4 MB: stays in the CPU's cache) to
            # find the candidates, then the queries probing each
            # candidate's value from a slot per value (no binary search
            # per candidate: 7,000,000 values, 0.77 -> 0.1 s)
            order = np.argsort(probes, kind="stable")
            probes, owner = probes[order].astype(np.int64), owner[order]
            head = np.flatnonzero(np.r_[True, probes[1:] != probes[:-1]])
            ends = np.r_[head[1:], len(probes)]
            marked = np.zeros(1 << chunk.bits, bool)
            marked[probes] = True
            slot = np.zeros(1 << chunk.bits, np.int32)
            slot[probes[head]] = np.arange(len(head))
            # the chunk's values in place, as int64 (numpy gathers with a
            # uint64 index 2.4x slower; fresh arrays cost 35 -> 13 ms)
            vals = np.right_shift(values, np.uint64(chunk.shift), out=buf)
            vals = np.bitwise_and(vals, np.uint64((1 << chunk.bits) - 1),
                                  out=buf).view(np.int64)
            rows = np.flatnonzero(marked[vals])
            at = slot[vals[rows]]
            lo = head[at]
            count = ends[at] - lo
            asked = owner[_expand(lo, count)]
            rows = np.repeat(rows, count)
            d = np.bitwise_count(values[rows] ^ queries[asked])
            near = d <= radius
            found.append((asked[near], rows[near], d[near]))
    if not found:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.uint8),)
    qi, rows, d = (np.concatenate(f) for f in zip(*found))
    _, first = np.unique(qi * max(1, len(values)) + rows, return_index=True)
    return qi[first], rows[first], d[first]


def _table_arrays(name: str, values: np.ndarray, bits: int) -> dict:
    """The arrays of set `name`'s tables over `values` ((M,) uint64), as
    functions (write_blocks makes one at a time; a chunk's sort is shared
    by its three arrays)."""
    chunks = plan_chunks(bits, 1, table_parts(len(values), bits))
    small = len(values) < 2**32
    memo: dict = {}

    def sorted_by(j: int):
        if memo.get("j") != j:
            memo.clear()
            vals = chunks[j].values(values[:, None])
            order = stable_order(vals, chunks[j].bits)
            starts = np.zeros((1 << chunks[j].bits) + 1, np.int64)
            np.cumsum(np.bincount(vals.astype(np.int64),
                                  minlength=1 << chunks[j].bits),
                      out=starts[1:])
            del vals
            memo.update(j=j, order=order, starts=starts)
        return memo

    out = {}
    for j in range(len(chunks)):
        out[f"{name}.v{j}"] = lambda j=j: values[sorted_by(j)["order"]]
        out[f"{name}.r{j}"] = lambda j=j: sorted_by(j)["order"].astype(
            np.uint32 if small else np.uint64)
        out[f"{name}.s{j}"] = lambda j=j: sorted_by(j)["starts"].astype(
            np.uint32 if small else np.uint64)
    return out


def table_sets(flat: FlatIndex) -> dict:
    """{set name: (M,) uint64 hashes} of a one-word index (see above)."""
    sets = {"whole": flat.hashes[:, 0]}
    for k in range(flat.centres.shape[1]):
        sets[f"centre{k}"] = flat.centres[:, k, 0]
    if flat.content.shape[1]:
        sets["content"] = flat.content[flat.has_box(), 0, 0]
    sets["variants"] = flat.variants[:, :, 0].reshape(-1)
    sets["windows"] = flat.windows[:, :, 0].reshape(-1)
    return sets


def save_tables(path: str, flat: FlatIndex) -> None:
    """Write search.idx for a one-word index (fresh, renamed into place)."""
    sets = table_sets(flat)
    arrays = {"ids": flat.ids, "detail": flat.detail,
              "content.owner": flat.has_box()}
    for name, values in sets.items():
        values = np.ascontiguousarray(values)
        if name in TABLED and len(values):
            arrays.update(_table_arrays(name, values, flat.bits))
        else:
            arrays[name] = values
    header = dict(index_header(flat.kind, flat.bits, flat.fingerprint,
                               "tables"),
                  sets={name: len(v) for name, v in sets.items()},
                  distinct=len(flat.distinct),
                  counts=[flat.variants.shape[1], flat.centres.shape[1],
                          flat.content.shape[1], flat.windows.shape[1]])
    write_blocks(path, header, arrays, flat.key)


class SearchTables:
    """search.idx opened: lookups in its sets (near) and its per-image
    arrays, every block checked on first use (BlockFile)."""

    def __init__(self, path: str, key: bytes, spec: HashSpec,
                 fingerprint: str):
        self.file, bits = BlockFile(path, key), spec.bits
        head = self.file.header
        why = _check_header(head, spec, fingerprint, "tables")
        if why is None and head.get("bits") != bits:
            why = "is from another version"
        if why is not None:
            raise CacheDamaged(why)
        try:
            self.sets = {str(k): int(v) for k, v in head["sets"].items()}
            self.images = int(self.file.shape("ids")[0])
            self.distinct = int(head["distinct"])
            v, c, content, k = (int(x) for x in head["counts"])
        except (KeyError, TypeError, ValueError):
            raise CacheDamaged("damaged header") from None
        self.counts, self.bits = (v, c, content, k), bits
        want = {"whole": self.images, "variants": self.images * v,
                "windows": self.images * k}
        want.update({f"centre{j}": self.images for j in range(c)})
        if content:
            want["content"] = int(self.file.shape("content.owner")[0])
        if self.sets != want:
            raise CacheDamaged("sets do not fit the images")
        self.chunks = {name: plan_chunks(bits, 1, table_parts(m, bits))
                       for name, m in self.sets.items()}
        self._masks: dict = {}

    def masks(self, bits: int, most: int) -> np.ndarray:
        if (bits, most) not in self._masks:
            self._masks[bits, most] = _flip_masks(bits, most)
        return self._masks[bits, most]

    def near(self, name: str, queries: np.ndarray, radius: int) -> tuple:
        """(query index, row, bits, hash) of every row of set `name` within
        radius of each of queries ((Q,) uint64), by query, then row."""
        if name not in TABLED:
            values = self.file.whole(name) if self.sets.get(name) else \
                np.zeros(0, np.uint64)
            if values.shape != (self.sets.get(name, 0),):
                raise CacheDamaged(f"{name} does not fit the images")
            qi, rows, d = scan_near(values, queries, radius, self.bits)
            return qi, rows, d, values[rows]
        m, found = self.sets.get(name, 0), []
        for j, chunk, most in probed_chunks(self.chunks[name], radius) \
                if m and len(queries) else []:
            masks = self.masks(chunk.bits, most)
            probes = (chunk.values(queries[:, None])[:, None] ^ masks).ravel()
            owner = np.repeat(np.arange(len(queries)), len(masks))
            p = probes.astype(np.int64)
            s = self.file.take(f"{name}.s{j}", np.concatenate([p, p + 1]))
            first = s[:len(p)].astype(np.int64)
            count = s[len(p):].astype(np.int64) - first
            vals = self.file.ranges(f"{name}.v{j}", first, count)
            count = np.maximum(count, 0)
            d = np.bitwise_count(vals ^ np.repeat(queries[owner], count))
            hit = np.flatnonzero(d <= radius)
            at = _expand(first, count)[hit]
            if len(hit):  # (a rows array is read only for hits)
                found.append((np.repeat(owner, count)[hit], self.file.take(
                    f"{name}.r{j}", at).astype(np.int64), d[hit], vals[hit]))
        if not found:
            none = np.zeros(0, np.int64)
            return none, none, none.astype(np.uint8), none.astype(np.uint64)
        qi, rows, d, vals = (np.concatenate(f) for f in zip(*found))
        if len(rows) and (rows.min() < 0 or rows.max() >= m):
            raise CacheDamaged("a row out of range")
        _, first = np.unique(qi * m + rows, return_index=True)
        return qi[first], rows[first], d[first], vals[first]

    def window_hits(self, queries: np.ndarray, radius: int) -> list:
        """window_hits(flat.windows, queries, radius) from the tables: for
        each query [(image, window, bits)] by image, then window."""
        k, out = self.counts[3], [[] for _ in queries]
        qi, rows, d, _ = self.near("windows", queries[:, 0], radius)
        for q, row, bits in zip(qi.tolist(), rows.tolist(), d.tolist()):
            out[q].append((row // k, row % k, bits))
        return out

    def turned_hits(self, windows: np.ndarray, radius: int) -> Iterator:
        """(image, orientation, query window, bits) of every stored
        orientation within radius of one of windows ((Q, 1)), in the order
        of _search_turned's scan: image, orientation, window."""
        v = self.counts[0]
        qi, rows, d, _ = self.near("variants", windows[:, 0], radius)
        for at in np.lexsort((qi, rows)).tolist():
            yield int(rows[at]) // v, int(rows[at]) % v, int(qi[at]), \
                int(d[at])


class _ShapeOnly(NamedTuple):
    """An array that the tables stand in for: only its shape (indexing
    it fails loudly, it never reads as zeros)."""

    shape: tuple


class _Elements:
    """arr[p] of one array of a block file, read as asked."""

    def __init__(self, file: BlockFile, name: str):
        self.file, self.name = file, name

    def __getitem__(self, p: int):
        return self.file.take(self.name, np.array([p]))[0]


class TableEngine:
    """An engine over one set of the search tables: search(query, radius)
    -> (image or row positions, bits), in the order the in-memory engines
    give them (by hash, then position)."""

    name = "tables"

    def __init__(self, tables: SearchTables, set_name: str):
        self.tables, self.set_name = tables, set_name

    def search(self, query: np.ndarray, radius: int):
        return self.search_many(query[None, :], [radius])[0]

    def search_many(self, queries: np.ndarray, radii: list) -> list:
        """[search(query, radius)] of each, in one lookup per radius (162
        regions of a query against 1,000,000 wholes: one call each cost
        4 ms)."""
        out = [None] * len(queries)
        radii = np.asarray(radii)
        for r in np.unique(radii).tolist():
            ask = np.flatnonzero(radii == r)
            qi, rows, d, vals = self.tables.near(self.set_name,
                                                 queries[ask, 0], r)
            order = np.lexsort((rows, vals, qi))
            qi, rows, d = qi[order], rows[order], d[order]
            cut = np.searchsorted(qi, np.arange(len(ask) + 1))
            for k, at in enumerate(ask.tolist()):
                out[at] = rows[cut[k]:cut[k + 1]], d[cut[k]:cut[k + 1]]
        return out


class TableIndex:
    """What a search reads of a FlatIndex, from the search tables: the
    shapes, each image's detail and id; images_of/expand of a table's rows,
    which are images already (or, the content set, rows of content.owner)."""

    def __init__(self, tables: SearchTables):
        n, (v, c, content, k) = tables.images, tables.counts
        self.tables = tables
        self.distinct = _ShapeOnly((tables.distinct, 1))
        self.variants, self.centres = _ShapeOnly((n, v, 1)), _ShapeOnly((n, c, 1))
        self.content, self.windows = _ShapeOnly((n, content, 1)), \
            _ShapeOnly((n, k, 1))
        self.detail = tables.file.whole("detail")
        self.ids = _Elements(tables.file, "ids")
        if self.detail.shape != (n,) or not np.isfinite(self.detail).all():
            raise CacheDamaged("detail does not fit the images")

    @staticmethod
    def images_of(pos: np.ndarray) -> list:
        return [pos[i:i + 1] for i in range(len(pos))]

    @staticmethod
    def expand(pos: np.ndarray) -> tuple:
        return np.arange(len(pos)), np.asarray(pos, np.int64)

    def regions(self, radius: int, turned: bool) -> Regions:
        """The Regions of a search (region_engines' for a search)."""
        t = self.tables
        out = Regions([(self, TableEngine(t, f"centre{k}"))
                       for k in range(self.centres.shape[1])], radius,
                      scan_windows=True, turned=turned, tables=t)
        if t.sets.get("content"):
            owner = t.file.whole("content.owner").astype(np.int64)
            if owner.min() < 0 or owner.max() >= t.images:
                raise CacheDamaged("content.owner out of range")
            out.content = RegionView(self, owner, np.full(
                len(owner), CONTENT_CODE), TableEngine(t, "content"))
        return out


# ============================================================================
# Store: PostgreSQL
# ============================================================================
#
# With `database_url` set, the same tables live in PostgreSQL, so several
# machines can update one collection (each its own folders) and search it
# without loading every hash.  Differences from SQLite, each for a reason:
# - paths are BYTEA (os.fsencode): any file name keeps its row; `raw` marks
#   the ones that are not UTF-8 so rows sort as in SQLite (text, then blobs);
# - hashes of up to 64 bits are signed BIGINT, longer ones BYTEA (hash_bytes);
# - three chunk columns c0..c2 hold 21-22 bit pieces of each comparable hash,
#   each with a B-tree index that also carries (id, hash): a search probes the
#   chunk neighbourhoods of the query (multi-index hashing) and verifies the
#   candidates with bit_count, all from the index (no heap visits);
# - each row records the host and root folder that wrote it; a run only reads
#   (states) and deletes rows under its own roots;
# - `generation` in meta is bumped in the same transaction as every write, so
#   the fingerprint changes whenever any writer changes hashes.

PG_SCHEMA_VERSION = 2
PG_CHUNKS = 3            # chunk columns c0..c2 (3 x ~21 bits of a 64-bit hash)
PG_INSTALL = 'pip install "psycopg[binary]"'
PG_PAGE = 20_000         # rows per page when reading by path
PG_RETRIES = 5           # deadlock / serialization failure: run it again
KIND_LOCK = 0x7273_6b69_6e64  # advisory lock: kind switch vs writers ("rskind")
SCHEMA_LOCK = 0x7273_7363_6d61  # advisory lock: one schema migration at a time

PG_SCHEMA = {
    1: """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    path        BYTEA NOT NULL UNIQUE,
    raw         BOOLEAN NOT NULL DEFAULT false,
    size        BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    digest      BYTEA,
    hash        BIGINT,
    hash_bytes  BYTEA,
    variants    BYTEA,
    low_detail  BOOLEAN NOT NULL DEFAULT false,
    detail      DOUBLE PRECISION,
    width       INTEGER,
    height      INTEGER,
    error       TEXT,
    c0          INTEGER,
    c1          INTEGER,
    c2          INTEGER,
    host        TEXT NOT NULL DEFAULT '',
    root        BYTEA,
    hashed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS images_size ON images (size);
CREATE INDEX IF NOT EXISTS images_raw ON images (path) WHERE raw;
""",
    # traits for the keep rule; rows hashed before have none: update rehashes
    2: "ALTER TABLE images ADD COLUMN IF NOT EXISTS traits TEXT;",
}

# the columns an ImageRow is read from, in image_row's order (the hash as
# big-endian bytes either way: int8send for BIGINT, as is for BYTEA)
PG_ROW_COLUMNS = ("path, size, mtime_ns, digest, coalesce(hash_bytes, "
                  "int8send(hash)), width, height, error, id, variants, "
                  "low_detail, detail, traits")
HASHED = "(hash IS NOT NULL OR hash_bytes IS NOT NULL)"
INCOMING = """
CREATE TEMP TABLE IF NOT EXISTS incoming (
    seq INTEGER, path BYTEA, raw BOOLEAN, size BIGINT, mtime_ns BIGINT,
    digest BYTEA, hash BIGINT, hash_bytes BYTEA, variants BYTEA,
    low_detail BOOLEAN, detail DOUBLE PRECISION, width INTEGER, height INTEGER,
    error TEXT,
    c0 INTEGER, c1 INTEGER, c2 INTEGER, root BYTEA, traits TEXT)
    ON COMMIT DELETE ROWS
"""
INCOMING_TYPES = ["int4", "bytea", "bool", "int8", "int8", "bytea", "int8",
                  "bytea", "bytea", "bool", "float8", "int4", "int4", "text",
                  "int4", "int4", "int4", "bytea", "text"]
UPSERT = """
INSERT INTO images (path, raw, size, mtime_ns, digest, hash, hash_bytes,
                    variants, low_detail, detail, width, height, error, c0,
                    c1, c2, host, root, hashed_at, traits)
SELECT DISTINCT ON (path) path, raw, size, mtime_ns, digest, hash, hash_bytes,
       variants, low_detail, detail, width, height, error, c0, c1, c2,
       %(host)s, root, now(), traits
FROM incoming ORDER BY path, seq DESC
ON CONFLICT (path) DO UPDATE SET
    size = excluded.size, mtime_ns = excluded.mtime_ns,
    digest = excluded.digest, hash = excluded.hash,
    hash_bytes = excluded.hash_bytes, variants = excluded.variants,
    low_detail = excluded.low_detail, detail = excluded.detail,
    width = excluded.width,
    height = excluded.height, error = excluded.error, c0 = excluded.c0,
    c1 = excluded.c1, c2 = excluded.c2, host = excluded.host,
    root = excluded.root, hashed_at = excluded.hashed_at,
    traits = excluded.traits
"""
# DISTINCT ON: one command may not update a row twice; ORDER BY path: every
# writer locks rows in the same order, so overlapping upserts cannot deadlock.

# Rough costs in seconds of the in-database search (bench_postgres.py, local
# server); only their ratios matter: they choose probing or a full scan.
PG_COST_PROBE = 5e-6     # per chunk value looked up in a B-tree
PG_COST_CAND = 4e-7      # per candidate verified from the index
PG_COST_ROW = 3e-7       # per row of a full scan (parallel seq scan)


def _psycopg():
    """The psycopg module, imported only when a database_url is set."""
    try:
        import psycopg
    except ImportError:
        raise StoreError(f"database_url is set, but psycopg 3 (the PostgreSQL "
                         f"driver) is not installed: {PG_INSTALL}") from None
    return psycopg


def _scrub(text: str, url: str) -> str:
    """A driver message with every password cut out: the ones in `url`, and
    any password=... or user:password@ it quotes."""
    with contextlib.suppress(ValueError):
        for key in CONNINFO_SECRETS:
            secret = parse_conninfo(url).get(key)
            if secret:
                text = text.replace(secret, "***")
    text = re.sub(r"(postgres(?:ql)?://[^:@/\s]*):[^@/\s]*@", r"\1@", text)
    return re.sub(r"\b((?:ssl)?password)\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)",
                  r"\1=***", text)


def pg_failure(exc: Exception, doing: str, url: str) -> str:
    """A driver error as a message: scrubbed, with what to do about it."""
    text = _scrub(str(exc).strip(), url)
    hint = ""
    if "does not exist" in text and "database" in text:
        hint = " Create it first (createdb, or CREATE DATABASE)."
    elif "password" in text:
        hint = " Put the password in PGPASSWORD or ~/.pgpass."
    return f"{doing} PostgreSQL database {redact_url(url)}: {text}.{hint}"


# ---- values as stored ----

def pg_path_to_db(path: str) -> tuple[bytes, bool]:
    """(path bytes, not UTF-8): any file name round-trips through BYTEA."""
    try:
        return path.encode("utf-8"), False
    except UnicodeEncodeError:
        return os.fsencode(path), True


def pg_path_from_db(value) -> str:
    data = bytes(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(data)


# an ImageRow from a row of PG_ROW_COLUMNS: image_row, paths decoded as stored
pg_image_row = functools.partial(image_row, path_of=pg_path_from_db)


def pg_text(text: str | None) -> str | None:
    """Text PostgreSQL accepts: no NUL, no lone surrogates (odd file names)."""
    if text is None:
        return None
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "surrogateescape").decode("utf-8",
                                                           "backslashreplace")


def lock_key(text: str) -> int:
    """A signed 64-bit advisory lock key for a folder."""
    digest = hashlib.blake2b(b"reverse_search\0" + os.fsencode(text),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# ---- multi-index hashing inside PostgreSQL ----

@dataclass(frozen=True)
class PgChunk:
    """Bits [shift, shift + bits) of a hash (as a Python int)."""

    shift: int
    bits: int

    def value(self, h: int) -> int:
        return (h >> self.shift) & ((1 << self.bits) - 1)


def pg_chunks(bits: int) -> list:
    """PG_CHUNKS chunks: all bits of a hash of up to 64 bits; of a longer one,
    three ~21-bit pieces spread over it (pigeonhole needs disjoint chunks, not
    every bit: a hash within r of the query is within r on any subset)."""
    width = min(bits, 64)
    plan = plan_chunks(width, 1, PG_CHUNKS)[:PG_CHUNKS]
    if bits <= 64:
        return [PgChunk(c.shift, c.bits) for c in plan]
    return [PgChunk(k * bits // PG_CHUNKS, c.bits) for k, c in enumerate(plan)]


def pg_search_plan(n: int, chunks: list, radius: int) -> str:
    """'mih' or 'scan', whichever the cost model says is cheaper (the chunks
    probed as MIHEngine probes its own: probed_chunks)."""
    mih = 0.0
    for _, chunk, most in probed_chunks(chunks, radius):
        probes = _ball(chunk.bits, most)
        mih += probes * (PG_COST_PROBE + n / 2**chunk.bits * PG_COST_CAND)
    return "mih" if mih < n * PG_COST_ROW else "scan"


# ---- connection and schema ----

def pg_connect(url: str):
    """A new autocommit connection to `url`, named after this machine (what
    PgRunLock shows of a busy lock's holder)."""
    psycopg = _psycopg()
    try:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=30,
            application_name=f"reverse_search@{socket.gethostname()}"[:63])
    except psycopg.Error as exc:
        raise StoreError(pg_failure(exc, "cannot connect to", url)) from None


class PgLink:
    """One connection to the database at `url`.  Every driver failure
    leaves as a StoreError that names the database without its password
    (pg_failure), except a lost deadlock inside retry, which runs again."""

    def __init__(self, url: str):
        self.url = url
        self.path = redact_url(url)  # what reports and messages show
        self.psycopg = _psycopg()
        self.conn = pg_connect(url)

    def failure(self, exc: Exception, doing: str) -> StoreError:
        return StoreError(pg_failure(exc, doing, self.url))

    def sql(self, sql: str, params=None):
        """conn.execute, with a driver failure as a StoreError (a lost
        deadlock stays as it is: retry runs the transaction again)."""
        errors = self.psycopg.errors
        try:
            return self.conn.execute(sql, params)
        except (errors.DeadlockDetected, errors.SerializationFailure):
            raise
        except self.psycopg.Error as exc:
            raise self.failure(exc, "failed on") from None

    def retry(self, write) -> None:
        """Run write() in one transaction; again if it lost a deadlock."""
        errors = self.psycopg.errors
        for attempt in range(PG_RETRIES):
            try:
                with self.conn.transaction():
                    write()
                return
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                if attempt == PG_RETRIES - 1:
                    raise self.failure(exc, "cannot write to") from None
                time.sleep(0.05 * (attempt + 1))
            except self.psycopg.Error as exc:  # COPY, or the connection
                raise self.failure(exc, "cannot write to") from None

    def close(self) -> None:
        self.conn.close()


def pg_meta(db: PgLink) -> dict:
    return dict(db.sql("SELECT key, value FROM meta").fetchall())


def pg_put_meta(db: PgLink, **values) -> None:
    with db.conn.cursor() as cur:
        cur.executemany("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value",
                        [(k, str(v)) for k, v in values.items()])


def pg_bump(db: PgLink) -> None:
    """A write's mark: the fingerprint changes (in the write's transaction)."""
    db.sql("UPDATE meta SET value = (value::bigint + 1)::text "
           "WHERE key = 'generation'")


def pg_schema_version(db: PgLink) -> int | None:
    if db.sql("SELECT to_regclass('meta')").fetchone()[0] is None:
        return None
    row = db.sql("SELECT value FROM meta WHERE key = "
                 "'schema_version'").fetchone()
    return int(row[0]) if row else 0


def pg_migrate(db: PgLink) -> None:
    """Bring the schema to PG_SCHEMA_VERSION, one step at a time; the
    advisory lock lets machines that start together do it once."""
    with db.conn.transaction():
        db.sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        version = pg_schema_version(db) or 0
        for step in range(version + 1, PG_SCHEMA_VERSION + 1):
            db.sql(PG_SCHEMA[step])
        db.sql("INSERT INTO meta VALUES ('db_id', %s), ('generation', '0') "
               "ON CONFLICT DO NOTHING", (uuid.uuid4().hex,))
        pg_put_meta(db, schema_version=PG_SCHEMA_VERSION)


def pg_open(db: PgLink, create: bool) -> None:
    """Check the schema's version; create or migrate the tables."""
    try:
        version = pg_schema_version(db)
        if version is None and not create:
            raise StoreError(f"no reverse_search tables in {db.path}; "
                             f"run build first.")
        if version is not None and version > PG_SCHEMA_VERSION:
            raise StoreError(
                f"{db.path} was written by a newer reverse_search (schema "
                f"{version}, this one knows {PG_SCHEMA_VERSION}); upgrade "
                f"it on every machine that shares the database.")
        if version != PG_SCHEMA_VERSION:
            pg_migrate(db)
    except db.psycopg.Error as exc:
        raise db.failure(exc, "cannot use") from None


# ---- the hash kind and the chunk indexes ----

def chunk_layout(bits: int) -> str:
    """What the chunk columns and indexes hold, as meta records it."""
    column = "hash" if bits <= 64 else "hash_bytes"
    return column + ":" + ",".join(f"{c.shift}+{c.bits}"
                                   for c in pg_chunks(bits))


def drop_chunk_indexes(db: PgLink, bits: int) -> None:
    for k in range(PG_CHUNKS):
        db.sql(f"DROP INDEX IF EXISTS images_c{k}")
    pg_put_meta(db, chunk_layout=chunk_layout(bits))


def make_chunk_indexes(db: PgLink) -> None:
    """Chunk indexes carrying (id, hash): candidates are verified from the
    index alone.  Only comparable rows (c0 set) are in them."""
    layout = pg_meta(db).get("chunk_layout", "")
    column = layout.split(":")[0]
    if not column:
        return  # no hash kind yet
    db.sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    for k in range(PG_CHUNKS):
        db.sql(f"CREATE INDEX IF NOT EXISTS images_c{k} ON images "
               f"(c{k}) INCLUDE (id, {column}) WHERE c{k} IS NOT NULL")


def pg_check_kind(db: PgLink, kind: str | None) -> None:
    """Another machine switched the hash kind while we were hashing."""
    if kind is None:
        return
    stored = pg_meta(db).get("hash_kind")
    if stored != kind:
        raise StoreError(f"{db.path} now holds {stored} hashes (another "
                         f"machine changed the hash settings); this run "
                         f"hashes {kind}. Use the same hash settings "
                         f"on every machine.")


def pg_switch_kind(db: PgLink, spec: HashSpec) -> None:
    """Inside a transaction: record the hash kind; drop hashes of any other
    kind (every machine's: hashes of two kinds cannot be compared)."""
    # exclusive: no writer is between its kind check and its commit
    db.sql("SELECT pg_advisory_xact_lock(%s)", (KIND_LOCK,))
    if not comparable(pg_meta(db), spec):
        db.sql("DELETE FROM images")
        pg_bump(db)
    if pg_meta(db).get("chunk_layout") != chunk_layout(spec.bits):
        drop_chunk_indexes(db, spec.bits)
    if db.sql("SELECT EXISTS (SELECT 1 FROM images)").fetchone()[0]:
        make_chunk_indexes(db)
    # else: a bulk load; optimize() builds them at the end, ~10x
    # cheaper than keeping three random-order B-trees up to date
    db.sql("INSERT INTO meta VALUES ('index_key', %s) ON CONFLICT "
           "DO NOTHING", (os.urandom(32).hex(),))  # as in Store
    pg_put_meta(db, **kind_meta(spec))


# ---- COPY ingest: rows to a temp table, then one upsert ----

def incoming_rows(rows: Sequence[ImageRow], bits: int, roots: list) -> list:
    """Rows as COPY writes them into `incoming`, each with the innermost of
    `roots` it lies under (a hot loop: ~50,000 rows a second)."""
    chunks = [(c.shift, (1 << c.bits) - 1) for c in pg_chunks(bits)]
    short, nones = bits <= 64, (None,) * len(chunks)
    roots = sorted({r.rstrip(os.sep) + os.sep for r in roots},
                   key=len, reverse=True)  # longest (innermost) first
    root_of = {top: os.fsencode(top[:-1]) for top in roots}
    out = []
    for seq, r in enumerate(rows):
        path, raw = pg_path_to_db(r.path)
        h = r.hash
        value = hash_to_db(h, bits)
        c = nones if h is None or r.low_detail else \
            tuple((h >> s) & mask for s, mask in chunks)
        root = next((root_of[t] for t in roots if r.path.startswith(t)),
                    None)
        out.append((seq, path, raw, r.size, r.mtime_ns, r.digest,
                    value if short else None, None if short else value,
                    r.extra, bool(r.low_detail), r.detail, r.width,
                    r.height, pg_text(r.error), *c, root, r.traits))
    return out


def pg_write_rows(db: PgLink, data: list, host: str, kind: str | None
                  ) -> None:
    """Inside a transaction: incoming_rows into images, by path, unless
    another machine switched the hash kind meanwhile."""
    db.sql("SELECT pg_advisory_xact_lock_shared(%s)", (KIND_LOCK,))
    pg_check_kind(db, kind)
    with db.conn.cursor() as cur:
        with cur.copy("COPY incoming FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(INCOMING_TYPES)
            for row in data:
                cp.write_row(row)
        cur.execute(UPSERT, {"host": host})
    pg_bump(db)


# ---- reads: paths in pages, hashes in a binary COPY ----

def pg_ranges_sql(roots: Sequence[str]) -> str:
    """Rows under `roots`, as literals (hex only: nothing to escape), so
    the condition also fits COPY and the named-parameter searches."""
    parts = [f"(path >= '\\x{lo.hex()}'::bytea AND path < "
             f"'\\x{hi.hex()}'::bytea)"
             for lo, hi in map(_root_range, roots)]
    return "(" + (" OR ".join(parts) or "false") + ")"


def pg_paged(db: PgLink, columns: str, where: str, lo: bytes,
             hi: bytes | None, params: tuple = ()) -> Iterator[tuple]:
    """(path, *columns) for lo <= path < hi, in path order, a page at a
    time: memory stays bounded and no transaction stays open."""
    last, first = lo, True
    upper = "" if hi is None else " AND path < %s"
    while True:
        cond = "path >= %s" if first else "path > %s"
        rows = db.sql(
            f"SELECT path, {columns} FROM images WHERE {where} AND {cond}"
            f"{upper} ORDER BY path LIMIT {PG_PAGE}",
            (*params, last, *(() if hi is None else (hi,)))).fetchall()
        yield from rows
        if len(rows) < PG_PAGE:
            return
        last, first = rows[-1][0], False


def pg_rows_where(db: PgLink, condition: str) -> list:
    """Rows matching `condition` in SQLite's order (UTF-8 paths, then raw
    bytes)."""
    cur = db.sql(f"SELECT {PG_ROW_COLUMNS}, raw FROM images WHERE {condition}")
    found = [(raw, bytes(r[0]), r) for *r, raw in cur]
    return [pg_image_row(r) for _, _, r in sorted(found, key=lambda f: f[:2])]


def parse_hash_records(buf: bytearray, record: np.dtype, words: int,
                       extra: int, path: str) -> HashArrays:
    """Whole records from the front of buf (which loses them)."""
    n = len(buf) // record.itemsize
    rec = np.frombuffer(bytes(buf[:n * record.itemsize]), dtype=record)
    del buf[:n * record.itemsize]
    if n and not ((rec["fields"] == 4).all() and (rec["n_id"] == 8).all()
                  and (rec["n_hash"] == 8 * words).all()
                  and (rec["n_var"] == 8 * extra * words).all()
                  and (rec["n_detail"] == 8).all()):
        raise StoreError(f"{path}: stored extra hashes (orientations, "
                         f"centres) do not match the settings; run build.")
    return HashArrays(rec["id"].astype(np.int64),
                      rec["hash"].astype(np.uint64).reshape(n, words),
                      rec["var"].astype(np.uint64).reshape(n, extra, words),
                      rec["detail"].astype(np.float32))


def parse_hash_copy(stream: Iterable[bytes], words: int, extra: int,
                    block: int, path: str) -> Iterator[HashArrays]:
    """HashArrays from the bytes of a binary COPY of (id, hash, extra
    hashes, detail), a block of records at a time.  The format: a 19-byte
    header (signature, flags, extension length) and its extension, then
    records of a field count and each field's length and bytes, then -1."""
    record = np.dtype([("fields", ">i2"), ("n_id", ">i4"), ("id", ">i8"),
                       ("n_hash", ">i4"), ("hash", ">u8", (words,)),
                       ("n_var", ">i4"), ("var", ">u8", (extra * words,)),
                       ("n_detail", ">i4"), ("detail", ">f8")])
    buf, start = bytearray(), True
    for data in stream:
        buf += data
        if start and len(buf) >= 19:  # signature, flags, extension
            del buf[:19 + int.from_bytes(buf[15:19], "big")]
            start = False
        if not start and len(buf) >= block * record.itemsize:
            yield parse_hash_records(buf, record, words, extra, path)
    if not start:
        if bytes(buf[-2:]) != b"\xff\xff":
            raise StoreError(f"{path}: hash stream ended early.")
        del buf[-2:]
        if buf:
            yield parse_hash_records(buf, record, words, extra, path)


def copy_hash_blocks(url: str, where: str, words: int, extra: int,
                     block: int = 1 << 18) -> Iterator[HashArrays]:
    """HashArrays of the comparable rows matching `where`, in id order,
    about `block` rows at a time, parsed straight from a binary COPY on a
    connection of its own: bounded memory, one consistent snapshot, and
    the store stays usable between blocks."""
    column = "int8send(hash)" if words == 1 else "hash_bytes"
    sql = (f"COPY (SELECT id, {column}, coalesce(variants, ''::bytea), "
           f"coalesce(detail, 4.0)::float8 FROM images WHERE c0 IS NOT "
           f"NULL AND {where} ORDER BY id) TO STDOUT (FORMAT BINARY)")
    psycopg, conn = _psycopg(), pg_connect(url)
    try:
        with conn.cursor() as cur, cur.copy(sql) as cp:
            yield from parse_hash_copy(cp, words, extra, block,
                                       redact_url(url))
    except psycopg.Error as exc:
        raise StoreError(pg_failure(exc, "cannot read hashes from", url)
                         ) from None
    finally:
        conn.close()


# ---- the query planner: an exact search inside PostgreSQL ----

def pg_search_sql(query: int, radius: int, bits: int, n: int, scope: str
                  ) -> tuple[str, dict]:
    """The SQL and parameters of (id, distance) for every comparable row
    within `radius` bits of `query`, among about n rows: probes of the chunk
    neighbourhoods (multi-index hashing) or a full scan, whichever
    pg_search_plan says is cheaper; both compute distances with bit_count."""
    chunks = pg_chunks(bits)
    if bits <= 64:
        dist = "bit_count((hash # %(q)s)::bit(64))"
        params = {"q": signed64(query), "r": radius}
    else:  # BYTEA holds whole 64-bit words: compare all their bits
        width = 64 * ((bits + 63) // 64)
        dist = (f"bit_count(('x' || encode(hash_bytes, 'hex'))::bit({width})"
                f" # %(q)s::bit({width}))")
        params = {"q": "x" + format(query, f"0{width // 4}x"), "r": radius}
    if pg_search_plan(n, chunks, radius) == "scan":
        return (f"SELECT id, d FROM (SELECT id, {dist} AS d FROM images "
                f"WHERE c0 IS NOT NULL AND {scope}) s WHERE d <= %(r)s"), params
    parts = []
    for k, chunk, most in probed_chunks(chunks, radius):
        v = chunk.value(query)
        params[f"p{k}"] = [int(v ^ m) for m in _flip_masks(chunk.bits, most)]
        parts.append(f"SELECT id, d FROM (SELECT id, {dist} AS d FROM "
                     f"images WHERE c{k} = ANY(%(p{k})s) AND {scope}) "
                     f"b{k} WHERE d <= %(r)s")
    return ("SELECT DISTINCT id, d FROM (" + " UNION ALL ".join(parts) +
            ") c"), params


def pg_row_estimate(db: PgLink) -> int:
    """Rows in images as the planner last counted them (for the plan only:
    a count(*) of millions of rows costs more than the search)."""
    rows = db.sql("SELECT greatest(reltuples, 0)::bigint FROM pg_class "
                  "WHERE oid = 'images'::regclass").fetchone()[0]
    if rows == 0:  # never analysed: count once (small tables)
        rows = db.sql("SELECT count(*) FROM images").fetchone()[0]
    return rows


# ---- the store ----

class PgStore(Scoped):
    """The PostgreSQL database of one collection: a ServerHashStore, its
    work done by the functions above."""

    def __init__(self, url: str, create: bool = False):
        self.url = url
        self.path = redact_url(url)  # what reports and messages show
        self.host = socket.gethostname()
        self.roots = []  # this writer's folders (use_roots); tags its rows
        self.kind = None  # the kind this writer hashes (start_kind)
        self._bits = None  # hash_bits, read once for searches
        self._incoming = False  # the temp table exists
        self._rows_estimate = (0.0, 0)  # (when, rows) for the search planner
        self.db = PgLink(url)
        try:
            pg_open(self.db, create)
        except BaseException:
            self.db.close()
            raise

    def snapshot(self) -> None:
        """Nothing: rows that vanish while a search runs (a concurrent
        update) are skipped by the callers instead."""

    def end_snapshot(self) -> None:
        pass

    def close(self) -> None:
        self.db.close()

    # ---- meta ----
    def meta(self) -> dict:
        return pg_meta(self.db)

    def set_meta(self, **values) -> None:
        with self.db.conn.transaction():
            pg_put_meta(self.db, **values)

    def hash_kind(self) -> str | None:
        return self.meta().get("hash_kind")

    def fingerprint(self) -> str:
        """Changes whenever any writer changes the stored hashes: every write
        bumps `generation` in its own transaction (no count(*): slow here)."""
        meta = self.meta()
        return f"{meta['db_id']}:{meta['generation']}{self._scope_tag()}"

    # ---- coverage (Scoped): each machine its own; other machines' rows are
    # the shared collection and always answered from ----
    def _coverage_text(self) -> str | None:
        return self.meta().get(f"{COVERAGE_KEY}@{self.host}")

    def _set_coverage(self, cov: Coverage) -> None:
        self.set_meta(**{f"{COVERAGE_KEY}@{self.host}": cov.to_meta()})

    def _legacy_coverage(self, kind: str) -> Coverage:
        """Before coverage was recorded: each row names its root already."""
        if self.hash_kind() != kind:
            return Coverage(kind, [])
        cur = self.db.sql("SELECT DISTINCT root FROM images WHERE host = %s "
                          "AND root IS NOT NULL", (self.host,))
        return Coverage(kind, outermost(os.fsdecode(bytes(r)) for r, in cur))

    def _rows_outside(self, roots: Sequence[str]) -> bool:
        return self.db.sql(f"SELECT EXISTS (SELECT 1 FROM images WHERE host "
                           f"= %s AND NOT {pg_ranges_sql(roots)})",
                           (self.host,)).fetchone()[0]

    def _scope_sql(self) -> str:
        if self.scope is None:
            return "true"
        host = "'" + self.host.replace("'", "''") + "'"
        return f"(host <> {host} OR {pg_ranges_sql(self.scope)})"

    # ---- writes: each call is one transaction ----
    def use_roots(self, roots: Sequence[str]) -> None:
        """The folders this run walks: upsert records each row's root."""
        self.roots = [os.path.abspath(r) for r in roots]

    def start_kind(self, spec: HashSpec) -> None:
        """Record the hash kind; drop hashes of any other kind (every
        machine's: hashes of two kinds cannot be compared)."""
        self.db.retry(lambda: pg_switch_kind(self.db, spec))
        self.kind, self._bits = spec.kind, spec.bits

    def upsert(self, rows: Sequence[ImageRow], bits: int) -> None:
        """Insert or replace rows by path (COPY to a temp table, then one
        INSERT ... ON CONFLICT): safe against writers of the same paths."""
        if not rows:
            return
        data = incoming_rows(rows, bits, self.roots)
        if not self._incoming:
            self.db.sql(INCOMING)
            self._incoming = True
        self.db.retry(lambda: pg_write_rows(self.db, data, self.host,
                                            self.kind))

    def delete_paths(self, paths: Iterable[str]) -> int:
        keys = sorted(pg_path_to_db(p)[0] for p in paths)

        def write():
            for start in range(0, len(keys), PG_PAGE):
                self.db.sql("DELETE FROM images WHERE path = ANY(%s)",
                            (keys[start:start + PG_PAGE],))
            pg_bump(self.db)
        self.db.retry(write)
        return len(keys)

    def optimize(self) -> None:
        """At the end of build and update: build missing chunk indexes (a
        bulk load skips them), then VACUUM ANALYZE, which lets searches read
        only the chunk indexes (index-only scans need the visibility map).
        SKIP_LOCKED: a vacuum that another machine runs is enough."""
        with self.db.conn.transaction():
            make_chunk_indexes(self.db)
        self.db.sql("VACUUM (ANALYZE, SKIP_LOCKED) images")

    # ---- reads ----
    def states(self, roots: Sequence[str] | None = None) -> dict:
        """path -> RowState for every stored file under `roots` (all when
        None): what update compares, and what it may delete."""
        ranges = [(b"", None)] if roots is None else \
            [_root_range(os.path.abspath(r)) for r in roots]
        out = {}
        for lo, hi in ranges:
            for p, s, m, ok in pg_paged(self.db, "size, mtime_ns, error IS "
                                        "NULL AND traits IS NOT NULL", "true",
                                        lo, hi):
                out[pg_path_from_db(p)] = RowState(s, m, ok)
        return out

    def hashed_with_size(self, size: int) -> set:
        """Digests of the hashed files of this size (moved or copied files)."""
        cur = self.db.sql(f"SELECT digest FROM images WHERE size = %s AND "
                          f"{HASHED} AND traits IS NOT NULL", (size,))
        return {bytes(d) for d, in cur}

    def hashed_by_digest(self, size: int, digest: bytes) -> ImageRow | None:
        row = self.db.sql(f"SELECT {PG_ROW_COLUMNS} FROM images WHERE size = "
                          f"%s AND digest = %s AND {HASHED} AND traits IS NOT "
                          f"NULL LIMIT 1", (size, digest)).fetchone()
        return None if row is None else pg_image_row(row)

    def hash_arrays(self, words: int, extra: int, block: int = 1 << 18
                    ) -> HashArrays:
        """Every comparable image in scope, as Store.hash_arrays; read in
        blocks of `block` rows (copy_hash_blocks)."""
        return join_hash_blocks(list(copy_hash_blocks(
            self.url, self._scope_sql(), words, extra, block)), words, extra)

    def search_hashes(self, query: int, radius: int) -> list[NearRow]:
        """Every comparable image within `radius` bits of `query`, nearest
        first: exact, computed inside PostgreSQL."""
        bits = self._hash_bits()
        sql, params = pg_search_sql(query, radius, bits, self._row_estimate(),
                                    self._scope_sql())
        found = self.db.sql(sql, params).fetchall()
        return [NearRow(*f) for f in sorted(found, key=lambda f: (f[1], f[0]))]

    def _hash_bits(self) -> int:
        if self._bits is None:
            bits = self.meta().get("hash_bits")
            if bits is None:
                raise StoreError(f"{self.path} holds no hashes yet; run build.")
            self._bits = int(bits)
        return self._bits

    def _row_estimate(self) -> int:
        """pg_row_estimate, read again after 10 seconds."""
        when, rows = self._rows_estimate
        if time.monotonic() - when > 10:
            rows = pg_row_estimate(self.db)
            self._rows_estimate = (time.monotonic(), rows)
        return rows

    def count_comparable(self) -> int:
        """Images a search can find (hashed, not low-detail): len(flat.ids)."""
        return self.db.sql("SELECT count(*) FROM images WHERE c0 IS NOT "
                           f"NULL AND {self._scope_sql()}").fetchone()[0]

    def low_detail_rows(self) -> list:
        return pg_rows_where(self.db, f"low_detail AND {self._scope_sql()}")

    def failed_rows(self) -> list:
        return pg_rows_where(self.db, f"error IS NOT NULL AND "
                                      f"{self._scope_sql()}")

    def rows_by_id(self, ids: Iterable[int]) -> dict:
        ids = sorted({int(i) for i in ids})
        rows = {}
        for start in range(0, len(ids), PG_PAGE):
            cur = self.db.sql(f"SELECT {PG_ROW_COLUMNS} FROM images "
                              f"WHERE id = ANY(%s)",
                              (ids[start:start + PG_PAGE],))
            rows.update((r.id, r) for r in map(pg_image_row, cur))
        return rows

    def rows_by_path(self, paths: Iterable[str]) -> dict:
        keys = sorted({pg_path_to_db(p)[0] for p in paths})
        rows = {}
        for start in range(0, len(keys), PG_PAGE):
            cur = self.db.sql(f"SELECT {PG_ROW_COLUMNS} FROM images WHERE "
                              f"path = ANY(%s)", (keys[start:start + PG_PAGE],))
            rows.update((r.path, r) for r in map(pg_image_row, cur))
        return rows

    def iter_rows(self) -> Iterator[ImageRow]:
        """Every row in SQLite's order: UTF-8 paths by their bytes, then the
        others (SQLite sorts TEXT before BLOB)."""
        cols = PG_ROW_COLUMNS.split(", ", 1)[1]
        for where in ("NOT raw", "raw"):
            for r in pg_paged(self.db, cols, where, b"", None):
                yield pg_image_row(r)


def pg_store_exists(url: str) -> bool:
    """Whether `url` holds reverse_search tables (False if unreachable)."""
    try:
        PgStore(url).close()
        return True
    except StoreError:
        return False


class PgRunLock:
    """One writer per folder, across machines: session advisory locks, held
    on a connection of their own until the run ends (or its process dies).

    A run takes an exclusive lock on each of its roots and a shared lock on
    every folder above them, so two runs conflict when one's root holds the
    other's (same folder, or parent and child) and not otherwise."""

    def __init__(self, url: str, roots: Sequence[str], timeout: float):
        self.url, self.path = url, redact_url(url)
        self.timeout = timeout
        mine = {os.path.abspath(r).rstrip(os.sep) or os.sep for r in roots}
        above = {}  # folder above a root -> that root
        for root in sorted(mine):
            folder = root
            while os.path.dirname(folder) != folder:
                folder = os.path.dirname(folder)
                above.setdefault(folder, root)
        self.locks = sorted([(lock_key(r), True, r, r) for r in mine] +
                            [(lock_key(f), False, f, r) for f, r in above.items()
                             if f not in mine])
        self.conn = None

    def __enter__(self) -> PgRunLock:
        psycopg = _psycopg()
        self.conn = pg_connect(self.url)
        try:
            self._wait(time.monotonic() + self.timeout)
        except psycopg.Error as exc:
            self.conn.close()
            raise StoreError(pg_failure(exc, "lost", self.url)) from None
        return self

    def _wait(self, deadline: float) -> None:
        while True:
            busy = self._try_lock()
            if busy is None:
                return
            if time.monotonic() >= deadline:
                key, exclusive, folder, root = busy
                who = self._holder(key)
                self.conn.close()
                what = f"{folder} or a folder in it" if exclusive else \
                    f"{folder}, which holds {root}"
                raise StoreError(
                    f"another reverse_search run{who} is updating {what}, in "
                    f"{self.path} (waited {self.timeout:g} s, see "
                    f"lock_timeout); try again when it has finished.")
            time.sleep(0.2)

    def _try_lock(self):
        """None when every lock is held, else the one that is busy."""
        for lock in self.locks:
            fn = "pg_try_advisory_lock" if lock[1] else \
                "pg_try_advisory_lock_shared"
            if not self.conn.execute(f"SELECT {fn}(%s)", (lock[0],)).fetchone()[0]:
                self.conn.execute("SELECT pg_advisory_unlock_all()")
                return lock
        return None

    def _holder(self, key: int) -> str:
        """' (from host)' of a session holding `key`, when it can be seen."""
        row = self.conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
            "USING (pid) WHERE l.locktype = 'advisory' AND l.granted AND "
            "l.classid::bigint = %s AND l.objid::bigint = %s AND "
            "l.objsubid = 1 LIMIT 1",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
        name = row[0] if row else ""
        return f" (from {name.split('@', 1)[1]})" if "@" in (name or "") else ""

    def __exit__(self, *exc) -> None:
        self.conn.close()  # ending the session releases its locks


# ============================================================================
# Reports
# ============================================================================

@dataclass
class Failure:
    path: str
    error: str


class Report(abc.ABC):
    """What an operation hands back.  It publishes itself (its result files,
    and stdout in output_format), so nothing asks what kind of report it is."""

    @abc.abstractmethod
    def publish(self, run: Run, ui: Console) -> list:
        """Write the result files and show the report; the paths written."""


class DocumentReport(Report):
    """A report that is one JSON document (<operation>.json), CSV rows
    (<operation>.csv), text lines and a summary line."""

    pictures: ClassVar[bool] = False  # has an HTML page (html_report)

    @abc.abstractmethod
    def body(self) -> dict:
        """The document after its head (operation, version, settings)."""

    @abc.abstractmethod
    def csv_rows(self) -> Iterator[list]:
        """Header row, then one row per match, member, failure or file."""

    @abc.abstractmethod
    def text_lines(self, verbose: bool = False) -> Iterator[str]:
        """What output_format "text" prints, line by line."""

    @abc.abstractmethod
    def summary(self) -> str:
        """The one line said at the end (a notice: -q silences it)."""

    def document(self, cfg: Config) -> dict:
        """The one JSON document of a run (also written to output_dir)."""
        return {"operation": cfg.operation, "tool_version": __version__,
                "settings": settings_of(cfg), **self.body()}

    def written_before(self) -> list:
        """Result files the operation wrote itself (find_duplicates' plan)."""
        return []

    def publish(self, run: Run, ui: Console) -> list:
        cfg = run.config
        doc = self.document(cfg)
        written = write_results(self, cfg, doc) + self.written_before()
        if cfg.html_report and self.pictures:
            page = write_html_report(self, cfg)
            written.insert(0, page)
            if run.open_report:
                open_in_browser(page)
        if cfg.output_format == "json":
            print(json_text(doc))
        elif cfg.output_format == "csv":
            csv.writer(sys.stdout).writerows(self.csv_rows())
        else:  # -q silences progress and notices, never the results
            for line in self.text_lines(run.verbose):
                print(line)
        ui.notice(self.summary())
        return written


def settings_of(cfg: Config) -> dict:
    """The settings as results show them: paths through shown(), no
    password."""
    settings = {name: getattr(cfg, name) for name in CONFIG_FIELDS}
    for name, f in CONFIG_FIELDS.items():
        if f.metadata["path"]:
            value = settings[name]
            settings[name] = [shown(v) for v in value] if \
                isinstance(value, list) else shown(value)
    if cfg.database_url:
        settings["database_url"] = redact_url(cfg.database_url)
    return settings


def _failures_json(failures: list) -> list:
    return [{"path": shown(f.path), "error": f.error} for f in failures]


HOW_COLUMNS = ["stage", "how", "box"]


def _csv_bool(value: bool) -> str:
    return "true" if value else "false"  # as JSON writes it


TEXT_FAILURES = 20  # longer lists go to the results files only


def write_results(report: DocumentReport, cfg: Config, doc: dict) -> list:
    """<operation>.json and .csv in output_dir, each written atomically."""
    base = os.path.join(cfg.output_dir, cfg.operation)
    text = json_text(doc)
    with _output_errors(cfg.output_dir):
        _atomic_write(base + ".json", lambda fh: fh.write(text + "\n"))
        _atomic_write(base + ".csv", lambda fh: csv.writer(fh).writerows(
            report.csv_rows()))
    sweep_stale_temps(cfg.output_dir)
    return [base + ".json", base + ".csv"]


def export_rows(report: ExportReport) -> Iterator[list]:
    yield ["path", "hash", "size", "width", "height", "mtime", "error"]
    for r in report.store.iter_rows():
        yield [shown(r.path), "" if r.hash is None else hash_hex(r.hash, report.bits),
               r.size, "" if r.width is None else r.width,
               "" if r.height is None else r.height, _iso(r.mtime_ns),
               r.error or ""]


def write_export(report: ExportReport, cfg: Config, out) -> list:
    """Stream every row to export.csv (and stdout in the chosen format)."""
    path = os.path.join(cfg.output_dir, "export.csv")
    keys = ["path", "hash", "size", "width", "height", "mtime", "error"]
    fmt, out = cfg.output_format, _Reader(out)

    def body(fh):
        file_csv, out_csv = csv.writer(fh), csv.writer(out)
        first = True
        if fmt == "json":
            out.write(json.dumps({"operation": "export", "tool_version":
                                  __version__, "database": report.database,
                                  "hash_kind": report.hash_kind})[:-1]
                      + ', "images": [')
        for n, row in enumerate(export_rows(report)):
            file_csv.writerow(row)
            if fmt in ("csv", "text"):  # text: tab-separated, header first
                out_csv.writerow(row) if fmt == "csv" else \
                    out.write("\t".join(printable(str(v)) for v in row) + "\n")
            elif fmt == "json" and n:
                out.write(("\n" if first else ",\n") + json.dumps(
                    dict(zip(keys, row)), ensure_ascii=False))
                first = False
        if fmt == "json":
            out.write("\n]}\n")

    with _output_errors(cfg.output_dir):
        _atomic_write(path, body)
    if out.gone:  # export.csv is complete; now stop as `| head` expects
        raise BrokenPipeError
    return [path]


class _Reader:
    """stdout while a result file is streamed: when its reader goes away
    (`| head`), the file is still finished."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text: str) -> None:
        if not self.gone:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self.gone = True


class _output_errors:
    """OSError while writing results -> one StoreError naming the folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError) and \
                not issubclass(exc_type, BrokenPipeError):  # stdout's reader left
            raise StoreError(f"cannot write results to {self.folder}: "
                             f"{exc.strerror or exc} (check output_dir).") from None
        return False


# ---- the HTML report: thumbnails and one self-contained page ----

HTML_PAGE_SIZE = 50      # groups drawn at once: keeps 10,000 groups fast
# Thumbnails are made only for the first page (at most HTML_THUMB_ITEMS
# pictures), so the report costs the same at 1,000 or 1,000,000 images (it
# was 2.6 s of find_duplicates' 2.9 s on the public corpus, 190 s at 1M);
# later pages show the files themselves.  Files a browser draws itself, at
# most HTML_AS_IS_PIXELS and HTML_AS_IS_BYTES, are shown as they are on the
# first page too: a thumbnail would cost 4 ms each and save the browser
# little.  Bigger ones (a 12 MP photo takes a browser ~100 ms and 48 MB to
# draw) and other formats (TIFF, HEIC, PSD, ...) get a thumbnail.
HTML_THUMB_ITEMS = 400
HTML_AS_IS_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP"})
HTML_AS_IS_PIXELS = 2_100_000  # 1920 x 1080 and a little more
HTML_AS_IS_BYTES = 3 << 20
HTML_THUMB_QUALITY = 80  # JPEG quality of thumbnails: small and sharp enough
PLACEHOLDER_NAME = "unreadable.png"
_THUMB_NAME = re.compile(r"[0-9a-f]{20}\.jpg")


def write_html_report(report: SearchReport | DuplicatesReport, cfg: Config,
                      out_dir: str | None = None, thumb_px: int = 160) -> str:
    """Write OUT/<operation>.html and its thumbnails (OUT: output_dir unless
    given); returns the page's path."""
    out_dir = cfg.output_dir if out_dir is None else out_dir
    files = f"{report.operation}_files"
    page_path = os.path.join(out_dir, f"{report.operation}.html")
    max_pixels = cfg.max_image_pixels or 178956970
    with _output_errors(out_dir):
        folder = os.path.join(out_dir, files)
        own_folder(folder)
        # the first page's distinct pictures may get a thumbnail
        first = list(dict.fromkeys(report.page_paths()))[:HTML_THUMB_ITEMS]
        thumbs = make_thumbnails(first, folder, thumb_px, max_pixels)
        for path in report.query_paths():  # past the first page: facts only
            if path not in thumbs:
                thumbs[path] = thumbnail(path, folder, thumb_px, max_pixels,
                                         make=False)
        folders = {}
        data = {"operation": report.operation, "page_size": HTML_PAGE_SIZE,
                "px": thumb_px, "files": files, "placeholder": PLACEHOLDER_NAME,
                "sep": os.sep, "sets": report.html_sets(thumbs, folders),
                "dirs": [{"path": f, "uri": uri} for f, (_, uri) in
                         folders.items()],
                "failures": _failures_json(report.failed()),
                "threshold": cfg.distance_threshold}
        page = _html_page(report, cfg, data)
        _atomic_write(page_path, lambda fh: fh.write(page))
    return page_path


# ---- thumbnails ----

def make_thumbnails(paths: list, folder: str, px: int, max_pixels: int) -> dict:
    """{shown path: thumbnail info}, one JPEG per distinct path, made in threads.

    Pillow releases the GIL while decoding and resizing, so threads use every
    core without the cost of starting processes.
    """
    _setup_decoders()
    placeholder(folder, px)
    workers = min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():  # process-wide, so it covers the threads
        warnings.simplefilter("ignore")  # EXIF and palette notes
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            made = dict(zip(paths, pool.map(
                lambda p: thumbnail(p, folder, px, max_pixels, as_is=True),
                paths)))
    _prune_thumbnails(folder, {t["thumb"] for t in made.values()})
    return made


def thumbnail(path: str, folder: str, px: int, max_pixels: int,
              make: bool = True, as_is: bool = False) -> dict:
    """{"thumb": file name in folder, "w", "h", "size", "mtime_ns"}; the
    placeholder (and None for what is unknown) when the file cannot be read;
    "thumb" None when the page shows the file itself: make=False, or as_is
    and a small picture a browser draws (HTML_AS_IS_*)."""
    info = {"thumb": PLACEHOLDER_NAME, "w": None, "h": None, "size": None,
            "mtime_ns": None}
    from PIL import Image
    real = real_path(path)
    try:
        st = os.stat(real)
        info.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        name = _thumb_name(real, st, px)
        with open_regular(real) as fh, Image.open(fh) as im:
            w, h = im.size
            if w * h > max_pixels:
                return info  # the hasher refused it too: never decode a bomb
            made = os.path.exists(os.path.join(folder, name))
            # Looking for a PNG's EXIF after its pixels decodes them all: not
            # worth it just for the size shown when the thumbnail is made.
            orientation = 1 if made and im.format == "PNG" and \
                "exif" not in im.info else _exif_orientation(im)
            sideways = orientation in (5, 6, 7, 8)  # sizes as displayed
            info.update(w=h if sideways else w, h=w if sideways else h)
            if not make or as_is and (
                    im.format in HTML_AS_IS_FORMATS and w * h <=
                    HTML_AS_IS_PIXELS and st.st_size <= HTML_AS_IS_BYTES):
                info["thumb"] = None
                return info
            if not made:
                _save_thumbnail(im, os.path.join(folder, name), px, orientation)
        info["thumb"] = name
    except Exception:  # missing, unreadable, damaged: the placeholder says so
        pass
    return info


def _thumb_name(real: str, st: os.stat_result, px: int) -> str:
    """Named by path, size, mtime and px: an unchanged file is not redone."""
    key = os.fsencode(real) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{px}".encode()
    return hashlib.sha1(key).hexdigest()[:20] + ".jpg"


def _save_thumbnail(im, dest: str, px: int, orientation: int) -> None:
    """Small, upright, 8-bit RGB, written so no half file is ever left."""
    from PIL import Image
    if im.format == "JPEG":
        im.draft("RGB", (px, px))  # decode at 1/2..1/8 scale: far faster
    im.seek(0)  # first frame of an animation
    small = to_8bit(im)  # alpha over white, 16-bit scaled
    small.thumbnail((px, px), Image.Resampling.LANCZOS, reducing_gap=2.0)
    if orientation in _ORIENT:
        small = small.transpose(getattr(Image.Transpose, _ORIENT[orientation]))
    small = small.convert("RGB")
    _atomic_write(dest, lambda fh: small.save(fh, "JPEG",
                                              quality=HTML_THUMB_QUALITY),
                  binary=True)


def placeholder(folder: str, px: int) -> None:
    """The picture shown for files that cannot be read: a crossed frame."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (px, px), (236, 236, 236))
    draw = ImageDraw.Draw(im)
    m = px // 4
    draw.rectangle([m, m, px - m, px - m], outline=(160, 160, 160), width=3)
    draw.line([m, m, px - m, px - m], fill=(190, 80, 80), width=3)
    draw.line([m, px - m, px - m, m], fill=(190, 80, 80), width=3)
    left, top, right, bottom = draw.textbbox((0, 0), "no preview")
    draw.text(((px - right - left) // 2, px - m // 2 - (bottom + top) // 2),
              "no preview", fill=(110, 110, 110))
    _atomic_write(os.path.join(folder, PLACEHOLDER_NAME),
                  lambda fh: im.save(fh, "PNG"), binary=True)


def _prune_thumbnails(folder: str, used: set) -> None:
    """Drop our own thumbnails of files no longer in the report."""
    sweep_stale_temps(folder)
    for name in os.listdir(folder):
        if _THUMB_NAME.fullmatch(name) and name not in used:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def file_uri(path: str) -> str:
    """file:// URI with every byte of the real path percent-encoded."""
    try:
        return pathlib.Path(os.path.abspath(real_path(path))).as_uri()
    except ValueError:
        return ""


# ---- the page ----

def _html_item(m: Match, thumb: dict | None, folders: dict) -> dict:
    """A card; without "thumb" the page shows the file itself."""
    item = _where(shown(m.path), folders)
    if thumb and thumb["thumb"]:
        item["thumb"] = thumb["thumb"]
    item.update(w=m.width, h=m.height, size=m.size,
                date=_iso(m.mtime_ns).replace("T", " "), dist=m.distance,
                bits=4 * len(m.hash or ""))  # hex digits: 4 bits each
    if m.action in ("move", "protected"):
        item["action"] = m.action
    how = m.how
    if how and (how.verified or how.region):  # not a plain whole-hash match
        item["how"] = how.text()
    # as the JSON rounds it: the page and the document agree
    geometry = how.geometry.as_json() if how and how.geometry else {}
    if geometry.get("share", 1) >= 0.9:
        pass  # the whole picture: no box worth drawing
    elif geometry.get("inner") == "a":  # the query (or lead) inside this one
        item["box"] = geometry["box_fraction"]
    elif geometry.get("inner") == "b":  # this one inside the query (or lead)
        item["lead_box"] = geometry["box_fraction"]
    if m.keep:
        item["role"] = "keep"
    return item


def _html_query(path: str, thumb: dict, folders: dict) -> dict:
    """The query's card: what it is comes from the file itself."""
    date = "" if thumb["mtime_ns"] is None else time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(thumb["mtime_ns"] / 1e9))
    item = _where(path, folders)
    if thumb["thumb"]:
        item["thumb"] = thumb["thumb"]
    item.update(w=thumb["w"], h=thumb["h"], size=thumb["size"], date=date,
                dist=None, role="query")
    return item


def _where(path: str, folders: dict) -> dict:
    """{"name", "dir": index into folders, and "href" or "uri" if needed}.

    Folders repeat on thousands of cards, so the page gets each one once with
    its URI; a card's link is that URI plus "href", the encoded name, which is
    left out when it equals the name (most names).  "uri" is the whole link
    when it cannot be built that way.
    """
    folder, name = os.path.split(path)
    if folder not in folders:
        base = file_uri(folder)
        folders[folder] = (len(folders), base.rstrip("/") + "/")
    index, base = folders[folder]
    uri = file_uri(path)
    item = {"name": name, "dir": index}
    if not uri.startswith(base):
        item["uri"] = uri
    elif uri[len(base):] != name:
        item["href"] = uri[len(base):]
    return item


def _script_json(data) -> str:
    """JSON that is safe inside <script>: no '<' at all, so no '</script>'."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate cannot be written as UTF-8; as a \\udcxx escape it
    # stays valid JSON inside its string.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("<", "\\u003c")


def _html_summary(report: SearchReport | DuplicatesReport,
                  cfg: Config) -> str:
    """The summary box, as escaped HTML."""
    e = html.escape
    stats = "".join(f'<div class="stat"><b>{e(str(v))}</b> {e(k)}</div>'
                    for v, k in report.html_facts())
    settings = "".join(
        f"<tr><th>{e(k)}</th><td>{e(json.dumps(v, ensure_ascii=False))}</td></tr>"
        for k, v in settings_of(cfg).items())
    fails = len(report.failed())
    failures = ('<p class="ok">Every file could be read.</p>' if not fails else
                f'<details id="failures"><summary>{fails:,} '
                f'file{"s" if fails != 1 else ""} could not be read</summary>'
                f'<ul id="failure-list"></ul></details>')
    run = (f'{e(report.operation)} · engine {e(report.engine)}'
           f' · {e(str(round(report.seconds, 3)))} s · database '
           f'<code>{e(shown(report.database))}</code> · '
           f'reverse_search {e(__version__)}')
    return (f'<div class="stats">{stats}</div><p class="run">{run}</p>'
            f'{failures}<details><summary>Settings used</summary>'
            f'<table class="settings">{settings}</table></details>')


def _html_page(report: SearchReport | DuplicatesReport, cfg: Config,
               data: dict) -> str:
    parts = {"TITLE": report.title, "PX": str(data["px"]),
             "SUMMARY": _html_summary(report, cfg), "DATA": _script_json(data)}
    # One pass: a file name that reads "@DATA@" stays text.
    return re.sub(r"@(TITLE|PX|SUMMARY|DATA)@", lambda m: parts[m.group(1)],
                  HTML_TEMPLATE)


def emit(report: Report, run: Run, ui: Console) -> None:
    """Print the report on stdout in output_format and save the result files."""
    ui.notice("results: " + ", ".join(report.publish(run, ui)))


def open_in_browser(path: str) -> None:
    """A file (the HTML report) or the review page's http:// address."""
    import webbrowser
    # A onefile executable's bootloader puts its unpacked libraries first on
    # LD_LIBRARY_PATH (Linux); the browser must start with the system's own.
    saved = os.environ.get("LD_LIBRARY_PATH")
    if getattr(sys, "frozen", False) and saved is not None:
        original = os.environ.get("LD_LIBRARY_PATH_ORIG")
        if original is None:
            del os.environ["LD_LIBRARY_PATH"]
        else:
            os.environ["LD_LIBRARY_PATH"] = original
    try:
        # no browser is not an error: the path is shown
        with contextlib.suppress(Exception):
            webbrowser.open(path if path.startswith("http://") else
                            pathlib.Path(path).as_uri())
    finally:
        if saved is not None:
            os.environ["LD_LIBRARY_PATH"] = saved


# ============================================================================
# Operations: build and update
# ============================================================================

@dataclass
class UpdateReport(DocumentReport):
    """What build or update did."""

    operation: str
    database: str
    hash_kind: str
    files: int = 0
    hashed: int = 0
    reused: int = 0
    unchanged: int = 0
    failed: int = 0
    removed: int = 0
    seconds: float = 0.0
    failures: list = field(default_factory=list)
    unreadable_dirs: list = field(default_factory=list)
    # update lists what it found (build would list every file)
    added: list = field(default_factory=list)     # paths
    changed: list = field(default_factory=list)   # paths, rehashed
    removed_files: list = field(default_factory=list)
    renamed: list = field(default_factory=list)   # (old path, new path)

    def body(self) -> dict:
        lists = ("added", "changed", "removed_files", "renamed")
        body = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("failures", "unreadable_dirs", "operation") + lists}
        body["database"] = shown(self.database)
        body["seconds"] = round(self.seconds, 3)
        body["failures"] = _failures_json(self.failures)
        body["unreadable_dirs"] = _failures_json(self.unreadable_dirs)
        if self.operation == "update":  # build would list every file
            body["renamed"] = len(self.renamed)
            body.update({f"{k}_files": [shown(p) for p in getattr(self, k)]
                         for k in ("added", "changed")})
            body["removed_files"] = [shown(p) for p in self.removed_files]
            body["renamed_files"] = [{"from": shown(a), "to": shown(b)}
                                     for a, b in self.renamed]
        return body

    def csv_rows(self) -> Iterator[list]:
        yield ["path", "error"]
        for f in self.failures + self.unreadable_dirs:
            yield [shown(f.path), f.error]

    def text_lines(self, verbose: bool = False) -> Iterator[str]:
        if verbose:
            yield from self._changes_text()
        for f in self.failures[:TEXT_FAILURES]:
            yield f"skipped {printable(f.path)}: {f.error}"
        if len(self.failures) > TEXT_FAILURES:
            yield (f"... and {len(self.failures) - TEXT_FAILURES} more "
                   f"skipped files: see the results files.")
        for f in self.unreadable_dirs:
            yield f"could not read folder {printable(f.path)}: {f.error}"

    def _changes_text(self) -> Iterator[str]:
        """update -v: every file added, changed, renamed or moved, removed."""
        for path in self.added:
            yield f"added    {shown(path)}"
        for path in self.changed:
            yield f"changed  {shown(path)}"
        for old, new in self.renamed:
            yield f"renamed  {shown(old)} -> {shown(new)}"
        for path in self.removed_files:
            yield f"removed  {shown(path)}"

    def summary(self) -> str:
        rate = self.hashed / self.seconds if self.seconds else 0.0
        moved = f", {len(self.renamed)} renamed" if self.renamed else ""
        return (f"{self.operation}: {counted(self.files, 'file')}, {self.hashed} "
                f"hashed, {self.reused} reused, {self.unchanged} unchanged, "
                f"{self.failed} failed, {self.removed} removed{moved} in "
                f"{self.seconds:.1f} s" + (f" ({rate:.0f} images/s)"
                                           if self.hashed else ""))


class BatchWriter:
    """Rows go to SQLite in batched transactions, never one commit per row."""

    def __init__(self, store: HashStore, bits: int, rows: int = 256,
                 seconds: float = 1.0):
        self.store, self.bits = store, bits
        self.limit, self.seconds = rows, seconds
        self.pending = []
        self.last = time.monotonic()

    def add(self, row: ImageRow) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.limit or \
                time.monotonic() - self.last > self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.upsert(self.pending, self.bits)
            self.pending = []
        self.last = time.monotonic()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _walk(cfg: Config, roots: list) -> Walk:
    exts = [e.lower() if e.startswith(".") else "." + e.lower()
            for e in cfg.extensions]
    return Walk(roots, exts, cfg.follow_symlinks,
                skip_dirs=(cfg.db_dir, cfg.bk_dir, cfg.output_dir,
                           cfg.quarantine_dir))


def _job(cfg: Config) -> HashJob:
    return HashJob(cfg.spec, cfg.max_image_pixels, cfg.max_file_mb * 2**20,
                   cfg.max_decode_mb * 2**20)


def resized_otherwise(store: HashStore, spec: HashSpec) -> str | None:
    """The rule of a database of this hash kind whose hashes another
    Pillow made, resizing another way; None when they compare."""
    meta = store.meta()
    if meta.get("hash_kind") != spec.kind or comparable(meta, spec):
        return None  # rehashed anyway, or nothing to do
    return stored_resize(meta)


def sync_store(cfg: Config, store: HashStore, ui: Console, operation: str,
               rehash: bool = False) -> UpdateReport:
    """Bring the database in line with the files under img_dirs."""
    spec, start = cfg.spec, time.monotonic()
    if store.hash_kind() not in (None, spec.kind):
        ui.notice(f"{store.path} holds {store.hash_kind()} hashes; params ask "
                  f"for {spec.kind}: rehashing every file.")
    elif other := resized_otherwise(store, spec):
        ui.notice(f"{store.path} was hashed by a Pillow that resizes {other}; "
                  f"this one resizes {resize_rule()}, and tall pictures' "
                  f"hashes differ: rehashing every file.")
    store.start_kind(spec)
    store.use_roots(cfg.img_dirs)
    states = store.states(cfg.img_dirs)
    report = UpdateReport(operation, store.path, spec.describe())
    walk, seen = _walk(cfg, cfg.img_dirs), set()
    total = None
    if sys.stderr.isatty() and not ui.quiet:
        # a bar wants a total: the files to hash (the others take no time,
        # and counting them would make the time left a guess)
        total = sum(1 for f in _walk(cfg, cfg.img_dirs)
                    if not f.error and not _as_stored(f, states, rehash))
    writer, job = BatchWriter(store, spec.bits), _job(cfg)
    copied = {}  # new path -> the stored path whose bytes it has
    try:
        with Hasher(job, cfg.worker_count) as hasher, \
                ui.progress(total, f"{operation}: hashing") as bar:
            known = KnownDigests(store)
            for batch in _batched(walk, 1000):
                tasks = _plan_batch(batch, states, known, seen, writer, report,
                                    rehash)
                for result in hasher.map(tasks):
                    _record(result, store, writer, report, job, copied)
                    bar.update(1)
    finally:
        writer.flush()  # keep every file hashed so far, even on Ctrl-C
    kept = _absent_roots(cfg, states, seen, ui)
    report.unreadable_dirs = [Failure(p, e) for p, e in walk.unreadable
                              if p not in kept] + \
        [Failure(root, why) for root, why in kept.items()]
    _forget_missing(store, states, seen, walk.unreadable + list(kept.items()),
                    copied, report)
    store.record_coverage(cfg.img_dirs, spec.kind)
    report.seconds = time.monotonic() - start
    return report


def _plan_batch(batch, states, known, seen, writer, report,
                rehash: bool = False) -> list:
    """Tasks for the files that need hashing; the rest is counted here."""
    tasks = []
    for found in batch:
        if states:  # a fresh build has nothing to compare against
            seen.add(found.path)
        report.files += 1
        if found.error:
            writer.add(ImageRow(found.path, found.size, found.mtime_ns,
                                error=found.error))
            report.failed += 1
            report.failures.append(Failure(found.path, found.error))
            continue
        if _as_stored(found, states, rehash):
            report.unchanged += 1
            continue
        if report.operation == "update":
            (report.changed if found.path in states else
             report.added).append(found.path)
        tasks.append(HashTask(found.path, known(found.size) if states
                              and not rehash else frozenset()))
    return tasks


def _as_stored(found: FoundFile, states: dict, rehash: bool) -> bool:
    """Whether a stored file is as it was hashed (same size and mtime)."""
    old = None if rehash else states.get(found.path)
    return bool(old and old.ok and old.size == found.size and
                old.mtime_ns == found.mtime_ns)


class KnownDigests:
    """Digests of stored files by size, asked once per size and run.  Sizes
    shared by very many files (uncompressed images of one format) are not
    worth shipping to every task: those files are simply decoded."""

    LIMIT = 64

    def __init__(self, store: HashStore):
        self.store = store
        self.cache = {}

    def __call__(self, size: int) -> frozenset:
        if size not in self.cache:
            found = frozenset(self.store.hashed_with_size(size))
            self.cache[size] = found if len(found) <= self.LIMIT else frozenset()
        return self.cache[size]


def _record(result: HashResult, store: HashStore, writer: BatchWriter,
            report: UpdateReport, job: HashJob, copied: dict) -> None:
    if result.reused:  # same bytes as a stored file: copy its hash
        source = store.hashed_by_digest(result.size, result.digest)
        if source is None:
            result = hash_file(HashTask(result.path), job)
        else:
            copied[result.path] = source.path  # a rename, if source is gone
            result.hash, result.width, result.height = \
                source.hash, source.width, source.height
            result.extra, result.low_detail, result.detail = \
                source.extra, source.low_detail, source.detail
            result.traits = source.traits
            report.reused += 1
    if result.error:
        report.failed += 1
        report.failures.append(Failure(result.path, result.error))
    elif not result.reused:
        report.hashed += 1
    writer.add(result)


def _forget_missing(store: HashStore, states: dict, seen: set, blocked: list,
                    copied: dict, report: UpdateReport) -> None:
    """Forget files that are gone, but not those in folders we could not
    read; a gone file whose bytes reappeared under a new name was renamed
    or moved (its row is already there under the new name)."""
    blocked = tuple(folder.rstrip(os.sep) + os.sep for folder, _ in blocked)
    gone = [p for p in states if p not in seen and not p.startswith(blocked)]
    if gone:
        store.delete_paths(gone)
    left = set(gone)
    for new, old in copied.items():
        if old in left:
            left.discard(old)
            report.renamed.append((old, new))
    moved_to = {new for _, new in report.renamed}
    report.added = [p for p in report.added if p not in moved_to]
    report.removed_files = sorted(left)
    report.removed = len(left)


def _absent_roots(cfg: Config, states: dict, seen: set, ui: Console) -> dict:
    """img_dirs folders that are missing or empty while the database holds
    files under them: a drive not mounted, most likely.  Their rows are
    kept (root -> why), never forgotten without a word."""
    kept = {}
    for root in cfg.img_dirs:
        if any(covers(root, p) for p in seen):
            continue  # stops at the first file: cheap for a folder in use
        count = sum(1 for p in states if covers(root, p))
        if count:
            state = "is missing" if not os.path.isdir(root) else "is empty"
            kept[root] = (f"{state}, but the database holds {count} files "
                          f"under it: kept them (is a drive not mounted?). If "
                          f"you emptied it on purpose, run build.")
            ui.notice(f"warning: img_dirs folder {shown(root)} {kept[root]}")
    return kept


def op_build(run: Run, ui: Console) -> UpdateReport:
    """Hash everything into a new database; an old one is replaced at the end."""
    return build_store(run.config, ui)


def build_store(cfg: Config, ui: Console) -> UpdateReport:
    """build, also when another operation finds no database."""
    check_folders(cfg, ["img_dirs"])
    if cfg.database_url:  # a shared database is never replaced: rehash ours
        with _run_lock(cfg):
            store = _open_store(cfg, create=True)
            try:
                report = sync_store(cfg, store, ui, "build", rehash=True)
                store.optimize()
            finally:
                store.close()
        return report
    with RunLock(cfg.db_path, cfg.lock_timeout):
        target = cfg.db_path
        if os.path.exists(cfg.db_path):
            if not marked_ours(cfg.db_path):  # ours, even damaged, is replaced
                _open_store(cfg).close()  # another program's is refused
            target = cfg.db_path + ".new"  # resumed if a build was interrupted
        store = _open_store(cfg, create=True, path=target)
        try:
            report = sync_store(cfg, store, ui, "build")
        finally:
            store.close()
        if target != cfg.db_path:
            _settle(cfg.db_path)
            os.replace(target, cfg.db_path)
        report.database = cfg.db_path
        store = _open_store(cfg)
        try:
            save_index(cfg, store, ui)
        finally:
            store.close()
    return report


def _settle(path: str) -> None:
    """Open and close a database so SQLite finishes any hot journal first."""
    with contextlib.suppress(sqlite3.Error):
        con = sqlite3.connect(path)
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        con.close()


def _open_store(cfg: Config, create: bool = False, path: str | None = None
                ) -> HashStore:
    """The database, answering only from rows under cfg.img_dirs."""
    if cfg.database_url:
        store = PgStore(cfg.database_url, create)
    else:
        path = path or cfg.db_path
        if os.path.islink(path):  # SQLite would write where it points
            raise StoreError(f"{path} is a symbolic link; the database must be "
                             f"a plain file (point db_dir at its folder "
                             f"instead).")
        try:
            store = Store(path, create)
        except sqlite3.Error as exc:
            raise StoreError(describe_db_error(exc, path)) from None
        except OSError as exc:
            raise StoreError(f"cannot open database {path}: {exc}.") from None
    store.set_scope(cfg.img_dirs, cfg.spec.kind)
    return store


def _store_exists(cfg: Config) -> bool:
    if cfg.database_url:
        return pg_store_exists(cfg.database_url)
    return os.path.exists(cfg.db_path)


def _run_lock(cfg: Config):
    if cfg.database_url:
        return PgRunLock(cfg.database_url, cfg.img_dirs, cfg.lock_timeout)
    return RunLock(cfg.db_path, cfg.lock_timeout)


def op_update(run: Run, ui: Console) -> UpdateReport:
    """Add new files, rehash changed ones, forget deleted ones."""
    return update_store(run.config, ui)


def update_store(cfg: Config, ui: Console) -> UpdateReport:
    """update, also when another operation finds a database of another
    hash kind."""
    if not _store_exists(cfg):
        ui.notice(f"no database at {cfg.db_name} yet: building it.")
        return build_store(cfg, ui)
    with _run_lock(cfg):
        store = _open_store(cfg)
        try:
            # a covered folder that is gone (an unmounted drive) is reported
            # by sync_store, and its rows kept; any other must exist
            covered = store.coverage(cfg.spec.kind).roots
            check_folders(cfg, ["img_dirs"], absent_ok=[
                r for r in cfg.img_dirs if not outside([r], covered)])
            report = sync_store(cfg, store, ui, "update")
            if cfg.database_url:
                store.optimize()
            else:
                save_index(cfg, store, ui)
            note_ignored(cfg, store, ui)
        finally:
            store.close()
    return report


def ready_store(cfg: Config, ui: Console) -> HashStore:
    """The database, built first when missing, rehashed when of another kind,
    brought up to date for folders of img_dirs it does not cover yet."""
    if not _store_exists(cfg):
        ui.notice(f"no database at {cfg.db_name} yet: building it first.")
        build_store(cfg, ui)
    store = _open_store(cfg)
    if store.hash_kind() != cfg.spec.kind or \
            resized_otherwise(store, cfg.spec):
        store.close()
        update_store(cfg, ui)
        store = _open_store(cfg)
    elif new := store.uncovered(cfg.img_dirs, cfg.spec.kind):
        store.close()
        add_folders(cfg, new, ui)
        store = _open_store(cfg)
    note_ignored(cfg, store, ui)
    return store


def add_folders(cfg: Config, folders: list, ui: Console) -> UpdateReport:
    """Hash folders of img_dirs the database does not cover yet (an update
    of those folders only: the others are not walked)."""
    ui.notice(f"img_dirs names {len(folders)} folder(s) {cfg.db_name} does "
              f"not cover yet; hashing them first: {', '.join(folders)}")
    part = dataclasses.replace(cfg, img_dirs=list(folders))
    part.sources = cfg.sources
    check_folders(part, ["img_dirs"])
    with _run_lock(part):
        store = _open_store(part)
        try:
            return sync_store(part, store, ui, "update")
        finally:
            store.close()


def note_ignored(cfg: Config, store: HashStore, ui: Console) -> None:
    """One line when the database holds folders this run does not ask for."""
    cov = store.coverage(cfg.spec.kind)
    extra = outside(cov.roots, cfg.img_dirs)
    if extra or cov.unknown:
        what = ", ".join(extra) or "folders not recorded"
        drop = ("delete their rows in psql (README)" if cfg.database_url
                else "build drops them")
        ui.notice(f"{cfg.db_name} also holds {what}, not in img_dirs: kept "
                  f"but not searched ({drop}).")


# ============================================================================
# Operations: search
# ============================================================================

def _as_regions(views, radius: int) -> Regions | None:
    """A Regions, also from a plain list of (centre view, engine)."""
    if views is None or isinstance(views, Regions):
        return views
    return Regions(list(views), radius)


def load_marks(cfg: Config) -> set:
    """Pairs the user marked as different pictures (not_duplicates CSV)."""
    path = cfg.not_duplicates
    if not os.path.isfile(path):
        return set()
    base, marks = os.path.dirname(path), set()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for n, row in enumerate(csv.reader(fh), 1):
                cells = [c.strip() for c in row if c.strip()]
                if not cells or cells[0].startswith("#") or \
                        n == 1 and cells[0].lower() in ("path_a", "a", "path"):
                    continue
                if len(cells) != 2:
                    raise ConfigError(f"{path}: line {n}: expected two paths "
                                      f"separated by a comma, got {len(cells)}.")
                marks.add(frozenset(os.path.abspath(os.path.join(base, c))
                                    for c in cells))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc}).") from None
    except csv.Error as exc:  # a field over 128 KiB, a NUL byte: not paths
        raise ConfigError(f"{path} (key 'not_duplicates'): not a CSV of path "
                          f"pairs ({exc}); fix or remove it.") from None
    return marks


@dataclass
class Match:
    path: str
    hash: str
    distance: int
    width: int | None = None
    height: int | None = None
    size: int = 0
    mtime_ns: int = 0
    keep: bool = False
    variant: str | None = None  # how it matched when not as stored
    how: How | None = None
    action: str | None = None   # find_duplicates: keep, move or protected

    def as_json(self) -> dict:
        doc = {"path": shown(self.path), "hash": self.hash,
               "distance": self.distance, "width": self.width,
               "height": self.height, "size": self.size,
               "mtime": _iso(self.mtime_ns), "keep": self.keep,
               "variant": self.variant,
               "how": self.how.as_json() if self.how else None}
        if self.action:
            doc["action"] = self.action
        return doc

    def dims(self) -> str:
        return f"{self.width}x{self.height}, {human_bytes(self.size)}"

    def how_suffix(self) -> str:
        """What the text output adds after a match: how, unless plain."""
        if self.how is None or self.how.stage == STAGES[0] and \
                not self.how.verified:
            return ""
        return f"  ({self.how.text()})"

    def how_cells(self) -> list:
        """stage, how it matched, and the box "left top right bottom"
        (pixels of the picture that holds the other) when verification
        found one."""
        if self.how is None:
            return ["", "", ""]
        g = self.how.geometry
        box = " ".join(f"{v:.0f}" for v in g.box) if g and g.inner else ""
        return [self.how.stage, self.how.text(), box]


@dataclass
class How:
    """How a match was found: the hash stage (and its region or orientation)
    and, when verified, where the one picture lies in the other."""

    stage: str
    region: str | None = None    # MATCH_NAMES name, None for the whole picture
    verified: bool = False
    geometry: Geometry | None = None

    def text(self) -> str:
        found = self.region or self.stage
        if not self.verified:
            return found
        g = self.geometry
        if g is None or g.inner != "" and g.share >= 0.9 and abs(g.angle) < 0.5 \
                and self.stage in (STAGES[0], STAGES[1]):
            return f"{found}, verified"  # nothing to add to what it says
        return f"{found}, verified: {g.describe()}"

    def as_json(self) -> dict:
        return {"stage": self.stage, "region": self.region,
                "verified": self.verified,
                "geometry": self.geometry.as_json() if self.geometry else None,
                "text": self.text()}


# Verified mode also takes whole-hash candidates this many bits past the
# threshold, each one verified (a sticker moves a copy ~12 bits away).
VERIFY_EXTRA_BITS = 6
# Candidates refused per query before the rest are dropped, nearest first:
# one check costs ~30 ms (features of the stored image ~10, the check ~20),
# so a search stays under a second however many unrelated pictures a large
# collection puts near the query; checks that find a copy do not count (the
# tough corpus's originals have 16-20 copies each, most of them verified).
VERIFY_PER_QUERY = 24


class Candidate(NamedTuple):
    """A query's hit the judge decides on: the stored row, the hit, the
    pair's (adaptive) limit, the lesser of the two pictures' detail, and
    whether either is framed (see Judge.wants_check)."""

    row: ImageRow
    hit: Hit
    limit: float
    detail: float
    framed: bool


def vouches(bits, limit, detail, framed):
    """Whether a whole-hash distance within the limit counts without a
    check on the pixels (verified mode), for scalars or arrays alike:
    pictures with detail enough, or within half the limit (dark frames with
    one blob collide: 4 of the tough corpus's 150 distractors; their copies
    verify badly); a framed picture only within a quarter of it (its whole
    hash is much its frame's: one caption band over 30 photos put 13 of
    them in one group, 8-12 bits apart)."""
    bits = np.asarray(bits)
    return np.where(framed, 4 * bits <= limit,
                    (np.asarray(detail) >= DETAIL_FULL) | (2 * bits <= limit))


def framed(extra: bytes | None, spec: HashSpec) -> bool:
    """Whether a picture's content box, stored among its extra hashes, is
    not the whole picture (a frame, a band, a page around it)."""
    if not extra or not spec.content_count:
        return False
    size = 8 * spec.words
    at = (spec.variant_count + spec.centre_count + 1) * size
    return int.from_bytes(extra[at:at + size], "big") != FULL_BOX_WORD


VERDICTS_NAME = "verdicts.idx"  # in bk_dir: verdicts of earlier runs
VERDICTS_KEPT = 250_000  # most recent verdicts kept (~150 bytes each)


def program_stamp() -> str:
    """What this program is, for caches whose content its code decides: the
    script's SHA-256 (any edit is another program), or the executable's
    size and time when frozen (no script file to read there)."""
    if getattr(sys, "frozen", False):
        st = os.stat(sys.executable)
        return f"exe:{st.st_size}:{st.st_mtime_ns}"
    with open(__file__, "rb") as fh:
        return "py:" + hashlib.sha256(fh.read()).hexdigest()


def _file_stamp(path: str) -> str:
    """A file as a verdict depends on it: its path and what changes when its
    bytes do (size, times, inode); "" when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0" \
           f"{st.st_ino}"


def _verdict_json(verdict: Verdict) -> list:
    g = verdict.geometry
    return [verdict.accepted, verdict.reason, verdict.inliers, None if g is None
            else [g.inner, list(g.box), g.scale, g.turn, g.angle, g.mirror,
                  g.share, g.inliers, list(g.outer_size)]]


def _verdict_of(item: list) -> Verdict:
    accepted, reason, inliers, g = item
    if g is not None:
        inner, box, scale, turn, angle, mirror, share, gin, outer = g
        g = Geometry(str(inner), tuple(box), float(scale), int(turn),
                     float(angle), bool(mirror), float(share), int(gin),
                     tuple(outer))
    return Verdict(bool(accepted), str(reason), int(inliers), g)


class VerdictMemory:
    """Verdicts of earlier runs, so that find_duplicates or a search run
    again (after review, after an update that added a few files) checks on
    the pixels only the pairs it has not checked before.

    A verdict is kept under a digest of the program (program_stamp: another
    version checks afresh), max_image_pixels and both files' stamps
    (_file_stamp: a file rewritten, replaced or moved is checked again).
    The file (bk_dir/verdicts.idx) is a cache like the index: signed with
    the database's key, JSON and arrays only (nothing unpickled), written
    fresh and renamed into place; damaged or another program's, it is
    ignored and rewritten."""

    def __init__(self, path: str, key: bytes, rules: str):
        self.path, self.key, self.rules = path, key, rules
        self.known: dict = {}  # digest -> verdict as JSON, oldest first
        self.stamps: dict = {}  # path -> _file_stamp
        self.changed = False
        with contextlib.suppress(Exception):  # unreadable: start empty
            self._load()

    def _load(self) -> None:
        header, arrays = read_container(self.path, self.key)
        if header.get("format") != "verdicts" or \
                header.get("rules") != self.rules:
            return  # another program's verdicts: checked afresh
        items = json.loads(arrays["items"].tobytes().decode("utf-8"))
        digests = arrays["digests"]
        if len(items) == len(digests) and digests.shape[1:] == (16,):
            self.known = dict(zip((d.tobytes() for d in digests), items))

    def _digest(self, path_a: str, path_b: str, plain: bool
                ) -> bytes | None:
        for p in (path_a, path_b):
            if p not in self.stamps:
                self.stamps[p] = _file_stamp(p)
        a, b = self.stamps[path_a], self.stamps[path_b]
        if not a or not b:
            return None  # a file gone: its check says so, never remembered
        text = f"{self.rules}\0{a}\0{'plain' if plain else ''}\0{b}"
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"),
                               digest_size=16).digest()

    def get(self, path_a: str, path_b: str, plain: bool = False
            ) -> Verdict | None:
        digest = self._digest(path_a, path_b, plain)
        item = self.known.get(digest) if digest else None
        if item is None:
            return None
        try:
            return _verdict_of(item)
        except (TypeError, ValueError):  # not one this tool wrote: a database
            return None  # from before its key signs with a plain checksum

    def put(self, path_a: str, path_b: str, verdict: Verdict,
            plain: bool = False) -> None:
        digest = self._digest(path_a, path_b, plain)
        if digest is not None:
            self.known.pop(digest, None)  # newest last: the oldest go first
            self.known[digest] = _verdict_json(verdict)
            self.changed = True

    def save(self, say) -> None:
        if not self.changed:
            return
        kept = list(self.known.items())[-VERDICTS_KEPT:]
        digests = np.frombuffer(b"".join(d for d, _ in kept), dtype=np.uint8
                                ).reshape(len(kept), 16)
        text = json.dumps([item for _, item in kept]).encode("utf-8")
        try:
            write_container(self.path, {"format": "verdicts",
                                        "rules": self.rules},
                            {"digests": digests,
                             "items": np.frombuffer(text, dtype=np.uint8)},
                            self.key)
        except OSError as exc:
            say(f"cannot save the checks made ({self.path}: "
                f"{exc.strerror or exc}; check bk_dir): the next run makes "
                f"them again.")


class Judge:
    """Which hash candidates become matches.  fast: every one within the
    threshold.  verified: a whole-picture hash within the threshold is
    taken as it is; the rest (another orientation, a region, a larger
    distance) only when verification finds the one picture in the other.

    Checks known to be needed are verified ahead, together, in worker
    processes (prefetch); check() then takes their verdicts.  close()
    stops the workers."""

    def __init__(self, cfg: Config, ui: Console):
        self.verifier = None
        self.left = VERIFY_PER_QUERY
        self.workers = cfg.worker_count
        self.pool: VerifyPool | None = None
        self.ready: dict = {}  # (path a, path b) -> Verdict found ahead
        self.verdicts: dict = {}  # (path a, path b) -> Verdict, as checked
        self.memory: VerdictMemory | None = None
        self.say = ui.notice
        self.plain: set = set()  # (path a, path b): first try only (plainly())
        self.recalled: set = set()  # pairs whose verdict the memory gave
        if cfg.matching == "verified":
            if _cv2() is None:
                ui.notice("OpenCV is not installed (pip install "
                          "opencv-python-headless): matching by hashes only, "
                          "as with \"matching\": \"fast\".")
            else:
                self.job = VerifyJob(cfg.max_image_pixels, uuid.uuid4().hex)
                self.verifier = verifier_for(self.job)

    @property
    def extra_bits(self) -> int:
        return VERIFY_EXTRA_BITS if self.verifier else 0

    def remember(self, cfg: Config, key: bytes) -> None:
        """Take the verdicts of earlier runs from bk_dir (VerdictMemory)
        and keep this run's there when it closes."""
        if self.verifier is not None:
            self.memory = VerdictMemory(
                os.path.join(cfg.bk_dir, VERDICTS_NAME), key,
                f"{program_stamp()}\0{cfg.max_image_pixels}")

    def wants_check(self, hit: Hit, limit, detail: float,
                    framed: bool = False) -> bool:
        """Whether __call__ verifies this hit (budget aside): any but a
        whole-hash match within the limit that vouches().  detail: the
        lesser of the two pictures' detail_bits; framed: either picture's
        content box is not the whole of it."""
        strong = hit.effective <= limit and hit.code < 0 and \
            bool(vouches(hit.bits, limit, detail, framed))
        return self.verifier is not None and not strong

    def __call__(self, path_a: str, path_b: str, hit: Hit, limit,
                 detail: float = DETAIL_FULL, framed: bool = False
                 ) -> How | None:
        stage = stage_of(hit.code)
        region = MATCH_NAMES[hit.code] if hit.code >= 0 else None
        if not self.wants_check(hit, limit, detail, framed):
            return How(stage, region) if hit.effective <= limit else None
        if self.left <= 0:
            return None
        verdict = self.check(path_a, path_b)
        if not verdict.accepted:  # a check that finds a copy is no waste
            self.left -= 1
        return How(stage, region, True, verdict.geometry) \
            if verdict.accepted else None

    def next_query(self) -> None:
        self.left = VERIFY_PER_QUERY

    def planned(self, path: str, candidates: Iterable) -> list:
        """Pairs __call__ is sure to verify for one query, given its
        Candidates in the order it sees them: the first VERIFY_PER_QUERY it
        wants (more when some find copies)."""
        return [(path, c.row.path) for c in candidates
                if self.wants_check(c.hit, c.limit, c.detail, c.framed)
                ][:VERIFY_PER_QUERY]

    def check(self, path_a: str, path_b: str) -> Verdict:
        """The verdict on a pair, checked once per run (expand() asks again
        for pairs a query refused, to skip them)."""
        key = (path_a, path_b)
        if key not in self.verdicts:
            verdict = self.ready.pop(key, None) or self._recalled(key)
            if verdict is None and self.pool is not None:
                # the workers are up: one that has seen these files checks
                # it (std corpus: 17 checks in this process, 21 files' features)
                self.prefetch([key])
                verdict = self.ready.pop(key, None)
            if verdict is None:
                verdict = self.verifier.check(path_a, path_b, key in self.plain)
                self._remember(key, verdict)
            self.verdicts[key] = verdict
        return self.verdicts[key]

    def _recalled(self, pair: tuple) -> Verdict | None:
        found = None if self.memory is None else \
            self.memory.get(*pair, pair in self.plain)
        if found is not None:
            self.recalled.add(pair)
        return found

    def _remember(self, pair: tuple, verdict: Verdict) -> None:
        if self.memory is not None:
            self.memory.put(*pair, verdict, pair in self.plain)

    def known(self, path_a: str, path_b: str) -> Verdict | None:
        """check()'s verdict when it is found already (checked, verified
        ahead, or remembered from an earlier run), else None: nothing is
        checked."""
        key = (path_a, path_b)
        found = self.verdicts.get(key) or self.ready.get(key)
        if found is None and (found := self._recalled(key)) is not None:
            self.ready[key] = found  # as prefetch() takes it: counted once
        return found

    def prefetch(self, pairs: list) -> None:
        """Verify these pairs now, spread over the workers; check() takes
        the verdicts.  Only pairs certain to be checked are given, so no
        work is wasted and the results are those of checking one by one."""
        pairs = list(dict.fromkeys(p for p in pairs if p not in self.ready
                                   and p not in self.verdicts))
        for pair in pairs:
            if (verdict := self._recalled(pair)) is not None:
                self.ready[pair] = verdict
        pairs = [p for p in pairs if p not in self.ready]
        if self.verifier is None or self.workers <= 1 or not pairs or \
                len(pairs) < 2 and self.pool is None:
            return  # one check: as fast here, when check() asks for it
        if self.pool is None:
            self.pool = VerifyPool(self.job, self.workers).__enter__()
        for found in self.pool.map([VerifyTask(a, b, (a, b) in self.plain)
                                    for a, b in pairs]):
            pair = (found.path_a, found.path_b)
            self.ready[pair] = found.verdict
            self._remember(pair, found.verdict)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.__exit__(None, None, None)
            self.pool = None
        if self.memory is not None:
            # counted when used: a rehearsal may look up more than it uses
            if used := sum(p in self.verdicts for p in self.recalled):
                self.say(f"{counted(used, 'check')} on the "
                         f"pixels remembered from an earlier run "
                         f"({self.memory.path}).")
            self.memory.save(self.say)
            self.memory = None
        if self.verifier is not None:
            _VERIFIERS.pop(self.job.run, None)  # the features, for the GC


@dataclass
class QueryResult:
    query: str
    hash: str | None
    matches: list = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict:
        return {"query": shown(self.query), "hash": self.hash,
                "error": self.error,
                "matches": [m.as_json() for m in self.matches]}

    def csv_rows(self) -> Iterator[list]:
        if not self.matches:
            yield [shown(self.query), self.hash, "", "", "", "", "", "",
                   self.error, "", "", ""]
        for m in self.matches:
            yield [shown(self.query), self.hash, shown(m.path), m.hash,
                   m.distance, m.width, m.height, m.size, ""] + m.how_cells()

    def text_lines(self) -> Iterator[str]:
        if self.error:
            yield f"{printable(self.query)}: cannot hash: {self.error}"
            return
        yield f"{printable(self.query)}  [{self.hash}]"
        if not self.matches:
            yield "  no match"
        for m in self.matches:
            yield (f"  d={m.distance:<4} {printable(m.path)}  {m.dims()}"
                   f"{m.how_suffix()}")


@dataclass
class SearchReport(DocumentReport):
    database: str
    engine: str
    images: int
    queries: list = field(default_factory=list)
    seconds: float = 0.0

    operation: ClassVar[str] = "search"
    pictures: ClassVar[bool] = True
    title: ClassVar[str] = "Search results"  # of the HTML page

    def failed(self) -> list:
        """The queries that could not be hashed, as Failures."""
        return [Failure(q.query, q.error) for q in self.queries if q.error]

    def body(self) -> dict:
        return {"database": shown(self.database), "engine": self.engine,
                "images": self.images, "seconds": round(self.seconds, 3),
                "queries": [q.as_json() for q in self.queries],
                "failures": _failures_json(self.failed())}

    def csv_rows(self) -> Iterator[list]:
        yield ["query", "query_hash", "match", "match_hash", "distance",
               "width", "height", "size", "error"] + HOW_COLUMNS
        for q in self.queries:
            yield from q.csv_rows()

    def text_lines(self, verbose: bool = False) -> Iterator[str]:
        for q in self.queries:
            yield from q.text_lines()

    def summary(self) -> str:
        hit, asked = sum(1 for q in self.queries if q.matches), len(self.queries)
        return (f"search: {asked} quer{'y' if asked == 1 else 'ies'}, "
                f"{hit} with matches, "
                f"{counted(self.images, 'image')} searched ({self.engine}) in "
                f"{self.seconds:.2f} s")

    # ---- the HTML page: a set of cards per query ----

    def page_paths(self) -> Iterator[str]:
        """The shown paths of the first HTML page, in page order."""
        for q in self.queries[:HTML_PAGE_SIZE]:
            yield shown(q.query)
            yield from (shown(m.path) for m in q.matches)

    def query_paths(self) -> list:
        """Shown paths of the pictures whose cards show the file's facts."""
        return [shown(q.query) for q in self.queries]

    def html_sets(self, thumbs: dict, folders: dict) -> list:
        return [{"error": q.error,
                 "items": [_html_query(shown(q.query), thumbs[shown(q.query)],
                                       folders)]
                 + [_html_item(m, thumbs.get(shown(m.path)), folders)
                    for m in q.matches]}
                for q in self.queries]

    def html_facts(self) -> list:
        hits = sum(1 for q in self.queries if q.matches)
        return [(len(self.queries), "queries"), (hits, "with matches"),
                (self.images, "images searched")]


def _match(row: ImageRow, bits: int, distance: int, variant: int = -1,
           how: How | None = None) -> Match:
    return Match(row.path, hash_hex(row.hash, bits), int(distance), row.width,
                 row.height, row.size, row.mtime_ns,
                 variant=MATCH_NAMES[variant] if variant >= 0 else None,
                 how=how or How(stage_of(variant), MATCH_NAMES[variant]
                                if variant >= 0 else None))


def query_files(run: Run) -> list:
    cfg = run.config
    sources = [os.path.abspath(q) for q in run.queries] or [cfg.input_dir]
    files, dirs = [], []
    for source in sources:
        if os.path.isdir(source):
            dirs.append(source)
        elif os.path.exists(source):
            files.append(source)
        else:
            raise ConfigError(f"search: query {source} does not exist.")
    files += [f.path for f in _walk(cfg, dirs)]
    return sorted(set(files))


def op_search(run: Run, ui: Console) -> SearchReport:
    """For each query image, the stored images within the threshold."""
    cfg, start = run.config, time.monotonic()
    if not run.queries:
        check_folders(cfg, ["input_dir"])
    paths = query_files(run)
    store, judge = ready_store(cfg, ui), None
    try:
        judge = Judge(cfg, ui)
        judge.remember(cfg, cache_key(store))
        reach = cfg.distance_threshold + judge.extra_bits  # the judge decides
        results = hash_queries(cfg, paths)
        store.snapshot()  # the index and the rows it names: one state
        searcher = pick_searcher(cfg, store, ui, reach, judge)
        report = SearchReport(cfg.db_name, searcher.name, searcher.images)
        found = [(r, searcher.hits(r)) for r in results]
        marks = load_marks(cfg)
        rows = store.rows_by_id(i for _, hits in found for i in hits)
        store.end_snapshot()  # verification may take a while: let writers in
        found = [(r, list(_candidates(cfg, r, hits, rows, marks)))
                 for r, hits in found]
        judge.prefetch([pair for r, candidates in found
                        for pair in judge.planned(r.path, candidates)])
        report.queries = [query_result(cfg, judge, r, candidates)
                          for r, candidates in found]
        expand(cfg, judge, searcher, store, found, report.queries, marks)
    finally:
        store.close()
        if judge is not None:
            judge.close()
    report.seconds = time.monotonic() - start
    return report


def hash_queries(cfg: Config, paths: list) -> list:
    """The query images hashed as the stored ones were, in path order."""
    with Hasher(_job(cfg), min(cfg.worker_count, len(paths))) as hasher:
        return sorted(hasher.map([HashTask(p) for p in paths]),
                      key=lambda r: r.path)


def pick_searcher(cfg: Config, store: HashStore, ui: Console, reach: int,
                  judge: Judge):
    """Where the candidates come from, chosen once for the whole run.

    PostgreSQL searches its own chunk columns, which hold main hashes only:
    with region hashes (centres, content boxes, windows) the local index
    answers, as it does for find_duplicates."""
    if cfg.database_url and cfg.engine in ("auto", "mih") and \
            not cfg.spec.regions:
        return PgSearcher(store, reach, cfg.spec)
    # turned windows only where each one is verified
    return IndexSearcher(cfg, store, ui, reach, judge.verifier is not None)


class IndexSearcher:
    """Candidates from the local index (bk_dir): engine name, images
    searched, and hits(result) -> {image id: Hit}.

    One-word hashes (hash_size 8 or less) are looked up in the search
    tables (search.idx, SearchTables) when they fit the database: a search
    then reads a few MB of the index, not all of it (1,000,000 images:
    hashes.idx is 1.4 GB).  Else, and when a table's block turns out
    damaged (the hits are then found again), the whole index is read and
    the tables written for the next search (SEARCH_TABLES_FROM images or
    more).  Both give the same hits, in the same order."""

    def __init__(self, cfg: Config, store: HashStore, ui: Console,
                 reach: int, turned: bool):
        self.cfg, self.store, self.ui, self.turned = cfg, store, ui, turned
        self.reach, self.adaptive = reach, cfg.adaptive_threshold
        self.tables_path = os.path.join(cfg.bk_dir, SEARCH_NAME) \
            if cfg.spec.words == 1 and cfg.engine in ("auto", "scan", "mih") \
            else ""
        try:
            self._from_tables(SearchTables(self.tables_path, cache_key(store),
                                           cfg.spec, store.fingerprint()))
        except (OSError, ValueError):  # none (or not for these hashes),
            self._from_index()  # stale, damaged: read the whole index

    def _from_tables(self, tables: SearchTables) -> None:
        self.flat = TableIndex(tables)
        self.engine = TableEngine(tables, "whole")
        self.regions = self.flat.regions(self.reach, self.turned)
        self.images = tables.images
        # the engine the whole index would use (what the report names)
        self.name = self.cfg.engine if self.cfg.engine != "auto" else \
            choose_engine(tables.distinct, tables.bits, 1, self.reach, False)

    def _from_index(self) -> None:
        cfg = self.cfg
        self.flat = load_index(cfg, self.store, self.ui)
        bktree = os.path.join(cfg.bk_dir, BKTREE_NAME)
        self.engine = self.flat.engine(cfg.engine, self.reach, False, bktree)
        self.regions = self.flat.region_engines(cfg.engine, self.reach, False,
                                                bktree)
        self.regions.turned = self.turned
        self.name, self.images = self.engine.name, len(self.flat.ids)
        if self.tables_path and self.images >= SEARCH_TABLES_FROM:
            self.ui.notice(f"writing the search tables {self.tables_path} "
                           f"(once after each change of the database).")
            try:  # a stale one first: 6 GB at 1,000,000 images
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tables_path)
                save_tables(self.tables_path, self.flat)
            except MemoryError:  # sorting 161 windows an image: 6.7 GB at 1M
                self.ui.notice(f"not enough memory to write the search "
                               f"tables {self.tables_path}: each search "
                               f"reads the whole index.")
            except OSError as exc:
                self.ui.notice(f"cannot save the search tables "
                               f"{self.tables_path} ({exc.strerror or exc}; "
                               f"check bk_dir): the next search reads the "
                               f"whole index again.")

    def _answer(self, row, radius: int, turned: bool) -> dict:
        """{image id: Hit} of a query (or stored row) within radius."""
        regions = dataclasses.replace(self.regions, radius=radius,
                                      turned=turned)
        try:
            _, best = _search_one(row, self.flat, self.engine, radius,
                                  regions, self.adaptive)
            return {int(self.flat.ids[p]): hit for p, hit in best.items()}
        except CacheDamaged as exc:  # a block of the tables: start again
            self.ui.notice(f"search tables {self.tables_path} are damaged "
                           f"({exc}): reading the whole index.")
            self._from_index()
            return self._answer(row, radius, turned)

    def hits(self, result: HashResult) -> dict:
        return self._answer(result, self.reach, self.turned)

    def near(self, row: ImageRow, radius: int) -> dict:
        """hits() of a stored picture within radius, without turned windows
        (expand(): 90 % of a search's time at 100,000 images, and the
        query's own search has crossed its turns already)."""
        return self._answer(row, radius, False)


class PgSearcher:
    """Candidates found inside PostgreSQL (its multi-index chunk columns)."""

    name = "postgres"

    def __init__(self, store: ServerHashStore, reach: int, spec: HashSpec):
        self.store, self.reach, self.spec = store, reach, spec
        self.images = store.count_comparable()

    def near(self, row: ImageRow, radius: int) -> dict:
        """hits() of a stored picture (expand() keeps those within radius)."""
        return self.hits(row)

    def hits(self, result: HashResult) -> dict:
        """{image id: Hit}: _search_one inside PostgreSQL."""
        if _unsearchable(result):
            return {}
        size = 8 * self.spec.words
        extra = result.extra or b""
        queries = [result.hash] + [int.from_bytes(extra[k:k + size], "big")
                                   for k in range(0, len(extra), size)]
        best = {}
        for code, query in enumerate(queries, -1):
            weight = code_weight(code)
            for near in self.store.search_hashes(query, self.reach // weight):
                _keep_best(best, near.id, near.bits, weight, code)
        return best


def query_result(cfg: Config, judge: Judge, result: HashResult,
                 candidates: list) -> QueryResult:
    """One query's matches: the candidates the judge accepts, nearest
    first (only the nearest with stop_on_first_match)."""
    query = QueryResult(result.path, None if result.hash is None else
                        hash_hex(result.hash, cfg.spec.bits),
                        error=result.error)
    judge.next_query()
    for c in candidates:
        how = judge(result.path, c.row.path, c.hit, c.limit, c.detail,
                    c.framed)
        if how is not None:
            query.matches.append(_match(c.row, cfg.spec.bits, c.hit.bits,
                                        c.hit.code, how))
    query.matches.sort(key=lambda m: (m.distance, m.path))
    if cfg.stop_on_first_match:
        query.matches = query.matches[:1]
    return query


# Query expansion (verified mode; a standard technique of retrieval): the
# copies a query found are searched in turn with their own stored hashes,
# for copies of the picture that the query's hashes miss (a 40 % crop lies
# near a 20 % crop's windows, a screenshot's content box near a post's), and
# the copies found so are searched too.  What they find is verified with the
# query (stage "keypoints").  Tough corpus, each original as a query: 93.7
# -> 95.3 % of its copies found, none wrongly; the expansion's CPU is 7 % of
# the search's checks (10 % on the standard corpus, 99.7 -> 99.9 %).
# Copies searched per query, least like the query first (one near it by
# the whole hash finds what the query found):
EXPAND_COPIES = 8
# Candidates refused per query before the rest are dropped, best first:
EXPAND_CHECKS = 4
# Copies that must find an image past their threshold for it to be checked
# (within the threshold, one is enough).  Tough corpus, past the threshold:
# found by one copy 11 copies among 3,314 images, by three or more 4 among
# 65; 2 instead of 3 finds 3 more at 2-3x the expansion's CPU.
EXPAND_VOTES = 3


def expand(cfg: Config, judge: Judge, searcher, store: HashStore,
           found: list, queries: list, marks: set) -> None:
    """More matches for each query through its copies (query expansion),
    added to queries in place; verified mode only."""
    if judge.verifier is None or cfg.stop_on_first_match:
        return
    for (result, candidates), query in zip(found, queries):
        if not result.error and query.matches:
            Expansion(cfg, judge, searcher, store, result, query,
                      marks).run(candidates)


class Expansion:
    """One query's expansion: rounds of copies searched, their finds
    verified, at most EXPAND_COPIES searched and EXPAND_CHECKS refused."""

    def __init__(self, cfg: Config, judge: Judge, searcher, store: HashStore,
                 result: HashResult, query: QueryResult, marks: set):
        self.cfg, self.judge, self.searcher = cfg, judge, searcher
        self.store, self.result, self.query, self.marks = \
            store, result, query, marks
        self.left = EXPAND_CHECKS
        self.tried = {m.path for m in query.matches} | {result.path}
        self.hashes = {(result.hash, result.extra)}  # searched already

    def run(self, candidates: list) -> None:
        copies = [c.row for c in candidates if c.row.path in self.tried]
        searched = 0
        while copies and searched < EXPAND_COPIES and self.left > 0:
            copies = self.fresh(copies)[:EXPAND_COPIES - searched]
            searched += len(copies)
            copies = self.verify(self.finds(copies))
        self.query.matches.sort(key=lambda m: (m.distance, m.path))

    def fresh(self, rows: list) -> list:
        """Rows whose hashes were not searched yet, least like the
        query's whole hash first."""
        out = []
        for row in sorted(rows, key=lambda r: (
                -(r.hash ^ self.result.hash).bit_count(), r.path)):
            if not row.low_detail and (row.hash, row.extra) not in self.hashes:
                self.hashes.add((row.hash, row.extra))
                out.append(row)
        return out

    def finds(self, copies: list) -> list:
        """(tier, excess past the threshold, row) of the images the copies
        find, not tried yet, best first: tier 0 within the (adaptive)
        threshold of a copy, tier 1 up to VERIFY_EXTRA_BITS past it and
        found by EXPAND_VOTES copies or more."""
        best: dict = {}  # image id -> [excess, copies that found it]
        radius, rows = self.cfg.distance_threshold, {}
        for copy in copies:
            near = self.searcher.near(copy, radius + VERIFY_EXTRA_BITS)
            rows.update(self.store.rows_by_id(i for i in near if i not in rows))
            for image, hit in near.items():
                row = rows.get(image)
                if row is None:  # removed by an update since the search
                    continue
                limit = pair_threshold(radius, copy.detail, row.detail) \
                    if self.cfg.adaptive_threshold else radius
                if hit.effective > limit + VERIFY_EXTRA_BITS:
                    continue
                seen = best.setdefault(image, [np.inf, 0])
                seen[0], seen[1] = min(seen[0], hit.effective - limit), \
                    seen[1] + 1
        out = []
        for image, (excess, votes) in best.items():
            row = rows[image]
            if row.path in self.tried or self.marks and \
                    frozenset((self.result.path, row.path)) in self.marks:
                continue
            if excess <= 0 or votes >= EXPAND_VOTES:
                out.append((int(excess > 0), float(excess), row))
        out.sort(key=lambda f: (f[0], f[1], f[2].path))
        return out

    def verify(self, finds: list) -> list:
        """Check each find with the query (until EXPAND_CHECKS are
        refused); the rows accepted, now matches of the query."""
        path, accepted = self.result.path, []
        self.judge.prefetch([(path, row.path) for _, _, row in
                             finds[:self.left]
                             if (path, row.path) not in self.judge.verdicts])
        for _, _, row in finds:
            if self.left <= 0:
                break
            self.tried.add(row.path)
            if (path, row.path) in self.judge.verdicts:
                continue  # refused by the query's own search: no news
            verdict = self.judge.check(path, row.path)
            if not verdict.accepted:
                self.left -= 1
                continue
            bits = (row.hash ^ self.result.hash).bit_count()
            self.query.matches.append(_match(
                row, self.cfg.spec.bits, bits, -1,
                How(STAGES[5], None, True, verdict.geometry)))
            accepted.append(row)
        return accepted


def _candidates(cfg: Config, result: HashResult, hits: dict, rows: dict,
                marks: set) -> Iterator[Candidate]:
    """The Candidates of a query's hits, nearest first, that the judge
    decides on: not removed by an update since the search, not marked "not
    a duplicate"."""
    radius, boxed = cfg.distance_threshold, framed(result.extra, cfg.spec)
    for image, hit in sorted(hits.items(), key=lambda kv: kv[1].effective):
        row = rows.get(image)
        if row is None:  # removed by an update since the search
            continue
        limit = pair_threshold(radius, result.detail, row.detail) \
            if cfg.adaptive_threshold else radius
        if marks and frozenset((result.path, row.path)) in marks:
            continue
        yield Candidate(row, hit, limit, min(result.detail, row.detail),
                        boxed or framed(row.extra, cfg.spec))


def _search_each(engine, queries: np.ndarray, radii: list) -> list:
    """[engine.search(query, radius)] of each query, in one call where the
    engine takes many (TableEngine.search_many)."""
    if hasattr(engine, "search_many") and len(queries):
        return engine.search_many(queries, radii)
    return [engine.search(q, r) for q, r in zip(queries, radii)]


def _search_one(result: HashResult, flat: FlatIndex, engine, radius: int,
                regions: Regions | None = None, adaptive: bool = False
                ) -> tuple:
    """(result, {image position: Hit}), the nearest hit of each image; a
    region hit (centre, content box, window) only where nothing else
    matches (match_distances)."""
    if _unsearchable(result):
        return result, {}
    words, v = flat.distinct.shape[1], flat.variants.shape[1]
    extra = np.frombuffer(result.extra or b"", ">u8").astype(
        np.uint64).reshape(-1, words)  # stored layout: see split_extra
    whole = int_to_words(result.hash, words)
    best, region = {}, {}
    codes = list(range(-1, v))  # the whole hash, then each orientation
    for variant, (pos, dist) in zip(codes, _search_each(
            engine, np.concatenate([whole[None, :], extra[:v]]),
            [code_radius(radius, code) for code in codes])):
        weight = code_weight(variant)
        for images, d in zip(flat.images_of(pos), dist.tolist()):
            for p in images.tolist():
                _keep_best(best, p, d, weight, variant)
    regions = _as_regions(regions, radius)
    if regions is not None:
        _search_regions(region, extra, whole, flat, engine, regions,
                        result.detail)
    for p, hit in region.items():
        limit = pair_threshold(radius, result.detail, flat.detail[p]) \
            if adaptive else radius
        if p not in best or best[p].effective > limit:
            best[p] = hit
    return result, best


def _search_regions(found: dict, extra: np.ndarray, whole: np.ndarray,
                    flat: FlatIndex, engine, regions: Regions,
                    detail: float = 4.0) -> None:
    """Region hits of one query into `found`: its centres against the same
    centres; its whole against the stored content boxes and windows; its
    own content box and windows against the stored wholes (and boxes).
    A window match counts by window_weight (none below DETAIL_FULL)."""
    radius = regions.radius
    weights = window_weight(detail, flat.detail)  # inf: no window match
    v, c = flat.variants.shape[1], flat.centres.shape[1]
    for k, (view, view_engine) in enumerate(regions.centres):
        pos, dist = view_engine.search(extra[v + k], radius)
        for images, d in zip(view.images_of(pos), dist.tolist()):
            for p in images.tolist():
                _keep_best(found, p, d, 1, CENTRE_CODE + k, CENTRE_CODE + k,
                           CENTRE_CODE + k)
    mine = []  # (hash of a region of the query, its code, radius)
    if flat.content.shape[1]:
        box, at = int(extra[v + c + 1][-1]), v + c
        if box != FULL_BOX_WORD:
            mine.append((extra[at], CONTENT_CODE))
    w0 = v + c + 2 * bool(flat.content.shape[1])
    mine += [(extra[w0 + k], WINDOW_CODE + k)
             for k in range(flat.windows.shape[1])]
    for (query, code), (pos, dist) in zip(mine, _search_each(
            engine, np.array([q for q, _ in mine]),
            [code_radius(radius, code) for _, code in mine])):
        # the query's region against stored wholes
        for images, d in zip(flat.images_of(pos), dist.tolist()):
            for p in images.tolist():
                weight = weights[p] if code >= WINDOW_CODE else 1
                if weight < np.inf and d * weight <= radius:
                    _keep_best(found, p, d, weight, code, code)
    turned = regions.turned and regions.scan_windows and flat.windows.shape[1]
    if regions.scan_windows and flat.windows.shape[1]:
        near = (regions.tables.window_hits if regions.tables is not None else
                functools.partial(window_hits, flat.windows))(np.concatenate(
                    [whole[None, :], extra[:v] if turned else extra[:0]]),
                    code_radius(radius, WINDOW_CODE))
        for p, k, d in near[0]:
            if weights[p] < np.inf and d * weights[p] <= radius:
                _keep_best(found, p, d, weights[p], WINDOW_CODE + k, -1,
                           WINDOW_CODE + k)
    if turned:
        _search_turned(found, extra[:v], np.array([q for q, c in mine if
                                                   c >= WINDOW_CODE]),
                       flat, radius, weights, near[1:], regions.tables)
    for view in (regions.content, regions.windows):
        if view is None:
            continue
        queries = [(whole, -1)] + [(q, code) for q, code in mine
                                   if code == CONTENT_CODE
                                   and view is regions.content]
        for query, own in queries:  # stored regions against the query
            code0 = int(view.code[0])
            pos, dist = view.engine.search(query, code_radius(radius, code0))
            owners, rows = view.rows_of(pos)
            for j, row in zip(owners.tolist(), rows.tolist()):
                code, p = int(view.code[row]), int(view.owner[row])
                weight = weights[p] if code >= WINDOW_CODE else 1
                if weight < np.inf and dist[j] * weight <= radius:
                    _keep_best(found, p, int(dist[j]), weight, code, own,
                               code)


def _search_turned(found: dict, variants: np.ndarray, windows: np.ndarray,
                   flat: FlatIndex, radius: int, weights: np.ndarray,
                   near: list | None = None, tables=None) -> None:
    """Turned windows of one query (TURNED_CODE): its orientations against
    the stored windows (the query is a turned crop; `near`: their
    window_hits when the caller has them), and the stored orientations
    against its windows (a stored turned crop of the query); from the
    search tables when given (SearchTables)."""
    r = code_radius(radius, WINDOW_CODE)
    if near is None:
        near = window_hits(flat.windows, variants, r)
    for k, hits in enumerate(near):
        for p, w, d in hits:
            if weights[p] < np.inf and d * weights[p] <= radius:
                _keep_best(found, p, d, weights[p], int(turned_code(k, w)), k,
                           WINDOW_CODE + w)
    if not len(windows) or not flat.variants.shape[1]:
        return
    for p, k, w, dist in (_turned_scan(flat, windows, r) if tables is None
                          else tables.turned_hits(windows, r)):
        if weights[p] < np.inf and dist * weights[p] <= radius:
            _keep_best(found, p, dist, weights[p], int(turned_code(k, w)),
                       WINDOW_CODE + w, k)


def _turned_scan(flat: FlatIndex, windows: np.ndarray, r: int) -> Iterator:
    """(image, orientation, query window, bits) of every stored
    orientation within r of one of the query's windows, by image,
    orientation, then window."""
    one_word = windows.shape[1] == 1  # no sum over a word axis, blocks in
    # cache: 1,000,000 images' orientations against 161 windows 2.0 -> 1.4 s
    block = max(1, (1 << (18 if one_word else 15)) // len(windows) //
                (flat.variants.shape[1] if one_word else 1))  # bounded memory
    for start in range(0, len(flat.variants), block):
        if one_word:
            d = np.bitwise_count(flat.variants[start:start + block, :, :1]
                                 ^ windows[None, None, :, 0])
        else:
            d = np.bitwise_count(flat.variants[start:start + block, :, None, :]
                                 ^ windows[None, None]).sum(axis=3,
                                                            dtype=np.uint16)
        near = d <= r
        if not near.any():  # most blocks: nonzero() cost 1.3 s at 100,000
            continue
        for p, k, w in zip(*np.nonzero(near)):
            yield start + int(p), int(k), int(w), int(d[p, k, w])


def window_hits(windows: np.ndarray, queries: np.ndarray, radius: int,
                block: int = 1 << 9) -> list:
    """For each query, _scan_windows' list: [(image, window, bits)] of every
    stored window within radius.  One-word hashes: one pass over the
    windows for all queries, a block of 512 images (660 KB) at a time
    while it is in the CPU's cache (8 queries over 100,000 images' 161
    windows: 0.23-0.26 -> 0.17 s)."""
    if windows.shape[2] != 1 or len(queries) < 2:
        return [list(_scan_windows(windows, q, radius)) for q in queries]
    hits = [[] for _ in queries]
    ws = windows[:, :, 0]
    xor = np.empty((min(block, len(ws)), ws.shape[1]), np.uint64)
    d = np.empty(xor.shape, np.uint8)
    for start in range(0, len(ws), block):
        part = ws[start:start + block]
        x, dd = xor[:len(part)], d[:len(part)]
        for k, q in enumerate(queries[:, 0]):
            np.bitwise_count(np.bitwise_xor(part, q, out=x), out=dd)
            near = dd <= radius
            if near.any():  # most blocks: no nonzero()
                hits[k] += [(start + p, w, int(dd[p, w])) for p, w in
                            zip(*(a.tolist() for a in np.nonzero(near)))]
    return hits


def _scan_windows(windows: np.ndarray, query: np.ndarray, radius: int,
                  block: int = 1 << 12):
    """(image, window, bits) for every stored window within radius of the
    query, by popcount over blocks of images (bounded memory)."""
    one_word = windows.shape[2] == 1  # (N, K) words, no sum over a word
    # axis, blocks of 4,096 images in cache: a scan of 1,000,000 images'
    # 161 windows 0.42 -> 0.14 s
    for start in range(0, len(windows), block):
        if one_word:
            d = np.bitwise_count(windows[start:start + block, :, 0] ^ query[0])
        else:
            d = np.bitwise_count(windows[start:start + block] ^ query).sum(
                axis=2, dtype=np.uint16)
        near = d <= radius
        if not near.any():  # most blocks: skip nonzero(), 3 ms each
            continue
        for p, k in zip(*np.nonzero(near)):
            yield start + int(p), int(k), int(d[p, k])


@dataclass
class Hit:
    """A stored image near a query: effective distance (an orientation match
    counts double, a window match 1.5 times), Hamming distance in bits, and
    the match code (MATCH_NAMES; -1: whole to whole, as stored).  A region
    belongs to one side: query_code is the query's region that matched,
    found_code the stored image's (-1: its whole picture)."""

    effective: float
    bits: int
    code: int
    query_code: int = -1
    found_code: int = -1


def _keep_best(best: dict, key: int, d: int, weight: float, code: int,
               query_code: int = -1, found_code: int = -1) -> None:
    if key not in best or d * weight < best[key].effective:
        best[key] = Hit(d * weight, d, code, query_code, found_code)


def _unsearchable(result: HashResult) -> bool:
    if result.hash is not None and result.low_detail:
        result.error = "too little detail to compare (nearly blank or tiny)"
    return result.hash is None or result.low_detail


# ============================================================================
# Keep rule
# ============================================================================
#
# Which file of a group a person would keep: criteria in keep_rule order, each
# with the reason it gives (shown under KEEP in every report).

# Files written within 2 s of each other count as the same age: copies made in
# one go (an unzip, a sync, a script) and FAT's 2-second mtime steps say
# nothing about which came first.
SAME_AGE_NS = 2 * 10**9


@dataclass
class KeepContext:
    """What the keep rule compares a group's files against."""

    oldest: int
    newest: int
    lossy_pixels: frozenset  # pixel counts of the group's lossy-format files
    colour: bool             # some file of the group is in colour
    roots: list
    spread: dict = field(default_factory=dict)  # path -> mean bits to others
    centre: float = 0.0      # the smallest spread

    @classmethod
    def of(cls, rows: Sequence[ImageRow], roots: list) -> KeepContext:
        traits = [Traits.parse(r.traits) for r in rows]
        spread = _spread(rows)
        return cls(min(r.mtime_ns for r in rows), max(r.mtime_ns for r in rows),
                   frozenset(_pixels(r) for r, t in zip(rows, traits)
                             if t and t.format in LOSSY_FORMATS),
                   any(t and not t.grey for t in traits), roots, spread,
                   min(spread.values(), default=0.0))

    def off_centre(self, row: ImageRow) -> bool:
        """Edits move a picture's hash each its own way: the original sits
        in the middle of its copies, the edited ones further out."""
        return self.spread.get(row.path, 0.0) > self.centre + CENTRE_SLACK

    def reencoded(self, row: ImageRow, t: Traits | None) -> bool:
        """A lossless file (PNG, TIFF...) with the pixels of a JPEG (or other
        lossy file) of its group: a conversion.  Photos are born lossy, and a
        lossless copy of a lossy file only grows."""
        return bool(t) and t.format in LOSSLESS_FORMATS and \
            _pixels(row) in self.lossy_pixels

    def edits(self, t: Traits | None, variant: str | None) -> list:
        """Signs that a file is an edited copy: greyscale in a group with
        colour, matched only mirrored, turned or by its centre."""
        return ["greyscale"] * bool(t and t.grey and self.colour) + \
            [variant] * bool(variant)


# Hash bits (mean distance to the group) within which files count as equally
# central: a re-encode moves the hash by a bit or two at random.
CENTRE_SLACK = 0.5
SPREAD_SAMPLE = 64  # distances to at most this many members: O(64 n)


def _spread(rows: Sequence[ImageRow]) -> dict:
    """path -> mean Hamming distance of its hash to (a sample of) the others."""
    sample = [r.hash for r in rows[:SPREAD_SAMPLE] if r.hash is not None]
    if len(sample) < 3:  # a pair has no middle
        return {}
    return {r.path: sum((r.hash ^ h).bit_count() for h in sample) /
            (len(sample) - 1) for r in rows if r.hash is not None}


def _pixels(row: ImageRow) -> int:
    return (row.width or 0) * (row.height or 0)


def keep_key(row: ImageRow, cfg: Config, ctx: KeepContext,
             variant: str | None = None) -> tuple:
    """Sort key of the keep rule: the smallest key is the file to keep."""
    t = Traits.parse(row.traits)
    parts = {
        "most_pixels": lambda: -_pixels(row),
        "oldest": lambda: 0 if row.mtime_ns - ctx.oldest <= SAME_AGE_NS
        else row.mtime_ns,
        "newest": lambda: 0 if ctx.newest - row.mtime_ns <= SAME_AGE_NS
        else -row.mtime_ns,
        "camera_exif": lambda: 0 if t and t.camera else 1,
        "original_format": lambda: int(ctx.reencoded(row, t)),
        "unedited": lambda: (len(ctx.edits(t, variant)), ctx.off_centre(row)),
        "largest_file": lambda: -row.size,
        "folder_order": lambda: _root_index(row.path, ctx.roots),
        "shortest_path": lambda: len(row.path),
    }
    return (*(parts[c]() for c in cfg.keep_rule), row.path)


def choose_keep(rows: list, variants: list, cfg: Config) -> tuple[int, str]:
    """(position of the file to keep, why: the criterion that decided)."""
    ctx = KeepContext.of(rows, cfg.img_dirs)
    keys = [keep_key(r, cfg, ctx, v) for r, v in zip(rows, variants)]
    order = sorted(range(len(rows)), key=keys.__getitem__)
    kept, runner = order[0], order[1]
    step = next((k for k, (a, b) in enumerate(zip(keys[kept], keys[runner]))
                 if a != b), len(cfg.keep_rule))
    if step >= len(cfg.keep_rule):
        return kept, "kept: alike by every criterion of keep_rule; first by path"
    return kept, "kept: " + keep_reason(cfg.keep_rule[step], rows[kept],
                                        rows[runner], variants[runner], ctx)


def keep_reason(criterion: str, kept: ImageRow, other: ImageRow,
                other_variant: str | None, ctx: KeepContext) -> str:
    """Why `kept` beat the best of the others (`other`), in a few words."""
    if criterion == "most_pixels":
        ratio = _pixels(kept) / max(1, _pixels(other))
        return f"{ratio:.0f}x the pixels" if ratio >= 10 else \
            f"{ratio:.2g}x the pixels"
    if criterion in ("oldest", "newest"):
        gap = abs(kept.mtime_ns - other.mtime_ns) / 1e9
        when = f"{gap / 86400:.0f} days" if gap >= 2 * 86400 else \
            f"{gap / 3600:.0f} hours" if gap >= 7200 else f"{gap:.0f} s"
        return f"{criterion} (by {when})"
    if criterion == "camera_exif":
        return "camera EXIF (the others have none: edited or converted copies)"
    if criterion == "original_format":
        mine = Traits.parse(kept.traits)
        theirs = Traits.parse(other.traits)
        return (f"original format ({mine.format if mine else '?'}, the "
                f"{theirs.format if theirs else '?'} copies are re-encodes)")
    if criterion == "unedited":
        edits = ctx.edits(Traits.parse(other.traits), other_variant) or \
            ["further from the group's middle: an edit"]
        return f"no edits detected (the next is {', '.join(edits)})"
    if criterion == "largest_file":
        return (f"largest file ({kept.size / 1024:,.1f} KB, the next "
                f"{other.size / 1024:,.1f} KB)")
    if criterion == "folder_order":
        return "earlier folder in img_dirs"
    return "shortest path"


def _root_index(path: str, roots: list) -> int:
    for k, root in enumerate(roots):
        if _inside(path, root):
            return k
    return len(roots)


# ============================================================================
# Plan
# ============================================================================
#
# find_duplicates writes what move would do as plan.json and plan.csv (a dry
# run); move reads the plan back, whichever of the two the user edited last,
# and checks the whole of it before anything moves.

PLAN_NAME = "plan"
PLAN_ACTIONS = ("keep", "move", "protected")
MANIFEST_NAME = "manifest.jsonl"


@dataclass
class PlanEntry:
    """One file of a duplicate group and what move would do with it."""

    group: int
    action: str  # keep, move or protected
    path: str
    reason: str
    size: int
    mtime_ns: int
    hash: str
    distance: int


def plan_actions(report: DuplicatesReport, cfg: Config) -> None:
    """What move would do with each file: keep, move or protected."""
    for g in report.groups:
        for m in g.images:
            m.action = "keep" if m.keep else "protected" if any(
                _inside(m.path, d) for d in cfg.protected_dirs) else "move"


def make_plan(report: DuplicatesReport, cfg: Config) -> list:
    entries = []
    for n, g in enumerate(report.groups, 1):
        kept = next(m for m in g.images if m.keep)
        for m in g.images:
            action = m.action
            if action == "keep":
                reason = g.keep_reason
            elif action == "protected":
                reason = "in a protected folder"
            else:
                reason = f"duplicate of {shown(kept.path)} (distance {m.distance})"
            entries.append(PlanEntry(n, action, m.path, reason, m.size,
                                     m.mtime_ns, m.hash, m.distance))
    return entries


def write_plan(entries: list, cfg: Config) -> list:
    """plan.json (what move reads) and plan.csv (for spreadsheets): one truth.
    Both carry the same actions; plan.json records their digest, so move can
    tell which of the two the user edited."""
    base = os.path.join(cfg.output_dir, PLAN_NAME)
    # vars(), not dataclasses.asdict(): that deep-copies every field, 9 s
    # of CPU for a million-image plan
    rows = [dict(vars(e), path=shown(e.path)) for e in entries]
    doc = {"operation": "plan", "tool_version": __version__,
           "created": _iso(time.time_ns()), "database": shown(cfg.db_name),
           "quarantine_dir": shown(cfg.quarantine_dir),
           "actions_sha256": actions_digest({r["path"]: r["action"]
                                             for r in rows}),
           "entries": rows}
    fields = [f.name for f in dataclasses.fields(PlanEntry)]
    with _output_errors(cfg.output_dir):
        _atomic_write(base + ".json", lambda fh: fh.write(json_text(doc)))
        _atomic_write(base + ".csv", lambda fh: csv.writer(fh).writerows(
            [fields] + [[r[k] for k in fields] for r in rows]))
    return [base + ".json", base + ".csv"]


def actions_digest(actions: dict) -> str:
    """What the user decides in a plan: each path's action, in no order."""
    text = "\n".join(f"{p}\0{a}" for p, a in sorted(actions.items()))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# ---- reading a plan: the whole of it is checked before anything moves ----

@dataclass
class Plan:
    entries: list            # PlanEntry, actions as the user left them
    source: str              # the file whose actions count
    failures: list = field(default_factory=list)  # bad entries: Failure


_PLAN_TYPES = {"group": int, "action": str, "path": str, "size": int,
               "mtime_ns": int}
_PLAN_TYPE_NAMES = {int: "a whole number", str: "text"}


def read_plan(cfg: Config) -> Plan:
    """plan.json's entries with the actions of whichever of plan.json and
    plan.csv the user edited (PlanError if both were, and they disagree)."""
    base = os.path.join(cfg.output_dir, PLAN_NAME)
    doc = _read_json(base + ".json", "no plan yet: run find_duplicates first, "
                     "check plan.csv, then run move.")
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise PlanError(f"{base}.json is not a plan written by find_duplicates "
                        f"(no list of entries); run find_duplicates again.")
    plan = Plan([], base + ".json")
    for n, raw in enumerate(doc["entries"], 1):
        entry = _plan_entry(raw, n, plan)
        if entry is not None:
            plan.entries.append(entry)
    actions = {e.path: e.action for e in plan.entries}
    edited = _plan_csv(base + ".csv", actions, plan)
    if edited is not None and edited != actions:
        use_csv = _pick_plan(base, doc.get("actions_sha256"), actions, edited)
        if use_csv:
            plan.source = base + ".csv"
            for e in plan.entries:
                e.action = edited.get(e.path, "keep")  # a deleted row stays
    return plan


def _plan_entry(raw, n: int, plan: Plan) -> PlanEntry | None:
    where = f"{plan.source} entry {n}"
    if not isinstance(raw, dict):
        plan.failures.append(Failure(where, "not an object; skipped"))
        return None
    for key, kind in _PLAN_TYPES.items():
        value = raw.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            name = raw.get("path") if isinstance(raw.get("path"), str) else where
            plan.failures.append(Failure(name, f"{where}: '{key}' is missing or "
                                         f"not {_PLAN_TYPE_NAMES[kind]}; "
                                         f"skipped"))
            return None
    if raw["action"] not in PLAN_ACTIONS:
        plan.failures.append(Failure(raw["path"], f"{where}: action "
                                     f"'{raw['action']}' is not one of "
                                     f"{', '.join(PLAN_ACTIONS)}; skipped"))
        return None
    return PlanEntry(raw["group"], raw["action"], raw["path"],
                     str(raw.get("reason", "")), raw["size"], raw["mtime_ns"],
                     str(raw.get("hash", "")), raw.get("distance", 0))


def _plan_csv(path: str, actions: dict, plan: Plan) -> dict | None:
    """{path: action} of plan.csv (None if there is none).  Only the action
    column is read: sizes and times come from plan.json, which spreadsheets
    cannot round (mtime_ns has 19 digits)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
        head = text.split("\n", 1)[0]
        # spreadsheets set to a comma as decimal mark save with ';'
        sep = max(",;\t", key=head.count)
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=sep))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise PlanError(f"{path} is not UTF-8 text: save it as 'CSV UTF-8', or "
                        f"delete it to use plan.json alone.") from None
    except (OSError, csv.Error) as exc:
        raise PlanError(f"cannot read {path}: {exc}. Fix it, or delete it to "
                        f"use plan.json alone.") from None
    if rows and not {"path", "action"} <= set(rows[0]):
        raise PlanError(f"{path}: the 'path' and 'action' columns are missing; "
                        f"fix the header, or delete the file to use plan.json.")
    edited = {}
    for n, row in enumerate(rows, 2):
        where, p = f"{path} line {n}", (row.get("path") or "").strip()
        action = (row.get("action") or "").strip().lower()
        if p not in actions:
            plan.failures.append(Failure(p or where, f"{where}: not in plan.json "
                                         f"(only the action column of plan.csv "
                                         f"is read); skipped"))
        elif action not in PLAN_ACTIONS:
            plan.failures.append(Failure(p, f"{where}: action '{action}' is not "
                                         f"one of {', '.join(PLAN_ACTIONS)}; "
                                         f"the file stays"))
            edited[p] = "keep"
        else:
            edited[p] = action
    return edited


def _pick_plan(base: str, written, from_json: dict, from_csv: dict) -> bool:
    """True to use plan.csv: the one of the two that differs from what
    find_duplicates wrote (the newer one for plans without a digest)."""
    json_edited = actions_digest(from_json) != written
    csv_edited = actions_digest(from_csv) != written
    if written is None:
        return os.path.getmtime(base + ".csv") > os.path.getmtime(base + ".json")
    if csv_edited and not json_edited:
        return True
    if json_edited and not csv_edited:
        return False
    differ = sorted(p for p in set(from_json) | set(from_csv)
                    if from_json.get(p, "keep") != from_csv.get(p, "keep"))
    first = differ[0]
    raise PlanError(
        f"plan.json and plan.csv were both edited and disagree on "
        f"{len(differ)} files (e.g. {first}: '{from_json.get(first, 'keep')}' "
        f"in plan.json, '{from_csv.get(first, 'keep')}' in plan.csv). Make the "
        f"same change in both, or delete plan.csv to use plan.json alone, or "
        f"run find_duplicates again. Nothing was moved.")


# ============================================================================
# Operations: find_duplicates
# ============================================================================

# Members of a group checked against its lead when no hash joins them to it
# (EdgeJudge.joiners): each check costs ~30 ms, so a lead tries at most this
# many, nearest first.
JOIN_CHECKS = 16
# Copies of the lead each refused member is tried with (through_copies)
THROUGH_COPIES = 2


class EdgeJudge:
    """find_duplicates' keep_edge: in verified mode, a pair found by a weak
    stage (another orientation, a centre, a content box, a window) stands
    only if verified; whole-hash pairs stand as found.

    Only edges that would join two groups are verified (nearest first): an
    edge inside a group already joined changes nothing, and checking every
    one cost 5 minutes on the 1,450-image public corpus, whose 16 copies of
    a picture are all near each other.  Each image pair is checked once."""

    def __init__(self, judge: Judge, flat: FlatIndex, store: HashStore,
                 radius: int):
        self.judge, self.flat, self.store = judge, flat, store
        self.radius = radius
        self.verdicts: dict = {}  # frozenset of two positions -> (a, Verdict)
        self.paths: dict = {}
        self.joined: set = set()  # pairs joined by joiners()
        self.through: dict = {}  # pair joined through a copy -> that copy
        self.farther: set = set()  # pairs joined by reach_further()
        self.codes: dict = {}  # pair -> code of its nearest weak edge
        self.hash_of = flat.distinct_of_images()  # image -> its distinct hash
        self.accepted: set = set()  # frozensets of two distinct hashes
        self.links: dict = {}  # position -> positions verified with it

    def _load_paths(self, positions) -> None:
        """Paths of image positions; None for a row an update removed
        since the index was loaded (never verified, so never joined)."""
        # not `set - self.paths.keys()`: that copies every key each call
        # (96 s over 24,564 calls at 100,000 images)
        missing = {int(p) for p in positions if int(p) not in self.paths}
        if not missing:
            return
        rows = self.store.rows_by_id(int(self.flat.ids[p]) for p in missing)
        self.paths.update((p, getattr(rows.get(int(self.flat.ids[p])), "path",
                                      None)) for p in missing)

    def check(self, a: int, b: int) -> bool:
        pair = frozenset((a, b))
        if pair not in self.verdicts:
            verdict = self._verdict(a, b)
            if verdict is None:  # a Rehearsal's pair not checked yet
                return False
            self.verdicts[pair] = (a, verdict)
            if verdict.accepted:
                self.accepted.add(frozenset(self.hash_of[[a, b]].tolist()))
                self.links.setdefault(a, []).append(b)
                self.links.setdefault(b, []).append(a)
        return self.verdicts[pair][1].accepted

    def _verdict(self, a: int, b: int) -> Verdict | None:
        self._load_paths((a, b))
        if self.paths[a] is None or self.paths[b] is None:
            return Verdict(False, "no longer stored")
        return self.judge.check(self.paths[a], self.paths[b])

    def ahead(self, a: int, others: Iterable) -> None:
        """Verify together the pairs (a, b) for b in others not yet checked:
        the caller is about to check each of them."""
        self.ahead_pairs([(a, int(b)) for b in others])

    def ahead_pairs(self, pairs: list) -> None:
        """ahead() of pairs (a, b) of image positions, of many leads at
        once: one round to the workers, not one per lead."""
        self.prefetch([paths for (a, b), paths in self._stored(pairs)
                       if frozenset((a, b)) not in self.verdicts])

    def _stored(self, pairs: list) -> list:
        """((a, b), (path a, path b)) of the pairs of image positions whose
        two images are still stored."""
        pairs = [(int(a), int(b)) for a, b in pairs]
        self._load_paths([p for pair in pairs for p in pair])
        return [((a, b), (self.paths[a], self.paths[b])) for a, b in pairs
                if None not in (self.paths[a], self.paths[b])]

    def prefetch(self, pairs: list) -> None:
        """Verify these (path a, path b) pairs ahead, in the workers."""
        self.judge.prefetch(pairs)

    def plainly(self, pairs: list) -> None:
        """These (a, b) pairs of image positions are checked plain, with the
        first try only (verify_features)."""
        self.judge.plain.update(paths for _, paths in self._stored(pairs))

    def solid(self, a, b, bits) -> np.ndarray:
        """Whole-hash distances that vouch() at the pair's (adaptive)
        limit."""
        d = self.flat.detail
        least = np.minimum(d[a], d[b])
        return vouches(bits, pair_threshold(self.radius, least, least), least,
                       self.framed[a] | self.framed[b])

    @functools.cached_property
    def framed(self) -> np.ndarray:
        """Images whose content box is not the whole picture."""
        return self.flat.boxes != np.uint64(FULL_BOX_WORD)

    def _same_hash(self) -> tuple:
        """(a, b) image positions joining each image to the first image of
        its distinct hash: the index joins them, no edge does (an edge
        links the first images of two distinct hashes)."""
        first = self.flat.first_images()[self.flat.distinct_of_images()]
        return first, np.arange(len(first), dtype=np.int64)

    def __call__(self, edges: Edges) -> np.ndarray:
        # std corpus: 151 of its 171 checks verified in the first round
        # (_sure's rounds of up to 64 pairs, one after another, before)
        rehearse(self, lambda twin: twin.keep(edges), hope=True)
        return self.keep(edges)

    def keep(self, edges: Edges) -> np.ndarray:
        """Which edges stand: weak ones that would join two groups are
        verified, nearest first."""
        keep = (edges.code == -1) & self.solid(edges.a, edges.b, edges.bits)
        # images of one hash start in one group: else a mirrored copy was
        # verified against each of them (std corpus: 898 -> 245 checks in all,
        # 32.7 -> 10.9 s of CPU in one process)
        same_a, same_b = self._same_hash()
        parent = components(len(self.flat.ids),
                            np.concatenate([edges.a[keep], same_a]),
                            np.concatenate([edges.b[keep], same_b]))
        roots: dict = {}

        def find(x: int) -> int:
            x = int(parent[x])
            while roots.get(x, x) != x:
                x = roots[x]
            return x
        weak = np.flatnonzero(~keep)
        order = weak[np.argsort(edges.effective[weak], kind="stable")]
        self._note_codes(edges, order)
        # an edge inside a group the strong edges made is never checked:
        # left out of the loop (std corpus: 10,616 of 51,292 weak edges stay;
        # keep()'s CPU, two rehearsals and the run, 2.8 -> 1.2 s)
        order = order[parent[edges.a[order]] != parent[edges.b[order]]]
        self._load_paths(np.concatenate([edges.a[order], edges.b[order]]))
        order = order.tolist()
        for i, k in enumerate(order):
            a, b = int(edges.a[k]), int(edges.b[k])
            ra, rb = find(a), find(b)
            if ra == rb:
                continue
            if self.judge.workers > 1 and frozenset((a, b)) not in \
                    self.verdicts and (self.paths[a], self.paths[b]) \
                    not in self.judge.ready:
                self._sure_ahead(edges, order, i, find)
            if self.check(a, b):
                roots[max(ra, rb)] = min(ra, rb)
                keep[k] = True
        return keep

    def _note_codes(self, edges: Edges, order: np.ndarray) -> None:
        """Each pair's code of its nearest weak edge (how() names it)."""
        for a, b, code in zip(edges.a[order].tolist(), edges.b[order].tolist(),
                              edges.code[order].tolist()):
            self.codes.setdefault(frozenset((a, b)), code)

    # Verified ahead at most this many pairs, found among this many edges.
    AHEAD_PAIRS, AHEAD_EDGES = 64, 4096

    def _sure_ahead(self, edges: Edges, order: list, start: int, find
                    ) -> None:
        self.prefetch(self._sure(edges, order, start, find))

    def _sure(self, edges: Edges, order: list, start: int, find) -> list:
        """Pairs of the coming edges that __call__ is sure to check, whatever
        the verdicts before them: an edge whose two groups no earlier
        unjoined edge (from start) touches.  A verdict only joins the groups
        of its own edge, so such an edge's groups are still apart when the
        loop reaches it."""
        touched, pairs = set(), []
        for k in order[start:start + self.AHEAD_EDGES]:
            a, b = int(edges.a[k]), int(edges.b[k])
            ra, rb = find(a), find(b)
            if ra == rb:
                continue
            if ra not in touched and rb not in touched \
                    and frozenset((a, b)) not in self.verdicts \
                    and None not in (self.paths[a], self.paths[b]):
                pairs.append((self.paths[a], self.paths[b]))
                if len(pairs) == self.AHEAD_PAIRS:
                    break
            touched.update((ra, rb))
        return pairs

    def known(self, lead: int, members: np.ndarray, limit) -> np.ndarray:
        """Members near lead by the whole hash or by a pair already verified
        (nothing is checked here).  A verified pair vouches for every image
        of its two hashes: __call__ checks one image of a hash, not each."""
        h = self.flat.hashes
        d = row_distances(h[members], np.broadcast_to(h[lead], h[members].shape))
        whole = (d <= limit) & self.solid(lead, members, d)
        of = self.hash_of
        return whole | np.array([frozenset((of[lead], of[m])) in self.accepted
                                 for m in members.tolist()], dtype=bool)

    def trusted(self, lead: int, members: np.ndarray, limit) -> np.ndarray:
        """Which members may join lead's group (all of them near it by some
        hash): near by the whole-picture hash, or verified with it."""
        h = self.flat.hashes
        d = row_distances(h[members], np.broadcast_to(h[lead], h[members].shape))
        whole = (d <= limit) & self.solid(lead, members, d)
        self.ahead(lead, members[~whole & (members != lead)])
        return np.array([w or m == lead or self.check(lead, m)
                         for w, m in zip(whole.tolist(), members.tolist())],
                        dtype=bool)

    def joiners(self, lead: int, members: np.ndarray, free: np.ndarray,
                most: int = JOIN_CHECKS, group: Sequence = ()) -> list:
        """Indices of free members (all linked to the lead through its
        component, but not near it by any hash) that verification finds to
        be the lead's picture: at most `most` checks, nearest hash first.
        Representative grouping stays: each is checked with the lead
        itself, never chained through another member.  On the tough corpus
        a 180° turn near only a crop that led its group was split off
        (rot180 90.8 % grouped with its original, transpose 93.4 %).
        Those the lead refuses are then tried with copies of it (through()):
        members of its `group` (positions) near it by the whole picture.
        A free member already verified with a member the lead took (by
        its hash or its check) joins through that member (vouched())."""
        ks = np.flatnonzero(free)
        if not len(ks):
            return []
        order = ks[np.argsort(self.flat.match_distances(lead, members[ks]).effective,
                              kind="stable")][:most]
        self.ahead(lead, members[order])
        found = [int(k) for k in order.tolist()
                 if self.check(lead, int(members[k]))]
        self.joined.update(frozenset((lead, int(members[k]))) for k in found)
        found += self.vouched(lead, members, ks, found, group)
        refused = [int(k) for k in order.tolist() if int(k) not in found]
        return found + self.through_copies(lead, members, refused, group, most)

    def vouched(self, lead: int, members: np.ndarray, free: np.ndarray,
                found: list, group: Sequence) -> list:
        """Indices of free members (not found) that a check made already
        found to be the picture of a member the lead took (its `group`,
        and those found): joined through it, with no check more.  Tough
        corpus: a 180° turn verified with the original, which a post of it
        led, was put in a group of its own (and so were a caption and a
        text copy)."""
        took = {int(p) for p in group} | {int(members[k]) for k in found}
        took.add(lead)
        out = []
        for k in free.tolist():
            member = int(members[k])
            via = [c for c in self.links.get(member, ()) if c in took]
            if k not in found and via:
                out.append(k)
                self.through[frozenset((lead, member))] = min(via)
        return out

    def copies_of(self, lead: int, group: Sequence) -> np.ndarray:
        """Members of the lead's group within half the threshold of it by
        the whole picture, with detail enough to vouch (solid): the same
        picture as far as hashes can tell."""
        others = np.array([int(p) for p in group if int(p) != lead],
                          dtype=np.int64)
        if not len(others):
            return others
        h = self.flat.hashes
        d = row_distances(h[others], np.broadcast_to(h[lead], h[others].shape))
        return others[(2 * d <= self.radius) & self.solid(lead, others, d)]

    def through_copies(self, lead: int, members: np.ndarray, refused: list,
                       group: Sequence, most: int = JOIN_CHECKS) -> list:
        """Of the refused members (indices), those verified with a copy of
        the lead (copies_of), nearest copy first, at most `most` checks in
        all.  A lead that is itself an edited copy (text over the picture,
        a caption band) fails where its unedited copy passes: on the tough
        corpus 25 copies were split off their original this way, led by a
        180° turn that the lead with text did not verify with."""
        copies = self.copies_of(lead, group)
        if not len(copies) or not refused:
            return []
        found, left = [], most
        # every refused member against every copy in one call, none for one
        # copy (100,000 images: 5,245 calls -> 4,073 -> 2,897, 1.3 s of CPU
        # left; 37 % of the leads there have one copy)
        far = np.asarray([int(members[k]) for k in refused], dtype=np.int64)
        nearest = np.zeros((len(far), 1), dtype=np.int64) if len(copies) == 1 \
            else np.argsort(self.flat.match_distances(
                np.repeat(far, len(copies)), np.tile(copies, len(far)))
                .effective.reshape(len(far), len(copies)), axis=1,
                kind="stable")
        for k, member, by in zip(refused, far.tolist(), nearest):
            near = copies[by[:THROUGH_COPIES]]
            for copy in near.tolist():
                if left <= 0:
                    return found
                left -= 1
                if self.check(int(copy), member):
                    found.append(k)
                    self.through[frozenset((lead, member))] = int(copy)
                    break
        return found

    def how(self, lead: int, member: int, code: int) -> How | None:
        """How member matched lead, seen from lead, when they were verified."""
        copy = self.through.get(frozenset((lead, member)))
        if copy is not None:  # seen from the copy, which is the lead's picture
            return How(STAGES[7], None, True, self._seen_from(copy, member))
        if frozenset((lead, member)) in self.farther:  # the whole hash, farther
            return How(STAGES[0], None, True, self._seen_from(lead, member))
        first, verdict = self.verdicts.get(frozenset((lead, member)),
                                           (None, None))
        if frozenset((lead, member)) in self.joined:
            geometry = verdict.geometry
            if first != lead:
                geometry = geometry.swapped() if geometry.inner else \
                    self.judge.check(self.paths[lead],
                                     self.paths[member]).geometry
            code = self.codes.get(frozenset((lead, member)), -1)
            if code < 0:  # no edge of their own: found through the group
                return How(STAGES[5], None, True, geometry)
            return How(stage_of(code), MATCH_NAMES[code], True, geometry)
        if code < 0 or verdict is None or not verdict.accepted:
            return None
        geometry = verdict.geometry
        if first != lead:  # checked the other way round
            geometry = geometry.swapped() if geometry.inner else \
                self.judge.check(self.paths[lead], self.paths[member]).geometry
        return How(stage_of(code), MATCH_NAMES[code], True, geometry)

    def _seen_from(self, a: int, b: int) -> Geometry | None:
        """The geometry of the accepted pair (a, b), seen from a."""
        first, verdict = self.verdicts[frozenset((a, b))]
        geometry = verdict.geometry
        if first != a and geometry is not None:
            geometry = geometry.swapped() if geometry.inner else \
                self.judge.check(self.paths[a], self.paths[b]).geometry
        return geometry


class Rehearsal(EdgeJudge):
    """An EdgeJudge that checks nothing, to plan with (rehearse): a copy of
    the real one's state (nothing it does reaches the real one) whose
    check() takes a verdict found already, and notes a pair not checked yet
    in `wanted`, taking it as refused, or as accepted when it is told to
    hope (where most pairs checked are copies)."""

    def __init__(self, real: EdgeJudge, hope: bool):  # a copy: no super()
        self.__dict__.update(real.__dict__)
        for name in ("verdicts", "through", "codes"):
            setattr(self, name, dict(getattr(real, name)))
        for name in ("joined", "farther", "accepted"):
            setattr(self, name, set(getattr(real, name)))
        self.links = {p: list(v) for p, v in real.links.items()}
        self.wanted: list = []
        self.hope = hope

    def _verdict(self, a: int, b: int) -> Verdict | None:
        self._load_paths((a, b))
        key = (self.paths[a], self.paths[b])
        if None in key:
            return super()._verdict(a, b)
        found = self.judge.known(*key)
        if found is None:
            self.wanted.append(key)
            if self.hope:
                return Verdict(True, "hoped")
        return found

    def prefetch(self, pairs: list) -> None:
        pass  # what it would check is in `wanted`

    def _sure_ahead(self, edges: Edges, order: list, start: int, find
                    ) -> None:
        pass  # _sure's scan of the coming edges: 5.6 of 7.7 s of keep()'s CPU

    def _note_codes(self, edges: Edges, order: np.ndarray) -> None:
        pass  # for how(), which a rehearsal is not asked


# rehearse() stops after this many rounds, or at a round that would verify
# fewer pairs than REHEARSE_LEAST: a rehearsal of EdgeJudge.keep costs
# 0.1-0.2 s on the std corpus, more than two checks done at once save
# (30-100 ms each); the phase then checks those few as it did before.
REHEARSALS, REHEARSE_LEAST = 8, 8


def rehearse(edges: EdgeJudge, phase, hope: bool) -> None:
    """Verify ahead, together, in the workers, the pairs a phase of
    find_duplicates will check one after another: phase(twin) runs it with
    a Rehearsal; the pairs it asked for and could not have are verified in
    one round; again with the verdicts found, until it asks for few.  A
    pair's verdict is the same wherever it is computed, and the phase then
    runs with the real EdgeJudge, so the results are those of checking one
    by one.  Hope (unknown verdicts taken as accepted) asks for no pair the
    phase does not check where an accepted pair only ever joins groups
    (EdgeJudge.keep: groups joined in hope hold those joined in fact, so
    an edge left apart in hope is left apart in fact); else refused is the
    likelier guess (a farther image is mostly another picture)."""
    if edges.judge.workers <= 1:
        return
    for _ in range(REHEARSALS):
        twin = Rehearsal(edges, hope)
        phase(twin)
        wanted = list(dict.fromkeys(twin.wanted))
        if len(wanted) < REHEARSE_LEAST:
            return
        edges.prefetch(wanted)
        if all(getattr(edges.judge.known(*p), "accepted", None) == hope
               for p in wanted):
            return  # every guess right: the next one would ask for nothing


@dataclass
class Group:
    images: list  # of Match; the first leads, `keep` marks the one kept
    keep_reason: str = ""  # "kept: oldest (by 3 days)": what decided

    def as_json(self) -> dict:
        return {"keep_reason": self.keep_reason,
                "images": [m.as_json() for m in self.images]}

    def csv_rows(self, n: int) -> Iterator[list]:
        # keep as in the JSON (true/false); `how` names the variant
        for k, m in enumerate(self.images):
            yield [n, _csv_bool(m.keep), shown(m.path), m.hash, m.distance,
                   m.width, m.height, m.size, _iso(m.mtime_ns)] + \
                (m.how_cells() if k else ["", "", ""]) + \
                [m.action or "", self.keep_reason if m.keep else "", ""]

    def text_lines(self, n: int) -> Iterator[str]:
        yield (f"group {n}: {len(self.images)} images, "
               f"{human_bytes(_reclaimable(self))} reclaimable; "
               f"{self.keep_reason}")
        for m in self.images:
            tag = f"d={m.distance}" + " keep" * m.keep
            yield f"  {tag:<11} {printable(m.path)}  {m.dims()}{m.how_suffix()}"


@dataclass
class DuplicatesReport(DocumentReport):
    database: str
    engine: str
    images: int
    groups: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    low_detail: list = field(default_factory=list)  # ImageRow, not compared
    seconds: float = 0.0
    plan_files: list = field(default_factory=list)  # written by find_duplicates

    operation: ClassVar[str] = "find_duplicates"
    pictures: ClassVar[bool] = True
    title: ClassVar[str] = "Duplicate images"  # of the HTML page

    def failed(self) -> list:
        return self.failures

    def duplicates(self) -> int:
        return sum(len(g.images) - 1 for g in self.groups)

    def reclaimable(self) -> int:
        return sum(map(_reclaimable, self.groups))

    def body(self) -> dict:
        return {"database": shown(self.database), "engine": self.engine,
                "images": self.images, "seconds": round(self.seconds, 3),
                "group_count": len(self.groups),
                "duplicates": self.duplicates(),
                "bytes_reclaimable": self.reclaimable(),
                "groups": [g.as_json() for g in self.groups],
                "low_detail": [shown(r.path) for r in self.low_detail],
                "failures": _failures_json(self.failures)}

    def csv_rows(self) -> Iterator[list]:
        # files that could not be read follow the groups, with their error
        yield ["group", "keep", "path", "hash", "distance", "width", "height",
               "size", "mtime"] + HOW_COLUMNS + ["action", "keep_reason",
                                                 "error"]
        for n, g in enumerate(self.groups, 1):
            yield from g.csv_rows(n)
        for f in self.failures:
            yield ["", "", shown(f.path)] + [""] * 11 + [f.error]

    def text_lines(self, verbose: bool = False) -> Iterator[str]:
        for n, g in enumerate(self.groups, 1):
            yield from g.text_lines(n)
        if self.low_detail:
            yield (f"{len(self.low_detail)} nearly blank or tiny images were "
                   f"not compared (listed under low_detail in the JSON).")
        if self.failures:
            yield f"{counted(len(self.failures), 'file')} could not be read " \
                  f"(see update's output or export)."

    def summary(self) -> str:
        return (f"find_duplicates: {counted(len(self.groups), 'group')}, "
                f"{counted(self.duplicates(), 'duplicate')}, "
                f"{human_bytes(self.reclaimable())} reclaimable, "
                f"{counted(self.images, 'image')} ({self.engine}) in "
                f"{self.seconds:.2f} s")

    def written_before(self) -> list:
        return self.plan_files

    # ---- the HTML page: a set of cards per group ----

    def page_paths(self) -> Iterator[str]:
        for g in self.groups[:HTML_PAGE_SIZE]:
            yield from (shown(m.path) for m in g.images)

    def query_paths(self) -> list:
        return []

    def html_sets(self, thumbs: dict, folders: dict) -> list:
        return [{"reclaim": _reclaimable(g), "reason": g.keep_reason,
                 "items": [_html_item(m, thumbs.get(shown(m.path)), folders)
                           for m in g.images]}
                for g in self.groups]

    def html_facts(self) -> list:
        return [(self.images, "images scanned"), (len(self.groups), "groups"),
                (self.duplicates(), "duplicates"),
                (human_bytes(self.reclaimable()), "reclaimable")]


def op_find_duplicates(run: Run, ui: Console) -> DuplicatesReport:
    """Groups of images within the threshold of each other."""
    cfg, start = run.config, time.monotonic()
    store, judge = ready_store(cfg, ui), None
    try:
        # no snapshot here: finding pairs can take minutes, and a reader
        # that long would make an update's writes time out; rows an update
        # removed meanwhile are dropped (_still_stored)
        flat = load_index(cfg, store, ui)
        radius = cfg.distance_threshold
        bktree = os.path.join(cfg.bk_dir, BKTREE_NAME)
        engine = flat.engine(cfg.engine, radius, True, bktree)
        regions = flat.region_engines(cfg.engine, radius, True, bktree)
        adaptive = cfg.adaptive_threshold
        judge = Judge(cfg, ui)
        judge.remember(cfg, flat.key)
        regions.turned = judge.verifier is not None  # each one is verified
        edges = EdgeJudge(judge, flat, store, radius) if judge.verifier else None
        components = duplicate_groups(flat, engine, radius, adaptive, regions,
                                      keep_edge=edges)
        rows = store.rows_by_id(int(flat.ids[p]) for g in components for p in g)
        components = _still_stored(components, flat, rows)
        rows = {p: rows[int(flat.ids[p])] for g in components for p in g}
        if old := sum(1 for r in rows.values() if r.traits is None):
            ui.notice(f"{old} files were hashed by an earlier version, without "
                      f"the format and EXIF the keep rule reads: run update.")
        marks = load_marks(cfg)
        ranks = []
        for comp in components:  # best-kept first, so it wins ties for lead
            ctx = KeepContext.of([rows[p] for p in comp.tolist()], cfg.img_dirs)
            ranks.append(sorted(comp.tolist(),
                                key=lambda p: keep_key(rows[p], cfg, ctx)))
        connected = cfg.grouping == "connected"
        tables = [None] * len(ranks)
        want = [k for k, r in enumerate(ranks) if len(r) <= CENTRE_LIMIT
                and needs_split(r, rows, marks, connected)]
        for k, table in zip(want, near_tables(
                [np.asarray(ranks[k], dtype=np.int64) for k in want], flat,
                radius, adaptive, edges)):
            tables[k] = table
        splits = split_all(ranks, tables, flat, radius, rows, marks,
                           connected, adaptive, edges)
        if edges is not None:
            further = flat.engine(cfg.engine, radius + VERIFY_EXTRA_BITS,
                                  True, bktree)
            splits = reach_further(splits, flat, further, radius, adaptive,
                                   edges, rows, store, marks)
        groups = make_groups(splits, flat, rows, cfg, radius, adaptive, edges)
        groups.sort(key=lambda g: (-len(g.images), -_reclaimable(g),
                                   g.images[0].path))
        failures = [Failure(r.path, r.error) for r in store.failed_rows()]
        report = DuplicatesReport(cfg.db_name, engine.name, len(flat.ids),
                                  groups, failures, store.low_detail_rows())
        plan_actions(report, cfg)
    finally:
        store.close()
        if judge is not None:
            judge.close()
    report.seconds = time.monotonic() - start
    # what move would do: the plan is part of what find_duplicates answers
    report.plan_files = write_plan(make_plan(report, cfg), cfg)
    return report


def _still_stored(components: list, flat: FlatIndex, rows: dict) -> list:
    """The groups without the images an update removed while we looked."""
    kept = [c[[int(flat.ids[p]) in rows for p in c.tolist()]]
            for c in components]
    return [c for c in kept if len(c) > 1]


@dataclass
class Edges:
    """Candidate pairs of find_duplicates, as arrays: image positions a and
    b, Hamming distance in bits, the distance as it counts (weighed by
    code_weight), and the match code.  For a region code the region
    belongs to b and a matched with its whole picture, except a content
    box against a content box (CONTENT_CODE with both_boxes)."""

    a: np.ndarray
    b: np.ndarray
    bits: np.ndarray
    effective: np.ndarray
    code: np.ndarray
    both_boxes: np.ndarray

    @classmethod
    def join(cls, parts: list) -> Edges:
        if not parts:
            z = np.zeros(0, np.int64)
            return cls(z, z, z, z.astype(np.float64), z, z.astype(bool))
        return cls(*(np.concatenate(col) for col in zip(*parts)))

    def __len__(self) -> int:
        return len(self.a)

    def where(self, keep: np.ndarray) -> Edges:
        return Edges(*(getattr(self, f.name)[keep]
                       for f in dataclasses.fields(self)))

    def stages(self) -> list:
        """The stage name (STAGES) of each edge."""
        return [stage_of(int(c)) for c in self.code]


def _edge(a, b, d, code, both: bool = False) -> tuple:
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    d = np.asarray(d, np.int64)
    code = np.broadcast_to(np.asarray(code, np.int64), a.shape)
    return (a, b, d, d * code_weights(code), np.array(code),
            np.full(a.shape, both, dtype=bool))


def candidate_edges(flat: FlatIndex, engine, radius: int,
                    regions: Regions | None = None) -> Edges:
    """Every candidate pair, with how it was found: whole to whole, an
    orientation of one to the other's whole, centre to the same centre, a
    content box to a whole or a box, a whole to a window (each image's
    whole against every other's windows, which covers both directions).
    Image pairs with the same hash are joined by the index itself."""
    parts = []
    first = flat.first_images()
    if radius > 0 and len(flat.distinct) > 1:
        for a, b, d in engine.pairs(radius):
            parts.append(_edge(first[a], first[b], d, -1))
    v = flat.variants.shape[1]
    if v and len(flat.ids):  # an orientation of one image near another image
        queries = flat.variants.reshape(-1, flat.variants.shape[2])
        for qi, j, d in engine.cross(queries, variant_radius(radius)):
            parts.append(_edge(first[j], qi // v, d, qi % v))
    if regions is None:
        return Edges.join(parts)
    for k, (view, view_engine) in enumerate(regions.centres):
        for a, b, d in view.image_pairs(view_engine, radius):
            parts.append(_edge(a, b, d, CENTRE_CODE + k))
    content = regions.content
    if content is not None:  # a box near a whole, then near a box
        for qi, j, d in engine.cross(content.index.hashes, radius):
            parts.append(_edge(first[j], content.owner[qi], d, CONTENT_CODE))
        for a, b, d in content.index.image_pairs(content.engine, radius):
            parts.append(_edge(content.owner[a], content.owner[b], d,
                               CONTENT_CODE, True))
    if regions.windows is not None:
        parts += _window_edges(flat, regions.windows, radius,
                               regions.turned and v)
    edges = Edges.join(parts)
    return edges.where(edges.a != edges.b)


def _window_edges(flat: FlatIndex, windows: WindowRows, radius: int,
                  turned: bool) -> list:
    """Edges of a whole near a window of another image, then (turned) of
    an orientation near a window of another.  One cross of both kinds of
    query: the windows' tables are read once (100,000 images, 161
    windows each: 9.2-9.4 -> 8.3-8.6 s of CPU)."""
    u, v = len(flat.distinct), flat.variants.shape[1]
    queries = flat.distinct if not turned else np.concatenate(
        [flat.distinct, flat.variants.reshape(-1, flat.variants.shape[2])])
    wholes, turns = [], []
    for qi, rows, d in windows.cross(queries, code_radius(radius, WINDOW_CODE)):
        w = qi < u
        at, images = flat.expand(qi[w])  # every image (whose detail decides)
        wholes.append(_edge(images, windows.owner[rows[w][at]], d[w][at],
                            windows.code[rows[w][at]]))
        qt, rt = qi[~w] - u, rows[~w]
        turns.append(_edge(qt // max(v, 1), windows.owner[rt], d[~w],
                           turned_code(qt % max(v, 1),
                                       windows.code[rt] - WINDOW_CODE)))
    return wholes + turns


def duplicate_groups(flat: FlatIndex, engine, radius: int,
                     adaptive: bool = False, views=None,
                     keep_edge=None) -> list:
    """Image positions of each connected component of candidate pairs
    (candidate_edges).  keep_edge(Edges) -> bool array, when given, decides
    which pairs stand (verification); it is called once with them all."""
    u = len(flat.distinct)
    edges = candidate_edges(flat, engine, radius, _as_regions(views, radius))
    of_image = flat.distinct_of_images()
    windows = edges.code >= WINDOW_CODE  # a window is one image's
    edges.effective[windows] = window_effective(
        edges.bits[windows], flat.detail[edges.a[windows]],
        flat.detail[edges.b[windows]])
    keep = edges.effective <= radius
    if adaptive:  # the least detail among the images of each hash
        detail = flat.distinct_detail()
        keep &= edges.effective <= pair_threshold(
            radius, detail[of_image[edges.a]], detail[of_image[edges.b]])
    edges = edges.where(keep)
    if keep_edge is not None and len(edges):
        edges = edges.where(np.asarray(keep_edge(edges), dtype=bool))
    labels = components(u, of_image[edges.a], of_image[edges.b])
    per_hash = np.diff(flat.img_starts)
    size = np.bincount(labels, weights=per_hash, minlength=u)
    keep = np.flatnonzero(size[labels] >= 2)  # hashes in groups of 2+ images
    order = keep[np.argsort(labels[keep], kind="stable")]
    images = flat.img_order[_expand(flat.img_starts[order], per_hash[order])]
    ends = np.cumsum(per_hash[order])
    cuts = ends[np.flatnonzero(np.diff(labels[order]))].tolist()
    return [images[a:b] for a, b in zip([0] + cuts, cuts + [len(images)])
            if b > a]


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over edges (a, b): each node's label is its smallest node."""
    parent = np.arange(n, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi
        if not live.any():
            break
        np.minimum.at(parent, hi[live], lo[live])
        while True:  # pointer jumping until every node points at a root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        a, b = a[live], b[live]
    return parent


def _any_marked(members: list, rows: dict, marks: set) -> bool:
    return bool(marks) and any(_marked(rows[a], rows[b], marks)
                               for k, a in enumerate(members)
                               for b in members[k + 1:])


def needs_split(members: list, rows: dict, marks: set, connected: bool
                ) -> bool:
    """Whether split_group looks inside the component at all."""
    return not ((connected or len(members) == 2) and
                not _any_marked(members, rows, marks))


class NearTable(NamedTuple):
    """Every member of a component against every other (k x k, row =
    lead): near by the best of their hashes, and near by the whole hash in
    a way verified matching vouches for (all True in fast mode)."""

    near: np.ndarray
    whole: np.ndarray


# Member pairs per match_distances call of near_tables (memory: ~1.5 KB
# each with 80 windows).
NEAR_BLOCK = 200_000


def near_tables(comps: list, flat: FlatIndex, radius: int, adaptive: bool,
                edges: EdgeJudge | None = None) -> list:
    """The NearTable of each component (arrays of image positions), from
    a few large match_distances calls instead of one per component: the
    same values, element by element (100,000 images, 7,003 components
    split: split_group 8.1 -> 1.6 s of CPU with near_tables)."""
    out, block, size = [], [], 0
    for c in comps:  # blocks of whole components
        if block and size + len(c) ** 2 > NEAR_BLOCK:
            out += _near_block(block, flat, radius, adaptive, edges)
            block, size = [], 0
        block.append(c)
        size += len(c) ** 2
    if block:
        out += _near_block(block, flat, radius, adaptive, edges)
    return out


def _near_block(comps: list, flat: FlatIndex, radius: int, adaptive: bool,
                edges: EdgeJudge | None) -> list:
    leads = np.concatenate([np.repeat(c, len(c)) for c in comps])
    others = np.concatenate([np.tile(c, len(c)) for c in comps])
    limit = pair_threshold(radius, flat.detail[leads], flat.detail[others]) \
        if adaptive else np.full(len(leads), radius)
    # near without the windows first (a smaller best is near all the same),
    # then with them only where that is not near: the same table, 1.2-1.9
    # -> 0.1 s of CPU at 100,000 images (161 windows)
    near = flat.match_distances(leads, others, windows=False).effective \
        <= limit
    far = np.flatnonzero(~near)
    near[far] = flat.match_distances(leads[far], others[far]).effective \
        <= limit[far]
    whole = np.ones(len(leads), dtype=bool)
    if edges:  # as EdgeJudge.known judges the whole hash
        h = flat.hashes
        d = row_distances(h[leads], h[others])
        whole = (d <= limit) & edges.solid(leads, others, d)
    cuts = np.cumsum([len(c) ** 2 for c in comps])[:-1]
    return [NearTable(n.reshape(len(c), len(c)), w.reshape(len(c), len(c)))
            for c, n, w in zip(comps, np.split(near, cuts),
                               np.split(whole, cuts))]


CENTRE_LIMIT = 2000  # larger components take leaders in index order


def split_group(members: list, flat: FlatIndex, radius: int, rows: dict,
                marks: set, connected: bool, adaptive: bool = False,
                edges: EdgeJudge | None = None,
                table: NearTable | None = None) -> list:
    """The groups one connected component is reported as.

    connected (and any pair): the whole component, unless "not a duplicate"
    marks force a split.  Otherwise representative: the image near the most
    others leads a group of all still free within the threshold of it, and
    so on, so different pictures are never chained together through
    in-between images.  With verified matching (edges) a member is near the
    lead by its whole hash or by a verified pair, never by an unverified
    region or orientation.  table: these members' NearTable, when
    near_tables made it for many components at once."""
    if not needs_split(members, rows, marks, connected):
        return [list(members)]  # a pair is a group: its edge passed the test
    members = np.asarray(members, dtype=np.int64)
    if table is None and len(members) <= CENTRE_LIMIT:
        table = near_tables([members], flat, radius, adaptive, edges)[0]
    near = Nearness(members, flat, radius, adaptive, edges, table)
    leads = CentralLeads(near) if table is not None else IndexOrderLeads(near)
    return representative_groups(near, leads, rows, marks)


def split_all(ranks: list, tables: list, flat: FlatIndex, radius: int,
              rows: dict, marks: set, connected: bool, adaptive: bool,
              edges: EdgeJudge | None) -> list:
    """split_group of each component (ranked members, NearTable or None),
    rehearsed first in verified mode."""
    def split(judge: EdgeJudge | None) -> list:
        return [g for ranked, table in zip(ranks, tables)
                for g in split_group(ranked, flat, radius, rows, marks,
                                     connected, adaptive, judge, table)]
    if edges is not None:  # std corpus: 39 of 167 checks in this process -> 2
        rehearse(edges, split, hope=True)
    return split(edges)


@dataclass
class Nearness:
    """Which members of a component lie within the threshold of one."""

    members: np.ndarray  # image positions
    flat: FlatIndex
    radius: int
    adaptive: bool
    edges: EdgeJudge | None  # verified matching
    table: NearTable | None = None  # up to CENTRE_LIMIT members

    def limit_of(self, p) -> np.ndarray:
        """The threshold between image p and each member."""
        if self.adaptive:
            return pair_threshold(self.radius, self.flat.detail[p],
                                  self.flat.detail[self.members])
        return np.full(len(self.members), self.radius)

    def close_to(self, p) -> np.ndarray:
        return self.flat.match_distances(p, self.members).effective <= \
            self.limit_of(p)

    def trusted(self, lead: int, close: np.ndarray) -> np.ndarray:
        """verified mode: of the lead's candidates, those it vouches for
        (verifying only these keeps find_duplicates' time bounded)."""
        if not self.edges:
            return close
        if self.table is not None and self.table.whole[lead][close].all():
            return close  # all near by the whole hash: nothing to verify
        close = close.copy()
        p = self.members[lead]
        close[close] = self.edges.trusted(p, self.members[close],
                                          self.limit_of(p)[close])
        return close


class CentralLeads:
    """Leads by centrality, for components up to CENTRE_LIMIT members:
    every member against every other once; the next lead is the free
    member near the most free others."""

    def __init__(self, near: Nearness):
        self.nearness = near
        m, table = near.members, near.table
        self.near = table.near
        # verified mode: leads are chosen by the links already vouched for
        # (the whole hash, pairs verified so far), so the lead is the
        # picture the copies are sure to match, not one that regions make
        # look central.  A row near only by the whole hash is its own
        # solid row: EdgeJudge.known is asked only for the others.
        self.solid = self.near
        if near.edges:
            self.solid = self.near.copy()
            for i in np.flatnonzero((self.near & ~table.whole).any(axis=1)):
                self.solid[i] &= near.edges.known(m[i], m,
                                                  near.limit_of(m[i]))

    def next(self, free: np.ndarray) -> tuple[int, np.ndarray]:
        """(the lead, the members near it)."""
        lead = int(np.argmax(np.where(free, (self.solid & free).sum(axis=1),
                                      -1)))
        return lead, self.near[lead]

    def linked(self, lead: int, free: np.ndarray, group: list = ()) -> list:
        """verified mode: free members linked to the lead through the
        component, near it by no hash, that verification finds to be the
        lead's picture, or the picture of a copy of it in its `group`
        (indices) (EdgeJudge.joiners)."""
        edges, members = self.nearness.edges, self.nearness.members
        return edges.joiners(members[lead], members, free,
                             group=members[list(group)]) if edges else []


class IndexOrderLeads:
    """Leads in index order, for larger components: a member is compared
    with the others only when it leads (a k x k table would not fit)."""

    def __init__(self, near: Nearness):
        self.near = near

    def next(self, free: np.ndarray) -> tuple[int, np.ndarray]:
        lead = int(np.argmax(free))
        return lead, self.near.close_to(self.near.members[lead])

    def linked(self, lead: int, free: np.ndarray, group: list = ()) -> list:
        return []  # so large a component: its leads are not checked further


def representative_groups(near: Nearness, leads, rows: dict,
                          marks: set) -> list:
    """Each lead with the free members near it (never two marked "not a
    duplicate" in one group), until none is free; groups of one dropped."""
    members = near.members
    free = np.ones(len(members), dtype=bool)
    out = []
    while free.any():
        lead, close = leads.next(free)
        close = near.trusted(lead, close & free)
        group = [lead]
        for k in np.flatnonzero(close & free):
            if k != lead and _fits(k, group, members, rows, marks):
                group.append(k)
        free[group] = False
        for k in leads.linked(lead, free, group):  # linked, not near: verified
            if _fits(k, group, members, rows, marks):
                group.append(k)
                free[k] = False
        out.append([int(members[k]) for k in group])
    return [g for g in out if len(g) > 1]


def _fits(k: int, group: list, members: np.ndarray, rows: dict,
          marks: set) -> bool:
    """Member k is marked "not a duplicate" of no one in the group."""
    return not any(_marked(rows[members[k]], rows[members[g]], marks)
                   for g in group)


def _marked(a: ImageRow, b: ImageRow, marks: set) -> bool:
    return bool(marks) and frozenset((a.path, b.path)) in marks


# Images in no group that a group may take when its lead verifies them (or
# a copy of the lead does: EdgeJudge.through_copies), nearest first: those
# whose whole hash lies within VERIFY_EXTRA_BITS past the threshold of a
# member's (as a search reaches): a sticker or text over the picture moves
# a copy 13-18 bits away.  Tough corpus, the lead's hash alone: 14 of 37
# checks found a copy (8 stickers, 3 texts); every member's: 28 of 222.
# The cost is per group, not per image.
REACH_CHECKS = 4


def reach_further(splits: list, flat: FlatIndex, engine, radius: int,
                  adaptive: bool, edges: EdgeJudge, rows: dict, store,
                  marks: set) -> list:
    """verified mode: the groups, each with the images in no group that
    verification joins to its lead (at most REACH_CHECKS candidates per
    group, each checked with the lead, and at most REACH_CHECKS more checks
    with copies of it); their rows are added to `rows`.  `engine` answers
    within radius + VERIFY_EXTRA_BITS (any exact engine)."""
    farther = farther_images(splits, flat, engine, radius, adaptive)
    sure = sure_reach(splits, farther)
    edges.plainly(sure)
    edges.ahead_pairs(sure)
    # std corpus: 126 of its 189 checks were made in this process one by
    # one (through_copies, after each lead's) while the workers waited: 0
    rehearse(edges, lambda twin: _reach(splits, farther, flat, twin, dict(rows),
                                        store, marks), hope=False)
    return _reach(splits, farther, flat, edges, rows, store, marks)


def _reach(splits: list, farther: list, flat: FlatIndex, edges: EdgeJudge,
           rows: dict, store, marks: set) -> list:
    """reach_further, given each group's farther_images."""
    taken = {p for g in splits for p in g}
    out = []
    for group, ranked in zip(splits, farther):
        lead = group[0]
        near = np.array([p for p in ranked if p not in taken][:REACH_CHECKS],
                        dtype=np.int64)
        # whole hashes within 18 bits: the same framing and orientation, so
        # the first try alone (not mirrored, plain keypoints): tough corpus,
        # each of its 21 found so (std 4 of 4), CPU 8.3 -> 1.4 s for its 218
        edges.plainly([(lead, p) for p in near.tolist()])
        edges.ahead(lead, near)
        ok = [k for k, p in enumerate(near.tolist()) if edges.check(lead, p)]
        edges.farther.update(frozenset((lead, int(near[k]))) for k in ok)
        ok += edges.through_copies(
            lead, near, [k for k in range(len(near)) if k not in ok], group,
            REACH_CHECKS)
        found = [int(near[k]) for k in sorted(ok)]
        fresh = store.rows_by_id(int(flat.ids[p]) for p in found)
        for p in found:
            row = fresh.get(int(flat.ids[p]))
            if row is None or any(_marked(row, rows[g], marks) for g in group):
                continue
            rows[p] = row
            group = group + [p]
            taken.add(p)
        out.append(group)
    return out


def sure_reach(splits: list, farther: list) -> list:
    """(lead, image) pairs that reach_further is sure to check, whatever
    the verdicts: the first REACH_CHECKS of a group's candidates while
    none of them is a candidate of an earlier group (which may take it).
    Verified together up front: one round to the workers, not one per
    group (100,000 images: 11,160 rounds)."""
    pairs, seen = [], set()
    for group, ranked in zip(splits, farther):
        for p in ranked[:REACH_CHECKS]:
            if p in seen:
                break
            pairs.append((group[0], p))
        seen.update(ranked)
    return pairs


def farther_images(splits: list, flat: FlatIndex, engine, radius: int,
                   adaptive: bool) -> list:
    """For each group, the images in no group at the start whose whole hash
    lies within VERIFY_EXTRA_BITS past the threshold of a member's (past
    it, for the lead's: nearer ones were offered to the lead already),
    nearest first, then by position.  One engine.cross of every member's
    hash, not one search each (100,000 images, 38,000 members: ~45 s of
    CPU -> ~2 s)."""
    sizes = np.array([len(g) for g in splits], dtype=np.int64)
    if not len(sizes):
        return []
    members = np.fromiter((p for g in splits for p in g), np.int64,
                          int(sizes.sum()))
    group_of = np.repeat(np.arange(len(splits)), sizes)
    is_lead = np.zeros(len(members), dtype=bool)
    is_lead[np.cumsum(sizes) - sizes] = True
    # each distinct hash asked once (members that share one: copies)
    asked, of_member = np.unique(flat.distinct_of_images()[members],
                                 return_inverse=True)
    found = list(engine.cross(flat.distinct[asked],
                              radius + VERIFY_EXTRA_BITS))
    if not found:
        return [[] for _ in splits]
    ui, pos, d = (np.concatenate([np.asarray(f[k], np.int64) for f in found])
                  for k in range(3))
    by = np.argsort(of_member, kind="stable")  # members of each asked hash
    per = np.bincount(of_member, minlength=len(asked))
    at = _expand((np.cumsum(per) - per)[ui], per[ui])
    qi = by[at]
    pos, d = np.repeat(pos, per[ui]), np.repeat(d, per[ui])
    at, images = flat.expand(pos)
    qi, d = qi[at], d[at]
    m = members[qi]
    limit = pair_threshold(radius, flat.detail[m], flat.detail[images]) \
        if adaptive else radius
    grouped = np.zeros(len(flat.ids), dtype=bool)
    grouped[members] = True
    ok = ~grouped[images] & (~is_lead[qi] | (d > limit)) & \
        (d <= limit + VERIFY_EXTRA_BITS)
    g, p, d = group_of[qi[ok]], images[ok], d[ok]
    best = np.lexsort((d, p, g))  # each (group, image) at its least d
    g, p, d = g[best], p[best], d[best]
    first = np.ones(len(g), dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    g, p, d = g[first], p[first], d[first]
    ranked = np.lexsort((p, d, g))
    g, p = g[ranked], p[ranked]
    cuts = np.searchsorted(g, np.arange(1, len(splits)))
    return [part.tolist() for part in np.split(p, cuts)]


def make_groups(splits: list, flat: FlatIndex, rows: dict, cfg: Config,
                radius: int, adaptive: bool, edges: EdgeJudge | None = None
                ) -> list:
    """_group of each member list, distances to the leads in one call."""
    sizes = np.array([len(m) for m in splits], dtype=np.int64)
    others = np.fromiter((p for m in splits for p in m), np.int64, sizes.sum())
    leads = np.repeat(others[np.cumsum(sizes) - sizes], sizes)
    limit = pair_threshold(radius, flat.detail[leads], flat.detail[others]) \
        if adaptive else radius
    found = flat.match_distances(leads, others, limit)
    cuts = np.cumsum(sizes)[:-1]
    return [_group(m, d.tolist(), w.tolist(), rows, cfg, edges) for m, d, w in
            zip(splits, np.split(found.bits, cuts), np.split(found.code, cuts))]


def _group(members: list, dist: list, which: list, rows: dict,
           cfg: Config, edges: EdgeJudge | None = None) -> Group:
    """members[0] leads and distances are measured to it; the keep rule
    picks the image to keep, also from how each matched the lead."""
    images = [_match(rows[p], cfg.spec.bits, d, w, edges and edges.how(
        members[0], p, int(w))) for p, d, w in zip(members, dist, which)]
    kept, reason = choose_keep([rows[p] for p in members],
                               [m.variant for m in images], cfg)
    images[kept].keep = True
    images[1:] = sorted(images[1:], key=lambda m: (m.distance, m.path))
    return Group(images, reason)


def _reclaimable(group: Group) -> int:
    return sum(m.size for m in group.images if not m.keep)


# ============================================================================
# Operations: move and undo
# ============================================================================

# ---- checking each move against the database and the folders ----

@dataclass
class Move:
    """A move that passed every check: the plan's entry and its stored row."""

    entry: PlanEntry
    row: ImageRow


class Places:
    """The folders a move or undo may touch, resolved once."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.roots = [(r, os.path.realpath(r)) for r in cfg.img_dirs]
        self.tool = [cfg.quarantine_dir, cfg.output_dir, cfg.db_dir, cfg.bk_dir]
        self.quarantine = os.path.abspath(cfg.quarantine_dir)
        self.real_quarantine = os.path.realpath(cfg.quarantine_dir)

    def collection_problem(self, path: str, moving: bool = True) -> str | None:
        """Why `path` is not a place in the collection move may take from
        (moving) or undo put back to, or None."""
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            return "not an absolute, normalised path"
        root = next(((r, real) for r, real in self.roots if _inside(path, r)),
                    None)
        if root is None:
            return "not under img_dirs"
        if any(_inside(path, d) or path == d for d in self.tool):
            return "inside one of the tool's own folders"
        if moving and any(_inside(path, d) for d in self.cfg.protected_dirs):
            return "in a protected folder"
        folder = os.path.dirname(path)
        while not os.path.lexists(folder):  # undo: folders made again later
            folder = os.path.dirname(folder)
        if not _inside(os.path.realpath(folder) + os.sep, root[1]):
            return "reached through a symbolic link that leaves img_dirs"
        return None

    def in_quarantine(self, path: str) -> bool:
        """path lies in quarantine_dir with no symbolic link on the way."""
        if not os.path.isabs(path) or os.path.normpath(path) != path or \
                not _inside(path, self.quarantine):
            return False
        rel = os.path.relpath(path, self.quarantine)
        return os.path.realpath(path) == os.path.join(self.real_quarantine, rel)


def check_moves(plan: Plan, store: HashStore, places: Places) -> list:
    """The plan's moves that are safe to make; the others go to
    plan.failures with the reason.  Nothing is moved here."""
    rows = store.rows_by_path(real_path(e.path) for e in plan.entries)
    staying = set()  # groups with a stored file that stays where it is
    for e in plan.entries:
        row = rows.get(real_path(e.path))
        if e.action != "move" and row is not None and \
                _unchanged(real_path(e.path), row):
            staying.add(e.group)
    moves, seen = [], set()
    for e in plan.entries:
        if e.action != "move":
            continue
        path = real_path(e.path)
        why = "listed twice in the plan" if path in seen else \
            _move_problem(e, path, rows.get(path), places)
        if why is None and e.group not in staying:
            why = (f"group {e.group} would keep no file: mark one of its files "
                   f"'keep'")
        seen.add(path)
        if why:
            plan.failures.append(Failure(path, why))
        else:
            moves.append(Move(e, rows[path]))
    return moves


def _move_problem(e: PlanEntry, path: str, row, places: Places) -> str | None:
    why = places.collection_problem(path)
    if why:
        return why
    if row is None or row.hash is None:
        return "not a stored image (not in the database): run find_duplicates again"
    try:
        st = os.lstat(path)
    except OSError:
        return "no longer exists"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link: move never follows links"
    if not stat.S_ISREG(st.st_mode):
        return "not a plain file"
    if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns) or \
            (e.size, e.mtime_ns) != (row.size, row.mtime_ns):
        return "changed since the plan: run find_duplicates again"
    return None


def _unchanged(path: str, row: ImageRow) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and \
        (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns)


# ---- move and undo ----

@dataclass
class MoveReport(DocumentReport):
    """What move or undo did, file by file."""

    operation: str
    manifest: str
    done: list = field(default_factory=list)     # (from, to) pairs
    skipped: list = field(default_factory=list)  # Failure
    seconds: float = 0.0
    source: str = ""                             # the plan file move read

    def body(self) -> dict:
        return {"manifest": shown(self.manifest) if self.manifest else None,
                "plan": self.source or None,
                "seconds": round(self.seconds, 3),
                "done": [{"from": shown(a), "to": shown(b)}
                         for a, b in self.done],
                "failures": _failures_json(self.skipped)}

    def csv_rows(self) -> Iterator[list]:
        yield ["from", "to", "skipped_because"]
        for a, b in self.done:
            yield [shown(a), shown(b), ""]
        for f in self.skipped:
            yield [shown(f.path), "", f.error]

    def _verb(self) -> str:
        return "moved" if self.operation == "move" else "restored"

    def text_lines(self, verbose: bool = False) -> Iterator[str]:
        for a, b in self.done:
            yield f"{self._verb()} {printable(a)} -> {printable(b)}"
        for f in self.skipped:
            yield f"skipped {printable(f.path)}: {f.error}"

    def summary(self) -> str:
        if not self.manifest:  # undo found no manifest
            return f"{self.operation}: nothing to undo"
        return (f"{self.operation}: {counted(len(self.done), 'file')} "
                f"{self._verb()}, "
                f"{len(self.skipped)} skipped; manifest "
                f"{printable(self.manifest)}")


def quarantine_path(quarantine: str, path: str) -> str:
    """Where a file goes in quarantine: its absolute path mirrored inside."""
    drive, rest = os.path.splitdrive(os.path.abspath(path))
    parts = [quarantine] + ([drive.rstrip(":\\/")] if drive else [])
    return os.path.join(*parts, rest.lstrip("\\/"))


def _free_name(path: str) -> str:
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.lexists(path):
        path, n = f"{stem} ({n}){ext}", n + 1
    return path


def move_summary(moves: list, quarantine: str) -> str:
    size = sum(m.row.size for m in moves)
    groups = len({m.entry.group for m in moves})
    return (f"move: {counted(len(moves), 'file')} ({human_bytes(size)}) "
            f"from {counted(groups, 'group')} into {shown(quarantine)}")


def confirm(run: Run, summary: str, ui: Console) -> None:
    """Go on only if asked: --yes, or 'y' typed on a terminal."""
    if run.yes:
        ui.notice(summary)
        return
    if not (sys.stdin and sys.stdin.isatty()):
        raise ConfigError(f"{summary}: not confirmed. Pass --yes to move "
                          f"without being asked (scripts), or run move in a "
                          f"terminal. Nothing was moved.")
    print(f"{summary}. Move them? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise ReverseSearchError("move: not confirmed; nothing was moved.")


def op_move(run: Run, ui: Console) -> MoveReport:
    """Move the duplicates of the plan into quarantine_dir (undo restores)."""
    cfg, start = run.config, time.monotonic()
    plan, places = read_plan(cfg), Places(cfg)
    if not _store_exists(cfg):
        raise PlanError(f"no database at {cfg.db_name}: run find_duplicates "
                        f"first.")
    manifest = os.path.join(cfg.quarantine_dir, MANIFEST_NAME)
    report = MoveReport("move", manifest, source=plan.source)
    store = _open_store(cfg)
    try:
        moves = check_moves(plan, store, places)
        report.skipped = plan.failures
        if moves:
            confirm(run, move_summary(moves, cfg.quarantine_dir), ui)
            with _run_lock(cfg):
                _open_manifest(manifest)
                _move_all(moves, store, places, manifest, report)
    finally:
        store.close()
    report.seconds = time.monotonic() - start
    return report


def _move_all(moves: list, store: HashStore, places: Places, manifest: str,
              report: MoveReport, batch: int = 200) -> None:
    """Each move in turn; moved files leave the database every `batch`
    files, and at the end even if interrupted."""
    forgotten = 0
    try:
        for m in moves:
            _move_one(m, store, places, manifest, report)
            if len(report.done) - forgotten >= batch:
                store.delete_paths(src for src, _ in report.done[forgotten:])
                forgotten = len(report.done)
    finally:
        if len(report.done) > forgotten:
            store.delete_paths(src for src, _ in report.done[forgotten:])


def _open_manifest(manifest: str) -> None:
    """The manifest must take lines before anything moves."""
    try:
        os.makedirs(os.path.dirname(manifest), exist_ok=True)
        open_append(manifest).close()
    except OSError as exc:
        raise StoreError(f"cannot write the quarantine manifest {manifest}: "
                         f"{exc.strerror} (check quarantine_dir). Nothing was "
                         f"moved.") from None


def _move_one(m: Move, store: HashStore, places: Places, manifest: str,
              report: MoveReport) -> None:
    path = real_path(m.entry.path)
    try:
        if not _unchanged(path, m.row):  # since check_moves, or the prompt
            raise FileRefused("changed since the plan: run find_duplicates "
                              "again")
        sha = sha256_of(path)
        dest = quarantine_path(places.quarantine, path)
        _quarantine_folder(os.path.dirname(dest), places)
        if not _same_bytes(dest, sha):
            dest = _free_name(dest)
        record = {"original": path, "quarantined": dest, "sha256": sha,
                  "size": m.row.size, "mtime_ns": m.row.mtime_ns,
                  "moved_at": _iso(time.time_ns()),
                  "row": _row_record(m.row, store)}
        append_line(manifest, json.dumps(record))  # intent first; ASCII:
        # a name that is not UTF-8 comes back exactly (\udcxx escapes)
        if os.path.lexists(dest):  # an interrupted move got this far before
            sweep_temps(dest)
            os.unlink(path)
        else:
            transfer(path, dest, sha)
    except (OSError, FileRefused) as exc:
        report.skipped.append(Failure(path, _refusal(exc)))
        return
    report.done.append((path, dest))


def _refusal(exc: Exception) -> str:
    """Why one file stayed where it was, in a line."""
    if isinstance(exc, FileRefused):
        return str(exc)
    where = f" ({shown(exc.filename)})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}; the file stays where it was"


def _quarantine_folder(folder: str, places: Places) -> None:
    """Make folder inside the quarantine, never through a link planted there
    (checked before anything is made, and after)."""
    refused = FileRefused("a symbolic link inside quarantine_dir leads out "
                          "of it; the file stays where it was")
    probe = folder
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if _inside(probe, places.quarantine) and not places.in_quarantine(probe):
        raise refused
    os.makedirs(folder, exist_ok=True)
    if not places.in_quarantine(folder):
        raise refused


def _same_bytes(path: str, sha: str) -> bool:
    """path is a plain file with this SHA-256."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode) and sha256_of(path) == sha
    except OSError:
        return False


def _row_record(row: ImageRow, store: HashStore) -> dict:
    """The stored hashes of a moved file, for undo to put back unhashed."""
    meta = store.meta()
    return {"kind": meta.get("hash_kind"), "bits": int(meta.get("hash_bits", 0)),
            "hash": format(row.hash, "x"), "width": row.width,
            "height": row.height, "low_detail": row.low_detail,
            "detail": row.detail, "traits": row.traits,
            "variants": row.extra.hex() if row.extra else None}


def _row_from_record(rec: dict, path: str, kind: str | None, bits: int):
    """The ImageRow a restored file had, or None (then update hashes it)."""
    r = rec.get("row")
    try:
        if r["kind"] != kind or int(r["bits"]) != bits:
            return None
        st = os.lstat(path)
        return ImageRow(path, st.st_size, st.st_mtime_ns,
                        bytes.fromhex(rec["sha256"])[:16], int(r["hash"], 16),
                        int(r["width"]), int(r["height"]), None,
                        extra=bytes.fromhex(r["variants"]) if r["variants"]
                        else None, low_detail=bool(r["low_detail"]),
                        detail=float(r["detail"]), traits=r.get("traits"))
    except (KeyError, TypeError, ValueError, OSError):
        return None


def op_undo(run: Run, ui: Console) -> MoveReport:
    """Put every file of the quarantine manifest back, checked by SHA-256."""
    cfg, start = run.config, time.monotonic()
    manifest = os.path.join(cfg.quarantine_dir, MANIFEST_NAME)
    report = MoveReport("undo", manifest)
    if not os.path.lexists(manifest):
        ui.notice(_nothing_to_undo(cfg.quarantine_dir))
        report.manifest = ""  # there is none: the summary says so
        return report
    with _run_lock(cfg):
        lines = _manifest_lines(manifest)
        store = _open_store(cfg) if _store_exists(cfg) else None
        rows = []  # filled as files come back, stored even if interrupted
        places = Places(cfg)
        try:
            keep = _undo_lines(lines, places, report, rows, store)
        finally:
            if store is not None:
                _store_rows(store, rows, cfg)
                store.close()
            _prune_mirrored(places.quarantine, [src for src, _ in report.done])
        report.manifest = _finish_manifest(manifest, keep)
    if report.manifest != manifest:
        ui.notice(f"undo: everything is back; the manifest is kept as "
                  f"{shown(report.manifest)}, a record of what moved and "
                  f"came back.")
    if len(rows) < len(report.done):
        ui.notice("run update to index the restored files again.")
    report.seconds = time.monotonic() - start
    return report


def _nothing_to_undo(quarantine: str) -> str:
    """Why undo has nothing to do: everything is back, or nothing moved."""
    done = sorted(_undone_manifests(quarantine))
    if done:
        return (f"nothing to undo: everything moved to {shown(quarantine)} is "
                f"back (the last undo kept its manifest as "
                f"{shown(done[-1])}).")
    return (f"nothing to undo: move has not put anything in "
            f"{shown(quarantine)} (quarantine_dir).")


def _undone_manifests(quarantine: str) -> list:
    """The manifests of finished undos (manifest-undone-DATE.jsonl)."""
    stem, ext = os.path.splitext(MANIFEST_NAME)
    try:
        names = os.listdir(quarantine)
    except OSError:
        return []
    return [os.path.join(quarantine, n) for n in names
            if n.startswith(stem + "-undone-") and n.endswith(ext)]


def _prune_mirrored(quarantine: str, moved_from: list) -> None:
    """Remove the folders move made in the quarantine for the files just
    restored, once empty: from each file's folder up to (not including)
    quarantine_dir.  rmdir removes only empty folders, never through a
    link, so anything put there since stays."""
    top = os.path.abspath(quarantine)
    for path in moved_from:
        folder = os.path.dirname(os.path.abspath(path))
        while folder != top and _inside(folder, top):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or not a folder): so are its parents
                break
            folder = os.path.dirname(folder)


def _undo_lines(lines: list, places: Places, report: MoveReport, rows: list,
                store) -> list:
    """Restore the files of the manifest's lines, newest first; the rows of
    the restored files go to `rows`.  Returns the lines to keep."""
    kind = store.hash_kind() if store else None
    bits = int(store.meta().get("hash_bits", 0)) if store else 0
    keep = []
    for n, line in reversed(lines):
        rec, why = _manifest_record(line, n, places)
        if rec is not None:
            before = len(report.done)
            why = _undo_one(rec, report)
            if len(report.done) > before:  # back now, its bytes checked
                row = _row_from_record(rec, rec["original"], kind, bits)
                rows += [row] if row else []
        if why:
            where = rec["quarantined"] if rec else f"{report.manifest} line {n}"
            report.skipped.append(Failure(where, why))
            keep.append(line)
    return list(reversed(keep))


def _store_rows(store: HashStore, rows: list, cfg: Config) -> None:
    if rows:
        store.use_roots(cfg.img_dirs)
        store.upsert(rows, int(store.meta().get("hash_bits", 0)))


def _manifest_lines(manifest: str) -> list:
    """(line number, text) of each line; never read through a link."""
    if os.path.islink(manifest) or not os.path.isfile(manifest):
        raise StoreError(f"{manifest} is not a plain file (a symbolic link?); "
                         f"the tool never reads or writes through one. Move it "
                         f"away.")
    try:
        with open(manifest, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise StoreError(f"cannot read {manifest}: {exc.strerror}.") from None
    text = data.decode("utf-8", "surrogateescape")
    return [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _manifest_record(line: str, n: int, places: Places) -> tuple:
    """(record, None) for a line that describes a move this tool makes,
    else (None, why): a damaged or crafted line restores nothing."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None, "damaged line (not JSON); left in the manifest"
    if not isinstance(rec, dict) or not all(
            isinstance(rec.get(k), str) for k in ("original", "quarantined",
                                                  "sha256")) or \
            not re.fullmatch(r"[0-9a-f]{64}", rec["sha256"]):
        return None, "not a move record; left in the manifest"
    src, dst = rec["quarantined"], rec["original"]
    why = places.collection_problem(dst, moving=False)
    if why:
        return None, f"its original place is {why}; left in quarantine"
    if not places.in_quarantine(src) or not _mirrors(src, dst, places):
        return None, ("not where move puts a file from "
                      f"{shown(dst)}; left where it is")
    return rec, None


def _mirrors(src: str, dst: str, places: Places) -> bool:
    """src is dst's place in quarantine, or that name with a ' (n)' added."""
    stem, ext = os.path.splitext(quarantine_path(places.quarantine, dst))
    return src == stem + ext or re.fullmatch(
        re.escape(stem) + r" \(\d+\)" + re.escape(ext), src) is not None


def _undo_one(rec: dict, report: MoveReport) -> str | None:
    """Restore one file; None when it is back (or never left), else why not."""
    src, dst, sha = rec["quarantined"], rec["original"], rec["sha256"]
    try:
        st = os.lstat(src)
    except OSError:
        return None if os.path.lexists(dst) else "missing from the quarantine"
    if not stat.S_ISREG(st.st_mode):
        return "not a plain file in the quarantine; left there"
    try:
        replace = False
        if os.path.lexists(dst):
            if _same_bytes(dst, sha):  # restored before, source not yet gone
                os.unlink(src)
                report.done.append((src, dst))
                return None
            if not _partial_copy(dst, src):
                return f"a file now exists at {shown(dst)}; left in quarantine"
            replace = True  # a half copy an interrupted run left: replaced
        if sha256_of(src) != sha:
            return "changed while in quarantine; left there"
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        transfer(src, dst, sha, replace=replace)
    except (OSError, FileRefused) as exc:
        return _refusal(exc)
    report.done.append((src, dst))
    return None


def _partial_copy(path: str, whole: str) -> bool:
    """path is a plain file holding the start of `whole`, and shorter: what
    an interrupted copy straight into place leaves (earlier versions)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size >= os.path.getsize(whole):
            return False
        with open(path, "rb") as a, open(whole, "rb") as b:
            while block := a.read(_COPY_BLOCK):
                if b.read(len(block)) != block:
                    return False
        return True
    except OSError:
        return False


def _finish_manifest(manifest: str, remaining: list) -> str:
    """Keep only what is still in quarantine (and lines that could not be
    used, as they were); archive a finished manifest.  Returns where the
    manifest now is."""
    if remaining:
        _atomic_write(manifest, lambda fh: fh.write(
            "".join(line + "\n" for line in remaining).encode(
                "utf-8", "surrogateescape")), binary=True, sync=True)
        return manifest
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archived = _free_name(manifest.replace(".jsonl", f"-undone-{stamp}.jsonl"))
    place_new(manifest, archived)  # never over another file
    return archived


# ============================================================================
# Operations: export
# ============================================================================

@dataclass
class ExportReport(Report):
    """Every stored row, streamed: a million rows never sit in memory."""

    database: str
    hash_kind: str
    store: HashStore  # rows are streamed from it while writing, then it is closed
    bits: int

    def publish(self, run: Run, ui: Console) -> list:
        try:
            return write_export(self, run.config, sys.stdout)
        finally:
            self.store.close()


def op_export(run: Run, ui: Console) -> ExportReport:
    """Every stored file with its hash, size, dimensions, mtime and error."""
    cfg = run.config
    if not _store_exists(cfg):
        raise ConfigError(f"export: no database at {cfg.db_name}; run build "
                          f"first (or check db_dir).")
    store = _open_store(cfg)
    kind = store.hash_kind() or cfg.spec.kind
    bits = int(store.meta().get("hash_bits", cfg.spec.bits))
    return ExportReport(cfg.db_name, kind, store, bits)


# ============================================================================
# Review
# ============================================================================
#
# `review` serves one page from a ReviewServer (the standard library's
# ThreadingHTTPServer: nothing to bundle) and answers it from a
# ReviewSession, which holds the groups of find_duplicates, the user's keep
# choices and the image ids the page may ask for.  The page acts only through
# the functions the command line uses: write_plan + op_move for apply,
# op_undo for undo, the not_duplicates CSV for "not a duplicate", op_search
# for a dropped image.
#
# Security model (the server runs on the user's machine, beside their files):
# - bound to 127.0.0.1 only, on review_port (0: a free port);
# - a random token per run (secrets.token_urlsafe, 32 bytes) in the first
#   URL; the page then sends it in a header, and a cookie (SameSite=Strict,
#   HttpOnly, named by port) carries it for <img> requests; every request
#   without it is refused (403);
# - the Host header must name 127.0.0.1 or localhost with our port (no DNS
#   rebinding); an Origin or Sec-Fetch-Site from another site is refused (no
#   requests from other tabs); every change is a POST that must carry the
#   token header and our Origin;
# - images are served by id only: ids are handed out for paths read from the
#   database in this run, never taken from a request; nothing else on disk is
#   reachable (no static folder);
# - names reach the page as JSON data and are put in with textContent, never
#   as HTML; the page's Content-Security-Policy allows only its own inline
#   script (by nonce) and connections to itself, so nothing is fetched from
#   the internet.

REVIEW_PAGE_SIZE = 20       # groups per page: quick even with 10,000 groups
REVIEW_THUMB_PX = 200       # thumbnails on the cards
REVIEW_FILES = "review_files"  # thumbnail cache inside output_dir
REVIEW_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                  "WEBP": "image/webp", "BMP": "image/bmp"}  # sent as they are
# Above MAP_MOST images the map shows an even sample: t-SNE took 26 s for
# 500 and 33 s for 1,000 images on the shared 2-core machine
# (bench/bench_review.py), growing about linearly from there.
MAP_MOST = 2000


class ReviewRefused(ReverseSearchError):
    """A request the review server refuses: status and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _QuietConsole(Console):
    """Notices of the operations review runs, kept for the page to show."""

    def __init__(self, echo: Console):
        super().__init__(True)
        self.echo, self.said = echo, []

    def notice(self, text: str) -> None:
        self.said.append(text)
        self.echo.notice(text)


class ReviewSession:
    """What the page works on: groups, the user's choices, served ids."""

    def __init__(self, run: Run, ui: Console):
        import threading
        self.run, self.cfg, self.ui = run, run.config, ui
        self.lock = threading.RLock()
        self.paths: list = []      # id -> path, only paths read from the database
        self.ids: dict = {}        # path -> id
        self.revoked: set = set()  # ids of files moved away
        self.groups: list = []     # Group, as find_duplicates orders them
        self.chosen: dict = {}     # path -> True (keep) / False (move): the user's
        self.report = None
        self.map = None
        self.thumbs = os.path.join(self.cfg.output_dir, REVIEW_FILES)
        self.uploads = None        # temporary folder for dropped images
        self._plan = None          # (choices it was made for, plan entries)

    # ---- ids: the only way the page names a file ----

    def id_of(self, path: str) -> int:
        if path not in self.ids:
            self.ids[path] = len(self.paths)
            self.paths.append(path)
        self.revoked.discard(self.ids[path])
        return self.ids[path]

    def path_of(self, text) -> str:
        try:
            n = int(text)
        except (TypeError, ValueError):
            raise ReviewRefused(404, "no such image") from None
        if not 0 <= n < len(self.paths) or n in self.revoked:
            raise ReviewRefused(404, "no such image")
        return self.paths[n]

    # ---- groups ----

    def refresh(self) -> None:
        """find_duplicates again (after a change), and its result files."""
        with self.lock:
            ui = _QuietConsole(self.ui)
            run = dataclasses.replace(self.run, quiet=True)
            run.config = dataclasses.replace(self.cfg, operation="find_duplicates")
            run.config.sources = self.cfg.sources
            report = op_find_duplicates(run, ui)
            write_results(report, run.config, report.document(run.config))
            self.use(report)

    def use(self, report: DuplicatesReport) -> None:
        """Groups of a find_duplicates run whose result files are written."""
        with self.lock:
            self.report, self.groups = report, report.groups
            self.map = None

    def keeps(self, g: Group) -> list:
        """Keep (True) or move (False) for each image: the user's choice,
        else the keep rule's."""
        return [self.chosen.get(m.path, m.keep) for m in g.images]

    def page(self, number: int, size: int = REVIEW_PAGE_SIZE) -> dict:
        with self.lock:
            pages = max(1, -(-len(self.groups) // size))
            number = min(max(number, 1), pages)
            first = (number - 1) * size
            cards = [self.card(k) for k in range(first, min(first + size, len(self.groups)))]
            moving = self.plan_entries()
            return {"page": number, "pages": pages, "size": size,
                    "total": len(self.groups), "groups": cards,
                    "images": self.report.images if self.report else 0,
                    "bits": self.cfg.spec.bits,
                    "threshold": self.cfg.distance_threshold,
                    "to_move": sum(e.action == "move" for e in moving),
                    "reclaim": sum(e.size for e in moving if e.action == "move"),
                    "chosen": len(self.chosen),
                    "quarantined": self.quarantined()}

    def card(self, n: int) -> dict:
        g = self.groups[n]
        keeps = self.keeps(g)
        items = []
        for m, keep in zip(g.images, keeps):
            folder, name = os.path.split(shown(m.path))
            user = m.path in self.chosen
            items.append({
                "id": self.id_of(m.path), "name": name, "folder": folder,
                "size": m.size, "w": m.width, "h": m.height,
                "date": _iso(m.mtime_ns).replace("T", " "),
                "dist": m.distance, "how": _how_shown(m),
                "keep": keep, "protected": self.protected(m.path),
                "reason": ("your choice" if user else
                           g.keep_reason or "kept by keep_rule" if keep else "")})
        return {"n": n + 1, "items": items,
                "reclaim": sum(m.size for m, k in zip(g.images, keeps) if not k)}

    def protected(self, path: str) -> bool:
        return any(_inside(path, d) for d in self.cfg.protected_dirs)

    def toggle_keep(self, n: int, image: str) -> dict:
        with self.lock:
            g = self.group(n)
            path = self.path_of(image)
            at = next((k for k, m in enumerate(g.images) if m.path == path), None)
            if at is None:
                raise ReviewRefused(400, "that image is not in this group")
            keeps = self.keeps(g)
            keeps[at] = not keeps[at]
            if not any(keeps):
                raise ReviewRefused(409, "a group keeps at least one image: "
                                         "choose another to keep first")
            for m, keep in zip(g.images, keeps):
                if keep != m.keep:
                    self.chosen[m.path] = keep
                else:
                    self.chosen.pop(m.path, None)
            return self.card(n)

    def group(self, n) -> Group:
        try:
            return self.groups[int(n)]
        except (TypeError, ValueError, IndexError):
            raise ReviewRefused(404, "no such group (run again?)") from None

    # ---- not a duplicate ----

    def not_duplicate(self, n: int, images: list) -> None:
        """Mark a pair, or one image against the rest of its group, as
        different pictures: saved to not_duplicates, honoured by every run."""
        with self.lock:
            g = self.group(n)
            chosen = [self.path_of(i) for i in images]
            members = [m.path for m in g.images]
            if not chosen or len(chosen) > 2 or \
                    any(p not in members for p in chosen):
                raise ReviewRefused(400, "mark one or two images of the group")
            others = chosen[1:] or [p for p in members if p != chosen[0]]
            add_not_duplicates(self.cfg, [(chosen[0], p) for p in others
                                          if p != chosen[0]])
            self.refresh()

    # ---- apply and undo ----

    def plan_entries(self) -> list:
        """The plan move would follow: the rule's, with the user's choices
        (kept until the next change: 0.1 s for 10,000 groups)."""
        if self.report is None:
            return []
        key = (id(self.report), tuple(sorted(self.chosen.items())))
        if self._plan is None or self._plan[0] != key:
            self._plan = key, self._make_plan_entries()
        return self._plan[1]

    def _make_plan_entries(self) -> list:
        entries = make_plan(self.report, self.cfg)
        by_path = {}
        for g in self.groups:
            for m, keep in zip(g.images, self.keeps(g)):
                by_path[m.path] = keep
        for e in entries:
            if by_path.get(e.path) and e.action != "keep":
                e.action, e.reason = "keep", "chosen on the review page"
            elif by_path.get(e.path) is False and e.action == "keep":
                e.action, e.reason = "move", "chosen on the review page"
                if self.protected(e.path):
                    e.action, e.reason = "protected", "in a protected folder"
        return entries

    def apply_summary(self) -> dict:
        with self.lock:
            moving = [e for e in self.plan_entries() if e.action == "move"]
            return {"files": len(moving),
                    "bytes": sum(e.size for e in moving),
                    "human": human_bytes(sum(e.size for e in moving)),
                    "groups": len({e.group for e in moving}),
                    "chosen": len(self.chosen),
                    "quarantine": shown(os.path.abspath(self.cfg.quarantine_dir))}

    def apply(self, expected: int) -> dict:
        """Move what the plan says through move's own code and manifest."""
        with self.lock:
            entries = self.plan_entries()
            moving = sum(e.action == "move" for e in entries)
            if moving != expected:
                raise ReviewRefused(409, f"the plan changed ({moving} files to "
                                         f"move, not {expected}); look again")
            cfg = dataclasses.replace(self.cfg, operation="move")
            cfg.sources = self.cfg.sources
            write_plan(entries, cfg)
            report = _move_planned(self.run, cfg, _QuietConsole(self.ui))
            for src, _ in report.done:
                self.revoked.add(self.ids.get(src, -1))
                self.chosen.pop(src, None)
            self.refresh()
            return _move_json(report)

    def undo(self) -> dict:
        with self.lock:
            cfg = dataclasses.replace(self.cfg, operation="undo")
            cfg.sources = self.cfg.sources
            ui = _QuietConsole(self.ui)
            report = op_undo(dataclasses.replace(self.run, config=cfg), ui)
            if report.done and "run update" in " ".join(ui.said):
                update_store(dataclasses.replace(cfg, operation="update"), ui)
            self.refresh()
            return _move_json(report)

    def quarantined(self) -> int:
        """Files the manifest says are in quarantine (what undo restores)."""
        manifest = os.path.join(self.cfg.quarantine_dir, MANIFEST_NAME)
        try:
            with open(manifest, "rb") as fh:
                return sum(1 for line in fh if line.strip())
        except OSError:
            return 0

    # ---- search ----

    def search(self, data: bytes | None, path: str | None, name: str) -> dict:
        """Matches of a dropped image (bytes) or of an image file on disk."""
        import tempfile
        if data is not None:
            with self.lock:
                if self.uploads is None:
                    self.uploads = tempfile.mkdtemp(prefix="reverse_search-")
            suffix = os.path.splitext(name)[1].lower()
            if not re.fullmatch(r"\.[a-z0-9]{1,5}", suffix):
                suffix = ".img"
            path = os.path.join(self.uploads, f"dropped-{uuid.uuid4().hex}{suffix}")
            _atomic_write(path, lambda fh: fh.write(data), binary=True)
        elif not path or not os.path.isfile(path):
            raise ReviewRefused(400, f"not an image file: {shown(path or '')}")
        try:
            cfg = dataclasses.replace(self.cfg, operation="search",
                                      stop_on_first_match=False)
            cfg.sources = self.cfg.sources
            report = op_search(Run(cfg, [path], True),
                               _QuietConsole(self.ui))
        finally:
            if data is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        q = report.queries[0]
        with self.lock:
            group_of = {m.path: n for n, g in enumerate(self.groups)
                        for m in g.images}
            matches = [{"id": self.id_of(m.path),
                        "name": os.path.basename(shown(m.path)),
                        "folder": os.path.dirname(shown(m.path)),
                        "dist": m.distance, "how": _how_shown(m),
                        "w": m.width, "h": m.height, "size": m.size,
                        "group": group_of.get(m.path)} for m in q.matches]
        return {"query": name or shown(path), "error": q.error,
                "matches": matches, "bits": self.cfg.spec.bits,
                "images": report.images}

    def close(self) -> None:
        if self.uploads:
            import shutil
            shutil.rmtree(self.uploads, ignore_errors=True)

    # ---- map ----

    def collection_map(self) -> dict:
        with self.lock:
            if self.map is None:
                self.map = self._make_map()
            return self.map

    def _make_map(self) -> dict:
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            return {"error": "The map needs scikit-learn, which is not "
                             "installed: pip install scikit-learn (see README)."}
        store = _open_store(self.cfg)
        try:
            flat = load_index(self.cfg, store, _QuietConsole(self.ui))
            total = len(flat.ids)
            pick = np.arange(total)
            if total > MAP_MOST:  # an even sample keeps the map quick
                pick = np.random.default_rng(0).choice(total, MAP_MOST,
                                                       replace=False)
                pick.sort()
            rows = store.rows_by_id(int(flat.ids[p]) for p in pick)
        finally:
            store.close()
        if len(pick) < 5:
            return {"error": f"Too few images for a map ({len(pick)})."}
        # Bits of the main and centre hashes as 0/1 features: Euclidean
        # distance between them is the square root of the Hamming distance,
        # so neighbours are the same and t-SNE's fastest path applies.
        words = flat.hashes[pick]
        if flat.centres.size:
            words = np.concatenate([words, flat.centres[pick].reshape(
                len(pick), -1)], axis=1)
        bits = np.unpackbits(words.astype(">u8").view(np.uint8), axis=1)
        xy = TSNE(2, perplexity=min(30.0, (len(pick) - 1) / 3), init="pca",
                  random_state=0, max_iter=500).fit_transform(
            bits.astype(np.float32))
        xy = (xy - xy.min(axis=0)) / np.maximum(np.ptp(xy, axis=0), 1e-9)
        group_of = {m.path: n for n, g in enumerate(self.groups)
                    for m in g.images}
        points = []
        for p, (x, y) in zip(pick.tolist(), xy.tolist()):
            row = rows.get(int(flat.ids[p]))
            if row is not None:
                points.append([self.id_of(row.path), round(x, 4), round(y, 4),
                               group_of.get(row.path, -1)])
        return {"points": points, "total": total, "shown": len(points),
                "sampled": total > MAP_MOST}


def _how_shown(m: Match) -> str:
    return m.how.text() if m.how else m.variant or "whole hash"


def _move_planned(run: Run, cfg: Config, ui: Console) -> MoveReport:
    """move, as the command line runs it, on the plan just written; the
    page has asked for the confirmation already."""
    return op_move(dataclasses.replace(run, config=cfg, yes=True, quiet=True), ui)


def _move_json(report: MoveReport) -> dict:
    return {"operation": report.operation, "summary": report.summary(),
            "done": [[shown(a), shown(b)] for a, b in report.done],
            "skipped": [[shown(f.path), f.error] for f in report.skipped]}


def add_not_duplicates(cfg: Config, pairs: list) -> None:
    """Add path pairs to the not_duplicates CSV (the file made afresh)."""
    path = cfg.not_duplicates
    old = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8-sig", newline="") as fh:
            old = fh.read()
    if old and not old.endswith("\n"):
        old += "\n"
    if not old:
        old = "path_a,path_b\n"
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        [os.path.abspath(a), os.path.abspath(b)] for a, b in pairs)
    try:
        _atomic_write(path, lambda fh: fh.write(old + out.getvalue()))
    except (OSError, UnicodeEncodeError) as exc:
        raise ReviewRefused(500, f"cannot write {path} (key 'not_duplicates'): "
                                 f"{exc}") from None


# ---- the server ----

def _review_handler(session: ReviewSession, token: str, port_of, nonce: str):
    """The request handler class, closed over one session and its token."""
    import http.server
    import secrets
    from urllib.parse import urlsplit, parse_qs

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "reverse_search"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # no access log on the console
            pass

        # ---- checks made before anything is answered ----

        def allowed_hosts(self) -> set:
            port = port_of()
            return {f"127.0.0.1:{port}", f"localhost:{port}"}

        def check(self, post: bool) -> dict:
            host = self.headers.get("Host", "")
            if host not in self.allowed_hosts():
                raise ReviewRefused(403, "wrong Host header")
            origin = self.headers.get("Origin")
            if origin is not None and origin not in {
                    "http://" + h for h in self.allowed_hosts()}:
                raise ReviewRefused(403, "request from another site")
            if self.headers.get("Sec-Fetch-Site", "same-origin") not in (
                    "same-origin", "none"):
                raise ReviewRefused(403, "request from another site")
            query = parse_qs(urlsplit(self.path).query)
            given = self.headers.get("X-Review-Token") or ""
            if not post:
                given = given or (query.get("token") or [""])[0] or \
                    self.cookie_token()
            elif origin is None:
                raise ReviewRefused(403, "a change must come from the page")
            if not given or not secrets.compare_digest(given, token):
                raise ReviewRefused(403, "missing or wrong token: open the "
                                         "address review printed")
            self.server.touch()
            return query

        def cookie_token(self) -> str:
            from http.cookies import SimpleCookie
            jar = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(self.headers.get("Cookie", ""))
            morsel = jar.get(f"rs_review_{port_of()}")
            return morsel.value if morsel else ""

        # ---- answers ----

        def send(self, status: int, body: bytes, kind: str,
                 extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def send_json(self, doc, status: int = 200) -> None:
            self.send(status, json.dumps(doc, ensure_ascii=False).encode(),
                      "application/json; charset=utf-8",
                      {"Cache-Control": "no-store"})

        def handle_one(self, post: bool) -> None:
            try:
                query = self.check(post)
                route = urlsplit(self.path).path
                with self.server.answering():
                    if post:
                        self.do_change(route)
                    else:
                        self.do_read(route, query)
            except ReviewRefused as exc:
                self.send_json({"error": str(exc)}, exc.status)
            except ReverseSearchError as exc:
                self.send_json({"error": str(exc)}, 409)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # the page shows it; the server goes on
                self.send_json({"error": f"{type(exc).__name__}: {exc}"}, 500)

        def do_GET(self):
            self.handle_one(False)

        def do_HEAD(self):
            self.handle_one(False)

        def do_POST(self):
            self.handle_one(True)

        def do_read(self, route: str, query: dict) -> None:
            arg = lambda k, d="": (query.get(k) or [d])[0]  # noqa: E731
            if route == "/":
                cookie = (f"rs_review_{port_of()}={token}; Path=/; HttpOnly; "
                          f"SameSite=Strict")
                self.send(200, review_page(token, nonce).encode(),
                          "text/html; charset=utf-8",
                          {"Set-Cookie": cookie, "Cache-Control": "no-store",
                           "Content-Security-Policy": REVIEW_CSP % nonce})
            elif route == "/api/groups":
                self.send_json(session.page(_int(arg("page", "1"))))
            elif route == "/api/group":
                n = _int(arg("n"), -1)
                session.group(n)
                self.send_json(session.card(n))
            elif route == "/api/apply":
                self.send_json(session.apply_summary())
            elif route == "/api/map":
                self.send_json(session.collection_map())
            elif route.startswith("/thumb/"):
                self.send_image(session.path_of(route[7:]), thumb=True)
            elif route.startswith("/image/"):
                self.send_image(session.path_of(route[7:]), thumb=False)
            else:
                raise ReviewRefused(404, "not found")

        def do_change(self, route: str) -> None:
            length = _int(self.headers.get("Content-Length", "0"), 0)
            limit = session.cfg.max_file_mb << 20
            if length < 0 or length > limit:
                raise ReviewRefused(413, "too large")
            data = self.rfile.read(length) if length else b""
            kind = self.headers.get("Content-Type", "")
            if route == "/api/search" and not kind.startswith("application/json"):
                name = unquote(self.headers.get("X-File-Name", "dropped image"))
                self.send_json(session.search(data, None, name))
                return
            try:
                body = json.loads(data or b"{}")
            except ValueError:
                raise ReviewRefused(400, "not JSON") from None
            if not isinstance(body, dict):
                raise ReviewRefused(400, "not a JSON object")
            if route == "/api/keep":
                self.send_json(session.toggle_keep(_int(body.get("group"), -1),
                                                   body.get("image")))
            elif route == "/api/not-duplicate":
                session.not_duplicate(_int(body.get("group"), -1),
                                      list(body.get("images") or []))
                self.send_json({"ok": True})
            elif route == "/api/apply":
                self.send_json(session.apply(_int(body.get("files"), -1)))
            elif route == "/api/undo":
                self.send_json(session.undo())
            elif route == "/api/stop":  # Done: no console to press Ctrl-C in
                self.send_json({"ok": True})
                self.server.stop("done on the page")
            elif route == "/api/search":
                path = body.get("path")
                self.send_json(session.search(None, path if isinstance(
                    path, str) else None, ""))
            else:
                raise ReviewRefused(404, "not found")

        def send_image(self, path: str, thumb: bool) -> None:
            cfg = session.cfg
            if thumb:
                own_folder(session.thumbs)
                info = thumbnail(path, session.thumbs, REVIEW_THUMB_PX,
                                 cfg.max_image_pixels)
                if info["thumb"] == PLACEHOLDER_NAME:
                    placeholder(session.thumbs, REVIEW_THUMB_PX)
                with open(os.path.join(session.thumbs, info["thumb"]), "rb") as fh:
                    body = fh.read()
                kind = "image/png" if info["thumb"] == PLACEHOLDER_NAME \
                    else "image/jpeg"
            else:
                body, kind = full_image(path, cfg.max_image_pixels)
            self.send(200, body, kind, {"Cache-Control": "private, max-age=300"})

    return Handler


def _int(text, default: int = 0) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def full_image(path: str, max_pixels: int) -> tuple:
    """(bytes, content type) of an image at full size: the file itself when
    a browser shows its format, else a PNG made from it."""
    from PIL import Image
    _setup_decoders()
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ReviewRefused(422, "larger than max_image_pixels")
            if im.format in REVIEW_FORMATS:
                with open(path, "rb") as fh:
                    return fh.read(), REVIEW_FORMATS[im.format]
            im.seek(0)
            out = io.BytesIO()
            to_8bit(im).save(out, "PNG")
            return out.getvalue(), "image/png"
    except (OSError, ValueError, SyntaxError) as exc:
        raise ReviewRefused(404, f"cannot read the image: {exc}") from None


class ReviewServer:
    """127.0.0.1 only; stops on Ctrl-C or after review_idle_minutes."""

    def __init__(self, session: ReviewSession, port: int, idle: float):
        import http.server
        import secrets
        import threading
        self.token = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(16)
        handler = _review_handler(session, self.token, lambda: self.port, nonce)
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                                         handler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(
                f"review_port {port} is in use on 127.0.0.1: another review "
                f"may still be running (press Done on its page; it also stops "
                f"after review_idle_minutes), or set review_port to 0 for a "
                f"free port each run.") from None
        self.httpd.daemon_threads = True
        self.httpd.touch, self.httpd.stop = self.touch, self.stop
        self.httpd.answering = self.answering
        self.port = self.httpd.server_address[1]
        self.idle, self.last = idle, time.monotonic()
        self.busy, self.busy_lock = 0, threading.Lock()  # requests answered now
        self.why = "idle"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    def touch(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def answering(self):
        """While a request is answered the server is not idle, however long
        the answer takes (the map of a large collection, a frozen
        executable's first import of scikit-learn); quiet starts when the
        last answer has gone."""
        with self.busy_lock:
            self.busy += 1
        try:
            yield
        finally:
            with self.busy_lock:
                self.busy -= 1
                self.touch()

    def stop(self, why: str) -> None:
        """Stop serving (from a request's thread: serve_forever must not
        be waited for by the thread it runs in)."""
        import threading
        self.why = why
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def serve(self) -> str:
        """Serve until Ctrl-C, Done on the page or idle; returns why it
        stopped."""
        import threading

        def watch():
            while self.busy or time.monotonic() - self.last < self.idle:
                time.sleep(min(1.0, self.idle / 10))
            self.httpd.shutdown()
        threading.Thread(target=watch, daemon=True).start()
        try:
            self.httpd.serve_forever(poll_interval=0.25)
        except KeyboardInterrupt:
            self.why = "Ctrl-C"
        finally:
            self.httpd.server_close()
        return self.why


def op_review(run: Run, ui: Console) -> None:
    """Serve the review page until Ctrl-C or review_idle_minutes of quiet;
    what was done is in the quarantine manifest and not_duplicates."""
    serve_review(run, ui)


def serve_review(run: Run, ui: Console,
                 found: DuplicatesReport | None = None) -> None:
    """review; found: the groups of a find_duplicates just run (its files
    written), else it runs one first."""
    cfg, start = run.config, time.monotonic()
    session = ReviewSession(run, ui)
    if found is None:
        ui.notice("review: finding duplicates first ...")
        session.refresh()
    else:
        session.use(found)
    server = ReviewServer(session, cfg.review_port,
                          cfg.review_idle_minutes * 60)
    print(f"review: {server.url}", flush=True)
    ui.notice(f"review: {len(session.groups)} groups; stops on Done, after "
              f"{cfg.review_idle_minutes:g} idle minutes or on Ctrl-C.")
    if run.open_report:
        open_in_browser(server.url)
    try:
        stopped = server.serve()
    finally:
        session.close()
    ui.notice(f"review: stopped ({stopped}) after "
              f"{(time.monotonic() - start) / 60:.1f} minutes.")


def review_page(token: str, nonce: str) -> str:
    parts = {"TOKEN": _script_json(token), "NONCE": nonce}
    return re.sub(r"@(TOKEN|NONCE)@", lambda m: parts[m.group(1)],
                  REVIEW_TEMPLATE)


REVIEW_CSP = ("default-src 'none'; script-src 'nonce-%s'; style-src "
              "'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ============================================================================
# Command line
# ============================================================================

OPERATION_HELP = {
    "build": "hash every image under img_dirs into a new database",
    "update": "hash new and changed files, forget deleted ones, report "
              "renamed and moved files",
    "search": "find each query image (files or folders given, else "
              "input_dir) in the collection",
    "find_duplicates": "group the copies of each picture and write a plan "
                       "(plan.json, plan.csv) of which file to keep",
    "move": "move the files the plan marks 'move' into quarantine_dir",
    "undo": "put every quarantined file back where it was",
    "review": "open a local page to look at the duplicate groups, choose "
              "what to keep, mark pictures that are not duplicates, move to "
              "quarantine and undo, search by dropping an image, and see a "
              "map of the collection",
    "export": "print every stored file with its hash, size and dimensions",
}

# The operations that read each key (help shows an operation only the keys
# it reads); a key not listed here is read by every operation.
_HASHING_OPS = ("build", "update", "search", "find_duplicates", "review")
_MATCHING_OPS = ("search", "find_duplicates", "review")
KEY_USERS = dict(
    dict.fromkeys(("hash_method", "hash_size", "colorhash_binbits", "hash_mode",
                   "match_orientations", "centre_hashes", "trim_borders",
                   "extensions", "follow_symlinks", "max_image_pixels",
                   "max_file_mb", "max_decode_mb", "workers", "bk_dir",
                   "content_box", "region_windows"), _HASHING_OPS),
    **dict.fromkeys(("distance_method", "distance_threshold",
                     "adaptive_threshold", "engine", "not_duplicates",
                     "html_report", "matching"), _MATCHING_OPS),
    input_dir=("search",), stop_on_first_match=("search",),
    grouping=("find_duplicates", "review"), keep_rule=("find_duplicates", "review"),
    protected_dirs=("find_duplicates", "move", "review"),
    quarantine_dir=("find_duplicates", "move", "undo", "review"),
    review_port=("review",), review_idle_minutes=("review",))

# What a list flag's values are, for the help ("--img-dirs FOLDER...").
LIST_METAVARS = {"extensions": "EXT", "keep_rule": "CRITERION"}
FLAG_METAVARS = {"not_duplicates": "FILE", "distance_threshold": "BITS",
                 "colorhash_binbits": "BITS", "workers": "N",
                 "lock_timeout": "SECONDS", "database_url": "URL"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"command line: {message} (see "
                          f"'{self.prog} --help').")


class _HelpFormatter(argparse.HelpFormatter):
    """Lists as FOLDER... rather than argparse's [FOLDER ...]."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _format_args(self, action, default_metavar):
        if action.nargs == "*":
            return "%s..." % self._metavar_formatter(action, default_metavar)(1)
        return super()._format_args(action, default_metavar)


def program_name() -> str:
    return os.path.basename(sys.argv[0]) if getattr(sys, "frozen", False) \
        else "reverse_search.py"


def build_parser(operation: str | None = None) -> argparse.ArgumentParser:
    """The parser of one operation (its help lists only the keys it reads),
    or of all of them.  Every flag is accepted with every operation."""
    name = program_name()
    queries = " [QUERY...]" if operation in (None, "search") else ""
    p = _Parser(
        prog=f"{name} {operation}" if operation else name,
        usage=f"{name} {operation or '[OPERATION]'}{queries} [--flag VALUE...]",
        description=OPERATION_HELP.get(operation, "") + (
            ". Settings come from params.json; a flag overrides its key for "
            "this run." if operation else ""),
        formatter_class=_HelpFormatter, add_help=False)
    p.add_argument("operation", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("queries", nargs="*", metavar="QUERY",
                   help="image files or folders to look for (default: "
                        "input_dir)" if operation == "search" else
                   argparse.SUPPRESS)
    general = p.add_argument_group("options")
    general.add_argument("-h", "--help", action="store_true",
                         help="show this help")
    general.add_argument("--params", metavar="FILE",
                         help=f"settings file (default: {PARAMS_NAME} beside "
                              f"the program; created on first run)")
    general.add_argument("--format", dest="output_format", choices=FORMATS,
                         default=None, metavar="FORMAT", help="what is printed: " +
                         ", ".join(FORMATS) + " (same as --output-format)")
    general.add_argument("-q", "--quiet", action="store_true",
                         help="print only results and errors")
    general.add_argument("-v", "--verbose", action="store_true",
                         help="list every file added, changed, renamed and "
                              "removed" if operation in (None, "update")
                         else argparse.SUPPRESS)
    general.add_argument("--debug", action="store_true",
                         help="show a traceback on unexpected errors")
    general.add_argument("--open", action=argparse.BooleanOptionalAction,
                         dest="open_report", default=None,
                         help="open the review page in the browser (default); "
                         "--no-open leaves the browser alone (scripts)"
                         if operation == "review" else
                         "open the HTML report in the browser afterwards"
                         if operation in (None,) + _MATCHING_OPS
                         else argparse.SUPPRESS)
    general.add_argument("-y", "--yes", action="store_true",
                         help="do not ask for confirmation (for scripts)"
                         if operation in (None, "move") else argparse.SUPPRESS)
    general.add_argument("--version", action="version", version=__version__,
                         help="print the version")
    keys = p.add_argument_group(f"settings {operation} reads (params.json "
                                f"keys)" if operation else "settings")
    for key, f in CONFIG_FIELDS.items():
        if key != "operation":
            shown_here = operation is None or operation in KEY_USERS.get(
                key, OPERATIONS)
            _add_key_flag(keys, key, f, shown_here)
    return p


def _add_key_flag(group, name: str, f, shown_here: bool = True) -> None:
    meta, flag = f.metadata, "--" + name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING \
        else f.default_factory()
    text = meta["help"]
    if meta["choices"]:
        text += f"; one of: {', '.join(meta['choices'])}"
    said = json.dumps(default)
    if len(said) > 60:  # the 24 extensions: README.md lists them
        said = f"{json.dumps(default[:4])[:-1]}, ... {len(default)} in all]"
    text = f"{text} (default: {said})".replace("%", "%%")
    kw = {"dest": name, "default": None,
          "help": text if shown_here else argparse.SUPPRESS}
    kind = f.type
    if kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif kind == "list":
        metavar = LIST_METAVARS.get(name, "FOLDER" if meta["path"] else "VALUE")
        group.add_argument(flag, nargs="*", metavar=metavar, **kw)
    elif name == "output_format":
        group.add_argument(flag, choices=meta["choices"], metavar="FORMAT", **kw)
    else:
        conv = {"int": int, "float": float, "str": str}[kind]
        metavar = FLAG_METAVARS.get(name) or ("FOLDER" if meta["path"] else
                                              name.split("_")[-1].upper())
        group.add_argument(flag, type=conv, metavar=metavar, **kw)


def overview_help() -> str:
    """--help without an operation: what each does, and where to look next."""
    name = program_name()
    import textwrap
    width = max(map(len, OPERATIONS)) + 4
    ops = "\n".join(textwrap.fill(
        OPERATION_HELP[op], 79, initial_indent=f"  {op:<{width - 2}}",
        subsequent_indent=" " * width) for op in OPERATIONS)
    return (
        f"usage: {name} [OPERATION] [QUERY...] [--flag VALUE...]\n\n"
        f"Reverse image search and near-duplicate finder for your own "
        f"folders.\nSettings come from {PARAMS_NAME} (written with defaults on "
        f"first run); a flag of\nthe same name overrides a key for one run "
        f"(img_dirs: --img-dirs).\nWith no operation, runs the one in "
        f"{PARAMS_NAME} ('operation').\n\noperations:\n{ops}\n\n"
        f"options:\n"
        f"  -h, --help        show this help; '{name} OPERATION --help' "
        f"lists\n                    the settings that operation reads\n"
        f"  --params FILE     settings file (default: {PARAMS_NAME} beside the "
        f"program)\n"
        f"  --format FORMAT   what is printed: {', '.join(FORMATS)}\n"
        f"  -q, --quiet       print only results and errors\n"
        f"  -v, --verbose     update: list every file added, changed, renamed, "
        f"removed\n"
        f"  --open            open the HTML report in the browser afterwards\n"
        f"  --no-open         review: leave the browser alone\n"
        f"  --debug           show a traceback on unexpected errors\n"
        f"  --version         print the version\n\n"
        f"examples:\n"
        f"  {name} build --img-dirs ~/Photos\n"
        f"  {name} search ~/query.jpg --distance-threshold 8\n"
        f"  {name} find-duplicates --format json\n"
        f"  {name} search --help\n")


def operation_name(word: str) -> str:
    """An operation as typed ('find-duplicates' too), or a ConfigError that
    names the nearest one."""
    op = word.strip().lower().replace("-", "_")
    if op in OPERATIONS:
        return op
    near = difflib.get_close_matches(op, OPERATIONS, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"command line: invalid choice: '{word}' is not an "
                      f"operation (choose from {', '.join(OPERATIONS)}).{hint}")


def _help_requested(argv: Sequence[str]) -> tuple[bool, str | None]:
    """(asked for help, the operation named), before any other checking, so
    that help works even when the rest of the line is wrong."""
    words = [a for a in argv if not a.startswith("-")]
    asked = any(a in ("-h", "--help") for a in argv) or \
        any(w.lower() == "help" and not os.path.exists(w) for w in words)
    for word in words:
        with contextlib.suppress(ConfigError):
            return asked, operation_name(word)
    return asked, None


def _unknown_flags(extras: Sequence[str], parser) -> ConfigError:
    """The first unknown flag, and the known one it is nearest to."""
    flags = [o for a in parser._actions for o in a.option_strings]
    word = next((e for e in extras if e.startswith("-")), extras[0])
    bare = word.split("=")[0]
    near = [f for f in flags if f == "-" + bare] or \
        [f for f in flags if f.endswith("-" + bare.lstrip("-"))] or \
        difflib.get_close_matches(bare, flags, n=1, cutoff=0.6)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"command line: unrecognized argument '{word}'.{hint} "
                       f"See '{program_name()} --help'.")


def parse_run(argv: Sequence[str] | None) -> Run | None:
    """The run to do, or None when a default params.json was just written."""
    return run_of(parse_args(sys.argv[1:] if argv is None else list(argv)))


def parse_args(argv: list) -> argparse.Namespace:
    """The command line as argparse reads it; --help and --version answered
    here (SystemExit), an unknown flag refused."""
    asked, named = _help_requested(argv)
    if asked:
        if named:
            build_parser(named).print_help()
        else:
            print(overview_help(), end="")
        raise SystemExit(0)
    parser = build_parser()
    # '-help' would be read as -h with the value 'elp'
    flags = {o for a in parser._actions for o in a.option_strings}
    extras = [a for a in argv if re.fullmatch(r"-[A-Za-z]{2,}[\w-]*", a)
              and "-" + a in flags]
    if not extras:
        ns, extras = parser.parse_known_intermixed_args(argv)
    if extras:
        raise _unknown_flags(extras, parser)
    return ns


def run_of(ns: argparse.Namespace) -> Run | None:
    """The run the command line asks for, with its settings (defaults <
    params.json < flags); None when a default params.json was just written."""
    operation = operation_name(ns.operation) if ns.operation else None
    params = os.path.abspath(ns.params or default_params_path())
    notices = []
    if not os.path.exists(params):
        frozen = getattr(sys, "frozen", False)
        try:
            write_default_params(params, desktop=frozen)
        except OSError as exc:
            raise ConfigError(f"{params} does not exist and cannot be created "
                              f"({exc.strerror}).") from None
        created = (f"Created {params} with default settings. Edit img_dirs "
                   f"(your image folders) and input_dir (images to look "
                   f"for)")
        examples = default_params()["img_dirs"] + [default_params()["input_dir"]]
        base = os.path.dirname(params)
        if frozen or not all(os.path.isdir(os.path.join(base, p))
                             for p in examples):
            print(created + ", then run again.", file=sys.stderr)
            return None
        # a fresh clone: the defaults name its example collection, so the
        # first run does the job (README's one run command)
        notices.append(created + " to use your own pictures; this run uses "
                       "the example collection.")
    overrides = {name: getattr(ns, name) for name in CONFIG_FIELDS
                 if getattr(ns, name, None) is not None}
    if operation:
        overrides["operation"] = operation
    if ns.queries and (operation or "") != "search":
        raise ConfigError("command line: query images are only taken by "
                          "search, e.g. 'reverse_search.py search photo.jpg'.")
    cfg = config_from(read_params(params), params, overrides)
    opens = ns.open_report if ns.open_report is not None else \
        cfg.operation == "review"  # review's page is the point of it
    run = Run(cfg, list(ns.queries), ns.quiet, opens, yes=ns.yes,
              verbose=ns.verbose)
    run.notices += notices
    if cfg.workers > most_workers():
        run.notices.append(
            f"{_origin('workers', cfg.sources['workers'])} is {cfg.workers}; "
            f"using {most_workers()} (twice the {os.cpu_count()} CPU cores: "
            f"more would only use more memory).")
    return run


# What each operation runs: every one takes the run and the console.
RUNNERS = {"build": op_build, "update": op_update, "search": op_search,
           "find_duplicates": op_find_duplicates, "export": op_export,
           "move": op_move, "undo": op_undo, "review": op_review}


def dispatch(run: Run, ui: Console) -> Report | None:
    """The operation's report (review answers its page itself: None)."""
    return RUNNERS[run.config.operation](run, ui)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one operation; returns the exit code (0 ok, 1 failure, 2 usage)."""
    _safe_streams()
    if argv is None and len(sys.argv) == 1 and getattr(sys, "frozen", False):
        return run_from_desktop(default_params_path())
    return _run(sys.argv[1:] if argv is None else list(argv))


def _run(argv: list, desktop: bool = False) -> int:
    """main() for a command line; desktop: a double-click's run, which goes
    on to the review page when find_duplicates finds groups."""
    debug, run = False, None
    try:
        ns = parse_args(argv)
        debug = ns.debug  # from here on an internal error shows its traceback
        run = run_of(ns)
        if run is None:
            return 0
        ui = Console(run.quiet)
        for notice in run.notices:
            ui.notice(notice)
        report = dispatch(run, ui)
        review = review_after(run, report) if desktop else None
        if report is not None:  # review has answered its page already
            emit(report, run, ui)
        if review is not None:
            serve_review(review, ui, found=report)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
        return 0
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        return _stdout_gone()
    except ReverseSearchError as exc:
        return _fail(f"error: {exc}", exc.exit_code, argv, run)
    except sqlite3.Error as exc:  # damaged pages, a full or read-only disk
        path = run.config.db_path if run else DB_NAME
        return _fail(f"error: {describe_db_error(exc, path)}", 1, argv, run)
    except KeyboardInterrupt:
        return _fail("interrupted. Everything hashed so far is saved; run "
                     "update to continue.", 130, argv, run)
    except ModuleNotFoundError as exc:  # run outside its environment
        if debug:
            raise
        return _fail(f"error: {missing_package(exc.name)}", 1, argv, run)
    except OSError as exc:
        if debug:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"error:{where}: {exc.strerror or exc}", 1, argv, run)
    except Exception as exc:
        if debug:
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc}. Run again "
                     f"with --debug for details, and please report it.", 1,
                     argv, run)


def review_after(run: Run, report) -> Run | None:
    """The review run a double-click's find_duplicates goes on to when it
    found groups, or None.  With no terminal and no editor habits, the page
    is where a person acts on them (and it replaces the static report, so
    one page opens); the server stops by itself after review_idle_minutes."""
    if run.config.operation != "find_duplicates" or not report.groups:
        return None
    cfg = dataclasses.replace(run.config, operation="review")
    cfg.sources = run.config.sources
    opens, run.open_report = run.open_report, False
    return dataclasses.replace(run, config=cfg, open_report=opens)


def _fail(message: str, code: int, argv: list, run: Run | None) -> int:
    """The message on stderr; with --format json also a JSON document on
    stdout, so a script reading stdout always gets one."""
    print(f"reverse_search: {printable(message)}", file=sys.stderr)
    fmt = run.config.output_format if run else _flag_value(argv, "--format")
    if fmt == "json":
        operation = run.config.operation if run else next(
            (a for a in argv if a.replace("-", "_") in OPERATIONS), None)
        with contextlib.suppress(OSError):
            print(json.dumps({"operation": operation and operation.replace(
                "-", "_"), "tool_version": __version__, "error": message,
                "exit_code": code}, ensure_ascii=False), flush=True)
    return code


def _flag_value(argv: list, flag: str) -> str | None:
    """The value of `flag` as typed, when the command line could not be read."""
    for k, arg in enumerate(argv):
        if arg == flag and k + 1 < len(argv):
            return argv[k + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _stdout_gone() -> int:
    """Stop quietly, as `head` expects, with the exit status a process killed
    by SIGPIPE has (141 in a shell); later flushes go nowhere."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    return 141


class _Tee:
    """A text stream that writes to several others (console, log, memory)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()

    def isatty(self) -> bool:
        return False


def _desktop_log(path: str):
    """The log beside params.json, appended to (never through a link); a
    log that cannot be opened is not a reason to fail the run."""
    try:
        return io.TextIOWrapper(open_append(path), encoding="utf-8",
                                errors="backslashreplace")
    except OSError as exc:
        print(f"reverse_search: not logging to {path}: {exc.strerror}",
              file=sys.stderr)
        return io.StringIO()


def run_from_desktop(params: str) -> int:
    """A double-click: no terminal to read, so log everything beside
    params.json and show the outcome in the browser."""
    folder = os.path.dirname(params)
    log_path = os.path.join(folder, "reverse_search.log")
    said = io.StringIO()
    with _desktop_log(log_path) as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"reverse_search {__version__}\n")
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = (_Tee(s, log, said) for s in saved)
        try:
            # --yes: no terminal to ask on; operation "move" in params.json,
            # set by hand, is the request (and undo reverses it)
            code = _run(["--params", params, "--open", "--yes"], desktop=True)
        finally:
            sys.stdout, sys.stderr = saved
    shown_page = "review: http" in said.getvalue() or \
        "results:" in said.getvalue() and ".html" in said.getvalue()
    status = os.path.join(folder, STATUS_PAGE)
    if code != 0 or not shown_page:
        open_in_browser(write_status_page(folder, said.getvalue(), code,
                                          log_path, params))
    else:  # the report is shown: an older status page would only mislead
        with contextlib.suppress(OSError):
            os.remove(status)
    _wait_if_own_console()
    return code


STATUS_PAGE = "reverse_search-status.html"
# What a first double-click shows: what to edit, in order, and how paths are
# written in JSON (a Windows path needs / or doubled backslashes).
FIRST_STEPS = """<ol>
<li>Open <code>{params}</code> in a text editor (Notepad on Windows, TextEdit on a Mac).</li>
<li>Set <code>img_dirs</code> to the folders of pictures to check, between
quotes and square brackets. It now says <code>{img_dirs}</code>. Write a path
with forward slashes, or with every backslash doubled:
<pre>"img_dirs": ["C:/Users/you/Pictures", "D:/Photos"]
"img_dirs": ["C:\\\\Users\\\\you\\\\Pictures"]
"img_dirs": ["/home/you/Pictures"]          (Linux)
"img_dirs": ["/Users/you/Pictures"]         (Mac)</pre></li>
<li>Leave <code>"operation": "find_duplicates"</code> to find copies, or set
<code>"search"</code> and put the pictures you are looking for in the folder
<code>input_dir</code> names.</li>
<li>Save the file and double-click the program again. It hashes the pictures
(the first time takes a while: dozens to hundreds of pictures a second) and opens
the review page in your browser: each group of copies, the one it would keep and
why. There you choose what to keep, move the copies to the
<code>quarantine</code> folder beside the program (nothing is deleted) and undo.
The program stops by itself when the page has been closed for
<code>review_idle_minutes</code> (30).</li>
<li>Without the page: <code>"operation": "move"</code> moves the copies marked
<i>move</i> in the report; <code>"operation": "undo"</code> puts them all back.</li>
</ol>"""


def write_status_page(folder: str, text: str, code: int, log_path: str,
                      params: str = "") -> str:
    """A short page for runs without a terminal: what to do first (first
    run), every problem to fix (errors), or the summary first, then the
    details (other runs)."""
    lines = text.strip().splitlines()
    first = code == 0 and any(line.startswith("Created ") for line in lines)
    errors = [line for line in lines if not line.startswith("Created ")]
    if first:
        title = "reverse_search: set it up"
        body = _first_steps(params) + "<pre>" + html.escape(text) + "</pre>"
    elif code != 0:
        title = "reverse_search: something to fix"
        body = ("<p>Nothing was changed. Fix what is listed, save, and "
                "double-click again:</p><pre class=err>" +
                html.escape("\n".join(errors)) + "</pre>" +
                _path_hint(params))
    else:
        title = "reverse_search: done"
        summary = [line for line in lines if _is_summary(line)]
        body = ("<pre>" + html.escape("\n".join(summary)) + "</pre>"
                "<details><summary>Everything it said "
                f"({len(lines):,} lines)</summary><pre>" +
                html.escape(text) + "</pre></details>")
    readme = os.path.join(folder, "README.md")
    guide = (f"<p>Guide: <a href='{html.escape(file_uri(readme))}'>README.md"
             f"</a> beside the program.</p>" if os.path.exists(readme) else "")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}"
            f"</title><style>body{{font:15px sans-serif;max-width:60em;"
            f"margin:2em auto}}pre{{white-space:pre-wrap;background:#f4f4f4;"
            f"padding:.5em}}.err{{color:#a00}}</style></head><body>"
            f"<h1>{title}</h1>{body}{guide}<p>Log: <code>"
            f"{html.escape(log_path)}</code></p></body></html>\n")
    path = os.path.join(folder, STATUS_PAGE)
    with contextlib.suppress(OSError):
        _atomic_write(path, lambda fh: fh.write(page))
    return path


def _first_steps(params: str) -> str:
    try:
        dirs = json.dumps(read_params(params).get("img_dirs"))
    except ReverseSearchError:
        dirs = "?"
    return ("<p>Welcome. The program wrote its settings file; before it "
            "looks at any picture, tell it where yours are:</p>" +
            FIRST_STEPS.format(params=html.escape(params),
                               img_dirs=html.escape(dirs)))


def _path_hint(params: str) -> str:
    return (f"<p>The settings are in <code>{html.escape(params)}</code>. In "
            f"it, write a Windows path with forward slashes "
            f"(<code>\"C:/Users/you/Pictures\"</code>) or doubled backslashes "
            f"(<code>\"C:\\\\Users\\\\you\\\\Pictures\"</code>).</p>")


def _is_summary(line: str) -> bool:
    """The lines a person wants first: the operation's summary, where the
    results went, errors."""
    head = line.split(":", 1)[0]
    return head in OPERATIONS or head in ("results", "reverse_search")


def _wait_if_own_console() -> None:
    """Windows closes a console window with its last process: let the user
    read it first."""
    if os.name != "nt":
        return
    with contextlib.suppress(Exception):
        import ctypes
        if ctypes.windll.kernel32.GetConsoleProcessList(
                (ctypes.c_uint * 2)(), 2) == 1:
            input("Press Enter to close this window.")


def _safe_streams() -> None:
    """Never crash on printing a file name the console cannot encode."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


# ============================================================================
# Templates
# ============================================================================
#
# The two pages, last so that the code above reads without them: the static
# HTML report (filled by html_report) and the review page (served by
# ReviewServer).  Each is one string with no outside resources.

# Raw string: the script's regular expressions keep their backslashes.
HTML_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@ · reverse_search</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       margin: 0 auto; padding: 16px 24px; max-width: 1400px; color: #222;
       background: #f6f7f9; }
h1 { font-size: 22px; margin: 0 0 12px; }
.summary { background: #fff; border: 1px solid #dde; border-radius: 8px;
           padding: 12px 16px; margin-bottom: 16px; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 28px; font-size: 16px; }
.stat b { font-size: 20px; }
.run { color: #667; margin: 8px 0; overflow-wrap: anywhere; }
.ok { color: #2a7a3a; margin: 8px 0; }
details summary { cursor: pointer; margin: 6px 0; color: #245; }
#failures summary { color: #a33; font-weight: 600; }
#failure-list { max-height: 320px; overflow: auto; font-size: 12px; }
#failure-list li { overflow-wrap: anywhere; }
.settings { border-collapse: collapse; font-size: 12px; }
.settings th { text-align: left; padding: 1px 12px 1px 0; font-weight: 600; }
.settings td { overflow-wrap: anywhere; }
nav { display: flex; align-items: center; gap: 8px; margin: 12px 0; }
nav button { font: inherit; padding: 4px 12px; border-radius: 6px;
             border: 1px solid #99a; background: #fff; cursor: pointer; }
nav button:disabled { opacity: .4; cursor: default; }
nav .where { color: #445; margin-left: 8px; }
.set { background: #fff; border: 1px solid #dde; border-radius: 8px;
       padding: 10px 12px; margin-bottom: 14px; }
.set h2 { font-size: 15px; margin: 0 0 8px; }
.set h2 .more { font-weight: normal; color: #667; }
.set .error { color: #a33; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: @PX@px; margin: 0; padding: 8px; border: 2px solid #e3e5ea;
        border-radius: 8px; position: relative; font-size: 12px; }
.card.keep { border-color: #2f9e44; background: #f1fbf3; }
.card.query { border-color: #1c7ed6; background: #f0f6fd; }
.card img { display: block; width: @PX@px; height: @PX@px; object-fit: contain;
            background: #eceef2; border-radius: 4px; }
.card img.broken { visibility: hidden; }
.card a { position: relative; display: block; }
.found-box { position: absolute; border: 2px solid #f08c00;
  box-sizing: border-box; pointer-events: none; }
.badge { position: absolute; top: 12px; left: 12px; padding: 1px 8px;
         border-radius: 10px; font-weight: 700; font-size: 11px; color: #fff;
         letter-spacing: .04em; max-width: calc(100% - 40px);
         white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.badge.keep { background: #2f9e44; }
.badge.query { background: #1c7ed6; }
.badge.dist { background: rgba(40, 40, 50, .75); font-weight: 600; }
.card.move { border-color: #e8590c; }
.action { margin-top: 4px; font-weight: 700; }
.action.move { color: #c2410c; } .action.protected { color: #667; }
.why { color: #2b8a3e; margin-top: 4px; }
.scale { color: #556; }
.name { font-weight: 600; margin-top: 6px; overflow-wrap: anywhere; }
.dir { color: #778; overflow-wrap: anywhere; }
.meta { color: #334; }
.none { color: #778; font-style: italic; }
</style>
</head>
<body>
<h1>@TITLE@</h1>
<section class="summary">@SUMMARY@</section>
<noscript><p>This page needs JavaScript to show the groups; the same data is
in the .json and .csv files beside it.</p></noscript>
<nav class="pager"></nav>
<main id="sets"></main>
<nav class="pager"></nav>
<script type="application/json" id="report-data">@DATA@</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var sets = data.sets, size = data.page_size, search = data.operation === "search";
  var pages = Math.max(1, Math.ceil(sets.length / size));
  var unit = search ? "queries" : "groups";

  // Everything from the data goes in through textContent and attributes,
  // never innerHTML, so a file name is always text.
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "? B";
    var units = ["B", "KB", "MB", "GB"];
    for (var i = 0; i < units.length; i++) {
      if (n < 1024 || i === units.length - 1)
        return i ? n.toFixed(1) + " " + units[i] : n + " B";
      n /= 1024;
    }
  }
  function count(n, one, many) {
    return n.toLocaleString("en") + " " + (n === 1 ? one : many);
  }
  // A folder that may wrap after each separator rather than mid-name.
  function folder(text) {
    var d = el("div", "dir");
    text.split(/([\\/])/).forEach(function (part) {
      d.appendChild(document.createTextNode(part));
      if (part === "/" || part === "\\") d.appendChild(el("wbr"));
    });
    return d;
  }

  function card(it, k, keepAt, reason) {
    var c = el("figure", "card" + (it.role ? " " + it.role : ""));
    // Hook for a later "Not a duplicate" button: the two items in this set.
    if (k !== keepAt) c.setAttribute("data-pair", keepAt + "," + k);
    var dir = data.dirs[it.dir];
    var uri = it.uri !== undefined ? it.uri
      : dir.uri + (it.href !== undefined ? it.href : it.name);
    var a = el("a");
    if (uri) a.href = uri;
    a.target = "_blank"; a.rel = "noopener";
    a.title = dir.path ? dir.path + data.sep + it.name : it.name;
    var img = el("img");
    img.loading = "lazy"; img.decoding = "async"; img.alt = it.name;
    img.width = img.height = data.px;
    // No thumbnail made: the file itself (a browser draws it, or it is past
    // the first page); one it cannot draw gets the placeholder.
    var placeholder = data.files + "/" + data.placeholder;
    img.onerror = function () {
      if (img.getAttribute("src") === placeholder) img.classList.add("broken");
      else img.src = placeholder;
    };
    img.src = it.thumb ? data.files + "/" + it.thumb : uri || placeholder;
    a.appendChild(img);
    c.appendChild(a);
    var badge = it.role === "keep" ? el("span", "badge keep", "KEEP")
      : it.role === "query" ? el("span", "badge query", "QUERY")
      : el("span", "badge dist", "distance " + it.dist +
           (it.how ? " \u00b7 " + it.how : ""));
    // the badge stays inside its card; the whole text is in its tooltip
    badge.title = it.role === "keep" ? (reason || "the keep rule keeps this file")
      : badge.textContent;
    c.appendChild(badge);
    c.appendChild(el("div", "name", it.name));
    c.appendChild(folder(dir.path));
    var dims = (it.w && it.h) ? it.w + " × " + it.h : "? × ?";
    c.appendChild(el("div", "meta", dims + " · " + bytes(it.size)));
    c.appendChild(el("div", "meta", it.date || ""));
    if (it.dist !== null && it.dist !== undefined && it.role !== "query"
        && it.bits) {  // what "distance N" means
      c.appendChild(el("div", "meta scale", it.dist + " of " + it.bits
        + " bits differ" + (data.threshold !== null && data.threshold !== undefined
                            ? " · threshold " + data.threshold : "")));
    }
    if (it.how) c.appendChild(el("div", "meta", it.how));
    if (it.role === "keep" && reason) c.appendChild(el("div", "why", reason));
    if (it.action === "move") {
      c.classList.add("move");
      c.appendChild(el("div", "action move", "move takes it to the quarantine"));
    } else if (it.action === "protected") {
      c.appendChild(el("div", "action protected", "in a protected folder: move leaves it"));
    }
    return c;
  }

  // A box given as shares of a picture's width and height, drawn over its
  // thumbnail (scaled to fit a px square, centred).
  function drawBox(c, it, f) {
    if (!it.w || !it.h) return;
    var px = data.px, k = px / Math.max(it.w, it.h);
    var w = it.w * k, h = it.h * k, x = (px - w) / 2, y = (px - h) / 2;
    var b = el("div", "found-box");
    b.style.left = (x + f[0] * w) + "px"; b.style.top = (y + f[1] * h) + "px";
    b.style.width = ((f[2] - f[0]) * w) + "px";
    b.style.height = ((f[3] - f[1]) * h) + "px";
    c.querySelector("a").appendChild(b);
  }

  function setBox(s, n) {
    var box = el("section", "set");
    box.setAttribute("data-group", n);
    var h = el("h2");
    if (search) {
      var hits = s.items.length - 1;
      h.appendChild(document.createTextNode(
        "Query " + (n + 1) + ": " + s.items[0].name + " "));
      h.appendChild(s.error ? el("span", "error", "· cannot hash: " + s.error)
        : el("span", "more", "· " + (hits ? count(hits, "match", "matches")
                                          : "no match")));
    } else {
      h.appendChild(document.createTextNode("Group " + (n + 1) + " "));
      h.appendChild(el("span", "more", "· "
        + count(s.items.length, "image", "images") + " · "
        + bytes(s.reclaim) + " reclaimable"
        + (s.reason ? " · " + s.reason : "")));
    }
    box.appendChild(h);
    var cards = el("div", "cards");
    var keepAt = 0;
    s.items.forEach(function (it, k) { if (it.role === "keep") keepAt = k; });
    var made = s.items.map(function (it, k) {
      return card(it, k, keepAt, s.reason);
    });
    made.forEach(function (c) { cards.appendChild(c); });
    // Verified matches: where the one picture lies in the other.
    s.items.forEach(function (it, k) {
      if (it.box) drawBox(made[k], it, it.box);
      if (it.lead_box) drawBox(made[0], s.items[0], it.lead_box);
    });
    box.appendChild(cards);
    return box;
  }

  function pageFromHash() {
    var m = /page=(\d+)/.exec(location.hash);
    return Math.min(pages, Math.max(1, m ? +m[1] : 1));
  }
  function go(p) { location.hash = "page=" + p; }

  function drawNav(nav, p) {
    nav.textContent = "";
    function button(label, target, off) {
      var b = el("button", null, label);
      b.disabled = off;
      b.onclick = function () { go(target); };
      nav.appendChild(b);
    }
    button("« First", 1, p === 1);
    button("‹ Prev", p - 1, p === 1);
    nav.appendChild(el("span", "page", "Page " + p + " of " + pages));
    button("Next ›", p + 1, p === pages);
    button("Last »", pages, p === pages);
    var first = (p - 1) * size;
    nav.appendChild(el("span", "where", sets.length
      ? unit + " " + (first + 1) + "–" + Math.min(sets.length, first + size)
        + " of " + sets.length.toLocaleString("en")
      : "no " + unit + " found"));
  }

  function render() {
    var p = pageFromHash(), first = (p - 1) * size;
    var frag = document.createDocumentFragment();
    sets.slice(first, first + size).forEach(function (s, k) {
      frag.appendChild(setBox(s, first + k));
    });
    if (!sets.length) frag.appendChild(el("p", "none", search
      ? "No queries." : "No duplicates found."));
    var list = document.getElementById("sets");
    list.textContent = "";
    list.appendChild(frag);
    document.querySelectorAll("nav.pager").forEach(function (nav) {
      drawNav(nav, p);
    });
  }

  var failures = document.getElementById("failures");
  if (failures) failures.addEventListener("toggle", function () {
    var list = document.getElementById("failure-list");
    if (!failures.open || list.childElementCount) return;
    data.failures.forEach(function (f) {
      list.appendChild(el("li", null, f.path + ": " + f.error));
    });
  });

  window.addEventListener("hashchange", function () {
    render();
    window.scrollTo(0, 0);
  });
  render();
  performance.mark("report-rendered");
})();
</script>
</body>
</html>
"""


# The review page: no build step, no library, nothing from the internet.
# Names are set with textContent only, so a hostile file name stays text.
REVIEW_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Review duplicates · reverse_search</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       margin: 0; color: #222; background: #f6f6f4; }
header { position: sticky; top: 0; z-index: 5; background: #fff;
         border-bottom: 1px solid #ddd; padding: 8px 20px; display: flex;
         gap: 14px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0 8px 0 0; }
.stat b { font-size: 15px; }
button { font: inherit; padding: 4px 10px; border: 1px solid #bbb;
         border-radius: 5px; background: #fafafa; cursor: pointer; }
button.primary { background: #1f6feb; color: #fff; border-color: #1f6feb; }
button:disabled { opacity: .45; cursor: default; }
main { padding: 12px 20px; max-width: 1500px; margin: 0 auto; }
nav.tabs button.on { background: #222; color: #fff; }
.pager { margin: 8px 0; display: flex; gap: 6px; align-items: center; }
.group { background: #fff; border: 1px solid #ddd; border-radius: 8px;
         margin: 10px 0; padding: 8px 12px; }
.group.focus { outline: 3px solid #1f6feb; }
.group h2 { font-size: 14px; margin: 2px 0 8px; display: flex; gap: 10px;
            align-items: center; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { width: 210px; border: 2px solid #ccc; border-radius: 6px; padding: 4px;
        background: #fff; position: relative; }
.tile.keep { border-color: #2e8b57; background: #f1fbf4; }
.tile.move { border-color: #c0392b; background: #fdf3f2; }
.tile.focus { box-shadow: 0 0 0 3px #1f6feb; }
.tile img.thumb { width: 200px; height: 200px; object-fit: contain;
                  background: #eee; cursor: pointer; display: block; }
.tile .name { font-weight: 600; overflow-wrap: anywhere; }
.tile .meta, .tile .folder { color: #555; font-size: 12px;
                             overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 0 6px; border-radius: 4px;
         font-size: 12px; font-weight: 700; color: #fff; }
.badge.keep { background: #2e8b57; } .badge.move { background: #c0392b; }
.badge.protected { background: #777; }
.tile .acts { display: flex; gap: 4px; margin-top: 4px; flex-wrap: wrap; }
.tile .acts button { font-size: 12px; padding: 2px 6px; }
#drop { border: 2px dashed #999; border-radius: 8px; padding: 18px;
        text-align: center; color: #555; background: #fff; }
body.dragging #drop { border-color: #1f6feb; background: #eef4ff; }
.modal { position: fixed; inset: 0; background: rgba(0,0,0,.55); z-index: 10;
         display: flex; align-items: center; justify-content: center; }
.modal .box { background: #fff; border-radius: 8px; padding: 16px 20px;
              max-width: 720px; max-height: 80vh; overflow: auto; }
#compare { position: fixed; inset: 0; background: #111; z-index: 10;
           display: flex; flex-direction: column; }
#compare .bar { color: #eee; padding: 6px 12px; display: flex; gap: 10px;
                align-items: center; }
#compare .views { flex: 1; display: flex; gap: 4px; min-height: 0; }
#compare .view { flex: 1; overflow: hidden; position: relative;
                 background: #222; cursor: grab; }
#compare .view img { position: absolute; left: 0; top: 0;
                     transform-origin: 0 0; image-rendering: auto; }
#compare .cap { position: absolute; left: 4px; bottom: 4px; color: #fff;
                background: rgba(0,0,0,.6); padding: 1px 6px; font-size: 12px;
                z-index: 1; overflow-wrap: anywhere; max-width: 95%; }
#map-wrap { position: relative; background: #fff; border: 1px solid #ddd;
            border-radius: 8px; }
#map { display: block; width: 100%; height: 640px; cursor: crosshair; }
#map-tip { position: absolute; pointer-events: none; background: #fff;
           border: 1px solid #999; padding: 3px; display: none; }
#map-tip img { width: 120px; height: 120px; object-fit: contain; display: block; }
.note { color: #555; }
.error { color: #b00020; font-weight: 600; }
.hidden { display: none !important; }
kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 4px;
      background: #fafafa; font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1>Review duplicates</h1>
  <span class="stat"><b id="s-groups">0</b> groups</span>
  <span class="stat"><b id="s-move">0</b> files to move
    (<b id="s-reclaim">0 B</b>)</span>
  <nav class="tabs">
    <button id="tab-groups" class="on">Groups</button>
    <button id="tab-search">Search</button>
    <button id="tab-map">Map</button>
  </nav>
  <button id="apply" class="primary">Apply: move to quarantine…</button>
  <button id="undo">Undo moves (<span id="s-quarantined">0</span>)</button>
  <button id="done" title="Stop the review server (it also stops by itself when idle)">Done</button>
  <span id="status" class="note"></span>
</header>
<main>
  <section id="groups-view">
    <p class="note">Click a picture to keep or move it. Keys: <kbd>j</kbd>/<kbd>k</kbd>
      next/previous group, <kbd>←</kbd>/<kbd>→</kbd> picture, <kbd>Space</kbd>
      keep/move, <kbd>x</kbd> not a duplicate, <kbd>c</kbd> compare,
      <kbd>n</kbd>/<kbd>p</kbd> page, <kbd>a</kbd> apply, <kbd>Esc</kbd> close.</p>
    <div class="pager" id="pager-top"></div>
    <div id="groups"></div>
    <div class="pager" id="pager-bottom"></div>
  </section>
  <section id="search-view" class="hidden">
    <div id="drop">Drop an image here (or anywhere on this page) to find it in
      the collection.<br>
      <input id="search-path" size="60" placeholder="or paste the path of an image file">
      <button id="search-go">Search</button></div>
    <h2 id="search-title"></h2>
    <div class="tiles" id="search-results"></div>
  </section>
  <section id="map-view" class="hidden">
    <p class="note" id="map-note">Each dot is an image, placed by the
      similarity of its hashes (t-SNE); groups have colours, others are
      grey. Point at a dot to see it, click to open its group.</p>
    <div id="map-wrap"><canvas id="map"></canvas><div id="map-tip"><img alt=""></div></div>
  </section>
</main>
<div id="compare" class="hidden">
  <div class="bar"><b>Compare</b><span>wheel: zoom together · drag: pan together</span>
    <button id="cmp-fit">Fit</button><button id="cmp-one">1:1</button>
    <button id="cmp-close">Close (Esc)</button></div>
  <div class="views" id="cmp-views"></div>
</div>
<div id="modal" class="modal hidden"><div class="box" id="modal-box"></div></div>
<script nonce="@NONCE@">
(() => {
  "use strict";
  const TOKEN = @TOKEN@;
  history.replaceState(null, "", "/");  // the token leaves the address bar
  const $ = id => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const human = n => {
    const u = ["B", "KB", "MB", "GB"]; let i = 0;
    while (n >= 1024 && i < 3) { n /= 1024; i++; }
    return i ? n.toFixed(1) + " " + u[i] : n + " B";
  };
  const state = { page: 1, data: null, focus: 0, tile: 0, view: "groups",
                  selected: new Set() };

  async function call(method, url, body, raw) {
    const opts = { method, headers: { "X-Review-Token": TOKEN } };
    if (raw) { opts.body = body; opts.headers["X-File-Name"] = encodeURIComponent(raw); }
    else if (body !== undefined) {
      opts.body = JSON.stringify(body);
      opts.headers["Content-Type"] = "application/json";
    }
    let res;
    try { res = await fetch(url, opts); }
    catch (e) { throw new Error("the review server has stopped (Done, or review_idle_minutes " +
                                "without a click): run review, or double-click the program, again"); }
    const doc = await res.json();
    if (!res.ok) throw new Error(doc.error || res.statusText);
    return doc;
  }
  function say(text, bad) {
    const s = $("status"); s.textContent = text; s.className = bad ? "error" : "note";
  }
  const guard = fn => async (...a) => { try { await fn(...a); } catch (e) { say(e.message, true); } };

  // ---- groups ----
  async function load(page, focus) {
    const d = await call("GET", "/api/groups?page=" + page);
    state.data = d; state.page = d.page;
    state.focus = Math.min(focus || 0, Math.max(0, d.groups.length - 1));
    state.tile = 0; state.selected.clear();
    render();
  }
  function stats(d) {
    $("s-groups").textContent = d.total.toLocaleString();
    $("s-move").textContent = d.to_move.toLocaleString();
    $("s-reclaim").textContent = human(d.reclaim);
    $("s-quarantined").textContent = d.quarantined;
    $("undo").disabled = !d.quarantined;
    $("apply").disabled = !d.to_move;
  }
  function pager(box) {
    const d = state.data; box.replaceChildren();
    const b = (label, page) => {
      const x = el("button", "page", label); x.disabled = page < 1 || page > d.pages || page === d.page;
      x.onclick = guard(() => load(page)); box.append(x);
    };
    b("« first", 1); b("‹ previous", d.page - 1);
    box.append(el("span", "", `page ${d.page} of ${d.pages} · groups ` +
      `${d.total ? (d.page - 1) * d.size + 1 : 0}–${Math.min(d.page * d.size, d.total)} of ${d.total}`));
    b("next ›", d.page + 1); b("last »", d.pages);
  }
  function render() {
    const d = state.data; stats(d);
    pager($("pager-top")); pager($("pager-bottom"));
    const box = $("groups"); box.replaceChildren();
    if (!d.groups.length) box.append(el("p", "note", "No duplicate groups: nothing to review."));
    d.groups.forEach((g, gi) => box.append(card(g, gi)));
    markFocus(false);
  }
  function card(g, gi) {
    const c = el("div", "group"); c.dataset.n = g.n;
    const h = el("h2");
    h.append(el("span", "", `Group ${g.n} · ${g.items.length} images · ${human(g.reclaim)} reclaimable`));
    const cmp = el("button", "compare", "Compare"); cmp.onclick = () => compare(g);
    const pair = el("button", "pair", "Selected two: not duplicates");
    pair.onclick = guard(() => notDuplicate(g, [...state.selected]));
    h.append(cmp, pair); c.append(h);
    const tiles = el("div", "tiles");
    g.items.forEach((it, ti) => tiles.append(tile(g, it, gi, ti)));
    c.append(tiles);
    return c;
  }
  function tile(g, it, gi, ti) {
    const t = el("div", "tile " + (it.keep ? "keep" : "move"));
    t.dataset.id = it.id;
    const img = el("img", "thumb"); img.loading = "lazy"; img.alt = it.name;
    img.src = "/thumb/" + it.id; img.title = "click: keep / move";
    img.onclick = guard(() => toggle(g, it));
    t.append(img);
    const badge = it.protected && !it.keep ? el("span", "badge protected", "PROTECTED")
      : el("span", "badge " + (it.keep ? "keep" : "move"), it.keep ? "KEEP" : "MOVE");
    const line = el("div"); line.append(badge);
    if (it.reason) line.append(" ", el("span", "meta reason", it.reason));
    t.append(line, el("div", "name", it.name), el("div", "folder", it.folder));
    const scale = ti === 0 ? "the group's lead" :
      `distance ${it.dist} of ${state.data.bits} bits (match ≤ ${state.data.threshold})`;
    t.append(el("div", "meta", `${it.w}×${it.h} px · ${human(it.size)} · ${it.date}`),
             el("div", "meta dist", scale), el("div", "meta how", "matched: " + it.how));
    const acts = el("div", "acts");
    const nd = el("button", "notdup", "not a duplicate");
    nd.title = "this picture is not a copy of the others (saved to not_duplicates)";
    nd.onclick = guard(() => notDuplicate(g, [it.id]));
    const sel = el("label"); const box = el("input"); box.type = "checkbox";
    box.onchange = () => { box.checked ? state.selected.add(it.id) : state.selected.delete(it.id); };
    sel.append(box, " select");
    acts.append(nd, sel); t.append(acts);
    t.onmouseenter = () => { state.focus = gi; state.tile = ti; markFocus(false); };
    return t;
  }
  function markFocus(scroll) {
    document.querySelectorAll(".focus").forEach(e => e.classList.remove("focus"));
    const c = $("groups").children[state.focus]; if (!c || !c.classList.contains("group")) return;
    c.classList.add("focus");
    const t = c.querySelectorAll(".tile")[state.tile]; if (t) t.classList.add("focus");
    if (scroll) c.scrollIntoView({ block: "nearest" });
  }
  async function toggle(g, it) {
    const fresh = await call("POST", "/api/keep", { group: g.n - 1, image: it.id });
    const i = state.data.groups.indexOf(g);
    state.data.groups[i] = fresh;
    const d = await call("GET", "/api/groups?page=" + state.page);
    state.data = d; render();
    say(`group ${g.n}: ${it.name} will be ${fresh.items.find(x => x.id === it.id).keep ? "kept" : "moved"}`);
  }
  async function notDuplicate(g, ids) {
    if (!ids.length || ids.length > 2) { say("select one or two pictures of the group", true); return; }
    await call("POST", "/api/not-duplicate", { group: g.n - 1, images: ids });
    say(`group ${g.n}: marked as not duplicates (saved to not_duplicates)`);
    await load(state.page, state.focus);
  }

  // ---- apply and undo ----
  function modal(nodes, buttons) {
    const box = $("modal-box"); box.replaceChildren(...nodes);
    const row = el("p"); buttons.forEach(b => row.append(b, " ")); box.append(row);
    $("modal").classList.remove("hidden"); (buttons[0] || box).focus();
  }
  const closeModal = () => $("modal").classList.add("hidden");
  function button(label, cls, fn) { const b = el("button", cls, label); b.onclick = guard(fn); return b; }
  async function apply() {
    const s = await call("GET", "/api/apply");
    if (!s.files) { say("nothing to move"); return; }
    modal([el("h2", "", "Move duplicates to quarantine?"),
           el("p", "summary", `${s.files} files (${s.human}) from ${s.groups} groups will move into ${s.quarantine}. ` +
              `${s.chosen} choices are yours; every other group follows keep_rule. Undo puts them back.`)],
          [button("Move them", "primary confirm", async () => {
             const r = await call("POST", "/api/apply", { files: s.files });
             report(r); await load(1); }),
           button("Cancel", "", closeModal)]);
  }
  function report(r) {
    const list = el("ul");
    r.done.forEach(([a, b]) => list.append(el("li", "", a + " → " + b)));
    r.skipped.forEach(([a, why]) => list.append(el("li", "error", a + ": " + why)));
    modal([el("h2", "", r.operation === "move" ? "Moved" : "Restored"),
           el("p", "summary", r.summary), list], [button("Close", "", closeModal)]);
  }
  async function done() {
    await call("POST", "/api/stop");
    const end = el("main");
    document.body.replaceChildren(end);
    end.append(
      el("h1", "", "Review finished"),
      el("p", "", "The review server has stopped; you can close this tab. " +
                  "Everything done here is saved (plan, quarantine and its manifest, not_duplicates)."));
  }
  async function undo() {
    modal([el("h2", "", "Undo?"), el("p", "", "Every file in the quarantine goes back where it was.")],
          [button("Put them back", "primary confirm", async () => {
             const r = await call("POST", "/api/undo"); report(r); await load(state.page); }),
           button("Cancel", "", closeModal)]);
  }

  // ---- compare: zoom and pan together ----
  const view = { scale: 1, x: 0, y: 0 };
  function compare(g) {
    const box = $("cmp-views"); box.replaceChildren();
    g.items.forEach(it => {
      const v = el("div", "view"); const img = el("img"); img.src = "/image/" + it.id;
      img.alt = it.name; img.onload = fit;
      v.append(img, el("div", "cap", `${it.name} · ${it.w}×${it.h}` + (it.keep ? " · KEEP" : "")));
      box.append(v);
    });
    $("compare").classList.remove("hidden"); fit();
  }
  function fit() {
    const v = document.querySelector("#cmp-views .view"); if (!v) return;
    const imgs = [...document.querySelectorAll("#cmp-views img")].filter(i => i.naturalWidth);
    if (!imgs.length) return;
    const w = Math.max(...imgs.map(i => i.naturalWidth)), h = Math.max(...imgs.map(i => i.naturalHeight));
    view.scale = Math.min(v.clientWidth / w, v.clientHeight / h); view.x = 0; view.y = 0; draw();
  }
  function draw() {
    document.querySelectorAll("#cmp-views img").forEach(i => {
      // every image drawn at the scale of the largest, so details line up
      const big = Math.max(...[...document.querySelectorAll("#cmp-views img")].map(j => j.naturalWidth || 1));
      const s = view.scale * big / (i.naturalWidth || big);
      i.style.transform = `translate(${view.x}px, ${view.y}px) scale(${s})`;
    });
  }
  $("cmp-views").addEventListener("wheel", e => {
    e.preventDefault();
    const r = e.target.closest(".view").getBoundingClientRect();
    const px = e.clientX - r.left, py = e.clientY - r.top;
    const k = e.deltaY < 0 ? 1.25 : 0.8;
    view.x = px - (px - view.x) * k; view.y = py - (py - view.y) * k; view.scale *= k; draw();
  }, { passive: false });
  let drag = null;
  $("cmp-views").addEventListener("mousedown", e => { drag = [e.clientX, e.clientY]; e.preventDefault(); });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", e => {
    if (!drag) return;
    view.x += e.clientX - drag[0]; view.y += e.clientY - drag[1]; drag = [e.clientX, e.clientY]; draw();
  });
  $("cmp-fit").onclick = fit;
  $("cmp-one").onclick = () => {
    const big = Math.max(...[...document.querySelectorAll("#cmp-views img")].map(j => j.naturalWidth || 1));
    view.scale = 1; view.x = 0; view.y = 0; draw(); return big;
  };
  const closeCompare = () => $("compare").classList.add("hidden");
  $("cmp-close").onclick = closeCompare;

  // ---- search ----
  async function search(file, path) {
    show("search");
    $("search-title").textContent = "Searching…"; $("search-results").replaceChildren();
    const r = file ? await call("POST", "/api/search", file, file.name || "pasted image")
                   : await call("POST", "/api/search", { path });
    $("search-title").textContent = r.error ? `${r.query}: ${r.error}` :
      `${r.query}: ${r.matches.length} matches among ${r.images} images, nearest first`;
    r.matches.forEach(m => {
      const t = el("div", "tile result"); const img = el("img", "thumb");
      img.src = "/thumb/" + m.id; img.alt = m.name; t.append(img);
      t.append(el("div", "name", m.name), el("div", "folder", m.folder),
               el("div", "meta dist", `distance ${m.dist} of ${r.bits} bits`),
               el("div", "meta how", "matched: " + m.how),
               el("div", "meta", `${m.w}×${m.h} px · ${human(m.size)}`));
      if (m.group !== null) {
        const b = button(`open group ${m.group + 1}`, "", () => openGroup(m.group)); t.append(b);
      }
      $("search-results").append(t);
    });
  }
  $("search-go").onclick = guard(() => search(null, $("search-path").value.trim()));
  $("search-path").addEventListener("keydown", e => { if (e.key === "Enter") $("search-go").click(); });
  window.addEventListener("dragover", e => { e.preventDefault(); document.body.classList.add("dragging"); });
  window.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  window.addEventListener("drop", guard(async e => {
    e.preventDefault(); document.body.classList.remove("dragging");
    const f = e.dataTransfer.files[0];
    if (f) await search(f);
  }));
  window.addEventListener("paste", guard(async e => {
    const f = [...(e.clipboardData || {}).files || []][0];
    if (f) await search(f);
  }));

  // ---- map ----
  let map = null;
  async function drawMap() {
    if (!map) {
      $("map-note").textContent = "Placing the images (t-SNE)…";
      map = await call("GET", "/api/map");
    }
    const note = $("map-note");
    if (map.error) { note.textContent = map.error; note.className = "error"; return; }
    note.textContent = (map.sampled ? `An even sample of ${map.shown.toLocaleString()} of ` +
      `${map.total.toLocaleString()} images (sampled above the size t-SNE draws quickly). ` :
      `All ${map.total.toLocaleString()} images. `) +
      "Placed by the similarity of their hashes (t-SNE); groups have colours, " +
      "others are grey. Point at a dot to see it, click to open its group.";
    const cv = $("map"), r = cv.getBoundingClientRect();
    cv.width = r.width; cv.height = r.height;
    const g = cv.getContext("2d"); g.clearRect(0, 0, cv.width, cv.height);
    map.xy = map.points.map(([id, x, y, grp]) => [id, 12 + x * (cv.width - 24), 12 + y * (cv.height - 24), grp]);
    for (const [, x, y, grp] of map.xy) {
      g.fillStyle = grp < 0 ? "rgba(120,120,120,.5)" : `hsl(${(grp * 137.5) % 360},70%,45%)`;
      g.beginPath(); g.arc(x, y, grp < 0 ? 2.5 : 4, 0, 7); g.fill();
    }
    cv.dataset.drawn = map.xy.length;
  }
  function nearest(e) {
    if (!map || !map.xy) return null;
    const r = $("map").getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
    let best = null, bd = 64;
    for (const p of map.xy) { const d = (p[1] - x) ** 2 + (p[2] - y) ** 2; if (d < bd) { bd = d; best = p; } }
    return best;
  }
  $("map").addEventListener("mousemove", e => {
    const p = nearest(e), tip = $("map-tip");
    if (!p) { tip.style.display = "none"; return; }
    tip.querySelector("img").src = "/thumb/" + p[0];
    tip.style.left = (p[1] + 10) + "px"; tip.style.top = (p[2] + 10) + "px"; tip.style.display = "block";
  });
  $("map").addEventListener("click", guard(async e => {
    const p = nearest(e);
    if (p && p[3] >= 0) await openGroup(p[3]);
    else if (p) say("that image is in no group");
  }));
  async function openGroup(n) {
    show("groups");
    const size = state.data ? state.data.size : 20;
    await load(Math.floor(n / size) + 1, n % size);
    markFocus(true);
  }

  // ---- views and keys ----
  function show(name) {
    state.view = name;
    for (const v of ["groups", "search", "map"]) {
      $(v + "-view").classList.toggle("hidden", v !== name);
      $("tab-" + v).classList.toggle("on", v === name);
    }
    if (name === "map") guard(drawMap)();
  }
  $("tab-groups").onclick = () => show("groups");
  $("tab-search").onclick = () => show("search");
  $("tab-map").onclick = () => show("map");
  $("apply").onclick = guard(apply);
  $("undo").onclick = guard(undo);
  $("done").onclick = guard(done);
  async function moveFocus(step) {
    const d = state.data, n = state.focus + step;
    if (n >= d.groups.length && d.page < d.pages) await load(d.page + 1, 0);
    else if (n < 0 && d.page > 1) await load(d.page - 1, d.size - 1);
    else state.focus = Math.max(0, Math.min(n, d.groups.length - 1));
    state.tile = 0; markFocus(true);
  }
  document.addEventListener("keydown", guard(async e => {
    if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "Escape") { closeCompare(); closeModal(); return; }
    if (state.view !== "groups" || !state.data || !$("modal").classList.contains("hidden")) return;
    const g = state.data.groups[state.focus];
    const k = e.key;
    if (k === "j" || k === "ArrowDown") { e.preventDefault(); await moveFocus(1); }
    else if (k === "k" || k === "ArrowUp") { e.preventDefault(); await moveFocus(-1); }
    else if (!g) return;
    else if (k === "ArrowRight" || k === "l") { state.tile = Math.min(state.tile + 1, g.items.length - 1); markFocus(false); }
    else if (k === "ArrowLeft" || k === "h") { state.tile = Math.max(state.tile - 1, 0); markFocus(false); }
    else if (k === " " || k === "Enter") { e.preventDefault(); const t = state.tile; await toggle(g, g.items[t]); state.tile = t; markFocus(false); }
    else if (k === "x") { await notDuplicate(g, [g.items[state.tile].id]); }
    else if (k === "c") { compare(g); }
    else if (k === "n") { if (state.data.page < state.data.pages) await load(state.page + 1); }
    else if (k === "p") { if (state.page > 1) await load(state.page - 1); }
    else if (k === "a") { await apply(); }
  }));
  guard(() => load(1))().then(() => { document.body.dataset.ready = "1"; });
})();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
