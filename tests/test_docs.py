"""The docs say what the commands do now: a page per command whose option table is the command's
own help, links that lead somewhere, a README a newcomer reads in minutes, and no history in them."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = runpy.run_path(str(ROOT / "docs" / "make_options.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_command_has_a_page_with_its_current_options():
    for name, cmd in TOOL["commands"]().items():
        page = ROOT / "docs" / "commands" / f"{name}.md"
        assert page.is_file(), f"{page} missing"
        assert TOOL["rendered"](page, cmd) == page.read_text(), \
            f"{page}: option table out of date (run python docs/make_options.py)"
        for p in cmd.params:
            if p.name != "help" and p.param_type_name == "option":
                assert f"`{p.opts[0]}`" in page.read_text()


def test_the_options_table_is_built_from_the_help():
    cmd = TOOL["commands"]()["generate"]
    table = TOOL["options_table"](cmd)
    assert "| `-n`, `--count` | required | How many images. |" in table
    assert "| `--sampling-steps` | `50` |" in table and "| `--preview`, `--no-preview` | `--no-preview` |" in table


def test_readme_is_short_and_links_every_command_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for name in TOOL["commands"]():
        assert f"(docs/commands/{name}.md)" in text, f"README does not link docs/commands/{name}.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_lead_somewhere(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{doc.name}: link to {target}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_now(doc):
    text = doc.read_text()
    for pattern in (r"\bsessions?\b", r"\bissue #?\d+", r"\bearlier session", r"until session"):
        assert not re.search(pattern, text, re.I), f"{doc.name}: '{pattern}' (history belongs in CHANGELOG.md)"
