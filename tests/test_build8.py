"""Hashing made cheaper: what may change, by how much, and what must not.

The region windows' products run in BLAS in float32 (another order of
sums than before, and rounder): their hashes must stay within rounding of
the same products in extended precision, and near the plain pHash of each
window's crop.  The content box's line tests and the packing of hashes,
rewritten to take fewer numpy calls, must give what they gave.  A picture
refused for its size is never decoded, whatever its format."""

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, rs
from test_speed_build import photo


def reference_windows(a: np.ndarray, size: int) -> list:
    """The window hashes from the same products as _phash_windows, summed
    in extended precision (np.longdouble) in numpy's own loops."""
    wide = np.longdouble
    ys = rs._span_matrix(a.shape[0], size, np.float64).astype(wide)
    xs = rs._span_matrix(a.shape[1], size, np.float64).astype(wide)
    rows = np.einsum("ij,jk->ik", ys, a.astype(wide))
    k = len(rs.WINDOW_SPANS)
    low = np.einsum("ij,kj->ik", rows, xs).reshape(k, size, k, size)
    hashes = []
    for x, y in rs.WINDOWS:
        block = low[rs.WINDOW_SPANS.index(y), :, rs.WINDOW_SPANS.index(x), :]
        values = block.astype(np.float64).ravel()
        hashes.append(rs._bits_to_ints((values > np.median(values))[None])[0])
    return hashes


def bits(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def photos() -> list:
    """Grey photo-like pictures of the shapes hashing meets (after the
    decode at 1/8 and the reduction: 96 to 191 pixels on the short side),
    and a picture on a flat page, whose page windows are nearly flat."""
    shapes = [(144, 96), (96, 144), (191, 250), (120, 120), (100, 380)]
    ims = [photo(k + 3, size).convert("L") for k, size in enumerate(shapes)]
    page = Image.new("L", (150, 220), 245)
    page.paste(photo(9, (110, 80)).convert("L"), (20, 90))
    return ims + [page]


def test_blas_windows_equal_extended_precision_but_for_rounding():
    """Of the 161 windows of each picture, nearly all are the same hash as
    the products in extended precision; a near tie at the median may flip
    a few bits, never many."""
    spec = rs.HashSpec()
    differ = 0
    for im in photos():
        got = rs.window_hashes(im, spec)
        want = reference_windows(np.asarray(im, dtype=np.float64), spec.size)
        assert len(got) == len(want) == len(rs.WINDOWS)
        distances = [bits(g, w) for g, w in zip(got, want)]
        differ += sum(d > 0 for d in distances)
        assert max(distances) <= 4, distances
    assert differ <= 2  # of 966 window hashes


def test_blas_windows_stay_near_each_crops_plain_phash():
    """A window is the pHash of its crop in floating point (Pillow rounds
    after each pass): within 4 bits for every window, 0-2 for most."""
    spec = rs.HashSpec()
    for im in photos()[:3]:
        w, h = im.size
        got = rs.window_hashes(im, spec)
        near = 0
        for ((x0, x1), (y0, y1)), value in zip(rs.WINDOWS, got):
            left, top = round(x0 * w), round(y0 * h)
            crop = im.crop((left, top, max(left + 1, round(x1 * w)),
                            max(top + 1, round(y1 * h))))
            plain = rs.hash_to_int(rs.phash_numpy(crop, spec.size))
            assert bits(value, plain) <= 4
            near += bits(value, plain) <= 2
        assert near >= 0.9 * len(got)


def write_png(path, width: int, height: int) -> None:
    """A black 1-bit PNG of width x height, written a row at a time (a
    large one is small on disk and huge once decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body))
    pack = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
            ">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


PEAK = """
import resource, sys
sys.path.insert(0, sys.argv[1])
import reverse_search as rs
job = rs.HashJob(rs.HashSpec(), int(sys.argv[3]), 2**30)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = rs.hash_file(rs.HashTask(sys.argv[2]), job)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, result.error)
"""


def test_a_png_over_the_pixel_limit_is_never_decoded(tmp_path):
    """Its EXIF could follow the pixels, so asking Pillow for it decoded
    them all: 12000 x 12000 pixels took 140 MB before it was refused."""
    path = tmp_path / "bomb.png"
    write_png(path, 12000, 12000)
    out = subprocess.run([sys.executable, "-c", PEAK, ROOT, str(path),
                          "1000000"], capture_output=True, text=True,
                         check=True).stdout
    grew_kb, error = out.strip().split(" ", 1)
    assert error.startswith("too many pixels: 12000x12000")
    assert int(grew_kb) < 40_000, out  # decoded: 103,524 KB more


def plain_lines_by_histogram(a: np.ndarray) -> np.ndarray:
    """_plain_lines as first written: a 64-bin histogram of each row."""
    n = len(a)
    bins = np.bincount((a // 4 + 64 * np.arange(n)[:, None]).ravel(),
                       minlength=64 * n).reshape(n, 64)
    spread = bins[:, :-2] + bins[:, 1:-1] + bins[:, 2:]
    background = spread.max(axis=1) >= 0.5 * a.shape[1]
    smooth = (np.abs(np.diff(a, axis=1)) <= 3).mean(axis=1) >= 0.9
    return background | smooth


def edge_runs_by_marks(a: np.ndarray, step: int = 8) -> np.ndarray:
    """_edge_runs as first written: each run's start and end marked."""
    pad = np.vstack([a[:1], a, a[-1:]])
    edge = np.abs(pad[2:] - pad[:-2]) >= step
    n, m = edge.shape
    marks = np.zeros((n, m + 2), dtype=np.int8)
    marks[:, 1:-1] = edge
    steps = np.diff(marks, axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    best = np.zeros(n, dtype=np.int64)
    np.maximum.at(best, rows, ends - starts)
    return best / m


def page_pixels() -> list:
    """Grey pixels as content_box meets them: photos, a photo on a page
    with a caption band, bands of 12 levels, stripes, flat and tiny."""
    rng = np.random.default_rng(5)
    page = np.full((150, 110), 240, dtype=np.int16)
    page[30:120, 10:100] = np.asarray(photo(11, (90, 90)).convert("L"))
    page[5:12, 15:80] = 20  # a caption line
    bands = np.repeat(np.arange(0, 256, 6, dtype=np.int16)[:, None], 90, 1)
    bands[::7, ::3] += rng.integers(0, 14, bands[::7, ::3].shape,
                                    dtype=np.int16)
    np.minimum(bands, 255, out=bands)
    stripes = np.tile((np.arange(97) % 9 * 28).astype(np.int16), (40, 1))
    arrays = [np.asarray(im, dtype=np.int16) for im in photos()]
    arrays += [page, bands, stripes, np.full((30, 31), 7, dtype=np.int16),
               rng.integers(0, 256, (33, 64), dtype=np.int16),
               np.zeros((1, 1), dtype=np.int16),
               rng.integers(0, 256, (5, 2), dtype=np.int16)]
    return arrays + [a.T for a in arrays] + [a[::-1, 1:] for a in arrays
                                              if a.shape[1] > 1]


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_plain_lines_and_edge_runs_equal_their_first_forms():
    """The cheaper forms judge every line as the first ones did (so every
    content box is the same), along rows and along columns."""
    for a in page_pixels():
        assert np.array_equal(rs._plain_lines(a), plain_lines_by_histogram(a))
        assert np.array_equal(rs._edge_runs(a), edge_runs_by_marks(a))


def test_hashes_pack_into_the_same_words():
    rng = np.random.default_rng(2)
    values = [0, 1, 2**63, 2**64 - 1] + \
        [int(v) for v in rng.integers(0, 2**63, 168, dtype=np.int64)]
    for bits in (9, 64):
        kept = [v % 2**bits for v in values]
        assert rs.pack_hashes(kept, bits) == b"".join(
            v.to_bytes(8, "big") for v in kept)
    assert rs.pack_hashes([], 64) == b""
    assert rs.pack_hashes([2**70 + 5], 128) == (2**70 + 5).to_bytes(16, "big")


def hashed_image_by_image(path: str, spec) -> tuple:
    """Every hash of `path` with each function reading the prepared image
    itself (hash_image_bytes hands them the grey pixels it read once)."""
    im = Image.open(path)
    rs.draft(im, spec)
    orientation = rs._exif_orientation(im)
    im, outer = rs.prepare_image(im, spec, orientation, with_box=True)
    value, variants, centres = rs.whole_hashes(im, spec)
    return value, variants, centres, rs.content_hashes(
        im, spec, value, outer) + rs.window_hashes(im, spec)


def test_pixels_read_once_give_every_hash_as_the_image_does(tmp_path):
    """Trimmed borders, a picture on a page, EXIF turns, greys, a palette,
    transparency and odd shapes: the same hashes either way."""
    from test_speed_build import draw_collection
    names = draw_collection(tmp_path / "imgs")
    spec = rs.HashSpec(orientations=True, centres=True, content=True,
                       windows=True)
    boxed = 0
    for name in names:
        path = str(tmp_path / "imgs" / name)
        with open(path, "rb") as fh:
            hashed = rs.hash_image_bytes(fh.read(), spec, 10**9)
        got = (hashed.hash, hashed.variants, hashed.centres, hashed.regions)
        assert got == hashed_image_by_image(path, spec), name
        boxed += hashed.regions[1] != rs.FULL_BOX_WORD
    assert boxed >= 1  # the page's picture was found in it


def test_weight_bands_hold_every_weight():
    """The bands each pass multiplies by hold every non-zero weight of
    Pillow's Lanczos resize, so the sums are the dense product's (exact:
    integers in float64), shrinking, enlarging and keeping the size."""
    for n in (1, 2, 5, 31, 32, 33, 64, 97, 240, 1000):
        for out in (8, 32):
            weights = rs._resize_weights(n, out)
            bands = rs._weight_bands(n, out)
            assert (weights is None) == (bands is None)
            if weights is None:
                continue
            rebuilt = np.zeros_like(weights)
            for rows, cols, block in bands:
                rebuilt[rows, cols] = block.T
            assert np.array_equal(rebuilt, weights), (n, out)
            a = np.asarray(photo(n, (n, 7)).convert("L"), dtype=np.float64)
            assert np.array_equal(rs._resize_pass(a, bands, out), np.clip(
                np.floor((a @ weights.T + 2.0 ** 21) / 2.0 ** 22), 0, 255))
