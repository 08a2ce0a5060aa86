"""MLflow: one run per stage execution, in the experiment named by the spec (default: the
character). Params, curves and artifacts go through ``MlflowClient`` (no global active run, so
nothing leaks between stages or into a user's own mlflow code in the same process)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from runner.tracking import settings as S
from runner.tracking.record import StageLog, TrackedRun, flatten
from runner.tracking.trackers import Tracker
from runner.tracking.uri import web_url

# A tracking server that stops answering must not hold a finished training for minutes: MLflow's
# HTTP client retries 7 times with exponential backoff by default. The run's link is printed by
# the runner's own progress output, not by MLflow into stdout. The user's values win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class MlflowTracker(Tracker):
    name = "mlflow"

    def _client(self):
        for k, v in _HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow.tracking import MlflowClient

        self.uri, self.artifact_root = S.mlflow_store(self.settings, self.workspace_dir)
        _probe(self.uri)
        return MlflowClient(tracking_uri=self.uri)

    def _experiment(self, client, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{self.artifact_root}/{_safe(name)}" if self.artifact_root else None
        return client.create_experiment(name, artifact_location=location)

    def log(self, log: StageLog) -> TrackedRun:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client()
        name = self.settings.get("experiment") or log.tags.get("runner.character") or "character-runner"
        exp_id = self._experiment(client, name)
        run = client.create_run(exp_id, run_name=log.name, tags=log.tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            flat = {_key(k): v[:6000] for k, v in flatten(log.params).items()}  # user names in keys
            params = [Param(k, v) for k, v in flat.items()]
            metrics = [Metric(_key(n), float(v), now, int(s)) for n, pts in log.series.items() for s, v in pts]
            metrics += [Metric(_key(n), float(v), now, 0) for n, v in log.metrics.items()]
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=params[i:i + 100])
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i:i + 1000])
            client.log_batch(run_id, tags=[RunTag("runner.kind", log.kind)])
            if self.settings.get("artifacts", True):
                _upload(client, run_id, log.artifacts)
        except BaseException:
            _terminate(client, run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        return TrackedRun("mlflow", run_id=run_id, url=web_url(self.uri, exp_id, run_id), uri=self.uri,
                          experiment=name, artifacts=bool(self.settings.get("artifacts", True)))

    def attach(self, run: TrackedRun, files: list[tuple[Path, str]]) -> None:
        from mlflow.tracking import MlflowClient

        for k, v in _HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        _probe(run.uri)
        _upload(MlflowClient(tracking_uri=run.uri), run.run_id, files)


def _upload(client, run_id: str, files: list[tuple[Path, str]]) -> None:
    for path, folder in files:
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=folder or None)
        elif Path(path).is_file():
            client.log_artifact(run_id, str(path), artifact_path=folder or None)


def _terminate(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001  (the server that failed the logging may refuse this too)
        pass


def _probe(uri: str) -> None:
    """Fail in seconds, with the address in the message, when a tracking server is not there."""
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):  # noqa: S310 (http(s) only)
            pass
    except urllib.error.HTTPError:
        return  # it answers (a proxy may not route /health): let the client try
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"the MLflow server at {uri} is not reachable ({reason})") from None


def _key(name: str) -> str:
    """MLflow metric names: letters, digits, _ - . space : / only."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)[:250]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"
