"""What a new user's walk-through met: undo's leftovers, its words when there
is nothing to undo, and summary lines that read right (real images in
tmp_path, real SQLite, main() as the command line runs it)."""

import json
import os

from conftest import picture, rs, run_json, write_params
from test_actions import tree_digest


def moved(collection, capsys):
    """find_duplicates, then move --yes: sub/p1_small.png and sub/p2_q40.jpg
    go to the quarantine, mirrored under their absolute paths."""
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    code, doc = run_json(capsys, params, "move", "--yes")
    assert code == 0 and len(doc["done"]) == 2, doc
    return params, collection / "quarantine"


def folders_in(top):
    return sorted(os.path.relpath(d, top) for d, _, _ in os.walk(top)
                  if d != str(top))


def test_undo_removes_the_folders_move_made_and_keeps_the_users(collection, capsys):
    params, quarantine = moved(collection, capsys)
    mirrored = os.path.dirname(rs.quarantine_path(
        str(quarantine), str(collection / "imgs" / "sub" / "p1_small.png")))
    assert os.path.isdir(mirrored)
    (quarantine / "mine" / "empty").mkdir(parents=True)  # the user's own
    before = tree_digest(collection / "imgs")
    capsys.readouterr()
    assert rs.main(["undo", "--params", params]) == 0
    err = capsys.readouterr().err
    assert len(tree_digest(collection / "imgs")) == len(before) + 2
    # the mirrored tree is gone, the user's empty folders and the
    # quarantine folder itself stay
    assert folders_in(quarantine) == ["mine", os.path.join("mine", "empty")]
    archived = [n for n in os.listdir(quarantine) if n.endswith(".jsonl")]
    assert len(archived) == 1 and archived[0].startswith("manifest-undone-")
    assert not (quarantine / "manifest.jsonl").exists()
    # both the notice and the summary name the manifest where it now is
    summary = next(line for line in err.splitlines() if line.startswith("undo: 2"))
    assert summary.endswith(str(quarantine / archived[0])), summary
    assert f"kept as {quarantine / archived[0]}" in err


def test_a_partial_undo_keeps_the_folders_of_files_still_in_quarantine(
        collection, capsys):
    params, quarantine = moved(collection, capsys)
    # p2_q40.jpg cannot go back: another file is at its place now
    picture(9).save(collection / "imgs" / "sub" / "p2_q40.jpg")
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and len(doc["done"]) == 1 and len(doc["failures"]) == 1
    still = rs.quarantine_path(str(quarantine),
                               str(collection / "imgs" / "sub" / "p2_q40.jpg"))
    assert os.path.isfile(still)  # its folder (shared with p1_small) stays
    assert doc["manifest"] == str(quarantine / "manifest.jsonl")
    assert (quarantine / "manifest.jsonl").exists()


def test_a_second_undo_says_everything_is_back(collection, capsys):
    params, quarantine = moved(collection, capsys)
    assert rs.main(["undo", "--params", params]) == 0
    archived = next(n for n in os.listdir(quarantine) if n.endswith(".jsonl"))
    capsys.readouterr()
    assert rs.main(["undo", "--params", params]) == 0
    err = capsys.readouterr().err
    assert "manifest.jsonl" not in err.replace(archived, "")  # no file that is not there
    assert (f"nothing to undo: everything moved to {quarantine} is back"
            in err), err
    assert archived in err
    assert "undo: nothing to undo" in err.splitlines()
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and doc["manifest"] is None and doc["done"] == []


def test_undo_before_any_move_says_nothing_moved(collection, capsys):
    params = write_params(collection)
    capsys.readouterr()
    assert rs.main(["undo", "--params", params]) == 0
    err = capsys.readouterr().err
    assert "nothing to undo: move has not put anything in" in err
    assert "manifest" not in err


def test_one_query_is_one_query(collection, capsys):
    params = write_params(collection)
    capsys.readouterr()
    assert rs.main(["search", str(collection / "queries" / "q1.jpg"),
                    "--params", params]) == 0
    assert "search: 1 query, 1 with matches" in capsys.readouterr().err
    assert rs.main(["search", "--params", params]) == 0
    assert "search: 2 queries, 1 with matches" in capsys.readouterr().err


def test_an_update_that_hashed_nothing_gives_no_rate(collection, capsys):
    params = write_params(collection)
    assert rs.main(["build", "--params", params]) == 0
    assert "images/s)" in capsys.readouterr().err  # it hashed 7
    assert rs.main(["update", "--params", params]) == 0
    summary = next(line for line in capsys.readouterr().err.splitlines()
                   if line.startswith("update:"))
    assert "0 hashed" in summary and "images/s" not in summary, summary
    picture(30).save(collection / "imgs" / "new.jpg")
    assert rs.main(["update", "--params", params]) == 0
    summary = next(line for line in capsys.readouterr().err.splitlines()
                   if line.startswith("update:"))
    assert "1 hashed" in summary and "images/s)" in summary, summary


def test_the_review_pages_undo_tidies_the_quarantine_too(collection, capsys):
    """The page's Undo runs undo's own code: the same tidy quarantine."""
    params, quarantine = moved(collection, capsys)
    run = rs.parse_run(["review", "--params", params, "--no-open"])
    session = rs.ReviewSession(run, rs.Console(True))
    session.refresh()
    result = session.undo()
    assert len(result["done"]) == 2
    assert folders_in(quarantine) == []
    assert json.dumps(result).count("manifest-undone-") == 1
