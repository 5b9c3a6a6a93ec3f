"""Citations resolve: every `docs/reference.md#slug` names a heading of docs/reference.md, every
code path that file lists imports, every test it lists exists, and no citation of the old
out-of-tree facts sheet remains."""

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
OLD_CITATION = "REFERENCE" + " §"  # split so this file does not match itself
CITATION = re.compile(r"reference\.md#([\w-]+)")
LOCAL_LINK = re.compile(r"\]\(#([\w-]+)\)")
CODE_PATH = re.compile(r"`(dcdit_cli(?:\.\w+)+)`")
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: rendered text, lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_slugs(markdown: str) -> set[str]:
    slugs, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.+)", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def tracked_text_files() -> dict[str, str]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # pragma: no cover
        pytest.skip("not a git checkout")
    texts = {}
    for name in names.decode().split("\0"):
        path = ROOT / name
        if not name or name == "tests/test_citations.py" or not path.is_file():
            continue
        raw = path.read_bytes()
        if b"\0" in raw:
            continue  # binary (figures)
        try:
            texts[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
    texts.setdefault("docs/reference.md", REFERENCE.read_text(encoding="utf-8"))
    return texts


def broken_citations(texts: dict[str, str], slugs: set[str]) -> list[str]:
    problems = []
    for name, text in texts.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            if OLD_CITATION in line:
                problems.append(f"{name}:{lineno}: cites the old facts sheet: {line.strip()}")
            for slug in CITATION.findall(line):
                if slug not in slugs:
                    problems.append(f"{name}:{lineno}: no heading for reference.md#{slug}")
            if name == "docs/reference.md":
                problems += [f"{name}:{lineno}: no heading for #{s}" for s in LOCAL_LINK.findall(line) if s not in slugs]
    return problems


def resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_github_slug_rules():
    assert github_slug("Ratio loss (paper Eq. 6)") == "ratio-loss-paper-eq-6"
    assert github_slug("Composition with DC-DiT") == "composition-with-dc-dit"
    assert github_slug("Paper: `training` and results") == "paper-training-and-results"
    assert heading_slugs("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_check_catches_bad_citations():
    texts = {"x.py": f"# fine: docs/reference.md#ratio-loss\n# {OLD_CITATION}1.5\n# docs/reference.md#nowhere\n"}
    problems = broken_citations(texts, {"ratio-loss"})
    assert len(problems) == 2 and "x.py:2" in problems[0] and "x.py:3" in problems[1]


def test_every_citation_names_a_heading_and_no_old_citation_remains():
    texts = tracked_text_files()
    slugs = heading_slugs(texts["docs/reference.md"])
    assert len(slugs) > 50
    problems = broken_citations(texts, slugs)
    assert not problems, "\n".join(problems)
    cited = {s for text in texts.values() for s in CITATION.findall(text)}
    assert len(cited) > 20  # the code and docs really cite it


def test_every_code_path_in_the_reference_imports():
    paths = sorted(set(CODE_PATH.findall(REFERENCE.read_text(encoding="utf-8"))))
    assert len(paths) > 50
    missing = []
    for dotted in paths:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as err:
            missing.append(f"{dotted}: {err}")
    assert not missing, "\n".join(missing)


def test_every_test_in_the_reference_exists():
    ids = sorted(set(TEST_ID.findall(REFERENCE.read_text(encoding="utf-8"))))
    assert len(ids) > 50
    missing = []
    for file, name in ids:
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^def {name}\(", path.read_text(encoding="utf-8"), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, "\n".join(missing)
