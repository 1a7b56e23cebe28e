#!/usr/bin/env python3
"""Makes the small example collection that the shipped params.json points at.

    python examples/make_examples.py

The pictures are drawn here (seeded, so every run gives the same pixels):
five originals, edited copies of some of them (one cropped), and queries (one
a phone screenshot of a picture).  The tests draw
their images with the same `picture` function.
"""

import os
import random

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))


def picture(seed: int, size=(640, 480)) -> Image.Image:
    """A photo-like picture: a gradient sky, soft shapes, a little blur."""
    rng = random.Random(seed)
    w, h = size
    top = [rng.randrange(256) for _ in range(3)]
    bottom = [rng.randrange(256) for _ in range(3)]
    im = Image.new("RGB", size)
    draw = ImageDraw.Draw(im)
    for y in range(h):
        t = y / max(1, h - 1)
        draw.line([(0, y), (w, y)], fill=tuple(
            int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(14):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1 = x0 + rng.randrange(w // 8, w // 2)
        y1 = y0 + rng.randrange(h // 8, h // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0 - w // 4, y0 - h // 4, x1 - w // 4, y1 - h // 4], fill=colour)
    return im.filter(ImageFilter.GaussianBlur(max(1, w // 300)))


def main() -> None:
    images = os.path.join(HERE, "images")
    queries = os.path.join(HERE, "queries")
    for folder in (images, os.path.join(images, "edited"), queries):
        os.makedirs(folder, exist_ok=True)
    names = ["harbour", "meadow", "city", "desert", "forest"]
    originals = {n: picture(seed) for seed, n in enumerate(names, 1)}
    for name, im in originals.items():
        im.save(os.path.join(images, f"{name}.jpg"), quality=90)
    edited = os.path.join(images, "edited")
    originals["harbour"].resize((320, 240), Image.LANCZOS).save(
        os.path.join(edited, "harbour_small.jpg"), quality=85)
    originals["harbour"].save(os.path.join(edited, "harbour_copy.png"))
    ImageEnhance.Brightness(originals["meadow"]).enhance(1.2).save(
        os.path.join(edited, "meadow_bright.jpg"), quality=80)
    originals["city"].save(os.path.join(edited, "city_q30.jpg"), quality=30)
    # a copy that moves the picture: its top-left 75 % (a whole-picture hash
    # moves 10 bits; the tool finds it and says "cropped to 56 %")
    originals["forest"].crop((0, 0, 480, 360)).save(
        os.path.join(edited, "forest_cropped.jpg"), quality=88)
    originals["forest"].resize((200, 150), Image.LANCZOS).save(
        os.path.join(queries, "forest_thumbnail.jpg"), quality=70)
    originals["meadow"].convert("L").save(os.path.join(queries, "meadow_grey.png"))
    picture(99).save(os.path.join(queries, "unrelated.jpg"), quality=85)
    screenshot(originals["desert"]).save(
        os.path.join(queries, "desert_screenshot.png"))


def screenshot(im: Image.Image) -> Image.Image:
    """`im` as a phone shows it: a tall page, a dark status bar, the picture
    across the width and grey lines of text under it."""
    page = Image.new("RGB", (540, 1170), (245, 245, 245))
    draw = ImageDraw.Draw(page)
    draw.rectangle([0, 0, 540, 90], fill=(30, 30, 30))
    draw.text((20, 35), "12:41   photos", fill=(255, 255, 255))
    page.paste(im.resize((540, 405), Image.LANCZOS), (0, 260))
    for i in range(6):
        draw.rectangle([24, 720 + 40 * i, 324 + 25 * (i % 3), 735 + 40 * i],
                       fill=(120, 120, 120))
    return page


if __name__ == "__main__":
    main()
