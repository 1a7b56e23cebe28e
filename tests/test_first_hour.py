"""What a new user meets in the first hour (issue 15): the database follows
img_dirs, the keep rule keeps the original, quiet runs still print results,
scripts get complete CSV and JSON, the report explains itself."""

import json
import os
import sqlite3

import pytest
from PIL import Image

from conftest import picture, rs, run_json, write_params


def run(capsys, params, *args):
    """main() with --format json; (exit code, parsed stdout, stderr)."""
    capsys.readouterr()
    code = rs.main([*args, "--params", str(params), "--format", "json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def matched(doc):
    """{query file name: [matched file names]} of a search document."""
    return {os.path.basename(q["query"]): sorted(os.path.basename(m["path"])
                                                 for m in q["matches"])
            for q in doc["queries"]}


def grouped(doc):
    return sorted(sorted(os.path.basename(i["path"]) for i in g["images"])
                  for g in doc["groups"])


# ---- item 1: the database covers the folders params.json names ----

@pytest.fixture
def two_folders(collection):
    """imgs/ (the collection fixture) and more/, with a copy of the query
    queries/other.jpg and a pair of duplicates of their own."""
    more = collection / "more"
    more.mkdir()
    picture(50).save(more / "p50.jpg", quality=92)
    picture(60).save(more / "p60.jpg", quality=92)
    picture(60).save(more / "p60_q40.jpg", quality=40)
    return collection


def stores(collection, url):
    lite = write_params(collection)
    if url is None:
        return [lite]
    (collection / "pg").mkdir()
    return [lite, write_params(collection / "pg", database_url=url,
                               img_dirs=[str(collection / "imgs")],
                               input_dir=str(collection / "queries"))]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_search_follows_img_dirs_when_they_change(two_folders, capsys, request, store):
    url = request.getfixturevalue("pg_url") if store == "postgresql" else None
    params = stores(two_folders, url)[-1]
    more, imgs = str(two_folders / "more"), str(two_folders / "imgs")
    code, doc, _ = run(capsys, params, "search")
    assert code == 0 and matched(doc)["q1.jpg"] and matched(doc)["other.jpg"] == []
    # the user points img_dirs at another folder: it is hashed first, and the
    # old folder is not answered from
    code, doc, err = run(capsys, params, "search", "--img-dirs", more)
    assert code == 0
    assert matched(doc) == {"q1.jpg": [], "other.jpg": ["p50.jpg"]}
    assert "not cover yet" in err and more in err
    assert "not searched" in err and imgs in err
    code, doc, _ = run(capsys, params, "find_duplicates", "--img-dirs", more)
    assert grouped(doc) == [["p60.jpg", "p60_q40.jpg"]]
    plan = json.load(open(two_folders / ("pg" if url else "") / "out" / "plan.json"))
    planned = plan["entries"] if isinstance(plan, dict) else plan
    assert {os.path.dirname(e["path"]) for e in planned} == {more}
    # back to the first folder: nothing is hashed again, nothing of more/ shows
    code, doc, err = run(capsys, params, "search", "--img-dirs", imgs)
    assert "not cover yet" not in err
    assert matched(doc)["other.jpg"] == [] and matched(doc)["q1.jpg"]
    # both: one search answers from both, without hashing
    code, doc, err = run(capsys, params, "search", "--img-dirs", imgs, more)
    assert "not cover yet" not in err and "not searched" not in err
    assert matched(doc)["other.jpg"] == ["p50.jpg"] and matched(doc)["q1.jpg"]


def test_update_keeps_a_dropped_folder_for_when_it_comes_back(two_folders, capsys):
    params = write_params(two_folders, img_dirs=["imgs", "more"])
    code, doc, _ = run(capsys, params, "build")
    assert doc["hashed"] == 10
    code, doc, err = run(capsys, params, "update", "--img-dirs", str(two_folders / "imgs"))
    assert (doc["removed"], doc["hashed"]) == (0, 0)
    assert "not searched" in err and "build drops them" in err
    code, doc, _ = run(capsys, params, "update")
    assert (doc["hashed"], doc["unchanged"], doc["removed"]) == (0, 10, 0)
    # build starts again from img_dirs alone
    code, doc, _ = run(capsys, params, "build", "--img-dirs", str(two_folders / "more"))
    code, doc, err = run(capsys, params, "export")
    assert {os.path.basename(os.path.dirname(i["path"])) for i in doc["images"]} == {"more"}


def test_a_database_from_before_coverage_is_upgraded(two_folders, capsys):
    params = write_params(two_folders, img_dirs=["imgs", "more"])
    run(capsys, params, "build")
    db = sqlite3.connect(two_folders / "db" / "images.db")
    with db:
        db.execute("DELETE FROM meta WHERE key = 'img_dirs'")
    db.close()
    code, doc, err = run(capsys, params, "search", "--img-dirs", str(two_folders / "more"))
    assert code == 0 and matched(doc) == {"q1.jpg": [], "other.jpg": ["p50.jpg"]}
    code, doc, err = run(capsys, params, "update")
    assert code == 0 and doc["hashed"] == 0
    code, doc, err = run(capsys, params, "search")
    assert "not searched" not in err and matched(doc)["other.jpg"] == ["p50.jpg"]


# ---- item 2: the keep rule keeps what a person would keep, and says why ----

def same_age(*paths, when=1_700_000_000):
    for path in paths:
        os.utime(path, (when, when))


@pytest.fixture
def album(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "queries").mkdir()
    return tmp_path


def only_group(capsys, params):
    run(capsys, params, "update")
    code, doc, err = run(capsys, params, "find_duplicates")
    assert code == 0 and len(doc["groups"]) == 1, doc
    group = doc["groups"][0]
    kept = [os.path.basename(i["path"]) for i in group["images"] if i["keep"]]
    return kept, group["keep_reason"], doc


def test_a_png_conversion_of_a_jpeg_is_not_kept(album, capsys):
    imgs = album / "imgs"
    picture(3).save(imgs / "photo.jpg", quality=90)
    Image.open(imgs / "photo.jpg").save(imgs / "photo_converted.png")  # larger
    same_age(imgs / "photo.jpg", imgs / "photo_converted.png")
    kept, reason, _ = only_group(capsys, write_params(album))
    assert kept == ["photo.jpg"]
    assert reason == "kept: original format (JPEG, the PNG copies are re-encodes)"


def test_the_oldest_is_kept_and_the_reason_is_everywhere(album, capsys):
    imgs = album / "imgs"
    picture(3).save(imgs / "b_original.jpg", quality=80)
    picture(3).save(imgs / "a_copy.jpg", quality=95)  # a larger file
    same_age(imgs / "b_original.jpg", when=1_600_000_000)
    same_age(imgs / "a_copy.jpg", when=1_600_000_000 + 3 * 86400)
    params = write_params(album)
    kept, reason, _ = only_group(capsys, params)
    assert kept == ["b_original.jpg"] and reason == "kept: oldest (by 3 days)"
    plan = json.load(open(album / "out" / "plan.json"))["entries"]
    assert [e["reason"] for e in plan if e["action"] == "keep"] == [reason]
    assert reason in (album / "out" / "plan.csv").read_text()
    capsys.readouterr()
    rs.main(["find_duplicates", "--params", params])
    assert f"reclaimable; {reason}" in capsys.readouterr().out


def test_more_pixels_then_camera_exif_then_colour(album, capsys):
    imgs = album / "imgs"
    params = write_params(album)
    picture(4).save(imgs / "big.jpg", quality=90)
    picture(4).resize((320, 240), Image.LANCZOS).save(imgs / "small.jpg", quality=95)
    kept, reason, _ = only_group(capsys, params)
    assert kept == ["big.jpg"] and reason == "kept: 4x the pixels"
    os.remove(imgs / "small.jpg")
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Camera maker", "Model 1"
    picture(4).save(imgs / "camera.jpg", quality=70, exif=exif)  # smaller file
    same_age(imgs / "big.jpg", imgs / "camera.jpg")
    kept, reason, _ = only_group(capsys, params)
    assert kept == ["camera.jpg"] and reason.startswith("kept: camera EXIF")
    os.remove(imgs / "camera.jpg")
    picture(4).convert("L").save(imgs / "grey.jpg", quality=100)  # larger file
    same_age(imgs / "big.jpg", imgs / "grey.jpg")
    kept, reason, _ = only_group(capsys, params)
    assert kept == ["big.jpg"]
    assert reason == "kept: no edits detected (the next is greyscale)"


def test_a_database_without_traits_is_upgraded_by_update(album, capsys):
    imgs = album / "imgs"
    picture(3).save(imgs / "photo.jpg", quality=90)
    Image.open(imgs / "photo.jpg").save(imgs / "photo_converted.png")
    same_age(imgs / "photo.jpg", imgs / "photo_converted.png")
    params = write_params(album)
    run(capsys, params, "build")
    db = sqlite3.connect(album / "db" / "images.db")  # as version 1 wrote it
    with db:
        db.execute("ALTER TABLE images DROP COLUMN traits")
        db.execute("PRAGMA user_version = 1")
    db.close()
    code, doc, err = run(capsys, params, "find_duplicates")
    assert code == 0 and "run update" in err
    code, doc, err = run(capsys, params, "update")
    assert (doc["hashed"], doc["reused"]) == (2, 0)
    kept, reason, _ = only_group(capsys, params)
    assert kept == ["photo.jpg"]


# ---- item 4: -q silences notices, not results ----

def test_quiet_still_prints_the_results(collection, capsys):
    params = write_params(collection)
    rs.main(["build", "--params", params, "-q"])
    capsys.readouterr()
    assert rs.main(["search", "--params", params, "-q"]) == 0
    out, err = capsys.readouterr()
    assert "q1.jpg" in out and "p1.jpg" in out and "no match" in out
    assert err == ""
    assert rs.main(["find_duplicates", "--params", params, "-q"]) == 0
    out, err = capsys.readouterr()
    assert "group 1:" in out and err == ""


# ---- item 14: output for scripts ----

def test_duplicates_csv_has_keep_as_json_action_how_and_failures(collection, capsys):
    import csv
    import io
    (collection / "imgs" / "broken.jpg").write_bytes(b"not an image")
    params = write_params(collection, protected_dirs=["imgs/sub/keepme"])
    (collection / "imgs" / "sub" / "keepme").mkdir()
    picture(5).save(collection / "imgs" / "sub" / "keepme" / "p5_copy.jpg", quality=60)
    code, doc, _ = run(capsys, params, "find_duplicates")
    capsys.readouterr()
    rs.main(["find_duplicates", "--params", params, "--format", "csv", "-q"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    images = [i for g in doc["groups"] for i in g["images"]]
    assert [r["keep"] for r in rows if r["group"]] == \
        [json.dumps(i["keep"]) for i in images]
    assert [r["action"] for r in rows if r["group"]] == [i["action"] for i in images]
    assert {i["action"] for i in images} == {"keep", "move", "protected"}
    assert all(r["keep_reason"].startswith("kept: ") for r in rows if r["keep"] == "true")
    assert {"how", "stage", "action", "keep_reason", "error"} <= set(rows[0])
    failed = [r for r in rows if not r["group"]]
    assert [os.path.basename(r["path"]) for r in failed] == ["broken.jpg"]
    assert "not an image" in failed[0]["error"]
    with open(collection / "out" / "find_duplicates.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == rows


def test_an_error_still_gives_a_json_document(collection, capsys):
    params = write_params(collection)
    code = rs.main(["search", "--params", params, "--format", "json",
                    "--img-dirs", str(collection / "nowhere")])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert code == 2 and doc["exit_code"] == 2 and doc["operation"] == "search"
    assert "nowhere" in doc["error"] and "nowhere" in err
    code = rs.main(["search", "--params", params, "--format", "json", "--no-such-flag"])
    assert code == 2 and json.loads(capsys.readouterr().out)["exit_code"] == 2


def test_text_export_has_a_header_and_no_none(collection, capsys):
    (collection / "imgs" / "broken.jpg").write_bytes(b"not an image")
    params = write_params(collection)
    rs.main(["build", "--params", params, "-q"])
    capsys.readouterr()
    assert rs.main(["export", "--params", params, "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["path", "hash", "size", "width", "height",
                                    "mtime", "error"]
    assert len(lines) == 9 and "None" not in "\n".join(lines)


def test_a_closed_pipe_ends_quietly(collection):
    import subprocess
    import sys
    params = write_params(collection)
    script = os.path.join(os.path.dirname(rs.__file__), "reverse_search.py")
    subprocess.run([sys.executable, script, "build", "--params", params, "-q"], check=True)
    proc = subprocess.Popen([sys.executable, script, "export", "--params", params],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141)
    assert "Broken pipe" not in err and "Exception" not in err


# ---- item 7: params.json is the user's; the defaults live in the script ----

def test_params_json_is_not_tracked_and_tests_do_not_read_it():
    import subprocess
    root = os.path.dirname(rs.__file__)
    if not os.path.isdir(os.path.join(root, ".git")) and \
            not os.path.isfile(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "params.json"], cwd=root,
                             capture_output=True, text=True).stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "params.json"], cwd=root)
    assert tracked == "" and ignored.returncode == 0
    tests = os.path.join(root, "tests")
    for name in os.listdir(tests):
        if name.endswith(".py") and name != "test_first_hour.py":
            text = open(os.path.join(tests, name), encoding="utf-8").read()
            assert "default_params_path()" not in text, name


def test_a_fresh_clone_runs_the_examples_on_first_run(tmp_path, capsys):
    import shutil
    root = tmp_path / "clone"
    shutil.copytree(os.path.join(os.path.dirname(rs.__file__), "examples"),
                    root / "examples")
    capsys.readouterr()
    assert rs.main(["--params", str(root / "params.json"), "-q"]) == 0
    assert "forest.jpg" in capsys.readouterr().out  # it searched
    capsys.readouterr()
    assert rs.main(["--params", str(root / "params.json")]) == 0
    assert "Created" not in capsys.readouterr().err  # written once


# ---- item 8: the double-clicked executable ----

def test_a_first_double_click_says_what_to_edit(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER", "true")
    monkeypatch.setattr(rs.sys, "frozen", True, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    (tmp_path / "home" / "Pictures").mkdir(parents=True)
    app = tmp_path / "app"
    app.mkdir()
    (app / "README.md").write_text("# guide")
    params = app / "params.json"
    assert rs.run_from_desktop(str(params)) == 0
    written = json.loads(params.read_text())
    assert written["img_dirs"] == [str(tmp_path / "home" / "Pictures")]
    assert written["operation"] == "find_duplicates"
    page = (app / "reverse_search-status.html").read_text()
    assert "set it up" in page and "<ol>" in page
    assert "C:/Users/you/Pictures" in page and "/home/you/Pictures" in page
    assert "README.md" in page and "file://" in page
    # two mistakes: both on the page at once
    params.write_text(json.dumps({"img_dirs": ["nowhere"], "hash_size": "eight",
                                  "distance_treshold": 3}))
    assert rs.run_from_desktop(str(params)) == 2
    page = (app / "reverse_search-status.html").read_text()
    assert "hash_size" in page and "distance_treshold" in page
    assert "C:/Users/you/Pictures" in page
    # then a success: the review page opens (it stops when idle: 3 s here)
    # and the old error page goes
    photos = app / "photos"
    photos.mkdir()
    picture(1).save(photos / "a.jpg")
    picture(1).resize((320, 240)).save(photos / "b.jpg")
    params.write_text(json.dumps({"img_dirs": ["photos"], "operation": "find_duplicates",
                                  "workers": 1, "review_idle_minutes": 0.05}))
    assert rs.run_from_desktop(str(params)) == 0
    assert not (app / "reverse_search-status.html").exists()
    # a move: its summary comes before the list of files
    params.write_text(json.dumps({"img_dirs": ["photos"], "operation": "move",
                                  "workers": 1}))
    assert rs.run_from_desktop(str(params)) == 0
    page = (app / "reverse_search-status.html").read_text()
    assert page.index("move: 1 file moved") < page.index("moved ")


def test_every_missing_folder_is_named_at_once(tmp_path, capsys):
    params = write_params(tmp_path, img_dirs=["one", "two"])
    assert rs.main(["build", "--params", params]) == 2
    err = capsys.readouterr().err
    assert "one does not exist" in err and "two does not exist" in err


# ---- item 15: the report explains itself ----

from test_report_browser import open_page, page_data  # noqa: E402,F401


def test_the_report_gives_scale_reason_and_what_move_takes(collection, capsys, open_page):
    imgs = collection / "imgs"
    # a crop, found by its centre: the longest badge text there is
    Image.open(imgs / "p3.jpg").crop((40, 30, 600, 450)).save(imgs / "p3_crop.jpg")
    params = write_params(collection, protected_dirs=["imgs/sub"])
    code, doc, _ = run(capsys, params, "find_duplicates")
    page_path = collection / "out" / "find_duplicates.html"
    data = page_data(str(page_path))
    assert data["threshold"] == 12
    assert [s["reason"] for s in data["sets"]] == [g["keep_reason"] for g in doc["groups"]]
    page = open_page(str(page_path))
    cards = page.locator(".card")
    scales = page.locator(".card .scale").all_inner_texts()
    assert scales and all(t.endswith(" of 64 bits differ · threshold 12") for t in scales)
    assert page.locator(".card.keep .why").all_inner_texts() == \
        [g["keep_reason"] for g in doc["groups"]]
    assert all(g["keep_reason"] in h for g, h in
               zip(doc["groups"], page.locator("section.set h2").all_inner_texts()))
    moves = [os.path.basename(i["path"]) for g in doc["groups"] for i in g["images"]
             if i["action"] == "move"]
    shown = page.locator(".card.move .name").all_inner_texts()
    assert moves and shown == moves
    assert page.locator(".action.protected").count() == \
        sum(i["action"] == "protected" for g in doc["groups"] for i in g["images"])
    for k in range(cards.count()):  # every badge inside its card
        card, badge = cards.nth(k).bounding_box(), \
            cards.nth(k).locator(".badge").bounding_box()
        assert badge["x"] + badge["width"] <= card["x"] + card["width"], k
