"""Candidates that survive edits moving the picture: the content box (the
picture inside a screenshot, post, frame or caption band) and region windows
(crops), matched through the exact engines and saying how they matched."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageDraw

from conftest import (brute_groups, copy_fresh, picture, rs, run_json,
                      write_params)
from test_engines import ENGINES, hash_sets

# ---------------------------------------------------------------- images --


def photo(seed: int, size=(640, 480)) -> Image.Image:
    """A photo-like picture: picture() plus grain and fine texture, as
    photographs have (a smooth synthetic picture would pass for a page)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(picture(seed, size), dtype=float)
    h, w = base.shape[:2]
    texture = 18 * np.sin(np.arange(w)[None, :] / (3 + seed % 5)) * \
        np.cos(np.arange(h)[:, None] / (4 + seed % 3))
    grain = rng.normal(0, 14, base.shape)
    return Image.fromarray(np.clip(base + texture[..., None] + grain, 0, 255)
                           .astype(np.uint8))


WORDS = ("morning walk by the sea", "throwback to last summer",
         "who else remembers this place?", "best day of the trip so far",
         "1,204 likes", "photo_daily", "12:45", "view all 87 comments")


def text_line(draw, x, y, width, colour, seed, size=18):
    """A line of real text (Pillow's own font), as pages and captions have."""
    from PIL import ImageFont
    font = ImageFont.load_default(size=size)
    text = WORDS[seed % len(WORDS)]
    while draw.textlength(text, font=font) < width - x - 60:
        text += " " + WORDS[(seed + len(text)) % len(WORDS)]
    draw.text((x, y), text, fill=colour, font=font)


def phone_screenshot(im: Image.Image, dark: bool = False) -> Image.Image:
    """The picture at full width in a portrait screenshot: status bar, a
    header with an avatar and a name, buttons, a caption, a navigation bar."""
    bg, fg = ((18, 18, 18), (230, 230, 230)) if dark else \
        ((255, 255, 255), (20, 20, 20))
    w = 540
    pic = im.resize((w, round(im.height * w / im.width)), Image.LANCZOS)
    page = Image.new("RGB", (w, 1170), bg)
    draw = ImageDraw.Draw(page)
    text_line(draw, 20, 12, 120, fg, 1)              # status bar
    draw.rectangle((w - 80, 12, w - 20, 22), fill=fg)
    draw.ellipse((16, 50, 56, 90), fill=(128, 128, 128))  # avatar
    text_line(draw, 70, 64, 260, fg, 2)               # name
    top = 110
    page.paste(pic, (0, top))
    y = top + pic.height + 16
    for k in range(4):                               # buttons
        draw.ellipse((16 + 44 * k, y, 46 + 44 * k, y + 30), outline=fg, width=3)
    text_line(draw, 16, y + 50, 300, fg, 3)          # likes
    text_line(draw, 16, y + 75, 480, fg, 4)          # caption
    draw.rectangle((w // 2 - 60, 1150, w // 2 + 60, 1156), fill=fg)  # nav
    return page


def framed(im: Image.Image) -> Image.Image:
    """An off-white print frame, wider at the bottom, with a note on it."""
    w, h = im.size
    page = Image.new("RGB", (w + 60, h + 160), (246, 244, 238))
    page.paste(im, (30, 30))
    text_line(ImageDraw.Draw(page), 40, h + 80, w - 100, (40, 40, 90), 5)
    return page


def captioned(im: Image.Image) -> Image.Image:
    """A black band under the picture with a white caption."""
    w, h = im.size
    page = Image.new("RGB", (w, h + h // 5), (0, 0, 0))
    page.paste(im, (0, 0))
    text_line(ImageDraw.Draw(page), w // 6, h + h // 14, w * 5 // 6,
              (255, 255, 255), 6)
    return page


def on_slide(im: Image.Image) -> Image.Image:
    """The picture at 65 % of the width of a 1280x720 slide with a
    gradient, and a line of text under it."""
    page = Image.new("RGB", (1280, 720))
    draw = ImageDraw.Draw(page)
    for x in range(1280):
        g = 60 + x * 120 // 1280
        draw.line([(x, 0), (x, 720)], fill=(g, g, g + 20))
    page.paste(im.resize((832, 624), Image.LANCZOS), (380, 20))
    text_line(draw, 40, 670, 700, (250, 250, 250), 7, size=26)
    return page


def crop(im, left, top, right, bottom):
    """Keep the box given as fractions of the width and height."""
    w, h = im.size
    return im.crop((round(left * w), round(top * h), round(right * w),
                    round(bottom * h)))


def grey(im) -> np.ndarray:
    return np.asarray(im.convert("L"))


# ------------------------------------------------------- the content box --

def hashed(im, **spec) -> "rs.Hashed":
    """hash_image_bytes of a PNG of im, with the default hashes."""
    import io
    buf = io.BytesIO()
    im.save(buf, "PNG")
    cfg = rs.Config()
    return rs.hash_image_bytes(buf.getvalue(), cfg.spec, 10**9)


@pytest.mark.parametrize("make", [
    phone_screenshot, lambda im: phone_screenshot(im, dark=True), framed,
    captioned, on_slide])
@pytest.mark.parametrize("seed", [11, 12])
def test_content_box_finds_the_picture_inside_a_page(make, seed):
    """The content box's hash (stored after the centres) is close to the
    original's whole hash, whatever the page around the picture: bars, text
    lines, frames, bands, gradients."""
    im = photo(seed)
    page, original = hashed(make(im)), hashed(im)
    content, box = page.regions[0], page.regions[1]
    assert box != rs.FULL_BOX_WORD
    assert (content ^ original.hash).bit_count() <= 8
    assert original.regions[1] == rs.FULL_BOX_WORD  # a photo is all picture


@pytest.mark.parametrize("seed", range(1, 9))
def test_content_box_of_a_plain_photo_is_the_whole(seed):
    """A photograph has no straight border inside it: nothing is cut."""
    a = grey(photo(seed).reduce(4))
    assert rs.content_box(a) == (0, 0, a.shape[1], a.shape[0])


def test_box_words_round_trip():
    box = (0.125, 0.25, 0.875, 1.0)
    assert rs.unpack_box(rs.pack_box(box)) == pytest.approx(box, abs=1e-4)
    assert rs.unpack_box(rs.FULL_BOX_WORD) == (0.0, 0.0, 1.0, 1.0)


# ------------------------------------------------------------- windows --

def test_window_hashes_equal_the_phash_of_each_crop():
    """Two matrix products give each window's pHash: within 2 bits of
    cropping and hashing it with Pillow (its 8-bit rounding), mostly 0."""
    im = photo(5).reduce(4).convert("L")
    spec = rs.HashSpec(windows=True)
    w, h = im.size
    got = rs.window_hashes(im, spec)
    assert len(got) == len(rs.WINDOWS) == 161
    diffs = []
    for ((x0, x1), (y0, y1)), value in zip(rs.WINDOWS, got):
        piece = im.crop((round(x0 * w), round(y0 * h), round(x1 * w),
                         round(y1 * h)))
        diffs.append((rs.hash_to_int(rs.phash_numpy(piece, 8)) ^ value)
                     .bit_count())
    assert max(diffs) <= 4 and np.mean(diffs) < 1


def test_every_window_code_names_its_box_and_stage():
    for k, ((x0, x1), (y0, y1)) in enumerate(rs.WINDOWS):
        code = rs.WINDOW_CODE + k
        assert rs.code_box(code) == (x0, y0, x1, y1)
        assert rs.stage_of(code) == "region window"
        assert rs.MATCH_NAMES[code].startswith("window ")
    assert rs.stage_of(rs.CONTENT_CODE) == "content box"
    assert rs.stage_of(-1) == "exact hash"
    assert rs.stage_of(rs.CENTRE_CODE) == "centre"
    assert rs.stage_of(0) == "orientation"
    assert rs.code_radius(12, rs.WINDOW_CODE) == 8


# ------------------------------------- engines equal brute force (regions) --

def flat_with_regions(bits, values, seed, windows=3):
    """values as main hashes; content boxes for about half the images (a
    shuffle of the values, a few bits off) and `windows` windows each."""
    rng = np.random.default_rng(seed)
    words = (bits + 63) // 64
    n = len(values)

    def near(v):
        for _ in range(int(rng.integers(0, 4))):
            v ^= 1 << int(rng.integers(bits))
        return v
    content = [near(values[int(rng.integers(n))]) for _ in range(n)]
    boxed = rng.random(n) < 0.5
    win = [[near(values[int(rng.integers(n))]) for _ in range(windows)]
           for _ in range(n)]
    detail = np.where(rng.random(n) < 0.8, 3.0, 1.0).astype(np.float32)
    as_words = lambda vs: np.stack([rs.int_to_words(v, words) for v in vs])
    boxes = np.array([rs.pack_box((0.1, 0.1, 0.9, 0.9)) if b else
                      rs.FULL_BOX_WORD for b in boxed], dtype=np.uint64)
    flat = rs.FlatIndex.from_arrays(
        np.arange(n), as_words(values), bits, detail=detail,
        content=as_words(content)[:, None, :], boxes=boxes,
        windows=np.stack([as_words(w) for w in win]))
    flat.kind, flat.fingerprint = f"test/{bits}", "fp"
    return flat, content, boxed, win, detail


def region_distance(values, content, boxed, win, detail, radius, i, j):
    """The best effective distance of i and j over every stage (brute
    force), or None when no stage is within the radius."""
    d = lambda x, y: (x ^ y).bit_count()
    best = [d(values[i], values[j])]
    if boxed[i]:
        best.append(d(content[i], values[j]))
    if boxed[j]:
        best.append(d(values[i], content[j]))
    if boxed[i] and boxed[j]:
        best.append(d(content[i], content[j]))
    if min(detail[i], detail[j]) >= rs.DETAIL_FULL:
        rw = rs.code_radius(radius, rs.WINDOW_CODE)
        for a, b in ((i, j), (j, i)):
            for w in win[b]:
                if d(values[a], w) <= rw:
                    best.append(d(values[a], w) * rs.WINDOW_WEIGHT)
    return min(best) if min(best) <= radius else None


@pytest.mark.parametrize("name", ENGINES)
@settings(max_examples=25, deadline=None)
@given(data=hash_sets(), seed=st.integers(0, 2**32 - 1))
def test_groups_with_content_boxes_and_windows_equal_brute_force(
        tmp_path_factory, name, data, seed):
    bits, values, radius = data
    flat, content, boxed, win, detail = flat_with_regions(bits, values, seed)
    bk = str(tmp_path_factory.mktemp("bk") / "bk.idx")
    regions = flat.region_engines(name, radius, True, bk)
    groups = rs.duplicate_groups(flat, flat.engine(name, radius, True, bk),
                                 radius, False, regions)
    got = sorted(sorted(int(p) for p in g) for g in groups)
    assert got == brute_groups(len(values), lambda i, j: region_distance(
        values, content, boxed, win, detail, radius, i, j) is not None)


@pytest.mark.parametrize("name", ENGINES)
@settings(max_examples=25, deadline=None)
@given(data=hash_sets(), seed=st.integers(0, 2**32 - 1))
def test_search_with_content_boxes_and_windows_equals_brute_force(
        tmp_path_factory, name, data, seed):
    """A query (one of the stored images, its regions as stored) finds every
    image some stage puts within the radius, at the best distance."""
    bits, values, radius = data
    flat, content, boxed, win, detail = flat_with_regions(bits, values, seed)
    bk = str(tmp_path_factory.mktemp("bk") / "bk.idx")
    engine = flat.engine(name, radius, False, bk)
    regions = flat.region_engines(name, radius, False, bk)
    q = int(np.random.default_rng(seed).integers(len(values)))
    box = rs.pack_box((0.1, 0.1, 0.9, 0.9)) if boxed[q] else rs.FULL_BOX_WORD
    query = rs.HashResult("q", hash=values[q], detail=float(detail[q]),
                          extra=rs.pack_hashes(
                              [content[q], box] + win[q], bits))
    _, hits = rs._search_one(query, flat, engine, radius, regions)
    got = {p: h.effective for p, h in hits.items()}
    want = {}
    for p in range(len(values)):
        e = region_distance(values, content, boxed, win, detail, radius, q, p)
        if p == q:
            e = 0
        if e is not None:
            want[p] = e
    # the whole picture wins when within the radius, else the best region
    whole = {p for p in want if (values[p] ^ values[q]).bit_count() <= radius}
    assert set(got) == set(want)
    assert all(got[p] == want[p] for p in set(want) - whole)
    assert all(got[p] == (values[p] ^ values[q]).bit_count() for p in whole)


def test_candidate_edges_say_which_stage_found_them():
    """A pair found only through a window is a region-window edge whose
    code names the window of b; through a content box, a content edge."""
    bits = 64
    rng = np.random.default_rng(1)
    a, b, c = (int(x) for x in rng.integers(0, 2**63, 3))
    words = [rs.int_to_words(v, 1) for v in (a, b, c)]
    wins = np.zeros((3, 2, 1), np.uint64)
    wins[1, 1] = rs.int_to_words(a ^ 0b111, 1)  # b's window 1 ~ a's whole
    content = np.zeros((3, 1, 1), np.uint64)
    content[2, 0] = rs.int_to_words(a ^ 0b1, 1)  # c's box ~ a's whole
    boxes = np.array([rs.FULL_BOX_WORD, rs.FULL_BOX_WORD,
                      rs.pack_box((0.2, 0.1, 0.8, 0.7))], np.uint64)
    flat = rs.FlatIndex.from_arrays(np.arange(3), np.stack(words), bits,
                                    content=content, boxes=boxes,
                                    windows=wins)
    regions = flat.region_engines("scan", 12, True, "")
    edges = rs.candidate_edges(flat, flat.engine("scan", 12, True), 12, regions)
    got = sorted(zip(edges.a.tolist(), edges.b.tolist(), edges.stages(),
                     edges.code.tolist(), edges.bits.tolist()))
    assert got == [(0, 1, "region window", rs.WINDOW_CODE + 1, 3),
                   (0, 2, "content box", rs.CONTENT_CODE, 1)]
    assert rs.unpack_box(flat.boxes[2]) == pytest.approx((0.2, 0.1, 0.8, 0.7),
                                                         abs=1e-4)
    kept = rs.duplicate_groups(flat, flat.engine("scan", 12, True), 12, False,
                               regions, keep_edge=lambda e: e.code == rs.CONTENT_CODE)
    assert [sorted(g.tolist()) for g in kept] == [[0, 2]]


# ------------------------------------------------------- through main() --

@pytest.fixture
def edited(tmp_path, drawn_edited):
    """Eight unrelated photos, and copies of two of them that move the
    picture: crops, a frame, a screenshot, a caption band (this test's own
    copy of the pictures drawn once per session)."""
    copy_fresh(drawn_edited, tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def drawn_edited(tmp_path_factory):
    """The pictures of `edited`, drawn and encoded once."""
    root = tmp_path_factory.mktemp("edited")
    imgs, queries = root / "imgs", root / "queries"
    imgs.mkdir()
    queries.mkdir()
    for seed in range(1, 9):
        photo(seed).save(imgs / f"p{seed}.jpg", quality=90)
    a, b = photo(1), photo(2)
    copies = {
        "crop25.jpg": crop(a, 0.13, 0.05, 0.88, 0.85),      # 25 % off the width
        "corner.jpg": crop(b, 0.12, 0.12, 1.0, 1.0),         # a corner kept
        "axis.jpg": crop(a, 0.0, 0.0, 0.75, 1.0),            # one axis
        "framed.jpg": framed(b),
        "screenshot.jpg": phone_screenshot(a),
        "caption.jpg": captioned(b),
    }
    for name, im in copies.items():
        im.save(queries / name, quality=88)
    return root


EXPECTED = {"crop25.jpg": ("p1.jpg", "window"), "corner.jpg": ("p2.jpg", "window"),
            "axis.jpg": ("p1.jpg", "window"), "framed.jpg": ("p2.jpg", "content"),
            "screenshot.jpg": ("p1.jpg", "content"),
            "caption.jpg": ("p2.jpg", "content")}


def test_search_finds_moved_copies_and_says_how(edited, capsys):
    """Each copy finds its original and nothing else, through the stage
    made for it (hashes only: verified matching may also take a farther
    whole-picture candidate, verified); a plain whole-picture search
    (windows and boxes off) finds none of them."""
    code, doc = run_json(capsys, write_params(edited, matching="fast"),
                         "search")
    assert code == 0
    for q in doc["queries"]:
        name = os.path.basename(q["query"])
        original, stage = EXPECTED[name]
        found = {os.path.basename(m["path"]): m for m in q["matches"]}
        assert list(found) == [original], (name, list(found))
        assert (found[original]["variant"] or "").startswith(stage), \
            (name, found[original]["variant"])
    code, off = run_json(capsys, write_params(edited, matching="fast"),
                         "search", "--no-region-windows", "--no-content-box",
                         "--no-centre-hashes")
    assert all(not q["matches"] for q in off["queries"])
    code, verified = run_json(capsys, write_params(edited), "search")
    for q in verified["queries"]:  # the defaults find them too
        original = EXPECTED[os.path.basename(q["query"])][0]
        assert [os.path.basename(m["path"]) for m in q["matches"]] == [original]


def test_find_duplicates_groups_moved_copies_with_their_originals(edited, capsys):
    """Originals and copies in one collection: each copy lands in the group
    of its original, and the six unrelated photos stay out of every group."""
    for f in (edited / "queries").iterdir():
        f.rename(edited / "imgs" / f.name)
    code, doc = run_json(capsys, write_params(edited), "find_duplicates")
    assert code == 0
    groups = [sorted(os.path.basename(m["path"]) for m in g["images"])
              for g in doc["groups"]]
    want = {"p1.jpg": {"crop25.jpg", "axis.jpg", "screenshot.jpg"},
            "p2.jpg": {"corner.jpg", "framed.jpg", "caption.jpg"}}
    for original, copies in want.items():
        group = next(g for g in groups if original in g)
        assert set(group) == copies | {original}, groups
    assert len(groups) == 2


def test_unrelated_photos_are_not_candidates(tmp_path):
    """Forty unrelated photos: no stage (whole, centre, content box, window)
    brings two of them within the threshold."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for seed in range(100, 140):
        photo(seed, (480, 360)).save(imgs / f"u{seed}.jpg", quality=90)
    params = write_params(tmp_path)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    cfg = rs.config_from(rs.read_params(params), params, {})
    store = rs._open_store(cfg)
    try:
        flat = rs.load_index(cfg, store, rs.Console(quiet=True))
    finally:
        store.close()
    r = cfg.distance_threshold
    regions = flat.region_engines("scan", r, True, "")
    edges = rs.candidate_edges(flat, flat.engine("scan", r, True), r, regions)
    assert flat.windows.shape[1] == len(rs.WINDOWS) and len(flat.ids) == 40
    assert len(edges) == 0, list(zip(edges.stages(), edges.bits.tolist()))


def test_an_old_database_is_rehashed_once_with_a_notice(edited, capsys):
    """A database built without the new hashes is recomputed on update, once,
    with a notice; the second update has nothing to do."""
    params = write_params(edited)
    assert rs.main(["build", "--params", params, "-q", "--no-content-box",
                    "--no-region-windows"]) == 0
    capsys.readouterr()
    assert rs.main(["update", "--params", params]) == 0
    err = capsys.readouterr().err
    assert "rehashing every file" in err and "+content+win161" in err
    assert rs.main(["update", "--params", params]) == 0
    assert "rehashing" not in capsys.readouterr().err
    code, doc = run_json(capsys, params, "search")
    found = {os.path.basename(q["query"]): [os.path.basename(m["path"])
                                            for m in q["matches"]]
             for q in doc["queries"]}
    assert found["crop25.jpg"] == ["p1.jpg"]


# ------------------------------------------------------------ PostgreSQL --

def test_postgresql_holds_the_region_hashes_and_gives_the_same_matches(
        edited, pg_url, capsys):
    """The content box and windows live in the same extra-hash column on
    both stores: the same copies are found, through the same stages."""
    pg_dir = edited / "pg"
    pg_dir.mkdir()
    lite = write_params(edited, matching="fast")
    pg = write_params(pg_dir, database_url=pg_url, matching="fast",
                      img_dirs=[str(edited / "imgs")],
                      input_dir=str(edited / "queries"))
    found = []
    for params in (lite, pg):
        code, doc = run_json(capsys, params, "search")
        assert code == 0
        found.append({os.path.basename(q["query"]): [
            (os.path.basename(m["path"]), m["distance"], m["variant"])
            for m in q["matches"]] for q in doc["queries"]})
    assert found[0] == found[1]
    assert found[1]["crop25.jpg"][0][0] == "p1.jpg"
    assert found[1]["screenshot.jpg"][0][2] == "content box"
