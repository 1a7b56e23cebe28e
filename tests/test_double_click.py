"""A double-click's run goes on to the review page when it finds duplicates.

run_from_desktop() is what the executable runs when double-clicked (no
arguments, no terminal).  Here it runs from the script in a real subprocess,
with a stand-in browser (a shell script set as BROWSER) that records the
address it is asked to open; the test then talks to the server there, as the
browser would, and sees it stop by itself: on Done, or after
review_idle_minutes without a request.  tests/test_frozen.py does the same
with the built executable (DoubleClick is shared).
"""

import http.client
import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import ROOT, picture, rs, write_params

pytestmark = pytest.mark.skipif(os.name != "posix",
                                reason="the stand-in browser is a shell script")

FROM_DESKTOP = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "import reverse_search as rs; "
                "sys.exit(rs.run_from_desktop(sys.argv[2]))")
IDLE_MINUTES = 0.05  # the least review_idle_minutes takes: 3 s


def duplicated_pictures(imgs):
    """Three pictures, two of them with a copy: two groups."""
    (imgs / "sub").mkdir(parents=True)
    picture(1).save(imgs / "p1.jpg", quality=92)
    picture(1).resize((320, 240), Image.LANCZOS).save(imgs / "sub" / "p1 small.png")
    picture(2).save(imgs / "p2.jpg", quality=92)
    picture(2).save(imgs / "sub" / "p2 q40.jpg", quality=40)
    picture(3).save(imgs / "p3.jpg", quality=92)


class DoubleClick:
    """A double-click's process (cmd, in cwd) with a stand-in browser; the
    review address it opened, and requests to the server behind it."""

    def __init__(self, cmd, cwd, folder, env=None):
        self.record = folder / "opened.txt"
        stub = folder / "browser.sh"
        stub.write_text("#!/bin/sh\nprintf '%s\\n' \"$1\" >> "
                        f"'{self.record}'\n", encoding="utf-8")
        stub.chmod(0o755)
        env = dict(env or os.environ, BROWSER=str(stub))
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.url = self.port = self.token = None

    def opened(self) -> list:
        if not self.record.exists():
            return []
        return self.record.read_text(encoding="utf-8").splitlines()

    def wait_for_review(self, timeout=240) -> str:
        """The review address the browser was asked to open."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pages = [p for p in self.opened() if p.startswith("http://")]
            if pages:
                m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)",
                                 pages[0])
                assert m, pages
                self.url, self.port, self.token = pages[0], int(m[1]), m[2]
                return self.url
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"exited {self.proc.returncode} without opening "
                            f"review; opened {self.opened()}\n{out}\n{err}")
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail("no review page opened in time")

    def request(self, method, path, body=None):
        """(status, body) of a request as the page makes it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"X-Review-Token": self.token,
                   "Origin": f"http://127.0.0.1:{self.port}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        data = res.read()
        conn.close()
        return res.status, data

    def finish(self, timeout=60):
        """(exit code, stdout, stderr) once the process stops by itself."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"still running after {timeout} s\n{out}\n{err}")
        return self.proc.returncode, out, err


def check_review_page(click: DoubleClick, groups: int) -> None:
    """The page, its groups and a thumbnail are served, with the token."""
    status, page = click.request("GET", "/?token=" + click.token)
    assert status == 200 and b"Review duplicates" in page
    status, body = click.request("GET", "/api/groups?page=1")
    assert status == 200, body
    doc = json.loads(body)
    assert doc["total"] == groups, doc
    first = doc["groups"][0]["items"][0]["id"]
    status, thumb = click.request("GET", f"/thumb/{first}")
    assert status == 200 and thumb[:3] == b"\xff\xd8\xff", thumb[:20]


def desktop_run(tmp_path, **keys):
    imgs = tmp_path / "imgs"
    duplicated_pictures(imgs)
    params = write_params(tmp_path, operation="find_duplicates",
                          review_idle_minutes=IDLE_MINUTES,
                          quarantine_dir="quarantine", **keys)
    browser = tmp_path / "browser"
    browser.mkdir()
    return DoubleClick([sys.executable, "-c", FROM_DESKTOP, ROOT, params],
                       tmp_path, browser)


def test_groups_found_open_the_review_page_until_done(tmp_path):
    click = desktop_run(tmp_path)
    click.wait_for_review()
    check_review_page(click, groups=2)
    status, body = click.request("POST", "/api/stop", b"{}")
    assert (status, json.loads(body)) == (200, {"ok": True})
    code, out, err = click.finish(timeout=30)
    assert code == 0, err
    assert out.splitlines()[-1] == f"review: {click.url}"
    # one page opened, the review (not the static report as well); groups
    # found once, by the double-click's own find_duplicates
    assert click.opened() == [click.url]
    assert err.count("find_duplicates: 2 groups") == 1, err
    assert "finding duplicates first" not in err
    assert "review: stopped (done on the page)" in err
    log = (tmp_path / "reverse_search.log").read_text(encoding="utf-8")
    assert "review: stopped (done on the page)" in log
    assert not (tmp_path / rs.STATUS_PAGE).exists()
    # the double-click's result files are written as find_duplicates writes them
    plan = json.loads((tmp_path / "out" / "plan.json").read_text(encoding="utf-8"))
    assert sum(e["action"] == "move" for e in plan["entries"]) == 2


def test_the_server_stops_by_itself_when_idle(tmp_path):
    click = desktop_run(tmp_path)
    click.wait_for_review()
    start = time.monotonic()
    code, _, err = click.finish(timeout=60)
    assert code == 0, err
    assert "review: stopped (idle)" in err
    assert time.monotonic() - start < 50
    with pytest.raises(OSError):  # nothing listens any more
        click.request("GET", "/api/groups")


def test_no_groups_no_server(tmp_path):
    """Nothing to act on: the report opens as before, and the run ends."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for seed in (1, 2, 3):
        picture(seed).save(imgs / f"p{seed}.jpg")
    params = write_params(tmp_path, operation="find_duplicates")
    browser = tmp_path / "browser"
    browser.mkdir()
    click = DoubleClick([sys.executable, "-c", FROM_DESKTOP, ROOT, params],
                        tmp_path, browser)
    code, out, err = click.finish(timeout=120)
    assert code == 0, err
    assert "find_duplicates: 0 groups" in err and "review:" not in out + err
    pages = click.opened()
    assert len(pages) == 1 and pages[0].startswith("file://"), pages


def test_a_terminal_run_does_not_start_review(tmp_path, capsys):
    """`python reverse_search.py` (main) prints the groups and returns."""
    duplicated_pictures(tmp_path / "imgs")
    params = write_params(tmp_path, operation="find_duplicates")
    assert rs.main(["--params", params, "--no-open"]) == 0
    said = capsys.readouterr()
    assert "find_duplicates: 2 groups" in said.err
    assert "review:" not in said.out + said.err


def test_done_on_the_page_ends_the_review(tmp_path, browser):  # noqa: F811
    """The Done button (no console to press Ctrl-C in): the page says it
    has finished, under its own CSP, and the server process ends."""
    from test_review import Server, make_collection
    server = Server(make_collection(tmp_path))
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]")
    page.locator("#done").click()
    page.wait_for_selector("text=Review finished")
    assert "you can close this tab" in page.inner_text("body")
    assert server.proc.wait(timeout=30) == 0
    assert errors == []
    said = lambda: "".join(server.err)  # noqa: E731 (read by a thread)
    end = time.monotonic() + 10
    while "review: stopped (done on the page)" not in said() and \
            time.monotonic() < end:
        time.sleep(0.1)
    assert "review: stopped (done on the page)" in said(), said()
    page.close()


def test_a_port_in_use_is_named_with_what_to_do(tmp_path, capsys):
    """A fixed review_port another program (or an earlier review, still
    open) holds: one message naming the key, exit 2, no traceback."""
    import socket
    duplicated_pictures(tmp_path / "imgs")
    params = write_params(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = rs.main(["review", "--no-open", "--params", params,
                        "--review-port", str(port)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"review_port {port} is in use" in err and "Done" in err
    assert "Traceback" not in err
