"""Shared helpers: real images drawn with Pillow, real params files, main(),
and the session's one throw-away PostgreSQL server.

pytest.ini puts the checkout, tests/ and examples/ on sys.path."""

import contextlib
import json
import os
import shutil
import subprocess

import pytest

import pg_server as pgs_
import reverse_search as rs
from make_examples import picture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def drawn_collection(tmp_path_factory):
    """The collection's files, drawn and encoded once for the session
    (0.15 s of CPU each time; a copy takes 0.02 s).  Tests use `collection`."""
    from PIL import Image
    root = tmp_path_factory.mktemp("collection")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    queries = root / "queries"
    queries.mkdir()
    for seed in range(1, 6):
        picture(seed).save(imgs / f"p{seed}.jpg", quality=92)
    picture(1).resize((320, 240), Image.LANCZOS).save(imgs / "sub" / "p1_small.png")
    picture(2).save(imgs / "sub" / "p2_q40.jpg", quality=40)
    picture(1).resize((200, 150), Image.LANCZOS).save(queries / "q1.jpg")
    picture(50).save(queries / "other.jpg")
    return root


@pytest.fixture
def collection(tmp_path, drawn_collection):
    """Five distinct pictures, two edited copies, and a query folder: a fresh
    copy in this test's tmp_path (written now, as if drawn now), its own to
    change."""
    copy_fresh(drawn_collection, tmp_path)
    return tmp_path


def copy_fresh(template, dest):
    """The files under `template` written anew under `dest` (new folders and
    files, no times or modes copied): a session's drawn pictures, each test's
    own to change."""
    for top, _, files in os.walk(template):
        here = os.path.join(dest, os.path.relpath(top, template))
        os.makedirs(here, exist_ok=True)
        for name in files:
            shutil.copyfile(os.path.join(top, name), os.path.join(here, name))


def _pg_skip_or_fail(reason):
    if os.environ.get("REVERSE_SEARCH_REQUIRE_PG") == "1":
        pytest.fail(f"REVERSE_SEARCH_REQUIRE_PG=1 but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def pg_server():
    """One throw-away server (tests/pg_server.py) for the whole session.
    Defined here only: a module that imported it would get a server of its own."""
    reason = pgs_.unavailable()
    if reason:
        _pg_skip_or_fail(reason)
    try:
        # WAL recycled at 96 MB: each new database writes 4 MB of it, and
        # the cluster lives in memory when there is room (fast_base)
        server = pgs_.PgServer(settings={"max_wal_size": "96MB",
                                         "min_wal_size": "32MB"},
                               base=pgs_.fast_base()).start()
    except pgs_.PgUnavailable as exc:
        _pg_skip_or_fail(f"cannot start a server: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A fresh empty database for one test."""
    return pg_server.new_database()


def copy_checkout(dest, skip=()):
    """The files a fresh clone has (what git tracks, less the top-level
    folders in `skip`) copied to `dest`; never the untracked rest of a
    working checkout (a venv, build output: 500 MB under .ci/ after CI)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                                capture_output=True).stdout
        files = [f for f in os.fsdecode(listed).split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = []
    if not files:  # a source archive: everything but what the tool and CI make
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            "db", "index", "results", ".git", ".venv", "venv", "build", "dist",
            "__pycache__", "params.json", *skip))
        return
    for name in files:
        if name.split("/", 1)[0] in skip or not os.path.isfile(os.path.join(ROOT, name)):
            continue  # a file deleted but not yet committed is not in a clone
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), target)


def write_params(folder, **keys):
    """A params.json in `folder` with paths inside it, plus `keys`."""
    base = {"img_dirs": ["imgs"], "input_dir": "queries", "db_dir": "db",
            "bk_dir": "index", "output_dir": "out", "workers": 1}
    base.update(keys)
    path = os.path.join(folder, "params.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(base, fh)
    return path


@contextlib.contextmanager
def edge_judge(params):
    """`build`, then what find_duplicates judges pairs with: (flat index,
    store, Judge, EdgeJudge), closed afterwards."""
    assert rs.main(["build", "--params", params, "-q"]) == 0
    cfg = rs.config_from(rs.read_params(params), params, {})
    store = rs._open_store(cfg)
    judge = rs.Judge(cfg, rs.Console(quiet=True))
    try:
        flat = rs.load_index(cfg, store, rs.Console(quiet=True))
        yield flat, store, judge, rs.EdgeJudge(judge, flat, store,
                                               cfg.distance_threshold)
    finally:
        judge.close()
        store.close()


def run_json(capsys, params, *args):
    """main() with --format json; returns (exit code, parsed stdout)."""
    capsys.readouterr()
    code = rs.main([*args, "--params", str(params), "--format", "json", "-q"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 and out.strip() else None)


def brute_pairs(ints, radius):
    """Every (i, j), i < j, within radius: the reference for all engines."""
    return {(i, j) for i in range(len(ints)) for j in range(i + 1, len(ints))
            if (ints[i] ^ ints[j]).bit_count() <= radius}


def brute_groups(n, near):
    """Groups of two or more of range(n) joined by every pair (i, j), i < j,
    for which near(i, j) is true: plain union-find, the reference for the
    engines' grouping."""
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for i in range(n):
        for j in range(i + 1, n):
            if near(i, j):
                parent[root(i)] = root(j)
    comps = {}
    for p in range(n):
        comps.setdefault(root(p), []).append(p)
    return sorted(g for g in comps.values() if len(g) > 1)


# ---- the browser (Debian's chromium through playwright) ----

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _no_browser(reason):
    if os.environ.get("REVERSE_SEARCH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and REVERSE_SEARCH_REQUIRE_BROWSER=1")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """One headless Debian chromium per test module; each test opens its own
    pages.  Not one for the session: its driver's thread would stay alive,
    and with a second thread the tool starts workers by spawn, not fork, so
    the tests that follow would run another path than a user's."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        _no_browser("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()
