"""The docs cannot drift from the code: docs/configuration.md is what docs/generate.py (make docs)
writes from the config dataclasses, every command with a typed config is in it, every relative
link in the README and docs/ resolves (anchors included), and every command block says whether a
test runs it."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate_docs", ROOT / "docs" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
MARKER = re.compile(r"^# (?:tested by (tests/[\w/]+\.py)\b|example: |measures: )")
COMMAND = re.compile(  # a line that runs something: optional prompt (gpu-a$), variables, a program
    r"^\s*(?:[\w-]+\$\s+|\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"(?:python|make|docker|kubectl|kustomize|go|cd|grpcurl|curl|pip|git)(?=\s|$)"
)
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def anchors(path: Path) -> set[str]:
    """Heading anchors as GitHub makes them, duplicates numbered."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            slug = generate.slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_configuration_reference_is_up_to_date(tmp_path):
    written = generate.generate(tmp_path)
    committed = ROOT / "docs" / generate.PAGE
    assert committed.read_text() == written.read_text(), "regenerate docs/configuration.md with `make docs`"


def test_every_command_with_a_typed_config_is_in_the_reference():
    documented = {name for _, name, _ in generate.COMMANDS}
    parsed = set()
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("tests", "harness", "v1", "node_modules")]
        for path in (Path(folder) / f for f in files if f.endswith(".py")):
            parsed |= typed_configs_parsed_in(path)
    assert parsed == documented, f"add to docs/generate.py COMMANDS: {sorted(parsed - documented)}"


def typed_configs_parsed_in(path: Path) -> set[str]:
    """Names X of the parse(XConfig, ...) calls (specdec.config.parse) in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse" and node.args:
            if isinstance(node.args[0], ast.Name) and node.args[0].id.endswith("Config"):
                names.add(node.args[0].id)
    return names


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference text to docs/"


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_relative_links_resolve(page):
    broken = []
    for match in LINK.finditer(FENCE.sub("", page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{relative(page)}: {broken}"


def runners_of(page: Path) -> list[str]:
    """Test modules that name the page (tests/test_grpcurl.py runs docs/grpcurl.md's sh blocks)."""
    return [p.name for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py" and page.name in p.read_text()]


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_command_blocks_are_run_by_a_test_or_marked(page):
    """```sh blocks: run as written by a test that reads the page. Other blocks with commands start
    with `# tested by tests/...`, `# example: ...` (needs another machine) or `# measures: ...`."""
    unmarked = []
    for language, body in FENCE.findall(page.read_text()):
        lines = [line for line in body.splitlines() if line.strip()]
        if language.strip() == "sh":
            assert runners_of(page), f"{relative(page)}: no test reads the page to run its sh blocks"
            continue
        if language.strip() != "python" and not any(COMMAND.match(line) for line in lines):
            continue  # a picture, a code map, output
        marker = MARKER.match(lines[0]) if lines else None
        if not marker:
            unmarked.append(lines[0] if lines else "(empty block)")
        elif marker.group(1):
            assert (ROOT / marker.group(1)).exists(), f"{relative(page)}: {marker.group(1)} does not exist"
    assert not unmarked, f"{relative(page)}: command blocks without a marker: {unmarked}"
