"""`curate`: keep the character's good images and balance the shot types.

In order: (0) the reviewer's decisions from ``<spec>.review.yaml`` (``runner review``): drop,
keep whatever the gates say, change the shot type, mark as a reference; (1) drop unreadable
images and, with ``require_face``, images without a face; (2) the
identity filter: drop images whose main face is less similar to the references than
``identity_threshold`` (null: the backend's default, measured in docs/analysis.md); (3) quality
gates on the main face (size, blur, clipped exposure); (4) near-duplicates by perceptual hash,
keeping the better image; (5) shot balance against ``dataset.shots.targets`` with one strategy:

- ``report``: the table only;
- ``select``: drop the lowest-quality images while that brings a category closer to its target;
- ``reweight``: repeat counts per category set so effective shares move toward the targets;
- ``augment``: add crops around the detected face that frame it as a narrower shot, and mirrored
  copies when ``allow_flips`` is on; when complex_background stays over its max, the captions of
  those images name the busy background (a caption hint the caption stage adds).

Every strategy obeys runner/vision/balance.py: no move leaves any targeted category farther from
its target, the last image of a category under its target is never dropped, and what stays off
target is written out with the reason and what would fix it (``balance.json`` "shortfalls").

Every dropped image keeps its reason. Output ``curated``: ``curated.jsonl`` (kept images,
crops and mirrored copies), ``rejected.jsonl``, ``balance.json`` (table before/after), ``review.json`` (what the
reviewer's decisions did, and decisions for images no longer in the dataset), ``crops/``, ``mirrors/`` and
``thumbs/`` (small thumbnails of the rejected images, for the report).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.config import view_of
from runner.spec.sections import CurationConfig, ReportConfig, ShotsConfig
from runner.stages.common import CURATION_DEFAULTS as DEFAULTS
from runner.stages.common import (
    analysis_inputs,
    balance_chart,
    curated_image_inputs,
    dedupe,
    gate,
    quality_score,
    read_jsonl,
    review_section,
    write_jsonl,
)
from runner.vision import balance as B
from runner.vision import shots as S

# dataset.shots's settings as the balance strategies read them (the schema's defaults).
SHOT_DEFAULTS = ShotsConfig.from_dict({}).to_dict()
CAPTION_HINTS = {"complex_background": "busy background"}  # flag -> words its captions get when it stays over
SIDED = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    dataset = spec.get("dataset", {})
    analyze = graph.node(contract.node_id(graph.character, "analyze"))
    if not dataset.get("sources") or analyze is None:
        return []
    shots = ShotsConfig.from_dict(dataset.get("shots") or {})
    config = {**CurationConfig.from_dict(dataset.get("curation") or {}).to_dict(),
              "strategy": shots.strategy, "targets": {k: list(v) for k, v in sorted(shots.targets.items())},
              "augment_min_side": shots.augment_min_side, "max_repeats": shots.max_repeats,
              "allow_flips": bool(shots.allow_flips), "sided_traits": sided_traits(spec, shots.to_dict())}
    inputs: dict[str, contract.InputRef] = analysis_inputs(graph)
    review = review_section(graph, "dataset")
    if review:
        config["review"] = review
    if config["strategy"] == "augment":  # crops need the pixels; otherwise records suffice
        inputs.update(curated_image_inputs(graph))
    return [
        contract.PlanNode(
            id=contract.node_id(graph.character, "curate"),
            kind="curate",
            character=graph.character,
            config=config,
            inputs=inputs,
            outputs=("curated",),
            label=f"identity filter, dedupe, quality gates, balance: {config['strategy']}",
        )
    ]


def sided_traits(spec: dict[str, Any], shots: dict[str, Any]) -> list[str]:
    """Fixed traits that name a side ("scar over the left eye"): a mirror would move them, so they
    turn allow_flips off. Empty unless allow_flips is on (so traits do not key curate otherwise)."""
    if not shots.get("allow_flips"):
        return []
    fixed = ((spec.get("character") or {}).get("traits") or {}).get("fixed") or []
    return [t for t in fixed if SIDED.search(t)]


def _reject(rec: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"id": rec["id"], "source": rec.get("source", ""), "input": rec.get("input", ""), "reason": reason,
            "detail": detail, "shot": rec.get("shot"), "identity": rec.get("identity"),
            "faces": [f["box"] for f in rec.get("faces", [])], "main_face": rec.get("main_face"),
            "width": rec.get("width"), "height": rec.get("height")}


def reviewer_decisions(review: dict[str, Any], ids: set[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Step 0: the reviewer's decisions for the analyzed images, and those whose image is gone.

    The review file keys decisions by the image file's sha256 and records the image id analyze
    uses (itself derived from content: a renamed photo keeps both); the stage's section is keyed
    by that id (see :func:`runner.review.decisions.stage_section`)."""
    wanted = {**review.get("identity", {}), **review.get("images", {})}
    decided = {i: d for i, d in wanted.items() if i in ids}
    # A video frame the reviewer dropped is gone because video_identity applied the drop.
    gone = {i for i, d in review.get("identity", {}).items()
            if d.get("decision") == "drop" and i not in review.get("images", {})}
    missing = [{"image_id": i, **d} for i, d in sorted(wanted.items()) if i not in ids and i not in gone]
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
        **({"provenance": rec["provenance"]} if rec.get("provenance") else {}),
    }


def _analysis_records(inputs: dict[str, contract.Artifact]) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The records of every analysis input (analyze's, then the extract stage's frames), and the
    folder holding each extracted record's thumbnail."""
    records: list[dict[str, Any]] = []
    thumb_dirs: dict[str, Path] = {}
    for name in sorted(n for n in inputs if n.startswith("analysis")):
        folder = Path(inputs[name].path)
        for rec in read_jsonl(folder / "records.jsonl"):
            records.append(rec)
            if name != "analysis":
                thumb_dirs[rec["id"]] = folder
    return records, thumb_dirs


# --------------------------------------------------------------------------- 5. shot balance


@dataclass
class Balancing:
    """What a balance strategy works with."""

    entries: list[dict[str, Any]]
    records: dict[str, dict[str, Any]]
    targets: dict[str, list[float]]
    cfg: dict[str, Any]
    images: dict[str, contract.Artifact]
    out: Path
    ctx: contract.StageContext


@dataclass
class Balanced:
    """What it produced: the entries, the images it dropped, repeat counts, what stays off target."""

    entries: list[dict[str, Any]]
    rejected: list[dict[str, Any]] = field(default_factory=list)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    shortfalls: list[B.Shortfall] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tally(entries: list[dict[str, Any]]) -> B.Tally:
    return B.Tally.of((e["categories"], float(e["repeats"])) for e in entries)


def balance_report(job: Balancing) -> Balanced:
    """The table only: nothing changes."""
    return Balanced(job.entries, shortfalls=B.shortfalls(_tally(job.entries), job.targets))


def balance_select(job: Balancing) -> Balanced:
    """Drop the lowest-quality images while that brings a category closer and none farther."""
    if not job.targets:
        job.ctx.warn("strategy select without dataset.shots.targets: nothing to select")
    start = B.off_target(_tally(job.entries), job.targets)
    kept, dropped, short = B.select(job.entries, job.targets, pinned=_pinned)
    rejected = [_reject(job.records[e["id"]], "shot balance", _drop_detail(e, cat, start, job.targets))
                for e, cat in dropped]
    return Balanced(kept, rejected=rejected, shortfalls=short)


def _drop_detail(e: dict[str, Any], cat: str, start: dict[str, str], targets: dict[str, list[float]]) -> str:
    lo, hi = targets[cat]
    if start.get(cat) == "over" and cat in e["categories"]:
        why = f"{cat} over its target max {hi:.0%}"
    elif start.get(cat) == "under" and cat not in e["categories"]:
        why = f"{cat} under its target min {lo:.0%}, and dropping other images raises its share"
    else:
        why = f"with the other shot-balance drops it brings {cat} closer to its target {lo:.0%}–{hi:.0%}"
    return f"{why} (lowest quality first)"


def _pinned(e: dict[str, Any]) -> bool:
    """A reviewer keeps it (or made it a reference): balancing never drops it."""
    return (e.get("review") or {}).get("decision") == "keep" or bool(e.get("reference"))


def balance_reweight(job: Balancing) -> Balanced:
    """Repeat counts per category set, so effective shares move toward the targets."""
    if not job.targets:
        job.ctx.warn("strategy reweight without dataset.shots.targets: every repeat count stays 1")
        return Balanced(job.entries)
    repeats, short = B.reweight(job.entries, job.targets, max_repeats=int(job.cfg["max_repeats"]))
    sizes: dict[tuple[str, ...], int] = {}
    for e in job.entries:
        group = B.signature(e)
        e["repeats"] = repeats[group]
        sizes[group] = sizes.get(group, 0) + 1
    table = [{"categories": list(g), "images": sizes[g], "repeats": r}
             for g, r in sorted(repeats.items(), key=lambda gr: [S.CATEGORIES.index(c) for c in gr[0]])]
    return Balanced(job.entries, repeats=table, shortfalls=short)


def balance_augment(job: Balancing) -> Balanced:
    """Add crops (and mirrored copies when allowed) while that brings the shares closer to the
    targets; name the busy background in captions when complex_background stays over its max."""
    tally = _tally(job.entries)
    need = not job.targets or B.off_target(tally, job.targets)
    candidates = (_crop_candidates(job) + _mirror_candidates(job)) if need else []
    chosen, short = B.add(job.entries, candidates, job.targets)
    parents = {e["id"]: e for e in job.entries}
    derived = [_materialize(e, parents[e["parent"]], job) for e in chosen]
    if derived:
        job.ctx.log("augment: " + ", ".join(f"{n} {k}" for k, n in _derived_counts(derived).items()))
    entries = job.entries + derived
    notes = _caption_hints(entries, job.targets)
    return Balanced(entries, shortfalls=short, notes=notes)


STRATEGIES: dict[str, Callable[[Balancing], Balanced]] = {
    "report": balance_report, "select": balance_select, "reweight": balance_reweight, "augment": balance_augment,
}


# --------------------------------------------------------------------------- augment: candidates


def _crop_candidates(job: Balancing) -> list[tuple[dict[str, Any], tuple]]:
    """Every crop around the main face that frames it as a narrower shot (CROP_LAYOUT), fits in
    the frame, re-classifies as intended and is at least augment_min_side; with the categories the
    crop itself has (its flags are measured on the crop's pixels)."""
    from PIL import Image

    min_side = int(job.cfg["augment_min_side"])
    cands = []
    for p in job.entries:
        boxes = _crop_boxes(p, min_side)
        if not boxes:
            continue
        with Image.open(_source_path(p, job)) as im:
            rgb = im.convert("RGB")
            for shot, box in boxes:
                entry = _crop_entry(p, job.records[p["id"]], rgb.crop(box), shot, box)
                cands.append((entry, (0, -p["quality"], p["id"], shot)))
    return cands


def _crop_boxes(p: dict[str, Any], min_side: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    if p.get("parent") or p.get("face_box") is None or p["flags"].get("occluded"):
        return []
    out = []
    for shot in S.CROP_LAYOUT:
        if S.SHOT_TYPES.index(shot) >= S.SHOT_TYPES.index(p["shot"]):
            continue  # crops only narrow the framing
        box = S.crop_box_for(p["face_box"], (p["width"], p["height"]), shot)
        if box is None or min(box[2] - box[0], box[3] - box[1]) < min_side:
            continue
        fb = p["face_box"]
        if S.classify_shot((fb[0] - box[0], fb[1] - box[1], fb[2] - box[0], fb[3] - box[1]), box[3] - box[1]) == shot:
            out.append((shot, box))
    return out


def _crop_entry(parent: dict[str, Any], rec: dict[str, Any], crop, shot: str,
                box: tuple[int, int, int, int]) -> dict[str, Any]:
    """The entry of a crop: the parent's faces moved into the crop, flags measured on its pixels."""
    import numpy as np

    from runner.vision import measures as M

    w, h = crop.size
    faces = []
    for f in rec["faces"]:
        b = f["box"]
        nb = [b[0] - box[0], b[1] - box[1], b[2] - box[0], b[3] - box[1]]
        if nb[2] > 0 and nb[3] > 0 and nb[0] < w and nb[1] < h:
            faces.append({**f, "box": nb, "truncation": M.truncation(nb, w, h), "landmarks_outside": None})
    faces.sort(key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]), reverse=True)
    edges = M.background_edge_density(np.asarray(crop), [f["box"] for f in faces])
    flags = S.image_flags(faces, 0 if faces else None, edges)
    main_h = (faces[0]["box"][3] - faces[0]["box"][1]) if faces else 0
    cid = hashlib.sha256(f"{parent['id']}:{shot}:{box}".encode()).hexdigest()[:16]
    return {
        **parent, "id": cid, "input": None, "file": f"crops/{cid}.png", "width": w, "height": h,
        "shot": shot, "categories": S.categories_of(shot, flags), "flags": flags, "repeats": 1,
        "parent": parent["id"], "crop_box": list(box), "mirrored": False,
        "face_box": faces[0]["box"] if faces else None,
        "people": sum(1 for f in faces if (f["box"][3] - f["box"][1]) >= S.SUBSTANTIAL_FACE * main_h),
    }


def _mirror_candidates(job: Balancing) -> list[tuple[dict[str, Any], tuple]]:
    """A left-right mirrored copy of every original image, when dataset.shots.allow_flips is on
    and no fixed trait names a side."""
    if not job.cfg.get("allow_flips"):
        return []
    if job.cfg.get("sided_traits"):
        job.ctx.warn("dataset.shots.allow_flips is on, but character.traits.fixed names a side ("
                     + "; ".join(repr(t) for t in job.cfg["sided_traits"]) + "): no mirrored copies, a mirror "
                     "would move it to the other side")
        return []
    return [(_mirror_entry(e), (1, -e["quality"], e["id"])) for e in job.entries if not e.get("parent")]


def _mirror_entry(e: dict[str, Any]) -> dict[str, Any]:
    """A mirrored copy's entry: x coordinates, yaw, roll and the lighting side change sign."""
    mid = hashlib.sha256(f"{e['id']}:mirror".encode()).hexdigest()[:16]
    w = e["width"]
    fb = e.get("face_box")
    pose = e.get("pose")
    exposure = e.get("exposure")
    return {
        **e, "id": mid, "input": None, "file": f"mirrors/{mid}.png", "parent": e["id"], "crop_box": None,
        "mirrored": True, "repeats": 1,
        "face_box": [w - fb[2], fb[1], w - fb[0], fb[3]] if fb else None,
        "pose": {**pose, "yaw": -pose["yaw"], "roll": -pose["roll"]} if pose else pose,
        "exposure": {**exposure, "side_balance": -exposure.get("side_balance", 0.0)} if exposure else exposure,
    }


def _source_path(e: dict[str, Any], job: Balancing) -> Path:
    if e.get("parent"):
        return job.out / e["file"]
    return Path(job.images[e["input"]].path) / e["file"]


def _materialize(entry: dict[str, Any], parent: dict[str, Any], job: Balancing) -> dict[str, Any]:
    """Write a chosen crop or mirrored copy as PNG under the output folder."""
    from PIL import Image, ImageOps

    dest = job.out / entry["file"]
    dest.parent.mkdir(exist_ok=True)
    with Image.open(_source_path(parent, job)) as im:
        rgb = im.convert("RGB")
        img = ImageOps.mirror(rgb) if entry["mirrored"] else rgb.crop(tuple(entry["crop_box"]))
    img.save(dest, format="PNG", compress_level=1)
    return entry


def _derived_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        if e.get("parent"):
            kind = "mirrored copies" if e.get("mirrored") else f"{e['shot']} crops"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _caption_hints(entries: list[dict[str, Any]], targets: dict[str, list[float]]) -> list[str]:
    """When a flag stays over its max, captions of its images name it (CAPTION_HINTS), so the
    LoRA learns it as its own concept instead of part of the character."""
    tally = _tally(entries)
    notes = []
    for flag, hint in CAPTION_HINTS.items():
        if flag in targets and B.status_of(tally.share(flag), targets[flag]) == "over":
            tagged = [e for e in entries if flag in e["categories"]]
            for e in tagged:
                e["caption_hints"] = [*e.get("caption_hints", []), hint]
            notes.append(f"{len(tagged)} caption(s) of {B.label(flag)} images name the {hint}")
    return notes


# --------------------------------------------------------------------------- what stays off target


def shortfall_text(s: B.Shortfall, strategy: str, cfg: dict[str, Any]) -> str:
    """"full-body 0% (target 25–30%): no candidates; add full-body photos or a video source"."""
    head = f"{B.label(s.category)} {s.share:.0%} (target {s.target[0]:.0%}–{s.target[1]:.0%})"
    if strategy == "report":
        why = "strategy report changes nothing"
    elif s.blockers:
        why = (f"every {MOVE_WORDS[strategy]} that would help pushes "
               + ", ".join(B.label(c) for c in s.blockers) + " farther off target")
    elif s.status == "under" and not s.count:
        why = "no candidates"
    else:
        why = NO_MOVE[strategy].format(max_repeats=cfg["max_repeats"])
    return f"{head}: {why}; {_advice(s, strategy, cfg)}"


MOVE_WORDS = {"select": "image select could drop", "reweight": "extra repeat", "augment": "crop or mirrored copy"}
NO_MOVE = {
    "select": "select only drops images, and no drop helps (the last image of a category is kept)",
    "reweight": "no repeat count can help within max_repeats {max_repeats}",
    "augment": "no crop or mirrored copy of the kept images has it",
}
ADD_WORDS = {
    "multi_character": "add photos of the character with other people",
    "complex_background": "add photos with busy backgrounds (street, stage, crowd)",
    "occluded": "add photos with the face partly hidden or cut by the frame",
}


def _advice(s: B.Shortfall, strategy: str, cfg: dict[str, Any]) -> str:
    if s.status == "under":
        words = ADD_WORDS.get(s.category, f"add {B.label(s.category)} photos or a video source")
        if strategy == "augment" and s.count and not cfg.get("allow_flips"):
            words += " (or set dataset.shots.allow_flips for mirrored copies, if the character is symmetric)"
        return words
    words = (f"add images that are not {B.label(s.category)}"
             + ("" if strategy == "select" else ", or use strategy select"))
    if s.category in CAPTION_HINTS and strategy == "augment":
        words += ("; augment cannot replace a background (that needs person segmentation, which the runner does "
                  f"not do), so the captions of these images name the {CAPTION_HINTS[s.category]}")
    return words


@dataclass
class Sorting:
    """Steps 0-4: the records that pass (``forced``: kept by a reviewer whatever the gates say) and
    the rejected ones with their reasons."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    survivors: list[dict[str, Any]] = field(default_factory=list)
    forced: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


@contract.register("curate", version=2, review_view="curation", order=30, expand=expand,
               description="Identity filter, near-duplicate removal, quality gates and shot balance.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Identity filter, near-duplicate removal, quality gates and shot balance."""
    cfg = {**DEFAULTS, **SHOT_DEFAULTS, **config}
    adir = Path(inputs["analysis"].path)
    summary = json.loads((adir / "summary.json").read_text(encoding="utf-8"))
    out = Path(ctx.out_dir) / "curated"
    (out / "crops").mkdir(parents=True)
    (out / "thumbs").mkdir()
    targets = _targets(cfg)
    threshold = _identity_threshold(cfg, summary, ctx)

    # 0. The reviewer's decisions (runner review): they come before every automatic rule.
    all_records, thumb_dirs = _analysis_records(inputs)
    decided, missing = _decisions(cfg, all_records, ctx)
    # 1-3. Filters and gates, in one pass over the records.
    sorting = _filter(all_records, decided, cfg, threshold)
    # 4. Near-duplicates (images the reviewer keeps are never dropped as one).
    entries = _deduped_entries(sorting, decided, cfg)
    # 5. Shot balance (STRATEGIES; runner/vision/balance.py holds the rules every strategy obeys).
    images = {n: a for n, a in inputs.items() if n.startswith("images")}
    before = B.shot_balance_table(((e["categories"], 1) for e in entries), targets)
    balanced = STRATEGIES[cfg["strategy"]](Balancing(entries, sorting.records, targets, cfg, images, out, ctx))
    entries = balanced.entries
    rejected = sorting.rejected + balanced.rejected
    after = B.shot_balance_table(((e["categories"], e["repeats"]) for e in entries), targets)
    shortfalls = [shortfall_text(sf, cfg["strategy"], cfg) for sf in balanced.shortfalls]

    # 6. Outputs.
    _write_lists(out, entries, rejected, thumb_dirs, adir)
    balance = _balance_json(cfg, targets, threshold, summary, (before, after), balanced, shortfalls, entries, rejected)
    (out / "balance.json").write_text(json.dumps(balance, indent=1), encoding="utf-8")
    (out / "review.json").write_text(json.dumps(_review_json(decided, missing, entries), indent=1), encoding="utf-8")
    _report_run(ctx, balance, after, shortfalls)
    return {"curated": contract.Artifact("curated", out, meta={"kept": len(entries), "rejected": len(rejected)})}


def _targets(cfg: dict[str, Any]) -> dict[str, list[float]]:
    targets = {k: list(v) for k, v in (cfg["targets"] or {}).items()}
    for k, (lo, hi) in targets.items():
        if lo > hi:
            raise contract.StageError(f"dataset.shots.targets.{k}: min {lo} is above max {hi}", hint="write [min, max]")
    return targets


def _identity_threshold(cfg: dict[str, Any], summary: dict[str, Any], ctx: contract.StageContext) -> float | None:
    """The spec's identity threshold, else the backend's default; None without reference faces."""
    threshold = cfg["identity_threshold"]
    if threshold is None:
        threshold = summary.get("default_identity_threshold")
    if not summary.get("references", 0) > 0:
        ctx.warn("no reference faces: the identity filter is skipped")
        return None
    source = "spec" if cfg["identity_threshold"] is not None else "default for " + summary["backend"]
    ctx.log(f"identity threshold {threshold} ({source})")
    return threshold


def _decisions(cfg: dict[str, Any], records: list[dict[str, Any]],
               ctx: contract.StageContext) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    decided, missing = reviewer_decisions(cfg.get("review") or {}, {r["id"] for r in records})
    for m in missing:
        ctx.warn(f"review: a decision ({', '.join(f'{k} {v}' for k, v in m.items() if k != 'image_id')}) is for "
                 f"image {m['image_id']}, which is no longer in the dataset; it is kept in the review file")
    return decided, missing


def _filter(records: list[dict[str, Any]], decided: dict[str, dict[str, Any]], cfg: dict[str, Any],
            threshold: float | None) -> Sorting:
    sorting = Sorting()
    for rec in records:
        rec["quality"] = quality_score(rec)
        rec.pop("embedding", None)
        for f in rec.get("faces", []):
            f.pop("landmarks", None)  # not needed past analysis; keeps memory small
        dec = decided.get(rec["id"])
        keep_anyway = _reviewed(rec, dec)
        if dec and dec.get("decision") == "drop":
            sorting.rejected.append(_reject(rec, "dropped by reviewer", "a reviewer dropped it in runner review"))
            continue
        fail = gate(rec, cfg, threshold)
        if fail and not keep_anyway:
            sorting.rejected.append(_reject(rec, *fail))
            continue
        sorting.records[rec["id"]] = rec
        (sorting.forced if keep_anyway else sorting.survivors).append(rec)
    return sorting


def _deduped_entries(sorting: Sorting, decided: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    survivors, dups = dedupe(sorting.survivors, int(cfg["dedupe_hamming"]))
    for rec, keeper, dist in dups:
        detail = (f"phash distance {dist} <= {cfg['dedupe_hamming']} from "
                  f"{keeper.get('source') or keeper['id']} (kept: better quality)")
        sorting.rejected.append(_reject(rec, "near-duplicate", detail))
    entries = [_entry(r) for r in sorting.forced + survivors]
    for e in entries:
        dec = decided.get(e["id"])
        if dec:
            e["review"] = {k: dec[k] for k in ("decision", "shot", "reference", "set") if k in dec}
            e["reference"] = bool(dec.get("reference"))
    return entries


def _write_lists(out: Path, entries: list[dict[str, Any]], rejected: list[dict[str, Any]],
                 thumb_dirs: dict[str, Path], adir: Path) -> None:
    """curated.jsonl, rejected.jsonl and the rejected images' thumbnails."""
    write_jsonl(out / "curated.jsonl", entries)
    write_jsonl(out / "rejected.jsonl", rejected)
    for r in rejected:
        thumb = thumb_dirs.get(r["id"], adir) / "thumbs" / f"{r['id']}.jpg"
        if thumb.exists():
            shutil.copyfile(thumb, out / "thumbs" / f"{r['id']}.jpg")


def _balance_json(cfg: dict[str, Any], targets: dict[str, list[float]], threshold: float | None,
                  summary: dict[str, Any], tables: tuple[Any, Any], balanced: Balanced, shortfalls: list[str],
                  entries: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "strategy": cfg["strategy"],
        "targets": targets,
        "identity_threshold": threshold,
        "backend": summary.get("backend"),
        "before": B.table_json(tables[0]),
        "after": B.table_json(tables[1]),
        "repeats": balanced.repeats,
        "shortfalls": [{"category": sf.category, "share": sf.share, "target": list(sf.target), "status": sf.status,
                        "text": text} for sf, text in zip(balanced.shortfalls, shortfalls)],
        "notes": balanced.notes,
        "kept": len(entries),
        "crops": sum(1 for e in entries if e["parent"] and not e.get("mirrored")),
        "mirrors": sum(1 for e in entries if e.get("mirrored")),
        "rejected": len(rejected),
        "rejected_by_reason": reasons,
    }


def _review_json(decided: dict[str, dict[str, Any]], missing: list[dict[str, Any]],
                 entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What the reviewer's decisions did (review.json)."""
    return {"applied": len(decided), "missing": missing,
            "dropped": sum(1 for d in decided.values() if d.get("decision") == "drop"),
            "kept": sum(1 for e in entries if (e.get("review") or {}).get("decision") == "keep"),
            "shots": sum(1 for d in decided.values() if d.get("shot")),
            "references": sum(1 for e in entries if e.get("reference"))}


def _report_run(ctx: contract.StageContext, balance: dict[str, Any], after: Any, shortfalls: list[str]) -> None:
    ctx.metric("images_kept", balance["kept"])
    ctx.metric("images_rejected", balance["rejected"])
    for row in after:
        if row.category in S.SHOT_TYPES:
            ctx.metric(f"share_{row.category}", row.share)
    if shortfalls:
        ctx.warn("shot balance off target after curation: " + "; ".join(shortfalls))
    reasons = balance["rejected_by_reason"]
    ctx.log(f"{balance['kept']} kept ({balance['crops']} crops, {balance['mirrors']} mirrored), "
            f"{balance['rejected']} rejected: " + ", ".join(f"{v} {k}" for k, v in sorted(reasons.items())))


# --------------------------------------------------------------------------- report


def read_balance(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "balance.json").read_text(encoding="utf-8"))


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.embed import thumbnail_data_uri

    folder = Path(outputs["curated"].path)
    bal = read_balance(folder)
    rep = view_of(ReportConfig, env)
    px, limit = rep.thumbnail_px, rep.gallery_limit
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
            what = f"mirror of {e['parent']}" if e.get("mirrored") else f"{e['shot']} from {e['parent']}"
            crops.append({"src": thumbnail_data_uri(folder / e["file"], px), "caption": what})
    show_after = bal["strategy"] in ("select", "reweight", "augment")
    return [
        contract.ReportSection(
            title="Curation and shot balance",
            template="sections/curate.html.j2",
            anchor="curate",
            context={
                "balance": bal,
                "chart_before": balance_chart(bal["before"], "Shot balance after filtering"
                                              + (" (before balancing)" if show_after else "")),
                "chart_after": balance_chart(bal["after"], f"After {bal['strategy']}" + (
                    " (effective, with repeats)" if bal["strategy"] == "reweight" else "")) if show_after else None,
                "rejected": rejected,
                "crops": crops,
            },
        )
    ]
