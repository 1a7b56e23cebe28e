"""Verification's speed tricks change no answer.

- A mirrored copy of a picture stored several times with one hash is
  verified against one of them, not each (EdgeJudge joins images of one
  hash before it verifies an edge), and still joins their group.
Real images drawn with Pillow; no timings (bench/bench_verify.py measures).
"""

import json
import shutil

import pytest
from PIL import Image

from conftest import rs, write_params
from test_verify import photo

pytest.importorskip("cv2")


# ---- images of one hash: one check for a copy of all of them ----

@pytest.fixture
def one_hash_many_files(tmp_path):
    """A picture stored five times (the same file under other names: one
    hash), its mirror image, and unrelated pictures."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    im = photo(4, (640, 480))
    im.save(imgs / "a0.jpg", quality=92)
    for k in range(1, 5):
        shutil.copyfile(imgs / "a0.jpg", imgs / f"a{k}.jpg")
    im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(imgs / "mirror.jpg",
                                                       quality=90)
    for seed in (31, 32):
        photo(seed, (640, 480)).save(imgs / f"other{seed}.jpg", quality=90)
    return tmp_path


def test_a_mirrored_copy_of_one_hash_is_verified_once_not_per_file(
        one_hash_many_files, monkeypatch):
    checked = []
    check = rs.Verifier.check

    def counted(self, a, b):
        checked.append(frozenset((a, b)))
        return check(self, a, b)
    monkeypatch.setattr(rs.Verifier, "check", counted)
    folder = one_hash_many_files
    params = write_params(folder, html_report=False, matching="verified")
    assert rs.main(["build", "--params", params, "-q"]) == 0
    assert rs.main(["find_duplicates", "--params", params, "-q"]) == 0
    doc = json.loads((folder / "out" / "find_duplicates.json").read_text())
    names = [sorted(m["path"].rsplit("/", 1)[-1] for m in g["images"])
             for g in doc["groups"]]
    assert names == [["a0.jpg", "a1.jpg", "a2.jpg", "a3.jpg", "a4.jpg",
                      "mirror.jpg"]]
    mirror = [m for m in doc["groups"][0]["images"]
              if m["path"].endswith("mirror.jpg")][0]
    assert mirror["how"]["verified"] and mirror["how"]["geometry"]["mirror"]
    # the edge joining it, then its lead's own check for the report: the
    # five files of one hash were each verified before (6 checks)
    with_mirror = [p for p in checked
                   if any(q.endswith("mirror.jpg") for q in p)]
    assert 1 <= len(with_mirror) <= 2
    assert len(set(checked)) == len(checked)  # no pair checked twice
