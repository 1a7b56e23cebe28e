"""The command line: help per operation, forgiving names, errors that name
the flag or the params.json line at fault."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, rs, run_json, write_params

SCRIPT = os.path.join(ROOT, "reverse_search.py")


def help_text(capsys, *args):
    capsys.readouterr()
    assert rs.main(list(args)) == 0
    return capsys.readouterr().out


def error_of(capsys, *args):
    """main() that must fail: (exit code, stderr), never a traceback."""
    capsys.readouterr()
    code = rs.main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "internal error" not in err
    return code, err


def test_overview_help_is_short_and_describes_every_operation(capsys):
    out = help_text(capsys, "--help")
    assert len(out.splitlines()) <= 40
    for op in rs.OPERATIONS:
        line = next(l for l in out.splitlines() if l.strip().startswith(op + " "))
        assert len(line.split()) > 3, line  # a description, not a bare name
    assert "[X ...]" not in out and "OPERATION --help" in out
    assert max(map(len, out.splitlines())) <= 80


def test_each_operation_has_its_own_help(capsys):
    search = help_text(capsys, "search", "--help")
    undo = help_text(capsys, "undo", "--help")
    build = help_text(capsys, "build", "-h")
    assert search != undo != build
    assert "usage: reverse_search.py search [QUERY...]" in search
    assert "--distance-threshold BITS" in search and "--input-dir" in search
    assert "--keep-rule" not in search and "--grouping" not in search
    assert "--distance-threshold" not in build and "--input-dir" not in build
    assert "--hash-method" in build
    assert "--quarantine-dir" in undo and "--hash-method" not in undo
    for hashing in ("--content-box", "--region-windows", "--max-decode-mb", "--matching"):
        assert hashing not in undo, hashing
    assert "--max-decode-mb" in build and "--matching" in search
    assert "--keep-rule CRITERION..." in help_text(capsys, "find_duplicates", "--help")
    for out in (search, undo, build):
        assert "[X ...]" not in out and " X " not in out
    # choices are listed
    flat = " ".join(search.split())
    assert "one of: ahash, phash" in flat and "one of: auto, scan, mih, bktree" in flat


def test_every_key_has_a_flag_in_some_operations_help(capsys):
    pages = "".join(help_text(capsys, op, "--help") for op in rs.OPERATIONS)
    for name in rs.CONFIG_FIELDS:
        if name != "operation":
            assert re.search("--" + name.replace("_", "-") + "[ ,]", pages), name
    assert set(rs.KEY_USERS) <= set(rs.CONFIG_FIELDS)


@pytest.mark.parametrize("words", [["help"], ["help", "search"], ["find-duplicates", "-h"],
                                   ["search", "--bogus", "--help"]])
def test_help_in_other_spellings(capsys, words):
    out = help_text(capsys, *words)
    assert out.startswith("usage:")
    if "search" in words:
        assert "usage: reverse_search.py search" in out


def test_hyphenated_operation_names_run(collection, capsys):
    params = write_params(collection)
    code, doc = run_json(capsys, params, "find-duplicates")
    assert code == 0 and doc["operation"] == "find_duplicates"
    run = rs.parse_run(["Find-Duplicates", "--params", params])
    assert run.config.operation == "find_duplicates"


@pytest.mark.parametrize("args, said", [
    (["search", "--threshold", "5"], "Did you mean '--distance-threshold'?"),
    (["search", "--distance-treshold", "5"], "Did you mean '--distance-threshold'?"),
    (["find-duplicate"], "Did you mean 'find_duplicates'?"),
    (["serch"], "Did you mean 'search'?"),
    (["build", "-help"], "Did you mean '--help'?"),
    (["dedupe"], "invalid choice"),
])
def test_near_misses_get_a_did_you_mean(tmp_path, capsys, args, said):
    params = write_params(tmp_path)
    code, err = error_of(capsys, *args, "--params", params)
    assert code == 2 and said in err
    assert len(err.splitlines()) == 1


def test_every_old_flag_still_parses(tmp_path):
    params = write_params(tmp_path)
    argv = ["search", "q.jpg", "--params", params, "--format", "csv",
            "-q", "--debug", "--open", "--img-dirs", "a", "b",
            "--extensions", ".jpg", "--no-html-report",
            "--match-orientations", "--distance-threshold", "3",
            "--lock-timeout", "2.5", "--workers", "1",
            "--keep-rule", "oldest", "--output-format", "json"]
    run = rs.parse_run(argv)
    cfg = run.config
    assert run.queries == ["q.jpg"] and run.quiet and run.open_report
    assert rs.parse_args(argv).debug
    assert [os.path.basename(p) for p in cfg.img_dirs] == ["a", "b"]
    assert cfg.extensions == [".jpg"] and cfg.html_report is False
    assert cfg.match_orientations and cfg.distance_threshold == 3
    assert cfg.lock_timeout == 2.5 and cfg.keep_rule == ["oldest"]
    assert cfg.output_format == "json"
    # options before the operation, as before
    run = rs.parse_run(["--params", params, "--distance-threshold", "4", "update"])
    assert run.config.operation == "update" and run.config.distance_threshold == 4


def test_help_from_a_real_process():
    out = subprocess.run([sys.executable, SCRIPT, "search", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: reverse_search.py search")


# ---- errors name the flag when the value came from the command line ----

@pytest.mark.parametrize("args, flag", [
    (["--hash-method", "md5"], "command line: --hash-method is 'md5'"),
    (["--distance-threshold", "70"], "command line: --distance-threshold is 70"),
    (["--hash-size", "12", "--hash-method", "whash"], "command line: --hash-size is 12"),
    (["--keep-rule", "biggest"], "command line: --keep-rule has"),
    (["--lock-timeout", "nan"], "command line: --lock-timeout is nan"),
])
def test_a_bad_flag_is_blamed_on_the_flag(tmp_path, capsys, args, flag):
    params = write_params(tmp_path)
    code, err = error_of(capsys, "build", *args, "--params", params)
    assert code == 2 and flag in err
    assert "params.json" not in err


def test_a_missing_folder_given_by_flag_names_the_flag(tmp_path, capsys):
    params = write_params(tmp_path)
    code, err = error_of(capsys, "build", "--img-dirs", str(tmp_path / "nope"),
                         "--params", params)
    assert code == 2 and "command line: --img-dirs" in err and "params.json" not in err


def test_a_bad_key_in_params_is_still_blamed_on_the_file(tmp_path, capsys):
    params = write_params(tmp_path, distance_threshold=70)
    code, err = error_of(capsys, "build", "--params", params)
    assert code == 2 and f"{params}: key 'distance_threshold' is 70" in err


# ---- Windows paths in params.json ----

def test_windows_path_with_single_backslashes_gets_the_corrected_line(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text('{\n  "img_dirs": ["C:\\Users\\me\\Pictures"],\n  "workers": 1\n}\n')
    code, err = error_of(capsys, "build", "--params", str(params))
    assert code == 2 and len(err.splitlines()) == 1
    assert str(params) in err and "line 2" in err
    assert "\\\\ or /" in err
    assert '"img_dirs": ["C:\\\\Users\\\\me\\\\Pictures"],' in err
    fixed = err.split("Write the line as: ")[1]
    assert json.loads("{" + fixed.rstrip(",") + "}") == {"img_dirs": ["C:\\Users\\me\\Pictures"]}


def test_windows_path_that_json_reads_as_a_tab_is_caught(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text('{"img_dirs": ["D:\\temp\\new"], "workers": 1}')  # \t, \n: valid JSON
    code, err = error_of(capsys, "build", "--params", str(params))
    assert code == 2 and "key 'img_dirs'" in err and "\\\\ or /" in err
    assert '"D:/temp/new"' in err
