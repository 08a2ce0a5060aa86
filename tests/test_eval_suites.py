"""Prompt suites: the built-in suite, files, inline suites, placeholders, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.eval import suites as S
from runner.core.errors import StageError

FIVE = ["close_up", "medium", "full_body", "multi_character", "complex_background"]


def test_builtin_suite_has_ten_prompts_in_each_of_five_categories() -> None:
    suite = S.load_suite("builtin")
    assert list(suite.categories) == FIVE
    for name, cat in suite.categories.items():
        assert len(cat.prompts) == 10, name
        assert len(set(cat.prompts)) == 10, name
        assert all("{trigger}" in p and "{class}" in p for p in cat.prompts), name
        assert cat.negative
    rendered = S.render_suite(suite, trigger="vlntna", class_word="woman")
    assert len(rendered.prompts) == 50
    assert all("vlntna woman" in p.prompt and "{" not in p.prompt for p in rendered.prompts)
    assert rendered.prompts[0].key == "close_up/00"


def test_filters_and_negatives() -> None:
    suite = S.load_suite({"categories": {
        "a": {"prompts": ["{trigger} x", "{trigger} y", "{trigger} z"], "negative": "blurry"},
        "b": {"prompts": ["{class} only"]},
    }})
    assert suite.source == "inline"
    r = S.render_suite(suite, trigger="tok", class_word="3d cartoon boy", categories=["b", "a"],
                       prompts_per_category=2, default_negative="ugly")
    assert [(p.category, p.index) for p in r.prompts] == [("a", 0), ("a", 1), ("b", 0)]  # suite order
    assert r.prompts[0].negative == "blurry" and r.prompts[2].negative == "ugly"
    assert r.prompts[2].prompt == "3d cartoon boy only"
    with pytest.raises(StageError, match="wide not in suite") as exc:
        S.render_suite(suite, trigger="t", class_word="c", categories=["wide"])
    assert "a, b" in exc.value.hint


def test_suite_file_relative_to_project(tmp_path: Path) -> None:
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "mine.yaml").write_text(
        "categories:\n  occluded:\n    prompts: ['{trigger} {class} behind a fence']\n")
    suite = S.load_suite("suites/mine.yaml", project_root=tmp_path)
    assert suite.categories["occluded"].prompts == ["{trigger} {class} behind a fence"]


@pytest.mark.parametrize("text, match", [
    ("categories: {a: {prompts: ['{name} x']}}", r"unknown placeholder \{name\}"),
    ("categories: {a: {prompts: []}}", "non-empty list"),
    ("categories: {a: {prompt: ['x']}}", "unknown key"),
    ("prompts: ['x']", "unknown key"),
    ("categories: [1, 2]", "at least one category"),
    ("categories: {a: {prompts: ['x']}\n  bad: [", "not valid YAML"),
])
def test_bad_suite_files_name_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(StageError, match=match) as exc:
        S.load_suite(str(f))
    assert str(f) in str(exc.value)


def test_unknown_suite_name_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="neither a built-in suite") as exc:
        S.load_suite("fancy", project_root=tmp_path)
    assert "builtin" in exc.value.hint
