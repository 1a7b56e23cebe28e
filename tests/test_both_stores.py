"""The operations on SQLite and on PostgreSQL give the same results.

PostgreSQL runs on a throw-away server (tests/pg_server.py); these tests skip
with the reason when none can be started, unless REVERSE_SEARCH_REQUIRE_PG=1.
"""

import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, picture, run_json, write_params

VOLATILE = ("seconds", "settings", "database", "engine", "tool_version")


def same(doc):
    """A result document without what legitimately differs between stores."""
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def both(collection, pg_url, **keys):
    return (write_params(collection, **keys),
            write_params(collection / "pg", database_url=pg_url,
                         img_dirs=[str(collection / "imgs")],
                         input_dir=str(collection / "queries"), **keys))


@pytest.fixture
def pair(collection, pg_url):
    (collection / "pg").mkdir()
    return collection, pg_url


@pytest.mark.parametrize("keys", [{}, {"hash_method": "phash", "distance_threshold": 12,
                                       "match_orientations": True},
                                  {"hash_size": 16, "distance_threshold": 30}])
def test_every_operation_gives_the_same_results(pair, capsys, keys):
    collection, url = pair
    base = Image.open(collection / "imgs" / "p3.jpg")
    base.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(collection / "imgs" / "p3_m.jpg")
    lite, pg = both(collection, url, **keys)
    for op in ("build", "search", "find_duplicates", "export"):
        code_a, a = run_json(capsys, lite, op)
        code_b, b = run_json(capsys, pg, op)
        assert code_a == code_b == 0, op
        assert same(a) == same(b), op
    assert b["database"].startswith("postgresql://")


def test_update_add_modify_delete_and_move(pair, capsys):
    collection, url = pair
    lite, pg = both(collection, url)
    for params in (lite, pg):
        run_json(capsys, params, "build")
    picture(9).save(collection / "imgs" / "new.jpg")
    os.remove(collection / "imgs" / "p5.jpg")
    picture(7).save(collection / "imgs" / "p4.jpg")
    os.rename(collection / "imgs" / "p3.jpg", collection / "imgs" / "sub" / "p3.jpg")
    docs = [run_json(capsys, params, "update")[1] for params in (lite, pg)]
    for doc in docs:
        assert (doc["hashed"], doc["reused"], doc["removed"]) == (2, 1, 1)
        assert doc["renamed_files"] == [{"from": str(collection / "imgs" / "p3.jpg"),
                                         "to": str(collection / "imgs" / "sub" / "p3.jpg")}]
    exports = [run_json(capsys, params, "export")[1]["images"] for params in (lite, pg)]
    assert exports[0] == exports[1]
    groups = [run_json(capsys, params, "find_duplicates")[1]["groups"] for params in (lite, pg)]
    assert groups[0] == groups[1]


def test_a_hash_kind_change_rehashes_on_postgres_too(pair, capsys):
    collection, url = pair
    lite, pg = both(collection, url)
    run_json(capsys, pg, "build")
    code, doc = run_json(capsys, pg, "update", "--hash-method", "dhash")
    assert code == 0 and doc["hashed"] == 7
    code, a = run_json(capsys, lite, "search", "--hash-method", "dhash")
    code, b = run_json(capsys, pg, "search", "--hash-method", "dhash")
    assert same(a) == same(b)


def test_two_machines_update_different_folders_at_once(tmp_path, pg_url, capsys):
    """Two real processes write into one database at the same time."""
    for offset, side in ((0, "left"), (100, "right")):
        (tmp_path / side).mkdir()
        for k in range(60):
            picture(offset + k, (64, 48)).save(tmp_path / side / f"{k}.png")
    params = write_params(tmp_path, database_url=pg_url, img_dirs=["left"])
    script = os.path.join(ROOT, "reverse_search.py")
    procs = [subprocess.Popen([sys.executable, script, "update", "--params", params,
                               "--img-dirs", str(tmp_path / side), "-q"],
                              stderr=subprocess.PIPE, text=True)
             for side in ("left", "right")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    code, doc = run_json(capsys, params, "export")
    paths = [i["path"] for i in doc["images"]]
    assert len(paths) == len(set(paths)) == 120
    code, doc = run_json(capsys, params, "update", "--img-dirs", str(tmp_path / "left"))
    assert (doc["unchanged"], doc["hashed"], doc["removed"]) == (60, 0, 0)
    code, doc = run_json(capsys, params, "export")
    assert len(doc["images"]) == 120  # the other machine's rows are untouched
