"""What the speed work must not change: results, byte for byte.

No timings here (those are in bench/): the fast paths are checked against
the plain definitions they replace, and whole runs against each other.
"""

import json
import os
import re

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import picture, rs, write_params

# ---- results as JSON: json_text is json.dumps(indent=1), faster ----

SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text())
FLAT_OBJECTS = st.lists(st.dictionaries(st.text(), SCALARS, min_size=1))
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner) | FLAT_OBJECTS
    | st.dictionaries(st.text(), inner), max_leaves=30)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(VALUES)
def test_json_text_is_json_dumps_indented(value):
    assert rs.json_text(value) == json.dumps(value, indent=1, ensure_ascii=False)


def test_json_text_of_strings_that_look_like_its_own_separators():
    tricky = [{"a": "},\n  {", "b\n": "\"}", "": 1}, {"c": "x},\n   {y"}, {"d": None}]
    for value in (tricky, {"k": tricky, "e": [], "f": {}}, [[tricky]]):
        assert rs.json_text(value) == json.dumps(value, indent=1,
                                                 ensure_ascii=False)


# ---- the same results from run to run ----

def make_collection(folder):
    """Six pictures in four copies each: identical files (ties for the keep
    rule and for the lead), re-encoded and resized copies, and a second
    folder, so that hashing order and database ids vary between runs."""
    imgs = folder / "imgs"
    (imgs / "b").mkdir(parents=True)
    for seed in range(1, 7):
        pic = picture(seed)
        pic.save(imgs / f"p{seed}.jpg", quality=90)
        pic.save(imgs / "b" / f"p{seed} same.jpg", quality=90)
        pic.save(imgs / "b" / f"p{seed} q50.jpg", quality=50)
        pic.resize((pic.width * 3 // 4, pic.height * 3 // 4),
                   Image.LANCZOS).save(imgs / f"p{seed} small.png")
    (folder / "queries").mkdir()


def result_files(out, run):
    """Every result file of find_duplicates, with run times and the run's
    own folder names taken out."""
    texts = {}
    for name in ("find_duplicates.json", "find_duplicates.csv", "plan.json",
                 "plan.csv"):
        text = (out / name).read_text(encoding="utf-8").replace(run, "RUN")
        texts[name] = re.sub(r'"(seconds|created)": [^,\n]*', "", text)
    return texts


def test_find_duplicates_gives_the_same_results_every_run(tmp_path, capsys):
    """The collection built twice from scratch with two workers (files finish
    in another order, so rows get other ids), find_duplicates run twice on
    each: all four results are the same, byte for byte."""
    make_collection(tmp_path)
    runs = []
    for run in ("run1", "run2"):
        params = write_params(tmp_path, workers=2, db_dir=f"{run}/db",
                              bk_dir=f"{run}/index", output_dir=f"{run}/out")
        assert rs.main(["build", "--params", params, "-q"]) == 0
        for again in range(2):
            assert rs.main(["find_duplicates", "--params", params, "-q"]) == 0
            runs.append(result_files(tmp_path / run / "out", run))
    doc = json.loads((tmp_path / "run2" / "out" / "find_duplicates.json")
                     .read_text(encoding="utf-8"))
    assert doc["group_count"] == 6 and doc["duplicates"] == 18
    assert all(r == runs[0] for r in runs[1:])


# ---- the HTML report costs the same at any size ----

def test_report_makes_thumbnails_for_the_first_page_only(tmp_path):
    """60 groups of two TIFFs (a format browsers do not draw): thumbnails for
    the 50 groups of the first page; later cards show the file itself."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    groups = []
    for g in range(60):
        images = []
        for k in range(2):
            path = folder / f"g{g:02d}_{k}.tif"
            Image.new("RGB", (24, 16), (g * 4, k * 100, 50)).save(path)
            images.append(rs.Match(str(path), "0" * 16, k, 24, 16,
                                   path.stat().st_size, keep=k == 0))
        groups.append(rs.Group(images))
    report = rs.DuplicatesReport("images.db", "mih", 120, groups)
    page = rs.write_html_report(report, rs.Config(), str(tmp_path / "out"))
    made = os.listdir(tmp_path / "out" / "find_duplicates_files")
    assert len(made) == 2 * rs.HTML_PAGE_SIZE + 1  # and the placeholder
    text = open(page, encoding="utf-8").read()
    data = json.loads(text[text.index('id="report-data">') + 17:
                           text.index("</script>")])
    thumbs = [[it.get("thumb") for it in s["items"]] for s in data["sets"]]
    assert all(t and t != rs.PLACEHOLDER_NAME for s in thumbs[:50] for t in s)
    assert all(t is None for s in thumbs[50:] for t in s)
