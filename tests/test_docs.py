"""What a new user reads: the method page every docstring cites, and the README's claims about the files, the
commands and the packages they need, checked against the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
METHOD = ROOT / "docs" / "method.md"

# "method.md", as a path ("docs/method.md"), a Markdown link ("[docs/method.md](docs/method.md)") or bare, and the
# section it names, if any
REFERENCE = re.compile(r"([\w./-]*method\.md)(?:\]\([^)]*\))?(?:\s+section\s+(\d+))?")
# Files whose reference another branch is rewording (this branch may not edit them): a bare "method.md" is allowed
# there until it says "docs/method.md"; the section must resolve either way.
PENDING = {"shortv_export/calibrate.py"}


def _references() -> list[tuple[str, str, str | None, str]]:
    """(file, path as written, section or None, the text after it) of every method.md reference in the repo."""
    files = [ROOT / "README.md"]
    for folder in ("shortv_export", "modeling", "scripts", "tests", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh") and p.is_file()]
    found = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("shortv_export/modeling/") or rel == "tests/test_docs.py":
            continue  # the symlink to modeling/ (read there), and this file's own patterns
        text = path.read_text()
        for m in REFERENCE.finditer(text):
            found.append((rel, m.group(1), m.group(2), " ".join(text[m.end() : m.end() + 80].split())))
    return found


def test_every_method_md_reference_names_docs_method_md_and_a_section_it_has():
    sections = set(re.findall(r"^## (\d+)\. ", METHOD.read_text(), re.M))
    assert sections == {"1", "2", "3", "4"}
    references = _references()
    assert len(references) >= 10  # the docstrings, tests, scripts and README that cite it
    for rel, path, section, after in references:
        assert section is None or section in sections, f"{rel}: {path} section {section} does not exist"
        if rel.startswith("modeling/"):  # copied to the Hub, where a bare path means nothing
            assert path == "docs/method.md" and after.startswith("in the shortv-export repository"), rel
        elif rel not in PENDING:
            assert path == "docs/method.md", f"{rel} cites {path!r}, a file users do not have"
