"""Verification's speed tricks change no answer.

- A mirrored copy of a picture stored several times with one hash is
  verified against one of them, not each (EdgeJudge joins images of one
  hash before it verifies an edge), and still joins their group.
- The pixel check's cell maps computed all at once equal those of the
  cell-by-cell loop they replaced, on real pictures laid over each other.
Real images drawn with Pillow; no timings (bench/bench_verify.py measures).
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import rs, write_params
from test_verify import photo

cv2 = pytest.importorskip("cv2")


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

    def counted(self, a, b, plain=False):
        checked.append(frozenset((a, b)))
        return check(self, a, b, plain)
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


# ---- the pixel check's cells: all at once = one by one ----

def cells_one_by_one(x, y, m):
    """The cell-by-cell loop _cell_disagreement replaced (float32 numpy
    statistics of each cell's pixels inside the overlap)."""
    grid = rs.GRID
    h, w = x.shape
    bad = np.zeros((grid, grid), bool)
    counted = np.zeros((grid, grid), bool)
    within = np.zeros((grid, grid), bool)
    for i in range(grid):
        rows = slice(i * h // grid, (i + 1) * h // grid)
        for j in range(grid):
            cols = slice(j * w // grid, (j + 1) * w // grid)
            inside = m[rows, cols]
            if inside.size < 4 or inside.sum() < 0.8 * inside.size:
                continue
            a, b = x[rows, cols][inside], y[rows, cols][inside]
            sa, sb = float(a.std()), float(b.std())
            within[i, j] = True
            if sa < rs.FLAT_STD and sb < rs.FLAT_STD:
                differ = abs(float(a.mean()) - float(b.mean())) > \
                    rs.FLAT_TOLERANCE
            elif sa < rs.FLAT_STD / 2 or sb < rs.FLAT_STD / 2:
                differ = True
            else:
                ncc = float(((a - a.mean()) * (b - b.mean())).mean()) / (sa * sb)
                differ = ncc < rs.CELL_NCC
            bad[i, j] = differ
            counted[i, j] = differ or sa >= rs.FLAT_STD or sb >= rs.FLAT_STD
    return bad, counted, within


def overlaid(seed):
    """(x, y, m) as disagreement_cells makes them: a picture and an edited
    copy (a sticker, a flat band, a shift, a slight turn), warped onto each
    other at half size, brightness matched."""
    rng = np.random.default_rng(seed)
    base = photo(seed, (int(rng.integers(300, 700)), int(rng.integers(200, 600))))
    copy = base.copy()
    draw = ImageDraw.Draw(copy)
    w, h = copy.size
    draw.rectangle([w // 5, h // 4, w // 2, h // 2], fill=(240, 30, 30))
    draw.rectangle([0, h - h // 6, w, h], fill=(20, 20, 20))  # a flat band
    grey_a = np.asarray(base.convert("L"))
    grey_b = np.asarray(copy.convert("L"))
    angle, shift = rng.uniform(-4, 4), rng.uniform(-30, 30, 2)
    t = cv2.getRotationMatrix2D((w / 2, h / 2), angle, rng.uniform(0.9, 1.1))
    t[:, 2] += shift
    hb, wb = grey_b.shape
    warped = cv2.warpAffine(grey_a, t, (wb, hb), flags=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.full(grey_a.shape, 255, np.uint8), t, (wb, hb),
                            flags=cv2.INTER_NEAREST)
    size = (max(rs.GRID, wb // 2), max(rs.GRID, hb // 2))
    x = cv2.resize(warped, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    y = cv2.resize(grey_b, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    m = cv2.resize(inside, size, interpolation=cv2.INTER_AREA) >= 250
    gain = y[m].std() / x[m].std()
    return (x - x[m].mean()) * gain + y[m].mean(), y, m


@pytest.mark.parametrize("seed", range(12))
def test_cells_all_at_once_are_the_cells_one_by_one(seed):
    x, y, m = overlaid(seed)
    fast = rs._cell_disagreement(x, y, m)
    slow = cells_one_by_one(x, y, m)
    assert slow[2].sum() >= 40 and slow[0].any() and slow[1].any()
    for got, want in zip(fast, slow):
        assert got.dtype == bool and got.tolist() == want.tolist()
