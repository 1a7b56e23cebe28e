"""Nothing lost, nothing written through a link: the files the tool writes,
and the user's images that move and undo carry (issue 14, items 1 and 3)."""

import hashlib
import json
import os
import stat

import pytest

from conftest import picture, rs, run_json, write_params


def digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def plant(link, target):
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(target, link)


def every_written_name(root, ops):
    """Each name in output_dir, bk_dir, db_dir and the quarantine that an
    operation writes (or, before the fix, wrote)."""
    out = root / "out"
    names = [root / "index" / "hashes.idx", root / "index" / "bktree.idx",
             root / "quarantine" / "manifest.jsonl"]
    for op in ops:
        names += [out / f"{op}.json", out / f"{op}.csv", out / f"{op}.html"]
    names += [out / "plan.json", out / "plan.csv", out / "export.csv"]
    for files in ("search_files", "find_duplicates_files"):
        names.append(out / files / rs.PLACEHOLDER_NAME)
        for folder in ("imgs", "imgs/sub", "queries"):
            for entry in os.scandir(root / folder):
                if entry.is_file():
                    thumb = rs._thumb_name(entry.path, os.stat(entry.path), 160)
                    names += [out / files / thumb, out / files / (thumb + ".part")]
    return names


def test_no_write_follows_a_symlink_planted_at_any_name_the_tool_writes(
        collection, capsys):
    """Attack: links at every name the tool writes, pointing at a user's
    photos (one outside the collection, one in it).  Before the fix one
    `search` overwrote the photo with the placeholder PNG."""
    victims = [collection / "victim.jpg", collection / "imgs" / "p3.jpg"]
    picture(77).save(victims[0], quality=90)
    want = [digest(v) for v in victims]
    ops = ("build", "update", "search", "find_duplicates", "export")
    params = write_params(collection)
    names = every_written_name(collection, ops)
    for k, name in enumerate(names):
        plant(str(name), str(victims[k % 2]))
    # a dangling link must not create a file where it points either
    nowhere = collection / "elsewhere" / "created.txt"
    os.makedirs(nowhere.parent)
    plant(str(collection / "out" / "search_files" / rs.PLACEHOLDER_NAME), str(nowhere))
    for op in ops + ("search --engine bktree",):
        code, _ = run_json(capsys, params, *op.split())
        assert code == 0, op
        assert [digest(v) for v in victims] == want, op
        assert not nowhere.exists(), op
    for name in ("search.json", "find_duplicates.csv", "plan.json", "export.csv"):
        path = collection / "out" / name  # the links were replaced by files
        assert os.path.isfile(path) and not os.path.islink(path), name
    assert [digest(v) for v in victims] == want


def test_the_lock_and_manifest_are_never_opened_through_a_link(collection, capsys):
    victim = collection / "victim.jpg"
    picture(77).save(victim, quality=90)
    want = digest(victim)
    params = write_params(collection)
    assert run_json(capsys, params, "find_duplicates")[0] == 0
    plant(str(collection / "quarantine" / "manifest.jsonl"), str(victim))
    code, _ = run_json(capsys, params, "move")
    assert digest(victim) == want
    assert os.path.exists(collection / "imgs" / "sub" / "p2_q40.jpg")  # not moved
    plant(str(collection / "db" / "images.db.lock"), str(victim))
    capsys.readouterr()
    code = rs.main(["update", "--params", params, "-q"])
    assert code == 1 and digest(victim) == want
    assert "images.db.lock is a symbolic link" in capsys.readouterr().err


def test_a_hard_link_at_the_manifest_is_never_appended_to(collection, capsys):
    victim = collection / "victim.jpg"
    picture(77).save(victim, quality=90)
    want = digest(victim)
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    os.makedirs(collection / "quarantine")
    os.link(victim, collection / "quarantine" / "manifest.jsonl")
    run_json(capsys, params, "move")
    assert digest(victim) == want
    assert os.path.exists(collection / "imgs" / "sub" / "p2_q40.jpg")


def test_result_files_respect_the_umask(collection, capsys):
    old = os.umask(0o022)
    try:
        params = write_params(collection)
        assert run_json(capsys, params, "find_duplicates")[0] == 0
    finally:
        os.umask(old)
    out = collection / "out"
    for name in ("find_duplicates.json", "find_duplicates.csv", "plan.json",
                 "plan.csv", "find_duplicates.html"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
    thumbs = list((out / "find_duplicates_files").iterdir())
    assert thumbs and all(stat.S_IMODE(t.stat().st_mode) == 0o644 for t in thumbs)
    assert stat.S_IMODE(os.stat(collection / "index" / "hashes.idx").st_mode) == 0o644


def test_a_first_run_writes_params_fresh_and_never_through_a_link(tmp_path, capsys):
    victim = tmp_path / "victim.jpg"
    picture(5).save(victim)
    want = digest(victim)
    params = tmp_path / "params.json"
    os.symlink(victim, params)
    assert rs.main(["--params", str(params)]) == 2  # read, not JSON: refused
    assert digest(victim) == want
    dangling = tmp_path / "dangling.json"
    target = tmp_path / "elsewhere.json"
    os.symlink(target, dangling)
    assert rs.main(["--params", str(dangling)]) == 2
    assert not target.exists()
    fresh = tmp_path / "new" / "params.json"
    os.makedirs(fresh.parent)
    assert rs.main(["--params", str(fresh)]) == 0
    assert json.loads(fresh.read_text()) == rs.default_params()
    assert [p.name for p in fresh.parent.iterdir()] == ["params.json"]  # no temp left
