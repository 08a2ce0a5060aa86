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
    phase = f" {cell['phase']}" if cell.get("phase") else ""
    return f"step {cell['step']}{phase} @ {cell['lora_scale']:g}"


def target_class(cell: dict[str, Any], category: str, metric: str) -> str:
    t = (cell.get("targets") or {}).get(category, {}).get(metric)
    if t is None:
        return ""
    return "pass" if t["pass"] else "fail"


def evaluation_context(ev: dict[str, Any], folder: Path, *, thumb_px: int = 192, grid_per_category: int = 2) -> dict[str, Any]:
    from runner.report import charts
    from runner.report.embed import thumbnail_data_uri

    cells = ev["cells"]
    best = ev["best"]
    categories = ev["suite"]["categories"]
    prompts = {(p["category"], p["index"]): p for p in ev["suite"]["prompts"]}
    tiny = tiny_note(ev)
    suffix = " (tiny random models)" if tiny else ""

    rows = []
    for c in cells:
        is_best = c["cell"] == best["cell"]
        rows.append({
            "label": cell_label(c), "step": c["step"], "phase": c.get("phase") or "", "scale": f"{c['lora_scale']:g}",
            "best": is_best,
            "metrics": [{"text": fmt(c["overall"].get(m), m), "cls": target_class(c, "overall", m)} for m in TABLE_METRICS],
            "targets": f"{c.get('targets_passed', 0)}/{c.get('targets_total', 0)}",
            "score": fmt(c.get("score")),
            "timing": c.get("timing", {}),
        })

    best_cell = next(c for c in cells if c["cell"] == best["cell"])
    category_rows = []
    for cat in categories:
        vals = best_cell["categories"].get(cat, {})
        category_rows.append({
            "category": cat,
            "metrics": [{"text": fmt(vals.get(m), m), "cls": target_class(best_cell, cat, m),
                         "target": ((best_cell.get("targets") or {}).get(cat, {}).get(m) or {}).get("target", "")}
                        for m in TABLE_METRICS],
        })

    # Every declared target across all cells: where does the character drift?
    target_matrix = []
    for cat, metrics in (ev.get("targets") or {}).items():
        for metric, cmp in metrics.items():
            target_matrix.append({
                "category": cat, "metric": metric, "target": cmp,
                "cells": [{"text": fmt((c.get("targets") or {}).get(cat, {}).get(metric, {}).get("value"), metric),
                           "cls": target_class(c, cat, metric)} for c in cells],
            })

    # Checkpoint x category grid: the first prompts of each category, first seed.
    first_seed = ev["generation"]["seeds"][0]
    grid = []
    for c in cells:
        row = {"label": cell_label(c), "best": c["cell"] == best["cell"], "categories": []}
        for cat in categories:
            items = []
            for img in c["images"]:
                if img["category"] != cat or img["seed"] != first_seed or img["prompt_index"] >= grid_per_category:
                    continue
                path = folder / img.get("path", f"images/{c['cell']}/{img['file']}")
                p = prompts.get((cat, img["prompt_index"]), {})
                caption = (f"{p.get('prompt', '')} | seed {img['seed']} | face "
                           f"{fmt(img['face_similarity']) if img['face_found'] else 'none'} | CLIP-T {fmt(img['clip_t'])}")
                try:
                    src = thumbnail_data_uri(path, thumb_px, boxes=[img["face_box"]] if img.get("face_box") else ())
                except OSError:
                    continue
                items.append({"src": src, "caption": caption, "face": img["face_found"]})
            row["categories"].append({"category": cat, "items": items})
        grid.append(row)

    points = [{"label": cell_label(c), "clip_t": c["overall"].get("clip_t"),
               "face_similarity": c["overall"].get("face_similarity"), "best": c["cell"] == best["cell"]}
              for c in cells]
    scatter = charts.scatter(points, x="clip_t", y="face_similarity", label="label", highlight="best",
                             title="Identity vs prompt alignment" + suffix,
                             xlabel="CLIP-T (raw cosine)", ylabel="face similarity")
    best_view = {
        "label": cell_label(best_cell),
        "step": best["step"], "scale": f"{best['lora_scale']:g}", "score": fmt(best.get("score")),
        "reason": best.get("reason", ""), "constraints_met": best.get("constraints_met", True),
        "constraints": [{"key": k, "target": v["target"], "value": fmt(v["value"]), "pass": v["pass"]}
                        for k, v in (best.get("constraints") or {}).items()],
        "maximize": (best.get("objective") or {}).get("maximize", "face_similarity"),
        "objective_value": fmt(best.get("objective_value")),
        "lora_diffusers": best.get("lora_diffusers"), "lora_kohya": best.get("lora_kohya"),
    }
    models = ev.get("models", {})
    return {
        "ev": {"variant": ev.get("variant"), "base_model": ev.get("base_model"), "model_family": ev.get("model_family"),
               "suite": ev["suite"]["source"], "n_prompts": len(ev["suite"]["prompts"]),
               "seeds": ", ".join(str(s) for s in ev["generation"]["seeds"]),
               "scales": ", ".join(f"{s:g}" for s in ev["generation"]["lora_scales"]),
               "steps": ev["generation"]["steps"], "guidance": ev["generation"]["guidance"],
               "resolution": ev["generation"]["resolution"], "score_kind": ev.get("score_kind", ""),
               "duration_s": ev.get("duration_s")},
        "models": models,
        "tiny_note": tiny,
        "best": best_view,
        "metric_names": [SHORT[m] for m in TABLE_METRICS],
        "metric_help": [{"name": SHORT[m], "key": m, "desc": METRICS[m]["desc"], "better": METRICS[m]["better"]}
                        for m in TABLE_METRICS],
        "rows": rows,
        "category_rows": category_rows,
        "target_matrix": target_matrix,
        "cell_labels": [cell_label(c) for c in cells],
        "grid": grid,
        "categories": categories,
        "scatter": scatter,
        "references": ev.get("references", []),
    }
