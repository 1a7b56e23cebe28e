"""Query expansion: a search reaches copies of the picture through the
copies it found (their stored hashes searched in turn, what they find
verified with the query).  Real pictures drawn with Pillow in tmp_path."""

import os

import numpy as np
import pytest

from conftest import rs, run_json, write_params
from test_accuracy_crops import meme  # noqa: F401 (a fixture used here)
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


# --------------------------- find_duplicates: joined through a vouched link --

def test_a_member_verified_with_the_leads_member_joins_with_no_check_more(
        meme, monkeypatch):
    """The lead (a copy with text) refuses a turned crop; a check made
    earlier (an edge's) found the turned crop to be the picture of the
    original, which the lead took: it joins through the original, says so,
    and no check is made for it but the lead's.  Without that earlier
    verdict (and with no check through copies allowed) it stays out; an
    unrelated photo never joins."""
    params = write_params(meme)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    cfg = rs.config_from(rs.read_params(params), params, {})
    store = rs._open_store(cfg)
    judge = rs.Judge(cfg, rs.Console(quiet=True))
    monkeypatch.setattr(rs, "THROUGH_COPIES", 0)  # no check through copies
    try:
        flat = rs.load_index(cfg, store, rs.Console(quiet=True))
        rows = store.rows_by_id(int(i) for i in flat.ids)
        at = {os.path.basename(rows[int(i)].path): p
              for p, i in enumerate(flat.ids)}
        members = np.array([at[n] for n in ("meme.jpg", "original.jpg",
                                            "turned.jpg", "other.jpg")])
        free = np.array([False, False, True, True])
        lead = at["meme.jpg"]

        def joiners(edges):
            return edges.joiners(lead, members, free, group=members[:2])

        assert joiners(rs.EdgeJudge(judge, flat, store,
                                    cfg.distance_threshold)) == []
        edges = rs.EdgeJudge(judge, flat, store, cfg.distance_threshold)
        assert edges.check(at["original.jpg"], at["turned.jpg"])
        asked = []
        monkeypatch.setattr(judge, "check", lambda a, b: asked.append(
            (a, b)) or rs.Judge.check(judge, a, b))
        assert joiners(edges) == [2]
        turned = [a + b for a, b in asked if "turned" in a + b]
        assert len(turned) == 1 and "meme" in turned[0]  # the lead's only
        how = edges.how(lead, at["turned.jpg"], -1)
        assert how.stage == "keypoints through a copy" and how.verified
        assert how.geometry.turn == 180
    finally:
        judge.close()
        store.close()
