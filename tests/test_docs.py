"""The docs say what the code does: commands, options, links."""

from __future__ import annotations

import dataclasses
import os
import re

from ger_inductor import GerOptions
from ger_inductor.options import PASS_FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_readme_test_command_is_what_ci_runs():
    ci = [line for line in _read(".ci", "run").splitlines() if "pytest" in line]
    assert len(ci) == 1
    assert ci[0].strip() in _read("README.md"), ci[0]


def test_readme_options_table_lists_every_option():
    readme = _read("README.md")
    for f in dataclasses.fields(GerOptions):
        assert f"| `{f.name}` |" in readme, f.name
    for fam in PASS_FAMILIES:
        assert fam in readme


def test_doc_links_resolve():
    for doc in ["README.md"] + [os.path.join("docs", d) for d in os.listdir(os.path.join(ROOT, "docs")) if d.endswith(".md")]:
        text = _read(doc)
        for link in re.findall(r"\]\(([^)#]+\.md)\)", text):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), link))
            assert os.path.exists(path), (doc, link)
