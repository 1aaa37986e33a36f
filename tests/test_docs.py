"""Every document the code and the docs cite exists in the repository, and so does every section
and anchor they name.

What counts as a citation (in README.md, docs/, every Python file, csrc/, .ci/, bench/ and the build
files: every text file of the repository but generated data, see ``scanned_files``):

* a path ending in ``.md`` (``docs/design.md``, ``README.md``), as a bare token or as a Markdown
  link target. A bare token resolves against the repository root or the citing file's folder
  (``design.md`` inside docs/ is docs/design.md); a link target ``[text](target)`` in a Markdown
  file resolves against that file's folder only, as GitHub renders it. Tokens inside URLs are not
  citations. A shell variable in front (``$src/README.md``) stands for a folder of the repository
  and is dropped.
* the file name ``DESIGN.md`` is always an error: that is the first design page of the project's
  shared folder, which a clone of the repository does not have. Cite ``docs/design.md``.
* ``path.md#anchor``, and ``](#anchor)`` in a Markdown file: the anchor must be the GitHub slug of a
  heading of that document.
* ``path.md §4.2``: a section number after a cited document must be the number of one of its
  headings (``## 4. …``, ``### 4.2 …``). A ``§`` with no document before it on its line refers to
  the last document cited earlier on that line; in a Markdown file with none, to the file itself;
  elsewhere it is an error (a section reference names its document).

This file is not scanned (its docstring would cite what it describes).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve()

# Text files that can cite documents; JSON (benchmark results, compile tables) is generated data.
TEXT_SUFFIXES = {".md", ".py", ".sh", ".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu", ".txt", ".toml", ".cfg", ".ini"}
# Folders that are not the repository's sources: VCS, build outputs, environments, caches, run outputs,
# and a checkout's shared/ folder (project material outside the repository).
EXCLUDED_DIRS = {".git", "build", "dist", "__pycache__", ".venv", "venv", ".pytest_cache", ".benchmarks",
                 "runs", "demo", "slsdeep-demo", "shared", "node_modules"}

_PATH = r"(?:[\w.-]+/)*[\w.-]+\.md"
# A bare citation: not inside a longer path or a URL; an optional $var/ or ${var}/ prefix.
_BARE = re.compile(r"(?<![\w/.$}-])(?:\$\{?\w+\}?/)?(?P<path>" + _PATH + r")(?![\w])(?:#(?P<anchor>[\w-]+))?")
# A Markdown link target: ](target) or ](target#anchor) or ](#anchor).
_LINK = re.compile(r"\]\((?P<path>" + _PATH + r")?(?:#(?P<anchor>[\w-]+))?\)")
_SECTION = re.compile(r"§\s*(?P<number>\d+(?:\.\d+)*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?(?:\s|$)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def scanned_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if any(part in EXCLUDED_DIRS or part.endswith(".egg-info") for part in relative.parts[:-1]):
            continue
        if not path.is_file() or path.resolve() == SELF:
            continue
        if path.suffix in TEXT_SUFFIXES or relative.parts[0] == ".ci":
            files.append(path)
    return files


def _headings(document: Path) -> list[str]:
    """The heading texts of a Markdown document, outside fenced code blocks."""
    headings, fenced = [], False
    for line in document.read_text(errors="replace").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            headings.append(match.group(2))
    return headings


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in _headings(document):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def sections(document: Path) -> list[str]:
    """The section numbers of a document's numbered headings, in order (duplicates kept)."""
    return [m.group(1) for m in (_NUMBERED.match(h) for h in _headings(document)) if m]


def _resolve(token: str, source: Path, link: bool) -> Path | None:
    bases = [source.parent] if link else [ROOT, source.parent]
    for base in bases:
        candidate = (base / token).resolve()
        if candidate.is_file() and ROOT.resolve() in candidate.parents:
            return candidate
    return None


def _where(source: Path, number: int) -> str:
    return f"{source.relative_to(ROOT)}:{number}"


def citation_problems(source: Path) -> list[str]:
    """Every broken citation of ``source``, one line each."""
    problems = []
    markdown = source.suffix == ".md"
    for number, line in enumerate(source.read_text(errors="replace").splitlines(), 1):
        where = _where(source, number)
        # (start, end, document or None where the citation is broken) of every citation on the line
        cited: list[tuple[int, int, Path | None]] = []
        matches = [(m, True) for m in _LINK.finditer(line)] if markdown else []
        link_spans = [m.span() for m, _ in matches]
        matches += [(m, False) for m in _BARE.finditer(line)
                    if not any(start <= m.start() < end for start, end in link_spans)]
        for match, link in matches:
            token, anchor = match.group("path"), match.group("anchor")
            if token is None:  # ](#anchor): this document
                document = source
            elif Path(token).name == "DESIGN.md":
                problems.append(f"{where}: cites {token}, the first design page of the project's shared folder, "
                                "which the repository does not have; cite docs/design.md")
                cited.append((match.start(), match.end(), None))
                continue
            else:
                document = _resolve(token, source, link)
                if document is None:
                    problems.append(f"{where}: cites {token}, which is not in the repository")
                    cited.append((match.start(), match.end(), None))
                    continue
            if anchor is not None and document.suffix == ".md" and anchor not in anchors(document):
                problems.append(f"{where}: {token or ''}#{anchor}: no heading of "
                                f"{document.relative_to(ROOT)} has that anchor")
            cited.append((match.start(), match.end(), document))
        cited.sort(key=lambda entry: entry[0])
        for match in _SECTION.finditer(line):
            before = [entry for entry in cited if entry[1] <= match.start()]
            if before:
                document = before[-1][2]
                if document is None:
                    continue  # the citation itself is already reported
            elif markdown:
                document = source
            else:
                problems.append(f"{where}: §{match.group('number')} names no document (write docs/design.md §…)")
                continue
            if match.group("number") not in sections(document):
                problems.append(f"{where}: §{match.group('number')}: {document.relative_to(ROOT)} has no such section")
    return problems


def test_scan_covers_the_citing_files():
    names = {path.relative_to(ROOT).as_posix() for path in scanned_files()}
    for expected in ("README.md", "docs/design.md", "docs/performance.md", "slsdeep_kernels/backend.py",
                     "csrc/ops.cpp", "csrc/common/pyramid.h", "csrc/cuda/pyramid.cu", "bench/gpu_validate.sh",
                     ".ci/run", "CMakeLists.txt"):
        assert expected in names, f"{expected} is not scanned"
    assert not any(name.startswith("bench/results/") for name in names)


def test_every_cited_document_section_and_anchor_exists():
    problems = [problem for path in scanned_files() for problem in citation_problems(path)]
    assert not problems, f"{len(problems)} broken citation(s):\n" + "\n".join(problems)


@pytest.mark.parametrize("document", ["docs/design.md", "docs/performance.md"])
def test_numbered_sections_are_unique(document):
    numbers = sections(ROOT / document)
    assert numbers, f"{document} has no numbered sections"
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not duplicates, f"{document}: section numbers used twice: {duplicates}"


def test_readme_points_at_the_docs():
    readme = (ROOT / "README.md").read_text()
    for document in ("docs/design.md", "docs/performance.md"):
        assert f"]({document})" in readme, f"README.md does not link {document}"


def _block(path: Path, marker: str) -> str:
    text = path.read_text()
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"{path.relative_to(ROOT)}: one {begin} ... {end} block expected"
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def test_generated_results_table_is_the_same_in_readme_and_performance_doc():
    """Both blocks are written by ``bench/results.py readme`` from bench/results/: they never differ."""
    readme = _block(ROOT / "README.md", "results-table")
    performance = _block(ROOT / "docs" / "performance.md", "results-table")
    assert readme == performance, (
        "the results tables of README.md and docs/performance.md differ: regenerate both with "
        "`python bench/results.py readme`"
    )


# ---- the checker itself, on made-up files -------------------------------------------------------


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A fake repository root with docs/design.md holding §1 and §4.2."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path.resolve())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## 1. What\n\n### 4.2 Pyramid pooling\n\n```\n## 9. fenced\n```\n")
    (tmp_path / "README.md").write_text("# Title\n\n## Building for GPU\n")

    def problems(relative: str, text: str) -> list[str]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return citation_problems(path)

    return problems


@pytest.mark.parametrize("text", [
    "# see docs/design.md §4.2 and §1",
    "// CPU kernels (slsdeep_kernels/ops/pyramid.py, docs/design.md §4.2).",
    'cp "$src/README.md" "$work/"',
    "see README.md#building-for-gpu",
    "https://example.com/some/DESIGN.md is a URL",
])
def test_checker_accepts(scratch, text):
    assert scratch("pkg/module.py", text) == []


@pytest.mark.parametrize("text,expected", [
    ("# see DESIGN.md §4.2", "first design page"),
    ("# see docs/DESIGN.md", "first design page"),
    ("# see docs/missing.md", "not in the repository"),
    ("# see design.md", "not in the repository"),  # a bare name resolves against the root or pkg/
    ("# see docs/design.md §4.3", "no such section"),
    ("# see docs/design.md §9", "no such section"),  # a heading inside a code block is no section
    ("# see §4.2", "names no document"),
    ("# see README.md#building", "anchor"),
])
def test_checker_rejects(scratch, text, expected):
    problems = scratch("pkg/module.py", text)
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_markdown_rules(scratch):
    assert scratch("docs/other.md", "# Other\n\n## 2. Two\n\n[d](design.md#42-pyramid-pooling), design.md §1 and §4.2,\n"
                   "[up](../README.md#building-for-gpu), [here](#2-two)\n\nthis page's §2\n") == []
    problems = scratch("docs/bad.md", "# Bad\n\n[d](docs/design.md), [x](#nowhere), §3\n")
    assert len(problems) == 3, problems
    assert "not in the repository" in problems[0] and "anchor" in problems[1] and "no such section" in problems[2]


def test_github_slug():
    assert github_slug("4.1 conv + BN + ReLU") == "41-conv--bn--relu"
    assert github_slug("1.1 nll_epe_loss") == "11-nll_epe_loss"
    assert github_slug("Building for GPU") == "building-for-gpu"
    assert github_slug("The `slsdeep bench` command") == "the-slsdeep-bench-command"
