"""Acting on duplicates: plan (dry run), move, undo, marks and grouping."""

import csv
import hashlib
import json
import os
import shutil

from PIL import Image

from conftest import picture, rs, run_json, write_params


def tree_digest(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (hashlib.sha256(fh.read()).hexdigest(),
                                                   os.stat(p).st_mtime_ns)
    return out


def test_find_duplicates_writes_a_plan_and_moves_nothing(collection, capsys):
    before = tree_digest(collection / "imgs")
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    assert tree_digest(collection / "imgs") == before
    with open(collection / "out" / "plan.json", encoding="utf-8") as fh:
        plan = json.load(fh)
    actions = {os.path.basename(e["path"]): e["action"] for e in plan["entries"]}
    assert actions == {"p1.jpg": "keep", "p1_small.png": "move",
                       "p2.jpg": "keep", "p2_q40.jpg": "move"}
    with open(collection / "out" / "plan.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["action"] for r in rows} == {"keep", "move"}
    assert all(r["reason"] for r in rows)


def test_move_then_undo_restores_every_byte(collection, capsys):
    before = tree_digest(collection / "imgs")
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    code, doc = run_json(capsys, params, "move")
    assert code == 0 and len(doc["done"]) == 2 and doc["failures"] == []
    left = tree_digest(collection / "imgs")
    assert set(before) - set(left) == {os.path.join("sub", "p1_small.png"),
                                        os.path.join("sub", "p2_q40.jpg")}
    for moved in doc["done"]:  # mirrored under the quarantine folder
        assert moved["to"].startswith(str(collection / "quarantine"))
        assert moved["to"].endswith(moved["from"])
    code, dupes = run_json(capsys, params, "find_duplicates")
    assert dupes["groups"] == []  # moved files left the database too
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and len(doc["done"]) == 2
    assert tree_digest(collection / "imgs") == before
    assert not os.path.exists(collection / "quarantine" / "manifest.jsonl")
    code, doc = run_json(capsys, params, "update")
    assert doc["hashed"] == 2


def test_files_changed_after_the_plan_are_skipped(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    picture(40).save(collection / "imgs" / "sub" / "p2_q40.jpg")  # edited since
    code, doc = run_json(capsys, params, "move")
    assert [os.path.basename(d["from"]) for d in doc["done"]] == ["p1_small.png"]
    assert "changed since the plan" in doc["failures"][0]["error"]
    assert os.path.exists(collection / "imgs" / "sub" / "p2_q40.jpg")


def test_name_collisions_in_quarantine_and_at_the_original_place(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    target = rs.quarantine_path(str(collection / "quarantine"),
                                str(collection / "imgs" / "sub" / "p1_small.png"))
    os.makedirs(os.path.dirname(target))
    with open(target, "wb") as fh:
        fh.write(b"someone else's file")
    code, doc = run_json(capsys, params, "move")
    moved = {os.path.basename(d["from"]): d["to"] for d in doc["done"]}
    assert moved["p1_small.png"].endswith("p1_small (1).png")
    with open(target, "rb") as fh:
        assert fh.read() == b"someone else's file"  # never overwritten
    shutil.copy(collection / "imgs" / "p3.jpg", collection / "imgs" / "sub" / "p2_q40.jpg")
    code, doc = run_json(capsys, params, "undo")
    assert [os.path.basename(d["to"]) for d in doc["done"]] == ["p1_small.png"]
    assert "now exists" in doc["failures"][0]["error"]
    with open(collection / "quarantine" / "manifest.jsonl", encoding="utf-8") as fh:
        assert len(fh.readlines()) == 1  # the one still in quarantine


def test_protected_folders_are_never_moved(collection, capsys):
    params = write_params(collection, protected_dirs=["imgs/sub"])
    run_json(capsys, params, "find_duplicates")
    with open(collection / "out" / "plan.json", encoding="utf-8") as fh:
        actions = {os.path.basename(e["path"]): e["action"] for e in json.load(fh)["entries"]}
    assert actions["p1_small.png"] == "protected"
    code, doc = run_json(capsys, params, "move")
    assert doc["done"] == []
    assert os.path.exists(collection / "imgs" / "sub" / "p1_small.png")


def test_keep_rule_and_folder_order(collection, capsys):
    params = write_params(collection, keep_rule=["folder_order", "most_pixels"],
                          img_dirs=["imgs/sub", "imgs"])
    code, doc = run_json(capsys, params, "find_duplicates")
    kept = {os.path.basename(g["images"][0]["path"]) for g in doc["groups"]}
    assert kept == {"p1_small.png", "p2_q40.jpg"}  # the first folder wins
    params = write_params(collection, keep_rule=["most_pixels", "nicest"])
    assert rs.main(["find_duplicates", "--params", params, "-q"]) == 2


def test_not_a_duplicate_marks_keep_pairs_apart(collection, capsys):
    (collection / "not_duplicates.csv").write_text(
        "path_a,path_b\nimgs/p1.jpg,imgs/sub/p1_small.png\n", encoding="utf-8")
    params = write_params(collection, not_duplicates="not_duplicates.csv")
    code, doc = run_json(capsys, params, "find_duplicates")
    groups = [sorted(os.path.basename(i["path"]) for i in g["images"]) for g in doc["groups"]]
    assert groups == [["p2.jpg", "p2_q40.jpg"]]
    code, doc = run_json(capsys, params, "search")
    q1 = next(q for q in doc["queries"] if q["query"].endswith("q1.jpg"))
    assert len(q1["matches"]) == 2  # marks are about pairs inside the collection


def chain_collection(tmp_path):
    """A, B, C where A~B and B~C are near but A and C are not: a chain."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    base = picture(11)
    base.save(imgs / "a.png")
    w, h = base.size
    for name, shift in (("b.png", 40), ("c.png", 80)):  # slide the frame right
        big = Image.new("RGB", (w + 80, h))
        big.paste(base, (0, 0))
        big.paste(picture(12).resize((80, h)), (w, 0))
        big.crop((shift, 0, shift + w, h)).save(imgs / name)
    return imgs


def test_representative_grouping_does_not_chain(tmp_path, capsys):
    chain_collection(tmp_path)
    params = write_params(tmp_path, distance_threshold=12)
    code, doc = run_json(capsys, params, "export")
    run_json(capsys, params, "build")
    code, doc = run_json(capsys, params, "export")
    h = {os.path.basename(i["path"]): int(i["hash"], 16) for i in doc["images"]}
    d = lambda x, y: (h[x] ^ h[y]).bit_count()
    radius = max(d("a.png", "b.png"), d("b.png", "c.png"))
    assert d("a.png", "c.png") > radius  # the premise: a real chain
    code, conn = run_json(capsys, params, "find_duplicates", "--grouping", "connected",
                          "--distance-threshold", str(radius))
    assert [len(g["images"]) for g in conn["groups"]] == [3]
    code, rep = run_json(capsys, params, "find_duplicates",
                         "--distance-threshold", str(radius))
    for g in rep["groups"]:
        assert all(i["distance"] <= radius for i in g["images"])
    assert sum(len(g["images"]) for g in rep["groups"]) < 3 or len(rep["groups"]) > 1
