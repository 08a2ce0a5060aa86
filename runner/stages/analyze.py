"""`analyze`: faces, pose, expression, quality, shot type, identity and a perceptual hash per image.

Inputs: every upstream artifact named ``images...`` (ingest's ``images``, video identity
builders' ``images``) in the manifest.jsonl layout, and the character's reference images as
file sets ``reference<i>``. Output ``analysis``: a folder with

- ``records.jsonl``: one record per image (see :mod:`runner.vision.analysis` for the fields),
- ``references.json``: each reference file with its main face and embedding, then each image a
  reviewer marked as reference in ``runner review`` (``origin: review``; only that part of
  ``<spec>.review.yaml`` is in this stage's key),
- ``summary.json``: backend, counts per shot type and flag, timing,
- ``thumbs/<id>.jpg``: 256 px thumbnails for the report (face boxes are drawn at report time).

Images are analyzed in a pool of ``dataset.analysis.workers`` processes (0: one per core) and the
records are streamed to disk in input order, so memory stays flat with the dataset's size. On Modal,
``hardware.stage_map.analyze: N`` splits the images over N containers, each with its own pool
(``ctx.map_items``, runner.backends.mapping); the outputs are the same.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.fs import atomic_path
from runner.paths import list_files
from runner.spec.config import node_field, schema_config, schema_default, to_plain, view_of
from runner.spec.sections import ReportConfig, spec_config
from runner.stages.common import (
    IMAGE_EXTENSIONS,
    backend_options,
    image_inputs,
    read_jsonl,
    reference_inputs,
    review_section,
)
from runner.stages.common import make_face_backend as _make_backend
from runner.stages.common import resolve_pack as _resolve_pack

THUMB_PX = 256
MAP_FN = "runner.vision.analysis:analyze_chunk"  # the per-image work, by chunk (ctx.map_items)
FACE_KEYS = ("name", "dlib_detector", "upsample", "insightface_pack", "insightface_root", "max_side")


@schema_config("dataset", "analysis")
class AnalyzeNode:
    """analyze's node config: the face backend's options (runner.stages.common.backend_options:
    dataset.analysis under the backend's names), the worker count, the character's reference
    paths and the reviewer's reference marks (``review``, only when there are some)."""

    name: str = node_field()
    dlib_detector: str = node_field()
    upsample: int = node_field()
    insightface_pack: str = node_field()
    insightface_root: str = node_field()
    max_side: int = node_field()
    workers: int = node_field(schema_default("dataset", "analysis", "workers"))
    references: tuple[str, ...] = node_field(())
    review: Mapping[str, Any] | None = node_field(None)
    map_containers: int | None = node_field(None)  # hardware.stage_map.analyze (unkeyed)

    def face_options(self) -> dict[str, Any]:
        """The options make_face_backend takes."""
        return {k: getattr(self, k) for k in FACE_KEYS}


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    typed = spec_config(spec)
    if not typed.dataset.sources:
        return []
    images = image_inputs(graph)
    if not images:
        return []
    analysis = typed.dataset.analysis
    config = {
        **backend_options(to_plain(analysis)),
        # Only changes speed: passed to run, left out of the cache key (unkeyed below).
        "workers": analysis.workers,
        "references": list(typed.character.references),
    }
    containers = typed.hardware.stage_map.analyze
    if containers and containers > 1:  # speed only: the map's containers (unkeyed below)
        config["map_containers"] = containers
    review = review_section(graph, "references")
    if review:  # images a reviewer marked as references (runner review): only that part is keyed
        config["review"] = review
    return [
        contract.PlanNode(
            id=contract.node_id(graph.character, "analyze"),
            kind="analyze",
            character=graph.character,
            config=config,
            inputs={**images, **reference_inputs(spec, graph)},
            outputs=("analysis",),
            label=f"faces ({analysis.backend}), shot types, identity",
            unkeyed=("workers", "map_containers"),
        )
    ]


def _backend_options_for_workers(backend: Any, opts: dict[str, Any]) -> dict[str, Any]:
    # Workers must build the backend auto picked, not decide again.
    kw = dict(opts)
    kw["name"] = backend.name
    return kw


def _reference_embeddings(config: AnalyzeNode, inputs: dict[str, contract.Artifact], backend: Any,
                          ctx: contract.StageContext) -> tuple[list[Any], list[dict[str, Any]]]:
    from runner.vision.analysis import load_rgb

    embeddings, records = [], []
    ref_names = sorted((n for n in inputs if n.startswith("reference")), key=lambda n: int(n[len("reference"):] or 0))
    for name in ref_names:
        art = inputs[name]
        idx = int(name[len("reference"):] or 0)
        key = art.meta.get("spec_key") or f"character.references[{idx}]"
        files = list(art.files) if art.files else list_files(art.path)
        files = [Path(f) for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise contract.StageError(f"{key}: no image files in {art.path}",
                                  hint="references must be image files or folders of images (jpg, png, webp, ...)")
        for f in sorted(files):
            try:
                rel = f.resolve().relative_to(Path(ctx.project_root).resolve()).as_posix()
            except ValueError:
                rel = str(f)
            try:
                rgb = load_rgb(f)
            except Exception as exc:
                ctx.warn(f"reference {rel} cannot be read ({exc}); skipped")
                records.append({"file": rel, "faces": 0, "used": False, "reason": f"unreadable: {exc}"})
                continue
            faces = backend.analyze(rgb)
            if not faces:
                ctx.warn(f"no face found in reference {rel}; it is not used for identity")
                records.append({"file": rel, "faces": 0, "used": False, "reason": "no face found"})
                continue
            if len(faces) > 1:
                ctx.warn(f"reference {rel} has {len(faces)} faces; the largest is used")
            embeddings.append(faces[0].embedding)
            records.append({"file": rel, "faces": len(faces), "used": True, "box": [round(v, 1) for v in faces[0].box],
                            "embedding": [round(float(v), 6) for v in faces[0].embedding]})
    if ref_names and not embeddings and not _marked(config):
        raise contract.StageError(
            "no face was found in any reference image (" + ", ".join(config.references) + ")",
            hint="character.references should show the character's face clearly; without them the identity filter "
                 "cannot work",
        )
    return embeddings, records


def _marked(config: AnalyzeNode) -> Mapping[str, Any]:
    """The images a reviewer marked as reference, by image id (the review file's ``images``)."""
    return (config.review or {}).get("images") or {}


def _reviewed_references(config: AnalyzeNode, jobs: list[dict[str, Any]], backend: Any,
                         ctx: contract.StageContext) -> tuple[list[Any], list[dict[str, Any]]]:
    """Images a reviewer marked as reference (``review.images``, by image id): their main face
    joins the reference embeddings. A mark for an image no longer in the dataset is a warning."""
    from runner.vision.analysis import load_rgb

    marked = _marked(config)
    by_id = {j["id"]: j for j in jobs}
    embeddings, records = [], []
    for image_id in sorted(marked):
        job = by_id.get(image_id)
        if job is None:
            ctx.warn(f"review: image {image_id} is marked as reference but is no longer in the dataset; not used")
            continue
        name = job["source"] or job["file"]
        rec = {"file": name, "image_id": image_id, "origin": "review"}
        try:
            faces = backend.analyze(load_rgb(Path(job["path"])))
        except Exception as exc:
            ctx.warn(f"review: reference {name} cannot be read ({exc}); not used")
            records.append({**rec, "faces": 0, "used": False, "reason": f"unreadable: {exc}"})
            continue
        if not faces:
            ctx.warn(f"review: no face found in {name}, marked as reference; it is not used for identity")
            records.append({**rec, "faces": 0, "used": False, "reason": "no face found"})
            continue
        embeddings.append(faces[0].embedding)
        records.append({**rec, "faces": len(faces), "used": True, "box": [round(v, 1) for v in faces[0].box],
                        "embedding": [round(float(v), 6) for v in faces[0].embedding]})
    if records:
        ctx.log(f"review: {sum(r['used'] for r in records)} of {len(records)} image(s) marked as reference used")
    return embeddings, records


def _jobs(inputs: dict[str, contract.Artifact], thumbs: Path,
          ctx: contract.StageContext) -> tuple[list[dict[str, Any]], int]:
    """Jobs from every images* input's manifest (records are small; the images stay on disk)."""
    jobs: list[dict[str, Any]] = []
    seen: set[str] = set()
    dupes = 0
    for name in sorted(n for n in inputs if n.startswith("images")):
        art = inputs[name]
        manifest = Path(art.path) / "manifest.jsonl"
        if not manifest.exists():
            raise contract.StageError(f"input {name} has no manifest.jsonl at {manifest}",
                                  hint="image-producing stages must write manifest.jsonl (see the ingest stage)")
        for rec in read_jsonl(manifest):
            if rec["id"] in seen:
                dupes += 1
                continue
            seen.add(rec["id"])
            jobs.append({
                "id": rec["id"], "input": name, "file": rec["file"], "source": rec.get("source", ""),
                "label": rec.get("label", ""), "path": str(Path(art.path) / rec["file"]),
                "thumb": str(thumbs / f"{rec['id']}.jpg"),
            })
    return jobs, dupes


# version 2: pose relative to the line of sight, sharpness (blur) as 100 / sigma^2 on a fixed eye
# distance, eyes.closed, None + unmeasured for faces too small (records of version 1 mean other things)
@contract.register("analyze", version=3, review_view="analysis", order=20, expand=expand,
               description="Per image: faces, pose, expression, quality, shot type, identity, perceptual hash.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Per image: faces, pose, expression, quality, shot type, identity, perceptual hash."""
    from runner.vision.analysis import reference_matrix

    out = Path(ctx.out_dir) / "analysis"
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True)

    config = AnalyzeNode.from_dict(config)
    # 1. The backend ("auto" decides here, once) and the reference embeddings.
    opts = _resolve_pack(config.face_options(), Path(ctx.project_root))
    backend = _make_backend(opts)
    ctx.log(f"face backend: {backend.selection_note}")
    ref_embs, ref_records = _reference_embeddings(config, inputs, backend, ctx)

    # 2. Jobs from the manifests; records streamed to disk in input order.
    jobs, dupes = _jobs(inputs, thumbs, ctx)
    marked_embs, marked_records = _reviewed_references(config, jobs, backend, ctx)
    ref_embs, ref_records = ref_embs + marked_embs, ref_records + marked_records
    if ref_names_present(inputs) and not ref_embs:
        raise contract.StageError("no face was found in any reference image (character.references and the images "
                              "marked as reference in runner review)",
                              hint="references should show the character's face clearly")
    if not ref_embs:
        ctx.warn("no character.references: identity similarity is not computed and the identity filter is skipped")
    refs = reference_matrix(ref_embs)
    if dupes:
        ctx.log(f"{dupes} image(s) appear in more than one input; analyzed once")
    if not jobs:
        ctx.warn("no images to analyze")
    workers = _workers(config, backend, len(jobs), ctx)
    t0 = time.monotonic()
    shared = {"workers": workers, "backend_options": _backend_options_for_workers(backend, opts),
              "refs": None if refs is None else refs.tolist()}
    counts, shots, flags = _analyze_all(ctx.map_items(MAP_FN, jobs, shared, containers=config.map_containers),
                                        len(jobs), out / "records.jsonl", ctx)
    elapsed = time.monotonic() - t0

    summary = {
        "backend": backend.name,
        "selection_note": backend.selection_note,
        "embedding_model": backend.embedding_model,
        "default_identity_threshold": backend.default_identity_threshold,
        "workers": workers,
        "counts": counts,
        "shots": shots,
        "flags": flags,
        "references": sum(1 for r in ref_records if r.get("used")),
        "seconds": round(elapsed, 3),
        "images_per_s": round(counts["images"] / elapsed, 3) if elapsed > 0 else None,
    }
    (out / "references.json").write_text(json.dumps(ref_records, indent=1), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    ctx.metric("images_analyzed", counts["images"])
    ctx.metric("faces_found", counts["faces"])
    ctx.metric("images_without_face", counts["no_face"])
    if summary["images_per_s"]:
        ctx.metric("images_per_s", summary["images_per_s"])
    ctx.log(f"{counts['images']} images analyzed with {workers} worker(s): {counts['faces']} faces, "
            f"{counts['no_face']} without a face, {counts['errors']} unreadable")
    return {"analysis": contract.Artifact("analysis", out, meta={"count": counts["images"], "backend": backend.name})}


def _workers(config: AnalyzeNode, backend: Any, n_jobs: int, ctx: contract.StageContext) -> int:
    """Analysis processes: dataset.analysis.workers (0: one per core), one for insightface on CUDA
    or a handful of images."""
    from runner.vision.analysis import default_workers

    workers = min(default_workers(config.workers), max(1, n_jobs))
    if config.workers == 0 and "CUDAExecutionProvider" in getattr(backend, "providers", []):
        workers = 1  # the GPU does the work; more processes would each hold a CUDA context
        ctx.log("insightface on CUDA: analyzing in one process")
    if n_jobs < 4:
        workers = 1  # starting processes costs more than it saves
    return workers


def _analyze_all(records: Iterator[dict[str, Any]], n_jobs: int, records_file: Path,
                 ctx: contract.StageContext) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Stream the ``records`` of the ``n_jobs`` jobs (in input order) to ``records_file`` (renamed
    into place when complete); (counts, images per shot type, images per flag)."""
    counts = {"images": 0, "faces": 0, "no_face": 0, "errors": 0}
    shots: dict[str, int] = {}
    flags: dict[str, int] = {}
    progress = ctx.progress(n_jobs, "analyze images")
    with atomic_path(records_file) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
            counts["images"] += 1
            counts["faces"] += len(rec.get("faces", []))
            if rec.get("error"):
                counts["errors"] += 1
                ctx.warn(f"{rec.get('source') or rec['id']}: {rec['error']}")
            elif rec.get("no_face"):
                counts["no_face"] += 1
            if not rec.get("error"):
                shots[rec["shot"]] = shots.get(rec["shot"], 0) + 1
                for f, on in rec.get("flags", {}).items():
                    flags[f] = flags.get(f, 0) + int(bool(on))
            progress.update(1)
    progress.close()
    return counts, shots, flags


def ref_names_present(inputs: dict[str, contract.Artifact]) -> bool:
    return any(n.startswith("reference") for n in inputs)


# --------------------------------------------------------------------------- report


def thumb_with_boxes(analysis_dir: Path, rec: dict[str, Any], px: int, *, main_color: str = "#39d353") -> str | None:
    """A data-URI thumbnail of an analyzed image with its face boxes (main face in green)."""
    from PIL import Image, ImageDraw

    from runner.report.embed import image_to_data_uri

    path = Path(analysis_dir) / "thumbs" / f"{rec['id']}.jpg"
    if not path.exists():
        return None
    with Image.open(path) as im:
        img = im.convert("RGB")
    s = img.size[0] / float(rec.get("width") or img.size[0])
    if max(img.size) > px:
        k = px / float(max(img.size))
        img = img.resize((max(1, round(img.size[0] * k)), max(1, round(img.size[1] * k))), Image.Resampling.LANCZOS)
        s *= k
    draw = ImageDraw.Draw(img)
    lw = max(1, round(max(img.size) / 96))
    for i, f in enumerate(rec.get("faces", [])):
        x0, y0, x1, y1 = f["box"]
        draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], outline=main_color if i == rec.get("main_face") else "#f08c00",
                       width=lw)
    return image_to_data_uri(img)


@dataclass
class _Coverage:
    """What the analysis report shows of the records: galleries per shot type, head pose,
    expression and identity distributions, the images without a face."""

    per_shot: int
    galleries: dict[str, list[dict[str, Any]]]
    totals: dict[str, int]
    yaw: list[float] = field(default_factory=list)
    pitch: list[float] = field(default_factory=list)
    identity: list[float] = field(default_factory=list)
    expression: dict[str, int] = field(default_factory=lambda: {"smiling": 0, "mouth_open": 0, "eyes_closed": 0,
                                                                  "neutral": 0})
    pose_buckets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("frontal (|yaw| < 15)", "three-quarter (15-45)", "profile (>= 45)"), 0))
    no_face: list[str] = field(default_factory=list)

    def add(self, rec: dict[str, Any], adir: Path, px: int) -> None:
        shot = rec["shot"]
        self.totals[shot] += 1
        if rec.get("no_face"):
            self.no_face.append(rec.get("source") or rec["id"])
        elif len(self.galleries[shot]) < self.per_shot:
            src = thumb_with_boxes(adir, rec, px)
            if src:
                self.galleries[shot].append({"src": src, "caption": _caption(rec)})
        main = rec["faces"][rec["main_face"]] if rec.get("main_face") is not None else None
        if main is not None and all(math.isfinite(v) for v in main["pose"].values()):
            self._add_face(main["pose"], rec.get("expression") or {})
        if rec.get("identity") is not None:
            self.identity.append(rec["identity"])

    def _add_face(self, pose: dict[str, float], expression: dict[str, Any]) -> None:
        self.yaw.append(pose["yaw"])
        self.pitch.append(pose["pitch"])
        ay = abs(pose["yaw"])
        self.pose_buckets["frontal (|yaw| < 15)" if ay < 15 else "three-quarter (15-45)" if ay < 45
                          else "profile (>= 45)"] += 1
        shown = [k for k in ("smiling", "mouth_open", "eyes_closed") if expression.get(k)]
        for k in shown or ["neutral"]:
            self.expression[k] += 1

    def charts(self, summary: dict[str, Any]) -> dict[str, str]:
        from runner.report import charts

        n_faces = max(1, len(self.yaw))
        out = {
            "yaw": charts.histogram(self.yaw, bins=18, lo=-90, hi=90, title="Yaw (degrees; > 0 = turned to their left)",
                                    xlabel="yaw"),
            "pitch": charts.histogram(self.pitch, bins=12, lo=-45, hi=45, title="Pitch (degrees; > 0 = looking up)",
                                      xlabel="pitch"),
            "pose_buckets": charts.bar_chart({k: v / n_faces for k, v in self.pose_buckets.items()},
                                             title="Head pose coverage"),
            "expression": charts.bar_chart({k.replace("_", " "): v / n_faces for k, v in self.expression.items()},
                                           title="Expression coverage"),
        }
        threshold = summary.get("default_identity_threshold")
        if self.identity:
            lo = min(min(self.identity), threshold or 1.0) - 0.02
            out["identity"] = charts.histogram(self.identity, bins=24, lo=lo, hi=1.0, threshold=threshold,
                                               title="Identity similarity of the main face to the references",
                                               xlabel=f"cosine ({summary['backend']})")
        return out


def _caption(rec: dict[str, Any]) -> str:
    """A gallery caption: the file name, the main face's yaw and identity similarity."""
    face_yaw = rec["faces"][rec["main_face"]]["pose"].get("yaw")
    cap = Path(rec.get("source") or rec["id"]).name
    if face_yaw is not None and math.isfinite(face_yaw):
        cap += f" · yaw {round(face_yaw):d}°"
    if rec.get("identity") is not None:
        cap += f" · id {rec['identity']:.2f}"
    return cap


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.vision.shots import SHOT_TYPES, SHOT_WORDS

    adir = Path(outputs["analysis"].path)
    summary = json.loads((adir / "summary.json").read_text(encoding="utf-8"))
    rep = view_of(ReportConfig, env)
    cov = _Coverage(per_shot=max(4, rep.gallery_limit // len(SHOT_TYPES)),
                    galleries={s: [] for s in SHOT_TYPES}, totals={s: 0 for s in SHOT_TYPES})
    for rec in read_jsonl(adir / "records.jsonl"):
        if not rec.get("error"):
            cov.add(rec, adir, rep.thumbnail_px)
    return [
        contract.ReportSection(
            title="Dataset analysis",
            template="sections/analyze.html.j2",
            anchor="analyze",
            context={
                "summary": summary,
                "galleries": [{"shot": s, "words": SHOT_WORDS[s], "total": cov.totals[s], "items": cov.galleries[s]}
                              for s in SHOT_TYPES],
                "charts": cov.charts(summary),
                "no_face": cov.no_face,
                "has_identity": bool(cov.identity),
            },
        )
    ]
