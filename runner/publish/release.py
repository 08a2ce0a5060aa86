"""What a published version holds, gathered from the workspace: the chosen LoRA, its metadata,
the latest report and the manifest that names them.

The checkpoint is chosen by the same rule `runner serve` uses (:func:`runner.serve.character.
resolve_target`): ``best`` is the evaluate stage's best cell, or the checkpoint a reviewer picked
in ``<spec>.review.yaml``; ``last`` the final train checkpoint; anything else a LoRA file. Unlike
serve, ``best`` never falls back to the last checkpoint: an unevaluated LoRA is not released
unless asked for by name.

The LoRA file is matched by content to the train stage's checkpoints, which tells its step, its
kohya twin and, from the evaluation grid, the metrics of that step at that LoRA scale.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core.errors import UserError
from runner.core.hashing import file_sha256

MANIFEST_FORMAT = 1
# Manifest fields that say when and with what a version was made, not what it is: they are left
# out of the content digest, so re-publishing the same artifacts later is recognised as a no-op.
PROVENANCE = ("created", "runner_version", "git", "content_digest")


class NothingToPublish(UserError):
    """There is no run (or no chosen checkpoint) to publish; the message says what to run (exit 2)."""

    exit_code = 2


@dataclass
class ReleaseFile:
    path: str  # name inside the version (lora/pytorch_lora_weights.safetensors)
    role: str  # lora | lora_kohya | metadata | evaluation | report | spec
    local: Path | None = None  # the file on disk, or None for ``data``
    data: bytes | None = None
    sha256: str = ""
    size: int = 0

    def __post_init__(self) -> None:
        if self.data is not None:
            self.sha256, self.size = hashlib.sha256(self.data).hexdigest(), len(self.data)
        elif self.local is not None:
            self.sha256, self.size = file_sha256(self.local), self.local.stat().st_size


@dataclass
class Release:
    character: str
    tag: str
    files: list[ReleaseFile]
    manifest: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its provenance fields: equal digests, equal versions."""
    return "sha256:" + hashlib.sha256(canonical({k: v for k, v in manifest.items() if k not in PROVENANCE})).hexdigest()


def spec_digest(spec: Any) -> str:
    """sha256 of the resolved spec's values that change an output (prices, backends and these
    publish settings are left out: editing them builds nothing new)."""
    from runner.spec.schema import without_effect_free

    return "sha256:" + hashlib.sha256(canonical(without_effect_free(spec.data))).hexdigest()


def git_state(folder: Path) -> dict[str, Any] | None:
    """{commit, dirty} of the git repository holding ``folder``, or None outside one."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": bool(status and status.strip())}


# --------------------------------------------------------------------------- the checkpoint


def _train_checkpoint(ws: Any, character: str, lora: Path) -> tuple[str, dict, dict, Path] | None:
    """(train stage id, index.json, checkpoint entry, train folder) of the checkpoint whose LoRA
    file has the content of ``lora``, or None (a file from elsewhere)."""
    from runner.serve.character import current_outputs

    size, sha = lora.stat().st_size, None
    for sid, outs in current_outputs(ws, f"{character}:train"):
        if "lora" not in outs:
            continue
        root = Path(outs["lora"].path)
        try:
            index = json.loads((root / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for ck in index.get("checkpoints", []):
            f = root / ck.get("diffusers", "")
            if f.is_file() and f.stat().st_size == size:
                sha = sha or file_sha256(lora)
                if file_sha256(f) == sha:
                    return sid, index, ck, root
    return None


def _cell_metrics(evaluation: dict[str, Any] | None, step: Any, scale: float) -> tuple[dict[str, Any], str | None]:
    """Metrics of the evaluation cell at (step, scale): its overall figures and score."""
    for c in (evaluation or {}).get("cells", []):
        if c.get("step") == step and abs(float(c.get("lora_scale", -1)) - scale) < 1e-9:
            figures = {k: v for k, v in (c.get("overall") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if c.get("score") is not None:
                figures["score"] = c["score"]
            for k in ("targets_passed", "targets_total"):
                if c.get(k) is not None:
                    figures[k] = c[k]
            return figures, c.get("cell")
    return {}, None


def _evaluation_for(ws: Any, character: str, train_id: str | None) -> tuple[str, dict[str, Any], Path] | None:
    """The evaluate stage of ``train_id`` (same variant): (stage id, evaluation.json, its file)."""
    from runner.serve.character import current_outputs

    if train_id is None:
        return None
    eval_id = train_id.replace(":train", ":evaluate", 1)
    for sid, outs in current_outputs(ws, eval_id):
        if sid == eval_id and "evaluation" in outs:
            f = Path(outs["evaluation"].path) / "evaluation.json"
            try:
                return sid, json.loads(f.read_text(encoding="utf-8")), f
            except (OSError, ValueError):
                return None
    return None


def choose(spec: Any, checkpoint: str | None) -> tuple[Any, dict[str, Any], list[ReleaseFile]]:
    """(serve target, checkpoint description, LoRA and evaluation files) for ``checkpoint``."""
    from runner.engine.workspace import Workspace
    from runner.serve.character import best_evaluation, resolve_target

    choice = checkpoint or "best"
    ws = Workspace(Path(spec.project_root))
    try:
        if not ws.exists():
            raise NothingToPublish(f"nothing to publish for {spec.name}: {ws.dir} does not exist yet; "
                                   f"run `runner apply {spec.file}` first (train and evaluate)")
        if choice == "best" and best_evaluation(ws, spec.name) is None:
            raise NothingToPublish(
                f"nothing to publish for {spec.name}: no evaluation in {ws.dir}, so there is no best checkpoint; "
                f"run `runner apply {spec.file}` (train and evaluate), or pass --checkpoint last or a LoRA file")
        target = _resolve(resolve_target, spec, choice)
        lora = Path(target.lora_file)
        found = _train_checkpoint(ws, spec.name, lora)
        train_id, index, ck, train_root = found if found else (None, {}, {}, None)
        ev = _evaluation_for(ws, spec.name, train_id)
    finally:
        ws.close()
    metrics, cell = _cell_metrics(ev[1] if ev else None, ck.get("step"), target.lora_scale)
    chosen = {"choice": choice, "source": target.lora_source, "train_stage": train_id,
              "evaluate_stage": ev[0] if ev else None, "step": ck.get("step"), "phase": ck.get("phase"),
              "variant": index.get("variant"), "lora_scale": target.lora_scale, "cell": cell,
              "picked_by_reviewer": target.lora_source.startswith("reviewer's pick")}
    files = [ReleaseFile(f"lora/{lora.name}", "lora", lora)]
    kohya = train_root / ck["kohya"] if train_root is not None and ck.get("kohya") else None
    if kohya is not None and kohya.is_file():
        files.append(ReleaseFile(f"lora/{kohya.name}", "lora_kohya", kohya))
    if ev:
        files.append(ReleaseFile("evaluation.json", "evaluation", ev[2]))
    return target, {"checkpoint": chosen, "metrics": metrics}, files


def _resolve(resolve_target: Any, spec: Any, choice: str) -> Any:
    from runner.core.errors import StageError

    try:
        target = resolve_target(spec, checkpoint=choice)
    except StageError as exc:
        raise NothingToPublish(f"nothing to publish for {spec.name}: {exc}", hint=exc.hint) from None
    if not target.lora_file:
        raise NothingToPublish(f"nothing to publish for {spec.name}: no LoRA file was chosen ({target.lora_source})")
    return target


# --------------------------------------------------------------------------- the release


def _metadata(target: Any, chosen: dict[str, Any]) -> bytes:
    """What a user of the LoRA needs to load it: base model, trigger, scale, settings."""
    meta = {"character": target.character, "trigger": target.trigger, "class_word": target.class_word,
            "base_model": target.base_model, "model_family": target.family, "resolution": target.resolution,
            "lora_scale": target.lora_scale, "steps": target.steps, "guidance": target.guidance,
            "step": chosen["step"], "variant": chosen["variant"], "tiny_random": target.tiny_random}
    return json.dumps(meta, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _report(spec: Any, warnings: list[str]) -> list[ReleaseFile]:
    from runner.engine.executor import report_folder

    latest = report_folder(spec) / "latest.html"
    if latest.is_file():
        return [ReleaseFile("report.html", "report", latest)]
    warnings.append(f"no report at {latest}: the version is published without one (run `runner apply` to write it)")
    return []


def build(spec: Any, tag: str, checkpoint: str | None = None) -> Release:
    """Everything one version holds, hashed, and its manifest (without blob locations' host)."""
    from runner import __version__

    target, chosen, files = choose(spec, checkpoint)
    warnings = list(target.warnings)
    files.append(ReleaseFile("metadata.json", "metadata", data=_metadata(target, chosen["checkpoint"])))
    files += _report(spec, warnings)
    files.append(ReleaseFile(f"spec/{Path(spec.file).name}", "spec", Path(spec.file)))
    manifest = {
        "format": MANIFEST_FORMAT,
        "character": spec.name,
        "tag": tag,
        "spec": {"file": os.path.relpath(spec.file, spec.project_root), "digest": spec_digest(spec)},
        **chosen,
        "files": [{"path": f.path, "role": f.role, "sha256": f.sha256, "size": f.size,
                   "blob": f"blobs/sha256/{f.sha256}"} for f in files],
        "git": git_state(Path(spec.file).parent),
        "runner_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    manifest["content_digest"] = content_digest(manifest)
    return Release(spec.name, tag, files, manifest, warnings)
