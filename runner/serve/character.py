"""What `runner serve` loads for a character: the base model and the LoRA to put on it.

``generate.checkpoint`` decides:

- ``best`` (default): the best LoRA the evaluate stage chose (its ``best/`` copy and LoRA scale),
  or the checkpoint a reviewer picked in ``runner review`` (``<spec>.review.yaml``) when its LoRA
  file is still in the train output; when there is no evaluation yet, the last checkpoint of the
  train stage, with a warning;
- ``last``: the final checkpoint of the train stage (the base variant when there are variants);
- a path: that LoRA file (``.safetensors``, diffusers or kohya format), project-relative.

Everything is read from the workspace (``.runner``) of the spec's project: run ``runner apply``
first. A manifest of the choice (:meth:`ServeTarget.as_json`) is also what `runner deploy` ships
to Modal, with the files it names uploaded to the volume.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.core.errors import StageError


@dataclass
class ServeTarget:
    character: str
    trigger: str
    class_word: str
    base_model: str
    family: str
    lora_file: str | None  # absolute path (or None: the base model alone)
    lora_source: str  # what was chosen and why, shown by /v1/info and the CLI
    lora_scale: float
    resolution: int
    steps: int = 30
    guidance: float = 7.0
    tiny_random: bool = False
    project_root: str = ""
    api: dict[str, Any] = field(default_factory=dict)
    video: dict[str, Any] | None = None
    hardware: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServeTarget":
        return cls(**data)


def current_outputs(ws: Any, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """(stage id, outputs) of every promoted stage whose id starts with ``prefix``."""
    rows = ws.db.execute("SELECT stage_id, key FROM stage_current WHERE stage_id LIKE ? ORDER BY stage_id",
                         (prefix.replace("%", r"\%") + "%",)).fetchall()
    out = []
    for stage_id, key in rows:
        if ws.store_has(key):
            out.append((stage_id, ws.load_outputs(key)))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"cannot read {path}: {exc}", hint="Re-run `runner apply` for this character.") from None


def _last_checkpoint(ws: Any, character: str) -> tuple[Path, dict[str, Any], str] | None:
    trains = current_outputs(ws, f"{character}:train")
    if not trains:
        return None
    # the base variant first ([base] or no variant), else the first variant by name
    trains.sort(key=lambda t: (t[0] not in (f"{character}:train", f"{character}:train[base]"), t[0]))
    stage_id, outs = trains[0]
    if "lora" not in outs:
        return None
    root = Path(outs["lora"].path)
    index = _read_json(root / "index.json")
    ck = index["checkpoints"][int(index.get("final", -1))]
    return root / ck["diffusers"], index, f"last checkpoint of {stage_id} (step {ck.get('step')})"


def _reviewer_pick(spec: Any, ws: Any, evaluate_id: str, warnings: list[str]) -> tuple[Path, float, str] | None:
    """The checkpoint a reviewer picked for ``evaluate_id`` in `runner review` (it replaces
    evaluation's best), as (LoRA file, scale, source); None when there is no pick or it is gone."""
    from runner.review import decisions
    from runner.stages.storyboard import picked_checkpoint

    try:
        pick = decisions.for_spec(spec.file)["checkpoints"].get(evaluate_id)
    except decisions.ReviewError as exc:
        raise StageError(str(exc)) from None
    if not pick or pick.get("step") is None:
        return None
    train_id = evaluate_id.replace(":evaluate", ":train", 1)
    outs = dict(current_outputs(ws, train_id)).get(train_id, {})
    got = picked_checkpoint(pick, outs["lora"], None) if "lora" in outs else None
    if got is None:
        warnings.append(f"the checkpoint a reviewer picked (step {pick['step']} of {evaluate_id}) is no longer in "
                        "the train output: serving evaluation's best")
        return None
    return (Path(got["file"]), float(got["scale"]),
            f"reviewer's pick for {evaluate_id}: step {got['step']} at LoRA scale {got['scale']:g}")


def best_evaluation(ws: Any, character: str) -> tuple[str, dict[str, Any], float | None, dict[str, Any]] | None:
    """(stage id, outputs, score, evaluation.json) of the character's evaluate stage whose best
    cell scores highest (one per train variant), or None when nothing was evaluated yet."""
    best = None
    for sid, outs in (current_outputs(ws, f"{character}:evaluate") if ws.exists() else []):
        if "evaluation" not in outs:
            continue
        ev = _read_json(Path(outs["evaluation"].path) / "evaluation.json")
        score = (ev.get("best") or {}).get("score")
        if best is None or (score is not None and (best[2] is None or score > best[2])):
            best = (sid, outs, score, ev)
    return best


@dataclass
class _Choice:
    """The LoRA chosen and the generation settings that come with it (the spec's train section's
    until the evaluation or the train output says otherwise)."""

    base_model: str
    family: str
    resolution: int
    lora: Path | None = None
    scale: float = 1.0
    source: str = ""
    steps: int = 30
    guidance: float = 7.0

    def use_train_index(self, index: dict[str, Any]) -> None:
        self.base_model = index.get("base_model") or self.base_model
        self.family = index.get("model_family") or self.family
        self.resolution = int(index.get("resolution") or self.resolution)


def resolve_target(spec: Any, *, checkpoint: str | None = None) -> ServeTarget:
    """The model and LoRA to serve for ``spec`` (a loaded runner.spec Spec)."""
    from runner.engine.workspace import Workspace

    data = spec.data
    gen = data.get("generate") or {}
    train = data.get("train") or {}
    choice = checkpoint or gen.get("checkpoint") or "best"
    root = Path(spec.project_root)
    warnings: list[str] = []
    c = _Choice(train.get("base_model", "builtin:tiny-sd"), train.get("model_family", "auto"),
                int(train.get("resolution", 512)))
    ws = Workspace(root)
    try:
        if choice == "best":
            _use_best(spec, ws, c, warnings)
        elif choice == "last":
            if not _use_last(spec, ws, c):
                raise StageError(f"{spec.file}: no train stage output for {spec.name} (generate.checkpoint: last)",
                                 hint="Run `runner apply` first.")
        else:
            _use_file(spec, choice, root, c)
    finally:
        ws.close()
    if c.lora is not None and not c.lora.is_file():
        raise StageError(f"the LoRA file {c.lora} is missing from the workspace store",
                         hint="Re-run `runner apply` for this character.")
    if gen.get("lora_scale") is not None:
        c.scale = float(gen["lora_scale"])
    base_model = c.base_model
    bm = Path(str(base_model)).expanduser()
    if not str(base_model).startswith("builtin:") and not bm.is_absolute() and (root / bm).exists():
        base_model = str(root / bm)
    character = data["character"]
    return ServeTarget(
        character=spec.name, trigger=character["trigger"], class_word=character.get("class_word", "person"),
        base_model=str(base_model), family=c.family, lora_file=str(c.lora) if c.lora else None,
        lora_source=c.source, lora_scale=c.scale, resolution=c.resolution, steps=c.steps, guidance=c.guidance,
        tiny_random=str(base_model).startswith("builtin:"), project_root=str(root),
        api=dict(gen.get("api") or {}), video=dict(gen["video"]) if isinstance(gen.get("video"), dict) else None,
        hardware=dict(data.get("hardware") or {}), warnings=warnings,
    )


def _use_best(spec: Any, ws: Any, c: _Choice, warnings: list[str]) -> None:
    """``best``: evaluation's best cell (or the reviewer's pick); the last checkpoint, with a
    warning, when nothing was evaluated yet."""
    best = best_evaluation(ws, spec.name)
    if best is None:
        if not _use_last(spec, ws, c):
            raise StageError(
                f"{spec.file}: no trained LoRA for {spec.name} in {ws.dir} (generate.checkpoint: best)",
                hint="Run `runner apply` first (train and evaluate), or set generate.checkpoint to a LoRA file.")
        warnings.append("no evaluation found: serving the last train checkpoint instead of the best one")
        return
    sid, outs, score, ev = best
    b, g = ev["best"], ev.get("generation") or {}
    c.lora = Path(outs["evaluation"].path) / b["lora_diffusers"]
    c.scale = float(b.get("lora_scale", 1.0))
    c.base_model = ev.get("base_model") or c.base_model
    c.family = ev.get("model_family") or c.family
    c.steps = int(g.get("steps", c.steps))
    c.guidance = float(g.get("guidance", c.guidance))
    c.resolution = int(g.get("resolution") or c.resolution)
    c.source = (f"best of {sid}: step {b.get('step')} at LoRA scale {c.scale:g}"
                + (f" (score {score:.3f})" if isinstance(score, (int, float)) else ""))
    picked = _reviewer_pick(spec, ws, sid, warnings)
    if picked is not None:
        c.lora, c.scale, c.source = picked


def _use_last(spec: Any, ws: Any, c: _Choice) -> bool:
    """The final checkpoint of the train stage; False when there is none."""
    last = _last_checkpoint(ws, spec.name) if ws.exists() else None
    if last is None:
        return False
    c.lora, index, c.source = last
    c.use_train_index(index)
    return True


def _use_file(spec: Any, choice: str, root: Path, c: _Choice) -> None:
    p = Path(choice).expanduser()
    c.lora = p if p.is_absolute() else root / p
    if not c.lora.is_file():
        raise StageError(f"{spec.file}: generate.checkpoint {choice!r} is not a file ({c.lora})",
                         hint="Give 'best', 'last' or the path of a LoRA .safetensors file.")
    c.source = f"generate.checkpoint {choice}"
