"""Run outside its environment (the virtual environment not activated, the
requirements not installed), the script says which package is missing and
how to install it: one message, no traceback, exit code 1.  Real
subprocesses of a Python that sees only part of the requirements."""

import os
import subprocess
import sys

import numpy

from conftest import ROOT, picture, write_params

SCRIPT = os.path.join(ROOT, "reverse_search.py")


def run_bare(tmp_path, *modules):
    """The script run by this Python without its site-packages (-S), seeing
    only `modules` (linked into a folder on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    for module in modules:
        where = os.path.dirname(module.__file__)
        parent = os.path.dirname(where)
        for name in os.listdir(parent):  # the package and its bundled libs
            if name == os.path.basename(where) or \
                    name.startswith(os.path.basename(where) + "."):
                (site / name).symlink_to(os.path.join(parent, name))
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-S", SCRIPT, "--params",
                           str(tmp_path / "params.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_without_numpy(tmp_path):
    done = run_bare(tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "has no numpy" in done.stderr
    assert "pip install -r requirements.txt" in done.stderr


def test_without_pillow(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "queries").mkdir()
    picture(1).save(tmp_path / "imgs" / "a.jpg")
    write_params(tmp_path)
    done = run_bare(tmp_path, numpy)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "has no Pillow" in done.stderr and "internal error" not in done.stderr
    assert ". .venv/bin/activate" in done.stderr
