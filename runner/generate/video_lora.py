"""Which video LoRA file a stage generates with, when it comes from train_video.

``generate.video.lora`` (and evaluate_video's checkpoints) name a train_video checkpoint as
``best`` (evaluate_video's pick: its ``best`` output, best.json + the LoRA file of each expert) or
``step-<N>`` (that checkpoint of train_video's ``lora`` output, index.json). This module reads
those outputs, and tells at plan time which steps a train_video node will keep (every
``checkpoints.every_steps`` steps and each phase's end, the last ``keep_last`` of them, as
:mod:`runner.diffusion.trainer` checkpoints), so a step that will not exist is refused before
anything runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from runner.core.errors import StageError

STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class ChosenLora:
    """A video LoRA to load: its main (diffusers) file, every expert's file ({component: file}, Wan
    2.2 A14B: transformer and transformer_2; None: the file alone), scale and origin."""

    main: Path
    experts: dict[str, Path] | None
    scale: float
    step: int | None
    source: str  # what chose it: "evaluate_video <stage id>", "train_video step N", or the path

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.main), "experts": {k: str(v) for k, v in (self.experts or {}).items()},
                "scale": self.scale, "step": self.step, "source": self.source}


def checkpoint_files(lora_root: Path, entry: dict[str, Any]) -> tuple[Path, dict[str, Path]]:
    """(main file, {component: file}) of a train_video checkpoint entry of index.json."""
    main = lora_root / entry["diffusers"]
    experts = {c: lora_root / f for c, f in (entry.get("experts") or {}).items()} or {"transformer": main}
    return main, experts


def step_of(value: str | None) -> int | None:
    """N of ``step-N``, else None."""
    m = STEP.match(str(value or ""))
    return int(m.group(1)) if m else None


def kept_steps(phase_ends: Sequence[int], every: int, keep_last: int) -> list[int]:
    """The checkpoint steps a trainer keeps: every ``every`` steps and each phase's end, the last
    ``keep_last`` of them."""
    total = max(phase_ends)
    steps = sorted(set(range(every, total + 1, every)) | set(phase_ends)) if every > 0 else sorted(set(phase_ends))
    return steps[-keep_last:] if keep_last > 0 else steps


def planned_steps(train_config: dict[str, Any]) -> list[int] | None:
    """The steps a train_video node (its node config) will keep; None while only its data tells
    (checkpoints.every_epochs, or a phase in epochs)."""
    from runner.diffusion.trainer import phases_of
    from runner.diffusion.video_trainer import VideoTrainerConfig

    cfg = VideoTrainerConfig.from_dict(train_config)
    ends = [p.end for p in phases_of(cfg, None)]
    if cfg.checkpoints.every_epochs or any(e is None for e in ends):
        return None
    return kept_steps(ends, int(cfg.checkpoints.every_steps), int(cfg.checkpoints.keep_last))


def from_best(folder: Path, scale: float | None = None) -> ChosenLora:
    """evaluate_video's ``best`` output: best.json's checkpoint at its scale (``scale`` overrides)."""
    try:
        best = json.loads((folder / "best.json").read_text(encoding="utf-8"))
        main = folder / best["file"]
        experts = {c: folder / name for c, name in best["experts"].items()}
    except (OSError, ValueError, KeyError) as exc:
        raise StageError(f"cannot read evaluate_video's choice {folder}/best.json: {exc}",
                         hint="Re-run evaluate_video (runner apply --force evaluate_video).") from None
    return ChosenLora(main, experts, float(best["lora_scale"] if scale is None else scale), int(best["step"]),
                      f"evaluate_video {best.get('stage_id', '')}".strip())


def from_step(lora_root: Path, step: int, scale: float) -> ChosenLora:
    """Checkpoint ``step`` of train_video's ``lora`` output (index.json)."""
    try:
        index = json.loads((lora_root / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read train_video's LoRA index {lora_root}/index.json: {exc}",
                         hint="Re-run train_video.") from None
    have = [int(ck["step"]) for ck in index.get("checkpoints", [])]
    ck = next((c for c in index.get("checkpoints", []) if int(c["step"]) == step), None)
    if ck is None:
        raise StageError(f"generate.video.lora: step-{step} is not a checkpoint of {lora_root}/index.json",
                         hint=f"Its checkpoints: {', '.join(f'step-{s}' for s in have) or 'none'}.")
    main, experts = checkpoint_files(lora_root, ck)
    return ChosenLora(main, experts, float(scale), step, f"train_video step {step}")
