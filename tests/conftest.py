"""Shared helpers: real images drawn with Pillow, real params files, main()."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import reverse_search as rs  # noqa: E402
from make_examples import picture  # noqa: E402


@pytest.fixture
def collection(tmp_path):
    """Five distinct pictures, two edited copies, and a query folder."""
    from PIL import Image
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    queries = tmp_path / "queries"
    queries.mkdir()
    for seed in range(1, 6):
        picture(seed).save(imgs / f"p{seed}.jpg", quality=92)
    picture(1).resize((320, 240), Image.LANCZOS).save(imgs / "sub" / "p1_small.png")
    picture(2).save(imgs / "sub" / "p2_q40.jpg", quality=40)
    picture(1).resize((200, 150), Image.LANCZOS).save(queries / "q1.jpg")
    picture(50).save(queries / "other.jpg")
    return tmp_path


def write_params(folder, **keys):
    """A params.json in `folder` with paths inside it, plus `keys`."""
    base = {"img_dirs": ["imgs"], "input_dir": "queries", "db_dir": "db",
            "bk_dir": "index", "output_dir": "out", "workers": 1}
    base.update(keys)
    path = os.path.join(folder, "params.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(base, fh)
    return path


def run_json(capsys, params, *args):
    """main() with --format json; returns (exit code, parsed stdout)."""
    capsys.readouterr()
    code = rs.main([*args, "--params", str(params), "--format", "json", "-q"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 and out.strip() else None)


def brute_pairs(ints, radius):
    """Every (i, j), i < j, within radius: the reference for all engines."""
    return {(i, j) for i in range(len(ints)) for j in range(i + 1, len(ints))
            if (ints[i] ^ ints[j]).bit_count() <= radius}


def brute_groups(n, near):
    """Groups of two or more of range(n) joined by every pair (i, j), i < j,
    for which near(i, j) is true: plain union-find, the reference for the
    engines' grouping."""
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for i in range(n):
        for j in range(i + 1, n):
            if near(i, j):
                parent[root(i)] = root(j)
    comps = {}
    for p in range(n):
        comps.setdefault(root(p), []).append(p)
    return sorted(g for g in comps.values() if len(g) > 1)
