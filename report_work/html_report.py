"""Draft of the HTML report, to be pasted into reverse_search.py's Reports section.

write_html_report(doc, out_dir) turns the JSON document of a search or
find_duplicates run into OUT/<operation>.html plus OUT/<operation>_files/ with
its thumbnails.  The page needs no network: the data sits in the page as JSON
and a small script draws one page of groups at a time.
"""

# ---- only while this is a separate file: what the script already has ----
import concurrent.futures
import hashlib
import html
import json
import os
import pathlib
import re
import time
import warnings

from reverse_search import (_ORIENT, _atomic_write, _exif_orientation,
                            _ignored, _output_errors, _setup_decoders,
                            human_bytes, to_8bit)
# ---- end of the part that is not pasted ----


HTML_PAGE_SIZE = 50      # groups drawn at once: keeps 10,000 groups fast
HTML_THUMB_QUALITY = 80  # JPEG quality of thumbnails: small and sharp enough
PLACEHOLDER_NAME = "unreadable.png"
_THUMB_NAME = re.compile(r"[0-9a-f]{20}\.jpg(\.part)?")
_ESCAPED_BYTE = re.compile(r"\\x([0-9a-fA-F]{2})")


def write_html_report(doc: dict, out_dir: str, thumb_px: int = 160) -> str:
    """Write OUT/<operation>.html and its thumbnails; returns the page's path."""
    op = doc.get("operation") or ("search" if "queries" in doc
                                  else "find_duplicates")
    files = f"{op}_files"
    page_path = os.path.join(out_dir, f"{op}.html")
    max_pixels = doc.get("settings", {}).get("max_image_pixels") or 178956970
    with _output_errors(out_dir):
        os.makedirs(os.path.join(out_dir, files), exist_ok=True)
        thumbs = make_thumbnails(_report_paths(doc), os.path.join(out_dir, files),
                                 thumb_px, max_pixels)
        folders = {}
        data = {"operation": op, "page_size": HTML_PAGE_SIZE, "px": thumb_px,
                "files": files, "sets": _html_sets(doc, thumbs, folders),
                "dirs": [{"path": f, "uri": uri} for f, (_, uri) in
                         folders.items()],
                "failures": doc.get("failures", [])}
        page = _html_page(doc, data)
        _atomic_write(page_path, lambda fh: fh.write(page))
    return page_path


def _report_paths(doc: dict) -> list:
    """Every distinct path the page shows, in page order."""
    paths = {}
    for q in doc.get("queries", []):
        paths[q["query"]] = None
        paths.update(dict.fromkeys(m["path"] for m in q["matches"]))
    for g in doc.get("groups", []):
        paths.update(dict.fromkeys(m["path"] for m in g["images"]))
    return list(paths)


# ---- thumbnails ----

def make_thumbnails(paths: list, folder: str, px: int, max_pixels: int) -> dict:
    """{shown path: thumbnail info}, one JPEG per distinct path, made in threads.

    Pillow releases the GIL while decoding and resizing, so threads use every
    core without the cost of starting processes.
    """
    _setup_decoders()
    placeholder(folder, px)
    workers = min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():  # process-wide, so it covers the threads
        warnings.simplefilter("ignore")  # EXIF and palette notes
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            made = dict(zip(paths, pool.map(
                lambda p: thumbnail(p, folder, px, max_pixels), paths)))
    _prune_thumbnails(folder, {t["thumb"] for t in made.values()})
    return made


def thumbnail(path: str, folder: str, px: int, max_pixels: int) -> dict:
    """{"thumb": file name in folder, "w", "h", "size", "mtime_ns"}; the
    placeholder (and None for what is unknown) when the file cannot be read."""
    info = {"thumb": PLACEHOLDER_NAME, "w": None, "h": None, "size": None,
            "mtime_ns": None}
    from PIL import Image
    real = real_path(path)
    try:
        st = os.stat(real)
        info.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        name = _thumb_name(real, st, px)
        with Image.open(real) as im:
            orientation = _exif_orientation(im)
            w, h = im.size
            if w * h > max_pixels:
                return info  # the hasher refused it too: never decode a bomb
            sideways = orientation in (5, 6, 7, 8)  # sizes as displayed
            info.update(w=h if sideways else w, h=w if sideways else h)
            if not os.path.exists(os.path.join(folder, name)):
                _save_thumbnail(im, os.path.join(folder, name), px, orientation)
        info["thumb"] = name
    except Exception:  # missing, unreadable, damaged: the placeholder says so
        pass
    return info


def _thumb_name(real: str, st: os.stat_result, px: int) -> str:
    """Named by path, size, mtime and px: an unchanged file is not redone."""
    key = os.fsencode(real) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{px}".encode()
    return hashlib.sha1(key).hexdigest()[:20] + ".jpg"


def _save_thumbnail(im, dest: str, px: int, orientation: int) -> None:
    """Small, upright, 8-bit RGB, written so no half file is ever left."""
    from PIL import Image
    if im.format == "JPEG":
        im.draft("RGB", (px, px))  # decode at 1/2..1/8 scale: far faster
    im.seek(0)  # first frame of an animation
    small = to_8bit(im)  # alpha over white, 16-bit scaled
    small.thumbnail((px, px), Image.Resampling.LANCZOS, reducing_gap=2.0)
    if orientation in _ORIENT:
        small = small.transpose(getattr(Image.Transpose, _ORIENT[orientation]))
    part = dest + ".part"  # a run killed mid-write leaves no half thumbnail
    try:
        small.convert("RGB").save(part, "JPEG", quality=HTML_THUMB_QUALITY)
        os.replace(part, dest)
    except BaseException:
        with _ignored(OSError):
            os.unlink(part)
        raise


def placeholder(folder: str, px: int) -> None:
    """The picture shown for files that cannot be read: a crossed frame."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (px, px), (236, 236, 236))
    draw = ImageDraw.Draw(im)
    m = px // 4
    draw.rectangle([m, m, px - m, px - m], outline=(160, 160, 160), width=3)
    draw.line([m, m, px - m, px - m], fill=(190, 80, 80), width=3)
    draw.line([m, px - m, px - m, m], fill=(190, 80, 80), width=3)
    left, top, right, bottom = draw.textbbox((0, 0), "no preview")
    draw.text(((px - right - left) // 2, px - m // 2 - (bottom + top) // 2),
              "no preview", fill=(110, 110, 110))
    im.save(os.path.join(folder, PLACEHOLDER_NAME))


def _prune_thumbnails(folder: str, used: set) -> None:
    """Drop our own thumbnails of files no longer in the report."""
    for name in os.listdir(folder):
        if _THUMB_NAME.fullmatch(name) and name not in used:
            with _ignored(OSError):
                os.unlink(os.path.join(folder, name))


def real_path(path: str) -> str:
    """The file behind a shown() path: \\xNN escapes back to the raw bytes."""
    if "\\x" not in path or os.path.lexists(path):
        return path
    raw, pos = b"", 0
    for m in _ESCAPED_BYTE.finditer(path):
        raw += path[pos:m.start()].encode("utf-8", "surrogateescape")
        raw += bytes([int(m.group(1), 16)])
        pos = m.end()
    raw += path[pos:].encode("utf-8", "surrogateescape")
    try:
        return os.fsdecode(raw)
    except UnicodeDecodeError:  # Windows: such bytes name no file there
        return path


def file_uri(path: str) -> str:
    """file:// URI with every byte of the real path percent-encoded."""
    try:
        return pathlib.Path(os.path.abspath(real_path(path))).as_uri()
    except ValueError:
        return ""


# ---- the page ----

def _html_sets(doc: dict, thumbs: dict, folders: dict) -> list:
    """Groups or queries, in the document's order, as the page's script wants."""
    if "queries" in doc:
        return [{"error": q["error"],
                 "items": [_html_query(q, thumbs[q["query"]], folders)]
                 + [_html_item(m, thumbs[m["path"]], folders)
                    for m in q["matches"]]}
                for q in doc["queries"]]
    return [{"reclaim": sum(m["size"] for m in g["images"] if not m["keep"]),
             "items": [_html_item(m, thumbs[m["path"]], folders)
                       for m in g["images"]]}
            for g in doc["groups"]]


def _html_item(m: dict, thumb: dict, folders: dict) -> dict:
    item = _where(m["path"], folders)
    item.update(thumb=thumb["thumb"], w=m["width"], h=m["height"], size=m["size"],
                date=m["mtime"].replace("T", " "), dist=m["distance"])
    if m["keep"]:
        item["role"] = "keep"
    return item


def _html_query(q: dict, thumb: dict, folders: dict) -> dict:
    """The query's card: what it is comes from the file itself."""
    date = "" if thumb["mtime_ns"] is None else time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(thumb["mtime_ns"] / 1e9))
    item = _where(q["query"], folders)
    item.update(thumb=thumb["thumb"], w=thumb["w"], h=thumb["h"],
                size=thumb["size"], date=date, dist=None, role="query")
    return item


def _where(path: str, folders: dict) -> dict:
    """{"name", "dir": index into folders, and "href" or "uri" if needed}.

    Folders repeat on thousands of cards, so the page gets each one once with
    its URI; a card's link is that URI plus "href", the encoded name, which is
    left out when it equals the name (most names).  "uri" is the whole link
    when it cannot be built that way.
    """
    folder, name = os.path.split(path)
    if folder not in folders:
        base = file_uri(folder)
        folders[folder] = (len(folders), base.rstrip("/") + "/")
    index, base = folders[folder]
    uri = file_uri(path)
    item = {"name": name, "dir": index}
    if not uri.startswith(base):
        item["uri"] = uri
    elif uri[len(base):] != name:
        item["href"] = uri[len(base):]
    return item


def _script_json(data) -> str:
    """JSON that is safe inside <script>: no '<' at all, so no '</script>'."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate cannot be written as UTF-8; as a \\udcxx escape it
    # stays valid JSON inside its string.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("<", "\\u003c")


def _html_summary(doc: dict) -> str:
    """The summary box, as escaped HTML."""
    e = html.escape
    if "queries" in doc:
        hits = sum(1 for q in doc["queries"] if q["matches"])
        facts = [(len(doc["queries"]), "queries"), (hits, "with matches"),
                 (doc.get("images", 0), "images searched")]
    else:
        facts = [(doc.get("images", 0), "images scanned"),
                 (doc.get("group_count", len(doc["groups"])), "groups"),
                 (doc.get("duplicates", 0), "duplicates"),
                 (human_bytes(doc.get("bytes_reclaimable", 0)), "reclaimable")]
    stats = "".join(f'<div class="stat"><b>{e(str(v))}</b> {e(k)}</div>'
                    for v, k in facts)
    settings = "".join(
        f"<tr><th>{e(k)}</th><td>{e(json.dumps(v, ensure_ascii=False))}</td></tr>"
        for k, v in doc.get("settings", {}).items())
    fails = len(doc.get("failures", []))
    failures = ('<p class="ok">Every file could be read.</p>' if not fails else
                f'<details id="failures"><summary>{fails:,} '
                f'file{"s" if fails != 1 else ""} could not be read</summary>'
                f'<ul id="failure-list"></ul></details>')
    run = (f'{e(doc.get("operation", ""))} · engine {e(str(doc.get("engine", "")))}'
           f' · {doc.get("seconds", 0)} s · database '
           f'<code>{e(str(doc.get("database", "")))}</code> · '
           f'reverse_search {e(str(doc.get("tool_version", "")))}')
    return (f'<div class="stats">{stats}</div><p class="run">{run}</p>'
            f'{failures}<details><summary>Settings used</summary>'
            f'<table class="settings">{settings}</table></details>')


def _html_page(doc: dict, data: dict) -> str:
    title = ("Search results" if data["operation"] == "search"
             else "Duplicate images")
    parts = {"TITLE": title, "PX": str(data["px"]),
             "SUMMARY": _html_summary(doc), "DATA": _script_json(data)}
    # One pass: a file name that reads "@DATA@" stays text.
    return re.sub(r"@(TITLE|PX|SUMMARY|DATA)@", lambda m: parts[m.group(1)],
                  HTML_TEMPLATE)


# Raw string: the script's regular expressions keep their backslashes.
HTML_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@ · reverse_search</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
       margin: 0 auto; padding: 16px 24px; max-width: 1400px; color: #222;
       background: #f6f7f9; }
h1 { font-size: 22px; margin: 0 0 12px; }
.summary { background: #fff; border: 1px solid #dde; border-radius: 8px;
           padding: 12px 16px; margin-bottom: 16px; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 28px; font-size: 16px; }
.stat b { font-size: 20px; }
.run { color: #667; margin: 8px 0; overflow-wrap: anywhere; }
.ok { color: #2a7a3a; margin: 8px 0; }
details summary { cursor: pointer; margin: 6px 0; color: #245; }
#failures summary { color: #a33; font-weight: 600; }
#failure-list { max-height: 320px; overflow: auto; font-size: 12px; }
#failure-list li { overflow-wrap: anywhere; }
.settings { border-collapse: collapse; font-size: 12px; }
.settings th { text-align: left; padding: 1px 12px 1px 0; font-weight: 600; }
.settings td { overflow-wrap: anywhere; }
nav { display: flex; align-items: center; gap: 8px; margin: 12px 0; }
nav button { font: inherit; padding: 4px 12px; border-radius: 6px;
             border: 1px solid #99a; background: #fff; cursor: pointer; }
nav button:disabled { opacity: .4; cursor: default; }
nav .where { color: #445; margin-left: 8px; }
.set { background: #fff; border: 1px solid #dde; border-radius: 8px;
       padding: 10px 12px; margin-bottom: 14px; }
.set h2 { font-size: 15px; margin: 0 0 8px; }
.set h2 .more { font-weight: normal; color: #667; }
.set .error { color: #a33; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: @PX@px; margin: 0; padding: 8px; border: 2px solid #e3e5ea;
        border-radius: 8px; position: relative; font-size: 12px; }
.card.keep { border-color: #2f9e44; background: #f1fbf3; }
.card.query { border-color: #1c7ed6; background: #f0f6fd; }
.card img { display: block; width: @PX@px; height: @PX@px; object-fit: contain;
            background: #eceef2; border-radius: 4px; }
.card img.broken { visibility: hidden; }
.badge { position: absolute; top: 12px; left: 12px; padding: 1px 8px;
         border-radius: 10px; font-weight: 700; font-size: 11px; color: #fff;
         letter-spacing: .04em; }
.badge.keep { background: #2f9e44; }
.badge.query { background: #1c7ed6; }
.badge.dist { background: rgba(40, 40, 50, .75); font-weight: 600; }
.name { font-weight: 600; margin-top: 6px; overflow-wrap: anywhere; }
.dir { color: #778; overflow-wrap: anywhere; }
.meta { color: #334; }
.none { color: #778; font-style: italic; }
</style>
</head>
<body>
<h1>@TITLE@</h1>
<section class="summary">@SUMMARY@</section>
<noscript><p>This page needs JavaScript to show the groups; the same data is
in the .json and .csv files beside it.</p></noscript>
<nav class="pager"></nav>
<main id="sets"></main>
<nav class="pager"></nav>
<script type="application/json" id="report-data">@DATA@</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var sets = data.sets, size = data.page_size, search = data.operation === "search";
  var pages = Math.max(1, Math.ceil(sets.length / size));
  var unit = search ? "queries" : "groups";

  // Everything from the data goes in through textContent and attributes,
  // never innerHTML, so a file name is always text.
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "? B";
    var units = ["B", "KB", "MB", "GB"];
    for (var i = 0; i < units.length; i++) {
      if (n < 1024 || i === units.length - 1)
        return i ? n.toFixed(1) + " " + units[i] : n + " B";
      n /= 1024;
    }
  }
  function count(n, one, many) { return n.toLocaleString("en") + " " + (n === 1 ? one : many); }
  // A folder that may wrap after each separator rather than mid-name.
  function folder(text) {
    var d = el("div", "dir");
    text.split(/(?<=[\\/])/).forEach(function (part) {
      d.appendChild(document.createTextNode(part));
      d.appendChild(el("wbr"));
    });
    return d;
  }

  function card(it, k, keepAt) {
    var c = el("figure", "card" + (it.role ? " " + it.role : ""));
    // Hook for a later "Not a duplicate" button: the two items in this set.
    if (k !== keepAt) c.setAttribute("data-pair", keepAt + "," + k);
    var dir = data.dirs[it.dir];
    var uri = it.uri !== undefined ? it.uri
      : dir.uri + (it.href !== undefined ? it.href : it.name);
    var a = el("a");
    if (uri) a.href = uri;
    a.target = "_blank"; a.rel = "noopener";
    a.title = dir.path ? dir.path + "/" + it.name : it.name;
    var img = el("img");
    img.loading = "lazy"; img.decoding = "async"; img.alt = it.name;
    img.width = img.height = data.px;
    img.onerror = function () { img.classList.add("broken"); };
    img.src = data.files + "/" + it.thumb;
    a.appendChild(img);
    c.appendChild(a);
    var badge = it.role === "keep" ? el("span", "badge keep", "KEEP")
      : it.role === "query" ? el("span", "badge query", "QUERY")
      : el("span", "badge dist", "distance " + it.dist);
    if (it.role === "keep") badge.title = "the keep rule keeps this file";
    c.appendChild(badge);
    c.appendChild(el("div", "name", it.name));
    c.appendChild(folder(dir.path));
    var dims = (it.w && it.h) ? it.w + " × " + it.h : "? × ?";
    c.appendChild(el("div", "meta", dims + " · " + bytes(it.size)));
    c.appendChild(el("div", "meta", it.date || ""));
    return c;
  }

  function setBox(s, n) {
    var box = el("section", "set");
    box.setAttribute("data-group", n);
    var h = el("h2");
    if (search) {
      h.appendChild(document.createTextNode("Query " + (n + 1) + ": " + s.items[0].name + " "));
      h.appendChild(s.error ? el("span", "error", "cannot hash: " + s.error)
        : el("span", "more", "· " + (s.items.length > 1 ? count(s.items.length - 1, "match", "matches") : "no match")));
    } else {
      h.appendChild(document.createTextNode("Group " + (n + 1) + " "));
      h.appendChild(el("span", "more", "· " + count(s.items.length, "image", "images") + " · "
        + bytes(s.reclaim) + " reclaimable"));
    }
    box.appendChild(h);
    var cards = el("div", "cards");
    var keepAt = 0;
    s.items.forEach(function (it, k) { if (it.role === "keep") keepAt = k; });
    s.items.forEach(function (it, k) { cards.appendChild(card(it, k, keepAt)); });
    box.appendChild(cards);
    return box;
  }

  function pageFromHash() {
    var m = /page=(\d+)/.exec(location.hash);
    return Math.min(pages, Math.max(1, m ? +m[1] : 1));
  }
  function go(p) { location.hash = "page=" + p; }

  function drawNav(nav, p) {
    nav.textContent = "";
    function button(label, target, off) {
      var b = el("button", null, label);
      b.disabled = off;
      b.onclick = function () { go(target); };
      nav.appendChild(b);
    }
    button("« First", 1, p === 1);
    button("‹ Prev", p - 1, p === 1);
    nav.appendChild(el("span", "page", "Page " + p + " of " + pages));
    button("Next ›", p + 1, p === pages);
    button("Last »", pages, p === pages);
    var first = (p - 1) * size;
    nav.appendChild(el("span", "where", sets.length
      ? unit + " " + (first + 1) + "–" + Math.min(sets.length, first + size)
        + " of " + sets.length.toLocaleString("en")
      : "no " + unit + " found"));
  }

  function render() {
    var p = pageFromHash(), first = (p - 1) * size;
    var frag = document.createDocumentFragment();
    sets.slice(first, first + size).forEach(function (s, k) { frag.appendChild(setBox(s, first + k)); });
    if (!sets.length) frag.appendChild(el("p", "none", search
      ? "No queries." : "No duplicates found."));
    document.getElementById("sets").replaceChildren(frag);
    document.querySelectorAll("nav.pager").forEach(function (nav) { drawNav(nav, p); });
  }

  var failures = document.getElementById("failures");
  if (failures) failures.addEventListener("toggle", function () {
    var list = document.getElementById("failure-list");
    if (!failures.open || list.childElementCount) return;
    data.failures.forEach(function (f) { list.appendChild(el("li", null, f.path + ": " + f.error)); });
  });

  window.addEventListener("hashchange", function () { render(); window.scrollTo(0, 0); });
  render();
  performance.mark("report-rendered");
})();
</script>
</body>
</html>
"""
