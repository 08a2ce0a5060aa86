"""One error base: every expected failure in runner/ is a runner.core.errors.UserError, and the CLI
reports any of them the same way (message, hint, the class's exit code, no traceback)."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from runner.core.errors import StageError, UserError

RUNNER = Path(__file__).resolve().parents[1] / "runner"

# Exceptions that never reach a user as such, with the reason.
INTERNAL = {
    "runner.stages.ingest._Reject": "a rejected photo: recorded in ingest's rejects list, never raised out",
    "runner.serve.engine.ContentFiltered": "the API answers it as 400 content_filtered",
    "runner.serve.batcher.QueueFull": "the API answers it as 429 queue_full",
    "runner.backends.remote.RemoteCallError": "the remote call itself broke: recorded with its traceback",
}

# The exit status each kind of failure has promised (runner/cli.py's docstring, docs, scripts).
EXIT_CODES = {
    "runner.spec.errors.SpecError": 2,
    "runner.spec.yamlio.YamlError": 2,
    "runner.serve.ServeError": 2,
    "runner.review.decisions.ReviewError": 2,
    "runner.publish.PublishError": 2,
    "runner.publish.release.NothingToPublish": 2,
    "runner.publish.VersionExists": 4,
    "runner.publish.store.StoreError": 1,
    "runner.publish.store.BadDestination": 2,
    "runner.tracking.settings.TrackingError": 2,
    "runner.engine.request.ApplyError": 2,
    "runner.plan.graph.GraphError": 2,
    "runner.engine.lock.LockHeld": 3,
    "runner.backends.modal_backend.ModalUnavailable": 2,
    "runner.cli.BadRequest": 2,
    "runner.hub.ModelUnavailable": 1,
    "runner.core.errors.StageError": 1,
}


@functools.lru_cache(maxsize=1)
def _exception_classes() -> tuple[type, ...]:
    """Every class defined in runner/ that derives from Exception (found in the source, so a new
    module is covered without being listed)."""
    found = []
    for path in sorted(RUNNER.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.bases]
        if not names:
            continue
        parts = path.relative_to(RUNNER.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        found += [c for n in names if inspect.isclass(c := getattr(module, n)) and issubclass(c, BaseException)]
    return tuple(found)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_every_expected_failure_is_a_user_error():
    classes = _exception_classes()
    names = {_name(c) for c in classes}
    assert set(EXIT_CODES) - {"runner.core.errors.StageError"} <= names, "a listed class moved or was renamed"
    assert set(INTERNAL) <= names, "an internal exception moved or was renamed: update INTERNAL"
    stray = [n for c in classes if not issubclass(c, UserError) and (n := _name(c)) not in INTERNAL]
    assert not stray, f"expected failures must derive from runner.core.errors.UserError: {stray}"


def test_no_user_error_keeps_its_own_message_and_hint():
    """(message, hint) live in UserError alone: a subclass that sets them itself is a second copy."""
    copies = []
    for cls in _exception_classes():
        init = cls.__dict__.get("__init__")
        if init is None or cls is UserError or not issubclass(cls, UserError):
            continue
        src = inspect.getsource(init)
        if "self.hint =" in src or "self.message =" in src:
            copies.append(_name(cls))
    assert not copies


@pytest.mark.parametrize("name,code", sorted(EXIT_CODES.items()))
def test_exit_codes_are_kept(name, code):
    module, _, cls = name.rpartition(".")
    assert getattr(importlib.import_module(module), cls).exit_code == code


def _group_raising(exc: BaseException) -> click.Group:
    from runner.cli import _Commands

    group = _Commands(name="runner")

    @group.command()
    def boom() -> None:
        raise exc

    return group


def _errors() -> list[UserError]:
    from runner.engine.lock import LockHeld
    from runner.publish import VersionExists
    from runner.publish.store import StoreError
    from runner.spec.errors import Problem, SpecError
    from runner.spec.yamlio import Mark, YamlError

    return [
        UserError("plain"), UserError("with a hint", hint="do this"), StageError("a stage", hint="fix it"),
        SpecError([Problem("s.yaml", 3, 1, "train.lr", "is 'x', which is not number", hint="a number")]),
        YamlError("a tab in the indentation", Mark("s.yaml", 4, 2), "use spaces"),
        VersionExists("hero v1 is published with other content"), StoreError("bucket not found"),
        LockHeld({"pid": 12, "host": "h", "command": "runner apply"}, Path("/p/.runner/lock")),
    ]


@pytest.mark.parametrize("exc", _errors(), ids=lambda e: type(e).__name__ + ("+hint" if e.hint else ""))
def test_the_cli_prints_message_and_hint_and_exits_with_the_code(exc):
    result = CliRunner().invoke(_group_raising(exc), ["boom"], catch_exceptions=False)
    assert result.exit_code == exc.exit_code
    out = result.output
    assert "Traceback" not in out and out.strip() == exc.render()
    assert str(exc) in out and (not exc.hint or f"hint: {exc.hint}" in out)
    with pytest.raises(SystemExit) as ended:  # the way `runner` itself calls the group
        _group_raising(exc).main(["boom"], prog_name="runner", standalone_mode=False)
    assert ended.value.code == exc.exit_code


def test_a_bug_is_not_swallowed():
    with pytest.raises(ZeroDivisionError):
        CliRunner().invoke(_group_raising(ZeroDivisionError("bug")), ["boom"], catch_exceptions=False)
