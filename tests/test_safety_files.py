"""Nothing lost, nothing written through a link: the files the tool writes,
and the user's images that move and undo carry (issue 14, items 1 and 3)."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

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
             root / "index" / rs.WINDOWS_NAME,
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
    code, _ = run_json(capsys, params, "move", "--yes")
    assert digest(victim) == want
    assert os.path.exists(collection / "imgs" / "sub" / "p2_q40.jpg")  # not moved
    plant(str(collection / "db" / "images.db.lock"), str(victim))
    capsys.readouterr()
    code = rs.main(["update", "--params", params, "-q"])
    assert code == 1 and digest(victim) == want
    assert "images.db.lock is a symbolic link" in capsys.readouterr().err


def test_a_database_name_planted_as_a_link_is_refused(collection, capsys):
    """SQLite follows a link at the database's own name: a dangling one made
    a new database wherever it pointed."""
    params = write_params(collection)
    os.makedirs(collection / "db")
    target = collection / "elsewhere" / "made.db"
    os.makedirs(target.parent)
    os.symlink(target, collection / "db" / "images.db")
    capsys.readouterr()
    assert rs.main(["update", "--params", params, "-q"]) == 1
    assert "images.db is a symbolic link" in capsys.readouterr().err
    assert not target.exists()


def test_a_hard_link_at_the_manifest_is_never_appended_to(collection, capsys):
    victim = collection / "victim.jpg"
    picture(77).save(victim, quality=90)
    want = digest(victim)
    params = write_params(collection)
    run_json(capsys, params, "find_duplicates")
    os.makedirs(collection / "quarantine")
    os.link(victim, collection / "quarantine" / "manifest.jsonl")
    run_json(capsys, params, "move", "--yes")
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


# ---- move and undo across file systems: a full disk, a kill mid-copy ----

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tmpfs():
    """mount(folder, size): a small tmpfs there (a second file system that can
    be filled); unmounted afterwards.  Skipped where mounting is impossible."""
    mounted = []

    def mount(folder, size):
        os.makedirs(folder, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                               "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): "
                        f"{done.stderr.strip()}")
        mounted.append(folder)
        return folder
    try:
        yield mount
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", "-l", str(folder)], check=False)


def noisy_copies(folder, n, seed=9):
    """n near-identical PNGs of ~450 KB each (noise does not compress)."""
    base = np.asarray(picture(seed, (600, 450)), dtype=np.int16)
    rng = np.random.default_rng(seed)
    for k in range(n):
        noisy = np.clip(base + rng.integers(-6, 7, base.shape), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"copy{k}.png")


def files_in(folder):
    """{relative path: sha256} of every file, temporary ones included."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, folder)] = digest(p)
    return out


def fill(folder):
    """Write into folder until the file system is full; returns the file."""
    path = os.path.join(folder, "filler")
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return path


def setup_moves(tmp_path, capsys, imgs, **keys):
    params = write_params(tmp_path, img_dirs=[str(imgs)], **keys)
    code, dupes = run_json(capsys, params, "find_duplicates")
    assert code == 0 and len(dupes["groups"]) == 1
    return params


def test_undo_onto_a_full_disk_loses_nothing_and_finishes_later(tmp_path, tmpfs, capsys):
    """Issue 14.1: a full disk left 0-byte files at every original path and
    the next undo refused.  Now: nothing at the original paths, the good
    copies stay in quarantine, and undo completes once there is room."""
    imgs = tmpfs(tmp_path / "imgs", "2m")
    noisy_copies(imgs, 3)
    before = files_in(imgs)
    params = setup_moves(tmp_path, capsys, imgs)
    code, doc = run_json(capsys, params, "move", "--yes")
    assert code == 0 and len(doc["done"]) == 2  # copied to another file system
    quarantined = files_in(tmp_path / "quarantine")
    filler = fill(imgs)
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and doc["done"] == [] and len(doc["failures"]) == 2
    assert all("No space left" in f["error"] for f in doc["failures"])
    left = files_in(imgs)
    del left["filler"]
    assert len(left) == 1 and set(left.items()) <= set(before.items())  # no 0-byte or temp files
    assert files_in(tmp_path / "quarantine") == quarantined  # the good copies, whole
    os.unlink(filler)
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and len(doc["done"]) == 2 and doc["failures"] == []
    assert files_in(imgs) == before


def test_move_into_a_full_quarantine_leaves_the_file_whole(tmp_path, tmpfs, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    noisy_copies(imgs, 3)
    before = files_in(imgs)
    quarantine = tmpfs(tmp_path / "quarantine", "700k")  # room for one
    params = setup_moves(tmp_path, capsys, imgs)
    code, doc = run_json(capsys, params, "move", "--yes")
    assert code == 0 and len(doc["done"]) == 1
    assert "No space left" in doc["failures"][0]["error"]
    stayed = doc["failures"][0]["path"]
    assert digest(stayed) == before[os.path.basename(stayed)]
    in_q = files_in(quarantine)
    assert not any(os.path.basename(p).startswith(rs.TEMP_MARK) for p in in_q)
    assert len([p for p in in_q if p.endswith(".png")]) == 1
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and files_in(imgs) == before


def _kill_when_copying(args, folder):
    """Run reverse_search in a subprocess and SIGKILL it as soon as a new
    name (the temporary copy) appears in `folder`: a kill in the middle of a
    copy.  Returns True if it was killed so (else the run finished first)."""
    script = os.path.join(ROOT, "reverse_search.py")
    old = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    proc = subprocess.Popen([sys.executable, script, *args, "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            if set(names) - old:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def big_copies(folder, n):
    """n near-identical 20 MB BMPs: copies slow enough to be killed midway."""
    big = np.array(picture(4, (750, 560)).resize((3000, 2240)))
    for k in range(n):
        big[0, k] = (k, k, k)
        Image.fromarray(big).save(folder / f"big{k}.bmp")


def test_a_kill_in_the_middle_of_a_copy_loses_nothing(tmp_path, tmpfs, capsys):
    """Issue 14.1: SIGKILL during a cross-file-system move and undo (real
    processes, killed while a temporary copy exists).  Every file stays whole
    in one place or the other, and the next run finishes the job."""
    imgs = tmpfs(tmp_path / "imgs", "200m")
    big_copies(imgs, 3)
    before = files_in(imgs)
    params = setup_moves(tmp_path, capsys, imgs)
    mirror = os.path.dirname(rs.quarantine_path(str(tmp_path / "quarantine"),
                                                str(imgs / "big0.bmp")))
    killed = 0
    for op, folder in (("move", mirror), ("undo", str(imgs))):
        killed += _kill_when_copying([op, "--yes", "--params", params], folder)
        whole = set(before.values())
        now = {**files_in(imgs), **{"q/" + k: v for k, v in
                                    files_in(tmp_path / "quarantine").items()}}
        assert whole <= set(now.values())  # every file whole somewhere
        for name, sha in files_in(imgs).items():  # nothing half at a real name
            assert name.startswith(rs.TEMP_MARK) or before.get(name) == sha
        code, doc = run_json(capsys, params, op, "--yes")
        assert code == 0 and doc["failures"] == [], doc
        leftovers = [p for p in list(files_in(imgs)) + list(files_in(tmp_path / "quarantine"))
                     if os.path.basename(p).startswith(rs.TEMP_MARK)]
        assert leftovers == []  # the partial copy was recognised and removed
    assert killed >= 1
    assert files_in(imgs) == before


def test_a_half_copy_an_older_version_left_at_the_original_path_is_replaced(
        tmp_path, capsys):
    """Earlier versions copied straight into the original path: a kill or a
    full disk left the start of the file there (or 0 bytes), and undo then
    refused.  Such a file is recognised (a strict prefix of the quarantined
    copy) and replaced; a different file there is never touched."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    noisy_copies(imgs, 3)
    before = files_in(imgs)
    params = setup_moves(tmp_path, capsys, imgs)
    code, doc = run_json(capsys, params, "move", "--yes")
    (a_from, a_to), (b_from, b_to) = [(d["from"], d["to"]) for d in doc["done"]]
    with open(a_to, "rb") as src, open(a_from, "wb") as half:
        half.write(src.read(100_000))           # a killed copy
    open(b_from, "wb").close()                  # a full disk: 0 bytes
    code, doc = run_json(capsys, params, "undo")
    assert code == 0 and len(doc["done"]) == 2
    assert files_in(imgs) == before
    # a file that is not the start of the quarantined one stays, and so does
    # the quarantined copy
    code, doc = run_json(capsys, params, "find_duplicates")
    code, doc = run_json(capsys, params, "move", "--yes")
    a_from, a_to = doc["done"][0]["from"], doc["done"][0]["to"]
    picture(60).save(a_from, "PNG")
    mine = digest(a_from)
    code, doc = run_json(capsys, params, "undo")
    assert digest(a_from) == mine and os.path.exists(a_to)
    assert any("now exists" in f["error"] for f in doc["failures"])


def test_temporary_files_of_killed_runs_are_swept_once_stale(collection, capsys):
    params = write_params(collection)
    out = collection / "out"
    thumbs = out / "search_files"
    os.makedirs(thumbs)
    stale = [out / f"{rs.TEMP_MARK}0000aaaa-111111111111",
             thumbs / f"{rs.TEMP_MARK}0000bbbb-222222222222"]
    fresh = out / f"{rs.TEMP_MARK}0000cccc-333333333333"  # a run writing now
    for path in stale + [fresh]:
        path.write_bytes(b"half")
    for path in stale:
        os.utime(path, (1, 1))
    assert run_json(capsys, params, "search")[0] == 0
    assert [p.exists() for p in stale] == [False, False] and fresh.exists()
