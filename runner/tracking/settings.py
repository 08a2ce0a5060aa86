"""The ``tracking`` section as the trackers use it, and where each tracker writes by default.

The spec section (schemas/sections/tracking.schema.json) holds the defaults; the train and
evaluate stages put the enabled part of it into their node config (unkeyed: tracking never
changes a cache key). Environment variables the libraries know are honoured: MLFLOW_TRACKING_URI
when the spec names no URI; WANDB_API_KEY (online, else offline), WANDB_MODE, WANDB_DIR,
WANDB_PROJECT, WANDB_ENTITY.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runner.core.errors import UserError
from runner.tracking.uri import resolve_relative, tracking_uri_problem

BACKENDS = ("mlflow", "wandb")


class TrackingError(UserError):
    """A tracking setting that cannot work (raised at plan time): a spec problem, exit 2."""

    exit_code = 2


def for_node(section: dict[str, Any], spec_dir: Path) -> dict[str, Any] | None:
    """The enabled trackers of a ``tracking`` section whose shorthand values (``mlflow: true``)
    are already expanded to mappings; None when none is enabled. A relative sqlite:/file: URI is
    made absolute against the spec's folder; $MLFLOW_TRACKING_URI is checked when it is used."""
    enabled = {n: dict(v) for n in BACKENDS if isinstance(v := section.get(n), dict) and v.get("enabled", True)}
    if not enabled:
        return None
    ml = enabled.get("mlflow")
    if ml is not None:
        if ml.get("tracking_uri"):
            ml["tracking_uri"] = resolve_relative(ml["tracking_uri"], spec_dir)
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            env = os.environ["MLFLOW_TRACKING_URI"]
            problem = tracking_uri_problem(env)
            if problem:
                raise TrackingError(f"tracking.mlflow: $MLFLOW_TRACKING_URI={env!r} cannot be used: {problem}",
                                    hint="Fix or unset MLFLOW_TRACKING_URI, or set tracking.mlflow.tracking_uri.")
    return {**enabled, "tags": dict(section.get("tags") or {})}


def mlflow_store(settings: dict[str, Any], workspace_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the store's own): the
    spec's URI, else $MLFLOW_TRACKING_URI, else a SQLite store in the workspace
    (.runner/mlflow.db) with artifacts in .runner/mlartifacts/."""
    uri = settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    return f"sqlite:///{workspace_dir / 'mlflow.db'}", (workspace_dir / "mlartifacts").as_uri()


def wandb_mode(settings: dict[str, Any]) -> str:
    """online or offline: ``mode`` from the spec; auto is $WANDB_MODE when set, else online with
    a WANDB_API_KEY and offline without one (nothing leaves the machine then)."""
    mode = settings.get("mode", "auto")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "")
        if env in ("online", "offline"):
            return env
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def wandb_dir(workspace_dir: Path) -> Path:
    """$WANDB_DIR, else .runner/ in the workspace (wandb adds its own wandb/ folder)."""
    return Path(os.environ.get("WANDB_DIR") or workspace_dir)
