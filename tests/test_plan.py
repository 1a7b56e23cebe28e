"""The plan move acts on, the manifest undo acts on, and the database kept in
step (issue 14 items 7 and 8, issue 15 items 3, 9 and 14)."""

import csv
import hashlib
import json
import os
import pty
import subprocess
import sys

import pytest

from conftest import ROOT, picture, rs, run_json, write_params


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def tree(folder):
    return {os.path.relpath(os.path.join(d, n), folder): digest(os.path.join(d, n))
            for d, _, names in os.walk(folder) for n in names}


def load_plan(collection):
    with open(collection / "out" / "plan.json", encoding="utf-8") as fh:
        return json.load(fh)


def save_plan(collection, doc):
    with open(collection / "out" / "plan.json", "w", encoding="utf-8") as fh:
        json.dump(doc, fh)


def planned(collection, capsys, **keys):
    params = write_params(collection, **keys)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0 and len(doc["groups"]) == 2
    return params


def moved_names(doc):
    return sorted(os.path.basename(d["from"]) for d in doc["done"])


# ---- issue 14.7: an edited or crafted plan.json ----

def test_a_crafted_plan_moves_only_stored_images_under_img_dirs(collection, capsys):
    """Attack: plan.json lists a non-image outside img_dirs, a file added
    after the plan, a path with '..', a symbolic link, entries of the wrong
    shape and a made-up action.  Each is reported and skipped; the two real
    duplicates move; no internal error."""
    picture(70).save(collection / "photo.jpg")  # stored through a link
    os.symlink(collection / "photo.jpg", collection / "imgs" / "link.jpg")
    params = planned(collection, capsys)
    outside = collection / "notes.txt"
    outside.write_text("my notes")
    (collection / "imgs" / "new.jpg").write_bytes((collection / "imgs" / "p4.jpg").read_bytes())
    doc = load_plan(collection)
    real = doc["entries"][0]
    crafted = [
        dict(real, path=str(outside), action="move", size=8),
        dict(real, path=str(collection / "imgs" / "new.jpg"), action="move"),
        dict(real, path=str(collection / "imgs" / "sub" / ".." / "p3.jpg"), action="move"),
        dict(real, path=str(collection / "imgs" / "link.jpg"), action="move"),
        dict(real, path=str(collection / "db" / "images.db"), action="move"),
        {"path": str(collection / "imgs" / "p4.jpg"), "action": "move"},
        dict(real, action="delete"),
        dict(real, size="big"),
        "not an entry",
        None,
    ]
    doc["entries"] = crafted[:3] + doc["entries"] + crafted[3:]
    save_plan(collection, doc)
    os.unlink(collection / "out" / "plan.csv")
    code, out = run_json(capsys, params, "move", "--yes")
    assert code == 0
    assert moved_names(out) == ["p1_small.png", "p2_q40.jpg"]
    assert len(out["failures"]) == len(crafted)
    reasons = " | ".join(f["error"] for f in out["failures"])
    for why in ("not under img_dirs", "not a stored image", "normalised",
                "symbolic link", "'size'", "'delete'",
                "not an object"):
        assert why in reasons, why
    assert outside.read_text() == "my notes"
    for name in ("new.jpg", "p3.jpg", "p4.jpg", "p5.jpg", "p1.jpg"):
        assert os.path.exists(collection / "imgs" / name), name
    assert os.path.islink(collection / "imgs" / "link.jpg")


def test_a_plan_that_keeps_no_file_of_a_group_moves_none_of_it(collection, capsys):
    params = planned(collection, capsys)
    doc = load_plan(collection)
    for e in doc["entries"]:
        if os.path.basename(e["path"]) == "p1.jpg":
            e["action"] = "move"
    save_plan(collection, doc)
    os.unlink(collection / "out" / "plan.csv")
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p2_q40.jpg"]
    assert all("would keep no file" in f["error"] for f in out["failures"])
    assert os.path.exists(collection / "imgs" / "p1.jpg")
    assert os.path.exists(collection / "imgs" / "sub" / "p1_small.png")


@pytest.mark.parametrize("text", ["[1, 2]", '{"entries": 3}', "{not json"])
def test_a_plan_that_is_not_a_plan_moves_nothing(collection, capsys, text):
    params = planned(collection, capsys)
    before = tree(collection / "imgs")
    (collection / "out" / "plan.json").write_text(text)
    capsys.readouterr()
    assert rs.main(["move", "--yes", "--params", params]) == 1
    err = capsys.readouterr().err
    assert "plan.json" in err and "internal error" not in err
    assert tree(collection / "imgs") == before


# ---- issue 15.3: plan.csv and plan.json, one truth ----

def edit_csv(collection, actions):
    path = collection / "out" / "plan.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows = [dict(r, action=actions.get(os.path.basename(r["path"]), r["action"]))
            for r in rows if actions.get(os.path.basename(r["path"])) != "DELETE"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def edit_json(collection, actions):
    doc = load_plan(collection)
    for e in doc["entries"]:
        e["action"] = actions.get(os.path.basename(e["path"]), e["action"])
    save_plan(collection, doc)


def test_an_edit_of_the_action_column_in_plan_csv_is_what_move_does(collection, capsys):
    params = planned(collection, capsys)
    edit_csv(collection, {"p1_small.png": "keep"})
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p2_q40.jpg"] and out["plan"].endswith("plan.csv")


def test_a_plan_csv_saved_with_semicolons_is_read(collection, capsys):
    """What a spreadsheet set to a comma as decimal mark saves."""
    params = planned(collection, capsys)
    path = collection / "out" / "plan.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:
        csv.writer(fh, delimiter=";").writerows(
            [r[:1] + ["keep"] + r[2:] if r[2].endswith("p1_small.png") else r
             for r in rows])
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p2_q40.jpg"]


def test_a_plan_csv_that_is_not_utf8_is_refused_with_a_message(collection, capsys):
    params = planned(collection, capsys)
    path = collection / "out" / "plan.csv"
    path.write_bytes(path.read_bytes() + "\ncaf\xe9".encode("cp1252"))
    capsys.readouterr()
    assert rs.main(["move", "--yes", "--params", params]) == 1
    assert "CSV UTF-8" in capsys.readouterr().err


def test_a_row_deleted_from_plan_csv_stays(collection, capsys):
    params = planned(collection, capsys)
    edit_csv(collection, {"p2_q40.jpg": "DELETE"})
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p1_small.png"]


def test_an_edit_of_plan_json_is_what_move_does(collection, capsys):
    params = planned(collection, capsys)
    edit_json(collection, {"p2_q40.jpg": "keep"})
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p1_small.png"] and out["plan"].endswith("plan.json")


def test_both_plans_edited_the_same_way_agree(collection, capsys):
    params = planned(collection, capsys)
    edit_json(collection, {"p2_q40.jpg": "keep"})
    edit_csv(collection, {"p2_q40.jpg": "keep"})
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p1_small.png"]


def test_both_plans_edited_differently_are_refused(collection, capsys):
    params = planned(collection, capsys)
    before = tree(collection / "imgs")
    edit_json(collection, {"p2_q40.jpg": "keep"})
    edit_csv(collection, {"p1_small.png": "keep"})
    capsys.readouterr()
    assert rs.main(["move", "--yes", "--params", params]) == 1
    err = capsys.readouterr().err
    assert "both edited and disagree" in err and "Nothing was moved" in err
    assert tree(collection / "imgs") == before


def test_move_without_a_terminal_or_yes_is_refused(collection, capsys):
    params = planned(collection, capsys)
    before = tree(collection / "imgs")
    capsys.readouterr()
    assert rs.main(["move", "--params", params]) == 2
    err = capsys.readouterr().err
    assert "--yes" in err and "2 files" in err
    assert tree(collection / "imgs") == before


@pytest.mark.parametrize("answer", ["n", "y"])
def test_move_on_a_terminal_shows_a_summary_and_asks(collection, capsys, answer):
    params = planned(collection, capsys)
    before = tree(collection / "imgs")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "reverse_search.py"),
                             "move", "--params", params], stdin=secondary,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(secondary)
    os.write(primary, (answer + "\n").encode())
    out, err = proc.communicate(timeout=120)
    os.close(primary)
    assert "move: 2 files (" in err and "from 2 groups into" in err and "[y/N]" in err
    if answer == "n":
        assert proc.returncode == 1 and "nothing was moved" in err
        assert tree(collection / "imgs") == before
    else:
        assert proc.returncode == 0 and "2 files moved" in err
        assert len(tree(collection / "imgs")) == len(before) - 2


# ---- issue 15.9: move and undo keep the database in step ----

def test_undo_restores_the_rows_no_rehash_and_searches_find_them_at_once(
        collection, capsys):
    params = planned(collection, capsys)
    query = collection / "queries" / "q2.jpg"
    picture(2).resize((300, 225)).save(query)
    code, out = run_json(capsys, params, "search", str(query))
    found = {os.path.basename(m["path"]) for m in out["queries"][0]["matches"]}
    assert found == {"p2.jpg", "p2_q40.jpg"}
    run_json(capsys, params, "move", "--yes")
    code, out = run_json(capsys, params, "search", str(query))
    assert {os.path.basename(m["path"]) for m in out["queries"][0]["matches"]} == {"p2.jpg"}
    code, out = run_json(capsys, params, "undo")
    assert len(out["done"]) == 2
    code, out = run_json(capsys, params, "search", str(query))  # no update first
    assert {os.path.basename(m["path"]) for m in out["queries"][0]["matches"]} == found
    code, out = run_json(capsys, params, "update")
    assert out["hashed"] == 0 and out["unchanged"] == out["files"] == 7


def test_move_and_undo_keep_postgresql_in_step(collection, capsys, pg_url):
    params = write_params(collection, database_url=pg_url)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0 and len(doc["groups"]) == 2
    code, out = run_json(capsys, params, "move", "--yes")
    assert moved_names(out) == ["p1_small.png", "p2_q40.jpg"]
    assert run_json(capsys, params, "find_duplicates")[1]["groups"] == []
    code, out = run_json(capsys, params, "undo")
    assert len(out["done"]) == 2
    assert len(run_json(capsys, params, "find_duplicates")[1]["groups"]) == 2
    code, out = run_json(capsys, params, "update")
    assert out["hashed"] == 0


# ---- issue 14.8: a crafted or damaged manifest ----

def moved_once(collection, capsys):
    params = planned(collection, capsys)
    code, out = run_json(capsys, params, "move", "--yes")
    assert len(out["done"]) == 2
    return params, collection / "quarantine" / "manifest.jsonl"


def test_a_crafted_manifest_restores_only_what_move_quarantined(collection, capsys):
    """Attack: lines that would carry a file from outside the quarantine into
    the collection, a quarantined file out of img_dirs, a damaged line and
    one of the wrong shape; the real lines are still restored."""
    params, manifest = moved_once(collection, capsys)
    secret = collection / "secret.jpg"
    picture(30).save(secret)
    q = str(collection / "quarantine")
    outside_target = collection / "elsewhere" / "stolen.jpg"
    planted = rs.quarantine_path(q, str(outside_target))
    os.makedirs(os.path.dirname(planted))
    picture(31).save(planted)
    lines = manifest.read_text().splitlines()
    crafted = [
        {"original": str(collection / "imgs" / "secret.jpg"),
         "quarantined": str(secret), "sha256": digest(secret)},
        {"original": str(outside_target), "quarantined": planted,
         "sha256": digest(planted)},
        {"original": str(collection / "imgs" / "x.jpg"), "sha256": "0" * 64},
    ]
    text = "\n".join([lines[0], "{damaged", *map(json.dumps, crafted), lines[1]]) + "\n"
    manifest.write_text(text)
    code, out = run_json(capsys, params, "undo")
    assert code == 0 and len(out["done"]) == 2
    assert len(out["failures"]) == 4
    assert secret.exists() and not (collection / "imgs" / "secret.jpg").exists()
    assert os.path.exists(planted) and not outside_target.exists()
    assert len(manifest.read_text().splitlines()) == 4  # bad lines kept, as they were


def test_a_symlinked_folder_in_the_quarantine_carries_nothing_out(collection, capsys):
    """Attack: a folder in the quarantine replaced by a link to another
    folder, with a manifest line naming a file there."""
    params, manifest = moved_once(collection, capsys)
    elsewhere = collection / "elsewhere"
    elsewhere.mkdir()
    picture(33).save(elsewhere / "p9.jpg")
    want = digest(elsewhere / "p9.jpg")
    mirror = rs.quarantine_path(str(collection / "quarantine"), str(collection / "imgs"))
    os.symlink(elsewhere, os.path.join(mirror, "linked"))
    rec = {"original": str(collection / "imgs" / "linked" / "p9.jpg"),
           "quarantined": os.path.join(mirror, "linked", "p9.jpg"), "sha256": want}
    with open(manifest, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
    code, out = run_json(capsys, params, "undo")
    assert len(out["done"]) == 2 and len(out["failures"]) == 1
    assert digest(elsewhere / "p9.jpg") == want
    assert not (collection / "imgs" / "linked").exists()


def test_move_never_follows_a_symlinked_folder_in_the_quarantine(collection, capsys):
    """Not even to make a folder: the link is a level above the file's."""
    (collection / "imgs" / "sub" / "deeper").mkdir()
    os.rename(collection / "imgs" / "sub" / "p1_small.png",
              collection / "imgs" / "sub" / "deeper" / "p1_small.png")
    params = planned(collection, capsys)
    elsewhere = collection / "elsewhere"
    elsewhere.mkdir()
    mirror = rs.quarantine_path(str(collection / "quarantine"), str(collection / "imgs"))
    os.makedirs(mirror)
    os.symlink(elsewhere, os.path.join(mirror, "sub"))
    code, out = run_json(capsys, params, "move", "--yes")
    assert out["done"] == [] and len(out["failures"]) == 2
    assert "symbolic link inside quarantine_dir" in out["failures"][0]["error"]
    assert list(elsewhere.iterdir()) == []
    assert os.path.exists(collection / "imgs" / "sub" / "deeper" / "p1_small.png")


def test_undo_puts_files_back_into_a_folder_protected_since(collection, capsys):
    params, manifest = moved_once(collection, capsys)
    params = write_params(collection, protected_dirs=["imgs/sub"])
    code, out = run_json(capsys, params, "undo")
    assert len(out["done"]) == 2 and out["failures"] == []


# ---- issue 15.14 and 14 (low): undo with nothing to undo; folder roles ----

def test_undo_with_nothing_to_undo_says_so_and_exits_0(collection, capsys):
    params = write_params(collection)
    capsys.readouterr()
    assert rs.main(["undo", "--params", params]) == 0
    assert "nothing to undo" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("quarantine_dir", "imgs"),
                                       ("quarantine_dir", "imgs/q"),
                                       ("quarantine_dir", "."),
                                       ("output_dir", "imgs"),
                                       ("output_dir", "imgs/sub")])
def test_quarantine_and_output_apart_from_img_dirs(collection, capsys, key, value):
    params = write_params(collection, **{key: value})
    capsys.readouterr()
    assert rs.main(["find_duplicates", "--params", params]) == 2
    err = capsys.readouterr().err
    assert f"key '{key}'" in err and "img_dirs" in err and "params.json" in err


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="Linux allows "
                    "file names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_moves_and_comes_back(collection, capsys):
    """Issue 14.11: such names were 'no longer exists' to move."""
    name = os.path.join(os.fsencode(collection / "imgs"), b"sub", b"caf\xe9.jpg")
    with open(collection / "imgs" / "p3.jpg", "rb") as src, open(name, "wb") as dst:
        dst.write(src.read())
    before = tree(collection / "imgs")
    params = write_params(collection)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert len(doc["groups"]) == 3
    code, out = run_json(capsys, params, "move", "--yes")
    assert out["failures"] == [] and len(out["done"]) == 3
    assert any("\\xe9" in d["from"] for d in out["done"])
    assert not os.path.exists(name)
    code, out = run_json(capsys, params, "undo")
    assert out["failures"] == [] and len(out["done"]) == 3
    assert tree(collection / "imgs") == before
    code, out = run_json(capsys, params, "update")
    assert out["hashed"] == 0


def test_a_line_whose_file_never_left_restores_no_row(collection, capsys):
    """An interrupted move logs a line before the file goes; undo must not
    give the file now at that path the hashes the line carries."""
    params, manifest = moved_once(collection, capsys)
    lines = manifest.read_text().splitlines()
    run_json(capsys, params, "undo")
    manifest.write_text(lines[-1] + "\n")  # the line, its file back home
    original = json.loads(lines[-1])["original"]
    picture(40).save(original)  # a different picture there now
    code, out = run_json(capsys, params, "undo")
    assert code == 0 and out["done"] == [] and out["failures"] == []
    code, out = run_json(capsys, params, "update")
    assert out["hashed"] == 1
