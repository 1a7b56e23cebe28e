"""Attacks on a running tool (issue 14): hostile numbers and files in the
settings, a search racing an update, a hashing worker killed, a small file
that decodes to gigabytes, an unmounted drive."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT, rs, run_json, write_params


def error_of(capsys, *args):
    """main() that must fail: (exit code, stderr), never a traceback."""
    capsys.readouterr()
    code = rs.main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


# ---- hostile numbers and structures in the settings ----

@pytest.mark.parametrize("text, key", [
    ('{"lock_timeout": NaN}', "lock_timeout"),
    ('{"lock_timeout": Infinity}', "lock_timeout"),
    ('{"lock_timeout": -Infinity}', "lock_timeout"),
    ('{"max_image_pixels": 1e300}', "max_image_pixels"),
    ('{"max_file_mb": 1e300}', "max_file_mb"),
    ('{"distance_threshold": NaN}', "distance_threshold"),
    ('{"workers": Infinity}', "workers"),
])
def test_non_finite_and_absurd_numbers_are_refused(tmp_path, capsys, text, key):
    (tmp_path / "imgs").mkdir()
    params = tmp_path / "params.json"
    params.write_text(text[:-1] + ', "img_dirs": ["imgs"]}')
    code, err = error_of(capsys, "build", "--params", str(params))
    assert code == 2 and f"key '{key}'" in err and str(params) in err
    assert len(err.splitlines()) == 1


def test_non_finite_numbers_on_the_command_line_are_refused(tmp_path, capsys):
    params = write_params(tmp_path)
    for value in ("nan", "inf", "-inf", "1e300"):
        code, err = error_of(capsys, "build", "--lock-timeout", value,
                             "--params", params)
        assert code == 2 and "--lock-timeout" in err, err


def test_params_nested_100k_deep_gets_a_message(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text('{"img_dirs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, err = error_of(capsys, "build", "--params", str(params))
    assert code == 2 and str(params) in err and "nested too deeply" in err


def test_a_huge_field_in_not_duplicates_gets_a_message(collection, capsys):
    params = write_params(collection)
    (collection / "not_duplicates.csv").write_text(
        "imgs/p1.jpg," + "x" * 300_000 + "\n")
    code, err = error_of(capsys, "find_duplicates", "--params", params)
    assert code == 2 and "not_duplicates.csv" in err and "not_duplicates" in err


def test_a_thousand_workers_are_capped_with_a_notice(collection, capsys):
    params = write_params(collection, workers=1000)
    capsys.readouterr()
    code = rs.main(["build", "--params", params, "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0
    most = rs.most_workers()
    assert f"key 'workers' is 1000; using {most}" in captured.err
    run = rs.parse_run(["build", "--params", params])
    assert run.config.worker_count == most < 1000


# ---- a hashing worker killed (as the out-of-memory killer does) ----

SCRIPT = os.path.join(ROOT, "reverse_search.py")


def slow_png(path, w=4000, h=3000):
    """A small file that takes about 0.15 s to decode (12 MP of gradient)."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(a).save(path, compress_level=1)


def children(pid):
    """(pid, CPU seconds) of the live child processes of pid, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            ticks = int(fields[11]) + int(fields[12])  # utime + stime
            found.append((int(entry), ticks / os.sysconf("SC_CLK_TCK")))
    return found


def kill_a_busy_child(proc, busy_seconds=0.05, timeout=60):
    """SIGKILL the first child of proc that has been computing a while."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for pid, cpu in children(proc.pid):
            if cpu >= busy_seconds:
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.02)
    pytest.fail("no busy worker appeared")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_fails_its_file_and_the_run_goes_on(tmp_path):
    import shutil
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    slow_png(imgs / "slow00.png")
    for k in range(1, 10):  # 8 or more: fewer are hashed without workers
        shutil.copy(imgs / "slow00.png", imgs / f"slow{k:02}.png")
    params = write_params(tmp_path, workers=2)
    proc = subprocess.Popen([sys.executable, SCRIPT, "build", "--params", params,
                             "--format", "json", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        kill_a_busy_child(proc)
        out, err = proc.communicate(timeout=120)  # before the fix: hung for ever
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["files"] == 10 and doc["hashed"] == 9 and doc["failed"] == 1
    reason = doc["failures"][0]["error"]
    assert "hashing process died" in reason and "signal 9" in reason
    # the failed file is tried again by the next update, and hashed
    code = subprocess.run([sys.executable, SCRIPT, "update", "--params", params,
                           "--format", "json", "-q"], capture_output=True,
                          text=True, timeout=120)
    assert code.returncode == 0 and json.loads(code.stdout)["failed"] == 0


# ---- search or find_duplicates while an update removes files ----

def update_removes_between_index_and_rows(monkeypatch, params, victim):
    """Right after the index is loaded, a second connection, as update does
    (Store.delete_paths), forgets `victim`: the race of a search with an
    update, made deterministic.  Returns what the writer saw."""
    seen = []
    load = rs.load_index

    def load_then_update_runs(cfg, store, ui):
        flat = load(cfg, store, ui)
        writer = rs.Store(cfg.db_path)
        writer.db.execute("PRAGMA busy_timeout = 300")
        try:
            writer.delete_paths([str(victim)])
            seen.append("removed")
        except rs.sqlite3.OperationalError as exc:  # the reader's snapshot
            seen.append(str(exc))
        finally:
            writer.close()
        return flat

    monkeypatch.setattr(rs, "load_index", load_then_update_runs)
    return seen


@pytest.mark.parametrize("operation", ["search", "find_duplicates"])
def test_an_update_removing_a_match_mid_run_is_no_internal_error(
        collection, capsys, monkeypatch, operation):
    params = write_params(collection)
    assert run_json(capsys, params, "build")[0] == 0
    victim = collection / "imgs" / "p1.jpg"
    seen = update_removes_between_index_and_rows(monkeypatch, params, victim)
    capsys.readouterr()
    code = rs.main([operation, "--params", params, "--format", "json", "-q"])
    out, err = capsys.readouterr()
    assert "internal error" not in err and code == 0, err
    doc = json.loads(out)
    assert seen  # the writer ran between the index and the rows
    if seen == ["removed"]:  # the writer got in: the file is simply not reported
        shown_paths = json.dumps(doc)
        assert str(victim) not in shown_paths
    else:  # the writer waited: the answer is the state the run started from
        assert "locked" in seen[0]
        paths = [m["path"] for q in doc.get("queries", []) for m in q["matches"]] + \
            [m["path"] for g in doc.get("groups", []) for m in g["images"]]
        assert str(victim) in paths
    # once the run is over, the update goes through
    writer = rs.Store(os.path.join(collection, "db", "images.db"))
    assert writer.delete_paths([str(victim)]) == 1
    writer.close()


# ---- update: an unmounted drive is not an emptied collection ----

def test_update_keeps_the_rows_of_an_empty_mount_point(collection, capsys):
    params = write_params(collection)
    assert run_json(capsys, params, "build")[0] == 0
    import shutil
    shutil.move(str(collection / "imgs"), str(collection / "elsewhere"))
    (collection / "imgs").mkdir()  # the mount point, drive not mounted
    capsys.readouterr()
    code = rs.main(["update", "--params", params, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)
    assert doc["removed"] == 0 and doc["removed_files"] == []
    assert "is empty, but the database holds 7 files under it" in err
    assert "not mounted" in err and "run build" in err
    assert [d["path"] for d in doc["unreadable_dirs"]] == [str(collection / "imgs")]
    # the drive is back: nothing to rehash, every file still found
    (collection / "imgs").rmdir()
    shutil.move(str(collection / "elsewhere"), str(collection / "imgs"))
    code, doc = run_json(capsys, params, "update")
    assert code == 0 and doc["unchanged"] == 7 and doc["hashed"] == 0


def test_update_keeps_the_rows_of_a_missing_root_and_updates_the_others(
        collection, capsys):
    from conftest import picture
    other = collection / "other"
    other.mkdir()
    picture(9).save(other / "o9.jpg")
    params = write_params(collection, img_dirs=["imgs", "other"])
    assert run_json(capsys, params, "build")[0] == 0
    import shutil
    shutil.rmtree(collection / "imgs")  # the mount point itself is gone
    picture(10).save(other / "o10.jpg")
    capsys.readouterr()
    code = rs.main(["update", "--params", params, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["removed"] == 0 and doc["added_files"] == [str(other / "o10.jpg")]
    assert "is missing, but the database holds 7 files" in err


def test_a_missing_folder_the_database_never_held_is_still_an_error(collection, capsys):
    params = write_params(collection)
    assert run_json(capsys, params, "build")[0] == 0
    code, err = error_of(capsys, "update", "--params", params,
                         "--img-dirs", str(collection / "imgs"), str(collection / "typo"))
    assert code == 2 and "typo does not exist" in err


# ---- update reports renames and lists the files ----

def test_update_reports_renames_and_lists_every_file(collection, capsys):
    from conftest import picture
    params = write_params(collection)
    assert run_json(capsys, params, "build")[0] == 0
    imgs = collection / "imgs"
    os.rename(imgs / "p3.jpg", imgs / "p3 renamed.jpg")
    os.rename(imgs / "p4.jpg", imgs / "sub" / "p4.jpg")   # moved
    os.remove(imgs / "p5.jpg")
    picture(33).save(imgs / "new.jpg")
    picture(2).rotate(3).save(imgs / "p2.jpg", quality=92)  # changed in place
    capsys.readouterr()
    code = rs.main(["update", "--params", params, "--format", "json", "-q"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["renamed_files"] == [
        {"from": str(imgs / "p3.jpg"), "to": str(imgs / "p3 renamed.jpg")},
        {"from": str(imgs / "p4.jpg"), "to": str(imgs / "sub" / "p4.jpg")}]
    assert doc["renamed"] == 2 and doc["removed"] == 1
    assert doc["removed_files"] == [str(imgs / "p5.jpg")]
    assert doc["added_files"] == [str(imgs / "new.jpg")]
    assert doc["changed_files"] == [str(imgs / "p2.jpg")]
    # the same in text with -v; without -v, only the summary
    os.rename(imgs / "new.jpg", imgs / "newer.jpg")
    capsys.readouterr()
    assert rs.main(["update", "--params", params, "-v"]) == 0
    out, err = capsys.readouterr()
    assert f"renamed  {imgs / 'new.jpg'} -> {imgs / 'newer.jpg'}" in out
    assert "0 removed, 1 renamed" in err
    os.rename(imgs / "newer.jpg", imgs / "newest.jpg")
    capsys.readouterr()
    assert rs.main(["update", "--params", params]) == 0
    assert "renamed" not in capsys.readouterr().out


# ---- update shows a total and the time left ----

@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux pty")
def test_update_progress_has_a_total_and_time_left(collection):
    import fcntl
    import pty
    import shutil
    import struct
    import termios
    params = write_params(collection, workers=1)
    assert subprocess.run([sys.executable, SCRIPT, "build", "--params", params, "-q"],
                          timeout=120).returncode == 0
    slow_png(collection / "imgs" / "slow0.png", 3000, 2000)
    for k in range(1, 6):
        shutil.copy(collection / "imgs" / "slow0.png", collection / "imgs" / f"slow{k}.png")
        with open(collection / "imgs" / f"slow{k}.png", "ab") as fh:
            fh.write(b"x" * k)  # other bytes: each one is decoded
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal 100 columns wide, as a user has
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, SCRIPT, "update", "--params", params])
    said = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        said += chunk
    os.waitpid(pid, 0)
    text = said.decode(errors="replace")
    assert "6 hashed" in text, text
    # tqdm: "update: hashing:  50%|...| 3/6 [00:01<00:01, 2.1img/s]"
    assert re.search(r"update: hashing: .*\d/6 \[\d\d:\d\d<\d\d:\d\d", text), text


# ---- a small file that decodes to gigabytes ----

# 38 bytes: a lossless WebP of 16383x10920 RGBA pixels (178.9 MP, under the
# default max_image_pixels), made by Pillow from one uniform colour.
BOMB_WEBP = bytes.fromhex("524946461e000000574542505650384c110000002ffeffa91a"
                          "0750e42ad4a3808188e87f0000")

MEASURE = ("import resource, subprocess, sys\n"
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "print(r.returncode)\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
           "print(r.stdout)\n")


def test_a_small_webp_that_decodes_to_gigabytes_is_skipped_in_bounded_memory(tmp_path):
    from PIL import Image
    from conftest import picture
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "bomb.webp").write_bytes(BOMB_WEBP)
    picture(1).save(imgs / "p1.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's bomb warning: the header only
        with Image.open(imgs / "bomb.webp") as im:  # the crafted file it claims
            assert im.size == (16383, 10920) and im.mode == "RGBA"
            assert im.size[0] * im.size[1] < rs.Config().max_image_pixels
    params = write_params(tmp_path, workers=2)
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, SCRIPT,
                          "build", "--params", params, "--format", "json", "-q"],
                         capture_output=True, text=True, timeout=300).stdout
    code, peak_kib, doc = out.split("\n", 2)
    assert code == "0"
    doc = json.loads(doc)
    assert doc["hashed"] == 1 and doc["failed"] == 1
    reason = doc["failures"][0]["error"]
    assert "max_decode_mb" in reason and "16383x10920" in reason
    # before: 4.25 GB and 14 s for this one file
    assert int(peak_kib) < 600 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"


@pytest.mark.slow
def test_the_decode_budget_counts_a_jpeg_at_the_size_it_decodes_at(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    y, x = np.mgrid[0:4000, 0:6000]
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(imgs / "big.jpg", quality=80)      # 24 MP
    Image.fromarray(rgb).save(imgs / "big.png", compress_level=1)  # 24 MP
    Image.fromarray(rgb[:1000, :1500]).save(imgs / "small.png")   # 1.5 MP
    params = write_params(tmp_path, max_decode_mb=16)
    code, doc = run_json(capsys, params, "build")
    assert code == 0
    failed = {os.path.basename(f["path"]): f["error"] for f in doc["failures"]}
    # a PNG decodes at full size (24 MP x 4 bytes: 92 MiB); a JPEG at 1/8
    assert list(failed) == ["big.png"] and "about 92 MiB" in failed["big.png"]
    assert doc["hashed"] == 2
