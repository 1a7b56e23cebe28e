"""A database records how the Pillow that hashed it resizes; hashes made by a
Pillow that resizes another way (Pillow 13 changed the order of its passes
for tall pictures) are rehashed once, never mixed with this one's.

Real SQLite files and real images; the other Pillow is stood in for by what
it leaves in the database: its rule in `meta`, and hashes this Pillow would
not make."""

import os
import sqlite3

from conftest import rs, write_params

OTHER = next(r for r in rs.RESIZE_RULES if r != rs.resize_rule())


def _db(folder):
    return os.path.join(folder, "db", rs.DB_NAME)


def _hashes(folder) -> dict:
    with sqlite3.connect(_db(folder)) as db:
        return dict(db.execute("SELECT path, hash FROM images"))


def _as_if_hashed_by_the_other_pillow(folder, meta: dict):
    """The database as another Pillow would have left it: its rule (or
    only its version) in meta, and every hash a few bits off."""
    with sqlite3.connect(_db(folder)) as db:
        db.execute("DELETE FROM meta WHERE key IN ('resize', 'pillow')")
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        db.execute("UPDATE images SET hash = (hash | 5) - (hash & 5)")


def test_the_database_records_the_rule(collection):
    params = write_params(collection)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    with sqlite3.connect(_db(collection)) as db:
        meta = dict(db.execute("SELECT key, value FROM meta"))
    assert meta["resize"] == rs.resize_rule() and meta["resize"] != OTHER
    assert rs.resize_rule(meta["pillow"]) == meta["resize"]


def test_hashes_of_another_rule_are_rehashed_once(collection, capsys):
    params = write_params(collection)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    right = _hashes(collection)
    _as_if_hashed_by_the_other_pillow(collection, {"resize": OTHER})
    assert _hashes(collection) != right
    capsys.readouterr()
    assert rs.main(["update", "--params", params]) == 0
    err = capsys.readouterr().err
    assert f"resizes {OTHER}" in err and "rehashing every file" in err
    assert _hashes(collection) == right
    assert rs.main(["update", "--params", params]) == 0
    assert "rehashing" not in capsys.readouterr().err


def test_an_older_database_is_judged_by_the_pillow_it_noted(collection, capsys):
    """Databases made before the rule was recorded noted Pillow's version."""
    params = write_params(collection)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    right = _hashes(collection)
    other_version = "12.2.0" if rs.resize_rule() == rs.RESIZE_RULES[1] \
        else "13.0.0"
    _as_if_hashed_by_the_other_pillow(collection, {"pillow": other_version})
    capsys.readouterr()
    assert rs.main(["search", "--params", params]) == 0  # reads first
    assert "rehashing every file" in capsys.readouterr().err
    assert _hashes(collection) == right


def test_the_same_rule_keeps_every_hash(collection, capsys):
    """An older database of the same Pillow is not rehashed."""
    params = write_params(collection)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    with sqlite3.connect(_db(collection)) as db:
        db.execute("DELETE FROM meta WHERE key = 'resize'")
        db.execute("UPDATE images SET hash = (hash | 5) - (hash & 5)")  # would show a rehash
    kept = _hashes(collection)
    capsys.readouterr()
    assert rs.main(["update", "--params", params]) == 0
    assert "rehashing" not in capsys.readouterr().err
    assert _hashes(collection) == kept
