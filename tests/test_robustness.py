"""Real-world files and real crashes: nothing lost, nothing touched, no traceback."""

import hashlib
import multiprocessing
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, picture, rs, run_json, write_params


def make_bad_files(folder):
    """Every kind of file a scanner meets; returns {name: expectation}."""
    folder.mkdir(exist_ok=True)
    good = picture(3)
    expect = {}

    def save(name, im, ok=True, **kw):
        im.save(folder / name, **kw)
        expect[name] = ok

    def raw(name, data, ok=False):
        (folder / name).write_bytes(data)
        expect[name] = ok
    raw("empty.jpg", b"")
    buf = io.BytesIO()
    good.save(buf, "JPEG")
    raw("truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 3])
    buf = io.BytesIO()
    good.save(buf, "PNG")
    raw("truncated.png", buf.getvalue()[:2000])
    raw("notes.jpg", b"this is a text file, not a picture\n" * 20)
    raw("random.png", bytes(random.Random(1).randrange(256) for _ in range(5000)))
    raw("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')
    raw("jpeg_named.png", buf.getvalue(), ok=True)
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # small file, 400 MP
    raw("bomb.png", bomb.getvalue())
    save("rgba.png", good.convert("RGBA"))
    save("palette.gif", good.convert("P"))
    save("grey_alpha.png", good.convert("LA"))
    save("cmyk.jpg", good.convert("CMYK"))
    save("tiny.png", Image.new("RGB", (1, 1), (9, 9, 9)))
    save("pic.webp", good)
    save("pic.tiff", good)
    save("pic.bmp", good)
    save("pic.avif", good)
    save("upper.JPG", good)
    save("name with spaces é.jpg", good)
    frames = [picture(3, (160, 120)), picture(4, (160, 120))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    expect["anim.gif"] = True
    grey16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257)
    save("grey16.png", Image.fromarray(grey16))
    import pillow_heif
    pillow_heif.register_heif_opener()
    save("phone.heic", good)
    os.symlink(folder / "gone.jpg", folder / "broken_link.jpg")
    expect["broken_link.jpg"] = False
    return expect


def test_every_bad_input_is_skipped_with_a_reason_and_the_rest_hashed(tmp_path, capsys):
    expect = make_bad_files(tmp_path / "imgs")
    params = write_params(tmp_path)
    code, doc = run_json(capsys, params, "build")
    assert code == 0
    code, export = run_json(capsys, params, "export")
    rows = {os.path.basename(i["path"]): i for i in export["images"]}
    assert set(rows) == set(expect)
    for name, ok in expect.items():
        if ok:
            assert rows[name]["hash"] and not rows[name]["error"], name
        else:
            assert not rows[name]["hash"] and rows[name]["error"], name
    assert "empty file" in rows["empty.jpg"]["error"]
    assert "truncated" in rows["truncated.jpg"]["error"]
    assert "too many pixels" in rows["bomb.png"]["error"]
    assert "SVG" in rows["drawing.svg"]["error"]
    assert "broken" in rows["broken_link.jpg"]["error"]
    assert doc["failed"] == sum(not ok for ok in expect.values())
    assert {os.path.basename(f["path"]) for f in doc["failures"]} == \
        {n for n, ok in expect.items() if not ok}


def test_failed_files_are_retried_on_update(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "later.jpg").write_bytes(b"")
    params = write_params(tmp_path)
    code, doc = run_json(capsys, params, "build")
    assert doc["failed"] == 1
    picture(5).save(tmp_path / "imgs" / "later.jpg")
    os.utime(tmp_path / "imgs" / "later.jpg", ns=(0, 0))  # even with an old mtime
    code, doc = run_json(capsys, params, "update")
    assert (doc["hashed"], doc["failed"]) == (1, 0)


def hashes_of(tmp_path, capsys, params):
    code, doc = run_json(capsys, params, "export")
    return {os.path.basename(i["path"]): i["hash"] for i in doc["images"]}


def test_exif_rotation_transparency_and_16_bit_hash_like_the_plain_picture(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    base = picture(8)
    base.save(imgs / "base.png")
    rotated = base.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and tagged "rotate 90 clockwise to display"
    rotated.save(imgs / "exif6.jpg", exif=exif, quality=95)
    grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(imgs / "grey16.png")
    base.convert("L").save(imgs / "grey8.png")
    for k in (1, 2):  # black glyphs whose shape lives only in the alpha channel
        alpha = picture(20 + k).convert("L").point(lambda v: 255 if v > 120 else 0)
        icon = Image.new("RGBA", alpha.size, (0, 0, 0, 0))
        icon.putalpha(alpha)
        icon.save(imgs / f"icon{k}.png")
    import imagehash
    assert imagehash.dhash(Image.open(imgs / "icon1.png")) == \
        imagehash.dhash(Image.open(imgs / "icon2.png"))  # plain: they collide
    params = write_params(tmp_path)
    run_json(capsys, params, "build")
    h = {k: int(v, 16) for k, v in hashes_of(tmp_path, capsys, params).items()}
    dist = lambda a, b: (h[a] ^ h[b]).bit_count()
    assert dist("base.png", "exif6.jpg") <= 4
    assert dist("grey16.png", "grey8.png") <= 1
    assert dist("icon1.png", "icon2.png") >= 10  # over white they do not
    code, doc = run_json(capsys, params, "export")
    exif_row = next(i for i in doc["images"] if i["path"].endswith("exif6.jpg"))
    assert (exif_row["width"], exif_row["height"]) == (640, 480)  # as displayed


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file names")
def test_file_names_that_are_not_utf8(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    odd = os.fsdecode(os.fsencode(str(imgs)) + b"/caf\xe9.jpg")
    picture(4).save(odd, "JPEG")
    picture(4).save(imgs / "cafe.jpg")
    params = write_params(tmp_path, distance_threshold=2)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    paths = [i["path"] for i in doc["groups"][0]["images"]]
    assert any(p.endswith("caf\\xe9.jpg") for p in paths)
    code, doc = run_json(capsys, params, "update")
    assert doc["unchanged"] == 2  # found again by its stored raw bytes


def test_symlink_loops_and_overlapping_roots_are_walked_once(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "a").mkdir(parents=True)
    picture(1).save(imgs / "a" / "one.jpg")
    os.symlink(imgs, imgs / "a" / "loop")
    params = write_params(tmp_path, img_dirs=["imgs", "imgs/a"])
    code, doc = run_json(capsys, params, "build")
    assert code == 0 and doc["files"] == 1


def test_a_file_that_vanishes_before_hashing_is_reported():
    result = rs.hash_file(rs.HashTask("/no/such/file.jpg"), rs.HashJob(rs.HashSpec(), 10**8, 2**30))
    assert result.hash is None and "vanished" in result.error


def fingerprint_files(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = b"" if os.path.islink(p) else open(p, "rb").read()
            out[p] = (hashlib.sha256(data).hexdigest(), st.st_mtime_ns, st.st_mode)
    return out


@pytest.mark.slow
def test_no_operation_changes_a_users_image(tmp_path, capsys):
    make_bad_files(tmp_path / "imgs")
    (tmp_path / "queries").mkdir()
    picture(3).save(tmp_path / "queries" / "q.jpg")
    before = fingerprint_files(tmp_path / "imgs")
    before_q = fingerprint_files(tmp_path / "queries")
    params = write_params(tmp_path, distance_threshold=8)
    for op in ("build", "update", "search", "find_duplicates", "export"):
        for engine in ("auto", "bktree"):
            code, _ = run_json(capsys, params, op, "--engine", engine)
            assert code == 0, op
            assert fingerprint_files(tmp_path / "imgs") == before, op
            assert fingerprint_files(tmp_path / "queries") == before_q, op


def test_a_second_writer_waits_then_stops_with_a_message(collection, capsys):
    params = write_params(collection, lock_timeout=0.3)
    run_json(capsys, params, "build")
    with rs.RunLock(str(collection / "db" / "images.db"), 0):
        start = time.monotonic()
        code = rs.main(["update", "--params", params, "-q"])
        err = capsys.readouterr().err
        assert code == 1 and "another reverse_search run" in err
        assert 0.3 <= time.monotonic() - start < 5
        code, doc = run_json(capsys, params, "search")  # readers still work
        assert code == 0
    code, doc = run_json(capsys, params, "update")
    assert code == 0


@pytest.mark.parametrize("key", ["db_dir", "bk_dir", "output_dir"])
def test_unusable_output_folders_give_a_message_naming_the_path(collection, capsys, key):
    blocker = collection / "a_file"
    blocker.write_text("x")
    params = write_params(collection, **{key: "a_file/sub"})
    capsys.readouterr()
    code = rs.main(["build", "--params", params])
    err = capsys.readouterr().err
    assert "a_file" in err and "Traceback" not in err
    if key == "bk_dir":  # only a cache: the run goes on from memory
        assert code == 0 and "searching from memory" in err
    else:
        assert code in (1, 2)
    leftovers = [n for n in os.listdir(collection) if n.startswith(".tmp")]
    assert leftovers == []


@pytest.mark.parametrize("damage", ["garbage", "truncate", "other_db", "other_version"])
def test_a_damaged_or_stale_index_is_rebuilt_never_trusted(collection, capsys, damage):
    params = write_params(collection)
    code, ref = run_json(capsys, params, "find_duplicates")
    index = collection / "index" / "hashes.idx"
    data = index.read_bytes()
    if damage == "garbage":
        index.write_bytes(b"\x80\x04 not an index" * 10)
    elif damage == "truncate":
        index.write_bytes(data[: len(data) - 40])
    elif damage == "other_db":
        other = write_params(collection, db_dir="db2", bk_dir="index")
        os.makedirs(collection / "imgs2")
        picture(30).save(collection / "imgs2" / "x.jpg")
        run_json(capsys, other, "build", "--img-dirs", str(collection / "imgs2"))
    else:
        old = f'"format": {rs.INDEX_FORMAT}'.encode()
        assert old in data
        index.write_bytes(data.replace(old, b'"format": 99'))
    params = write_params(collection)
    capsys.readouterr()
    assert rs.main(["find_duplicates", "--params", params, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "rebuilding it" in captured.err
    import json
    assert json.loads(captured.out)["groups"] == ref["groups"]


def test_a_database_from_a_newer_version_is_refused(collection, capsys):
    params = write_params(collection)
    run_json(capsys, params, "build")
    con = sqlite3.connect(collection / "db" / "images.db")
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    code = rs.main(["search", "--params", params, "-q"])
    assert code == 1 and "newer reverse_search" in capsys.readouterr().err


def _wait_for_rows(db_dir, proc, timeout=120):
    """Until the running build or update has committed rows (or ended)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        for name in ("images.db.new", "images.db"):
            if (db_dir / name).exists():
                try:
                    con = sqlite3.connect(db_dir / name, timeout=1)
                    rows = con.execute("SELECT count(hash) FROM images").fetchone()[0]
                    con.close()
                    if 0 < rows < 1000:
                        return
                except sqlite3.OperationalError:
                    pass  # being created, or locked by a commit
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_runs_leave_a_usable_database_and_update_completes(tmp_path, capsys):
    """SIGKILL a real build/update at random moments, 20 times."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(1000):
        picture(k, (48, 36)).save(imgs / f"{k:04d}.png")
    (tmp_path / "ref").mkdir()
    params = write_params(tmp_path, workers=2)
    ref_params = write_params(tmp_path / "ref", img_dirs=[str(imgs)], workers=2)
    script = os.path.join(ROOT, "reverse_search.py")

    def start(params_file, op):
        return subprocess.Popen([sys.executable, script, op, "--params", params_file, "-q"],
                                start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    began = time.monotonic()
    assert start(ref_params, "build").wait() == 0
    full = time.monotonic() - began  # an uninterrupted run, on this machine now
    want = hashes_of(tmp_path, capsys, ref_params)
    rng = random.Random(7)
    partial = 0
    for trial in range(20):
        op = "build" if trial % 3 == 0 else "update"
        if trial % 5 == 4:  # change the collection between trials
            os.utime(imgs / f"{rng.randrange(1000):04d}.png")
        proc = start(params, op)
        if trial % 5 == 0:  # right after a commit: a partial database for sure
            _wait_for_rows(tmp_path / "db", proc)
        else:
            time.sleep(rng.uniform(0.05, 1.0) * full)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it finished first: a complete run is a fine outcome too
        proc.wait()
        for db in (tmp_path / "db" / "images.db", tmp_path / "db" / "images.db.new"):
            if db.exists():
                con = sqlite3.connect(db)
                assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                rows = con.execute("SELECT count(hash) FROM images").fetchone()[0]
                partial += 0 < rows < 1000
                con.close()
    code, doc = run_json(capsys, params, "update")
    assert code == 0
    assert hashes_of(tmp_path, capsys, params) == want
    assert partial >= 1  # some kills landed mid-run, between two commits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_ctrl_c_stops_cleanly_and_update_resumes(tmp_path, capsys, method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} on this platform")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(1500):
        picture(k, (48, 36)).save(imgs / f"{k:04d}.png")
    params = write_params(tmp_path, workers=2)
    cmd = [sys.executable, os.path.join(ROOT, "reverse_search.py"), "build",
           "--params", params]
    env = dict(os.environ, **{rs.START_METHOD_ENV: method})
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    db = tmp_path / "db" / "images.db"
    deadline = time.monotonic() + 60
    rows = 0
    while rows == 0 and time.monotonic() < deadline:  # wait for the first commit
        time.sleep(0.05)
        if db.exists():
            try:
                con = sqlite3.connect(db, timeout=5)
                rows = con.execute("SELECT count(*) FROM images").fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                pass  # the schema is still being created
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    except ProcessLookupError:
        pass  # finished first: checked below
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before Ctrl-C arrived")
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    con = sqlite3.connect(db)
    kept = con.execute("SELECT count(*) FROM images").fetchone()[0]
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert kept >= rows
    code, doc = run_json(capsys, params, "update")
    assert code == 0 and doc["unchanged"] == kept and doc["hashed"] == 1500 - kept
