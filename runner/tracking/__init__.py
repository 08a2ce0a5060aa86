"""Experiment tracking: train and evaluate stages logged to MLflow and Weights & Biases.

Opt-in per spec (``tracking: {mlflow: true}``, see schemas/sections/tracking.schema.json). After a
train or evaluate stage succeeds, the engine calls the stage kind's ``track`` hook in the apply's
own process (also for stages that ran on Modal), which turns the stage's outputs into one
:class:`StageLog` and hands it to :func:`log_stage`; the returned :class:`TrackedRun` s are kept in
``.runner/state.db`` (``executions.tracking``) and shown by the report and ``runner runs``. Once
the report is rendered, :func:`attach` adds it to every run of the apply.

Tracking never fails a stage: a server that is down, a refused login or a full disk becomes a
warning on the run record, and the trained LoRA stays in the store. A tracking URI that cannot
work (unknown scheme, credentials inside it) is refused when the spec is validated.

Layout: ``uri`` (URI rules, no imports), ``settings`` (the spec section, defaults from the schema),
``record`` (StageLog, TrackedRun), ``trackers`` (the Tracker interface and log/attach),
``mlflow_tracker`` and ``wandb_tracker`` (their libraries are imported inside functions).
"""

from runner.tracking.record import StageLog, TrackedRun, flatten
from runner.tracking.trackers import attach, log_stage

__all__ = ["StageLog", "TrackedRun", "attach", "flatten", "log_stage"]
