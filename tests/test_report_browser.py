"""The HTML report, checked as a person sees it: rendered in headless Chromium.

Needs Debian's chromium and the playwright package (no browser download).
Without them the browser tests skip, unless REVERSE_SEARCH_REQUIRE_BROWSER=1.
"""

import copy
import json
import os
import pathlib
import sys
import tempfile
import time

import pytest
from PIL import Image

from conftest import picture, rs, write_params
write_html_report = rs.write_html_report

SHOTS = os.environ.get("REVERSE_SEARCH_SHOTS", tempfile.gettempdir())  # screenshots
POSIX = sys.platform != "win32"
BAD_NAME = b"bad\xff name.jpg"  # not UTF-8: the report shows it as bad\xff


# ---- a real collection and real documents ----

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A collection with awkward names, and the tool's own JSON for it."""
    root = tmp_path_factory.mktemp("report")
    imgs = root / "imgs"
    hostile = imgs / "a<" / "script><b>x"  # the path reads .../a</script><b>x/
    for folder in (imgs / "sub dir", hostile, root / "queries"):
        folder.mkdir(parents=True)
    picture(2).save(imgs / "p2.jpg", quality=92)  # group of 3
    picture(2).save(imgs / "p2 q40.jpg", quality=40)
    if POSIX:
        picture(2).resize((400, 300)).save(os.fsencode(imgs) + b"/" + BAD_NAME)
    else:
        picture(2).resize((400, 300)).save(imgs / "p2 small.jpg")
    picture(1).save(imgs / "p1.jpg", quality=92)
    picture(1).resize((320, 240), Image.LANCZOS).save(imgs / "sub dir" / "café ñ.png")
    picture(3).save(imgs / "p3.jpg", quality=92)
    picture(3).save(hostile / "p3.jpg", quality=60)
    picture(4).save(imgs / "p4.jpg", quality=92)
    alpha = picture(4).convert("RGBA")
    alpha.paste((0, 0, 0, 0), (0, 0, 40, 40))  # a transparent corner
    alpha.save(imgs / "p4_alpha.png")
    picture(5).save(imgs / "p5.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, tagged "rotate to display"
    picture(5).transpose(Image.Transpose.ROTATE_90).save(
        imgs / "p5_exif6.jpg", exif=exif, quality=92)
    picture(6).save(imgs / "alone.jpg")
    (imgs / "broken.jpg").write_bytes(b"not a picture")
    picture(1).resize((200, 150)).save(root / "queries" / "q1.jpg")
    picture(50).save(root / "queries" / "unrelated.jpg")
    (root / "queries" / "zz broken.jpg").write_bytes(b"not a picture either")
    params = write_params(root)
    docs, reports = {}, {}
    for op in ("find_duplicates", "search"):
        reports[op] = report_of(op, params, emit=True)
        with open(root / "out" / f"{op}.json", encoding="utf-8") as fh:
            docs[op] = json.load(fh)
    return root, docs, reports


def report_of(op, params, emit=False):
    """(report record, settings) of one run, as main() makes them; emit:
    also its result files, as main() writes them."""
    run = rs.parse_run([op, "--params", str(params), "--format", "json", "-q"])
    ui = rs.Console(True)
    report = rs.dispatch(run, ui)
    if emit:
        rs.emit(report, run, ui)
    return report, run.config


def synthetic(report, groups):
    """The real report grown to `groups` groups that reuse its files."""
    big = copy.deepcopy(report)
    big.groups = [copy.deepcopy(report.groups[k % len(report.groups)])
                  for k in range(groups)]
    return big


# ---- without a browser: the files written ----

def test_thumbnails_for_big_files_and_other_formats_placeholder_for_unreadable(
        run, tmp_path):
    """Small JPEG/PNG files are shown as they are (no thumbnail to make); a
    big JPEG and a TIFF get one thumbnail each, unreadable files the
    placeholder; a second report reuses the thumbnails."""
    root, docs, reports = run
    report, cfg = copy.deepcopy(reports["find_duplicates"])
    big, tiff = tmp_path / "big.jpg", tmp_path / "other.tif"
    picture(2, (2000, 1200)).save(big, quality=80)
    picture(3).save(tiff)
    replaced = {"gone.jpg": root / "gone.jpg", "broken.jpg": root / "imgs" / "broken.jpg",
                "big.jpg": big, "other.tif": tiff}
    for k, path in enumerate(replaced.values()):
        report.groups[k].images[1].path = str(path)
    report.groups.append(copy.deepcopy(report.groups[2]))  # same files again
    out = tmp_path / "out"
    page = write_html_report(report, cfg, str(out))
    assert page == str(out / "find_duplicates.html")
    thumbs = sorted(os.listdir(out / "find_duplicates_files"))
    assert len(thumbs) == 3 and "unreadable.png" in thumbs  # big, tiff, placeholder
    for name in thumbs:
        with Image.open(out / "find_duplicates_files" / name) as im:
            assert max(im.size) == 160 and im.mode == "RGB"
    items = [it for s in page_data(page)["sets"] for it in s["items"]]
    thumb = {it["name"]: it.get("thumb") for it in items}
    assert thumb["gone.jpg"] == thumb["broken.jpg"] == "unreadable.png"
    assert {thumb["big.jpg"], thumb["other.tif"]} == set(thumbs) - {"unreadable.png"}
    assert all("thumb" not in it for it in items if it["name"] not in replaced)
    made = lambda name: os.stat(out / "find_duplicates_files" / name).st_mtime_ns
    before = {name: made(name) for name in thumbs if name != "unreadable.png"}
    write_html_report(report, cfg, str(out))  # again: reused
    assert {name: made(name) for name in before} == before


def test_page_data_cannot_close_its_script(run, tmp_path):
    root, docs, reports = run
    report, cfg = copy.deepcopy(reports["find_duplicates"])
    report.groups[0].images[0].path = "/x/</script><script>alert(1)</script><!--.jpg"
    report.failures = [rs.Failure("/y/@DATA@ </SCRIPT>", "<b>bad</b>")]
    text = pathlib.Path(write_html_report(report, cfg, str(tmp_path))).read_text("utf-8")
    assert text.lower().count("</script>") == 2  # ours: data and code
    assert "<b>bad" not in text and "alert(1)" in text  # as data, escaped
    data = page_data(str(tmp_path / "find_duplicates.html"))
    item = data["sets"][0]["items"][0]
    assert data["dirs"][item["dir"]]["path"] + "/" + item["name"] == \
        report.groups[0].images[0].path


def page_data(page):
    text = pathlib.Path(page).read_text("utf-8")
    start = text.index('id="report-data">') + len('id="report-data">')
    return json.loads(text[start:text.index("</script>", start)])


# ---- in the browser ----

@pytest.fixture
def open_page(browser):
    """open_page(html) -> a page with the report drawn; fails on script errors."""
    pages = []

    def opener(html_path, height=900):
        page = browser.new_page(viewport={"width": 1280, "height": height})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(pathlib.Path(html_path).as_uri())
        page.wait_for_selector("nav.pager .page")
        page.errors = errors
        pages.append(page)
        return page

    yield opener
    for page in pages:
        assert page.errors == []
        page.close()


def texts(page, selector):
    return page.locator(selector).all_inner_texts()


def settled(probe, expected, seconds=10.0):
    """What `probe()` reads once the page has drawn `expected` (the page
    redraws after a click or Back, not always before the click returns), or
    what it reads when time is up, for the assertion to show."""
    deadline = time.monotonic() + seconds
    while True:
        got = probe()
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def load_every_thumbnail(page):
    """Scroll each lazy thumbnail into view, then wait until all are decoded."""
    for img in page.locator("img").all():
        img.scroll_into_view_if_needed()
    page.wait_for_function(
        "[...document.images].every(i => i.complete && i.naturalWidth > 0)",
        timeout=15000)
    return page.evaluate(
        "[...document.images].map(i => [i.naturalWidth, i.naturalHeight])")


def test_duplicates_page_as_a_person_sees_it(run, tmp_path, open_page):
    root, docs, reports = run
    doc = docs["find_duplicates"]
    assert [len(g["images"]) for g in doc["groups"]] == [3, 2, 2, 2, 2]
    page = open_page(write_html_report(*reports["find_duplicates"],
                                       str(tmp_path / "out")))
    stats = texts(page, ".stat")
    assert stats == [f"{doc['images']} images scanned", "5 groups", "6 duplicates",
                     f"{rs.human_bytes(doc['bytes_reclaimable'])} reclaimable"]
    assert texts(page, "#failures summary") == ["1 file could not be read"]
    page.click("#failures summary")
    page.wait_for_selector("#failure-list li")  # filled on the toggle event
    assert [t.split(": ")[0] for t in texts(page, "#failure-list li")] == \
        [str(root / "imgs" / "broken.jpg")]
    assert texts(page, "nav.pager .page") == ["Page 1 of 1"] * 2
    sets = page.locator("section.set")
    assert sets.count() == 5
    assert texts(page, "section.set h2")[0].startswith("Group 1 · 3 images · ")
    for k, group in enumerate(doc["groups"]):  # the doc's order; badge on the kept
        box = sets.nth(k)
        assert box.locator(".badge.keep").count() == 1
        assert box.locator(".card").first.get_attribute("class") == "card keep"
        names = box.locator(".card .name").all_inner_texts()
        assert names == [os.path.basename(m["path"]) for m in group["images"]]
        assert box.locator(".badge.dist").all_inner_texts() == \
            [f"distance {m['distance']}" for m in group["images"][1:]]
        assert [c.get_attribute("data-pair") for c in box.locator(".card").all()] == \
            [None] + [f"0,{j}" for j in range(1, len(group["images"]))]
    sizes = load_every_thumbnail(page)
    # small JPEG/PNG files: shown as they are (the browser scales them)
    assert len(sizes) == 11 and all(max(s) in (320, 400, 640) for s in sizes)
    names = page.locator(".card .name").all_inner_texts()
    assert sizes[names.index("p5_exif6.jpg")][0] > sizes[names.index("p5_exif6.jpg")][1]
    assert "café ñ.png" in names
    if POSIX:
        assert "bad\\xff name.jpg" in names
    dirs = page.locator(".card .dir").all_text_contents()
    assert str(root / "imgs" / "a<" / "script><b>x") in dirs  # text, not markup
    assert page.locator("section.set b, section.set script").count() == 0
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=os.path.join(SHOTS, "reverse_search_report_duplicates.png"),
                    full_page=True)


def test_clicking_a_thumbnail_opens_the_file(run, tmp_path, open_page):
    root, docs, reports = run
    page = open_page(write_html_report(*reports["find_duplicates"], str(tmp_path)))
    name = "bad\\xff name.jpg" if POSIX else "p2 small.jpg"
    real = os.fsdecode(os.fsencode(root / "imgs") + b"/" + BAD_NAME) if POSIX \
        else str(root / "imgs" / "p2 small.jpg")
    card = page.locator(".card", has=page.locator(".name", has_text=name))
    link = card.locator("a")
    assert link.get_attribute("href") == pathlib.Path(real).as_uri()
    if POSIX:
        assert "bad%FF%20name.jpg" in link.get_attribute("href")
    with page.expect_popup() as opened:
        card.locator("img").click()
    tab = opened.value
    tab.wait_for_load_state()
    assert tab.url == pathlib.Path(real).as_uri()
    assert tab.evaluate("document.images[0].naturalWidth") == 400  # the file itself
    tab.close()


def test_search_page_marks_each_query(run, tmp_path, open_page):
    root, docs, reports = run
    doc = docs["search"]
    page = open_page(write_html_report(*reports["search"], str(tmp_path)))
    assert texts(page, ".stat") == ["3 queries", "1 with matches",
                                    f"{doc['images']} images searched"]
    assert texts(page, "#failures summary") == ["1 file could not be read"]
    heads = texts(page, "section.set h2")
    assert [os.path.basename(q["query"]) for q in doc["queries"]] == \
        ["q1.jpg", "unrelated.jpg", "zz broken.jpg"]
    assert heads[:2] == ["Query 1: q1.jpg · 2 matches", "Query 2: unrelated.jpg · no match"]
    assert heads[2].startswith("Query 3: zz broken.jpg · cannot hash: ")
    for box in page.locator("section.set").all():
        first = box.locator(".card").first
        assert first.locator(".badge").inner_text() == "QUERY"
        assert box.locator(".badge.query").count() == 1
        assert box.locator(".badge.keep").count() == 0
    assert "200 × 150" in page.locator(".card.query .meta").first.inner_text()
    assert len(load_every_thumbnail(page)) == 3 + 2  # the broken one: placeholder
    page.screenshot(path=os.path.join(SHOTS, "reverse_search_report_search.png"),
                    full_page=True)


def test_pagination_of_120_groups(run, tmp_path, open_page):
    root, docs, reports = run
    report, cfg = reports["find_duplicates"]
    page = open_page(write_html_report(synthetic(report, 120), cfg, str(tmp_path)))
    assert texts(page, ".stat")[1] == "120 groups"
    first = page.locator("nav.pager").first

    def shown():
        heads = texts(page, "section.set h2")
        return (first.locator(".page").inner_text(), first.locator(".where").inner_text(),
                len(heads), heads[0].split(" ·")[0], heads[-1].split(" ·")[0])

    want = ("Page 1 of 3", "groups 1–50 of 120", 50, "Group 1", "Group 50")
    assert settled(shown, want) == want
    assert first.get_by_role("button", name="‹ Prev").is_disabled()
    assert page.locator("img[loading=lazy]").count() == page.locator("img").count()
    first.get_by_role("button", name="Next ›").click()
    want = ("Page 2 of 3", "groups 51–100 of 120", 50, "Group 51", "Group 100")
    assert settled(shown, want) == want
    page.locator("nav.pager").last.get_by_role("button", name="Last »").click()
    want = ("Page 3 of 3", "groups 101–120 of 120", 20, "Group 101", "Group 120")
    assert settled(shown, want) == want
    assert first.get_by_role("button", name="Next ›").is_disabled()
    assert len(load_every_thumbnail(page)) == sum(
        len(g.images) for g in synthetic(report, 120).groups[100:])
    page_shown = lambda: first.locator(".page").inner_text()
    page.go_back()  # the page number is in the address: Back works
    assert settled(page_shown, "Page 2 of 3") == "Page 2 of 3"
    first.get_by_role("button", name="« First").click()
    assert settled(page_shown, "Page 1 of 3") == "Page 1 of 3"
    page.reload()
    page.wait_for_selector("section.set")
    assert settled(page_shown, "Page 1 of 3") == "Page 1 of 3"


def test_ten_thousand_groups_open_fast(run, tmp_path, open_page):
    root, docs, reports = run
    report, cfg = reports["find_duplicates"]
    big = synthetic(report, 10_000)
    started = time.perf_counter()
    path = write_html_report(big, cfg, str(tmp_path))
    written = time.perf_counter() - started
    page = open_page(path)
    rendered = page.evaluate(
        "performance.getEntriesByName('report-rendered')[0].startTime")
    assert page.locator("section.set").count() == 50  # one page, not 10,000
    assert texts(page, "nav.pager .page")[0] == "Page 1 of 200"
    # ~2 s and ~0.4 s here; generous bounds that still catch drawing it all
    assert written < 20 and rendered < 5000, (written, rendered)


def test_orientation_matches_say_how_on_their_card(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    picture(4).save(imgs / "a.jpg")
    picture(4).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(imgs / "a_mirror.jpg")
    params = write_params(tmp_path, match_orientations=True)
    report, cfg = report_of("find_duplicates", params)
    text = pathlib.Path(write_html_report(report, cfg, str(tmp_path / "out"))
                        ).read_text("utf-8")
    assert '"how":"mirrored, verified"' in text  # checked on the pixels
