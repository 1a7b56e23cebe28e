"""review: the local page, driven as a person drives it, and attacked.

The server runs as a real subprocess (`reverse_search.py review --no-open`)
on real images made in tmp_path; Debian's chromium drives the page through
playwright (skipped without them, unless REVERSE_SEARCH_REQUIRE_BROWSER=1).
With REVERSE_SEARCH_DOCS_SHOT=1 the test also writes docs/review.png, the
screenshot README shows.
"""

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import threading

import pytest
from PIL import Image

from conftest import ROOT, picture, rs, write_params
from test_actions import tree_digest as tree

SCRIPT = os.path.join(ROOT, "reverse_search.py")


# ---- a collection and a running server ----

def make_collection(root):
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    picture(2).save(imgs / "p2.jpg", quality=92)  # a group of three
    picture(2).save(imgs / "p2 q40.jpg", quality=40)
    picture(2).resize((320, 240), Image.LANCZOS).save(imgs / "sub" / "p2 small.png")
    picture(1).save(imgs / "p1.jpg", quality=92)  # a pair
    picture(1).resize((400, 300), Image.LANCZOS).save(imgs / "sub" / "p1 copy.jpg")
    picture(3).save(imgs / "p3.jpg", quality=92)  # a pair, marked different
    picture(3).save(imgs / "sub" / "<b>p3 <img src=x onerror=alert(1)>.jpg",
                    quality=70)  # the name stays text
    for seed in (4, 5, 6):
        picture(seed).save(imgs / f"alone{seed}.jpg")
    picture(1).resize((200, 150), Image.LANCZOS).save(root / "query.jpg")
    return write_params(root, quarantine_dir="quarantine",
                        not_duplicates="not_duplicates.csv")


class Server:
    """`review --no-open` as a subprocess; .url, .port, .token from its
    first line of output."""

    def __init__(self, params, *flags):
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "review", "--no-open", "--params",
             str(params), *flags], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline().strip()
        m = re.fullmatch(r"review: (http://127\.0\.0\.1:(\d+)/)\?token=(\S+)",
                         self.first)
        if not m:
            self.proc.kill()
            raise AssertionError(f"first line {self.first!r}; stderr: "
                                 f"{self.proc.stderr.read()}")
        self.base, self.port, self.token = m.group(1), int(m.group(2)), m.group(3)
        self.url = self.first.split(" ", 1)[1]
        self.err = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr),
                         daemon=True).start()

    def request(self, method, path, headers=None, body=None, host=None):
        """(status, body) of a raw request, headers exactly as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{self.port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        res = conn.getresponse()
        data = res.read()
        conn.close()
        return res.status, data

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def served(tmp_path):
    params = make_collection(tmp_path)
    server = Server(params)
    yield tmp_path, params, server
    server.stop()


# ---- security: without a browser ----

def test_refuses_requests_without_token_from_other_sites_and_outside_the_database(served):
    root, _, s = served
    mine = {"X-Review-Token": s.token}
    own = {"Origin": f"http://127.0.0.1:{s.port}", "Content-Type": "application/json",
           **mine}
    assert s.request("GET", "/?token=" + s.token)[0] == 200
    status, body = s.request("GET", "/api/groups?page=1", mine)
    assert status == 200
    groups = json.loads(body)
    assert groups["total"] == 3
    some_id = groups["groups"][0]["items"][0]["id"]
    assert s.request("GET", f"/thumb/{some_id}", mine)[0] == 200
    assert s.request("GET", f"/image/{some_id}", mine)[0] == 200
    # no token, a wrong one, one of another length, a cookie of another port
    for headers in ({}, {"X-Review-Token": "x" * len(s.token)},
                    {"X-Review-Token": s.token[:-1]},
                    {"Cookie": f"rs_review_{s.port + 1}={s.token}"}):
        for path in ("/", "/api/groups", f"/thumb/{some_id}", f"/image/{some_id}"):
            assert s.request("GET", path, headers)[0] == 403, (path, headers)
    assert s.request("GET", "/?token=wrong")[0] == 403
    # the cookie set by the first page load is accepted, on this port only
    assert s.request("GET", f"/thumb/{some_id}",
                     {"Cookie": f"rs_review_{s.port}={s.token}"})[0] == 200
    # DNS rebinding: a foreign Host with the right token
    for host in (f"evil.example:{s.port}", "127.0.0.1", f"127.0.0.1:{s.port + 1}"):
        assert s.request("GET", "/api/groups", mine, host=host)[0] == 403
    # other sites: a foreign Origin, a cross-site fetch, a POST without Origin
    body = json.dumps({"group": 0, "image": some_id}).encode()
    assert s.request("POST", "/api/keep", {**own, "Origin": "http://evil.example"},
                     body)[0] == 403
    assert s.request("POST", "/api/keep", {**own, "Origin": "null"}, body)[0] == 403
    assert s.request("GET", "/api/groups", {**mine, "Sec-Fetch-Site": "cross-site"}
                     )[0] == 403
    no_origin = {k: v for k, v in own.items() if k != "Origin"}
    assert s.request("POST", "/api/keep", no_origin, body)[0] == 403
    assert s.request("POST", "/api/keep", {**own, "X-Review-Token": "bad"},
                     body)[0] == 403
    assert s.request("GET", "/api/groups", mine)[0] == 200  # nothing changed
    # nothing outside the database: unknown ids, paths, traversal
    secret = root / "secret.txt"
    secret.write_text("not yours")
    for path in ("/thumb/9999", "/image/-1", "/image/1e3", "/image/" + str(secret),
                 "/image/..%2F..%2Fsecret.txt", "/../secret.txt", "/secret.txt",
                 "/params.json", "/image/" + "9" * 40, "/thumb/", "/api/nothing"):
        status, data = s.request("GET", path, mine)
        assert status == 404 and b"not yours" not in data, path
    # a GET never changes anything; a change by GET is not a route
    assert s.request("GET", "/api/undo", mine)[0] == 404
    # the page: no outside resources, its script by nonce only
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("GET", "/?token=" + s.token)
    res = conn.getresponse()
    page = res.read().decode()
    csp = res.getheader("Content-Security-Policy")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "HttpOnly" in res.getheader("Set-Cookie") and \
        "SameSite=Strict" in res.getheader("Set-Cookie")
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert s.first.startswith("review: http://127.0.0.1:")


def test_binds_to_loopback_only_and_stops_when_idle(tmp_path):
    params = make_collection(tmp_path)
    s = Server(params, "--review-idle-minutes", "0.05")  # 3 seconds
    try:
        import socket
        others = [a[4][0] for a in socket.getaddrinfo(socket.gethostname(), s.port,
                                                        socket.AF_INET)
                  if not a[4][0].startswith("127.")]
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, s.port), timeout=2).close()
        assert s.proc.wait(timeout=30) == 0
        assert any("stopped (idle)" in line for line in s.err)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_review_key_checked_like_every_key(tmp_path, capsys):
    params = make_collection(tmp_path)
    assert rs.main(["review", "--params", str(params), "--no-open",
                    "--review-idle-minutes", "0"]) == 2
    err = capsys.readouterr().err
    assert "review_idle_minutes" in err or "review-idle-minutes" in err


# ---- the page, in the browser ----

def names(page, selector):
    return page.locator(selector).all_inner_texts()


def tiles(page):
    """[(group number, name, 'keep' or 'move')] as the page shows them."""
    return page.evaluate("""[...document.querySelectorAll('.group')].flatMap(g =>
        [...g.querySelectorAll('.tile')].map(t => [+g.dataset.n,
          t.querySelector('.name').textContent,
          t.classList.contains('keep') ? 'keep' : 'move']))""")


def test_the_whole_flow_in_the_browser(served, browser):
    root, params, s = served
    imgs = root / "imgs"
    before = tree(imgs)
    strict = browser.new_page()  # the page works under its own CSP
    strict_errors = []
    strict.on("pageerror", lambda e: strict_errors.append(str(e)))
    strict.on("console", lambda m: m.type == "error" and strict_errors.append(m.text))
    strict.goto(s.url)
    strict.wait_for_selector("body[data-ready]")
    assert strict.locator(".group").count() == 3 and strict_errors == []
    strict.close()
    # bypass_csp: the test's own wait_for_function strings are eval'd
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(s.url)
    page.wait_for_selector("body[data-ready]")
    assert page.url == s.base  # the token left the address bar
    # groups, largest first, with thumbnails made on demand
    assert names(page, "#s-groups") == ["3"]
    assert [len(g) for g in page.evaluate(
        "[...document.querySelectorAll('.group')].map(g => [...g.querySelectorAll('.tile')])")] \
        == [3, 2, 2]
    page.wait_for_function("[...document.images].filter(i => i.classList.contains('thumb'))"
                           ".every(i => i.complete && i.naturalWidth === 200 || i.naturalHeight === 200)",
                           timeout=20000)
    assert "<b>p3 <img src=x onerror=alert(1)>.jpg" in names(page, ".tile .name")
    assert page.locator(".tile b, .tile img:not(.thumb)").count() == 0
    first = tiles(page)
    assert [t for t in first if t[0] == 1] == [(1, "p2.jpg", "keep"), (1, "p2 q40.jpg", "move"),
                                              (1, "p2 small.png", "move")] or \
        sorted(t[1] for t in first if t[0] == 1) == ["p2 q40.jpg", "p2 small.png", "p2.jpg"]
    kept1 = [t[1] for t in first if t[0] == 1 and t[2] == "keep"]
    assert len(kept1) == 1
    text = page.locator(".group").first.inner_text()
    assert "KEEP" in text and "kept: " in text and "of 64 bits" in text
    assert "matched:" in text and "×" in text
    if os.environ.get("REVERSE_SEARCH_DOCS_SHOT") == "1":
        page.screenshot(path=os.path.join(ROOT, "docs", "review.png"))

    # keep changed: keep 'p2 q40.jpg' instead (a click, then the keyboard)
    page.locator(".group").first.locator(".tile", has_text="p2 q40.jpg").locator(
        "img").click()
    page.wait_for_function("document.querySelector('.group .tile.keep + .tile.keep, "
                           ".group .tile.keep ~ .tile.keep') !== null")
    page.locator(".group").first.locator(".tile", has_text=kept1[0]).hover()
    page.keyboard.press("Space")  # toggles the hovered (focused) picture
    page.wait_for_function("document.querySelectorAll('.group')[0]"
                           ".querySelectorAll('.tile.keep').length === 1")
    now = [t for t in tiles(page) if t[0] == 1]
    assert [t[1] for t in now if t[2] == "keep"] == ["p2 q40.jpg"]
    assert "your choice" in page.locator(".group").first.inner_text()

    # a pair marked "not a duplicate": gone, saved, honoured by find_duplicates
    pair = page.locator(".group", has_text="p3.jpg")
    pair.locator(".tile").first.locator("button.notdup").click()
    page.wait_for_function("document.querySelector('#s-groups').textContent === '2'")
    assert not any("p3" in t[1] for t in tiles(page))
    assert [t[1] for t in tiles(page) if t[0] == 1 and t[2] == "keep"] == ["p2 q40.jpg"]
    with open(root / "not_duplicates.csv", encoding="utf-8") as fh:
        marked = fh.read()
    assert str(imgs / "p3.jpg") in marked and str(imgs / "sub" / "<b>p3 <img src=x onerror=alert(1)>.jpg") in marked
    out = subprocess.run([sys.executable, SCRIPT, "find-duplicates", "--params",
                          str(params), "--format", "json", "-q"],
                         capture_output=True, text=True, timeout=120)
    doc = json.loads(out.stdout)
    assert len(doc["groups"]) == 2
    assert not any("p3" in m["path"] for g in doc["groups"] for m in g["images"])

    # keys: next and previous group; compare zooms and pans every picture together
    page.locator("header h1").hover()
    page.keyboard.press("j")
    page.locator('.group.focus[data-n="2"]').wait_for(timeout=10_000)  # the key redraws
    assert page.locator(".group.focus").get_attribute("data-n") == "2"
    page.keyboard.press("k")
    page.locator('.group.focus[data-n="1"]').wait_for(timeout=10_000)  # the key redraws
    assert page.locator(".group.focus").get_attribute("data-n") == "1"
    page.keyboard.press("c")
    page.wait_for_function("[...document.querySelectorAll('#cmp-views img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    view = page.locator("#cmp-views .view").first.bounding_box()
    page.mouse.move(view["x"] + 100, view["y"] + 100)
    page.mouse.wheel(0, -300)
    page.mouse.down()
    page.mouse.move(view["x"] + 160, view["y"] + 130)
    page.mouse.up()
    shown_at = page.evaluate("""[...document.querySelectorAll('#cmp-views img')].map(i => {
        const m = new DOMMatrix(getComputedStyle(i).transform);
        return [m.e, m.f, m.a * i.naturalWidth]; })""")
    assert len(shown_at) == 3 and shown_at[0][:2] != [0, 0]
    for x, y, width in shown_at:  # same place, same drawn size (320 px one too)
        assert (round(x), round(y), round(width)) == tuple(map(round, shown_at[0]))
    page.keyboard.press("Escape")
    assert page.locator("#compare").is_hidden()

    # apply: exactly the files shown as "move", byte for byte into quarantine
    to_move = sorted(t[1] for t in tiles(page) if t[2] == "move")
    assert "p2.jpg" in to_move and "p2 q40.jpg" not in to_move
    page.locator("#apply").click()
    summary = page.locator("#modal .summary").inner_text()
    assert summary.startswith(f"{len(to_move)} files")
    page.locator("#modal button.confirm").click()
    page.wait_for_function("document.querySelector('#modal h2')?.textContent === 'Moved'")
    after = tree(imgs)
    moved = {k: v for k, v in before.items() if k not in after}
    assert sorted(os.path.basename(k) for k in moved) == to_move
    assert {k: v for k, v in before.items() if k in after} == after  # the rest untouched
    quarantine = tree(root / "quarantine")
    for rel, digest in moved.items():
        mirrored = rs.quarantine_path(str(root / "quarantine"), str(imgs / rel))
        assert quarantine[os.path.relpath(mirrored, root / "quarantine")] == digest
    page.locator("#modal button", has_text="Close").click()
    page.wait_for_function("document.querySelector('#s-groups').textContent === '0'")

    # undo from the page: every file back, byte for byte
    assert names(page, "#s-quarantined") == [str(len(to_move))]
    page.locator("#undo").click()
    page.locator("#modal button.confirm").click()
    page.wait_for_function("document.querySelector('#modal h2')?.textContent === 'Restored'")
    assert tree(imgs) == before
    page.locator("#modal button", has_text="Close").click()
    page.wait_for_function("document.querySelector('#s-groups').textContent === '2'")

    # search: an image dropped on the page finds its match, nearest first
    data = base64.b64encode((root / "query.jpg").read_bytes()).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "query.jpg", {type: "image/jpeg"}));
        window.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true,
                                                    cancelable: true}));
    }""", data)
    page.wait_for_selector("#search-results .tile")
    found = names(page, "#search-results .name")
    assert found[:2] == ["p1.jpg", "p1 copy.jpg"] or \
        sorted(found[:2]) == ["p1 copy.jpg", "p1.jpg"]
    dists = [int(re.search(r"distance (\d+)", t).group(1))
             for t in names(page, "#search-results .dist")]
    assert dists == sorted(dists)
    assert "query.jpg: 2 matches" in page.locator("#search-title").inner_text()
    assert not os.listdir(root / "imgs" / "sub") == []  # uploads go elsewhere
    assert tree(imgs) == before

    # the map draws every image (or says why it cannot)
    page.locator("#tab-map").click()
    try:
        import sklearn  # noqa: F401
        page.wait_for_selector("#map[data-drawn]", timeout=60000)
        assert page.locator("#map").get_attribute("data-drawn") == "10"
        assert "All 10 images" in page.locator("#map-note").inner_text()
        page.screenshot(path=str(root / "map.png"))
        # point at a dot of group 2: its thumbnail; click: its group opens
        points = json.loads(s.request("GET", "/api/map", {"X-Review-Token": s.token})[1])
        target = next(p for p in points["points"] if p[3] == 1)
        box = page.locator("#map").bounding_box()
        x = box["x"] + 12 + target[1] * (box["width"] - 24)
        y = box["y"] + 12 + target[2] * (box["height"] - 24)
        page.mouse.move(x, y)
        assert page.locator("#map-tip img").get_attribute("src").startswith("/thumb/")
        page.mouse.click(x, y)
        # the group focused before the click stays focused until the page
        # of group 2 has loaded (a busy machine: CI read "1" there once)
        page.wait_for_selector(
            '#groups-view:not(.hidden) .group.focus[data-n="2"]')
        assert page.locator(".group.focus").get_attribute("data-n") == "2"
    except ImportError:
        page.wait_for_selector("#map-note.error")
        assert "scikit-learn" in page.locator("#map-note").inner_text()
    assert errors == []
    page.close()


def test_a_double_click_with_operation_review_opens_the_review_page(tmp_path):
    """run_from_desktop (the executable without a terminal) serves review
    and opens its page; a stand-in browser records what it was asked to open."""
    params = make_collection(tmp_path)
    keys = json.loads(open(params, encoding="utf-8").read())
    keys.update(operation="review", review_idle_minutes=0.05)
    with open(params, "w", encoding="utf-8") as fh:
        json.dump(keys, fh)
    record = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{record}'\n")
    browser.chmod(0o755)
    env = dict(os.environ, BROWSER=str(browser))
    done = subprocess.run(
        [sys.executable, "-c", "import sys, reverse_search as rs; "
         "sys.exit(rs.run_from_desktop(sys.argv[1]))", str(params)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    opened = record.read_text().split()
    assert len(opened) == 1 and re.fullmatch(
        r"http://127\.0\.0\.1:\d+/\?token=[\w-]{40,}", opened[0]), opened
    log = (tmp_path / "reverse_search.log").read_text()
    assert "review: http://127.0.0.1:" in log and "stopped (idle)" in log
    assert (tmp_path / "out" / "plan.json").is_file()  # as find_duplicates writes
