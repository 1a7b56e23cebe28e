"""What a new user meets in the first hour (issue 15): the database follows
img_dirs, the keep rule keeps the original, quiet runs still print results,
scripts get complete CSV and JSON, the report explains itself."""

import json
import os
import sqlite3

import pytest
from PIL import Image

from conftest import picture, rs, run_json, write_params
from pg_server import pg_server, pg_url  # noqa: F401


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
