"""The PyInstaller executable does real work, and does it like the script.

Builds dist/reverse_search once per session with build_exe.py (several
minutes; reused while it is newer than reverse_search.py and build_exe.py),
copies it into an empty folder and runs it there as a user would: first run
without params.json, then build, search and find_duplicates with every hash
method, with 2 spawned hashing processes.  Each JSON result must equal the
one `python reverse_search.py` gives for the same run, timings aside.

Skipped when PyInstaller is not installed (pip install -r
requirements-build.txt), unless REVERSE_SEARCH_REQUIRE_FROZEN=1, as in CI,
where a missing PyInstaller is a failure.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, picture, rs

REQUIRED = os.environ.get("REVERSE_SEARCH_REQUIRE_FROZEN") == "1"
HAVE_PYINSTALLER = importlib.util.find_spec("PyInstaller") is not None
if not HAVE_PYINSTALLER and not REQUIRED:
    pytest.skip("PyInstaller is not installed (pip install -r "
                "requirements-build.txt); set REVERSE_SEARCH_REQUIRE_FROZEN=1 "
                "to make this a failure", allow_module_level=True)

pytestmark = pytest.mark.slow  # builds the executable: minutes

EXE_NAME = "reverse_search" + (".exe" if os.name == "nt" else "")
DIST_EXE = os.path.join(ROOT, "dist", EXE_NAME)
SOURCES = [os.path.join(ROOT, "reverse_search.py"),
           os.path.join(ROOT, "build_exe.py")]
RUN_TIMEOUT = 300


@pytest.fixture(scope="session")
def frozen_exe():
    """dist/reverse_search, built now unless newer than its sources."""
    if not HAVE_PYINSTALLER:  # each test fails; the rest of the suite runs
        pytest.fail("REVERSE_SEARCH_REQUIRE_FROZEN=1 but PyInstaller is not "
                    "installed: pip install -r requirements-build.txt",
                    pytrace=False)
    fresh = os.path.exists(DIST_EXE) and os.path.getmtime(DIST_EXE) > max(
        map(os.path.getmtime, SOURCES))
    if not fresh:
        done = subprocess.run([sys.executable, "build_exe.py", "--no-check"],
                              cwd=ROOT, capture_output=True, text=True,
                              timeout=1800)
        if done.returncode != 0 or not os.path.exists(DIST_EXE):
            pytest.fail(f"python build_exe.py failed ({done.returncode}):\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}",
                        pytrace=False)
    return DIST_EXE


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A stand-in web browser (POSIX): records each page it is asked to open
    and the LD_LIBRARY_PATH it was started with.  Set as BROWSER for every
    run, so no real browser ever opens, wherever the tests run."""
    folder = tmp_path_factory.mktemp("browser")
    record = folder / "opened.txt"
    if os.name != "posix":
        return None, record
    script = folder / "browser.sh"
    script.write_text("#!/bin/sh\n"
                      f"printf '%s\\t%s\\n' \"$1\" \"${{LD_LIBRARY_PATH-}}\" "
                      f">> '{record}'\n", encoding="utf-8")
    script.chmod(0o755)
    return str(script), record


def run(args, cwd, browser=(None, None), start_method=None, home=None):
    env = dict(os.environ)
    if home:  # where the first run looks for a Pictures folder
        env["HOME"] = env["USERPROFILE"] = str(home)
    if start_method:
        env[rs.START_METHOD_ENV] = start_method
    if browser[0]:
        env["BROWSER"] = browser[0]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL,
                          env=env)


def opened(browser):
    """(url, LD_LIBRARY_PATH) of each page opened since the last call."""
    record = browser[1]
    if not record.exists():
        return []
    lines = record.read_text(encoding="utf-8").splitlines()
    record.unlink()
    return [tuple(line.split("\t", 1)) for line in lines]


def test_first_run_writes_params_beside_the_exe(frozen_exe, tmp_path, browser):
    app, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    app.mkdir()
    elsewhere.mkdir()
    exe = shutil.copy2(frozen_exe, app / EXE_NAME)
    version = run([exe, "--version"], elsewhere, browser)
    assert (version.returncode, version.stdout.strip()) == (0, rs.__version__)
    assert sorted(os.listdir(app)) == [EXE_NAME]
    opened(browser)
    home = tmp_path / "home"  # no Pictures folder: img_dirs is photos/ beside it
    home.mkdir()
    first = run([exe], elsewhere, browser, home=home)  # a double-click: no arguments
    assert first.returncode == 0, first.stderr
    params = app / "params.json"
    assert params.is_file() and os.listdir(elsewhere) == []
    assert (app / "photos").is_dir()  # made for the pictures to check
    assert str(params) in first.stderr and "img_dirs" in first.stderr
    assert first.stdout == ""
    written = json.loads(params.read_text(encoding="utf-8"))
    assert written == dict(rs.default_params(), img_dirs=["photos"], input_dir="find",
                           operation="find_duplicates")
    if browser[0]:  # what to do is also shown as a page, for a double-click
        pages = [url for url, _ in opened(browser)]
        assert len(pages) == 1 and pages[0].startswith("file://"), pages
        page = app / os.path.basename(pages[0])
        assert str(params) in page.read_text(encoding="utf-8")
    # the default img_dirs is photos/ beside the exe (no Pictures folder
    # here): the second double-click finds the duplicates there
    second = run([exe], elsewhere, browser, home=home)
    assert second.returncode == 0, second.stderr
    assert "find_duplicates: 0 groups" in second.stderr, second.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="LD_LIBRARY_PATH is the Linux bootloader's")
def test_browser_starts_with_the_system_libraries(frozen_exe, tmp_path,
                                                  browser):
    """The onefile bootloader puts its unpacked folder first on
    LD_LIBRARY_PATH; a browser started with it would load the bundle's
    libstdc++/libcrypto instead of its own and may not start."""
    exe = shutil.copy2(frozen_exe, tmp_path / EXE_NAME)
    opened(browser)
    env_before = os.environ.get("LD_LIBRARY_PATH", "")
    assert run([exe], tmp_path, browser).returncode == 0
    pages = opened(browser)
    assert pages and all(lib == env_before for _, lib in pages), pages


@pytest.fixture(scope="module")
def layout(tmp_path_factory, frozen_exe):
    """tmp/app (the exe, alone), tmp/script, tmp/photos, tmp/queries."""
    from PIL import Image
    root = tmp_path_factory.mktemp("frozen")
    app, script, photos, queries = (root / n for n in
                                    ("app", "script", "photos", "queries"))
    for folder in (app, script, photos / "copies", queries):
        folder.mkdir(parents=True)
    shutil.copy2(frozen_exe, app / EXE_NAME)
    # more images than Hasher hashes in-process, so build spawns its workers
    count = max(rs.Hasher.SMALL_JOB.values()) + 12
    for seed in range(1, count + 1):
        picture(seed, (160, 120)).save(
            photos / f"p{seed:03d}.{'png' if seed % 3 else 'jpg'}")
    big = picture(1)
    big.save(photos / "copies" / "p001_big.jpg", quality=90)
    big.resize((80, 60), Image.LANCZOS).save(photos / "copies" / "p001_small.png")
    picture(2, (160, 120)).save(photos / "copies" / "p002_q30.jpg", quality=30)
    picture(3, (160, 120)).save(photos / "copies" / "p003.webp", quality=80)
    try:  # a HEIC copy: the frozen build must carry pillow_heif's decoder
        import pillow_heif
        pillow_heif.from_pillow(picture(4, (160, 120))).save(
            photos / "copies" / "p004.heic", quality=90)
    except Exception:  # an encoder-less libheif: not this test's business
        pass
    big.resize((120, 90), Image.LANCZOS).save(queries / "q_p001.jpg", quality=85)
    picture(5, (160, 120)).save(queries / "q_p005.png")
    picture(999, (160, 120)).save(queries / "q_unrelated.jpg")
    return root


def write_params(folder, photos_root, method):
    """params.json in `folder`; the exe's uses paths relative to it."""
    keys = {"img_dirs": [os.path.join(photos_root, "photos")],
            "input_dir": os.path.join(photos_root, "queries"),
            "db_dir": f"db_{method}", "bk_dir": f"index_{method}",
            "output_dir": f"results_{method}", "hash_method": method,
            "workers": 2, "distance_threshold": 6}
    with open(os.path.join(folder, "params.json"), "w", encoding="utf-8") as fh:
        json.dump(keys, fh, indent=1)


def normalised(doc, roots):
    """The JSON result without timings, with each run's own folder as <HERE>."""
    if isinstance(doc, dict):
        return {k: normalised(v, roots) for k, v in doc.items()
                if not k.endswith("seconds")}
    if isinstance(doc, list):
        return [normalised(v, roots) for v in doc]
    if isinstance(doc, str):
        for root in roots:
            doc = doc.replace(root, "<HERE>")
    return doc


def json_run(args, cwd, what, start_method=None):
    done = run([*args, "--format", "json", "-q"], cwd, (None, None),
               start_method)
    assert done.returncode == 0, f"{what}: exit {done.returncode}\n{done.stderr}"
    try:
        return json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"{what}: not JSON:\n{done.stdout[:2000]}\n{done.stderr}")


@pytest.mark.parametrize("method", rs.HASH_METHODS)
def test_exe_gives_the_scripts_results(layout, method):
    app, script = layout / "app", layout / "script"
    exe = str(app / EXE_NAME)
    # the exe reads params.json beside itself (its paths are relative to
    # it: "../photos"); the script is given an equal file with --params
    write_params(app, "..", method)
    write_params(script, str(layout), method)
    roots = [str(app), str(script)]
    for op in ("build", "search", "find_duplicates"):
        # spawned workers: the path freeze_support serves on Windows/macOS
        frozen = json_run([exe, op], layout, f"exe {op} {method}", "spawn")
        plain = json_run([sys.executable, os.path.join(ROOT, "reverse_search.py"),
                          op, "--params", str(script / "params.json")],
                         layout, f"script {op} {method}")
        assert normalised(frozen, roots) == normalised(plain, roots), \
            f"{op} with {method}: the executable and the script differ"
        if op == "build":
            files = sum(len(f) for _, _, f in os.walk(layout / "photos"))
            assert (frozen["hashed"], frozen["failed"]) == (files, 0), frozen
        if op == "search":
            found = {os.path.basename(q["query"]):
                     {os.path.basename(m["path"]) for m in q["matches"]}
                     for q in frozen["queries"]}
            assert {"p001_big.jpg", "p001_small.png"} <= found["q_p001.jpg"], \
                found


def test_a_double_click_opens_the_review_page_with_its_map(frozen_exe, tmp_path):
    """The default double-click (find_duplicates, from the params.json the
    first run writes) that finds groups opens the review page; its map
    draws (scikit-learn is in the executable); Done on the page ends the
    program, and without Done it ends by itself when idle."""
    from test_double_click import (DoubleClick, IDLE_MINUTES, check_review_page,
                                   duplicated_pictures)
    app, home, elsewhere, setup = (tmp_path / n for n in
                                   ("app", "home", "elsewhere", "setup"))
    for folder in (app, home, elsewhere, setup):
        folder.mkdir()
    exe = shutil.copy2(frozen_exe, app / EXE_NAME)
    env = dict(os.environ, HOME=str(home), USERPROFILE=str(home))
    first = DoubleClick([exe], elsewhere, setup, env)
    assert first.finish(timeout=RUN_TIMEOUT)[0] == 0  # writes params.json
    params = app / "params.json"
    keys = json.loads(params.read_text(encoding="utf-8"))
    assert (keys["operation"], keys["img_dirs"]) == ("find_duplicates", ["photos"])
    duplicated_pictures(app / "photos")
    for stop in ("done on the page", "idle"):
        # the user's one edit here; quiet ends only the second run: a slow
        # machine's pause between two requests must not end the first
        keys["review_idle_minutes"] = IDLE_MINUTES if stop == "idle" else 5
        params.write_text(json.dumps(keys), encoding="utf-8")
        browser = tmp_path / stop.replace(" ", "_")
        browser.mkdir()
        click = DoubleClick([exe], elsewhere, browser, env)
        click.wait_for_review(timeout=RUN_TIMEOUT)
        check_review_page(click, groups=2)
        if stop == "idle":
            start = time.monotonic()
        else:
            status, body = click.request("GET", "/api/map")
            drawn = json.loads(body)
            assert status == 200 and len(drawn.get("points", [])) == 5, drawn
            assert click.request("POST", "/api/stop", b"{}")[0] == 200
        code, out, err = click.finish(timeout=RUN_TIMEOUT)
        assert code == 0, err
        assert click.opened() == [click.url]  # the page, not the report too
        assert f"review: stopped ({stop})" in err, err
        if stop == "idle":
            assert time.monotonic() - start < 60
    log = (app / "reverse_search.log").read_text(encoding="utf-8")
    assert log.count("review: http://127.0.0.1:") == 2
