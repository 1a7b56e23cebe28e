"""find_duplicates' reach past a group checks a pair whose whole hashes lie
within 18 bits (the same framing and orientation) with the first try only:
not mirrored, plain keypoints.  That try alone answers a copy with
something over the picture as the whole check does, refuses what only
the mirrored try would find, and its verdicts are remembered apart from
whole checks.  Real images drawn with Pillow, real files."""

from PIL import ImageOps

import pytest

from test_accuracy_moved import sticker
from test_verify import photo

import reverse_search as rs

pytest.importorskip("cv2")


@pytest.fixture
def pair_files(tmp_path):
    original = photo(5)
    original.save(tmp_path / "original.jpg", quality=92)
    w, h = original.size
    sticker(original, w // 3, h // 3).save(tmp_path / "sticker.jpg",
                                           quality=88)
    ImageOps.mirror(original).save(tmp_path / "mirror.jpg", quality=90)
    photo(9).save(tmp_path / "other.jpg", quality=90)
    return tmp_path


def test_the_first_try_alone_finds_a_copy_in_the_same_framing(pair_files):
    verifier = rs.Verifier(10**9)
    a, b = str(pair_files / "original.jpg"), str(pair_files / "sticker.jpg")
    whole, plain = verifier.check(a, b), verifier.check(a, b, plain=True)
    assert whole.accepted and plain.accepted
    assert plain.geometry == whole.geometry  # the first try made both


def test_the_first_try_alone_is_not_mirrored(pair_files):
    verifier = rs.Verifier(10**9)
    a, b = str(pair_files / "original.jpg"), str(pair_files / "mirror.jpg")
    whole = verifier.check(a, b)
    assert whole.accepted and whole.geometry.mirror
    assert not verifier.check(a, b, plain=True).accepted
    other = str(pair_files / "other.jpg")
    assert not verifier.check(a, other, plain=True).accepted


def test_plain_and_whole_verdicts_are_remembered_apart(pair_files):
    a, b = str(pair_files / "original.jpg"), str(pair_files / "mirror.jpg")
    memory = rs.VerdictMemory(str(pair_files / "v.idx"), b"k" * 32, "rules")
    memory.put(a, b, rs.Verdict(False, "too few matching keypoints"),
               plain=True)
    assert memory.get(a, b) is None  # a whole check is not answered by it
    assert not memory.get(a, b, plain=True).accepted
