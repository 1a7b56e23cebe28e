"""The store interface: both databases answer it, an SQLite run never enters
the PostgreSQL section, and hashes are stored one way in both."""

import inspect
import os
import sys
import threading

import pytest

from conftest import rs, write_params


def members(protocol) -> dict:
    """{name: function or None (a data attribute)} a Protocol declares."""
    out = {}
    for cls in protocol.__mro__:
        if cls.__dict__.get("_is_protocol") and cls.__name__ != "Protocol":
            out.update((name, None) for name in
                       cls.__dict__.get("__annotations__", {}))
            out.update((name, value) for name, value in vars(cls).items()
                       if inspect.isfunction(value) and not name.startswith("_"))
    return out


@pytest.mark.parametrize("impl, protocol", [
    ("Store", "HashStore"), ("PgStore", "ServerHashStore")])
def test_each_store_implements_its_interface(impl, protocol):
    cls, proto = getattr(rs, impl), getattr(rs, protocol)
    declared = members(proto)
    assert {"hash_arrays", "rows_by_id", "upsert", "path"} <= set(declared)
    for name, fn in declared.items():
        if fn is None:  # a data attribute: set by __init__
            assert "self.path =" in inspect.getsource(cls.__init__), name
            continue
        method = getattr(cls, name, None)
        assert callable(method), f"{impl} lacks {name}"
        want = list(inspect.signature(fn).parameters)
        have = list(inspect.signature(method).parameters)
        assert have[:len(want)] == want, (impl, name, have, want)


def section_lines(title_word: str) -> range:
    """Line numbers of the banner section whose title names `title_word`."""
    with open(rs.__file__, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    banners = [k for k, line in enumerate(lines)
               if line.startswith("# ====") and k + 2 < len(lines)
               and lines[k + 2].startswith("# ====")]
    for k, start in enumerate(banners):
        if title_word in lines[start + 1]:
            end = banners[k + 1] if k + 1 < len(banners) else len(lines)
            return range(start + 1, end + 1)
    raise AssertionError(f"no section named {title_word}")


def test_an_sqlite_run_never_enters_the_postgresql_section(tmp_path, collection,
                                                             capsys):
    pg = section_lines("PostgreSQL")
    entered = set()

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename == rs.__file__ and \
                code.co_firstlineno in pg:
            entered.add(code.co_name)
    params = write_params(collection)
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        for op in (["build"], ["update"], ["search"], ["find_duplicates"],
                   ["export"], ["move", "--yes"], ["undo", "--yes"]):
            assert rs.main([*op, "--params", str(params), "-q"]) == 0, op
            if op[0] == "move":  # the plan's duplicates went to quarantine
                assert any(files for _, _, files in
                           os.walk(collection / "quarantine")), "none moved"
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    capsys.readouterr()
    assert entered == set()
    # the check sees the section: a PostgreSQL function is in it
    assert rs.PgStore.upsert.__code__.co_firstlineno in pg


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_64_bit_hashes_are_stored_signed_and_read_back(value):
    stored = rs.hash_to_db(value, 64)
    assert -2**63 <= stored < 2**63
    assert stored == rs.signed64(value)
    assert rs.hash_from_db(stored) == value
    assert rs.hash_from_db(stored.to_bytes(8, "big", signed=True)) == value


def test_longer_hashes_are_stored_as_whole_words():
    value = (1 << 143) | 12345
    stored = rs.hash_to_db(value, 144)  # 144 bits: three 64-bit words
    assert isinstance(stored, bytes) and len(stored) == 24
    assert rs.hash_from_db(stored) == value
    assert rs.hash_to_db(None, 64) is None and rs.hash_from_db(None) is None

