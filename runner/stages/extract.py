"""`extract`: frames of the character from the spec's videos, to fill the shot categories the
dataset lacks (targeted re-extraction; docs/analysis.md, "Targeted re-extraction").

One node ``<character>:extract`` between analyze and curate, when the spec has a video source,
``dataset.shots.targets`` and ``dataset.extract.enabled``. It reads analyze's records, applies
curate's gates and near-duplicate rule to know what the curated dataset will hold, and for each
category under its target pulls that many frames (to the middle of the range, capped by
``max_per_category``) from the videos: every sampled frame is analyzed as analyze analyzes an
image, gated as curate gates one, spaced ``min_gap_s`` apart and deduplicated by perceptual hash,
and the shot-balance search keeps only frames that leave no targeted category farther off. With no
category short, no video is decoded.

Outputs:

- ``images``: images/<id>.png + manifest.jsonl in the ingest layout, each line with its
  ``provenance`` (video, timestamp_s, frame_index, reason);
- ``analysis``: records.jsonl in analyze's format (with ``provenance``), thumbs/, and
  summary.json (needs, balance before/after, per-video scan counts, what the videos could not
  supply). curate reads these records beside analyze's, so the frames are curated like any image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.config import node_field, schema_config, to_plain, view_of
from runner.spec.sections import CurationConfig, DatasetConfig, ExtractConfig, ReportConfig, spec_config
from runner.stages.common import VideoFile, backend_options, input_name, read_jsonl, video_files

KIND = "extract"
INPUT = "images:extract"  # the name curate and caption give this stage's images


@schema_config("dataset", "extract")
class ExtractNode(ExtractConfig):
    """The extract stage's node config: dataset.extract (less ``enabled``), the face backend of the
    analysis, dataset.curation, the shot targets and the videos by their variant (the dataset.sources
    index, ``<i>:<path in the folder>`` for each video of a folder or glob source)."""

    face: Mapping[str, Any] | None = node_field(None)  # runner.stages.common.backend_options
    curation: CurationConfig = node_field(CurationConfig.from_dict({}))
    targets: Mapping[str, tuple[float, ...]] = node_field()
    videos: Mapping[str, str] = node_field()


def _videos(dataset: DatasetConfig, graph: contract.GraphView) -> list[VideoFile]:
    """Every video file of the video sources (a folder or glob gives each of its files)."""
    return [vf for i, s in enumerate(dataset.sources) if s.video for vf in video_files(s, i, graph)]


def video_input(variant: str) -> str:
    """The input name of a video: ``video<i>`` (one file), ``video<i>:<path in its folder>`` (made
    safe by stages.common.input_name); ``config.videos`` is keyed by the variant."""
    return input_name(f"video{variant}")


def _source_key(variant: str) -> str:
    """``dataset.sources[1].video`` (and ``(rides/a.mp4)`` for a video of a folder), for messages."""
    i, _, member = variant.partition(":")
    return f"dataset.sources[{i}].video" + (f" ({member})" if member else "")


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    dataset = spec_config(spec).dataset
    opts, targets = dataset.extract, dataset.shots.targets
    analyze = graph.node(contract.node_id(graph.character, "analyze"))
    if not (opts.enabled and analyze is not None and any(lo > 0 for lo, _ in targets.values())):
        return []
    videos = _videos(dataset, graph)
    if not videos:
        return []
    inputs: dict[str, contract.InputRef] = {"analysis": contract.StageOutputRef(analyze.id, "analysis")}
    inputs.update((video_input(vf.variant), vf.file_ref()) for vf in videos)
    config = {
        "face": backend_options(to_plain(dataset.analysis)),
        "curation": dataset.curation.to_dict(),
        "targets": {k: list(v) for k, v in sorted(targets.items())},
        "videos": {vf.variant: vf.rel for vf in videos},
        **{k: v for k, v in opts.to_dict().items() if k != "enabled"},
    }
    return [contract.PlanNode(
        id=contract.node_id(graph.character, KIND), kind=KIND, character=graph.character, config=config, inputs=inputs,
        outputs=("images", "analysis"),
        label=f"frames from {len(videos)} video{'s' if len(videos) != 1 else ''} for shot categories under target",
    )]


# --------------------------------------------------------------------------- what the dataset lacks


def curated_view(records: list[dict[str, Any]], cfg: CurationConfig | dict[str, Any],
                 threshold: float | None) -> list[dict[str, Any]]:
    """The records curate keeps before balancing (gates, then near-duplicates), with quality."""
    from runner.stages.common import dedupe, gate, quality_score

    curation = CurationConfig.from_dict(cfg)
    rules = curation.to_dict()  # curate's gate reads a mapping
    kept = []
    for rec in records:
        rec["quality"] = quality_score(rec)
        if gate(rec, rules, threshold) is None:
            kept.append(rec)
    return dedupe(kept, curation.dedupe_hamming)[0]


def _threshold(cfg: CurationConfig, summary: dict[str, Any]) -> float | None:
    """The identity threshold of curation (the backend's default when unset); None without references."""
    if not summary.get("references"):
        return None
    t = cfg.identity_threshold
    return summary.get("default_identity_threshold") if t is None else t


def _needs(config: ExtractNode, adir: Path) -> tuple[list[Any], list[dict[str, Any]], dict[str, Any]]:
    from runner.video import extract as X
    from runner.vision import balance as B

    summary = json.loads((adir / "summary.json").read_text(encoding="utf-8"))
    kept = curated_view(list(read_jsonl(adir / "records.jsonl")), config.curation,
                        _threshold(config.curation, summary))
    tally = B.Tally.of((r["categories"], 1.0) for r in kept)
    return X.needs(tally, config.targets, config.max_per_category), kept, summary


def plan_notes(config: dict[str, Any], upstream: dict[str, contract.Artifact | None]) -> list[str]:
    """'will extract up to 3 full-body, 2 medium from 1 video to reach targets', or what it looks for."""
    config = ExtractNode.from_dict(config)
    n = len(config.videos)
    vids = f"{n} video{'s' if n != 1 else ''}"
    art = upstream.get("analysis")
    if art is None or not (Path(art.path) / "records.jsonl").exists():
        from runner.vision import balance as B

        wanted = ", ".join(f"{B.label(c)} ({lo:.0%}-{hi:.0%})" for c, (lo, hi) in config.targets.items() if lo > 0)
        return [f"after analysis: will look in {vids} for frames of the categories under target among {wanted}"]
    need_list = _needs(config, Path(art.path))[0]
    if not need_list:
        return ["every targeted category is at or above its minimum: no frames to extract, no video decoded"]
    from runner.vision import balance as B

    return ["will extract up to " + ", ".join(f"{nd.cap} {B.label(nd.category)}" for nd in need_list)
            + f" from {vids} to reach targets"]


# --------------------------------------------------------------------------- run


@contract.register(KIND, version=1, order=25, expand=expand, plan_notes=plan_notes,
               description="Frames of the character from the videos for the shot categories under target.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Frames of the character from the videos for the shot categories under target."""
    from runner.video import extract as X
    from runner.vision import balance as B

    config = ExtractNode.from_dict(config)
    images_dir, adir_out = ctx.out_dir / "images", ctx.out_dir / "analysis"
    (images_dir / "images").mkdir(parents=True)
    (adir_out / "thumbs").mkdir(parents=True)
    adir = Path(inputs["analysis"].path)

    # 1. What the curated dataset will lack.
    need_list, kept, summary = _needs(config, adir)
    before = B.Tally.of((r["categories"], 1.0) for r in kept)
    for nd in need_list:
        lo, hi = nd.target
        ctx.log(f"need {nd.wanted} {B.label(nd.category)} ({nd.share:.0%}, target {lo:.0%}-{hi:.0%})"
                + (f", capped at {nd.cap}" if nd.cap < nd.wanted else ""))

    # 2-3. Scan the videos, pick diverse frames, keep those the balance search adds.
    stats: list[X.ScanStats] = []
    chosen: list[X.Candidate] = []
    lost: dict[str, int] = {}
    if need_list and not summary.get("references"):
        need_list = []
        ctx.warn("extract: no reference faces (character.references), so a frame cannot be checked as the "
                 "character: no video decoded; add references to fill the shot gaps from the videos")
    elif need_list:
        candidates = _scan_videos(config, inputs, summary, {nd.category for nd in need_list}, stats, ctx)
        picks, lost = X.diverse(candidates, {nd.category: nd.cap for nd in need_list},
                                min_gap_s=float(config.min_gap_s), dedupe_hamming=config.curation.dedupe_hamming,
                                dataset_hashes=[r["phash"] for r in kept])
        chosen = X.choose([{"categories": r["categories"], "repeats": 1} for r in kept], picks, config.targets)
    else:
        ctx.log("no targeted category is under its minimum: no video decoded")

    # 4. Write the frames, their records and the summary.
    reasons = {nd.category: nd.reason() for nd in need_list}
    records = _write_frames(chosen, config, inputs, reasons, images_dir, adir_out, ctx)
    after = before
    for rec in records:
        after = after.after(rec["categories"], 1.0)
    missing = X.could_not_supply(need_list, chosen, stats, lost)
    out_summary = {
        "backend": summary.get("backend"),
        "default_identity_threshold": summary.get("default_identity_threshold"),
        "references": summary.get("references", 0),
        "identity_threshold": _threshold(config.curation, summary),
        "targets": config.targets,
        "needs": [{"category": nd.category, "share": nd.share, "target": list(nd.target), "wanted": nd.wanted,
                   "cap": nd.cap, "reason": nd.reason()} for nd in need_list],
        "before": B.table_json(B.shot_balance_table(((r["categories"], 1) for r in kept), config.targets)),
        "after": B.table_json(B.shot_balance_table([(r["categories"], 1) for r in kept]
                                                   + [(r["categories"], 1) for r in records], config.targets)),
        "videos": [s.as_dict() for s in stats],
        "added": len(records),
        "could_not_supply": missing,
    }
    (adir_out / "summary.json").write_text(json.dumps(out_summary, indent=1), encoding="utf-8")
    for line in missing:
        ctx.warn(f"extract: {line}")
    ctx.metric("frames_added", len(records))
    ctx.log(f"{len(records)} frame(s) added from {len(stats)} video(s)")
    return {"images": contract.Artifact("images", images_dir, meta={"count": len(records)}),
            "analysis": contract.Artifact("analysis", adir_out, meta={"count": len(records)})}


def _backend(config: ExtractNode, summary: dict[str, Any], project_root: Path) -> Any:
    """The face backend analyze used (its records and this stage's must be comparable)."""
    from runner.stages.common import make_face_backend, resolve_pack

    opts = resolve_pack(dict(config.face or backend_options({})), project_root)
    opts["name"] = summary.get("backend") or opts["name"]
    return make_face_backend(opts)


def _reference_matrix(adir: Path) -> Any:
    from runner.vision.analysis import reference_matrix

    path = adir / "references.json"
    refs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    import numpy as np

    return reference_matrix([np.asarray(r["embedding"], dtype=np.float32) for r in refs if r.get("used")])


def _scan_videos(config: ExtractNode, inputs: dict[str, contract.Artifact], summary: dict[str, Any],
                 wanted: set[str], stats: list[Any], ctx: contract.StageContext) -> list[Any]:
    from runner.stages.common import gate, quality_score
    from runner.video import extract as X
    from runner.vision.analysis import analyze_image

    backend = _backend(config, summary, Path(ctx.project_root))
    refs = _reference_matrix(Path(inputs["analysis"].path))
    threshold = _threshold(config.curation, summary)
    rules = config.curation.to_dict()  # curate's gate reads a mapping

    def analyze(rgb: Any) -> dict[str, Any]:
        rec = analyze_image(rgb, backend, refs)
        rec["quality"] = quality_score(rec)
        return rec

    gate_fn = lambda r: gate(r, rules, threshold)  # noqa: E731
    out: list[X.Candidate] = []
    for i, rel in config.videos.items():
        files = list(inputs[video_input(i)].files) if video_input(i) in inputs else []
        st, found = scan_video(i, rel, Path(files[0]) if files else None, float(config.sample_fps),
                               analyze, gate_fn, wanted, ctx)
        stats.append(st)
        out += found
    return out


def scan_video(i: int | str, rel: str, path: Path | None, sample_fps: float, analyze: Any, gate_fn: Any,
               wanted: set[str], ctx: contract.StageContext) -> tuple[Any, list[Any]]:
    """One video's scan: (its ScanStats, its candidates). A missing or unreadable file is skipped with
    a warning; a truncated one gives the frames before the break."""
    from runner.video import extract as X
    from runner.video.decode import VideoDecodeError, iter_frames, probe_video

    st = X.ScanStats(rel)
    try:
        if path is None or not path.is_file():
            raise VideoDecodeError("missing", f"{rel} was not found")
        info = probe_video(path)
    except VideoDecodeError as exc:
        st.error = f"{exc.reason}: {exc.detail}"
        ctx.warn(f"{_source_key(str(i))}: {st.error}; skipped")
        return st, []
    stride = max(1, round((info.fps or 25.0) / sample_fps))
    progress = ctx.progress(info.frame_count // stride + 1 if info.frame_count else None, f"extract {Path(rel).name}")
    found = X.scan(_counted(_readable(iter_frames(path, stride=stride), st), progress), rel, analyze, gate_fn,
                   wanted, st)
    progress.close()
    if st.error:
        ctx.warn(f"{_source_key(str(i))}: {st.error}; "
                 + (f"the {st.sampled} frames sampled before it are used" if st.sampled else "skipped"))
    ctx.log(f"{rel}: {st.sampled} frames sampled, {st.candidates} candidates "
            + ", ".join(f"{n} {c}" for c, n in sorted(st.per_category.items())))
    return st, found


def _readable(frames: Any, stats: Any = None) -> Any:
    """The frames a video yields up to a decode error (a truncated file), which ``stats`` records."""
    from runner.video.decode import VideoDecodeError

    try:
        yield from frames
    except VideoDecodeError as exc:
        if stats is not None:
            stats.error = f"{exc.reason}: {exc.detail}"


def _counted(frames: Any, progress: Any) -> Any:
    for fr in frames:
        yield fr
        progress.update(1)


def frame_id(video_sha: str, frame_index: int) -> str:
    return hashlib.sha256(f"{video_sha}:{frame_index}".encode()).hexdigest()[:16]


def _write_frames(chosen: list[Any], config: ExtractNode, inputs: dict[str, contract.Artifact], reasons: dict[str, str],
                  images_dir: Path, adir: Path, ctx: contract.StageContext) -> list[dict[str, Any]]:
    """Decode the chosen frames again and write them, the manifest and the records, in pick order."""
    from PIL import Image

    from runner.core.hashing import file_sha256
    from runner.video.decode import iter_frames
    from runner.vision.analysis import write_thumbnail

    by_video: dict[str, list[Any]] = {}
    for c in chosen:
        by_video.setdefault(c.video, []).append(c)
    files = {rel: Path(inputs[video_input(i)].files[0]) for i, rel in config.videos.items()
             if inputs[video_input(i)].files}
    records = []
    for rel, cands in by_video.items():
        sha = file_sha256(files[rel])
        want = {c.frame_index: c for c in cands}
        for fr in _readable(iter_frames(files[rel], wanted=set(want))):
            c = want[fr.index]
            fid = frame_id(sha, fr.index)
            Image.fromarray(fr.rgb).save(images_dir / "images" / f"{fid}.png", format="PNG", compress_level=1)
            write_thumbnail(fr.rgb, adir / "thumbs" / f"{fid}.jpg")
            prov = {"video": rel, "video_sha256": sha, "timestamp_s": c.timestamp_s, "frame_index": fr.index,
                    "reason": reasons[c.picked_for or c.fills[0]], "categories": list(c.record["categories"])}
            src = f"{rel}@{c.timestamp_s:.2f}s"
            records.append({"id": fid, "input": INPUT, "file": f"images/{fid}.png", "source": src,
                            "label": "extracted", **c.record, "provenance": prov})
    records.sort(key=lambda r: (r["provenance"]["video"], r["provenance"]["frame_index"]))
    with (images_dir / "manifest.jsonl").open("w", encoding="utf-8") as fm, \
            (adir / "records.jsonl").open("w", encoding="utf-8") as fr_out:
        for r in records:
            fm.write(json.dumps({"id": r["id"], "file": r["file"], "source": r["source"], "label": r["label"],
                                 "provenance": r["provenance"]}) + "\n")
            fr_out.write(json.dumps({k: v for k, v in r.items() if k != "quality"}) + "\n")
    return records


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.embed import thumbnail_data_uri
    from runner.stages.common import balance_chart

    adir = Path(outputs["analysis"].path)
    summary = json.loads((adir / "summary.json").read_text(encoding="utf-8"))
    px = view_of(ReportConfig, env).thumbnail_px
    frames = []
    for r in read_jsonl(adir / "records.jsonl"):
        thumb = adir / "thumbs" / f"{r['id']}.jpg"
        frames.append({**r["provenance"], "id": r["id"], "shot": r["shot"], "identity": r.get("identity"),
                       "src": thumbnail_data_uri(thumb, px) if thumb.exists() else None})
    return [contract.ReportSection(
        title="Frames extracted from video", template="sections/extract.html.j2", anchor="extract",
        context={"summary": summary, "frames": frames,
                 "chart_before": balance_chart(summary["before"], "Before extraction (after curate's gates)"),
                 "chart_after": balance_chart(summary["after"], "With the extracted frames")},
    )]
