"""Every section the code cites exists in the project's own reference docs.

Citation convention (CONTRIBUTING.md): a bare ``§N`` means a section of
``docs/reference.md``; ``related-methods.md §N`` means a section of
``docs/related-methods.md``, and so does a bare ``§M`` that directly continues
such a citation in a list (``related-methods.md §2.2, §2.3`` or ``§3.1-§3.2``).
A section exists when a Markdown heading of that file starts with its number.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = {"reference.md": os.path.join(ROOT, "docs", "reference.md"),
        "related-methods.md": os.path.join(ROOT, "docs", "related-methods.md")}
SCANNED = ("deml_jax", "configs", "experiments", "tests")
CITATION = re.compile(r"(?:([\w.-]+\.md)\s*)?§\s?(\d+(?:\.\d+)*)")
# What may separate two citations of one list: commas, dashes, 'and', 'or', ...
CONTINUES = re.compile(r"^(?:[\s,;/&\-\u2013]|and|or)*$")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)(?:[\s.]|$)")


def doc_sections(path):
    with open(path, encoding="utf-8") as f:
        return {m.group(1) for line in f if (m := HEADING.match(line))}


def citations(text):
    """(line number, doc file name, section) of every citation in ``text``."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        current, end = None, None
        for m in CITATION.finditer(line):
            name = m.group(1)
            if name is None:
                continued = end is not None and CONTINUES.match(line[end:m.start()])
                name = current if continued and current else "reference.md"
            current, end = name, m.end()
            out.append((lineno, name, m.group(2)))
    return out


def source_files():
    for top in SCANNED:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            for name in filenames:
                if name.endswith((".py", ".md")):
                    yield os.path.join(dirpath, name)
    yield os.path.join(ROOT, "CONTRIBUTING.md")


def test_docs_have_numbered_sections():
    ref = doc_sections(DOCS["reference.md"])
    assert {str(n) for n in range(15)} <= ref
    assert {"2.1", "3.3", "3.5", "4.1", "5.4", "9.1", "14.1", "14.3"} <= ref
    rel = doc_sections(DOCS["related-methods.md"])
    assert {"1.3", "1.5", "2.2", "2.2.4", "2.2.5", "2.6", "3.2", "4.2", "4.7"} <= rel


def test_citation_parser_hand_cases():
    text = ("see §4 step 9 and §14.1; related-methods.md §2.2, §2.6 and §1.3-§1.5.\n"
            "then §3.3 (related-methods.md §4.1) §5")
    assert citations(text) == [
        (1, "reference.md", "4"), (1, "reference.md", "14.1"),
        (1, "related-methods.md", "2.2"), (1, "related-methods.md", "2.6"),
        (1, "related-methods.md", "1.3"), (1, "related-methods.md", "1.5"),
        (2, "reference.md", "3.3"), (2, "related-methods.md", "4.1"),
        (2, "reference.md", "5")]


def all_citations():
    for path in source_files():
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(path, ROOT)
        for lineno, name, section in citations(text):
            yield rel, lineno, name, section


def test_every_cited_section_exists():
    sections = {name: doc_sections(path) for name, path in DOCS.items()}
    missing = []
    for rel, lineno, name, section in all_citations():
        if name in sections and section not in sections[name]:
            missing.append(f"{rel}:{lineno}: §{section} is not a section of docs/{name}"
                           + (" (a related-methods.md section? name the file)"
                              if name == "reference.md" and section in
                              sections["related-methods.md"] else ""))
    assert not missing, f"{len(missing)} dangling citations:\n" + "\n".join(missing)


def test_no_citation_of_documents_outside_the_repository():
    """``name.md §N`` must name docs/reference.md or docs/related-methods.md:
    design notes kept outside the repository cannot be followed by users."""
    outside = [f"{rel}:{lineno}: {name} §{section}" for rel, lineno, name, section
               in all_citations() if name not in DOCS]
    assert not outside, ("citations of documents that are not in docs/ (cite "
                         "docs/reference.md or docs/related-methods.md, or drop them):\n"
                         + "\n".join(outside))


@pytest.mark.parametrize("doc", ["CONTRIBUTING.md", "README.md"])
def test_docs_point_inside_the_repository(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    assert "docs/reference.md" in text, f"{doc} must point to docs/reference.md"
    for outside in ("deml-reference.md", "shared/design"):
        assert outside not in text, f"{doc} points outside the repository: {outside!r}"
