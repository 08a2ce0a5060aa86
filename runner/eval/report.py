"""Turn an evaluation.json into what templates/sections/evaluate.html.j2 renders.

Numbers are formatted here, so the template needs no filters; images become data URIs so the
report stays one offline file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from runner.metrics.catalog import METRICS

TABLE_METRICS = ("face_similarity", "face_similarity_max", "no_face_rate", "consistency", "clip_t",
                 "clip_score", "clip_i", "dino", "diversity")
SHORT = {"face_similarity": "face sim", "face_similarity_max": "face max", "no_face_rate": "no face",
         "consistency": "consistency", "clip_t": "CLIP-T", "clip_score": "CLIPScore", "clip_i": "CLIP-I",
         "dino": "DINO", "diversity": "diversity"}
TINY_BANNER = ("Measured with tiny random models ({which}): these images are noise and every figure on "
               "this page is meaningless. It shows that the pipeline runs, not how good a LoRA is.")


def fmt(value: Any, metric: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if metric == "no_face_rate":
        return f"{float(value) * 100:.0f}%"
    return f"{float(value):.3f}"


def tiny_note(ev: dict[str, Any]) -> str:
    t = ev.get("tiny_random") or {}
    which = [k for k in ("diffusion", "clip", "dino") if t.get(k)]
    return TINY_BANNER.format(which=", ".join(which)) if which else ""


def cell_label(cell: dict[str, Any]) -> str:
    condition = cell.get("condition", "lora")
    if condition == "references":
        return "references alone (base model, no LoRA)"
    phase = f" {cell['phase']}" if cell.get("phase") else ""
    return f"step {cell['step']}{phase} @ {cell['lora_scale']:g}" + (" + references" if condition != "lora" else "")


def target_class(cell: dict[str, Any], category: str, metric: str) -> str:
    t = (cell.get("targets") or {}).get(category, {}).get(metric)
    if t is None:
        return ""
    return "pass" if t["pass"] else "fail"


def evaluation_context(ev: dict[str, Any], folder: Path, *, thumb_px: int = 192,
                       grid_per_category: int = 2) -> dict[str, Any]:
    """What the evaluate section template renders: the run's facts, the best cell, one row per
    cell, the best cell per category, every target across cells, the image grid and a scatter."""
    cells = ev["cells"]
    best = ev["best"]
    best_cell = next(c for c in cells if c["cell"] == best["cell"])
    tiny = tiny_note(ev)
    return {
        "ev": _run_facts(ev),
        "models": ev.get("models", {}),
        "tiny_note": tiny,
        "best": _best_view(best, best_cell),
        "metric_names": [SHORT[m] for m in TABLE_METRICS],
        "metric_help": [{"name": SHORT[m], "key": m, "desc": METRICS[m]["desc"], "better": METRICS[m]["better"]}
                        for m in TABLE_METRICS],
        "rows": [_cell_row(c, c["cell"] == best["cell"]) for c in cells],
        "category_rows": _category_rows(best_cell, ev["suite"]["categories"]),
        "target_matrix": _target_matrix(ev, cells),
        "cell_labels": [cell_label(c) for c in cells],
        "grid": _grid(ev, folder, thumb_px, grid_per_category),
        "categories": ev["suite"]["categories"],
        "scatter": _scatter(cells, best, " (tiny random models)" if tiny else ""),
        "references": ev.get("references", []),
    }


def _run_facts(ev: dict[str, Any]) -> dict[str, Any]:
    gen = ev["generation"]
    return {"variant": ev.get("variant"), "base_model": ev.get("base_model"), "model_family": ev.get("model_family"),
            "suite": ev["suite"]["source"], "n_prompts": len(ev["suite"]["prompts"]),
            "seeds": ", ".join(str(s) for s in gen["seeds"]),
            "scales": ", ".join(f"{s:g}" for s in gen["lora_scales"]),
            "steps": gen["steps"], "guidance": gen["guidance"],
            "resolution": gen["resolution"], "score_kind": ev.get("score_kind", ""),
            "duration_s": ev.get("duration_s")}


def _cell_row(c: dict[str, Any], is_best: bool) -> dict[str, Any]:
    return {
        "label": cell_label(c), "step": c["step"], "phase": c.get("phase") or "", "scale": f"{c['lora_scale']:g}",
        "best": is_best,
        "metrics": [{"text": fmt(c["overall"].get(m), m), "cls": target_class(c, "overall", m)} for m in TABLE_METRICS],
        "targets": f"{c.get('targets_passed', 0)}/{c.get('targets_total', 0)}",
        "score": fmt(c.get("score")),
        "timing": c.get("timing", {}),
    }


def _category_rows(best_cell: dict[str, Any], categories: list[str]) -> list[dict[str, Any]]:
    rows = []
    for cat in categories:
        vals = best_cell["categories"].get(cat, {})
        rows.append({
            "category": cat,
            "metrics": [{"text": fmt(vals.get(m), m), "cls": target_class(best_cell, cat, m),
                         "target": ((best_cell.get("targets") or {}).get(cat, {}).get(m) or {}).get("target", "")}
                        for m in TABLE_METRICS],
        })
    return rows


def _target_matrix(ev: dict[str, Any], cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every declared target across all cells: where does the character drift?"""
    return [{"category": cat, "metric": metric, "target": cmp,
             "cells": [{"text": fmt((c.get("targets") or {}).get(cat, {}).get(metric, {}).get("value"), metric),
                        "cls": target_class(c, cat, metric)} for c in cells]}
            for cat, metrics in (ev.get("targets") or {}).items() for metric, cmp in metrics.items()]


def _grid(ev: dict[str, Any], folder: Path, thumb_px: int, per_category: int) -> list[dict[str, Any]]:
    """Checkpoint x category grid: the first prompts of each category, first seed."""
    first_seed = ev["generation"]["seeds"][0]
    prompts = {(p["category"], p["index"]): p for p in ev["suite"]["prompts"]}
    grid = []
    for c in ev["cells"]:
        row = {"label": cell_label(c), "best": c["cell"] == ev["best"]["cell"], "categories": []}
        for cat in ev["suite"]["categories"]:
            shown = [img for img in c["images"]
                     if img["category"] == cat and img["seed"] == first_seed and img["prompt_index"] < per_category]
            items = [item for img in shown
                     if (item := _grid_item(c, img, folder, prompts.get((cat, img["prompt_index"]), {}), thumb_px))]
            row["categories"].append({"category": cat, "items": items})
        grid.append(row)
    return grid


def _grid_item(c: dict[str, Any], img: dict[str, Any], folder: Path, prompt: dict[str, Any],
               thumb_px: int) -> dict[str, Any] | None:
    """One thumbnail with its caption; None when the image file cannot be read."""
    from runner.report.embed import thumbnail_data_uri

    path = folder / img.get("path", f"images/{c['cell']}/{img['file']}")
    caption = (f"{prompt.get('prompt', '')} | seed {img['seed']} | face "
               f"{fmt(img['face_similarity']) if img['face_found'] else 'none'} | CLIP-T {fmt(img['clip_t'])}")
    try:
        src = thumbnail_data_uri(path, thumb_px, boxes=[img["face_box"]] if img.get("face_box") else ())
    except OSError:
        return None
    return {"src": src, "caption": caption, "face": img["face_found"]}


def _scatter(cells: list[dict[str, Any]], best: dict[str, Any], suffix: str) -> Any:
    from runner.report import charts

    points = [{"label": cell_label(c), "clip_t": c["overall"].get("clip_t"),
               "face_similarity": c["overall"].get("face_similarity"), "best": c["cell"] == best["cell"]}
              for c in cells]
    return charts.scatter(points, x="clip_t", y="face_similarity", label="label", highlight="best",
                          title="Identity vs prompt alignment" + suffix,
                          xlabel="CLIP-T (raw cosine)", ylabel="face similarity")


def _best_view(best: dict[str, Any], best_cell: dict[str, Any]) -> dict[str, Any]:
    return {
        "label": cell_label(best_cell),
        "step": best["step"], "scale": f"{best['lora_scale']:g}", "score": fmt(best.get("score")),
        "reason": best.get("reason", ""), "constraints_met": best.get("constraints_met", True),
        "constraints": [{"key": k, "target": v["target"], "value": fmt(v["value"]), "pass": v["pass"]}
                        for k, v in (best.get("constraints") or {}).items()],
        "maximize": (best.get("objective") or {}).get("maximize", "face_similarity"),
        "objective_value": fmt(best.get("objective_value")),
        "lora_diffusers": best.get("lora_diffusers"), "lora_kohya": best.get("lora_kohya"),
    }
