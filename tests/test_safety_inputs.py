"""Issue 14, the inputs and caches: attacks by a hostile value, file or name.

Each test reproduces one attack on real files (real SQLite, a real
PostgreSQL server from tests/pg_server.py, real FIFOs and devices) and checks
that the tool refuses it with a clear message or survives it, and that no
secret reaches any output.
"""

import json
import os
import sys

import pytest
from hypothesis import given, settings, strategies as st

from conftest import picture, rs, run_json, write_params
from pg_server import PASSWORD, PASSWORD_USER


def every_output(folder, *streams) -> str:
    """The text of every file under `folder` except params.json, plus streams
    (bytes read as latin-1: a secret is found whatever the encoding)."""
    parts = list(streams)
    for here, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            if name != "params.json" and os.path.isfile(path):
                with open(path, "rb") as fh:
                    parts.append(fh.read().decode("latin-1"))
    return "\n".join(parts)


# ---- item 2: a PostgreSQL password never reaches output ----

# libpq reads user:password up to the first "@" before any "/": "#" and "?"
# there belong to the password (urlsplit ends the host at them)
TRICKY_URLS = [
    "postgresql://u:#sec?ret@h:5/db",
    "postgresql://u:?secret@h/db",
    "postgresql://u#:secret@h/db",
    "postgresql://u:sec#ret@h/db?sslmode=disable",
    "postgres://u:p%40secret@[::1]:5/db",
    "postgresql://u:secret@h1:1,h2:2/db",
    "postgresql:///db?host=/tmp&password=secret",
    "postgresql://h/db?%70assword=secret",
    "postgresql://u@h/db?sslpassword=secret",
    "host=h password='a secret' dbname=x",
    "host=h password=sec\\ ret dbname=x",
    "dbname=x sslpassword=secret",
]


@pytest.mark.parametrize("fallback", [False, True], ids=["libpq", "fallback"])
@pytest.mark.parametrize("url", TRICKY_URLS)
def test_any_password_in_database_url_is_refused_and_never_shown(
        url, fallback, monkeypatch):
    if fallback:
        monkeypatch.setitem(sys.modules, "psycopg", None)  # import fails
        monkeypatch.setitem(sys.modules, "psycopg.conninfo", None)
    with pytest.raises(rs.ConfigError) as err:
        rs.check_database_url(url, "params.json")
    text = str(err.value)
    assert "secret" not in text and "sec" not in text.replace("section", "")
    for way in ("PGPASSWORD", ".pgpass", "service"):
        assert way in text
    assert "secret" not in rs.redact_url(url)
    assert "sec" not in rs.redact_url(url).replace("sslmode", "")


def test_redaction_keeps_the_rest_of_the_url():
    assert rs.redact_url("postgresql://u:#sec?ret@h:5/db?sslmode=disable") == \
        "postgresql://u@h:5/db?sslmode=disable"
    assert rs.redact_url("postgresql://u#:secret@h/db") == "postgresql://u#@h/db"
    assert rs.redact_url("host=h password='a b' dbname=x") == "host=h dbname=x"
    assert rs.redact_url("host=h 'unterminated password=x").startswith(
        "(connection string not shown")


def test_libpq_errors_quote_the_url_but_the_message_does_not():
    # libpq's own message would print the whole URL, password included
    with pytest.raises(rs.ConfigError) as err:
        rs.check_database_url("postgresql://u:secret@[::1/db", "params.json")
    assert "secret" not in str(err.value) and "libpq" in str(err.value)
    with pytest.raises(rs.ConfigError) as err:
        rs.check_database_url("postgresql://u:secr%zzet@h/db", "params.json")
    assert "secr" not in str(err.value)


def test_a_password_in_a_badly_typed_database_url_is_not_echoed(tmp_path, capsys):
    params = write_params(tmp_path, database_url=["postgresql://u:secret@h/db"])
    code = rs.main(["build", "--params", params])
    err = capsys.readouterr().err
    assert code == 2 and "database_url" in err and "secret" not in err


def test_driver_messages_are_scrubbed_of_every_conninfo_form():
    url = "postgresql://u@h/db"
    for said in ('could not connect: postgresql://u:#x?secret@h/db refused',
                 "bad option password='a secret' here",
                 "bad option sslpassword=secret here"):
        assert "secret" not in rs._scrub(said, url)


URL_TEXT = st.text(alphabet="ab:@/?#%&=,[]2F0", max_size=24)


@settings(max_examples=400, deadline=None)
@given(userinfo=URL_TEXT, rest=URL_TEXT)
def test_fallback_parser_reads_urls_as_libpq(userinfo, rest):
    conninfo = pytest.importorskip("psycopg.conninfo")
    url = f"postgresql://{userinfo}@{rest}"
    try:
        expected = conninfo.conninfo_to_dict(url)
    except Exception:  # libpq refuses it: so may we (never the reverse)
        return
    assert rs._parse_conninfo(url) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["host", "dbname", "password",
                                           "user", "port"]),
                          st.text(alphabet="a b'\\=#?", max_size=8)),
                max_size=4))
def test_fallback_parser_reads_keyword_strings_as_libpq(pairs):
    conninfo = pytest.importorskip("psycopg.conninfo")
    quote = lambda v: "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    text = " ".join(f"{k}={quote(v)}" for k, v in pairs)
    assert rs._parse_conninfo(text) == conninfo.conninfo_to_dict(text)


def pg_role(server, name, password):
    """A login role with `password` (trust login over TCP: libpq takes the
    password from the URL without being asked for it) and a database."""
    import psycopg
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        conn.execute(f"CREATE DATABASE {name} OWNER {name}")
    return f"postgresql://{name}@127.0.0.1:{server.port}/{name}"


@pytest.mark.parametrize("form", ["hash", "question", "keywords"])
def test_a_password_with_hash_or_question_mark_reaches_no_output(
        pg_server, collection, capsys, form):
    secret = {"hash": "#Zq9-hash-secret", "question": "?Zq9-qm-secret",
              "keywords": "Zq9 kw secret"}[form]
    plain = pg_role(pg_server, f"rs_leak_{form}", secret.replace("'", ""))
    user, host = plain.split("://", 1)[1].split("@", 1)
    url = {"hash": f"postgresql://{user}:{secret}@{host}",
           "question": f"postgresql://{user}:{secret}@{host}",
           "keywords": f"host=127.0.0.1 port={pg_server.port} user={user} "
                       f"dbname={user} password='{secret}'"}[form]
    params = write_params(collection, database_url=url)
    streams = []
    for op in ("build", "find_duplicates", "search"):
        code = rs.main([op, "--params", params])
        out, err = capsys.readouterr()
        streams += [out, err]
        assert code == 2 and "PGPASSWORD" in err, err
    text = every_output(collection, *streams)
    assert secret not in text and "Zq9" not in text


def test_a_password_from_pgpassword_reaches_no_output(pg_server, collection,
                                                      capsys, monkeypatch):
    url = pg_server.new_database(owner=PASSWORD_USER)
    params = write_params(collection, database_url=url, html_report=True)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    streams = []
    for op in ("build", "update", "find_duplicates", "search", "export"):
        for fmt in ("json", "text"):
            code = rs.main([op, "--params", params, "--format", fmt])
            out, err = capsys.readouterr()
            assert code == 0, err
            streams += [out, err]
    monkeypatch.setenv("PGPASSWORD", "wrong-" + PASSWORD)
    code = rs.main(["search", "--params", params])
    out, err = capsys.readouterr()
    assert code == 1 and "PGPASSWORD" in err
    streams += [out, err]
    text = every_output(collection, *streams)
    assert "find_duplicates.html" in os.listdir(collection / "out")
    assert PASSWORD not in text and "s3cret" not in text
    doc = json.loads((collection / "out" / "search.json").read_text())
    assert doc["database"] == url == doc["settings"]["database_url"]


def test_a_sqlite_run_shows_no_password_either(collection, capsys, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "Zq9-sqlite-secret")
    params = write_params(collection)
    streams = []
    for op in ("build", "find_duplicates", "search"):
        code = rs.main([op, "--params", params, "--format", "json"])
        out, err = capsys.readouterr()
        assert code == 0
        streams += [out, err]
    code = rs.main(["search", "--params", params, "--database-url",
                    "postgresql://u:#Zq9?x@127.0.0.1:1/db"])
    out, err = capsys.readouterr()
    assert code == 2 and "PGPASSWORD" in err
    text = every_output(collection, *streams, out, err)
    assert "Zq9" not in text


# ---- item 5: hashes.idx is checked, never trusted ----

def container_arrays(path):
    """{name: (offset of its data, dtype, shape)} of an index file, read
    from its bytes (whatever the tool's own reader accepts)."""
    import numpy as np
    with open(path, "rb") as fh:
        fh.read(len(rs.INDEX_MAGIC))
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        out = {}
        for name in header["arrays"]:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
            out[name] = (fh.tell(), dtype, shape)
            fh.seek(int(np.prod(shape)) * dtype.itemsize, os.SEEK_CUR)
    return header, out


def poke(path, name, values):
    """Overwrite array `name` of an index file in place (header untouched)."""
    import numpy as np
    _, arrays = container_arrays(path)
    offset, dtype, shape = arrays[name]
    data = np.broadcast_to(np.asarray(values, dtype=dtype), shape)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.ascontiguousarray(data).tobytes())


def groups_of(doc):
    return sorted(sorted(m["path"] for m in g["images"]) for g in doc["groups"])


@pytest.mark.parametrize("attack", ["same_hashes", "order_out_of_range",
                                    "ids_swapped", "huge_start"])
def test_an_index_with_altered_arrays_is_rebuilt_never_trusted(
        collection, capsys, attack):
    params = write_params(collection, distance_threshold=6)
    code, ref = run_json(capsys, params, "find_duplicates")
    assert code == 0 and ref["groups"]
    capsys.readouterr()
    assert rs.main(["find_duplicates", "--params", params]) == 0
    assert "rebuilding" not in capsys.readouterr().err  # a sound file is used
    index = str(collection / "index" / "hashes.idx")
    _, arrays = container_arrays(index)
    if attack == "same_hashes":  # every picture the same: all one group
        poke(index, "distinct", 7)
        poke(index, "hashes", 7)
    elif attack == "order_out_of_range":
        poke(index, "img_order", 10**9)
    elif attack == "ids_swapped":
        poke(index, "ids", list(range(arrays["ids"][2][0], 0, -1)))
    else:
        poke(index, "img_starts", 2**40)
    capsys.readouterr()
    code = rs.main(["find_duplicates", "--params", params, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "is damaged" in err and "rebuilding it" in err
    assert groups_of(json.loads(out)) == groups_of(ref)
    code, again = run_json(capsys, params, "find_duplicates")  # healed
    assert groups_of(again) == groups_of(ref)


def test_an_index_resigned_without_the_database_key_is_refused(collection, capsys):
    """A forger who recomputes a plain checksum over crafted arrays: the MAC
    is keyed by a secret kept in the database, so the file is refused."""
    params = write_params(collection, distance_threshold=6)
    code, ref = run_json(capsys, params, "find_duplicates")
    index = str(collection / "index" / "hashes.idx")
    header, arrays = container_arrays(index)
    import numpy as np
    with open(index, "rb") as fh:
        data = fh.read()
    loaded = {name: np.frombuffer(data, dtype, int(np.prod(shape)), offset
                                  ).reshape(shape).copy()
              for name, (offset, dtype, shape) in arrays.items()}
    loaded["distinct"][:] = 7
    loaded["hashes"][:] = 7
    fields = {k: v for k, v in header.items() if k not in ("arrays", "mac")}
    rs.write_container(index, fields, loaded, b"")  # a valid plain checksum
    capsys.readouterr()
    code = rs.main(["find_duplicates", "--params", params, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0 and "is damaged" in err
    assert groups_of(json.loads(out)) == groups_of(ref)


# ---- item 6: bktree.idx runs nothing ----

def test_a_crafted_bktree_file_runs_no_code(collection, capsys, tmp_path):
    import io
    import pickle
    import numpy as np
    params = write_params(collection, engine="bktree", distance_threshold=6)
    code, ref = run_json(capsys, params, "find_duplicates")
    path = collection / "index" / "bktree.idx"
    header, _ = container_arrays(str(path))
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    blob = pickle.dumps(Payload())
    header = {k: v for k, v in header.items() if k != "mac"}
    header["arrays"] = ["tree"]
    text = json.dumps(header).encode()
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.frombuffer(blob, np.uint8))
    path.write_bytes(rs.INDEX_MAGIC + len(text).to_bytes(8, "little") + text
                     + buf.getvalue())
    code, doc = run_json(capsys, params, "find_duplicates")
    assert code == 0 and not marker.exists()
    assert groups_of(doc) == groups_of(ref)
    code, doc = run_json(capsys, params, "search")
    assert code == 0 and not marker.exists()


def test_the_bktree_cache_holds_plain_arrays_that_give_exact_results(tmp_path):
    import numpy as np
    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    near = base[:100] ^ np.uint64(0b1011)
    hashes = np.unique(np.concatenate([base, near])).reshape(-1, 1)
    flat = rs.FlatIndex.from_arrays(np.arange(1, len(hashes) + 1), hashes, 64)
    flat.kind, flat.fingerprint, flat.key = "k", "f", b"secret-key"
    path = str(tmp_path / "bktree.idx")
    built = rs.load_bktree(flat, path)
    header, arrays = rs.read_container(path, b"secret-key")
    assert set(arrays) == {"parent", "dist"}
    assert all(a.dtype.kind in "iu" for a in arrays.values())
    loaded = rs.load_bktree(flat, path)
    assert loaded.tree.tree == built.tree.tree  # the same nodes, same shape
    for q in hashes[::7]:
        pos, d = loaded.search(q, 6)
        want = np.flatnonzero(rs.distances(hashes, q) <= 6)
        assert sorted(pos.tolist()) == want.tolist()
    # links that disagree with the hashes are never used
    bad = dict(arrays, dist=arrays["dist"] + 1)
    with pytest.raises(ValueError):
        rs.BKTreeEngine(hashes, (bad["parent"], bad["dist"]))
    rs.write_container(path, header, bad, b"secret-key")
    assert rs.load_bktree(flat, path).tree.tree == built.tree.tree


# ---- a read-only or full bk_dir: search runs from memory ----

def mount_tmpfs(folder, size="256k"):
    """A small tmpfs at `folder`, or skip with the reason."""
    import subprocess
    folder.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                           "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def umount(folder):
    import subprocess
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder):
    """Write into `folder` until its file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("state", ["full", "read_only"])
def test_search_runs_from_memory_when_bk_dir_cannot_be_written(
        collection, capsys, state):
    import subprocess
    ref_params = write_params(collection, bk_dir="index_ref",
                              distance_threshold=6)
    code, ref = run_json(capsys, ref_params, "find_duplicates")
    bk = collection / "index"
    mount_tmpfs(bk)
    try:
        if state == "full":
            fill(bk)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(bk)], check=True)
        params = write_params(collection, distance_threshold=6)
        for engine in ("auto", "bktree"):
            for op in ("find_duplicates", "search"):
                capsys.readouterr()
                code = rs.main([op, "--params", params, "--format", "json",
                                "--engine", engine])
                out, err = capsys.readouterr()
                assert code == 0, err
                assert "searching from memory" in err
                if op == "find_duplicates":
                    assert groups_of(json.loads(out)) == groups_of(ref)
        code = rs.main(["update", "--params", params])
        assert code == 0
    finally:
        umount(bk)


# ---- item 11: folder and file names that are not UTF-8 ----

def test_a_root_that_is_not_utf8_works_in_every_output_and_move_undo(
        tmp_path, capsys):
    if sys.platform == "win32":
        pytest.skip("Windows file names are UTF-16: no undecodable bytes")
    root = os.path.join(os.fsencode(tmp_path), b"photos_\xff")
    os.makedirs(root)
    for seed in (1, 2, 3):
        picture(seed).save(os.fsdecode(os.path.join(root, b"p%d.jpg" % seed)))
    odd = os.path.join(root, b"copy_of_p1_\xfe\xfd.jpg")  # longer: moved
    with open(os.path.join(root, b"p1.jpg"), "rb") as fh:
        original = fh.read()
    with open(odd, "wb") as fh:
        fh.write(original)
    params = write_params(tmp_path, keep_rule=["shortest_path"],
                          html_report=True)
    flags = ["--params", params, "--img-dirs", os.fsdecode(root)]
    query = os.fsdecode(os.path.join(root, b"p2.jpg"))
    for op, extra in (("build", []), ("update", []), ("search", [query]),
                      ("find_duplicates", []), ("export", [])):
        for fmt in ("json", "text", "csv"):
            capsys.readouterr()
            code = rs.main([op, *extra, *flags, "--format", fmt])
            out, err = capsys.readouterr()
            assert code == 0, err
            assert "internal error" not in err
            if fmt == "json":
                json.loads(out)
    for name in ("build", "search", "find_duplicates", "plan"):
        with open(tmp_path / "out" / f"{name}.json", encoding="utf-8") as fh:
            doc = json.load(fh)  # valid UTF-8 JSON
    assert all("photos_\\xff" in e["path"] for e in doc["entries"])
    html = (tmp_path / "out" / "find_duplicates.html").read_text("utf-8")
    assert "photos_" in html
    code = rs.main(["move", "--yes", *flags])
    out, err = capsys.readouterr()
    assert code == 0 and "1 file moved" in err, err
    assert not os.path.exists(odd)
    code = rs.main(["undo", *flags])
    out, err = capsys.readouterr()
    assert code == 0 and "1 file restored" in err, err
    with open(odd, "rb") as fh:
        assert fh.read() == original


# ---- item 12: only regular files, never a hang ----

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "reverse_search.py")


def run_bounded(*args, timeout=90):
    """The script in a subprocess that cannot hang the suite or eat the
    machine's memory (4 GiB of address space)."""
    import resource
    import subprocess

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link"])
def test_a_query_that_is_not_a_regular_file_is_skipped_never_hangs(
        collection, kind):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    query = collection / "queries" / "odd.jpg"
    if kind == "fifo":
        os.mkfifo(query)
    else:
        os.symlink("/dev/zero", query)
    params = write_params(collection, html_report=True)
    run_bounded("build", "--params", params, "-q")
    done = run_bounded("search", query, "--params", params, "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    error = doc["queries"][0]["error"]
    assert "not a regular file" in error
    assert ("FIFO" if kind == "fifo" else "character device") in error
    done = run_bounded("search", "--params", params, "--format", "json")
    assert done.returncode == 0, done.stderr  # the whole folder, odd.jpg too
    assert any("not a regular file" in (q["error"] or "")
               for q in json.loads(done.stdout)["queries"])


def test_collection_files_that_are_not_regular_are_skipped_with_a_reason(
        collection, capsys):
    import socket
    imgs = collection / "imgs"
    os.mkfifo(imgs / "pipe.jpg")
    os.symlink("/dev/zero", imgs / "zero.jpg")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(imgs / "sock.png"))
        params = write_params(collection)
        done = run_bounded("build", "--params", params, "--format", "json")
    finally:
        sock.close()
    assert done.returncode == 0, done.stderr
    failures = {os.path.basename(f["path"]): f["error"]
                for f in json.loads(done.stdout)["failures"]}
    assert "FIFO" in failures["pipe.jpg"]
    assert "character device" in failures["zero.jpg"]
    assert "socket" in failures["sock.png"]
    assert json.loads(done.stdout)["hashed"] == 7


def test_a_file_over_max_file_mb_is_skipped_unread(collection, capsys):
    big = collection / "imgs" / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(3 * 2**20)  # sparse: 3 MiB, no disk used
    params = write_params(collection, max_file_mb=1)
    code, doc = run_json(capsys, params, "build")
    assert code == 0
    failures = {os.path.basename(f["path"]): f["error"] for f in doc["failures"]}
    assert "max_file_mb" in failures["big.png"]


# ---- file names with terminal escapes, CR or newlines ----

HOSTILE = ["red\x1b[31mname.jpg", "cr\rname.jpg", "two\nlines.jpg",
           "rtl\u202egpj.exe.jpg"]


def test_names_with_control_characters_are_escaped_in_text_output_only(
        tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    picture(4).save(imgs / "a.jpg")
    for name in HOSTILE:
        picture(4).save(imgs / name)
    (tmp_path / "queries").mkdir()
    picture(4).save(tmp_path / "queries" / "esc\x1b]0;title\x07.jpg")
    params = write_params(tmp_path, distance_threshold=4)
    for op in ("build", "find_duplicates", "search", "export"):
        capsys.readouterr()
        assert rs.main([op, "--params", params, "--format", "text"]) == 0
        out, err = capsys.readouterr()
        for raw in ("\x1b", "\r", "\u202e", "\x07"):
            assert raw not in out + err, (op, raw)
        assert "\n" not in "".join(l for l in out.splitlines()
                                   if "two" in l and "lines" in l) or op
        assert "two\\nlines.jpg" in out or op in ("build",), (op, out)
    code, doc = run_json(capsys, params, "find_duplicates")
    names = {os.path.basename(m["path"]) for g in doc["groups"]
             for m in g["images"]}
    assert set(HOSTILE) <= names  # JSON keeps them exact
    import csv
    with open(tmp_path / "out" / "find_duplicates.csv", newline="",
              encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert set(HOSTILE) <= {os.path.basename(r["path"]) for r in rows}


# ---- the database: damaged, full, read-only, someone else's ----

def database_messages(params, capsys, ops=("update", "search",
                                           "find_duplicates", "export")):
    """{op: (exit code, stderr)} of each operation."""
    out = {}
    for op in ops:
        capsys.readouterr()
        code = rs.main([op, "--params", params])
        out[op] = (code, capsys.readouterr().err)
        assert "internal error" not in out[op][1], (op, out[op][1])
        assert "Traceback" not in out[op][1]
    return out


@pytest.mark.parametrize("kind", ["other_tables", "user_version_1", "not_sqlite"])
def test_another_programs_images_db_is_refused_never_changed(
        collection, capsys, kind):
    import hashlib
    import sqlite3
    db = collection / "db" / "images.db"
    db.parent.mkdir()
    if kind == "not_sqlite":
        db.write_bytes(b"my notes, not a database\n" * 100)
    else:
        con = sqlite3.connect(db)
        if kind == "other_tables":
            con.execute("CREATE TABLE photos (id INTEGER, url TEXT)")
        else:
            con.execute("CREATE TABLE images (id INTEGER, blob BLOB)")
            con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
            con.execute("PRAGMA user_version = 1")
        con.execute("INSERT INTO %s VALUES (1, 'x')" % (
            "photos" if kind == "other_tables" else "images"))
        con.commit()
        con.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    params = write_params(collection)
    found = database_messages(params, capsys, ("build", "update", "search",
                                               "find_duplicates", "export"))
    for op, (code, err) in found.items():
        assert code != 0, op
        if kind == "not_sqlite":
            assert "damaged" in err or "not a reverse_search database" in err
        else:
            assert "not a reverse_search database" in err, (op, err)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(os.listdir(db.parent)) == ["images.db", "images.db.lock"] \
        or sorted(os.listdir(db.parent)) == ["images.db"]


def test_damaged_database_pages_give_a_message_and_build_replaces_them(
        collection, capsys):
    params = write_params(collection)
    assert run_json(capsys, params, "build")[0] == 0
    db = collection / "db" / "images.db"
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 2 * page
    data[page:] = b"\xa5" * (len(data) - page)  # every page after the first
    db.write_bytes(bytes(data))
    for op, (code, err) in database_messages(params, capsys).items():
        assert code == 1 and "is damaged" in err and "run build" in err, (op, err)
    code, doc = run_json(capsys, params, "build")
    assert code == 0 and doc["hashed"] == 7
    assert run_json(capsys, params, "search")[0] == 0


def test_a_full_db_dir_gives_a_message(collection, capsys):
    folder = collection / "db"
    mount_tmpfs(folder, "1m")
    try:
        fill(folder)
        params = write_params(collection)
        for room in (0, 12, 24):  # full from the start, or in mid-build
            with open(folder / "filler", "r+b") as fh:
                fh.truncate(os.path.getsize(folder / "filler") - room * 1024)
            found = database_messages(params, capsys, ("build",))
            code, err = found["build"]
            assert code == 1 and "is full" in err and "free some space" in err, \
                (room, err)
        os.unlink(folder / "filler")
        assert run_json(capsys, params, "build")[0] == 0
    finally:
        umount(folder)


def test_a_read_only_database_file_stops_update_with_a_message(collection,
                                                               capsys):
    """The file alone read-only (another user's, or a read-only bind mount
    as here, since root ignores permissions): SQLite opens it read-only."""
    import subprocess
    params = write_params(collection)
    assert run_json(capsys, params, "build")[0] == 0
    (collection / "imgs" / "p9.jpg").write_bytes(
        (collection / "queries" / "other.jpg").read_bytes())
    db = collection / "db" / "images.db"
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(db), str(db)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(db)],
                       capture_output=True)
        code, err = database_messages(params, capsys, ("update",))["update"]
        assert code == 1 and "is read-only" in err, err
        assert "give write access" in err
    finally:
        umount(db)


def test_a_read_only_db_dir_stops_update_with_a_message(collection, capsys):
    import subprocess
    folder = collection / "db"
    mount_tmpfs(folder, "4m")
    try:
        params = write_params(collection)
        assert run_json(capsys, params, "build")[0] == 0
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        code, err = database_messages(params, capsys, ("update",))["update"]
        assert code == 1 and "Read-only" in err and "give write access" in err, err
        code, doc = run_json(capsys, params, "search")  # reading still works
        assert code == 0 and doc["queries"]
    finally:
        umount(folder)
