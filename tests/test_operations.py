"""Every operation through main(), on real images and a real SQLite file."""

import csv
import json
import multiprocessing
import os
import shutil
import sqlite3

import imagehash
import numpy as np
import pytest
from PIL import Image

from conftest import copy_checkout, rs, run_json, write_params, picture


def names(paths):
    return sorted(os.path.basename(p) for p in paths)


def test_build_then_search_finds_the_resized_copy(collection, capsys):
    params = write_params(collection)
    code, doc = run_json(capsys, params, "build")
    assert code == 0
    assert doc["hashed"] == 7 and doc["failed"] == 0
    code, doc = run_json(capsys, params, "search")
    assert code == 0 and doc["operation"] == "search"
    by_query = {os.path.basename(q["query"]): q for q in doc["queries"]}
    assert names(m["path"] for m in by_query["q1.jpg"]["matches"]) == \
        ["p1.jpg", "p1_small.png"]
    assert by_query["other.jpg"]["matches"] == []
    for m in by_query["q1.jpg"]["matches"]:
        assert os.path.isabs(m["path"]) and m["distance"] <= 5
        assert len(m["hash"]) == 16


def test_search_builds_a_missing_database_first(collection, capsys):
    params = write_params(collection)
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    assert os.path.exists(collection / "db" / "images.db")
    assert len(doc["queries"]) == 2


def test_search_matches_are_nearest_first_and_stop_on_first(collection, capsys):
    # hashes only: at 64 bits every picture matches (verified mode checks
    # far whole-hash matches of framed pictures on the pixels)
    params = write_params(collection, distance_threshold=64, matching="fast")
    code, doc = run_json(capsys, params, "search", str(collection / "queries" / "q1.jpg"))
    matches = doc["queries"][0]["matches"]
    assert len(matches) == 7
    assert [m["distance"] for m in matches] == sorted(m["distance"] for m in matches)
    code, first = run_json(capsys, params, "search", "--stop-on-first-match",
                           str(collection / "queries" / "q1.jpg"))
    assert first["queries"][0]["matches"] == matches[:1]


def test_threshold_zero_is_an_exact_hash_lookup(collection, capsys):
    shutil.copy(collection / "imgs" / "p3.jpg", collection / "queries" / "p3_copy.jpg")
    params = write_params(collection, distance_threshold=0)
    code, doc = run_json(capsys, params, "search")
    by_query = {os.path.basename(q["query"]): q for q in doc["queries"]}
    assert [(os.path.basename(m["path"]), m["distance"])
            for m in by_query["p3_copy.jpg"]["matches"]] == [("p3.jpg", 0)]


def test_find_duplicates_groups_edited_copies(collection, capsys):
    params = write_params(collection)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    groups = [names(i["path"] for i in g["images"]) for g in doc["groups"]]
    assert sorted(groups) == [["p1.jpg", "p1_small.png"], ["p2.jpg", "p2_q40.jpg"]]
    for g in doc["groups"]:
        first = g["images"][0]
        assert first["keep"] and first["distance"] == 0
        assert sum(i["keep"] for i in g["images"]) == 1
    p1 = next(g for g in doc["groups"] if "p1.jpg" in names(i["path"] for i in g["images"]))
    assert os.path.basename(p1["images"][0]["path"]) == "p1.jpg"  # more pixels


def test_identical_files_group_at_threshold_zero(collection, capsys):
    for k in range(3):
        shutil.copy(collection / "imgs" / "p4.jpg", collection / "imgs" / f"copy{k}.jpg")
    params = write_params(collection, distance_threshold=0)
    code, doc = run_json(capsys, params, "find_duplicates")
    groups = [names(i["path"] for i in g["images"]) for g in doc["groups"]]
    assert ["copy0.jpg", "copy1.jpg", "copy2.jpg", "p4.jpg"] in groups


def test_update_adds_modifies_and_forgets(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "build")
    code, doc = run_json(capsys, params, "update")
    assert (doc["hashed"], doc["unchanged"], doc["removed"]) == (0, 7, 0)
    picture(9).save(collection / "imgs" / "new.jpg")
    os.remove(collection / "imgs" / "p5.jpg")
    picture(7).save(collection / "imgs" / "p4.jpg")  # same name, new picture
    code, doc = run_json(capsys, params, "update")
    assert (doc["hashed"], doc["unchanged"], doc["removed"]) == (2, 5, 1)
    code, doc = run_json(capsys, params, "export")
    paths = names(i["path"] for i in doc["images"])
    assert "new.jpg" in paths and "p5.jpg" not in paths
    p4 = next(i for i in doc["images"] if i["path"].endswith("p4.jpg"))
    expected = str(imagehash.phash(rs.prepare_image(Image.open(collection / "imgs" / "p4.jpg"), rs.HashSpec())))
    assert p4["hash"] == expected


def test_moved_file_keeps_its_hash_without_decoding(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "build")
    os.rename(collection / "imgs" / "p3.jpg", collection / "imgs" / "sub" / "moved.jpg")
    code, doc = run_json(capsys, params, "update")
    assert (doc["hashed"], doc["reused"], doc["removed"]) == (0, 1, 0)
    assert doc["renamed"] == 1  # a move is not a removal


def test_build_replaces_the_database_only_when_complete(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "build")
    os.remove(collection / "imgs" / "p5.jpg")
    code, doc = run_json(capsys, params, "build")
    assert code == 0 and doc["hashed"] == 6
    assert not os.path.exists(collection / "db" / "images.db.new")
    con = sqlite3.connect(collection / "db" / "images.db")
    assert con.execute("select count(*) from images").fetchone()[0] == 6


def test_changing_hash_method_rehashes_never_mixes(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "build")
    code, doc = run_json(capsys, params, "update", "--hash-method", "dhash")
    assert code == 0 and doc["hashed"] == 7
    con = sqlite3.connect(collection / "db" / "images.db")
    meta = dict(con.execute("select key, value from meta"))
    assert meta["hash_method"] == "dhash"
    code, doc = run_json(capsys, params, "find_duplicates", "--hash-method", "dhash")
    assert code == 0 and doc["settings"]["hash_method"] == "dhash"


# exact mode hashes every window with imagehash: 10-14 s each for these
SLOW_EXACT = {"whash", "whash_db4", "colorhash"}


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.slow) if m in SLOW_EXACT else m
    for m in rs.HASH_METHODS])
def test_every_hash_method_in_exact_mode_equals_imagehash(collection, capsys, method):
    params = write_params(collection, hash_method=method, hash_mode="exact",
                          distance_threshold=0)
    code, doc = run_json(capsys, params, "build")
    assert code == 0 and doc["failed"] == 0
    code, doc = run_json(capsys, params, "export")
    fn = {"ahash": imagehash.average_hash, "phash": imagehash.phash,
          "phash_simple": imagehash.phash_simple, "dhash": imagehash.dhash,
          "dhash_vertical": imagehash.dhash_vertical, "whash": imagehash.whash,
          "whash_db4": lambda im, s: imagehash.whash(im, s, mode="db4"),
          "colorhash": lambda im, s: imagehash.colorhash(im, 3)}[method]
    for image in doc["images"]:
        assert image["hash"] == str(fn(Image.open(image["path"]), 8)), image["path"]


@pytest.mark.parametrize("size", [4, 8, 16])
def test_fast_mode_phash_has_imagehash_bits(size):
    """Fast mode computes phash's DCT itself (no scipy import per worker);
    on the same pixels it must give imagehash.phash's bits."""
    rng = np.random.default_rng(size)
    images = [picture(seed, (160 + seed, 120)) for seed in range(30)]
    images += [Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
               for _ in range(10)]
    for im in images:
        assert str(rs.phash_numpy(im, size)) == str(imagehash.phash(im, size))


def test_border_margin_follows_its_definition():
    """_margin looks at no more rows than it may cut; it must still count
    what the plain definition counts: leading rows within 12 grey levels of
    the first row's median, plus one, at most 40 %, none under two rows."""
    def plain(a, most=0.4):
        uniform = np.abs(a.astype(int) - np.median(a[0])).max(axis=1) <= 12
        run = int(np.argmin(uniform)) if not uniform.all() else len(a)
        return min(run + 1, int(len(a) * most)) if run >= 2 else 0

    rng = np.random.default_rng(11)
    for rows in (1, 2, 3, 4, 5, 9, 40, 108):
        for band in range(0, rows + 1, max(1, rows // 7)):
            a = rng.integers(0, 256, (rows, 1 + rows % 13), dtype=np.uint8)
            a[:band] = rng.integers(20, 30) + rng.integers(0, 8, (band, a.shape[1]))
            assert rs._margin(a, 0.4) == plain(a), (rows, band)
            assert rs._margin(a.T, 0.4) == plain(a.T), (rows, band)


def test_letterboxed_and_framed_copies_are_found(collection, capsys):
    """trim_borders (on by default) cuts the bars and the frame that move
    the whole-picture hash far from the original's.  (Grain, as photos
    have: a smooth synthetic edge would itself pass for a margin.)"""
    rng = np.random.default_rng(3)
    grain = rng.normal(0, 24, (480, 640, 3))
    im = Image.fromarray(np.clip(np.asarray(picture(3), dtype=float) + grain,
                                 0, 255).astype(np.uint8))
    im.save(collection / "imgs" / "grainy.png")
    w, h = im.size
    boxed = Image.new("RGB", (w, h + h // 3), "black")
    boxed.paste(im, (0, h // 6))
    framed = Image.new("RGB", (w + w // 4, h + w // 4), "white")
    framed.paste(im, (w // 8, w // 8))
    for name, copy in (("boxed.png", boxed), ("framed.png", framed)):
        assert imagehash.phash(copy) - imagehash.phash(im) > 12  # plain misses
        copy.save(collection / "queries" / name)
    # hashes only: this is about trim_borders (verified matching also,
    # rightly, finds p3.jpg: the same picture without the grain)
    code, doc = run_json(capsys, write_params(collection, matching="fast"),
                         "search")
    found = {os.path.basename(q["query"]): names(m["path"] for m in q["matches"])
             for q in doc["queries"]}
    # p3.jpg is the same picture without the grain: region matching (the
    # content box, windows) may find it too, and nothing else
    for name in ("boxed.png", "framed.png"):
        assert "grainy.png" in found[name]
        assert set(found[name]) <= {"grainy.png", "p3.jpg"}


def test_a_cropped_copy_matches_on_the_centre(collection, capsys):
    """A 10 % crop whose whole-picture hash is over the threshold is found
    through the centre region, and the match says so."""
    im = picture(23)
    w, h = im.size
    im.save(collection / "imgs" / "p23.png")
    im.crop((w // 20, h // 20, w * 19 // 20, h * 19 // 20)).save(
        collection / "queries" / "crop.png")
    # hashes only (verified matching may also take the whole hash, verified)
    code, doc = run_json(capsys, write_params(collection, matching="fast"),
                         "search")
    query = next(q for q in doc["queries"] if q["query"].endswith("crop.png"))
    match = [m for m in query["matches"] if m["path"].endswith("p23.png")]
    assert len(match) == 1 and match[0]["variant"].startswith("centre")
    code, off = run_json(capsys, write_params(collection, matching="fast"),
                         "search", "--no-centre-hashes", "--no-region-windows")
    query = next(q for q in off["queries"] if q["query"].endswith("crop.png"))
    assert not any(m["path"].endswith("p23.png") for m in query["matches"])


@pytest.mark.parametrize("method", rs.HASH_METHODS)
def test_every_hash_method_in_fast_mode_finds_the_copy(collection, capsys, method):
    params = write_params(collection, hash_method=method, distance_threshold=6)
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    q1 = next(q for q in doc["queries"] if q["query"].endswith("q1.jpg"))
    assert "p1.jpg" in names(m["path"] for m in q1["matches"])


def test_256_bit_hashes_work_end_to_end(collection, capsys):
    params = write_params(collection, hash_size=16, distance_threshold=20)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    assert all(len(i["hash"]) == 64 for g in doc["groups"] for i in g["images"])
    groups = [names(i["path"] for i in g["images"]) for g in doc["groups"]]
    assert ["p1.jpg", "p1_small.png"] in groups


@pytest.mark.parametrize("engine", rs.ENGINES)
def test_every_engine_gives_the_same_results(collection, capsys, engine):
    params = write_params(collection, distance_threshold=12)
    code, ref = run_json(capsys, params, "find_duplicates", "--engine", "scan")
    code, doc = run_json(capsys, params, "find_duplicates", "--engine", engine)
    assert code == 0 and doc["groups"] == ref["groups"]
    code, ref = run_json(capsys, params, "search", "--engine", "scan")
    code, doc = run_json(capsys, params, "search", "--engine", engine)
    assert doc["queries"] == ref["queries"]


def test_result_files_are_written_as_json_and_csv(collection, capsys):
    params = write_params(collection)
    code, doc = run_json(capsys, params, "find_duplicates")
    with open(collection / "out" / "find_duplicates.json", encoding="utf-8") as fh:
        assert json.load(fh)["groups"] == doc["groups"]
    with open(collection / "out" / "find_duplicates.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(g["images"]) for g in doc["groups"])
    assert {r["group"] for r in rows} == {"1", "2"}


def test_text_output_lists_groups(collection, capsys):
    params = write_params(collection)
    assert rs.main(["find_duplicates", "--params", params]) == 0
    captured = capsys.readouterr()
    assert "group 1: 2 images" in captured.out
    assert "keep" in captured.out
    assert "find_duplicates: 2 groups" in captured.err


def test_csv_output_on_stdout(collection, capsys):
    params = write_params(collection)
    assert rs.main(["search", "--params", params, "--format", "csv", "-q"]) == 0
    rows = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert rows[0][:3] == ["query", "query_hash", "match"]
    assert any(r[2].endswith("p1.jpg") for r in rows[1:])


def test_export_lists_every_file_with_errors(collection, capsys):
    (collection / "imgs" / "broken.jpg").write_bytes(b"not an image at all")
    params = write_params(collection)
    run_json(capsys, params, "build")
    code, doc = run_json(capsys, params, "export")
    assert code == 0 and len(doc["images"]) == 8
    broken = next(i for i in doc["images"] if i["path"].endswith("broken.jpg"))
    assert broken["hash"] == "" and "not an image" in broken["error"]
    with open(collection / "out" / "export.csv", newline="", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == 8


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_parallel_hashing_in_worker_processes(collection, capsys, monkeypatch,
                                              method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    monkeypatch.setenv(rs.START_METHOD_ENV, method)
    for seed in range(10, 70):  # enough files to start the worker pool
        picture(seed, (96, 72)).save(collection / "imgs" / f"extra{seed}.png")
    assert 67 > rs.Hasher.SMALL_JOB[method]
    params = write_params(collection, workers=2)
    code, doc = run_json(capsys, params, "build")
    assert code == 0 and doc["hashed"] == 67
    serial = write_params(collection, workers=1, db_dir="db1", bk_dir="ix1")
    code, one = run_json(capsys, serial, "export")
    assert code != 0  # no database yet for export: a clear error, not a build
    run_json(capsys, serial, "build")
    code, one = run_json(capsys, serial, "export")
    code, two = run_json(capsys, params, "export")
    assert [(i["path"], i["hash"]) for i in one["images"]] == \
        [(i["path"], i["hash"]) for i in two["images"]]


def test_the_shipped_params_json_works(capsys, tmp_path):
    """The README's run command on the shipped example collection."""
    root = tmp_path / "clone"
    # a fresh clone has no params.json (git ignores it): the first run writes it
    copy_checkout(root, skip=("bench", "tests"))
    assert not (root / "params.json").exists()
    code, doc = run_json(capsys, root / "params.json")
    assert json.loads((root / "params.json").read_text()) == rs.default_params()
    assert code == 0 and doc["operation"] == "search"
    hits = {os.path.basename(q["query"]): names(m["path"] for m in q["matches"])
            for q in doc["queries"]}
    assert "forest.jpg" in hits["forest_thumbnail.jpg"]
    assert hits["unrelated.jpg"] == []


def test_a_double_click_logs_and_shows_a_page(tmp_path, monkeypatch):
    """The frozen executable started with no arguments and no terminal."""
    from conftest import picture as draw
    monkeypatch.setenv("BROWSER", "true")  # a browser that opens nothing
    folder = tmp_path / "app"
    folder.mkdir()
    params = str(folder / "params.json")
    assert rs.run_from_desktop(params) == 0  # first run: writes params.json
    page = (folder / "reverse_search-status.html").read_text(encoding="utf-8")
    assert "Created" in page and "img_dirs" in page
    (folder / "photos").mkdir()
    draw(1).save(folder / "photos" / "a.jpg")
    draw(1).resize((320, 240)).save(folder / "photos" / "b.jpg")
    with open(params, "w", encoding="utf-8") as fh:
        json.dump({"img_dirs": ["photos"], "operation": "find_duplicates",
                   "workers": 1, "review_idle_minutes": 0.05}, fh)
    os.remove(folder / "reverse_search-status.html")
    assert rs.run_from_desktop(params) == 0
    assert os.path.exists(folder / "results" / "find_duplicates.html")
    assert not os.path.exists(folder / "reverse_search-status.html")  # review shown
    log = (folder / "reverse_search.log").read_text(encoding="utf-8")
    assert "find_duplicates: 1 group," in log
    assert "review: http://127.0.0.1:" in log and "review: stopped (idle)" in log
    with open(params, "w", encoding="utf-8") as fh:
        fh.write('{"img_dirs": ["photos"],}')
    assert rs.run_from_desktop(params) == 2
    page = (folder / "reverse_search-status.html").read_text(encoding="utf-8")
    assert "invalid JSON" in page and "error" in page


def test_orientation_matching_finds_mirrored_and_rotated_copies(collection, capsys):
    imgs = collection / "imgs"
    base = Image.open(imgs / "p3.jpg")
    base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(imgs / "p3_mirror.jpg")
    base.transpose(Image.Transpose.ROTATE_90).save(imgs / "p3_rot90.jpg")
    base.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(collection / "queries" / "p3_flip.jpg")
    params = write_params(collection, hash_method="phash", distance_threshold=10)
    code, doc = run_json(capsys, params, "find_duplicates",
                         "--no-match-orientations")
    groups = [names(i["path"] for i in g["images"]) for g in doc["groups"]]
    assert not any("p3_mirror.jpg" in g for g in groups)  # off: not found
    code, doc = run_json(capsys, params, "find_duplicates", "--match-orientations")
    p3 = next(g for g in doc["groups"] if "p3.jpg" in names(i["path"] for i in g["images"]))
    assert names(i["path"] for i in p3["images"]) == ["p3.jpg", "p3_mirror.jpg", "p3_rot90.jpg"]
    variants = {os.path.basename(i["path"]): i["variant"] for i in p3["images"]}
    assert variants["p3_mirror.jpg"] == "mirrored" and variants["p3.jpg"] is None
    assert variants["p3_rot90.jpg"].startswith("rotated")
    code, doc = run_json(capsys, params, "search", "--match-orientations")
    flip = next(q for q in doc["queries"] if q["query"].endswith("p3_flip.jpg"))
    assert "p3.jpg" in names(m["path"] for m in flip["matches"])
