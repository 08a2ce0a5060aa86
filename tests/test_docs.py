"""Docs that are generated must match what generates them."""

from pathlib import Path

from runner.spec.docgen import render

REPO = Path(__file__).resolve().parents[1]


def test_spec_reference_is_up_to_date():
    current = (REPO / "docs" / "spec-reference.md").read_text()
    assert current.strip() == render().strip(), (
        "docs/spec-reference.md is stale: run `python -m runner.spec.docgen > docs/spec-reference.md`"
    )
