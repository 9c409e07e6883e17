"""The documentation in the repository stays true to the repository.

- docs/cli.md is generated from the argparse definitions (`python -m clipfuse.runtime.clidoc`) and
  must equal what the generator writes now;
- every relative link and every repository path cited in README.md and docs/*.md exists, and a
  link's #section names a heading of the linked page;
- code cites documentation inside the repository only (docs/*.md#section, checked the same way),
  never the project's private specs.
"""
from __future__ import annotations

import difflib
import glob
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("export", "runtime", "benchmarks", "tests")
# Top-level entries whose paths a document may cite as repository files.
REPO_TOP = ("export", "runtime", "benchmarks", "tests", "docs", ".ci", "README.md", "CHANGELOG.md",
            "pyproject.toml", "constraints.txt")
PACKAGES = {"clipfuse.export": "export", "clipfuse.runtime": "runtime", "clipfuse.benchmarks": "benchmarks"}


# --- Markdown parsing (the subset GitHub renders that these pages use) ---------------------------

def _prose(text: str) -> str:
    """The text outside fenced code blocks (commands there name the user's files, not ours)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())   # [text](link) -> text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    """The #fragments a link into `path` may use (duplicates get -1, -2 like GitHub)."""
    seen: Dict[str, int] = {}
    found = set()
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    found |= set(re.findall(r'<a (?:name|id)="([^"]+)"', path.read_text(encoding="utf-8")))
    return found


def links(text: str) -> Iterator[str]:
    for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _prose(text)):
        yield match.group(1)
    for match in re.finditer(r"^\[[^\]]+\]:\s*(\S+)", _prose(text), flags=re.M):   # reference links
        yield match.group(1)


def cited_paths(text: str) -> Iterator[str]:
    """Inline-code spans that name a file or folder of this repository."""
    prose = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", _prose(text))
    for span in re.findall(r"`([^`\n]+)`", prose):
        span = span.strip()
        if any(seg.isupper() and len(seg) >= 3 and seg not in ("README", "CHANGELOG", "LICENSE")
               for seg in re.split(r"[/.\-_]", span)):
            continue            # a pattern such as runtime/backends/NAME.py, not a file
        if re.fullmatch(r"[\w.\-/{},*]+(::[\w\[\]\-.]+)?(:\d+(-\d+)?)?", span) and \
                span.split("/")[0].split("::")[0] in REPO_TOP and ("/" in span or "." in span):
            yield span
        elif re.fullmatch(r"clipfuse\.(export|runtime|benchmarks)(\.\w+)*", span):
            yield span


def _expand_braces(pattern: str) -> List[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [p for alt in match.group(1).split(",")
            for p in _expand_braces(pattern[:match.start()] + alt + pattern[match.end():])]


def path_exists(cited: str) -> bool:
    if cited.startswith("clipfuse."):
        return _module_exists(cited)
    cited = re.sub(r"(::.*|:\d+(-\d+)?)$", "", cited)
    return all(glob.glob(str(ROOT / p)) for p in _expand_braces(cited))


def _module_exists(dotted: str) -> bool:
    """clipfuse.PKG[.module...][.attribute...]: every module part exists; an attribute is not
    imported, only looked for in the package's __init__.py when it follows a package."""
    base = ROOT / PACKAGES[".".join(dotted.split(".")[:2])]
    for part in dotted.split(".")[2:]:
        if (base / part).is_dir():
            base = base / part
        elif (base / f"{part}.py").is_file():
            return True
        else:
            init = base / "__init__.py"
            return init.is_file() and re.search(rf"\b{part}\b", init.read_text(encoding="utf-8")) is not None
    return base.is_dir()


def check_link(source: Path, target: str) -> str:
    """'' if `target` (as written in `source`) resolves inside the repository, else the reason."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):       # http:, https:, mailto:
        return ""
    path_part, _, fragment = target.partition("#")
    dest = source if not path_part else (source.parent / path_part).resolve()
    if not dest.exists():
        return f"{target}: no such file"
    if ROOT not in dest.parents and dest != ROOT:
        return f"{target}: points outside the repository"
    if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
        return f"{target}: {dest.name} has no section #{fragment}"
    return ""


# --- the checks ----------------------------------------------------------------------------------

def broken_references(paths: List[Path]) -> List[str]:
    problems = []
    for doc in paths:
        text = doc.read_text(encoding="utf-8")
        rel = doc.relative_to(ROOT)
        for target in links(text):
            reason = check_link(doc, target)
            if reason:
                problems.append(f"{rel}: link {reason}")
        for cited in cited_paths(text):
            if not path_exists(cited):
                problems.append(f"{rel}: cites `{cited}`, which is not in the repository")
        if "../shared" in text:
            problems.append(f"{rel}: cites ../shared (not part of the repository)")
    return problems


def test_links_and_cited_paths_exist():
    problems = broken_references(DOCS)
    assert not problems, "\n".join(problems)


def test_link_checker_catches_what_it_should():
    """The checker itself: a broken link, a missing section, a missing cited path or module."""
    doc = ROOT / "docs" / "methods.md"
    assert doc.exists()
    good = "[m](methods.md#sclip) `runtime/protocol.py` `benchmarks/results/cpu-vitb16.{json,md}`"
    assert not [check_link(doc, t) for t in links(good) if check_link(doc, t)]
    assert all(path_exists(p) for p in cited_paths(good))
    assert check_link(doc, "methods.md#no-such-section")
    assert check_link(doc, "nothere.md")
    assert check_link(doc, "../../outside.md")
    assert not path_exists("runtime/no_such_module.py")
    assert not path_exists("clipfuse.runtime.no_such_module")
    assert path_exists("clipfuse.runtime.artifact.open_artifact")
    assert list(cited_paths("```\n`runtime/nope.py`\n```")) == []    # commands in code blocks are not citations


def code_citations() -> Iterator[Tuple[Path, int, str]]:
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                yield path, number, line


# The private specs the code was written from; users cannot open them.
SPEC_NAMES = re.compile(r"(?<![\w/])(methods\.md|heads-sc-clip-rcs\.md|deploy\.md)|\.\./shared|spec section")


def test_code_cites_documents_in_the_repository():
    problems = []
    for path, number, line in code_citations():
        where = f"{path.relative_to(ROOT)}:{number}"
        if path.name == "test_docs.py":
            continue
        if SPEC_NAMES.search(line):
            problems.append(f"{where}: cites a document outside the repository: {line.strip()}")
        for cited in re.findall(r"((?:docs/[\w\-/]+|README)\.md(?:#[\w\-]+)?)", line):
            reason = check_link(ROOT / "README.md", cited)
            if reason:
                problems.append(f"{where}: {reason}")
    assert not problems, "\n".join(problems)


def test_cli_reference_is_current():
    from clipfuse.runtime.cli import registered_commands
    from clipfuse.runtime.clidoc import render

    generated = render()
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    # a command whose package is missing here would be silently left out: the page must be complete
    for name in registered_commands():
        assert f"## `clipfuse {name}`" in generated, f"command {name} did not load; cannot check docs/cli.md"
    if generated != committed:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                                 "docs/cli.md (committed)", "generated"))[:40])
        pytest.fail("docs/cli.md is stale: regenerate it with "
                    "`python -m clipfuse.runtime.clidoc > docs/cli.md`\n" + diff)
