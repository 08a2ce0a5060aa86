"""`video_identity`: a video source becomes per-person identity sets (anchors, coverage, challenge).

One node per video file: ``<character>:video_identity[<i>]`` for a source naming one file (i = index
in dataset.sources), ``<character>:video_identity[<i>:<path inside the folder or under the glob's
root>]`` for each video file of a folder or glob source (stages.common.video_files).
Outputs:

- ``identity``: person_<k>/{anchors,coverage,challenge}/ (image + _meta.json each), person meta.json
  and timeline.json, pair/ for two people, summary.json (see runner/video/export.py);
- ``images``: images/<id>.png + manifest.jsonl in the ingest layout, so curate and train take the
  frames like any other images input;
- ``quarantine``: quarantine.jsonl; a file that is not a readable video (or is truncated) lands
  here with a reason instead of failing the run.

The reviewer's drops and moves of frames (``runner review``: the ``identity`` section of
``<spec>.review.yaml``, the only part in this stage's key) are applied to the built result before
export (runner/video/review.py), so counts and buckets filled follow them.

The work is in runner.video (pipeline.py reads top to bottom); this module wires it to the spec,
the stage context and the report. Heavy imports stay inside functions.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.config import view_of
from runner.spec.sections import AnalysisConfig, ReportConfig, SourceConfig, VideoOptionsConfig
from runner.stages.common import (IMAGE_EXTENSIONS, VideoFile, rel_path, report_anchor, review_section, video_files,
                                  write_jsonl)

KIND = "video_identity"
# 2: anchor_001.jpg / cov_<bucket>.jpg / challenge_001.jpg layout, meta.json fields (issue 15);
# 3: turned faces admitted by track continuity, "identity" in meta; 4: timeline.json entries carry the
# face box (what the clip cutter for video LoRAs crops around, runner/video/clips.py)
VERSION = 4
REFERENCE_EXTS = IMAGE_EXTENSIONS
# The plan's default for one execution on Modal before any has run: a two-minute ride video at
# about real time on a 2-core container (bench/README.md, video: ~1.5x real time on 2 busy cores at
# stride 5). Estimates learn real figures from the first runs.
TYPICAL_SECONDS = 120.0

def video_option_defaults() -> dict[str, Any]:
    """``dataset.sources[].video_options`` defaults: the schema's (where spec defaults live)."""
    return VideoOptionsConfig.from_dict({}).to_dict()


def _file_ref(path: Path, spec_key: str) -> contract.FileSetRef:
    return contract.FileSetRef(root=path.parent, patterns=(glob.escape(path.name),), recursive=False, spec_key=spec_key)


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    dataset = spec.get("dataset", {}) or {}
    analysis = AnalysisConfig.from_dict(dataset.get("analysis", {}) or {})
    refs = list((spec.get("character", {}) or {}).get("references", []) or [])
    ref_inputs = _reference_inputs(refs, graph)
    reviewed = bool(review_section(graph, "identity"))  # any frame decisions at all (else none per node)
    nodes = []
    for i, raw in enumerate(dataset.get("sources", []) or []):
        if "video" not in raw:
            continue
        src = SourceConfig.from_dict(raw)
        base = {**_node_config(src, i, analysis), "references": refs}
        nodes += [_node(vf, base, ref_inputs, graph, reviewed) for vf in video_files(src, i, graph)]
    return nodes


def _node(vf: VideoFile, base: dict[str, Any], ref_inputs: dict[str, contract.InputRef],
          graph: contract.GraphView, reviewed: bool = True) -> contract.PlanNode:
    """The node of one video file: its config names the file itself (``video``), never the folder or
    glob it came from nor its siblings, so adding a video to the folder leaves the others' keys."""
    node_id = contract.node_id(graph.character, KIND, vf.variant)
    config = {**base, "video": vf.rel}
    unkeyed: tuple[str, ...] = ()
    if vf.member is not None:  # its place in the folder: for the report's anchor only
        config["member"] = vf.member
        unkeyed = ("member",)
    review = review_section(graph, "identity", stage=node_id) if reviewed else {}
    if review:  # the reviewer's drops and moves of frames (runner review): only that part is keyed
        config["review"] = review
    people = config["people"]
    return contract.PlanNode(
        id=node_id, kind=KIND, character=graph.character, config=config,
        inputs={"video": vf.file_ref(), **ref_inputs}, outputs=("identity", "images", "quarantine"),
        unkeyed=unkeyed,
        label=f"{vf.rel}: {people} person{'s' if people != 1 else ''}, every {config['stride']}th frame",
    )


def _reference_inputs(refs: list[str], graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """``references<j>``: the image files of a reference folder, or the reference file."""
    inputs: dict[str, contract.InputRef] = {}
    for j, ref in enumerate(refs):
        rp = Path(ref) if Path(ref).is_absolute() else graph.project_root / ref
        key = f"character.references[{j}]"
        if rp.is_dir():
            patterns = tuple(f"*{e}" for e in REFERENCE_EXTS) + tuple(f"*{e.upper()}" for e in REFERENCE_EXTS)
            inputs[f"references{j}"] = contract.FileSetRef(root=rp, patterns=patterns, recursive=True, spec_key=key)
        else:
            inputs[f"references{j}"] = _file_ref(rp, key)
    return inputs


def _node_config(src: SourceConfig, i: int, analysis: AnalysisConfig) -> dict[str, Any]:
    """A video source's node config (without the references and the review's part)."""
    opts = src.video_options.to_dict()
    if opts["general_fallback"] == "always":  # no model is loaded: naming one changes nothing
        opts["general_model"] = None
    upsample = opts["upsample"] if opts["upsample"] is not None else analysis.upsample
    return {
        "video": src.video,
        "source_index": i,
        "label": src.label,
        "people": int(src.people),
        "stride": int(src.stride),
        "face": {
            "backend": analysis.backend,
            "dlib_detector": analysis.dlib_detector,
            "upsample": int(upsample),
            "insightface_pack": analysis.insightface_pack,
            "insightface_root": analysis.insightface_root,
        },
        "options": {k: v for k, v in opts.items() if k != "upsample"},
    }


def analysis_threads() -> int:
    """Frames analyzed in parallel threads: CHARACTER_RUNNER_VIDEO_THREADS, default 1.

    dlib releases the GIL for part of its HOG detection but holds it through the ResNet identity
    descriptor, so a second thread gains little, and on a busy 2-core machine it was slower
    (bench/README.md, video). Threads change the speed, never the outputs (tracking consumes frames
    in order), so the number is not part of the stage config or its cache key.
    """
    env = os.environ.get("CHARACTER_RUNNER_VIDEO_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return 1


_SPARE_BACKENDS: dict[tuple, list[Any]] = {}
_SPARE_LOCK = threading.Lock()


def _borrow_backends(n: int, key: tuple, factory: Any) -> list[Any]:
    """``n`` face-backend instances for this run's threads, reused across runs in this process
    (loading dlib's models takes about a second each); give them back with _return_backends."""
    with _SPARE_LOCK:
        spare = _SPARE_BACKENDS.setdefault(key, [])
        got = [spare.pop() for _ in range(min(n, len(spare)))]
    while len(got) < n:
        got.append(factory())
    return got


def _return_backends(key: tuple, backends: list[Any]) -> None:
    with _SPARE_LOCK:
        _SPARE_BACKENDS.setdefault(key, []).extend(backends)


def _reference_embeddings(files: list[Path], backend: Any, ctx: contract.StageContext) -> list[Any]:
    import numpy as np
    from PIL import Image, ImageOps

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except Exception as exc:  # an unreadable reference is worth a warning, not a failure
            ctx.warn(f"reference {f.name} could not be read ({exc}); skipped")
            continue
        faces = backend.analyze(rgb)
        if not faces:
            ctx.warn(f"no face found in reference {f.name}; skipped")
            continue
        out.append(faces[0].embedding)
    return out


@dataclass
class VideoJob:
    """The video a run reads and the three output folders it writes."""

    config: dict[str, Any]
    ctx: contract.StageContext
    video: Path
    video_rel: str  # as the spec and the outputs name it
    opts: dict[str, Any]  # video_options as the node config has them (upsample is in face)

    @property
    def options(self) -> VideoOptionsConfig:
        """The typed view of ``opts`` (absent keys: the schema's defaults)."""
        return VideoOptionsConfig.from_dict(self.opts)

    @property
    def identity_dir(self) -> Path:
        return self.ctx.out_dir / "identity"

    @property
    def images_dir(self) -> Path:
        return self.ctx.out_dir / "images"

    @property
    def quarantine_dir(self) -> Path:
        return self.ctx.out_dir / "quarantine"

    @classmethod
    def of(cls, config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext) -> VideoJob:
        for d in (ctx.out_dir / "identity", ctx.out_dir / "images" / "images", ctx.out_dir / "quarantine"):
            d.mkdir(parents=True, exist_ok=True)
        video_art = inputs.get("video")
        files = [Path(f) for f in (video_art.files if video_art else ())]
        if len(files) != 1 or not files[0].is_file():
            raise contract.StageError(
                f"dataset.sources[{config['source_index']}].video: {config['video']} was not found",
                hint="Check the path (relative to the spec file) and that the file exists.",
            )
        return cls(config, ctx, files[0], rel_path(files[0], ctx.project_root), dict(config["options"]))


@contract.register(KIND, version=VERSION, review_view="identity", order=15, expand=expand,
                   typical_seconds=TYPICAL_SECONDS,
                   description="Video -> per-person identity sets: tracks, main person, buckets, novelty, "
                               "anchors/coverage/challenge.",
                   report=lambda config, outputs, env: report_sections(config, outputs, env),
                   report_row=lambda config, outputs: report_row(config, outputs))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Video -> per-person identity sets (anchors, coverage, challenge, pair)."""
    from runner.vision.faces import get_face_backend

    job = VideoJob.of(config, inputs, ctx)
    face_cfg = config["face"]
    backend_kwargs = {"dlib_detector": face_cfg["dlib_detector"], "upsample": face_cfg["upsample"],
                      "insightface_pack": face_cfg["insightface_pack"],
                      "insightface_root": face_cfg["insightface_root"]}
    chosen = get_face_backend(face_cfg["backend"], **backend_kwargs)  # resolves "auto", says why
    ctx.log(f"face backend: {chosen.selection_note or chosen.describe()}")
    workers = analysis_threads()
    if chosen.name != "dlib" or workers == 1:
        # One thread: the process-wide backend (the engine runs local stages one at a time).
        # ONNX Runtime sessions (insightface) are thread-safe and use several cores themselves.
        return _run_with(job, inputs, [chosen], chosen.selection_note, 1)
    # More threads: one more dlib instance per extra thread (dlib's networks are not thread-safe).
    pool_key = (chosen.name, tuple(sorted(backend_kwargs.items())))
    extra = _borrow_backends(workers - 1, pool_key,
                             lambda: get_face_backend(chosen.name, cache=False, **backend_kwargs))
    try:
        return _run_with(job, inputs, [chosen, *extra], chosen.selection_note, workers)
    finally:
        _return_backends(pool_key, extra)


def _run_with(job: VideoJob, inputs: dict[str, contract.Artifact], backends: list[Any], selection_note: str,
              workers: int) -> dict[str, contract.Artifact]:
    from runner.core.hashing import file_sha256
    from runner.video.export import export_result

    ctx, config, backend = job.ctx, job.config, backends[0]
    # 1. the reference faces and the general (novelty) embedder
    ref_files = sorted(Path(f) for name, art in inputs.items() if name.startswith("references") for f in art.files)
    ref_emb = _reference_embeddings(ref_files, backend, ctx) if ref_files else []
    general, general_note = _general_embedder(job.options, ctx)
    # 2. the identity sets, with the reviewer's drops and moves applied
    result = _build(job, backends, general, ref_emb)
    # 3. outputs: quarantine.jsonl, then the sets and the images (runner/video/export.py)
    quarantined = _write_quarantine(job, result)
    summary = export_result(
        result, job.identity_dir, job.images_dir, video_rel=job.video_rel,
        video_sha256=file_sha256(job.video), source_index=int(config["source_index"]), label=config.get("label", ""),
        identity_model=getattr(backend, "embedding_model", backend.name), general_model=general.name,
        general_is_fallback=bool(general.is_fallback),
        extra_summary={
            "face_backend": backend.name,
            "face_backend_note": selection_note,
            "general_note": general_note,
            "general_is_tiny_random": bool(getattr(general, "is_tiny_random", False)),
            "references": [rel_path(f, ctx.project_root) for f in ref_files],
            "reference_faces": len(ref_emb),
            "workers": workers,
        },
    )
    _log_result(ctx, job.video_rel, result, summary)
    return {
        "identity": contract.Artifact("identity", job.identity_dir, meta={"persons": len(summary["persons"]),
                                                                          "empty_reason": result.empty_reason}),
        "images": contract.Artifact("images", job.images_dir, meta={"count": summary["images"]}),
        "quarantine": contract.Artifact("quarantine", job.quarantine_dir, meta={"count": len(quarantined)}),
    }


def _general_embedder(opts: VideoOptionsConfig, ctx: contract.StageContext) -> tuple[Any, str]:
    """The general image embedder novelty is measured with (video_options.general_model)."""
    from runner.video.descriptors import load_general_embedder

    model_ref = opts.general_model
    if model_ref and not Path(model_ref).is_absolute() and (ctx.project_root / model_ref).exists():
        model_ref = str(ctx.project_root / model_ref)  # the resolved spec keeps local paths project-relative
    general, note = load_general_embedder(model_ref, cache_dir=ctx.cache_dir,
                                          fallback=opts.general_fallback, warn=ctx.warn)
    ctx.log(note)
    if getattr(general, "is_tiny_random", False):
        ctx.warn(f"novelty uses {general.name}, a tiny random model: its numbers are meaningless")
    return general, note


def pipeline_options(config: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """build_identity_sets' options from the node config and its video_options (``opts``, complete:
    expand writes every key)."""
    return {
        "people": config["people"],
        "stride": config["stride"],
        "tau": opts.get("tau"),
        "max_per_bucket": opts["max_per_bucket"],
        "novelty_add": opts["novelty_add"],
        "anchors_max": opts["anchors"],
        "challenge_max": opts["challenge"],
        "pair_max": opts["pair_max"] if opts["pair_set"] else 0,
        "crop_scale": opts["crop_scale"],
        "crop_max_side": opts["crop_max_side"],
        "early_stop": opts["early_stop"],
        "stop_novelty": opts["stop_novelty"],
        "conditioning_ratio": opts["conditioning_ratio"],
        "adjust_ratio": opts["adjust_ratio"],
        "full_detect_every": opts["full_detect_every"],
        "profile_detector": opts["profile_detector"],
    }


def _build(job: VideoJob, backends: list[Any], general: Any, ref_emb: list[Any]) -> Any:
    """build_identity_sets on the video (progress per step), then the reviewer's decisions."""
    from runner.video.pipeline import build_identity_sets

    ctx, opts = job.ctx, job.options
    handles: dict[str, Any] = {}

    def progress(desc: str, done: int, total: int | None) -> None:
        h = handles.get(desc)
        if h is None:
            h = handles[desc] = ctx.progress(total, f"{desc} {Path(job.video_rel).name}")
        h.update(done - h.completed if hasattr(h, "completed") else 1)

    result = build_identity_sets(
        str(job.video), face_backend=backends[0], general_embedder=general,
        options=pipeline_options(job.config, {**opts.to_dict(), **job.opts}),
        reference_embeddings=ref_emb, progress=progress, on_truncated=opts.on_truncated,
        extra_backends=backends[1:],
    )
    for h in handles.values():
        h.close()
    if not opts.pair_set:
        result.pairs = []
    if job.config.get("review"):
        from runner.video.review import apply_identity_decisions

        done = apply_identity_decisions(result, job.config["review"].get("identity", {}))
        ctx.log(f"review: {done['dropped']} frame(s) dropped, {done['moved']} moved to another set")
        job.identity_dir.joinpath("review.json").write_text(json.dumps(done, indent=1), encoding="utf-8")
    return result


def _write_quarantine(job: VideoJob, result: Any) -> list[dict[str, Any]]:
    """quarantine.jsonl: the video with the reason, when it is not readable (or truncated)."""
    quarantined = []
    if result.quarantine:
        quarantined.append({"source": job.video_rel, **result.quarantine})
        job.ctx.warn(f"quarantined {job.video_rel}: {result.quarantine['reason']} ({result.quarantine['detail']})")
    write_jsonl(job.quarantine_dir / "quarantine.jsonl", quarantined)
    return quarantined


def _log_result(ctx: contract.StageContext, video_rel: str, result: Any, summary: dict[str, Any]) -> None:
    if result.empty_reason:
        ctx.warn(f"{video_rel}: empty result: {result.empty_reason}")
    for note in result.notes:
        ctx.warn(f"{video_rel}: {note}")
    for p in summary["persons"]:
        ctx.log(f"person {p['person_id']}: {p['anchor_count']} anchors, {p['coverage_count']} coverage, "
                f"{p['challenge_count']} challenge; {p['stop_reason']}: {p['stop_detail']}")
        ctx.metric(f"person{p['person_id']}_saved", p["total_saved"])
    ctx.metric("images", summary["images"])
    ctx.metric("sampled_frames", summary["sampled_frames"])
    if result.info and result.info.duration_s and result.timings.get("total_s"):
        ctx.metric("realtime_ratio", result.info.duration_s / result.timings["total_s"])


# ------------------------------------------------------------------------------------------ report


def coverage_grid(metas: list[dict[str, Any]], px: int, images_root: Path | None = None) -> list[list[dict[str, Any]]]:
    """Rows pitch (up at the top) x columns yaw: count and the best image's thumbnail per cell."""
    from runner.video.buckets import PITCH_BINS, YAW_BINS

    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in metas:
        cells.setdefault((m["bins"]["pitch"], m["bins"]["yaw"]), []).append(m)
    grid = []
    for pitch in reversed(PITCH_BINS):
        row = []
        for yaw in YAW_BINS:
            items = sorted(cells.get((pitch, yaw), []), key=lambda m: -m["quality"])
            cell = {"pitch": pitch, "yaw": yaw, "count": len(items), "src": None}
            if items and images_root is not None and items[0].get("_image"):
                from runner.report.embed import thumbnail_data_uri

                cell["src"] = thumbnail_data_uri(items[0]["_image"], px)
            row.append(cell)
        grid.append(row)
    return grid


def _read_set(folder: Path) -> list[dict[str, Any]]:
    out = []
    if not folder.is_dir():
        return out
    for meta_file in sorted(folder.glob("*_meta.json")):
        m = json.loads(meta_file.read_text(encoding="utf-8"))
        img = folder / m.get("file", meta_file.name[: -len("_meta.json")] + ".png")  # pair/ has no "file"
        m["_image"] = img if img.exists() else None
        out.append(m)
    return out


def report_row(config: dict[str, Any], outputs: dict[str, contract.Artifact]) -> dict[str, Any]:
    """The video's row in the report's table of a ride day's videos (more video_identity stages
    than report.max_sections_per_kind): persons, images, anchors, and what needs a look (a
    quarantined or truncated video, no person found)."""
    summary = json.loads((outputs["identity"].path / "summary.json").read_text(encoding="utf-8"))
    persons = summary.get("persons") or []
    quarantine = summary.get("quarantine") or {}
    attention = (f"quarantined: {quarantine.get('reason', '')}" if quarantine
                 else summary.get("empty_reason") or ("truncated" if summary.get("truncated") else ""))
    row = {"video": summary.get("video", config.get("video", "")), "persons": len(persons),
           "images": summary.get("images", 0), "anchors": sum(int(p.get("anchor_count", 0)) for p in persons)}
    return {**row, "attention": attention} if attention else row


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.charts import line_chart
    from runner.report.embed import thumbnail_data_uri

    root = outputs["identity"].path
    summary_file = root / "summary.json"
    if not summary_file.exists():
        return []
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    rep = view_of(ReportConfig, env)
    px, limit = rep.thumbnail_px, rep.gallery_limit
    persons = []
    for pm in summary["persons"]:
        pdir = root / f"person_{pm['person_id']}"
        sets = {}
        for name in ("anchors", "coverage", "challenge"):
            items = _read_set(pdir / name)
            sets[name] = [{
                "src": thumbnail_data_uri(m["_image"], px) if m["_image"] else None,
                "caption": f"#{m['frame_idx']} · {m['timestamp_ms'] / 1000:.2f}s",
                "bins": m["bins"], "quality": m["quality"], "stable": m["stable"], "novelty": m["novelty"],
                "kinds": m.get("challenge_kinds", []),
            } for m in items[:limit]]
            if name == "coverage":
                grid = coverage_grid(items, max(48, px // 2), root)
        tl_file = pdir / "timeline.json"
        timeline = json.loads(tl_file.read_text(encoding="utf-8")) if tl_file.exists() else []
        stable_pts = [(e["t_s"], e["stable"]) for e in timeline if e.get("stable") is not None]
        nov_pts = [(e["t_s"], e["novelty"]) for e in timeline if e.get("novelty") is not None]
        tau = pm.get("tau")
        series = {"stable(t) = cos(identity, prototype)": stable_pts}
        if stable_pts and tau is not None:
            series[f"tau = {tau}"] = [(stable_pts[0][0], tau), (stable_pts[-1][0], tau)]
        chart_stable = line_chart(series, title=f"Identity stability, person {pm['person_id']}", xlabel="time (s)")
        chart_novelty = line_chart({"novelty(t)": nov_pts}, title=f"Novelty of candidates, person {pm['person_id']}",
                                   xlabel="time (s)")
        persons.append({"meta": pm, "sets": sets, "grid": grid, "chart_stable": chart_stable,
                        "chart_novelty": chart_novelty})
    pairs = []
    for m in _read_set(root / "pair")[:limit]:
        pairs.append({"src": thumbnail_data_uri(m["_image"], px) if m["_image"] else None,
                      "caption": f"#{m['frame_idx']} · {m['timestamp_ms'] / 1000:.2f}s"})
    qpath = outputs["quarantine"].path / "quarantine.jsonl" if "quarantine" in outputs else None
    quarantined = ([json.loads(x) for x in qpath.read_text(encoding="utf-8").splitlines() if x.strip()]
                   if qpath is not None and qpath.exists() else [])
    return [contract.ReportSection(
        title=f"Identity sets from video {summary['video']}",
        template="sections/video_identity.html.j2",
        anchor=report_anchor("video-identity", config),
        context={"summary": summary, "persons": persons, "pairs": pairs, "quarantined": quarantined},
    )]
