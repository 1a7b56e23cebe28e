"""Query expansion: a search reaches copies of the picture through the
copies it found (their stored hashes searched in turn, what they find
verified with the query).  Real pictures drawn with Pillow in tmp_path."""

import os

import pytest

from conftest import rs, run_json, write_params
from test_candidates import crop, phone_screenshot, photo

pytest.importorskip("cv2")


def by_name(matches):
    return {os.path.basename(m["path"]): m for m in matches}


@pytest.fixture(params=[10, 11])
def chain(request, tmp_path):
    """The query, a crop of it (80 % of each side) that its windows find, a
    phone screenshot of that crop (its content box is the crop: no hash of
    the query is near it), unrelated photos."""
    imgs, queries = tmp_path / "imgs", tmp_path / "queries"
    imgs.mkdir()
    queries.mkdir()
    original = photo(request.param)
    original.save(queries / "original.jpg", quality=92)
    cropped = crop(original, 0.1, 0.1, 0.9, 0.9)
    cropped.save(imgs / "crop.jpg", quality=90)
    phone_screenshot(cropped).save(imgs / "shot.jpg", quality=90)
    for seed in (21, 22, 23):
        photo(seed).save(imgs / f"other{seed}.jpg", quality=90)
    return tmp_path


def test_search_reaches_a_screenshot_of_a_crop_through_the_crop(chain, capsys):
    code, doc = run_json(capsys, write_params(chain), "search")
    assert code == 0
    matches = by_name(doc["queries"][0]["matches"])
    assert set(matches) == {"crop.jpg", "shot.jpg"}
    how = matches["shot.jpg"]["how"]
    assert how["stage"] == "keypoints" and how["verified"]
    assert how["region"] is None
    assert 0.3 < how["geometry"]["share"] < 0.6  # a crop of it, in a page
    # the distance shown is the whole hashes', far past the threshold
    assert matches["shot.jpg"]["distance"] > 12


def test_without_expansion_the_screenshot_is_not_found(chain, capsys,
                                                        monkeypatch):
    """What finds it is the expansion: with no copies searched in turn the
    query's own hashes do not reach it."""
    monkeypatch.setattr(rs, "EXPAND_COPIES", 0)
    code, doc = run_json(capsys, write_params(chain), "search")
    assert code == 0
    assert set(by_name(doc["queries"][0]["matches"])) == {"crop.jpg"}


def test_fast_matching_does_not_expand(chain, capsys):
    """Hashes only: nothing is verified, so nothing is taken on a copy's
    word either."""
    code, doc = run_json(capsys, write_params(chain, matching="fast"),
                         "search")
    assert code == 0
    assert "shot.jpg" not in by_name(doc["queries"][0]["matches"])


def test_a_pair_marked_not_duplicates_is_not_expanded_to(chain, capsys):
    (chain / "marks.csv").write_text(
        f"{chain / 'queries' / 'original.jpg'},{chain / 'imgs' / 'shot.jpg'}\n")
    params = write_params(chain, not_duplicates=str(chain / "marks.csv"))
    code, doc = run_json(capsys, params, "search")
    assert code == 0
    assert set(by_name(doc["queries"][0]["matches"])) == {"crop.jpg"}


def test_expansion_checks_are_bounded_per_query(chain, capsys, monkeypatch):
    """Each query searches at most EXPAND_COPIES copies and stops after
    EXPAND_CHECKS refused checks: with none allowed, nothing is checked."""
    monkeypatch.setattr(rs, "EXPAND_CHECKS", 0)
    code, doc = run_json(capsys, write_params(chain), "search")
    assert code == 0
    assert set(by_name(doc["queries"][0]["matches"])) == {"crop.jpg"}
