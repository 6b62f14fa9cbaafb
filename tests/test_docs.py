"""The docs point into the repository and the code points into the docs: every reference to the maths names a
section of docs/math.md, every function and test docs/math.md names exists, and every file the README links is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
SOURCES = [p for top in ("cluster", "rollout", "rewards", "learner", "bench", "tests") for p in (ROOT / top).rglob("*")
           if p.suffix in (".py", ".yaml")] + [p for p in (ROOT / "cluster").glob("*.yaml")] + \
          [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]


def _headings() -> set[str]:
    """The section names of docs/math.md (heading text without the #s and any `code` part)."""
    return {re.sub(r"\s*\(`[^`]*`\)$", "", line.lstrip("#").strip())
            for line in MATH.read_text().splitlines() if line.startswith("#")}


def _defined(path: Path) -> set[str]:
    """Names a Python file defines: functions and classes, and Class.method."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def test_nothing_points_to_a_maths_file_outside_the_repository():
    this = Path(__file__).resolve()
    outside = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.resolve() != this
               for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"(?<![/\w])MATH\.md", line)]
    assert not outside, "MATH.md is not in the repository; point to docs/math.md:\n" + "\n".join(outside)


def test_every_reference_to_docs_math_names_one_of_its_sections():
    headings = _headings()
    missing = []
    for p in SOURCES:
        text = p.read_text()
        for match in re.finditer(r'docs/math\.md[",]*((?:\s*,?\s*"[^"]+")+)', text):
            for section in re.findall(r'"([^"]+)"', match.group(1)):
                section = " ".join(section.split())  # a reference may wrap over lines
                if section not in headings:
                    line = text[:match.start()].count("\n") + 1
                    missing.append(f"{p.relative_to(ROOT)}:{line}: {section!r}")
    assert not missing, "sections docs/math.md does not have:\n" + "\n".join(missing)


def test_every_function_and_test_docs_math_names_exists():
    text = MATH.read_text()
    code = re.findall(r"`([\w/]+\.py): ([\w.]+)`", text)
    tests = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(code) > 40 and len(tests) > 40  # the page names what implements and pins each equation
    code = [(f, name) for f, name in code if f != "path/to/file.py"]  # the page's own example
    tests = [(f, name) for f, name in tests if f != "tests/test_x.py"]
    missing = [f"{f}: {name}" for f, name in code if not (ROOT / f).is_file() or name not in _defined(ROOT / f)]
    missing += [f"{f}::{name}" for f, name in tests if not (ROOT / f).is_file() or name not in _defined(ROOT / f)]
    assert not missing, "docs/math.md names what does not exist:\n" + "\n".join(missing)


def test_every_file_the_readme_and_docs_link_exists():
    missing = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "links to files that are not there:\n" + "\n".join(missing)


def test_the_readme_is_a_first_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details to docs/"
