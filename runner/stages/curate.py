"""`curate`: keep the character's good images and balance the shot types.

In order: (0) the reviewer's decisions from ``<spec>.review.yaml`` (``runner review``): drop,
keep whatever the gates say, change the shot type, mark as a reference; (1) drop unreadable
images and, with ``require_face``, images without a face; (2) the
identity filter: drop images whose main face is less similar to the references than
``identity_threshold`` (null: the backend's default, measured in docs/analysis.md); (3) quality
gates on the main face (size, blur, clipped exposure); (4) near-duplicates by perceptual hash,
keeping the better image; (5) shot balance against ``dataset.shots.targets`` with one strategy:

- ``report``: the table only;
- ``select``: drop the lowest-quality images of categories over their max;
- ``reweight``: per-image repeat counts (by shot type) so the effective shares approach the
  target midpoints;
- ``augment``: crop medium and close-up images out of full-body and medium ones around the
  detected face (each crop records its parent and crop box).

Every dropped image keeps its reason. Output ``curated``: ``curated.jsonl`` (kept images and
crops), ``rejected.jsonl``, ``balance.json`` (table before/after), ``review.json`` (what the
reviewer's decisions did, and decisions for images no longer in the dataset), ``crops/`` and
``thumbs/`` (small thumbnails of the rejected images, for the report).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from runner.stages import base
from runner.stages.analyze import image_inputs, read_jsonl
from runner.stages.common import review_section

DEFAULTS = {
    "identity_threshold": None,
    "require_face": True,
    "dedupe_hamming": 6,
    "min_face_px": 48,
    "min_blur": 30.0,
    "max_clipped": 0.25,
}
SHOT_DEFAULTS = {"strategy": "report", "targets": {}, "augment_min_side": 384, "max_repeats": 20}


def expand(spec: dict[str, Any], graph: base.GraphView) -> list[base.PlanNode]:
    dataset = spec.get("dataset", {})
    analyze = graph.node(base.node_id(graph.character, "analyze"))
    if not dataset.get("sources") or analyze is None:
        return []
    cur = {**DEFAULTS, **dataset.get("curation", {})}
    shots = {**SHOT_DEFAULTS, **dataset.get("shots", {})}
    config = {**cur, "strategy": shots["strategy"], "targets": {k: list(v) for k, v in sorted(shots["targets"].items())},
              "augment_min_side": shots["augment_min_side"], "max_repeats": shots["max_repeats"]}
    inputs: dict[str, base.InputRef] = {"analysis": base.StageOutputRef(analyze.id, "analysis")}
    review = review_section(graph, "dataset")
    if review:
        config["review"] = review
    if config["strategy"] == "augment":  # crops need the pixels; otherwise records suffice
        inputs.update(image_inputs(graph))
    return [
        base.PlanNode(
            id=base.node_id(graph.character, "curate"),
            kind="curate",
            character=graph.character,
            config=config,
            inputs=inputs,
            outputs=("curated",),
            label=f"identity filter, dedupe, quality gates, balance: {config['strategy']}",
        )
    ]


def quality_score(rec: dict[str, Any]) -> float:
    """0..1: bigger, sharper, well-exposed, more clearly the character (ties broken by id)."""
    f = rec["faces"][rec["main_face"]] if rec.get("main_face") is not None else None
    if f is None:
        return 0.0
    fh = f["box"][3] - f["box"][1]
    exp = f.get("exposure") or {}
    clipped = exp.get("clipped_dark", 0.0) + exp.get("clipped_bright", 0.0)
    ident = rec.get("identity")
    score = 0.4 * min(1.0, fh / 400.0) + 0.3 * min(1.0, (f.get("blur") or 0.0) / 300.0) + 0.1 * (1.0 - min(1.0, clipped))
    score += 0.2 * (1.0 if ident is None else max(0.0, min(1.0, ident)))
    return round(score, 4)


def _reject(rec: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"id": rec["id"], "source": rec.get("source", ""), "input": rec.get("input", ""), "reason": reason,
            "detail": detail, "shot": rec.get("shot"), "identity": rec.get("identity"),
            "faces": [f["box"] for f in rec.get("faces", [])], "main_face": rec.get("main_face"),
            "width": rec.get("width"), "height": rec.get("height")}


def gate(rec: dict[str, Any], cfg: dict[str, Any], threshold: float | None) -> tuple[str, str] | None:
    """(reason, detail) when the record fails a filter or quality gate, else None."""
    if rec.get("error"):
        return "unreadable", rec["error"]
    if rec.get("no_face"):
        if cfg["require_face"]:
            return "no face found", "no face was detected (require_face is on)"
        return None
    f = rec["faces"][rec["main_face"]]
    if threshold is not None and rec.get("identity") is not None and rec["identity"] < threshold:
        others = [(i, g["identity"]) for i, g in enumerate(rec["faces"])
                  if i != rec["main_face"] and g.get("identity") is not None and g["identity"] >= threshold]
        if others:
            i, s = max(others, key=lambda t: t[1])
            return ("character is not the main face",
                    f"main face identity {rec['identity']:.3f} < {threshold}; face #{i + 1} matches ({s:.3f}) but is smaller")
        return "not the character", f"identity {rec['identity']:.3f} < threshold {threshold}"
    fh = f["box"][3] - f["box"][1]
    if fh < cfg["min_face_px"]:
        return "face too small", f"main face {fh:.0f} px tall < min_face_px {cfg['min_face_px']}"
    if (f.get("blur") or 0.0) < cfg["min_blur"]:
        return "blurry face", f"Laplacian variance {f.get('blur', 0):.1f} < min_blur {cfg['min_blur']}"
    exp = f.get("exposure") or {}
    clipped = exp.get("clipped_dark", 0.0) + exp.get("clipped_bright", 0.0)
    if clipped > cfg["max_clipped"]:
        return "badly exposed face", f"{clipped:.0%} of face pixels clipped > max_clipped {cfg['max_clipped']:.0%}"
    return None


def dedupe(items: list[dict[str, Any]], max_distance: int) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any], int]]]:
    """Keep the best of each group of near-duplicates (phash Hamming distance <= max_distance).

    Vectorized: each candidate (best first) is compared with every kept hash at once.
    """
    import numpy as np

    if max_distance <= 0:
        return items, []
    ordered = sorted(items, key=lambda r: (-r["quality"], r["id"]))
    kept: list[dict[str, Any]] = []
    dups: list[tuple[dict[str, Any], dict[str, Any], int]] = []
    hashes = np.zeros(len(ordered), dtype=np.uint64)
    n = 0
    for rec in ordered:
        h = np.uint64(int(rec["phash"], 16))
        if n:
            x = np.bitwise_xor(hashes[:n], h)
            dist = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
            j = int(dist.argmin())
            if int(dist[j]) <= max_distance:
                dups.append((rec, kept[j], int(dist[j])))
                continue
        hashes[n] = h
        n += 1
        kept.append(rec)
    order = {r["id"]: i for i, r in enumerate(items)}
    kept.sort(key=lambda r: order[r["id"]])
    return kept, dups


def reviewer_decisions(review: dict[str, Any], ids: set[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Step 0: the reviewer's decisions for the analyzed images, and those whose image is gone.

    The review file keys decisions by the image file's sha256 and records the image id analyze
    uses (itself derived from content: a renamed photo keeps both); the stage's section is keyed
    by that id (see :func:`runner.review.decisions.stage_section`)."""
    wanted = {**review.get("identity", {}), **review.get("images", {})}
    decided = {i: d for i, d in wanted.items() if i in ids}
    missing = [{"image_id": i, **d} for i, d in sorted(wanted.items()) if i not in ids]
    return decided, missing


def _reviewed(rec: dict[str, Any], dec: dict[str, Any] | None) -> bool:
    """Apply a shot-type change to ``rec``; True when the reviewer keeps it whatever the gates say."""
    if not dec:
        return False
    if dec.get("shot") and not rec.get("error"):
        from runner.vision.shots import categories_of

        rec["shot"] = dec["shot"]
        rec["categories"] = categories_of(dec["shot"], rec.get("flags", {}))
    return (dec.get("decision") == "keep" or bool(dec.get("reference"))) and not rec.get("error")


def _entry(rec: dict[str, Any]) -> dict[str, Any]:
    """The kept-image entry caption and export read."""
    f = rec["faces"][rec["main_face"]] if rec.get("main_face") is not None else None
    return {
        "id": rec["id"], "input": rec["input"], "file": rec["file"], "source": rec.get("source", ""),
        "label": rec.get("label", ""), "width": rec["width"], "height": rec["height"], "shot": rec["shot"],
        "categories": list(rec["categories"]), "flags": rec.get("flags", {}), "repeats": 1, "parent": None,
        "crop_box": None, "quality": rec["quality"], "identity": rec.get("identity"),
        "people": rec.get("people_substantial", rec.get("people", 0)),
        "face_box": f["box"] if f else None, "pose": f["pose"] if f else None,
        "expression": rec.get("expression") or {}, "exposure": (f or {}).get("exposure"),
    }


def _crop_entries(parents: list[dict[str, Any]], records: dict[str, dict[str, Any]], inputs: dict[str, base.Artifact],
                  targets: dict[str, list[float]], kept_count: dict[str, int], min_side: int, crops_dir: Path,
                  ctx: base.StageContext) -> list[dict[str, Any]]:
    """Medium and close-up crops from full-body and medium parents, as many as the targets ask."""
    from PIL import Image

    from runner.vision import measures as M
    from runner.vision import shots as S

    sources = {"medium": ("full_body",), "close_up": ("full_body", "medium")}
    wanted = [s for s in ("medium", "close_up") if not targets or s in targets]
    # Candidate (parent, shot, box) in parent-quality order.
    cands: dict[str, list[tuple[dict[str, Any], tuple[int, int, int, int]]]] = {s: [] for s in wanted}
    for p in sorted(parents, key=lambda e: (-e["quality"], e["id"])):
        for shot in wanted:
            if p["shot"] not in sources[shot] or p.get("face_box") is None or p["flags"].get("occluded"):
                continue
            box = S.crop_box_for(p["face_box"], (p["width"], p["height"]), shot)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < min_side:
                continue
            fb = p["face_box"]
            moved = (fb[0] - box[0], fb[1] - box[1], fb[2] - box[0], fb[3] - box[1])
            if S.classify_shot(moved, box[3] - box[1]) != shot:
                continue
            cands[shot].append((p, box))
    counts = dict(kept_count)
    total = sum(counts.get(s, 0) for s in S.SHOT_TYPES)
    chosen: list[tuple[dict[str, Any], str, tuple[int, int, int, int]]] = []
    if not targets:
        chosen = [(p, s, b) for s in wanted for p, b in cands[s]]
    else:
        idx = {s: 0 for s in wanted}
        while True:
            # The shot furthest below its target midpoint that still has candidates.
            gaps = []
            for s in wanted:
                lo, hi = targets[s]
                share = counts.get(s, 0) / total if total else 0.0
                if share < (lo + hi) / 2.0 - 1e-9 and idx[s] < len(cands[s]):
                    gaps.append(((lo + hi) / 2.0 - share, s))
            if not gaps:
                break
            _, s = max(gaps)
            p, b = cands[s][idx[s]]
            idx[s] += 1
            chosen.append((p, s, b))
            counts[s] = counts.get(s, 0) + 1
            total += 1
    entries = []
    for parent, shot, box in chosen:
        cid = hashlib.sha256(f"{parent['id']}:{shot}:{box}".encode()).hexdigest()[:16]
        src = Path(inputs[parent["input"]].path) / parent["file"]
        with Image.open(src) as im:
            crop = im.convert("RGB").crop(box)
        rel = f"crops/{cid}.png"
        crop.save(crops_dir / f"{cid}.png", format="PNG", compress_level=1)
        rec = records[parent["id"]]
        faces = []
        for f in rec["faces"]:
            b = f["box"]
            nb = [b[0] - box[0], b[1] - box[1], b[2] - box[0], b[3] - box[1]]
            if nb[2] <= 0 or nb[3] <= 0 or nb[0] >= crop.size[0] or nb[1] >= crop.size[1]:
                continue
            faces.append({**f, "box": nb, "truncation": M.truncation(nb, crop.size[0], crop.size[1]),
                          "landmarks_outside": None})
        import numpy as np

        faces.sort(key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]), reverse=True)
        bg = M.background_edge_density(np.asarray(crop), [f["box"] for f in faces])
        flags = S.image_flags(faces, 0 if faces else None, bg)
        entries.append({
            **parent, "id": cid, "input": None, "file": rel, "width": crop.size[0], "height": crop.size[1],
            "shot": shot, "categories": S.categories_of(shot, flags), "flags": flags, "repeats": 1,
            "parent": parent["id"], "crop_box": list(box), "face_box": faces[0]["box"] if faces else None,
            "people": sum(1 for f in faces if faces and (f["box"][3] - f["box"][1]) >= S.SUBSTANTIAL_FACE * (faces[0]["box"][3] - faces[0]["box"][1])),
        })
    if chosen:
        ctx.log(f"augment: {len(entries)} crop(s) derived: " + ", ".join(
            f"{sum(1 for e in entries if e['shot'] == s)} {s}" for s in wanted))
    return entries


@base.register("curate", version=1, order=30, expand=expand,
               description="Identity filter, near-duplicate removal, quality gates and shot balance.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, base.Artifact], ctx: base.StageContext) -> dict[str, base.Artifact]:
    """Identity filter, near-duplicate removal, quality gates and shot balance."""
    from runner.vision import shots as S

    cfg = {**DEFAULTS, **SHOT_DEFAULTS, **config}
    adir = Path(inputs["analysis"].path)
    summary = json.loads((adir / "summary.json").read_text(encoding="utf-8"))
    out = Path(ctx.out_dir) / "curated"
    (out / "crops").mkdir(parents=True)
    (out / "thumbs").mkdir()
    targets = {k: list(v) for k, v in (cfg["targets"] or {}).items()}
    for k, (lo, hi) in targets.items():
        if lo > hi:
            raise base.StageError(f"dataset.shots.targets.{k}: min {lo} is above max {hi}", hint="write [min, max]")

    # 1-3. Filters and gates, in one pass over the records.
    threshold = cfg["identity_threshold"]
    if threshold is None:
        threshold = summary.get("default_identity_threshold")
    has_refs = summary.get("references", 0) > 0
    if not has_refs:
        ctx.warn("no reference faces: the identity filter is skipped")
        threshold = None
    else:
        ctx.log(f"identity threshold {threshold} ({'spec' if cfg['identity_threshold'] is not None else 'default for ' + summary['backend']})")
    # 0. The reviewer's decisions (runner review): they come before every automatic rule.
    all_records = list(read_jsonl(adir / "records.jsonl"))
    decided, missing = reviewer_decisions(cfg.get("review") or {}, {r["id"] for r in all_records})
    for m in missing:
        ctx.warn(f"review: a decision ({', '.join(f'{k} {v}' for k, v in m.items() if k != 'image_id')}) is for "
                 f"image {m['image_id']}, which is no longer in the dataset; it is kept in the review file")
    records: dict[str, dict[str, Any]] = {}
    survivors: list[dict[str, Any]] = []
    forced: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for rec in all_records:
        rec["quality"] = quality_score(rec)
        rec.pop("embedding", None)
        for f in rec.get("faces", []):
            f.pop("landmarks", None)  # not needed past analysis; keeps memory small
        dec = decided.get(rec["id"])
        keep_anyway = _reviewed(rec, dec)
        if dec and dec.get("decision") == "drop":
            rejected.append(_reject(rec, "dropped by reviewer", "a reviewer dropped it in runner review"))
            continue
        fail = gate(rec, cfg, threshold)
        if fail and not keep_anyway:
            rejected.append(_reject(rec, *fail))
            continue
        records[rec["id"]] = rec
        (forced if keep_anyway else survivors).append(rec)

    # 4. Near-duplicates (images the reviewer keeps are never dropped as one).
    survivors, dups = dedupe(survivors, int(cfg["dedupe_hamming"]))
    for rec, keeper, dist in dups:
        rejected.append(_reject(rec, "near-duplicate", f"phash distance {dist} <= {cfg['dedupe_hamming']} from "
                                                       f"{keeper.get('source') or keeper['id']} (kept: better quality)"))
    entries = [_entry(r) for r in forced + survivors]
    for e in entries:
        dec = decided.get(e["id"])
        if dec:
            e["review"] = {k: dec[k] for k in ("decision", "shot", "reference", "set") if k in dec}
            e["reference"] = bool(dec.get("reference"))

    # 5. Shot balance.
    before = S.shot_balance_table(((e["categories"], 1) for e in entries), targets)
    strategy = cfg["strategy"]
    repeats_by_shot: dict[str, int] = {}
    if strategy == "select":
        if not targets:
            ctx.warn("strategy select without dataset.shots.targets: nothing to select")
        entries, cut = S.select_to_targets(entries, targets)
        for e, cat in cut:
            rejected.append({**_reject(records[e["id"]], "shot balance",
                                       f"{cat} over its target max {targets[cat][1]:.0%} (lowest quality first)")})
    elif strategy == "reweight":
        if not targets:
            ctx.warn("strategy reweight without dataset.shots.targets: every repeat count stays 1")
        else:
            repeats_by_shot = S.reweight_to_targets(entries, targets, max_repeats=int(cfg["max_repeats"]))
            for e in entries:
                e["repeats"] = repeats_by_shot.get(e["shot"], 1)
    elif strategy == "augment":
        kept_count: dict[str, int] = {}
        for e in entries:
            kept_count[e["shot"]] = kept_count.get(e["shot"], 0) + 1
        image_arts = {n: a for n, a in inputs.items() if n.startswith("images")}
        entries += _crop_entries(entries, records, image_arts, targets, kept_count, int(cfg["augment_min_side"]),
                                 out / "crops", ctx)
    after = S.shot_balance_table(((e["categories"], e["repeats"]) for e in entries), targets)

    # Outputs.
    with (out / "curated.jsonl").open("w", encoding="utf-8") as fh:
        for e in entries:
            fh.write(json.dumps(e) + "\n")
    with (out / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        for r in rejected:
            fh.write(json.dumps(r) + "\n")
            thumb = adir / "thumbs" / f"{r['id']}.jpg"
            if thumb.exists():
                shutil.copyfile(thumb, out / "thumbs" / f"{r['id']}.jpg")
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    balance = {
        "strategy": strategy,
        "targets": targets,
        "identity_threshold": threshold,
        "backend": summary.get("backend"),
        "before": S.table_json(before),
        "after": S.table_json(after),
        "repeats_by_shot": repeats_by_shot,
        "kept": len(entries),
        "crops": sum(1 for e in entries if e["parent"]),
        "rejected": len(rejected),
        "rejected_by_reason": reasons,
    }
    (out / "balance.json").write_text(json.dumps(balance, indent=1), encoding="utf-8")
    review_out = {"applied": len(decided), "missing": missing,
                  "dropped": sum(1 for d in decided.values() if d.get("decision") == "drop"),
                  "kept": sum(1 for e in entries if (e.get("review") or {}).get("decision") == "keep"),
                  "shots": sum(1 for d in decided.values() if d.get("shot")),
                  "references": sum(1 for e in entries if e.get("reference"))}
    (out / "review.json").write_text(json.dumps(review_out, indent=1), encoding="utf-8")
    ctx.metric("images_kept", len(entries))
    ctx.metric("images_rejected", len(rejected))
    for row in after:
        if row.category in S.SHOT_TYPES:
            ctx.metric(f"share_{row.category}", row.share)
    off = [f"{r.category} {r.status} ({r.share:.0%})" for r in after if r.status in ("under", "over")]
    if off:
        ctx.warn("shot balance off target after curation: " + ", ".join(off))
    ctx.log(f"{len(entries)} kept ({balance['crops']} crops), {len(rejected)} rejected: "
            + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())))
    return {"curated": base.Artifact("curated", out, meta={"kept": len(entries), "rejected": len(rejected)})}


# --------------------------------------------------------------------------- report


def read_balance(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "balance.json").read_text(encoding="utf-8"))


def balance_chart(rows: list[dict[str, Any]], title: str):
    from runner.report import charts

    return charts.bar_chart(
        {r["category"]: r["share"] for r in rows},
        ranges={r["category"]: r["target"] for r in rows if r["target"]},
        status={r["category"]: r["status"] for r in rows if r["status"]},
        title=title,
    )


def report_sections(config: dict[str, Any], outputs: dict[str, base.Artifact], env: dict[str, Any]) -> list[base.ReportSection]:
    from runner.report.embed import thumbnail_data_uri

    folder = Path(outputs["curated"].path)
    bal = read_balance(folder)
    px = int(env.get("thumbnail_px", 192))
    limit = int(env.get("gallery_limit", 120))
    rejected = []
    for r in list(read_jsonl(folder / "rejected.jsonl")):
        item = {"source": r.get("source") or r["id"], "reason": r["reason"], "detail": r.get("detail", ""), "src": None}
        thumb = folder / "thumbs" / f"{r['id']}.jpg"
        if thumb.exists() and len(rejected) < limit:
            from PIL import Image

            with Image.open(thumb) as im:
                s = im.size[0] / float(r.get("width") or im.size[0])
                boxes = [[v * s for v in b] for b in r.get("faces", [])]
                item["src"] = thumbnail_data_uri(im.copy(), px, boxes=boxes, box_color="#c92a2a")
        rejected.append(item)
    crops = []
    for e in read_jsonl(folder / "curated.jsonl"):
        if e.get("parent") and len(crops) < min(24, limit):
            crops.append({"src": thumbnail_data_uri(folder / e["file"], px), "caption": f"{e['shot']} from {e['parent']}"})
    show_after = bal["strategy"] in ("select", "reweight", "augment")
    return [
        base.ReportSection(
            title="Curation and shot balance",
            template="sections/curate.html.j2",
            anchor="curate",
            context={
                "balance": bal,
                "chart_before": balance_chart(bal["before"], "Shot balance after filtering" + (" (before balancing)" if show_after else "")),
                "chart_after": balance_chart(bal["after"], f"After {bal['strategy']}" + (" (effective, with repeats)" if bal["strategy"] == "reweight" else "")) if show_after else None,
                "rejected": rejected,
                "crops": crops,
            },
        )
    ]
