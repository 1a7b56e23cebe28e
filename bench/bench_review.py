#!/usr/bin/env python3
"""review: what the page costs, one printed table (run by hand, never a test).

    python bench/bench_review.py            # map sizes 500..2000, 1k and 10k groups

- map: t-SNE (scikit-learn) seconds to place N images from the bits of their
  main and two centre hashes (192 features), clustered as a collection is
  (near-duplicate groups of 2-4 plus singles); this sets MAP_MOST;
- groups: milliseconds to serve one page of cards, the first page after a
  change (plan recomputed) and another page (plan reused), for 1,000 and
  10,000 synthetic groups of three.
"""

import sys

import numpy as np

from _common import load_impl, machine, table, timed

rs = load_impl()


def clustered(n: int, words: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2, (n // 3 + 1, words * 64), dtype=np.uint8)
    rows = base[rng.integers(0, len(base), n)]
    flips = rng.random(rows.shape) < 0.05  # copies a few bits apart
    return (rows ^ flips).astype(np.float32)


def time_map(n: int) -> float:
    from sklearn.manifold import TSNE
    tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca",
                random_state=0, max_iter=500)
    return timed(tsne.fit_transform, clustered(n))[0].wall


def session(groups: int) -> rs.ReviewSession:
    cfg = rs.Config()
    s = rs.ReviewSession(rs.Run(cfg, []), rs.Console(True))
    made = []
    for g in range(groups):
        made.append(rs.Group([rs.Match(f"/photos/f{g % 97}/img{g}_{k}.jpg",
                                       "0" * 16, 3 * k, 4000, 3000,
                                       3_000_000 - k, 1_600_000_000 * 10**9,
                                       keep=k == 0) for k in range(3)],
                             "kept: most pixels"))
    s.groups, s.report = made, rs.DuplicatesReport("db", "mih", 3 * groups, made)
    return s


def time_pages(groups: int) -> tuple:
    s = session(groups)
    first = timed(s.page, 1)[0].wall
    other = timed(s.page, groups // 40 or 1)[0].wall
    return 1000 * first, 1000 * other


def main() -> int:
    print(f"# {machine()}")
    rows = []
    try:
        import sklearn  # noqa: F401
        for n in (500, 1000, 2000):
            rows.append(["map: t-SNE", n, f"{time_map(n):.1f} s"])
    except ImportError:
        print("map: scikit-learn is not installed; skipped")
    for groups in (1000, 10000):
        first, other = time_pages(groups)
        rows.append(["groups: page after a change", groups, f"{first:.0f} ms"])
        rows.append(["groups: another page", groups, f"{other:.0f} ms"])
    print(table(["what", "size", "time"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
