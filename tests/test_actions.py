"""Acting on duplicates: plan (dry run), move, undo, marks and grouping."""

import csv
import hashlib
import json
import os
import shutil

import numpy as np


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
    code, doc = run_json(capsys, params, "move", "--yes")
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
    assert doc["hashed"] == 0  # restored with their hashes (issue 15, item 9)


def test_files_changed_after_the_plan_are_skipped(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    picture(40).save(collection / "imgs" / "sub" / "p2_q40.jpg")  # edited since
    code, doc = run_json(capsys, params, "move", "--yes")
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
    code, doc = run_json(capsys, params, "move", "--yes")
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
    code, doc = run_json(capsys, params, "move", "--yes")
    assert doc["done"] == []
    assert os.path.exists(collection / "imgs" / "sub" / "p1_small.png")


def test_keep_rule_and_folder_order(collection, capsys):
    params = write_params(collection, keep_rule=["folder_order", "most_pixels"],
                          img_dirs=["imgs/sub", "imgs"])
    code, doc = run_json(capsys, params, "find_duplicates")
    kept = {os.path.basename(i["path"]) for g in doc["groups"] for i in g["images"]
            if i["keep"]}
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


def test_representative_grouping_does_not_chain():
    """A chain of hashes 3 bits apart: connected takes it whole, representative
    makes groups whose members are all within 3 bits of their first image."""
    values, v = [], 0
    for k in range(7):
        values.append(v)
        v ^= 0b111 << (3 * k)  # each link flips 3 new bits
    hashes = np.array([[x] for x in values], dtype=np.uint64)
    flat = rs.FlatIndex.from_arrays(np.arange(7), hashes, 64)
    rows = {p: rs.ImageRow(f"/x/{p}.jpg", 100, 0, width=10, height=10) for p in range(7)}
    [comp] = rs.duplicate_groups(flat, flat.engine("scan", 3, True), 3)
    assert sorted(comp.tolist()) == list(range(7))
    assert rs.split_group(comp.tolist(), flat, 3, rows, set(), True) == [comp.tolist()]
    groups = rs.split_group(list(range(7)), flat, 3, rows, set(), False)
    assert len(groups) >= 2
    for g in groups:
        lead = values[g[0]]
        assert all((values[p] ^ lead).bit_count() <= 3 for p in g)
        assert max(g) - min(g) <= 2  # never both ends of a long stretch
    marks = {frozenset(("/x/2.jpg", "/x/3.jpg"))}
    for g in rs.split_group(list(range(7)), flat, 3, rows, marks, True):
        assert not {2, 3} <= set(g)


def test_representative_distances_stay_within_the_threshold(collection, capsys):
    params = write_params(collection, distance_threshold=30)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert doc["groups"]
    for g in doc["groups"]:
        assert all(i["distance"] <= 30 for i in g["images"])
        assert sum(i["keep"] for i in g["images"]) == 1
