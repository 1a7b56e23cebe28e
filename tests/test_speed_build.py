"""Hashing done faster stores exactly what it stored before.

The fast paths of Hashing (every whole-picture pHash from Pillow's integer
weights as matrix products) are checked against the straightforward path
kept beside them (one Pillow resize and one phash per copy), on real images
drawn with Pillow: every stored value of a build must be the same."""

import os
import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import picture, rs, write_params

COLUMNS = ("path, size, digest, hash, variants, low_detail, detail, width, "
           "height, error, traits")


def photo(seed: int, size: tuple) -> Image.Image:
    """Gradients, shapes and grain: pixels like a photograph's."""
    im = picture(seed, (max(size[0], 64), max(size[1], 64))).resize(size)
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 6, (size[1], size[0], 1))
    a = np.clip(np.asarray(im, dtype=np.float64) + grain, 0, 255)
    return Image.fromarray(a.astype(np.uint8), "RGB")


def with_orientation(im: Image.Image, orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Camera maker"
    return exif


def draw_collection(folder) -> list:
    """JPEGs and PNGs of many shapes (tiny, tall, wide, strips, upscaled),
    EXIF turns, greys, a palette, transparency, flat and symmetric ones."""
    os.makedirs(folder)
    shapes = [(640, 480), (480, 640), (1000, 700), (300, 900), (1200, 100),
              (97, 131), (40, 30), (33, 35), (5, 5), (1, 1), (1300, 900),
              (150, 96), (96, 150), (2000, 60)]
    names = []
    for k, size in enumerate(shapes):
        im = photo(k + 1, size)
        im.save(os.path.join(folder, f"p{k}.jpg"), quality=88)
        im.save(os.path.join(folder, f"p{k}.png"))
        names += [f"p{k}.jpg", f"p{k}.png"]
    for orientation in (3, 5, 6, 7, 8, 2):
        photo(40 + orientation, (500, 330)).save(
            os.path.join(folder, f"turn{orientation}.jpg"),
            exif=with_orientation(None, orientation))
        names.append(f"turn{orientation}.jpg")
    photo(60, (400, 300)).convert("L").save(os.path.join(folder, "grey.png"))
    photo(61, (400, 300)).convert("P").save(os.path.join(folder, "palette.png"))
    rgba = photo(62, (300, 300)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((300, 300)))
    rgba.save(os.path.join(folder, "alpha.png"))
    Image.new("RGB", (320, 240), (90, 90, 90)).save(os.path.join(folder, "flat.png"))
    half = np.asarray(photo(63, (160, 240)))
    Image.fromarray(np.hstack([half, half[:, ::-1]])).save(
        os.path.join(folder, "mirror.png"))
    framed = Image.new("RGB", (600, 800), (250, 250, 250))
    framed.paste(photo(64, (500, 380)), (50, 200))
    ImageDraw.Draw(framed).text((60, 60), "a caption", fill=(0, 0, 0))
    framed.save(os.path.join(folder, "post.png"))
    return names + ["grey.png", "palette.png", "alpha.png", "flat.png",
                    "mirror.png", "post.png"]


def stored(db: str) -> dict:
    with sqlite3.connect(db) as con:
        return {r[0]: r for r in con.execute(f"SELECT {COLUMNS} FROM images")}


def plain_row(path: str, job) -> tuple:
    """The row of `path` hashed the straightforward way."""
    result = rs.hash_file(rs.HashTask(path), job)
    return (result.path, result.size, result.digest, result.hash, result.extra, int(result.low_detail), result.detail, result.width,
            result.height, result.error, result.traits)


@pytest.fixture
def plain(monkeypatch):
    """Hashing with every whole-picture hash made the straightforward way."""
    def use():
        monkeypatch.setattr(rs, "whole_hashes", rs._plain_whole_hashes)
    return use


def test_build_stores_what_the_straightforward_path_stores(tmp_path, plain):
    names = draw_collection(tmp_path / "imgs")
    params = write_params(tmp_path, workers=2)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    rows = stored(str(tmp_path / "db" / rs.DB_NAME))
    assert sorted(os.path.basename(p) for p in rows) == sorted(names)
    fast_hashes = {p: r[3] for p, r in rows.items()}
    plain()
    job = rs.HashJob(rs.Config().spec, 178956970, 2**30)
    for path, row in sorted(rows.items()):
        want = plain_row(path, job)
        got = row[:3] + (rs.hash_from_db(row[3]),) + row[4:]
        assert got == want, os.path.basename(path)
    assert len(set(fast_hashes.values())) > len(rows) // 2  # not all alike


@pytest.mark.parametrize("size", [3, 8, 16])
def test_every_whole_hash_equals_its_plain_hash(size):
    """The picture, its 7 turns and 2 centres, at three hash sizes, on
    photo-like, flat, striped and mirror-symmetric pixels of many shapes
    (Pillow passes rows or columns first by shape: both are met)."""
    spec = rs.HashSpec(size=size, orientations=True, centres=True)
    rng = np.random.default_rng(size)
    shapes = [(100, 150), (150, 100), (200, 96), (35, 33), (36, 34), (1, 1),
              (3, 500), (500, 3), (64, 64), (31, 90)] + \
        [tuple(int(v) for v in rng.integers(1, 420, 2)) for _ in range(12)]
    for k, (h, w) in enumerate(shapes):
        grey = photo(k, (w, h)).convert("L")
        stripes = Image.fromarray(np.tile(
            (np.arange(w) % 7 * 40).astype(np.uint8), (h, 1)), "L")
        half = np.asarray(grey)[:, : (w + 1) // 2]
        mirror = Image.fromarray(np.hstack([half, half[:, ::-1][:, w % 2:]]), "L")
        for im in (grey, Image.new("L", (w, h), 77), stripes, mirror):
            assert rs.whole_hashes(im, spec) == rs._plain_whole_hashes(im, spec), \
                (size, h, w)


def test_exact_resizes_are_pillows_pixels():
    """Every resized copy the fast path hashes is Pillow's, pixel for pixel."""
    spec = rs.HashSpec(orientations=True, centres=True)
    rng = np.random.default_rng(7)
    lanczos = Image.Resampling.LANCZOS
    for h, w in [(100, 150), (150, 100), (99, 65), (99, 66), (20, 10),
                 (640, 200), (32, 77), (7, 1000)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        want = [im] + [im.transpose(getattr(Image.Transpose, t))
                       for t in rs.VARIANTS] + \
            [rs.centre_region(im, keep) for keep in rs.CENTRES]
        got = rs._exact_smalls(im, spec)
        assert len(got) == len(want)
        for small, copy in zip(got, want):
            assert np.array_equal(small, np.asarray(copy.resize((32, 32), lanczos)))


@pytest.mark.parametrize("out", [12, 32, 64])
def test_pass_order_rule_is_this_pillows(out):
    """The rule _pass_order picked gives Pillow's pixels on noise of shapes
    along and across its edges (the probes are a few of these)."""
    rule = rs._pass_order(out)
    assert rule is not None
    rng = np.random.default_rng(out)
    shapes = [(h, w) for h in range(out - 2, 4 * out, 5)
              for w in range((h + out) // 2 - 2, (h + out) // 2 + 3)] + \
        [tuple(int(v) for v in rng.integers(1, 8 * out, 2)) for _ in range(60)]
    for h, w in shapes:
        noise = rng.integers(0, 256, (h, w), dtype=np.uint8)
        want = np.asarray(Image.fromarray(noise, "L").resize(
            (out, out), Image.Resampling.LANCZOS))
        got = rs._exact_resize(noise.astype(np.float64), out, rule(h, w, out))
        assert np.array_equal(got, want), (h, w)


def test_row_medians_are_numpys():
    """_row_medians takes np.median's steps: the same value for odd and even
    lengths, ties, signs and scales."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 9, 64, 81, 256):
        for scale in (1.0, 1e-12, -1e12):
            a = rng.random((7, n)) * scale
            for rows in (a, np.round(a * 3 / scale) * scale):
                assert np.array_equal(rs._row_medians(rows), np.median(rows, axis=1))


@pytest.mark.parametrize("bits", [4, 9, 64, 256])
def test_bits_to_ints_packs_as_hash_to_int(bits):
    """Window and whole hashes packed at once equal hash_to_int of each."""
    import imagehash
    rows = np.random.default_rng(bits).random((20, bits)) > 0.5
    rows[0] = True
    rows[1] = False
    side = int(bits ** 0.5)
    assert rs._bits_to_ints(rows) == [
        rs.hash_to_int(imagehash.ImageHash(row.reshape(side, side))) for row in rows]


def test_a_pillow_of_another_pass_order_is_hashed_the_plain_way(monkeypatch):
    """When no known rule gives this Pillow's pixels (a future version),
    nothing is made the fast way: every hash is the plain one."""
    monkeypatch.setattr(rs, "PASS_ORDERS", (lambda h, w, out: False,))
    rs._pass_order.cache_clear()
    try:
        spec = rs.HashSpec(orientations=True, centres=True)
        im = photo(5, (150, 100)).convert("L")
        assert rs._exact_smalls(im, spec) is None
        assert rs.whole_hashes(im, spec) == rs._plain_whole_hashes(im, spec)
    finally:
        rs._pass_order.cache_clear()
