"""Attacks on a running tool (issue 14): hostile numbers and files in the
settings, a search racing an update, a hashing worker killed, a small file
that decodes to gigabytes, an unmounted drive."""

import json
import os
import signal
import subprocess
import sys
import time

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
