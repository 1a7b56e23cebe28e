"""Verification: a copy that moved inside the frame is found and located;
different pictures are not joined.  Real images drawn with Pillow."""

import json
import shutil
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conftest import ROOT, copy_fresh, picture, rs, run_json, write_params

pytest.importorskip("cv2")


def photo(seed, size=(800, 600)):
    """A photo-like picture with texture everywhere (shapes plus grain)."""
    base = np.asarray(picture(seed, size), dtype=np.float32)
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 1, (size[1] // 8, size[0] // 8, 1))
    grain = np.asarray(Image.fromarray(
        (np.clip(grain * 40 + 128, 0, 255)).astype(np.uint8)[:, :, 0]).resize(
            size, Image.BICUBIC), dtype=np.float32)[:, :, None]
    out = np.clip(base + (grain - 128) * 0.6, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def screenshot(im, width=540, height=1170):
    """The picture inside a phone screenshot: status bar, app bar, text."""
    shot = Image.new("RGB", (width, height), (18, 18, 20))
    draw = ImageDraw.Draw(shot)
    draw.rectangle([0, 0, width, 40], fill=(30, 30, 34))
    draw.text((12, 12), "20:24", fill=(230, 230, 230))
    draw.ellipse([12, 60, 52, 100], fill=(200, 220, 90))
    draw.text((64, 72), "photo_daily", fill=(240, 240, 240))
    pic = im.resize((width, round(width * im.height / im.width)), Image.LANCZOS)
    shot.paste(pic, (0, 130))
    y = 130 + pic.height + 20
    for k in range(4):
        draw.ellipse([12 + 40 * k, y, 40 + 40 * k, y + 28], outline=(240, 240, 240))
    draw.text((12, y + 50), "487 likes", fill=(240, 240, 240))
    draw.text((12, y + 75), "Who else remembers this place?", fill=(200, 200, 200))
    draw.rectangle([190, height - 20, 350, height - 14], fill=(200, 200, 200))
    return shot, (0, 130, width, 130 + pic.height)


def dark_frame(x, y, r, seed):
    """A dark astro frame: black with one soft bright blob and faint stars."""
    rng = np.random.default_rng(seed)
    a = rng.normal(6, 2, (512, 512)).clip(0, 255)
    yy, xx = np.mgrid[:512, :512]
    a += 220 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * r * r))
    for sx, sy in rng.integers(0, 512, (25, 2)):
        a[sy, sx] += 120
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "L").filter(
        ImageFilter.GaussianBlur(1))


@pytest.fixture
def edits(tmp_path, drawn_edits):
    """An original, copies that move it inside the frame, unrelated ones:
    this test's own copy of the pictures drawn once per session."""
    copy_fresh(drawn_edits, tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def drawn_edits(tmp_path_factory):
    """The pictures of `edits`, drawn and encoded once (1-2 s each time)."""
    root = tmp_path_factory.mktemp("edits")
    imgs, queries = root / "imgs", root / "queries"
    imgs.mkdir()
    queries.mkdir()
    original = photo(3)
    original.save(queries / "original.jpg", quality=92)
    w, h = original.size
    original.crop((int(w * .2), int(h * .2), int(w * .8), int(h * .8))).save(
        imgs / "crop.jpg", quality=90)
    original.crop((int(w * .1), int(h * .1), int(w * .9), int(h * .9))).save(
        imgs / "crop80.jpg", quality=90)
    framed = Image.new("RGB", (w + 120, h + 220), (250, 250, 246))
    framed.paste(original, (60, 60))
    ImageDraw.Draw(framed).text((70, h + 100), "Summer, 1998", fill=(40, 40, 40))
    framed.save(imgs / "framed.jpg", quality=90)
    shot, _ = screenshot(original)
    shot.save(imgs / "screenshot.png")
    original.transpose(Image.Transpose.ROTATE_90).save(imgs / "turned.jpg",
                                                       quality=90)
    for seed in (11, 12, 13):
        photo(seed).save(imgs / f"other{seed}.jpg", quality=90)
    dark_frame(180, 200, 30, 1).save(imgs / "dark1.png")
    dark_frame(330, 290, 45, 2).save(imgs / "dark2.png")
    other_shot, _ = screenshot(photo(14))
    other_shot.save(imgs / "other_screenshot.png")
    return root


def found(doc):
    return {os.path.basename(m["path"]): m for m in doc["queries"][0]["matches"]}


def test_search_finds_a_crop_a_frame_and_a_quarter_turn(edits, capsys):
    params = write_params(edits)
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    matches = found(doc)
    assert {"crop80.jpg", "framed.jpg", "turned.jpg"} <= set(matches)
    assert not {n for n in matches if n.startswith(("other", "dark"))}
    crop = matches["crop80.jpg"]["how"]
    assert crop["verified"] and crop["geometry"]["inner"] == "b"
    assert "cropped to 64 %" in crop["text"]
    turned = matches["turned.jpg"]["how"]
    assert turned["stage"] == "orientation" and turned["verified"]
    assert turned["geometry"]["turn"] in (90, 270)
    framed = matches["framed.jpg"]["how"]
    if framed["verified"]:  # a near whole-hash match needs no verification
        g = framed["geometry"]
        assert g["inner"] == "a" and [round(v / 10) for v in g["box"]] == \
            [6, 6, 86, 66]


def test_verifier_locates_the_crop_and_the_screenshot(edits):
    verifier = rs.Verifier(10 ** 9)
    q = str(edits / "queries" / "original.jpg")
    crop = verifier.check(q, str(edits / "imgs" / "crop.jpg"))
    assert crop.accepted, crop.reason
    g = crop.geometry
    assert g.inner == "b" and abs(g.share - 0.36) < 0.04  # 60 % x 60 %
    assert [abs(a - b) < 10 for a, b in zip(g.box, (160, 120, 640, 480))] == [True] * 4
    assert "cropped to 36 %" in g.describe()
    shot = verifier.check(q, str(edits / "imgs" / "screenshot.png"))
    assert shot.accepted, shot.reason
    x0, y0, x1, y1 = shot.geometry.box
    assert shot.geometry.inner == "a" and abs(y0 - 130) < 12 and abs(y1 - 535) < 12
    turned = verifier.check(q, str(edits / "imgs" / "turned.jpg"))
    assert turned.accepted and turned.geometry.turn == 270  # ROTATE_90: anticlockwise
    assert "turned 90° anticlockwise" in turned.geometry.describe()
    mirrored = edits / "mirrored.jpg"
    Image.open(q).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    flipped = verifier.check(q, str(mirrored))
    assert flipped.accepted and flipped.geometry.mirror


def test_verifier_refuses_unrelated_dark_frames_and_same_template(edits):
    verifier = rs.Verifier(10 ** 9)
    imgs = edits / "imgs"
    for a, b in [("dark1.png", "dark2.png"), ("other11.jpg", "other12.jpg"),
                 ("screenshot.png", "other_screenshot.png"),
                 ("crop.jpg", "other13.jpg")]:
        verdict = verifier.check(str(imgs / a), str(imgs / b))
        assert not verdict.accepted, (a, b, verdict)
    blank = edits / "blank.png"
    Image.new("L", (300, 200), 128).save(blank)
    assert not verifier.check(str(blank), str(blank)).accepted


def test_fast_matching_is_hashes_only(edits, capsys):
    params = write_params(edits, matching="fast")
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    for m in doc["queries"][0]["matches"]:
        assert m["how"]["verified"] is False
        assert m["distance"] * (2 if m["how"]["stage"] == "orientation" else 1) <= 12


def test_matching_key_is_validated(edits, capsys):
    params = write_params(edits, matching="slow")
    code = rs.main(["search", "--params", str(params), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "matching" in err and "verified" in err


def test_outputs_say_how_it_matched(edits, capsys):
    params = write_params(edits)
    capsys.readouterr()
    assert rs.main(["search", "--params", str(params)]) == 0
    out = edits / "out"
    rows = (out / "search.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].endswith("stage,how,box")
    assert any("verified" in r for r in rows[1:])
    page = (out / "search.html").read_text(encoding="utf-8")
    assert "found-box" in page and '"box"' in page
    text = capsys.readouterr().out
    assert "verified:" in text


def test_without_opencv_the_tool_runs_hashes_only(edits):
    params = write_params(edits)
    code = ("import sys; sys.modules['cv2'] = None; sys.path.insert(0, %r); "
            "import reverse_search as rs; "
            "sys.exit(rs.main(['search', '--params', %r, '--format', 'json']))"
            % (ROOT, str(params)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "OpenCV is not installed" in done.stderr + done.stdout
    doc = json.loads(done.stdout[done.stdout.index("{"):])
    assert all(not m["how"]["verified"] for q in doc["queries"]
               for m in q["matches"])


def test_find_duplicates_groups_verified_copies_only(edits, capsys):
    shutil.copy(edits / "queries" / "original.jpg", edits / "imgs" / "original.jpg")
    params = write_params(edits)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    groups = [{os.path.basename(m["path"]): m for m in g["images"]}
              for g in doc["groups"]]
    mine = next(g for g in groups if "original.jpg" in g)
    assert {"original.jpg", "framed.jpg", "turned.jpg", "crop80.jpg"} <= set(mine)
    assert not any(n.startswith(("other", "dark")) for g in groups for n in g)
    turned = mine["turned.jpg"]["how"]
    assert turned["stage"] == "orientation" and turned["verified"]
    assert turned["geometry"]["turn"] in (90, 270)


def test_geometry_swapped_is_the_check_the_other_way_round(edits):
    verifier = rs.Verifier(10 ** 9)
    q, crop = str(edits / "queries" / "original.jpg"), str(edits / "imgs" / "crop.jpg")
    there = verifier.check(q, crop).geometry
    back = verifier.check(crop, q).geometry
    assert there.inner == "b" and back.inner == "a"
    swapped = there.swapped()
    assert swapped.inner == back.inner and abs(swapped.share - back.share) < 0.03
    assert abs(swapped.scale - back.scale) < 0.03 * back.scale
    assert max(abs(x - y) for x, y in zip(swapped.box, back.box)) < 8
    turned = str(edits / "imgs" / "turned.jpg")
    g1, g2 = verifier.check(q, turned).geometry, verifier.check(turned, q).geometry
    assert g1.swapped().turn == g2.turn and g1.turn != g2.turn
