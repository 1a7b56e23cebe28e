"""The script reads top to bottom: its banner sections are the ones the
module docstring's contents list names, in that order, and no top-level
definition uses a name defined in a later section (helpers before users)."""

import ast
import pathlib
import re

import reverse_search

SOURCE = pathlib.Path(reverse_search.__file__).read_text(encoding="utf-8")
BANNER = re.compile(r"^# ={76}\n# (.+)\n# ={76}$", re.M)


def sections() -> list:
    """[(first line, title)] of each banner, in file order."""
    return [(SOURCE.count("\n", 0, m.start()) + 1, m.group(1))
            for m in BANNER.finditer(SOURCE)]


def defined(node) -> list:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def used(node) -> set:
    """Names read by node, annotations aside (they are never evaluated:
    the script has `from __future__ import annotations`)."""
    skip = set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg) and n.annotation is not None:
            skip.update(map(id, ast.walk(n.annotation)))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns:
            skip.update(map(id, ast.walk(n.returns)))
        if isinstance(n, ast.AnnAssign):
            skip.update(map(id, ast.walk(n.annotation)))
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Load) and id(n) not in skip}


def section_of(line: int, starts: list) -> int:
    return sum(1 for s in starts if s <= line) - 1


def test_contents_list_names_every_section_in_order():
    doc = reverse_search.__doc__
    listed = re.findall(r"^ {4}(\d+)\. (.+?)(?: {2,}| - |$)", doc, re.M)
    titles = [t for _, t in sections()]
    assert [t.strip() for _, t in listed] == titles
    assert [int(n) for n, _ in listed] == list(range(1, len(titles) + 1))


def test_no_definition_uses_a_later_section():
    """Only the page templates are read from below: they are data, kept
    last (as bottle.py keeps its templates) so the code reads without them."""
    starts = [s for s, _ in sections()]
    templates = [t for _, t in sections()].index("Templates")
    tree = ast.parse(SOURCE)
    home = {}
    nodes = []
    for node in tree.body:
        line = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        sec = section_of(line, starts)
        nodes.append((node, sec))
        for name in defined(node):
            home.setdefault(name, sec)
    late = sorted(f"{'/'.join(defined(node)) or node.lineno} uses {name}"
                  for node, sec in nodes
                  if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
                  for name in used(node)
                  if sec < home.get(name, -1) != templates)
    assert late == []
