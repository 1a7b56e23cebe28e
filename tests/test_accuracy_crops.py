"""Copies that keep only part of the picture: a 40 % crop (a third of the
picture) found through the narrow windows, and unrelated pictures left
apart.  Real photo-like pictures drawn with Pillow in tmp_path."""

import os

import numpy as np
import pytest

from conftest import edge_judge, rs, run_json, write_params
from test_verify import photo

pytest.importorskip("cv2")


def crop(im, left, top, right, bottom):
    """Keep the box given as shares of the width and height."""
    w, h = im.size
    return im.crop((round(left * w), round(top * h), round(right * w),
                    round(bottom * h)))


# where the 40 % crops lie: off the 5 % grid, and off-centre
CROPS = {"crop40a.jpg": (0.31, 0.36, 0.91, 0.96),
         "crop40b.jpg": (0.08, 0.31, 0.68, 0.91)}


@pytest.fixture
def cropped(tmp_path):
    """Two originals (one also a query), a 40 % crop of each, unrelated
    photos."""
    imgs, queries = tmp_path / "imgs", tmp_path / "queries"
    imgs.mkdir()
    queries.mkdir()
    for seed, (name, box) in zip((8, 11), CROPS.items()):
        original = photo(seed)
        original.save(imgs / f"original{seed}.jpg", quality=92)
        crop(original, *box).save(imgs / name, quality=90)
    photo(8).save(queries / "original8.jpg", quality=92)
    for seed in (21, 22, 23, 24):
        photo(seed).save(imgs / f"other{seed}.jpg", quality=90)
    return tmp_path


def by_name(matches):
    return {os.path.basename(m["path"]): m for m in matches}


def test_narrow_windows_are_60_percent_of_each_side_in_steps_of_5():
    narrow = [(x, y) for x, y in rs.WINDOWS if x in rs.NARROW_SPANS]
    assert len(narrow) == 81 and len(rs.WINDOWS) == 80 + 81
    for x, y in narrow:
        assert y in rs.NARROW_SPANS
        assert x[1] - x[0] == pytest.approx(0.6)
    assert {x[0] for x, _ in narrow} == {round(0.05 * k, 2) for k in range(9)}
    code = rs.WINDOW_CODE + rs.WINDOWS.index(
        (rs.NARROW_SPANS[3], rs.NARROW_SPANS[4]))
    assert rs.MATCH_NAMES[code] == "window 60 % x 60 % at 15 %, 20 %"
    assert rs.code_box(code) == pytest.approx((0.15, 0.2, 0.75, 0.8))
    assert rs.stage_of(code) == "region window"
    assert rs.HashSpec(windows=True).kind.endswith("+win161")


def test_a_40_percent_crop_is_near_a_narrow_window_of_its_original():
    """The crop's whole hash lies within the window radius of the narrow
    window around it, and of no window of an unrelated photo."""
    spec = rs.Config().spec
    original, other = photo(8), photo(21)
    piece = crop(original, *CROPS["crop40a.jpg"])

    def hashed(im):
        import io
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return rs.hash_image_bytes(buf.getvalue(), spec, 10**9)
    whole = hashed(piece).hash
    radius = rs.code_radius(rs.Config().distance_threshold, rs.WINDOW_CODE)

    def nearest(h):
        windows = np.array(h.regions[2:], dtype=np.uint64)
        d = np.bitwise_count(windows ^ np.uint64(whole))
        return int(d.min()), int(d.argmin())
    d, k = nearest(hashed(original))
    assert d <= radius
    assert rs.WINDOWS[k][0] in rs.NARROW_SPANS  # no wide window is as near
    assert nearest(hashed(other))[0] > radius + 4


def test_search_finds_a_40_percent_crop_and_says_where_it_lies(cropped, capsys):
    params = write_params(cropped)
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    matches = by_name(doc["queries"][0]["matches"])
    assert "crop40a.jpg" in matches
    assert not {n for n in matches if n.startswith("other")}
    assert "crop40b.jpg" not in matches  # the other original's crop
    how = matches["crop40a.jpg"]["how"]
    assert how["stage"] == "region window" and how["verified"]
    assert how["region"].startswith("window 60 % x 60 %")
    g = how["geometry"]
    assert g["inner"] == "b" and 0.3 <= g["share"] <= 0.42  # 60 % x 60 %
    left, top, right, bottom = g["box"]
    assert left == pytest.approx(0.31 * 800, abs=24)
    assert top == pytest.approx(0.36 * 600, abs=24)


def test_the_fast_mode_finds_it_by_the_narrow_window_alone(cropped, capsys):
    params = write_params(cropped, matching="fast")
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    matches = by_name(doc["queries"][0]["matches"])
    assert matches["crop40a.jpg"]["how"]["region"].startswith(
        "window 60 % x 60 %")


def test_find_duplicates_groups_each_40_percent_crop_with_its_original(
        cropped, capsys):
    params = write_params(cropped)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    groups = [set(by_name(g["images"])) for g in doc["groups"]]
    assert {"original8.jpg", "crop40a.jpg"} in groups
    assert {"original11.jpg", "crop40b.jpg"} in groups
    assert not any(n.startswith("other") for g in groups for n in g)
    mine = next(by_name(g["images"]) for g in doc["groups"]
                if "crop40a.jpg" in by_name(g["images"]))
    how = mine["crop40a.jpg"]["how"]
    assert how["verified"] and how["stage"] in ("region window", "keypoints")
    assert mine["original8.jpg"]["keep"]  # the whole picture is kept


def test_unrelated_photos_are_not_joined_through_narrow_windows(tmp_path,
                                                                capsys):
    """Twelve different photos: no verified match, no group, whatever the
    narrow windows propose."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    for seed in range(30, 42):
        photo(seed).save(imgs / f"p{seed}.jpg", quality=90)
        crop(photo(seed + 100), 0.2, 0.2, 0.8, 0.8).save(
            imgs / f"c{seed}.jpg", quality=90)
    params = write_params(tmp_path)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    assert doc["groups"] == []


# ------------------------------------------- keypoints through a copy --

def with_text(im):
    """Outlined text over the top and the bottom of the picture (a meme):
    verification refuses it with a copy the text is not on."""
    from PIL import ImageDraw, ImageFont
    im = im.copy()
    draw = ImageDraw.Draw(im)
    w, h = im.size
    font = ImageFont.load_default(size=int(h * 0.11))
    for y, text in ((0.03, "WHEN IT'S MONDAY AGAIN"), (0.83, "AND THEN IT RAINED")):
        for dx in (-3, 0, 3):
            for dy in (-3, 0, 3):
                draw.text((w * 0.03 + dx, h * y + dy), text, font=font,
                          fill=(0, 0, 0))
        draw.text((w * 0.03, h * y), text, font=font, fill=(255, 255, 255))
    return im


@pytest.fixture
def meme(tmp_path):
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    original = photo(5)
    with_text(original).save(imgs / "meme.jpg", quality=88)
    original.save(imgs / "original.jpg", quality=92)
    w, h = original.size
    original.crop((40, 30, w - 40, h - 30)).transpose(
        Image.Transpose.ROTATE_180).save(imgs / "turned.jpg", quality=90)
    photo(21).save(imgs / "other.jpg", quality=90)
    return tmp_path


def test_a_lead_with_text_joins_a_turned_copy_through_its_unedited_copy(meme):
    """The lead (the copy with text) does not verify with the turned crop;
    its copy within half the threshold (the original) does: the turned
    crop joins, saying so, and an unrelated photo does not."""
    params = write_params(meme)
    with edge_judge(params) as (flat, store, judge, edges):
        rows = store.rows_by_id(int(i) for i in flat.ids)
        at = {os.path.basename(rows[int(i)].path): p
              for p, i in enumerate(flat.ids)}
        members = np.array([at[n] for n in ("meme.jpg", "original.jpg",
                                            "turned.jpg", "other.jpg")])
        free = np.array([False, False, True, True])
        lead = at["meme.jpg"]
        assert not judge.check(rows[int(flat.ids[lead])].path,
                               rows[int(flat.ids[at["turned.jpg"]])].path
                               ).accepted  # the text is in the way
        assert list(edges.copies_of(lead, members[:2])) == [at["original.jpg"]]
        assert edges.joiners(lead, members, free, group=members[:2]) == [2]
        how = edges.how(lead, at["turned.jpg"], -1)
        assert how.stage == "keypoints through a copy" and how.verified
        assert how.geometry.turn == 180
        assert "keypoints through a copy, verified" in how.text()
        # without a copy of the lead in its group nothing is joined
        assert edges.joiners(lead, members, free, group=members[:1]) == []


# ------------------------------------------ a group's lead reaches further --

def with_sticker(im, cx, cy, share=0.08):
    """An opaque round sticker with a face, `share` of the picture."""
    from PIL import ImageDraw
    im = im.copy()
    w, h = im.size
    r = round((share * w * h / np.pi) ** 0.5)
    draw = ImageDraw.Draw(im)
    x, y = cx * w, cy * h
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 204, 0),
                 outline=(0, 0, 0), width=max(1, r // 12))
    draw.ellipse((x - r // 2, y - r // 3, x - r // 4, y - r // 12), fill=(0, 0, 0))
    draw.ellipse((x + r // 4, y - r // 3, x + r // 2, y - r // 12), fill=(0, 0, 0))
    return im


@pytest.fixture
def stickered(tmp_path):
    """An original and a smaller copy (a group), the original with a sticker
    (14 bits away, past the threshold; its centres too), unrelated photos."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    original = photo(14)
    original.save(imgs / "original.jpg", quality=92)
    original.resize((640, 480)).save(imgs / "small.jpg", quality=88)
    with_sticker(original, 0.6, 0.6, 0.12).save(imgs / "sticker.jpg", quality=90)
    for seed in (21, 22, 23):
        photo(seed).save(imgs / f"other{seed}.jpg", quality=90)
    return tmp_path


def test_a_groups_lead_takes_a_stickered_copy_past_the_threshold(stickered,
                                                                 capsys):
    params = write_params(stickered)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    groups = [by_name(g["images"]) for g in doc["groups"]]
    assert [set(g) for g in groups] == [{"original.jpg", "small.jpg",
                                         "sticker.jpg"}]
    how = groups[0]["sticker.jpg"]["how"]
    assert how["verified"] and how["stage"] == "exact hash"
    assert groups[0]["sticker.jpg"]["distance"] > 12  # past the threshold
    assert how["geometry"]["share"] > 0.9


def test_fast_matching_leaves_the_stickered_copy_out(stickered, capsys):
    params = write_params(stickered, matching="fast")
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    assert [set(by_name(g["images"])) for g in doc["groups"]] == [
        {"original.jpg", "small.jpg"}]


# ------------------------------------- a search's checks that find copies --

def test_checks_that_find_copies_do_not_use_up_a_searchs_budget(
        tmp_path, capsys, monkeypatch):
    """With room for one refused check per query, a search still verifies
    and finds every crop of the query (each found by a window, so each
    verified), and nothing unrelated."""
    imgs, queries = tmp_path / "imgs", tmp_path / "queries"
    imgs.mkdir()
    queries.mkdir()
    original = photo(8)
    original.save(queries / "original.jpg", quality=92)
    for k, box in enumerate(((0.0, 0.0, 0.8, 0.85), (0.15, 0.1, 1.0, 0.9),
                             (0.1, 0.2, 0.95, 1.0))):
        crop(original, *box).save(imgs / f"crop{k}.jpg", quality=90)
    for seed in (21, 22):
        photo(seed).save(imgs / f"other{seed}.jpg", quality=90)
    monkeypatch.setattr(rs, "VERIFY_PER_QUERY", 1)
    params = write_params(tmp_path)
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    matches = by_name(doc["queries"][0]["matches"])
    assert set(matches) == {"crop0.jpg", "crop1.jpg", "crop2.jpg"}
    assert all(m["how"]["verified"] for m in matches.values())
