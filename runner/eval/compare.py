"""`runner compare`: one self-contained HTML page comparing evaluations of several runs or variants.

Each evaluation is an ``evaluation`` artifact of the evaluate stage (a folder with
evaluation.json). The first one is the baseline. The page shows, for each evaluation's best
checkpoint and scale:

- the overall metrics with deltas against the baseline (green where better, red where worse, by
  each metric's direction);
- per category: the metrics and deltas, and which categories improved or regressed on the
  baseline's objective metric (``evaluate.objective.maximize``, face similarity by default);
- the same prompts side by side (matched by category, prompt template and seed).

Video evaluations (the evaluate_video stage's results.json) add video rows: per evaluation, a row
per checkpoint x LoRA scale with a strip of the analysed frames of each clip (and the clip itself
when small), the video suite's figures, each target's pass/fail and the best cell marked
(:func:`runner.eval.video.video_rows`). One video evaluation is a page of its own (its cells are
what is compared); image evaluations need two or more.

Library entry points: :func:`evaluations_in` (find evaluation folders under a path),
:func:`evaluations_of_run` (a run's evaluate and evaluate_video outputs, given a workspace),
:func:`load_any`, :func:`write_comparison`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from runner.eval.report import TABLE_METRICS, SHORT, cell_label, fmt, tiny_note
from runner.metrics.catalog import METRICS
from runner.core.errors import StageError
from runner.core.fs import atomic_write_text

# A change smaller than this is "unchanged" when deciding whether a category improved.
IMPROVEMENT_EPS = 0.005


@dataclass
class Evaluation:
    label: str
    folder: Path
    data: dict[str, Any]

    @property
    def best_cell(self) -> dict[str, Any]:
        name = self.data["best"]["cell"]
        return next(c for c in self.data["cells"] if c["cell"] == name)


def load_evaluation(path: str | Path, label: str | None = None) -> Evaluation:
    """An evaluation from its folder or its evaluation.json."""
    p = Path(path)
    f = p if p.is_file() else p / "evaluation.json"
    if not f.is_file():
        raise StageError(f"no evaluation.json at {p}",
                         hint="Give an evaluation folder, its evaluation.json, or a run id (see `runner runs`).")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"cannot read {f}: {exc}") from None
    for key in ("cells", "best", "suite"):
        if key not in data:
            raise StageError(f"{f} is not an evaluate stage output (no {key!r})")
    default = data.get("stage_id") or f.parent.name
    if data.get("run_id") and not label:
        default = f"{data['run_id']} {default}"
    return Evaluation(label=label or default, folder=f.parent, data=data)


@dataclass
class VideoEvaluation:
    """An evaluate_video stage's results.json (checkpoint x scale cells of clips)."""

    label: str
    folder: Path
    data: dict[str, Any]


VIDEO_RESULTS = "results.json"


def _is_video_results(f: Path) -> bool:
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("kind") == "evaluate_video"
    except (OSError, ValueError, AttributeError):
        return False


def load_video_evaluation(path: str | Path, label: str | None = None) -> VideoEvaluation:
    """A video evaluation from its results folder or its results.json."""
    p = Path(path)
    f = p if p.is_file() else p / VIDEO_RESULTS
    if not f.is_file() or not _is_video_results(f):
        raise StageError(f"no evaluate_video results.json at {p}",
                         hint="Give the evaluate_video stage's results folder or its results.json.")
    data = json.loads(f.read_text(encoding="utf-8"))
    for key in ("cells", "best"):
        if key not in data:
            raise StageError(f"{f} is not a finished evaluate_video output (no {key!r})")
    default = data.get("stage_id") or f.parent.name
    if data.get("run_id") and not label:
        default = f"{data['run_id']} {default}"
    return VideoEvaluation(label=label or default, folder=f.parent, data=data)


def load_any(path: str | Path, label: str | None = None) -> Evaluation | VideoEvaluation:
    """An image evaluation (evaluation.json) or a video one (evaluate_video's results.json)."""
    p = Path(path)
    f = p if p.is_file() else (p / "evaluation.json" if (p / "evaluation.json").is_file() else p / VIDEO_RESULTS)
    if f.name == VIDEO_RESULTS and _is_video_results(f):
        return load_video_evaluation(f, label)
    return load_evaluation(p, label)


def evaluations_in(path: str | Path) -> list[Path]:
    """evaluation.json (and evaluate_video results.json) files at or below ``path`` (a file, an
    evaluation folder or a tree)."""
    p = Path(path)
    if p.is_file():
        return [p]
    for name in ("evaluation.json", VIDEO_RESULTS):
        if (p / name).is_file() and (name != VIDEO_RESULTS or _is_video_results(p / name)):
            return [p / name]
    if not p.is_dir():
        return []
    return sorted([*p.rglob("evaluation.json"), *(f for f in p.rglob(VIDEO_RESULTS) if _is_video_results(f))])


def evaluations_of_run(workspace: Any, run_id: str) -> list[tuple[str, Path]]:
    """(label, evaluation folder) of every evaluate stage of a run that has outputs in the store.

    ``workspace`` is a :class:`runner.engine.workspace.Workspace` (duck-typed: ``executions``,
    ``store_has``, ``load_outputs``).
    """
    out = []
    for e in workspace.executions(run_id):
        if not e.get("key") or not workspace.store_has(e["key"]):
            continue
        if e.get("kind") != "evaluate":  # a video evaluation is known by its results.json
            arts = workspace.load_outputs(e["key"])
            if "results" in arts and _is_video_results(Path(arts["results"].path) / VIDEO_RESULTS):
                out.append((f"{run_id} {e['stage_id']}", Path(arts["results"].path)))
            continue
        arts = workspace.load_outputs(e["key"])
        if "evaluation" in arts:
            out.append((f"{run_id} {e['stage_id']}", Path(arts["evaluation"].path)))
    return out


def _delta(metric: str, value: float | None, base: float | None) -> dict[str, Any]:
    if value is None or base is None or (isinstance(value, float) and math.isnan(value)) or (
            isinstance(base, float) and math.isnan(base)):
        return {"text": "", "cls": ""}
    d = float(value) - float(base)
    if abs(d) < 1e-9:
        return {"text": "±0", "cls": ""}
    better = METRICS.get(metric, {}).get("better", "higher")
    good = d > 0 if better == "higher" else d < 0
    text = f"{d * 100:+.0f} pp" if metric == "no_face_rate" else f"{d:+.3f}"
    return {"text": text, "cls": "pass" if good else "fail"}


_NO_DELTA = {"text": "", "cls": ""}
CATEGORY_METRICS = ("face_similarity", "consistency", "no_face_rate", "clip_t", "dino", "diversity")


def comparison_context(evals: Sequence[Evaluation | VideoEvaluation], *, thumb_px: int = 160,
                       prompts_per_category: int = 3) -> dict[str, Any]:
    """What compare.html.j2 renders: each image evaluation's best cell against the first one's
    (overall and per category, with deltas and verdicts), the same prompts side by side and a
    scatter; and the video rows of every video evaluation."""
    from runner.eval.video import video_rows

    images = [e for e in evals if isinstance(e, Evaluation)]
    videos = [{**video_rows(v.data, v.folder), "label": v.label} for v in evals if isinstance(v, VideoEvaluation)]
    if len(images) < 2 and not videos:
        raise StageError("a comparison needs at least two evaluations",
                         hint="Pass two or more runs, folders or evaluation.json files "
                              "(or a run with several variants).")
    title = [e.label for e in evals]
    if len(images) < 2:
        return {"images": False, "videos": videos, "title": title,
                "lone_image": images[0].label if images else "",
                "tiny_notes": [],  # each video evaluation carries its own note
                "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return {**_image_context(images, thumb_px, prompts_per_category), "images": True, "videos": videos,
            "title": title, "lone_image": "",
            "tiny_notes": sorted({tiny_note(e.data) for e in images if tiny_note(e.data)})}


def _image_context(evals: Sequence[Evaluation], thumb_px: int, prompts_per_category: int) -> dict[str, Any]:
    """The image part of the page: two or more evaluate outputs, the first the baseline."""
    objective = _objective(evals[0])
    bests = [e.best_cell for e in evals]
    columns = [{"label": e.label, "best": cell_label(c), "variant": e.data.get("variant") or "",
                "tiny": bool((e.data.get("tiny_random") or {}).get("any")),
                "models": e.data.get("models", {})} for e, c in zip(evals, bests)]
    categories = list(dict.fromkeys(cat for e in evals for cat in e.data["suite"]["categories"]))
    side_by_side, common = _side_by_side(evals, bests, thumb_px, prompts_per_category)
    return {
        "columns": columns,
        "objective": objective,
        "objective_name": SHORT.get(objective, objective),
        "overall_rows": [_metric_row(m, [c["overall"] for c in bests], {"key": m}) for m in TABLE_METRICS],
        "targets_row": [f"{c.get('targets_passed', 0)}/{c.get('targets_total', 0)}" for c in bests],
        "category_rows": [{"category": cat, "metrics": [_metric_row(m, [c["categories"].get(cat, {}) for c in bests])
                                                        for m in CATEGORY_METRICS]}
                          for cat in categories],
        "verdicts": [{"label": columns[i]["label"], **_verdicts(bests[0], c, categories, objective)}
                     for i, c in enumerate(bests) if i],
        "side_by_side": side_by_side,
        "scatter": _scatter(evals, bests, any(col["tiny"] for col in columns)),
        "common_prompts": len({(k[0], k[1]) for k in common}),
        "metric_help": [{"name": SHORT[m], "desc": METRICS[m]["desc"], "better": METRICS[m]["better"]}
                        for m in TABLE_METRICS],
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _objective(base: Evaluation) -> str:
    """The baseline's objective metric (``evaluate.objective.maximize``), face similarity when unknown."""
    objective = (base.data["best"].get("objective") or {}).get("maximize", "face_similarity")
    return objective if objective in METRICS else "face_similarity"


def _metric_row(metric: str, values: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One metric across the evaluations (``values``: each one's metrics), deltas against the first."""
    base = values[0].get(metric)
    return {"metric": SHORT[metric], **(extra or {}), "values": [
        {"text": fmt(v.get(metric), metric), "delta": _delta(metric, v.get(metric), base) if i else dict(_NO_DELTA)}
        for i, v in enumerate(values)]}


def _verdicts(base: dict[str, Any], cell: dict[str, Any], categories: list[str],
              objective: str) -> dict[str, list[str]]:
    """The categories where ``cell`` improved, regressed or held on the objective against ``base``."""
    out: dict[str, list[str]] = {"improved": [], "regressed": [], "unchanged": [], "missing": []}
    for cat in categories:
        v, bv = cell["categories"].get(cat, {}).get(objective), base["categories"].get(cat, {}).get(objective)
        if v is None or bv is None:
            out["missing"].append(cat)
            continue
        d = float(v) - float(bv)
        if METRICS[objective]["better"] == "lower":
            d = -d
        out["improved" if d > IMPROVEMENT_EPS else "regressed" if d < -IMPROVEMENT_EPS else "unchanged"].append(cat)
    return out


def _side_by_side(evals: Sequence[Evaluation], bests: list[dict[str, Any]], thumb_px: int,
                  per_category: int) -> tuple[dict[str, list[dict[str, Any]]], list[tuple]]:
    """Same prompts side by side: matched on (category, template or prompt, seed), the first seed
    only, at most ``per_category`` rows per category; and every key all evaluations share."""
    indexed = [{_image_key(e, img): img for img in c["images"]} for e, c in zip(evals, bests)]
    common = [k for k in indexed[0] if all(k in ix for ix in indexed[1:])]
    side_by_side: dict[str, list[dict[str, Any]]] = {}
    first_seed = min((k[2] for k in common), default=None)
    for k in common:
        cat, _, seed = k
        if seed != first_seed or len(side_by_side.get(cat, [])) >= per_category:
            continue
        side_by_side.setdefault(cat, []).append({
            "prompt": _prompt_text(evals[0], k, indexed[0][k]), "seed": seed,
            "images": [_side_image(e, ix[k], thumb_px) for e, ix in zip(evals, indexed)]})
    return side_by_side, common


def _image_key(ev: Evaluation, img: dict[str, Any]) -> tuple:
    p = next((q for q in ev.data["suite"]["prompts"]
              if q["category"] == img["category"] and q["index"] == img["prompt_index"]), {})
    return (img["category"], p.get("template") or p.get("prompt", ""), img["seed"])


def _side_image(ev: Evaluation, img: dict[str, Any], thumb_px: int) -> dict[str, Any]:
    from runner.report.embed import thumbnail_data_uri

    path = ev.folder / img.get("path", f"images/{img.get('cell', '')}/{img['file']}")
    try:
        src = thumbnail_data_uri(path, thumb_px, boxes=[img["face_box"]] if img.get("face_box") else ())
    except OSError:
        src = ""
    face = fmt(img["face_similarity"]) if img["face_found"] else "none"
    return {"src": src, "face": img["face_found"], "caption": f"face {face} · CLIP-T {fmt(img['clip_t'])}"}


def _scatter(evals: Sequence[Evaluation], bests: list[dict[str, Any]], any_tiny: bool) -> Any:
    from runner.report import charts

    points = [{"label": f"{e.label}: {cell_label(cell)}", "clip_t": cell["overall"].get("clip_t"),
               "face_similarity": cell["overall"].get("face_similarity"), "best": cell is c}
              for e, c in zip(evals, bests) for cell in e.data["cells"]]
    return charts.scatter(points, x="clip_t", y="face_similarity", label="label", highlight="best",
                          title="Identity vs prompt alignment, every checkpoint x scale"
                          + (" (tiny random models)" if any_tiny else ""),
                          xlabel="CLIP-T (raw cosine)", ylabel="face similarity")


def _prompt_text(ev: Evaluation, key: tuple, img: dict[str, Any]) -> str:
    p = next((q for q in ev.data["suite"]["prompts"]
              if q["category"] == img["category"] and q["index"] == img["prompt_index"]), {})
    return p.get("prompt", key[1])


def render_comparison(evals: Sequence[Evaluation | VideoEvaluation], **kw: Any) -> str:
    import jinja2

    from runner.resources import resource_dir

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("compare.html.j2").render(**comparison_context(evals, **kw))


def write_comparison(sources: Iterable[tuple[str | None, str | Path]], out_file: str | Path, **kw: Any) -> Path:
    """Write the comparison page of ``sources`` ((label or None, evaluation folder/json or
    evaluate_video results), the first image evaluation = the baseline)."""
    evals = [load_any(path, label) for label, path in sources]
    html = render_comparison(evals, **kw)
    out = Path(out_file)
    atomic_write_text(out, html)
    return out
