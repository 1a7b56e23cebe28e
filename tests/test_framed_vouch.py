"""A framed picture's whole hash is much its frame's: captions, posts or
screenshots of different pictures in one layout lie within the threshold
of each other.  find_duplicates lets such a whole-hash match vouch only
when it is very near, and checks the rest on the pixels, so different
pictures in one layout are not grouped, and a captioned copy still joins
its own picture.  Real images drawn with Pillow, a real database."""

import os
import re

from PIL import Image, ImageDraw

from conftest import picture, run_json, write_params


def captioned(im: Image.Image) -> Image.Image:
    """`im` under a white caption band half its height, with a thick black
    line of 'text' (a meme template)."""
    w, h = im.size
    page = Image.new("RGB", (w, h + h // 2), (255, 255, 255))
    page.paste(im, (0, h // 2))
    ImageDraw.Draw(page).rectangle([w // 20, h // 8, w - w // 8, 3 * h // 8],
                                   fill=(10, 10, 10))
    return page


def test_one_layout_over_different_pictures_is_not_a_group(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    for seed in range(1, 17):
        captioned(picture(seed)).save(imgs / f"meme{seed}.jpg", quality=90)
    picture(1).save(imgs / "photo1.jpg", quality=90)
    params = write_params(tmp_path)
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0
    groups = [sorted(os.path.basename(m["path"]) for m in g["images"])
              for g in doc["groups"]]
    pictures = [{re.sub(r"\D", "", n) for n in g} for g in groups]
    assert all(len(p) == 1 for p in pictures), groups  # one picture each
    assert ["meme1.jpg", "photo1.jpg"] in groups, groups


def test_a_search_with_one_layout_finds_only_its_picture(tmp_path, capsys):
    """The same in a search: a meme as the query finds its own copy (and
    the photo under its band), not the other pictures of the template."""
    imgs, queries = tmp_path / "imgs", tmp_path / "queries"
    imgs.mkdir()
    queries.mkdir()
    for seed in range(2, 17):
        captioned(picture(seed)).save(imgs / f"meme{seed}.jpg", quality=90)
    captioned(picture(1)).resize((320, 360)).save(imgs / "meme1_small.jpg")
    picture(1).save(imgs / "photo1.jpg", quality=90)
    captioned(picture(1)).save(queries / "meme1.jpg", quality=90)
    code, doc = run_json(capsys, write_params(tmp_path), "search")
    assert code == 0
    found = sorted(os.path.basename(m["path"])
                   for m in doc["queries"][0]["matches"])
    assert found == ["meme1_small.jpg", "photo1.jpg"], found
