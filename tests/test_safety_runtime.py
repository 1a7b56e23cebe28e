"""Attacks on a running tool (issue 14): hostile numbers and files in the
settings, a search racing an update, a hashing worker killed, a small file
that decodes to gigabytes, an unmounted drive."""

import os

import pytest

from conftest import rs, run_json, write_params


def error_of(capsys, *args):
    """main() that must fail: (exit code, stderr), never a traceback."""
    capsys.readouterr()
    code = rs.main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


# ---- hostile numbers and structures in the settings ----

@pytest.mark.parametrize("text, key", [
    ('{"lock_timeout": NaN}', "lock_timeout"),
    ('{"lock_timeout": Infinity}', "lock_timeout"),
    ('{"lock_timeout": -Infinity}', "lock_timeout"),
    ('{"max_image_pixels": 1e300}', "max_image_pixels"),
    ('{"max_file_mb": 1e300}', "max_file_mb"),
    ('{"distance_threshold": NaN}', "distance_threshold"),
    ('{"workers": Infinity}', "workers"),
])
def test_non_finite_and_absurd_numbers_are_refused(tmp_path, capsys, text, key):
    (tmp_path / "imgs").mkdir()
    params = tmp_path / "params.json"
    params.write_text(text[:-1] + ', "img_dirs": ["imgs"]}')
    code, err = error_of(capsys, "build", "--params", str(params))
    assert code == 2 and f"key '{key}'" in err and str(params) in err
    assert len(err.splitlines()) == 1


def test_non_finite_numbers_on_the_command_line_are_refused(tmp_path, capsys):
    params = write_params(tmp_path)
    for value in ("nan", "inf", "-inf", "1e300"):
        code, err = error_of(capsys, "build", "--lock-timeout", value,
                             "--params", params)
        assert code == 2 and "--lock-timeout" in err, err


def test_params_nested_100k_deep_gets_a_message(tmp_path, capsys):
    params = tmp_path / "params.json"
    params.write_text('{"img_dirs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, err = error_of(capsys, "build", "--params", str(params))
    assert code == 2 and str(params) in err and "nested too deeply" in err


def test_a_huge_field_in_not_duplicates_gets_a_message(collection, capsys):
    params = write_params(collection)
    (collection / "not_duplicates.csv").write_text(
        "imgs/p1.jpg," + "x" * 300_000 + "\n")
    code, err = error_of(capsys, "find_duplicates", "--params", params)
    assert code == 2 and "not_duplicates.csv" in err and "not_duplicates" in err


def test_a_thousand_workers_are_capped_with_a_notice(collection, capsys):
    params = write_params(collection, workers=1000)
    capsys.readouterr()
    code = rs.main(["build", "--params", params, "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0
    most = rs.most_workers()
    assert f"key 'workers' is 1000; using {most}" in captured.err
    run = rs.parse_run(["build", "--params", params])
    assert run.config.worker_count == most < 1000
