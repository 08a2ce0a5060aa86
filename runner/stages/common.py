"""Helpers the stage kinds share; no stage module imports another stage module, only this one
(and runner.core). Not a stage kind itself.

Sections: files and records; plan-time inputs (what ``expand`` wires); the face backend and other
models (what ``run`` loads); curation rules (curate, extract and the review pages apply the same
gates); report and resume helpers; experiment tracking.

Like every module under runner/stages, it keeps heavy imports inside functions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.paths import list_files, split_glob, video_files_under
from runner.spec.sections import CurationConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------- files and records


def rel_path(p: Path | str, root: Path | str) -> str:
    """``p`` relative to ``root`` (posix) when inside it, else as given."""
    try:
        return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(p)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, rows: Any) -> None:
    """One JSON record per line."""
    with Path(path).open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)


def reference_files(inputs: dict[str, contract.Artifact]) -> list[Path]:
    """Image files of every input named ``reference*`` (file sets of character.references)."""
    files: list[Path] = []
    for name in sorted(inputs):
        if not name.startswith("reference"):
            continue
        art = inputs[name]
        cands = list(art.files) if art.files else list_files(art.path)
        files += [Path(f) for f in cands if Path(f).suffix.lower() in IMAGE_EXTENSIONS and Path(f).is_file()]
    return list(dict.fromkeys(files))


def load_rgb(path: Path):
    """A PIL RGB image, EXIF-rotated, with transparency flattened on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


def load_references(inputs: dict[str, contract.Artifact]) -> tuple[list[Path], list[Any]]:
    """(reference files, their RGB images)."""
    files = reference_files(inputs)
    return files, [load_rgb(f) for f in files]


def input_file(art: contract.Artifact | None, fallback: Path) -> Path:
    """The one file of a single-file input (a file set of one path), else ``fallback``."""
    return Path(art.files[0]) if art is not None and art.files else fallback


# --------------------------------------------------------------------------- plan-time inputs


def variant_of(node_id: str) -> str | None:
    """``"luca:train[wide]"`` -> ``"wide"``; None without a variant."""
    return node_id[node_id.index("[") + 1 : -1] if node_id.endswith("]") and "[" in node_id else None


def reference_inputs(spec: dict[str, Any], graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """``reference<i>``: a file set per entry of character.references."""
    refs = list((spec.get("character") or {}).get("references") or [])
    return {f"reference{i}": contract.FileSetRef(root=graph.project_root / r, patterns=("*",), recursive=True,
                                                 spec_key=f"character.references[{i}]") for i, r in enumerate(refs)}


def model_input(value: str | None, graph: contract.GraphView, key: str) -> contract.FileSetRef | None:
    """A local model file or folder as a file-set input (its content is in the cache key); None for
    hub ids and builtin models (they stay config)."""
    if not value or value.startswith("builtin:"):
        return None
    p = graph.project_root / value
    if p.exists():
        return contract.FileSetRef(root=p, patterns=("*",), recursive=True, spec_key=key)
    return None


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-~:]*")  # what quote(name, safe=":") leaves as it is


def input_name(name: str) -> str:
    """An input name that is safe where names become file or folder names (the remote worker
    materializes an input from outside the project under ``inputs/<name>``): a video's path inside
    its folder source is percent-encoded (``/`` -> ``%2F``, spaces, non-ASCII), which keeps
    distinct names distinct; names of letters, digits, ``_.-~:`` stay as they are."""
    if _SAFE_NAME.fullmatch(name):
        return name  # nothing to encode (a thousand ride videos named guest_0001.mp4 ...)
    from urllib.parse import quote

    return quote(name, safe=":")


def image_inputs(graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """Every upstream output named ``images...``: ingest's, and video identity builders'
    (``images:video_identity.<variant>``, the variant as :func:`input_name` makes it safe)."""
    inputs: dict[str, contract.InputRef] = {}
    ingest = graph.node(contract.node_id(graph.character, "ingest"))
    if ingest is not None:
        for out in ingest.outputs:
            if out.startswith("images"):
                inputs[out] = contract.StageOutputRef(ingest.id, out)
    for node in graph.nodes_of("video_identity"):
        variant = variant_of(node.id)
        tag = node.kind if variant is None else f"{node.kind}.{variant}"
        for out in node.outputs:
            if out.startswith("images"):
                name = input_name(f"images:{tag}" + ("" if out == "images" else f":{out}"))
                inputs[name] = contract.StageOutputRef(node.id, out)
    return inputs


@dataclass(frozen=True)
class VideoFile:
    """One video file of a video source (``dataset.sources[i].video``: a file, a folder or a glob)."""

    variant: str  # "<i>" for a one-file source, "<i>:<member>" for a folder or glob
    path: Path  # absolute
    rel: str  # project-relative posix (absolute when outside the project): what node configs name
    member: str | None  # its path inside the folder / under the glob's root (posix); None for one file
    spec_key: str  # "dataset.sources[<i>].video"

    def file_ref(self) -> contract.FileSetRef:
        """This file alone as a file-set input (siblings in its folder are not in its digest)."""
        import glob

        return contract.FileSetRef(root=self.path.parent, patterns=(glob.escape(self.path.name),),
                                   recursive=False, spec_key=self.spec_key)


def video_files(source: Any, i: int, graph: contract.GraphView) -> list[VideoFile]:
    """The video files of source ``i`` (a typed SourceConfig), sorted: the one file it names (a
    file that is missing stays one item: the stage says so), or every video file of its folder
    (``recursive`` honoured) or glob (relative to the project root in the resolved spec). The one
    expansion video_identity, video_clips and extract share: a folder is walked once per plan."""
    value = source.video
    if not value:
        return []
    recursive = bool(source.recursive)
    return graph.memo(("video_files", value, recursive, i),
                      lambda: _list_video_source(value, recursive, i, graph.project_root))


def _list_video_source(value: str, recursive: bool, i: int, project_root: Path) -> list[VideoFile]:
    spec_key = f"dataset.sources[{i}].video"
    path = Path(value) if Path(value).is_absolute() else project_root / value
    base, pattern = (value, None) if os.path.lexists(path) else (split_glob(value) or (value, None))
    root = Path(base) if Path(base).is_absolute() else project_root / (base or ".")
    if not os.path.isdir(root):  # a file, or a file (or glob folder) that is missing: the stage says so
        return [VideoFile(str(i), path, value, None, spec_key)]
    prefix = "" if base in ("", ".") else base.rstrip("/") + "/"
    return [VideoFile(f"{i}:{rel}", full, prefix + rel, rel, spec_key)
            for rel, full in video_files_under(root, pattern=pattern, recursive=recursive)]


def _extract_output(graph: contract.GraphView, output: str) -> dict[str, contract.InputRef]:
    extract = graph.node(contract.node_id(graph.character, "extract"))
    return {} if extract is None else {f"{output}:extract": contract.StageOutputRef(extract.id, output)}


def curated_image_inputs(graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """image_inputs plus the extract stage's frames (curate and caption read pixels from both)."""
    return {**image_inputs(graph), **_extract_output(graph, "images")}


def analysis_inputs(graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """analyze's records, and the extract stage's records in the same format when it runs."""
    analyze = contract.StageOutputRef(contract.node_id(graph.character, "analyze"), "analysis")
    return {"analysis": analyze, **_extract_output(graph, "analysis")}


def review_section(graph: contract.GraphView, part: str, **kw: Any) -> dict[str, Any]:
    """For ``expand``: the part of the spec's review decisions (``<spec>.review.yaml``) that the
    stage depends on, {} when there are none (see :mod:`runner.review.decisions`). It goes into
    the node's config as ``review``, so only a change to that part re-runs the stage."""
    from runner.review import decisions

    try:
        return decisions.stage_section(decisions.for_spec(graph.spec_file), part, **kw)
    except decisions.ReviewError as exc:
        raise contract.StageError(str(exc), hint="the file is written by `runner review`; "
                                             "`git diff` shows hand edits") from None


def check_fields(template: str, key: str, fields: tuple[str, ...]) -> None:
    """A ``str.format`` template (a caption) may name only ``fields``; refused at plan time naming
    ``key`` otherwise (the caption and video_clips stages' templates)."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise contract.StageError(f"{key}: {exc}",
                                  hint="use {field} placeholders; write {{ and }} for literal braces") from None
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise contract.StageError(f"{key}: unknown field {{{unknown[0]}}}",
                                  hint="fields: " + " ".join("{" + f + "}" for f in fields))


VIDEO_PRESET_KEYS = ("steps", "guidance", "image_conditioning", "prompt_prefix", "prompt_suffix")


def video_preset_fill(video: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """Values the video preset gives for the ``generate.video`` keys still null (the video and
    evaluate_video stages make clips alike). The spec resolver merges a preset the user names;
    this also covers the default preset (``baseline``) when none is named."""
    missing = [k for k in VIDEO_PRESET_KEYS if video.get(k) is None]
    if not missing:
        return {}
    from runner.spec.resolve import list_presets
    from runner.spec.yamlio import load_yaml_file

    name = video.get("preset") or "baseline"
    path = list_presets("video").get(name) or (project_root / name)
    if not Path(path).is_file():
        raise contract.StageError(f"generate.video.preset: unknown preset {name!r}",
                                  hint="Use a shipped preset (runner/presets/video: baseline, aggressive-quality for "
                                       "LTX-Video 0.9; ltx2-*, wan22-i2v-*, wan22-ti2v-*) or a path to a preset .yaml.")
    values = (load_yaml_file(Path(path)).data or {}).get("values") or {}
    return {k: values[k] for k in missing if values.get(k) is not None}


def clip_fidelity(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext, *,
                  source_is: str = "source image"):
    """(Fidelity, reference files): what the video and evaluate_video stages compare each clip's
    faces with (runner.generate.clipcheck): the references' faces, or each clip's own source image
    (``source_is``: how the stage calls it) when the spec says so or no reference has a face."""
    from runner.generate.clipcheck import Fidelity, face_embeddings

    backend = face_backend(config["face"], ctx.project_root, key="generate.video.fidelity")
    ref_files, ref_images = load_references(inputs)
    ref_faces = face_embeddings(backend, ref_images)
    against = config["fidelity"]["against"]
    if against == "references" and len(ref_faces) == 0:
        ctx.warn(f"{ctx.stage_id}: no reference face found in character.references; fidelity compares with each "
                 f"clip's {source_is}")
        against = "source"
    return Fidelity(backend, ref_faces, against, float(getattr(backend, "default_identity_threshold", 0.5))), ref_files


def stage_gpu(spec: dict[str, Any], kind: str) -> str | None:
    """The GPU a stage asks for: hardware.stage_gpu.<kind>, else hardware.gpu."""
    hardware = spec.get("hardware") or {}
    return (hardware.get("stage_gpu") or {}).get(kind) or hardware.get("gpu")


# --------------------------------------------------------------------------- faces and other models


def face_options(spec: dict[str, Any], override: str | None = None) -> dict[str, Any]:
    """The face backend of identity checks on generated images (evaluate's, storyboard's, video's):
    ``override`` or evaluate.face_model, with dataset.analysis's detector settings."""
    from runner.spec.sections import EvaluateConfig

    analysis = _analysis(spec)
    ev = EvaluateConfig.from_dict(spec.get("evaluate") or {})
    return {
        "name": override or ev.face_model or "auto",
        "insightface_pack": ev.insightface_pack or analysis.insightface_pack,
        "insightface_root": ev.insightface_root or analysis.insightface_root,
        "dlib_detector": analysis.dlib_detector,
        "upsample": int(analysis.upsample),
    }


def _analysis(spec: dict[str, Any]):
    from runner.spec.sections import AnalysisConfig

    return AnalysisConfig.from_dict((spec.get("dataset") or {}).get("analysis") or {})


def backend_options(analysis: dict[str, Any]) -> dict[str, Any]:
    """The face backend of dataset analysis (analyze's and extract's), from dataset.analysis."""
    from runner.spec.sections import AnalysisConfig

    a = AnalysisConfig.from_dict(analysis)
    return {"name": a.backend, "dlib_detector": a.dlib_detector, "upsample": int(a.upsample),
            "insightface_pack": a.insightface_pack, "insightface_root": a.insightface_root,
            "max_side": int(a.max_analysis_side)}


def resolve_pack(opts: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """``opts`` with an insightface pack folder relative to the project made absolute."""
    pack = opts.get("insightface_pack", "")
    if pack and not Path(pack).is_absolute() and (project_root / pack).is_dir():
        opts = {**opts, "insightface_pack": str(project_root / pack)}
    return opts


def make_face_backend(opts: dict[str, Any]):
    """The face backend of :func:`backend_options` (``name`` picks it, the rest configures it)."""
    from runner.vision.faces import get_face_backend

    kw = dict(opts)
    name = kw.pop("name")
    return get_face_backend(name, **kw)


def face_backend_kwargs(opts: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """``get_face_backend`` keyword arguments for ``opts`` (name, dlib_detector, upsample,
    insightface_pack/root; absent: the schema's defaults); a pack folder relative to the project is
    made absolute."""
    from runner.spec.config import view_of
    from runner.spec.sections import AnalysisConfig, EvaluateConfig

    a = view_of(AnalysisConfig, opts)
    pack = resolve_pack({"insightface_pack": a.insightface_pack}, project_root)["insightface_pack"]
    return {"name": opts["name"] if "name" in opts else EvaluateConfig.from_dict({}).face_model,
            "dlib_detector": a.dlib_detector, "upsample": int(a.upsample), "insightface_pack": pack,
            "insightface_root": a.insightface_root}


def face_backend(opts: dict[str, Any], project_root: Path, key: str = "evaluate.face_model"):
    """The face backend named by ``opts`` (see :func:`face_backend_kwargs`); errors name ``key``."""
    from runner.vision.faces import get_face_backend

    try:
        return get_face_backend(**face_backend_kwargs(opts, project_root))
    except contract.StageError as exc:
        raise contract.StageError(f"{key}: {exc}", hint=exc.hint) from None


def model_ref(value: str, project_root: Path) -> str:
    """Project-relative model paths from the resolved spec -> absolute; hub ids stay as they are."""
    if value.startswith(("builtin:", "open_clip:")):
        return value
    p = Path(value).expanduser()
    if not p.is_absolute() and (project_root / p).exists():
        return str(project_root / p)
    return value


def device_setting(config: dict[str, Any]) -> str:
    """A node config's ``device`` (hardware.device as expand copied it; absent: the schema's default),
    for :func:`runner.core.device.choose_device`."""
    from runner.spec.sections import HardwareConfig

    return config.get("device") or HardwareConfig.from_dict({}).device


def load_embedder(ref: str, ctx: contract.StageContext, key: str, device: str = "auto"):
    """A CLIP/DINO image embedder for a spec value; a bad value is a StageError naming ``key``."""
    from runner.metrics.embedders import EmbedderError, load_image_embedder

    try:
        return load_image_embedder(model_ref(ref, ctx.project_root), ctx.cache_dir, device=device)
    except EmbedderError as exc:
        raise contract.StageError(f"{key}: {exc}", hint=exc.hint) from None


# --------------------------------------------------------------------------- curation rules

# dataset.curation's settings as curate and extract apply them (the schema's defaults).
CURATION_DEFAULTS = CurationConfig.from_dict({}).to_dict()


def quality_score(rec: dict[str, Any]) -> float:
    """0..1: bigger, sharper, well-exposed, more clearly the character (ties broken by id)."""
    f = rec["faces"][rec["main_face"]] if rec.get("main_face") is not None else None
    if f is None:
        return 0.0
    fh = f["box"][3] - f["box"][1]
    exp = f.get("exposure") or {}
    clipped = exp.get("clipped_dark", 0.0) + exp.get("clipped_bright", 0.0)
    ident = rec.get("identity")
    score = (0.4 * min(1.0, fh / 400.0) + 0.3 * min(1.0, (f.get("blur") or 0.0) / 100.0)
             + 0.1 * (1.0 - min(1.0, clipped)))
    score += 0.2 * (1.0 if ident is None else max(0.0, min(1.0, ident)))
    return round(score, 4)


def _identity_gate(rec: dict[str, Any], threshold: float) -> tuple[str, str]:
    others = [(i, g["identity"]) for i, g in enumerate(rec["faces"])
              if i != rec["main_face"] and g.get("identity") is not None and g["identity"] >= threshold]
    if others:
        i, s = max(others, key=lambda t: t[1])
        return ("character is not the main face",
                f"main face identity {rec['identity']:.3f} < {threshold}; face #{i + 1} matches ({s:.3f}) "
                "but is smaller")
    return "not the character", f"identity {rec['identity']:.3f} < threshold {threshold}"


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
        return _identity_gate(rec, threshold)
    fh = f["box"][3] - f["box"][1]
    if fh < cfg["min_face_px"]:
        return "face too small", f"main face {fh:.0f} px tall < min_face_px {cfg['min_face_px']}"
    if f.get("blur") is None:  # too small for the measure (runner.vision.measures.face_sharpness)
        return "face too small", (f.get("unmeasured") or {}).get("blur", "sharpness could not be measured")
    if f["blur"] < cfg["min_blur"]:
        return "blurry face", (f"sharpness {f['blur']:.1f} < min_blur {cfg['min_blur']} "
                               f"(blur sigma {f.get('blur_sigma') or 0:.2f} px at 40 px between the eyes)")
    exp = f.get("exposure") or {}
    clipped = exp.get("clipped_dark", 0.0) + exp.get("clipped_bright", 0.0)
    if clipped > cfg["max_clipped"]:
        return "badly exposed face", f"{clipped:.0%} of face pixels clipped > max_clipped {cfg['max_clipped']:.0%}"
    return None


Duplicate = tuple[dict[str, Any], dict[str, Any], int]  # (dropped record, the kept one, phash distance)


def dedupe(items: list[dict[str, Any]], max_distance: int) -> tuple[list[dict[str, Any]], list[Duplicate]]:
    """Keep the best of each group of near-duplicates (phash Hamming distance <= max_distance).

    Vectorized: each candidate (best first) is compared with every kept hash at once.
    """
    import numpy as np

    if max_distance <= 0:
        return items, []
    ordered = sorted(items, key=lambda r: (-r["quality"], r["id"]))
    kept: list[dict[str, Any]] = []
    dups: list[Duplicate] = []
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


# --------------------------------------------------------------------------- report and resume


def run_header(ctx: contract.StageContext) -> dict[str, Any]:
    """The first keys of a stage's report.json / evaluation.json: format, character, stage and run."""
    return {"format": 1, "character": ctx.character, "stage_id": ctx.stage_id, "run_id": ctx.run_id}


def output_json(outputs: dict[str, contract.Artifact], name: str, file: str) -> tuple[Path, dict[str, Any]] | None:
    """For a ``report`` hook: (folder of output ``name``, its JSON ``file``), None without that output."""
    art = outputs.get(name)
    if art is None:
        return None
    folder = Path(art.path)
    return folder, json.loads((folder / file).read_text(encoding="utf-8"))


def resume_note(done: int, what: str) -> str | None:
    """For a ``resume_info`` hook: "resume after 3 finished clips", None when nothing is done."""
    if not done:
        return None
    return f"resume after {done} finished {what}{'s' if done != 1 else ''}"


def report_anchor(prefix: str, config: dict[str, Any]) -> str:
    """The report anchor of a per-video stage's section: ``<prefix>-<source index>``, and for a video
    of a folder or glob source (``member`` in its config) its path there, as letters, digits and
    dashes with a short hash (two names that read alike stay apart)."""
    import hashlib

    anchor = f"{prefix}-{config.get('source_index', 0)}"
    member = config.get("member")
    if not member:
        return anchor
    slug = "".join(c if c.isascii() and c.isalnum() else "-" for c in member.lower()).strip("-")
    return f"{anchor}-{slug}-{hashlib.sha256(member.encode()).hexdigest()[:6]}"


def tiny_note(tiny: dict[str, Any], parts: tuple[str, ...], what: str) -> str:
    """The report's warning for outputs made with tiny random models ('' when none was)."""
    if not tiny.get("any"):
        return ""
    which = [k.replace("_", " ") for k in parts if tiny.get(k)]
    return f"Made with tiny random models ({', '.join(which)}): {what}"


def balance_chart(rows: list[dict[str, Any]], title: str):
    """Shares per shot category against their targets (curate's and extract's tables)."""
    from runner.report import charts

    return charts.bar_chart(
        {r["category"]: r["share"] for r in rows},
        ranges={r["category"]: r["target"] for r in rows if r["target"]},
        status={r["category"]: r["status"] for r in rows if r["status"]},
        title=title,
    )


# --------------------------------------------------------------------------- experiment tracking


def with_tracking(node: contract.PlanNode, spec: dict[str, Any], graph: contract.GraphView) -> contract.PlanNode:
    """For ``expand``: ``node`` with the spec's enabled trackers in its config as ``tracking``
    (shorthand ``mlflow: true`` expanded with the schema's defaults), unkeyed: tracking changes
    no output. Unchanged when no tracker is enabled. A tracking setting that cannot work is a
    spec problem (exit 2)."""
    from runner.spec import schema as S
    from runner.tracking import settings

    section = dict(spec.get("tracking") or {})
    for name in settings.BACKENDS:
        if section.get(name) is True:
            sub, uri = S.child_schema(S.section_schema("tracking"), S.section_uri("tracking"), name)
            section[name] = S.fill_defaults({}, sub, uri)
    try:
        conf = settings.for_node(section, Path(graph.spec_file).parent)
    except settings.TrackingError as exc:
        raise contract.StageError(str(exc), hint=exc.hint) from None
    if conf is not None:
        node.config["tracking"] = conf
        node.unkeyed = (*node.unkeyed, "tracking")
    return node


def track(node_config: dict[str, Any], log: Any, env: dict[str, Any]) -> list[dict[str, Any]]:
    """For a ``track`` hook: send ``log`` (a runner.tracking.StageLog) to the node's trackers,
    tagged with the stage and the apply run; returns the runs as executions.tracking entries."""
    from runner import tracking

    log.tags.update({"runner.stage_id": env["stage_id"], "runner.run_id": env["run_id"],
                     "runner.character": env["character"], "runner.key": env["key"][:16]})
    runs = tracking.log_stage(node_config.get("tracking"), log, Path(env["workspace_dir"]))
    return [r.as_json() for r in runs]


def guidance_notes(value: float, key: str, base_model: str, model_family: str = "auto") -> tuple[str, ...]:
    """The family's warning about a guidance value far from what it samples with (see
    runner.diffusion.families.Family.guidance_note), when the family can be told cheaply."""
    from runner.diffusion import families

    fam = families.get(model_family) if model_family != "auto" else families.family_of_ref(base_model)
    note = fam.guidance_note(float(value), key) if fam is not None else None
    return (note,) if note else ()


def check_variant(section: str, name: str, overrides: Any) -> None:
    """A variant's overrides (``<section>.variants.<name>``) must themselves be a valid
    ``section`` (train or train_video): typos fail at plan time."""
    from runner.spec import schema as S
    from runner.spec.variants import PLAN_ONLY

    if not isinstance(overrides, dict):
        raise contract.StageError(f"{section}.variants.{name} must be a mapping of {section} keys to override",
                                  hint="e.g. higher_rank: {lora: {rank: 64}}")
    bad = [k for k in overrides if k in PLAN_ONLY]
    if bad:
        raise contract.StageError(f"{section}.variants.{name} cannot override {', '.join(bad)}")
    errors = sorted(S.section_validator(section).iter_errors(overrides), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.path)
        raise contract.StageError(f"{section}.variants.{name}{'.' + where if where else ''}: {e.message}",
                                  hint=f"A variant overrides keys of the {section} section; "
                                       "see `runner plan --resolved`.")


def variant_runs(section: Any, name: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(variant, its overrides) of every stage of a train-like section (typed): one without
    variants; with them, each variant (checked) and 'base' when include_base_variant."""
    from runner.spec.config import to_plain

    if not section.variants:
        return [(None, {})]
    runs: list[tuple[str | None, dict[str, Any]]] = [("base", {})] if section.include_base_variant else []
    for variant, ov in section.variants.items():
        check_variant(name, variant, to_plain(ov))  # plain data: the overrides are merged into node configs
        runs.append((variant, to_plain(ov)))
    return runs


def training_resume_info(scratch_dir: Path) -> str | None:
    """"resume at step N of M (phase, epoch)" when a killed training run (train, train_video) left
    a resume state (no heavy imports); the meta is the trainer's JSON file, not a config."""
    from runner.diffusion.trainer import read_resume_meta

    meta = read_resume_meta(scratch_dir)
    if not meta or not meta.get("step"):
        return None
    where = f"phase {meta['phase']}"
    if meta.get("steps_per_epoch"):
        spe = meta["steps_per_epoch"]
        where += f", epoch {meta['step'] / spe:.3g} of {meta['total_steps'] / spe:.3g}"
    return f"resume at step {meta['step']} of {meta['total_steps']} ({where})"


def read_metrics(logs: Path) -> list[dict[str, Any]]:
    """A trainer's logged history (logs/metrics.jsonl: one record per step and per validation)."""
    path = Path(logs) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
