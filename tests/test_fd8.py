"""find_duplicates plans its checks by rehearsal (EdgeJudge's Rehearsal,
rehearse()): the checks a phase makes one after another, each depending on
the verdicts before it (a lead's copies tried with a member it refused, a
farther copy past the threshold, the next weak edge), are verified ahead
together in the worker processes.  Results must stay byte for byte those
of one process.  Real pictures drawn with Pillow in tmp_path; no timings
here (bench/bench_peers.py measures them)."""

import contextlib
import os

import numpy as np
import pytest
from PIL import Image

from conftest import edge_judge, rs, write_params
from test_accuracy_crops import with_sticker, with_text
from test_speed_verify import results
from test_verify import photo

pytest.importorskip("cv2")

NAMES = ("find_duplicates.json", "find_duplicates.csv", "plan.json",
         "plan.csv")


@pytest.fixture
def pictures(tmp_path):
    """Copies that reach every verified path of find_duplicates: a crop,
    a quarter turn, a mirrored crop and a frame (weak edges); a copy with
    text leading its original and a turned crop it refuses (joined through
    the original); a sticker past the threshold (reach_further); unrelated
    photos."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "queries").mkdir()
    for seed in (3, 9):
        im = photo(seed, (640, 480))
        im.save(imgs / f"o{seed}.jpg", quality=92)
        im.crop((96, 72, 544, 408)).save(imgs / f"o{seed}_crop.jpg", quality=90)
        im.transpose(Image.Transpose.ROTATE_90).save(imgs / f"o{seed}_turn.png")
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop(
            (0, 0, 512, 384)).save(imgs / f"o{seed}_mirror.jpg")
    for seed in (5, 7):
        im = photo(seed)
        w, h = im.size
        with_text(im).save(imgs / f"m{seed}_meme.jpg", quality=88)
        im.save(imgs / f"m{seed}.jpg", quality=92)
        im.crop((40, 30, w - 40, h - 30)).transpose(
            Image.Transpose.ROTATE_180).save(imgs / f"m{seed}_turned.jpg",
                                             quality=90)
    for seed in (14, 19, 24, 25):
        im = photo(seed)
        im.save(imgs / f"s{seed}.jpg", quality=92)
        im.resize((640, 480)).save(imgs / f"s{seed}_small.jpg", quality=88)
        with_sticker(im, 0.6, 0.6, 0.12).save(imgs / f"s{seed}_sticker.jpg",
                                              quality=90)
    for seed in (21, 22, 23):
        photo(seed).save(imgs / f"other{seed}.jpg", quality=90)
    return tmp_path


class Watch:
    """What each run's Judge did, read when find_duplicates closes it: the
    pairs asked (with their verdicts), how many the parent process checked
    itself, the rounds of pairs sent to the workers; and how many
    rehearsals ran."""

    def __init__(self, monkeypatch):
        self.runs, self.rounds, self.rehearsals = [], [], 0
        close, init = rs.Judge.close, rs.Rehearsal.__init__
        send = rs.VerifyPool.map

        def closing(judge):
            self.runs.append(({k: (v.accepted, v.reason, v.inliers)
                               for k, v in judge.verdicts.items()},
                              judge.verifier.checked, self.rounds))
            self.rounds = []
            close(judge)

        def counting(twin, *args):
            self.rehearsals += 1
            init(twin, *args)

        def sending(pool, tasks):
            self.rounds.append(len(tasks))
            return send(pool, tasks)
        monkeypatch.setattr(rs.Judge, "close", closing)
        monkeypatch.setattr(rs.Rehearsal, "__init__", counting)
        monkeypatch.setattr(rs.VerifyPool, "map", sending)


def run(folder, workers):
    params = write_params(folder, workers=workers, html_report=False,
                          output_dir=f"out{workers}")
    if not os.path.exists(folder / "db"):
        assert rs.main(["build", "--params", params, "-q"]) == 0
    with contextlib.suppress(FileNotFoundError):  # every check made afresh
        os.remove(folder / "index" / rs.VERDICTS_NAME)
    assert rs.main(["find_duplicates", "--params", params, "-q"]) == 0
    return results(folder / f"out{workers}", NAMES)


def test_rehearsed_checks_run_in_the_workers_with_the_same_results(
        pictures, monkeypatch):
    watch = Watch(monkeypatch)
    monkeypatch.setattr(rs, "REHEARSE_LEAST", 2)  # a round even for this few
    one = run(pictures, 1)
    assert watch.rehearsals == 0  # one process: nothing to plan ahead for
    assert run(pictures, 2) == one
    assert watch.rehearsals >= 3
    monkeypatch.setattr(rs, "REHEARSALS", 0)  # as before rehearsals
    assert run(pictures, 2) == one
    (asked, alone, _), (asked_two, parent, rounds), \
        (asked_before, parent_before, rounds_before) = watch.runs
    assert asked == asked_two == asked_before  # the same pairs, verdicts
    assert alone == len(asked) >= 8
    # with workers, every check is made in them (but a first one alone)
    assert parent <= 1 and parent_before <= 1
    assert sum(rounds) + parent == sum(rounds_before) + parent_before \
        == len(asked)  # each pair checked once
    assert len(rounds) < len(rounds_before)  # rehearsed: fewer, larger rounds
    text = (pictures / "out2" / "find_duplicates.json").read_text()
    assert "exact hash, verified" in text  # a sticker: reach_further
    assert "other2" not in text


def test_a_rehearsal_leaves_the_edge_judge_as_it_was(pictures):
    """Everything a Rehearsal records is its own: the real EdgeJudge's
    verdicts, links and joins are those of the checks it made itself."""
    params = write_params(pictures, workers=2)
    with edge_judge(params) as (flat, _, judge, edges):
        n = len(flat.ids)
        members = np.arange(n, dtype=np.int64)
        for hope in (True, False):
            twin = rs.Rehearsal(edges, hope)
            twin.joiners(0, members, np.arange(n) > 0, most=n)
            assert twin.wanted and not judge.verdicts and not judge.ready
            assert not edges.verdicts and not edges.links
            assert not edges.joined and not edges.through
        rs.rehearse(edges, lambda twin: twin.joiners(
            0, members, np.arange(n) > 0, most=n), hope=False)
        assert judge.ready and not edges.verdicts  # verified ahead, not taken
        found = edges.joiners(0, members, np.arange(n) > 0, most=n)
        assert judge.verifier.checked <= 1  # the workers made the checks
        assert edges.joined == {frozenset((0, int(members[k]))) for k in found
                                if frozenset((0, int(members[k])))
                                not in edges.through}


def test_a_pair_goes_to_the_worker_that_has_seen_its_files(tmp_path):
    """VerifyPool._take: of the next pairs, the one with more files the
    worker was sent before (each process finds a file's features once),
    the next in order on a tie; every pair is taken once."""
    job = rs.VerifyJob(10 ** 8, "affinity")
    ctx = rs.multiprocessing.get_context(rs.start_method())
    pool = rs.VerifyPool(job, 2)
    one, two = rs._start_worker(ctx, job), rs._start_worker(ctx, job)
    try:
        pairs = [("a", "b"), ("x", "y"), ("a", "c"), ("y", "z"), ("c", "b"),
                 ("q", "r")]
        todo = [rs.VerifyTask(a, b) for a, b in reversed(pairs)]  # end: next
        order = [(w, pool._take(w, todo, 1)[0]) for w in
                 (one, two, two, one, one, two)]
        got = [(w is one, (t.path_a, t.path_b)) for w, t in order]
        assert got == [(True, ("a", "b")), (False, ("x", "y")),
                       (False, ("y", "z")), (True, ("a", "c")),
                       (True, ("c", "b")), (False, ("q", "r"))]
        assert not todo
        assert pool.seen[one.process.pid] == {"a", "b", "c"}
    finally:
        one.stop(wait=True)
        two.stop(wait=True)


@pytest.mark.parametrize("hope, rehearsals", [(False, 1), (True, 2)])
def test_a_round_that_bears_out_every_guess_is_the_last(
        pictures, monkeypatch, hope, rehearsals):
    """Three unrelated photos: every check refuses.  Guessed refused, the
    first round bears the guesses out and no rehearsal follows (it would
    take the same path); guessed accepted, one more finds nothing new."""
    monkeypatch.setattr(rs, "REHEARSE_LEAST", 2)
    params = write_params(pictures, workers=2)
    assert rs.main(["build", "--params", params, "-q"]) == 0
    cfg = rs.config_from(rs.read_params(params), params, {})
    store = rs._open_store(cfg)
    judge = rs.Judge(cfg, rs.Console(quiet=True))
    made = []
    init = rs.Rehearsal.__init__
    monkeypatch.setattr(rs.Rehearsal, "__init__", lambda twin, *args: (
        made.append(1), init(twin, *args))[1])
    try:
        flat = rs.load_index(cfg, store, rs.Console(quiet=True))
        rows = store.rows_by_id(int(i) for i in flat.ids)
        others = np.array([p for p, i in enumerate(flat.ids)
                           if "other" in rows[int(i)].path], dtype=np.int64)
        edges = rs.EdgeJudge(judge, flat, store, cfg.distance_threshold)
        free = np.array([False, True, True])
        rs.rehearse(edges, lambda twin: twin.joiners(others[0], others, free),
                    hope)
        assert len(made) == rehearsals
        assert edges.joiners(others[0], others, free) == []
        assert judge.verifier.checked == 0  # both checks made in the workers
    finally:
        judge.close()
        store.close()
