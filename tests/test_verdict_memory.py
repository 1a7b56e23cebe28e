"""Checks on the pixels are remembered between runs (bk_dir/verdicts.idx):
find_duplicates or a search run again checks only pairs it has not checked
before, with the same results; a file changed since is checked again; a
damaged or foreign memory is ignored and rewritten.  Real images drawn
with Pillow, real SQLite files, main() as a user runs it."""

import json
import os
import re

import pytest

from conftest import picture, write_params
from test_accuracy_crops import CROPS, crop
from test_verify import photo

import reverse_search as rs


def run(capsys, params, *args):
    """main() with --format json, notices kept: (exit code, JSON, stderr)."""
    capsys.readouterr()
    code = rs.main([*args, "--params", str(params), "--format", "json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def remembered(err: str) -> int:
    found = re.search(r"(\d+) checks? on the pixels remembered", err)
    return int(found.group(1)) if found else 0


def groups_of(doc) -> list:
    return sorted(sorted((os.path.basename(m["path"]), m.get("how"))
                         for m in g["images"]) for g in doc["groups"])


@pytest.fixture
def crops(tmp_path):
    """Two photos, each with a crop that only a check on the pixels joins
    to it, and a third photo alone."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    for k, (seed, box) in enumerate(zip((8, 11), CROPS.values()), 1):
        photo(seed).save(imgs / f"photo{k}.jpg", quality=92)
        crop(photo(seed), *box).save(imgs / f"crop{k}.jpg", quality=90)
    photo(21).save(imgs / "photo3.jpg", quality=92)
    return tmp_path


def test_find_duplicates_again_checks_nothing_twice(crops, capsys):
    params = write_params(crops)
    code, first, err = run(capsys, params, "find_duplicates")
    assert code == 0 and remembered(err) == 0
    assert [["crop1.jpg", "photo1.jpg"], ["crop2.jpg", "photo2.jpg"]] == \
        sorted(sorted(n for n, _ in g) for g in groups_of(first))
    assert os.path.isfile(crops / "index" / rs.VERDICTS_NAME)
    code, second, err = run(capsys, params, "find_duplicates")
    assert code == 0 and remembered(err) >= 2
    assert groups_of(second) == groups_of(first)  # how each matched too


def test_a_file_changed_since_is_checked_again(crops, capsys):
    """crop1.jpg replaced by another picture, its time set back (as `cp
    -p` does) and the database not updated: its stale hashes still make it
    a candidate, and the check of the new pixels refuses it."""
    params = write_params(crops)
    code, first, _ = run(capsys, params, "find_duplicates")
    assert ["crop1.jpg", "photo1.jpg"] in \
        [sorted(n for n, _ in g) for g in groups_of(first)]
    path = crops / "imgs" / "crop1.jpg"
    st = os.stat(path)
    crop(photo(21), *CROPS["crop40a.jpg"]).save(path, quality=90)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, second, err = run(capsys, params, "find_duplicates")
    assert code == 0
    names = [sorted(n for n, _ in g) for g in groups_of(second)]
    assert ["crop2.jpg", "photo2.jpg"] in names
    assert not any("crop1.jpg" in g for g in names), names
    assert remembered(err) >= 1  # crop2's check was not made again


def test_damaged_or_foreign_memory_is_ignored_and_rewritten(crops, capsys):
    params = write_params(crops)
    code, first, _ = run(capsys, params, "find_duplicates")
    path = crops / "index" / rs.VERDICTS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20  # inside the verdicts' JSON: the MAC no longer fits
    path.write_bytes(bytes(data))
    code, second, err = run(capsys, params, "find_duplicates")
    assert code == 0 and remembered(err) == 0
    assert groups_of(second) == groups_of(first)
    code, third, err = run(capsys, params, "find_duplicates")
    assert remembered(err) >= 2  # rewritten whole by the run before
    # another program (or max_image_pixels) does not trust these verdicts
    code, fourth, err = run(capsys, params, "find_duplicates",
                            "--max-image-pixels", "100000000")
    assert code == 0 and remembered(err) == 0
    assert groups_of(fourth) == groups_of(first)


def test_memory_keys_each_file_by_its_stamp(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    picture(1).save(a)
    picture(2).save(b)
    memory = rs.VerdictMemory(str(tmp_path / "v.idx"), b"k" * 32, "rules")
    verdict = rs.Verdict(True, "verified", 40, rs.Geometry(
        "b", (1.5, 2.0, 300.25, 200.0), 0.5, 90, -1.25, True, 0.4, 40,
        (640, 480)))
    memory.put(str(a), str(b), verdict)
    memory.save(print)
    again = rs.VerdictMemory(str(tmp_path / "v.idx"), b"k" * 32, "rules")
    assert again.get(str(a), str(b)) == verdict  # every field, exactly
    assert again.get(str(b), str(a)) is None  # a verdict has a direction
    assert rs.VerdictMemory(str(tmp_path / "v.idx"), b"other key" * 4,
                            "rules").get(str(a), str(b)) is None
    assert rs.VerdictMemory(str(tmp_path / "v.idx"), b"k" * 32,
                            "other rules").get(str(a), str(b)) is None
    os.utime(b, ns=(0, 10**9))
    fresh = rs.VerdictMemory(str(tmp_path / "v.idx"), b"k" * 32, "rules")
    assert fresh.get(str(a), str(b)) is None


def test_search_again_checks_nothing_twice(crops, capsys):
    crop(photo(8), *CROPS["crop40a.jpg"]).resize((200, 150)).save(
        crops / "queries" / "q1.jpg", quality=90)
    params = write_params(crops)
    code, first, err = run(capsys, params, "search")
    assert code == 0 and remembered(err) == 0
    found = sorted(os.path.basename(m["path"])
                   for m in first["queries"][0]["matches"])
    assert "photo1.jpg" in found, found
    code, second, err = run(capsys, params, "search")
    assert remembered(err) >= 1
    assert second["queries"] == first["queries"]


def test_a_verdict_of_another_shape_is_checked_afresh(tmp_path):
    """A database written before it kept a key signs its caches with a
    plain checksum: a memory file written by anyone may hold anything."""
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    picture(1).save(a)
    picture(2).save(b)
    path = str(tmp_path / "v.idx")
    memory = rs.VerdictMemory(path, b"", "rules")
    memory.put(str(a), str(b), rs.Verdict(False, "too few matching keypoints"))
    memory.save(print)
    header, arrays = rs.read_container(path, b"")
    import numpy as np
    text = json.dumps([[True, "verified", "many", ["a", [1, 2]]]]).encode()
    rs.write_container(path, {k: header[k] for k in ("format", "rules")},
                       {"digests": arrays["digests"],
                        "items": np.frombuffer(text, dtype=np.uint8)}, b"")
    assert rs.VerdictMemory(path, b"", "rules").get(str(a), str(b)) is None
