"""`video_clips`: short clips of the main person cut from each video source, for the video LoRA.

One node per video_identity node, with the same variant: ``<character>:video_clips[<i>]`` for a
source naming one file (i = its index in dataset.sources), ``video_clips[<i>:<path in the folder>]``
for each video of a folder or glob source (stages.common.video_files); planned only when the spec
has a ``train_video`` section with ``clips.enabled``. Inputs: ``video``, that one file (its bytes
are in the key), and ``identity`` of the video_identity node of the same variant (the main
person's face box per analyzed frame, in person_<k>/timeline.json). Config: train_video.clips
(frames, stride, max_per_source, caption, margin, max_gap, max_side) with character.trigger and
class_word for the captions, and for a folder's video its ``member`` path (in its clip ids).

Output ``clips``, the folder train_video reads (runner.diffusion.data.read_clips):
``clips.jsonl`` (per clip: id, clip, caption, frames, fps, width, height, shot, and its source,
person, frames and crop box), ``clips/<id>.mp4`` (H.264) and ``summary.json``. A faceless or
unreadable video gives zero clips and a warning, not a failure. The clips are written into a
side folder that is renamed into place once complete. The cutting is runner.video.clips.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.sections import spec_config
from runner.stages.common import VideoFile, check_fields, rel_path, report_anchor, video_files

KIND = "video_clips"
VERSION = 1
CAPTION_FIELDS = ("trigger", "class", "shot")


def check_caption(template: str) -> None:
    """train_video.clips.caption may name {trigger}, {class} and {shot} only (refused at plan time)."""
    check_fields(template, "train_video.clips.caption", CAPTION_FIELDS)


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    typed = spec_config(spec)
    section = typed.train_video
    if section is None or not section.clips.enabled:
        return []
    clips = section.clips
    check_caption(clips.caption)
    notes = _fit_notes(section)
    identity = {n.id: n for n in graph.nodes_of("video_identity")}
    base = {**clips.to_dict(), "trigger": typed.character.trigger, "class_word": typed.character.class_word}
    base.pop("enabled")
    nodes = []
    for i, src in enumerate(typed.dataset.sources):
        for vf in video_files(src, i, graph):
            ident = identity.get(contract.node_id(graph.character, "video_identity", vf.variant))
            if ident is not None:
                nodes.append(_node(vf, ident, base, notes, graph))
    return nodes


def _node(vf: VideoFile, identity: contract.PlanNode, base: dict[str, Any], notes: tuple[str, ...],
          graph: contract.GraphView) -> contract.PlanNode:
    """The clips of one video file, paired with the video_identity node of the same variant."""
    config = {"video": vf.rel, "source_index": int(vf.variant.split(":", 1)[0]), **base}
    if vf.member is not None:  # keyed: the clip ids of a folder's videos carry it (unique per video)
        config["member"] = vf.member
    return contract.PlanNode(
        id=contract.node_id(graph.character, KIND, vf.variant), kind=KIND, character=graph.character,
        config=config, inputs={"video": vf.file_ref(), "identity": contract.StageOutputRef(identity.id, "identity")},
        outputs=("clips",), notes=notes,
        label=f"{vf.rel}: up to {base['max_per_source']} clips of {base['frames']} frames"
              + (f", every {base['stride']}th frame" if base["stride"] > 1 else ""),
    )


def clip_id_prefix(config: dict[str, Any]) -> str:
    """``s<source index>_``, and for a video of a folder or glob source a short hash of its path
    there (``s2_1f0c3a9b_``): clip ids stay unique across every video train_video reads."""
    import hashlib

    prefix = f"s{int(config['source_index'])}_"
    member = config.get("member")
    return prefix + (f"{hashlib.sha256(member.encode()).hexdigest()[:8]}_" if member else "")


def _fit_notes(section: Any) -> tuple[str, ...]:
    """What train_video will make of the clips: left out when shorter than every frame bucket above
    one frame, scaled up when their longest side is under the training resolution."""
    clips, notes = section.clips, []
    longer = sorted(int(f) for f in section.frame_buckets if int(f) > 1)
    if longer and clips.frames < longer[0]:
        notes.append(f"train_video.clips.frames {clips.frames} is shorter than every frame bucket above 1 "
                     f"({longer}): train_video leaves these clips out")
    if clips.max_side < section.resolution:
        notes.append(f"train_video.clips.max_side {clips.max_side} is under train_video.resolution "
                     f"{section.resolution}: the trainer scales the clips up")
    return tuple(notes)


def plan_notes(config: dict[str, Any], upstream: dict[str, contract.Artifact | None]) -> list[str]:
    """How many clips the main person's track gives, once video_identity's output is in the store."""
    from runner.video.clips import main_person_timeline, plan_windows, track_gap

    identity = upstream.get("identity")
    if identity is None:
        return [f"clips of {config['frames']} frames around the main person's track, once video_identity has run"]
    pid, tl, reason = main_person_timeline(identity.path)
    if reason:
        return [f"no clips: {reason}"]
    windows = plan_windows(tl, frames=config["frames"], stride=config["stride"],
                           max_gap=track_gap(tl, config["stride"], config["max_gap"]),
                           max_clips=config["max_per_source"])
    return [f"{len(windows)} clip(s) of {config['frames']} frames along person {pid}'s track"
            + ("" if windows else f" (no continuous stretch of {config['frames']} frames)")]


def _video_file(config: dict[str, Any], inputs: dict[str, contract.Artifact]) -> Path:
    art = inputs.get("video")
    files = [Path(f) for f in (art.files if art else ())]
    if len(files) != 1 or not files[0].is_file():
        raise contract.StageError(f"dataset.sources[{config['source_index']}].video: {config['video']} was not found",
                                  hint="Check the path (relative to the spec file) and that the file exists.")
    return files[0]


@contract.register(KIND, version=VERSION, order=17, expand=expand, plan_notes=plan_notes,
                   report=lambda config, outputs, env: report_sections(config, outputs, env),
                   report_row=lambda config, outputs: report_row(config, outputs),
                   description="Short clips of the main person cut around their face track in a video source, "
                               "for the video LoRA.")
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Short clips of the main person cut around their face track in a video source, for the video LoRA."""
    from runner.video.clips import cut_clips

    video = _video_file(config, inputs)
    video_rel = rel_path(video, ctx.project_root)
    final, partial = ctx.out_dir / "clips", ctx.out_dir / "clips.partial"
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.monotonic()
    summary = cut_clips(video, inputs["identity"].path, partial, frames=int(config["frames"]),
                        stride=int(config["stride"]), max_per_source=int(config["max_per_source"]),
                        caption=config["caption"], trigger=config["trigger"], class_word=config["class_word"],
                        max_side=int(config["max_side"]), margin=float(config["margin"]), max_gap=config["max_gap"],
                        source=video_rel, id_prefix=clip_id_prefix(config))
    summary["elapsed_s"] = round(time.monotonic() - t0, 3)
    (partial / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)  # the folder appears complete or not at all
    _log(ctx, video_rel, summary)
    return {"clips": contract.Artifact("clips", final, meta={"count": summary["clips"], "shots": summary["shots"]})}


def _log(ctx: contract.StageContext, video_rel: str, summary: dict[str, Any]) -> None:
    if not summary["clips"]:
        ctx.warn(f"{video_rel}: no clips cut: {summary['reason']}")
    else:
        shots = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(summary["shots"].items()))
        ctx.log(f"{video_rel}: {summary['clips']} clip(s), {summary['clip_seconds']:.1f} s ({shots})")
        if summary["reason"]:
            ctx.warn(f"{video_rel}: {summary['reason']}")
    ctx.metric("clips", summary["clips"])
    ctx.metric("clip_seconds", summary["clip_seconds"])
    if summary.get("source_seconds") and summary["elapsed_s"]:
        ctx.metric("realtime_ratio", summary["source_seconds"] / summary["elapsed_s"])


def report_row(config: dict[str, Any], outputs: dict[str, contract.Artifact]) -> dict[str, Any]:
    """The video's row in the report's table of video_clips stages (a folder of ride videos): clips,
    seconds, and why none were cut when none were."""
    summary = json.loads((outputs["clips"].path / "summary.json").read_text(encoding="utf-8"))
    row = {"video": summary.get("source", config.get("video", "")), "clips": summary.get("clips", 0),
           "clip_seconds": summary.get("clip_seconds", 0.0)}
    if not summary.get("clips"):
        row["attention"] = f"no clips: {summary.get('reason') or 'none cut'}"
    return row


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    folder = outputs["clips"].path
    summary_file = folder / "summary.json"
    if not summary_file.exists():
        return []
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    records = [json.loads(x) for x in (folder / "clips.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    return [contract.ReportSection(
        title=f"Training clips from video {summary['source']}", template="sections/video_clips.html.j2",
        anchor=report_anchor("video-clips", config),
        context={"summary": summary, "records": records, "config": config})]
