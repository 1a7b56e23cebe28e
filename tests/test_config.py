"""params.json and the command line: precedence, defaults, clear errors."""

import json
import os

import pytest

from conftest import rs, run_json, write_params


def run_error(capsys, params, *args):
    """main() that must fail: returns (exit code, the one stderr line)."""
    capsys.readouterr()
    code = rs.main([*args, "--params", str(params)])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def raw_params(tmp_path, data: bytes):
    path = tmp_path / "params.json"
    path.write_bytes(data)
    return path


def test_first_run_writes_default_params_and_stops(tmp_path, capsys):
    params = tmp_path / "params.json"
    assert rs.main(["--params", str(params)]) == 0
    assert json.loads(params.read_text()) == rs.default_params()
    assert "Created" in capsys.readouterr().err


def test_existing_params_json_is_never_overwritten(tmp_path, capsys):
    params = raw_params(tmp_path, b'{"hash_size": 8, "img_dirs": ["nowhere"]}')
    before = params.read_bytes()
    rs.main(["build", "--params", str(params)])
    assert params.read_bytes() == before


@pytest.mark.parametrize("data, words", [
    (b'{"hash_size": 8,, }', ["line 1, column 17", "invalid JSON"]),
    (b'{\n  "hash_size": 8\n  "db_dir": "x"\n}', ["line 3, column 3"]),
    (b'["imgs"]', ["expected a JSON object", "list"]),
    (b'"imgs"', ["expected a JSON object", "string"]),
    (b'', ["invalid JSON"]),
    ('{"db_dir": "caf\u00e9"}'.encode("latin-1"), ["not UTF-8", "Save the file as UTF-8"]),
    ('{"db_dir": "x"}'.encode("utf-16"), ["not UTF-8"]),
    (b'{"hash_sise": 8}', ["unknown key 'hash_sise'", "did you mean 'hash_size'"]),
    (b'{"hash_size": "8"}', ["'hash_size' must be a whole number", "string"]),
    (b'{"hash_size": 1}', ["'hash_size' is 1", "from 2 to 32"]),
    (b'{"hash_size": 12, "hash_method": "whash"}', ["power of 2"]),
    (b'{"hash_method": "dhas"}', ["'hash_method' is 'dhas'", "did you mean 'dhash'"]),
    (b'{"distance_threshold": -1}', ["'distance_threshold' is -1", "at least 0"]),
    (b'{"distance_threshold": 65}', ["only 64 bits"]),
    (b'{"stop_on_first_match": "yes"}', ["must be true or false"]),
    (b'{"img_dirs": [1, 2]}', ["'img_dirs' must be a list of strings"]),
    (b'{"img_dirs": []}', ["'img_dirs' is empty"]),
    (b'{"img_dirs": null}', ["'img_dirs' must be a list of strings", "null"]),
    (b'{"distance_method": "euclid"}', ["'distance_method'", "hamming"]),
    (b'{"operation": "serch"}', ["did you mean 'search'"]),
    (b'{"img_dirs": ["missing_folder"]}', ["'img_dirs'", "missing_folder does not exist"]),
])
def test_bad_params_give_one_clear_message_and_exit_2(tmp_path, capsys, data, words):
    params = raw_params(tmp_path, data)
    code, err = run_error(capsys, params, "build")
    assert code == 2
    assert len(err.splitlines()) == 1 and str(params) in err
    for word in words:
        assert word.lower() in err.lower()


def test_a_file_given_as_a_folder(tmp_path, capsys):
    (tmp_path / "imgs").write_text("I am a file")
    params = raw_params(tmp_path, b'{"img_dirs": ["imgs"]}')
    code, err = run_error(capsys, params, "build")
    assert code == 2 and "is a file, not a folder" in err


def test_missing_input_dir_for_search(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    params = write_params(tmp_path, input_dir="no_queries")
    code, err = run_error(capsys, params, "search")
    assert code == 2 and "'input_dir'" in err and "no_queries" in err


def test_bad_command_line_flags_exit_2(tmp_path, capsys):
    params = write_params(tmp_path)
    code, err = run_error(capsys, params, "--hash-size", "eight")
    assert code == 2 and "--hash-size" in err
    code, err = run_error(capsys, params, "dedupe")
    assert code == 2 and "invalid choice" in err
    code, err = run_error(capsys, params, "--hash-method", "md5")
    assert code == 2 and "command line: --hash-method is 'md5'" in err


def test_utf8_bom_is_accepted(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    params = raw_params(tmp_path, b'\xef\xbb\xbf{"img_dirs": ["imgs"], "workers": 1}')
    code, doc = run_json(capsys, params, "build")
    assert code == 0 and doc["files"] == 0


def test_precedence_defaults_then_file_then_flags(tmp_path):
    params = write_params(tmp_path, hash_size=16, distance_threshold=9)
    run = rs.parse_run(["--params", params, "--distance-threshold", "3"])
    cfg = run.config
    assert cfg.hash_size == 16            # from params.json
    assert cfg.distance_threshold == 3    # flag beats file
    assert cfg.hash_method == rs.Config().hash_method  # default
    assert cfg.operation == "search"


def test_relative_paths_follow_the_params_file(tmp_path, monkeypatch):
    params = write_params(tmp_path, db_dir="data/db")
    monkeypatch.chdir("/")
    cfg = rs.parse_run(["--params", params, "--output-dir", "tmp_out"]).config
    assert cfg.db_dir == str(tmp_path / "data" / "db")  # params.json's folder
    assert cfg.output_dir == os.path.abspath("/tmp_out")  # flags: cwd
    assert cfg.img_dirs == [str(tmp_path / "imgs")]


def test_single_folder_string_is_accepted_for_img_dirs(tmp_path):
    params = write_params(tmp_path, img_dirs="photos")
    assert rs.parse_run(["--params", params]).config.img_dirs == [str(tmp_path / "photos")]


def test_help_documents_every_key(capsys):
    out = ""
    for op in rs.OPERATIONS:  # each operation's help lists the keys it reads
        assert rs.main([op, "--help"]) == 0
        out += capsys.readouterr().out
    for name in rs.CONFIG_FIELDS:
        if name != "operation":
            assert "--" + name.replace("_", "-") in out


def test_queries_only_for_search(tmp_path, capsys):
    params = write_params(tmp_path)
    code, err = run_error(capsys, params, "build", "x.jpg")
    assert code == 2 and "only taken by search" in err


def test_default_paths_are_beside_the_params_file(tmp_path, monkeypatch):
    params = tmp_path / "params.json"
    params.write_text("{}")
    monkeypatch.chdir("/")
    cfg = rs.parse_run(["--params", str(params)]).config
    for key in ("db_dir", "bk_dir", "output_dir", "quarantine_dir", "input_dir"):
        assert getattr(cfg, key).startswith(str(tmp_path)), key


def test_readme_documents_every_key_and_operation():
    with open(os.path.join(os.path.dirname(rs.__file__), "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    for name in rs.CONFIG_FIELDS:
        assert f"| `{name}` |" in readme, name
    for op in rs.OPERATIONS:
        assert f"| `{op}` |" in readme, op


def test_the_params_json_a_first_run_writes_holds_the_defaults(tmp_path):
    """The defaults are checked from the script, never from the user's
    params.json (untracked, theirs to edit)."""
    path = tmp_path / "params.json"
    rs.write_default_params(str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == rs.default_params()
    assert rs.config_from(rs.default_params(), str(path), {}) == \
        rs.config_from({}, str(path), {})
