"""Video LoRA checkpoints: each cell's figures, its targets, the best cell, and the compare rows.

A *cell* is one train_video checkpoint at one LoRA scale (or the ``baseline``: the base model
without the LoRA, LoRA scale 0), with the clips the evaluate_video stage made for it (a clip per
prompt x key frame x seed, measured by the video stage's suite, :mod:`runner.generate.clipcheck`).

- Figures (:func:`cell_summary`): mean and worst face distance (0-100, 30 = the face backend's
  same-person threshold), clips per fidelity grade (excellent <= 20, fail > 30 by default:
  generate.video.fidelity), frozen clips, the fewest blinks, the mouth's spread, motion and the
  largest identity drift first to last.
- Targets (:func:`evaluate_targets`, ``evaluate.video.targets``): every clip graded at least
  ``fidelity``, blinking ``min_blinks`` times, not frozen, drifting at most ``max_drift``; a
  figure that could not be measured fails its target, with the reason.
- Best (:func:`select_best`): among the checkpoint cells (never the baseline), the one that meets
  every target, then the lowest mean face distance, then fewer frozen clips, then the lower
  scale, then the earlier step; ``decided_by`` names the rule that separated it from the
  runner-up.

The evaluate_video stage writes these into results.json; the report section and
``runner compare`` (:mod:`runner.eval.compare`) render them with :func:`video_rows`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

GRADE_ORDER = ("excellent", "ok", "fail")
TIE_BREAKS = ("targets", "face distance", "frozen clips", "LoRA scale", "step")
TINY_BANNER = ("Measured with a tiny random video model: these clips are noise and every figure here is "
               "meaningless. It shows that the pipeline runs, not how good a video LoRA is.")


def _known(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))]


def _mean(values: Sequence[Any]) -> float | None:
    vals = _known(values)
    return round(sum(vals) / len(vals), 4) if vals else None


def cell_summary(clips: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one cell from its clip records (clipcheck's clip.json)."""
    grades = [c["fidelity"]["grade"] for c in clips]
    dyn = [c.get("dynamics") or {} for c in clips]
    blinks = _known([d.get("blinks") for d in dyn])
    drift = [(d.get("identity_drift") or {}).get("distance") for d in dyn]
    return {
        "clips": len(clips),
        "distance": _mean([c["fidelity"]["distance"] for c in clips]),
        "worst_distance": max(_known([c["fidelity"].get("worst") for c in clips]), default=None),
        **{g: grades.count(g) for g in GRADE_ORDER},
        "frozen": sum(1 for d in dyn if d.get("frozen") is True),
        "frozen_unknown": sum(1 for d in dyn if d.get("frozen") is None),
        "blinks_min": int(min(blinks)) if len(blinks) == len(clips) and blinks else None,
        "mouth_spread": _mean([d.get("mouth_spread") for d in dyn]),
        "motion": _mean([(c.get("motion") or {}).get("pct_diag_per_frame") for c in clips]),
        "drift_max": max(_known(drift), default=None),
        "drift_unknown": sum(1 for v in drift if v is None),
    }


def evaluate_targets(clips: Sequence[dict[str, Any]], targets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{target: {"target", "value", "pass", "note"}} for every target that checks something."""
    s = cell_summary(clips)
    out: dict[str, dict[str, Any]] = {}
    need = targets.get("fidelity", "ok")
    if need != "any":
        allowed = GRADE_ORDER[:GRADE_ORDER.index(need) + 1]
        bad = sum(s[g] for g in GRADE_ORDER if g not in allowed)
        out["fidelity"] = {"target": f"every clip {need}", "value": f"{s['excellent']} excellent, {s['ok']} ok, "
                           f"{s['fail']} fail", "pass": bad == 0 and bool(clips), "note": ""}
    if int(targets.get("min_blinks") or 0) > 0:
        n = int(targets["min_blinks"])
        out["min_blinks"] = {"target": f">= {n} per clip", "value": s["blinks_min"],
                             "pass": s["blinks_min"] is not None and s["blinks_min"] >= n,
                             "note": "" if s["blinks_min"] is not None else "blinks not read in every clip"}
    if targets.get("not_frozen", True):
        out["not_frozen"] = {"target": "no frozen clip", "value": s["frozen"],
                             "pass": s["frozen"] == 0 and s["frozen_unknown"] == 0,
                             "note": f"{s['frozen_unknown']} clip(s) without landmarks in 2+ frames"
                             if s["frozen_unknown"] else ""}
    if targets.get("max_drift") is not None:
        limit = float(targets["max_drift"])
        out["max_drift"] = {"target": f"<= {limit:g}", "value": s["drift_max"],
                            "pass": s["drift_unknown"] == 0 and s["drift_max"] is not None and s["drift_max"] <= limit,
                            "note": f"{s['drift_unknown']} clip(s) with fewer than two faces"
                            if s["drift_unknown"] else ""}
    return out


def score_cell(cell: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """``cell`` with its summary and target results filled in (the clips are its own)."""
    cell["summary"] = cell_summary(cell["clips"])
    cell["targets"] = evaluate_targets(cell["clips"], targets)
    cell["targets_total"] = len(cell["targets"])
    cell["targets_passed"] = sum(1 for t in cell["targets"].values() if t["pass"])
    cell["targets_met"] = cell["targets_passed"] == cell["targets_total"]
    return cell


def _rank(cell: dict[str, Any]) -> tuple:
    s = cell["summary"]
    distance = s["distance"] if s["distance"] is not None else math.inf
    return (0 if cell["targets_met"] else 1, distance, s["frozen"], float(cell["lora_scale"]), int(cell["step"]))


def select_best(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best checkpoint cell (module doc): {"index", "targets_met", "decided_by", "reason"};
    ``index`` is into ``cells``. The baseline (no checkpoint) is never chosen."""
    from runner.core.errors import StageError

    candidates = [i for i, c in enumerate(cells) if c.get("checkpoint_index") is not None]
    if not candidates:
        raise StageError("evaluate_video: nothing to choose from: no checkpoint cell was evaluated",
                         hint="evaluate.video.lora_scales needs a scale above 0.")
    order = sorted(candidates, key=lambda i: _rank(cells[i]))
    best = cells[order[0]]
    decided = "only checkpoint cell"
    if len(order) > 1:
        a, b = _rank(best), _rank(cells[order[1]])
        decided = next((TIE_BREAKS[k] for k in range(len(a)) if a[k] != b[k]), "equal on every rule")
    met = bool(best["targets_met"])
    why = ("meets every target" if met else
           f"no cell meets every target; it passes {best['targets_passed']}/{best['targets_total']}")
    return {"index": order[0], "targets_met": met, "decided_by": decided,
            "reason": f"{why}; mean face distance {best['summary']['distance']}, {best['summary']['frozen']} frozen "
                      f"clip(s) (decided by {decided}, among {len(candidates)} checkpoint x scale cells)"}


def cell_label(cell: dict[str, Any]) -> str:
    if cell.get("checkpoint_index") is None:
        return "baseline (no LoRA)"
    phase = f" {cell['phase']}" if cell.get("phase") else ""
    return f"step {cell['step']}{phase} @ {float(cell['lora_scale']):g}"


def tiny_note(results: dict[str, Any]) -> str:
    return TINY_BANNER if (results.get("tiny_random") or {}).get("any") else ""


# --------------------------------------------------------------------------- strips and rows


def write_strip(mp4: Path, frames: Sequence[int], out: Path, height: int = 96) -> str:
    """The clip's frames ``frames`` (the ones fidelity analysed) side by side in one JPEG: what a
    page shows of a clip without playing it. Returns the file name."""
    import av
    from PIL import Image

    wanted, got = sorted(set(int(f) for f in frames)) or [0], {}
    with av.open(str(mp4)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_image().convert("RGB")
            if i >= wanted[-1]:
                break
    tiles = [got[i] for i in wanted if i in got]
    scale = height / max(1, tiles[0].height)
    tiles = [t.resize((max(1, round(t.width * scale)), height)) for t in tiles]
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height), "white")
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 2
    strip.save(out, quality=88)
    return out.name


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{float(v):.{digits}f}" if isinstance(v, float) else str(v)


ROW_FIGURES = (("distance", "face distance", 1), ("worst_distance", "worst", 1), ("excellent", "excellent", 0),
               ("ok", "ok", 0), ("fail", "fail", 0), ("frozen", "frozen", 0), ("blinks_min", "fewest blinks", 0),
               ("mouth_spread", "mouth spread", 3), ("motion", "motion % diag/frame", 3),
               ("drift_max", "drift (max)", 1))


def video_rows(results: dict[str, Any], folder: Path, *, embed_max_bytes: int = 2 * 1024 * 1024,
               thumb_px: int = 96) -> dict[str, Any]:
    """What the video rows (compare page, report section) render for one results.json: one row per
    cell with its figures, targets, best mark and each clip's strip (and the clip itself when small)."""
    from runner.report.embed import thumbnail_data_uri, video_data_uri

    best_cell = (results.get("best") or {}).get("cell")
    rows = []
    for cell in results["cells"]:
        clips = []
        for c in cell["clips"]:
            f, strip = folder / c["file"], folder / c.get("strip", "")
            embed = f.is_file() and f.stat().st_size <= embed_max_bytes
            clips.append({"name": c["name"], "prompt": c["prompt"], "seed": c["seed"],
                          "grade": c["fidelity"]["grade"], "distance": _fmt(c["fidelity"]["distance"]),
                          "strip_uri": thumbnail_data_uri(strip, thumb_px * 8) if c.get("strip") and strip.is_file()
                          else "", "video_uri": video_data_uri(f) if embed else ""})
        s = cell["summary"]
        rows.append({"cell": cell["cell"], "label": cell_label(cell), "best": cell["cell"] == best_cell,
                     "baseline": cell.get("checkpoint_index") is None,
                     "figures": [_fmt(s.get(k), d) if d else _fmt(s.get(k)) for k, _, d in ROW_FIGURES],
                     "targets": [{"name": k, **t, "value": _fmt(t["value"]) if not isinstance(t["value"], str)
                                  else t["value"]} for k, t in cell["targets"].items()],
                     "targets_met": cell["targets_met"], "clips": clips})
    return {"rows": rows, "figure_names": [n for _, n, _ in ROW_FIGURES], "tiny_note": tiny_note(results),
            "best": results.get("best") or {}, "label": results.get("stage_id") or folder.name,
            "model": results.get("model"), "family": results.get("family"),
            "generation": results.get("generation") or {}}
