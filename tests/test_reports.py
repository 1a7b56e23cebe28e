"""Reports render themselves; every operation runs the same way (RUNNERS)."""

import inspect
import json
import os

import pytest

from conftest import rs, write_params


def test_every_operation_has_one_runner_taking_the_run_and_the_console():
    assert set(rs.RUNNERS) == set(rs.OPERATIONS)
    for name, runner in rs.RUNNERS.items():
        assert list(inspect.signature(runner).parameters) == ["run", "ui"], name


def test_a_report_that_cannot_render_itself_cannot_be_made():
    """No fall-through to another kind's output: a report kind without its
    summary (or JSON body, CSV rows, text lines) is refused when made."""
    class Half(rs.DocumentReport):
        def body(self):
            return {}

        def csv_rows(self):
            yield ["path"]

        def text_lines(self, verbose=False):
            yield "half"

    with pytest.raises(TypeError, match="summary"):
        Half()


def test_find_duplicates_writes_its_plan_itself(collection):
    """The plan is find_duplicates' answer too: written by the operation,
    named in its report, before any result file is shown."""
    params = write_params(collection)
    run = rs.parse_run(["find_duplicates", "--params", params, "-q"])
    report = rs.dispatch(run, rs.Console(True))
    out = collection / "out"
    assert report.plan_files == [str(out / "plan.json"), str(out / "plan.csv")]
    assert not (out / "find_duplicates.json").exists()
    with open(out / "plan.json", encoding="utf-8") as fh:
        entries = json.load(fh)["entries"]
    assert sorted(e["path"] for e in entries) == sorted(
        m.path for g in report.groups for m in g.images)
    assert len(report.groups) == 2  # p1 with its small copy, p2 with its q40


def test_debug_shows_the_traceback_of_an_internal_error(tmp_path, monkeypatch,
                                                        capsys):
    """Without --debug an internal error is one line asking for --debug;
    with it, the traceback (the exception goes up)."""
    params = write_params(tmp_path)

    def broken(run, ui):
        raise RuntimeError("a bug")

    monkeypatch.setitem(rs.RUNNERS, "export", broken)
    assert rs.main(["export", "--params", params]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: a bug" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="a bug"):
        rs.main(["export", "--params", params, "--debug"])
    assert not os.path.exists(tmp_path / "out" / "export.csv")
