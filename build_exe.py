#!/usr/bin/env python3
"""Build the single-file executable dist/reverse_search with PyInstaller.

    python -m pip install -r requirements.txt -r requirements-build.txt
    python build_exe.py            # -> dist/reverse_search (reverse_search.exe on Windows)
    python build_exe.py --clean    # forget PyInstaller's cache in build/ first
    python build_exe.py --no-opencv  # hashes only: half the size, no verification
    python build_exe.py --no-map     # no scikit-learn: the review page has no map

The executable is built for the machine it is built on (Linux, Windows or
macOS: PyInstaller does not cross-compile).  After building, it is checked on
real work: --version, then a phash and a whash run on a generated picture, so
a build that lacks a hashing library fails here, not on a user's first run.
Work files go to build/ (the generated .spec too); both build/ and dist/ are
in .gitignore.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "reverse_search.py")
NAME = "reverse_search"
DIST = os.path.join(HERE, "dist")
WORK = os.path.join(HERE, "build")
EXE = os.path.join(DIST, NAME + (".exe" if os.name == "nt" else ""))

# Modules that reverse_search imports only inside functions, named here so the
# build never depends on how deep PyInstaller's bytecode scan happens to look.
# Each one is a run-time need; a build without it would fail on first use.
HIDDEN_IMPORTS = [
    # phash and phash_simple: imagehash does `import scipy.fftpack` inside
    # those functions (for the DCT).  Only this subpackage and what it imports
    # (scipy.fft, scipy.special, scipy._lib) are bundled, not all of SciPy.
    "scipy.fftpack",
    # whash and whash_db4: imagehash does `import pywt` inside whash (the Haar
    # and Daubechies-4 wavelet transforms).  pywt's C extensions come with it.
    "pywt",
    # HEIC/HEIF photos: _setup_decoders() imports it in every hashing process
    # and registers it with Pillow (optional at run time, bundled here).
    "pillow_heif",
    # BK-tree engine: imported inside BKTreeEngine.
    "pybktree",
    # progress bar: imported inside Console; without it no bar is drawn.
    "tqdm",
    # verified matching (ORB keypoints, RANSAC): imported inside _cv2();
    # without it the tool matches by hashes only and says so.
    "cv2",
]

# Modules never used by reverse_search that PyInstaller would otherwise bundle
# because something imports them optionally.  Leaving them out keeps the
# executable small and its start (unpacking to a temporary folder) quick.
EXCLUDES = [
    # GUI toolkits: reverse_search is a console program.  Pillow's ImageTk and
    # tqdm.tk would drag in Tcl/Tk (several MB of scripts and libraries).
    "tkinter", "_tkinter", "PIL.ImageTk", "PIL.ImageQt", "tqdm.tk",
    "PyQt5", "PyQt6", "PySide2", "PySide6",
    # plotting and notebooks: optional imports of numpy/scipy/tqdm/pywt.
    "matplotlib", "IPython", "ipywidgets", "tqdm.notebook", "tqdm.contrib",
    # SciPy subpackages: phash needs only scipy.fftpack, which loads
    # scipy.fft, scipy.special and scipy._lib (checked with sys.modules after
    # running every operation with every hash method).  The rest are pulled
    # in only by optional imports inside functions never called here; they
    # are most of SciPy's size (HiGHS, sparse, LAPACK wrappers, qhull ...).
    # (The map's scikit-learn needs more of them: MAP_SCIPY below.)
    *("scipy." + sub for sub in (
        "cluster", "datasets", "differentiate", "io", "misc", "odr",
        "signal")),
    # data libraries that scipy/numpy/tqdm test for but never need here.
    "pandas", "dask", "sympy", "numba", "cupy", "jax", "torch", "sparse",
    "pyarrow", "h5py",
    # test suites and test runners (numpy.testing and unittest itself are
    # imported by scipy at run time, so they stay).
    "pytest", "_pytest", "hypothesis", "numpy.tests", "scipy.tests",
    "pywt.tests", "PIL.tests",
    # build tools and compilers.  (numpy.f2py must stay: scipy's vendored
    # array_api_compat clones the numpy namespace with getattr(), which
    # imports every lazy numpy submodule, f2py included, on the first phash.)
    "numpy.distutils", "distutils", "setuptools", "pkg_resources",
    "Cython", "pythran",
    # TLS: no network use.  http.client, urllib and asyncio import ssl only
    # if it is there; leaving it out drops libssl.
    "ssl", "_ssl",
    # interactive/debug tools.
    "pdb", "lib2to3", "idlelib", "turtle", "turtledemo", "pydoc_data",
]

# --no-opencv: the hashes-only executable.  OpenCV (cv2 and the libraries its
# wheel carries) is most of the executable: 112 MiB with it, 54 without
# (measured 2026-12-01); without it, matching "verified" runs as "fast" and
# says so.  An environment variable, since PyInstaller imports this module anew.
if os.environ.get("BUILD_EXE_NO_OPENCV") == "1":
    HIDDEN_IMPORTS.remove("cv2")
    EXCLUDES.append("cv2")

# The review page's map: scikit-learn's t-SNE, imported inside _make_map().
# It uses these SciPy subpackages (sys.modules after a TSNE fit) and these of
# its own; the rest of scikit-learn (models, data sets, tests) stays out.
# With it the executable is 22.6 MiB larger (134.7 vs 112.1) and starts
# about 1 s slower on the busy 2-core machine (bench/bench_exe.py, README);
# leaving out the unused parts of scikit-learn saved only 1.6 MiB: most of
# the cost is SciPy's.  Without it (--no-map) the page's map says it is
# missing and all else works.
MAP_SCIPY = ("constants", "integrate", "interpolate", "linalg", "ndimage",
             "optimize", "sparse", "spatial", "stats")
SKLEARN_UNUSED = (
    "calibration", "cluster", "compose", "cross_decomposition", "datasets",
    "dummy", "ensemble", "experimental", "feature_extraction",
    "feature_selection", "gaussian_process", "impute", "inspection",
    "kernel_approximation", "kernel_ridge", "mixture", "multiclass",
    "multioutput", "naive_bayes", "neural_network", "pipeline",
    "random_projection", "semi_supervised", "tests")
if os.environ.get("BUILD_EXE_NO_MAP") == "1":
    EXCLUDES += ["sklearn", *("scipy." + sub for sub in MAP_SCIPY)]
else:
    HIDDEN_IMPORTS.append("sklearn.manifold")
    EXCLUDES += ["sklearn." + sub for sub in SKLEARN_UNUSED]


SPEC = f"""# Generated by build_exe.py on every build: edit build_exe.py instead.
import sys
sys.path.insert(0, {HERE!r})
import build_exe as cfg

a = Analysis([cfg.SCRIPT], hiddenimports=cfg.HIDDEN_IMPORTS,
             excludes=cfg.EXCLUDES, noarchive=False)
a.binaries = cfg.slim_binaries(a.binaries)
a.datas = cfg.slim_datas(a.datas)
pyz = PYZ(a.pure)
exe = EXE(pyz, a.scripts, a.binaries, a.datas, [], name=cfg.NAME,
          console=True, strip=False, upx=False, runtime_tmpdir=None)
"""


def slim_binaries(binaries: list) -> list:
    """Python's own shared libraries with their debug sections removed.

    A pyenv-built libpython carries ~16 MB of DWARF debug info, and a onefile
    executable unpacks every library at every start.  Only files from the
    Python installation (not its site-packages) are touched: PyInstaller's
    --strip applies to all,
    and it breaks the libraries that auditwheel patched into the numpy and
    SciPy wheels ("ELF load command address/offset not page-aligned").
    """
    strip = shutil.which("strip")
    if os.name == "nt" or sys.platform == "darwin" or strip is None:
        return binaries
    python_home = os.path.realpath(sys.base_prefix) + os.sep
    out_dir = os.path.join(WORK, "stripped")
    slimmed = []
    for dest, src, kind in binaries:
        real = os.path.realpath(src)
        # site-packages can sit inside the Python home (no venv): wheels'
        # libraries there must never be stripped
        packaged = "site-packages" in real or "dist-packages" in real
        if real.startswith(python_home) and not packaged and os.path.isfile(real):
            target = os.path.join(out_dir, dest)
            if not os.path.exists(target) or \
                    os.path.getmtime(target) < os.path.getmtime(real):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                subprocess.run([strip, "--strip-debug", "-o", target, real],
                               check=True)
            src = target
        slimmed.append((dest, src, kind))
    return slimmed


def slim_datas(datas: list) -> list:
    """Data files without those of left-out packages: PyInstaller's
    scikit-learn hook collects all of its data (the data sets' CSV files,
    test files) whatever is excluded."""
    unused = [name.replace(".", "/") + "/" for name in EXCLUDES]
    return [(dest, src, kind) for dest, src, kind in datas
            if not any(dest.replace(os.sep, "/").startswith(u) for u in unused)
            and "/tests/" not in dest.replace(os.sep, "/")]


def pyinstaller_args(clean: bool) -> list:
    os.makedirs(WORK, exist_ok=True)
    spec = os.path.join(WORK, NAME + ".spec")
    with open(spec, "w", encoding="utf-8") as fh:
        fh.write(SPEC)
    args = [spec, "--noconfirm", "--distpath", DIST, "--workpath", WORK,
            "--log-level", "WARN"]
    if clean:
        args.append("--clean")
    return args


def check(exe: str) -> None:
    """Run the built executable on real work; raise SystemExit if it fails."""
    sys.path.insert(0, os.path.join(HERE, "examples"))
    from make_examples import picture  # draws a seeded test picture

    out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"check failed: {exe} --version: {out.stderr}")
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, "imgs"))
        picture(1).save(os.path.join(tmp, "imgs", "a.png"))
        for method in ("phash", "whash"):
            params = os.path.join(tmp, "params.json")
            with open(params, "w", encoding="utf-8") as fh:
                json.dump({"img_dirs": ["imgs"], "input_dir": "imgs",
                           "hash_method": method, "workers": 1}, fh)
            out = subprocess.run([exe, "search", "--params", params,
                                  "--format", "json", "-q"],
                                 capture_output=True, text=True, timeout=120)
            try:
                ok = json.loads(out.stdout)["queries"][0]["matches"]
            except (ValueError, KeyError, IndexError):
                ok = False
            if out.returncode != 0 or not ok:
                raise SystemExit(f"check failed: {method} search with the "
                                 f"executable:\n{out.stdout}\n{out.stderr}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clean", action="store_true",
                    help="empty PyInstaller's cache before building")
    ap.add_argument("--no-check", action="store_true",
                    help="do not run the built executable afterwards")
    ap.add_argument("--no-opencv", action="store_true",
                    help="leave OpenCV out: a smaller, hashes-only executable")
    ap.add_argument("--no-map", action="store_true",
                    help="leave scikit-learn out: no map on the review page")
    ns = ap.parse_args(argv)
    if ns.no_opencv:
        os.environ["BUILD_EXE_NO_OPENCV"] = "1"
    if ns.no_map:
        os.environ["BUILD_EXE_NO_MAP"] = "1"
    try:
        import PyInstaller.__main__
    except ImportError:
        print("build_exe: PyInstaller is not installed. Run:\n"
              "  python -m pip install -r requirements.txt "
              "-r requirements-build.txt", file=sys.stderr)
        return 2
    start = time.perf_counter()
    PyInstaller.__main__.run(pyinstaller_args(ns.clean))
    seconds = time.perf_counter() - start
    size = os.path.getsize(EXE)
    print(f"built {os.path.relpath(EXE)}: {size / 2**20:.1f} MiB "
          f"in {seconds:.0f} s")
    # the guide travels with the program: its first-run page links to it
    shutil.copy2(os.path.join(HERE, "README.md"), os.path.join(DIST, "README.md"))
    print(f"shipped {os.path.relpath(os.path.join(DIST, 'README.md'))} beside it")
    if not ns.no_check:
        check(EXE)
        print("checked: --version, phash and whash runs work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
