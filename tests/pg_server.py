"""A throw-away PostgreSQL server for tests and benchmarks.

    with PgServer() as server:            # initdb + start, in a temp folder
        url = server.new_database()       # postgresql://rs@127.0.0.1:PORT/rs_1

The cluster lives in a folder under /tmp, or `base` (short: the unix socket
path must stay under 107 bytes), listens on that folder's unix socket and on a free
loopback port, and is stopped and deleted at the end.  PostgreSQL refuses to
run as root, so as root the server runs as the 'postgres' OS user (which
Debian's package creates); clients connect as root over TCP or the socket.

Server binaries: $REVERSE_SEARCH_PG_BIN, else the newest
/usr/lib/postgresql/*/bin (Debian, Ubuntu), else initdb on PATH.

The pytest fixtures `pg_server` (one server for the whole session) and
`pg_url` (a new database per test) are in tests/conftest.py: they skip their
tests with the reason `unavailable()` gives, or fail them when
REVERSE_SEARCH_REQUIRE_PG=1 (CI).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time

SUPERUSER = "rs"                  # the cluster's superuser, trust auth
PASSWORD_USER = "rs_pw"           # a user that must log in with a password
PASSWORD = "s3cret-Pw!%"          # its password (tests look for it in output)
FAST = {  # a test server: durability off, small and quick
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
    "max_connections": "50", "shared_buffers": "128MB",
}


class PgUnavailable(RuntimeError):
    """No server can be started here; the message says why."""


def bin_dir() -> str:
    """Folder of initdb/pg_ctl, or PgUnavailable."""
    env = os.environ.get("REVERSE_SEARCH_PG_BIN")
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    versions.sort(key=lambda p: _version(p.split("/")[-3]), reverse=True)
    candidates = [os.path.dirname(p) for p in versions]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    if env:  # only this one
        candidates = [env]
    for folder in candidates:
        if all(os.access(os.path.join(folder, b), os.X_OK)
               for b in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PgUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl): install them with "
        "'apt-get install -y postgresql' or set REVERSE_SEARCH_PG_BIN")


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text)) or (0,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str | None:
    """OS user that runs the server: None = ourselves; root cannot."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise PgUnavailable("running as root and there is no 'postgres' OS user "
                        "to run the server as (PostgreSQL refuses root)")


class PgServer:
    """initdb + pg_ctl start in a temp folder; stop() removes everything."""

    def __init__(self, settings: dict | None = None, keep: bool = False,
                 base: str = "/tmp"):
        self.bin = bin_dir()
        self.user = _server_user()
        self.settings = {**FAST, **(settings or {})}
        self.keep = keep  # leave the folder for a post-mortem
        self.base = base  # the folder the cluster's folder is made in
        self.dir = self.data = self.log = ""
        self.port = 0
        self._dbs = 0
        self._admin = None  # a psycopg connection for CREATE DATABASE

    # ---- life cycle ----
    def start(self) -> PgServer:
        self.dir = tempfile.mkdtemp(prefix="rspg-", dir=self.base)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.dir, info.pw_uid, info.pw_gid)
        try:
            self._run("initdb", "-D", self.data, "-U", SUPERUSER, "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            self._allow_password_user()
            for attempt in range(3):  # the free port may be taken meanwhile
                self.port = _free_port()
                try:
                    self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w",
                              "-t", "60", "-o", self._options(), "start")
                    break
                except PgUnavailable:
                    if attempt == 2:
                        raise
            self._psql("postgres", f"CREATE ROLE {PASSWORD_USER} LOGIN "
                       f"PASSWORD '{PASSWORD}'")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.data and os.path.exists(os.path.join(self.data, "postmaster.pid")):
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w",
                          "stop")
            except PgUnavailable:
                pass
        if self.dir and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- what tests use ----
    def url(self, db: str = "postgres", user: str = SUPERUSER,
            password: str | None = None) -> str:
        """A TCP URL (postgresql://user[:password]@127.0.0.1:PORT/db)."""
        who = user if password is None else f"{user}:{_quote(password)}"
        return f"postgresql://{who}@127.0.0.1:{self.port}/{db}"

    def socket_url(self, db: str = "postgres", user: str = SUPERUSER) -> str:
        """A URL over the unix socket in the server's folder."""
        return f"postgresql://{user}@{_quote(self.dir)}:{self.port}/{db}"

    def new_database(self, owner: str = SUPERUSER) -> str:
        """A new empty database; returns its TCP URL."""
        self._dbs += 1
        name = f"rs_{self._dbs}"
        self._sql(f"CREATE DATABASE {name} OWNER {owner}")
        return self.url(name, owner)

    # ---- helpers ----
    def _options(self) -> str:
        opts = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.dir}'", **self.settings}
        return " ".join(f"-c {k}={v}" for k, v in opts.items())

    def _allow_password_user(self) -> None:
        """PASSWORD_USER must authenticate with scram over TCP."""
        hba = os.path.join(self.data, "pg_hba.conf")
        with open(hba, encoding="utf-8") as fh:
            rules = fh.read()
        first = (f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
                 f"local all {PASSWORD_USER} scram-sha-256\n")
        with open(hba, "w", encoding="utf-8") as fh:
            fh.write(first + rules)

    def _sql(self, sql: str) -> None:
        """One statement in the postgres database, over a connection kept
        open: 0.06 s a database here, against 0.4 s for a psql process."""
        try:
            import psycopg
        except ImportError:  # the benchmark may run without it
            return self._psql("postgres", sql)
        if self._admin is None:
            self._admin = psycopg.connect(self.url(), autocommit=True)
        self._admin.execute(sql)

    def _psql(self, db: str, sql: str) -> None:
        subprocess.run([os.path.join(self.bin, "psql"), "-X", "-q",
                        "-v", "ON_ERROR_STOP=1", "-h", self.dir,
                        "-p", str(self.port), "-U", SUPERUSER, "-d", db,
                        "-c", sql], check=True, capture_output=True, timeout=60)

    def _run(self, tool: str, *args: str) -> None:
        """A server binary, as the server's OS user, from a folder it can read."""
        cmd = [os.path.join(self.bin, tool), *args]
        done = subprocess.run(cmd, user=self.user, cwd=self.dir,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = ""
            if self.log and os.path.exists(self.log):
                with open(self.log, encoding="utf-8", errors="replace") as fh:
                    log = fh.read()[-2000:]
            raise PgUnavailable(f"{tool} failed ({done.returncode}): "
                                f"{done.stderr.strip()[-2000:]}\n{log}")


def _quote(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="")


# ---- for the pytest fixtures (tests/conftest.py) ----

def unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install \"psycopg[binary]\")"
    try:
        bin_dir()
        _server_user()
    except PgUnavailable as exc:
        return str(exc)
    return None


def fast_base(room: int = 2 << 30) -> str:
    """A memory file system for a test cluster when it has `room` bytes free
    (Linux's /dev/shm; a container's default 64 MB is too small): on a busy
    shared disk, deleting a session's cluster took 3-8 s."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return "/tmp"
    free = st.f_bavail * st.f_frsize
    return shm if free >= room and os.access(shm, os.W_OK) else "/tmp"


if __name__ == "__main__":  # a quick manual check
    with PgServer() as s:
        print(s.new_database(), s.socket_url())
        time.sleep(0.1)
