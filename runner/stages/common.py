"""Helpers several stage kinds share (evaluate, storyboard, video). Not a stage kind itself.

Like every module under runner/stages, it keeps heavy imports inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.paths import list_files
from runner.core import contract

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def rel_path(p: Path | str, root: Path | str) -> str:
    """``p`` relative to ``root`` (posix) when inside it, else as given."""
    try:
        return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(p)


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


def model_ref(value: str, project_root: Path) -> str:
    """Project-relative model paths from the resolved spec -> absolute; hub ids stay as they are."""
    if value.startswith("builtin:") or value.startswith("open_clip:"):
        return value
    p = Path(value).expanduser()
    if not p.is_absolute() and (project_root / p).exists():
        return str(project_root / p)
    return value


def load_embedder(ref: str, ctx: contract.StageContext, key: str, device: str = "auto"):
    """A CLIP/DINO image embedder for a spec value; a bad value is a StageError naming ``key``."""
    from runner.metrics.embedders import EmbedderError, load_image_embedder

    try:
        return load_image_embedder(model_ref(ref, ctx.project_root), ctx.cache_dir, device=device)
    except EmbedderError as exc:
        raise contract.StageError(f"{key}: {exc}", hint=exc.hint) from None


def face_backend_kwargs(opts: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """``get_face_backend`` keyword arguments for ``opts`` (name, dlib_detector, upsample,
    insightface_pack/root); a pack folder relative to the project is made absolute."""
    pack = opts.get("insightface_pack", "buffalo_l")
    if pack and not Path(pack).is_absolute() and (project_root / pack).is_dir():
        pack = str(project_root / pack)
    return {"name": opts.get("name", "auto"), "dlib_detector": opts.get("dlib_detector", "hog"),
            "upsample": int(opts.get("upsample", 1)), "insightface_pack": pack,
            "insightface_root": opts.get("insightface_root", "~/.insightface")}


def face_backend(opts: dict[str, Any], project_root: Path, key: str = "evaluate.face_model"):
    """The face backend named by ``opts`` (see :func:`face_backend_kwargs`)."""
    from runner.vision.faces import get_face_backend

    try:
        return get_face_backend(**face_backend_kwargs(opts, project_root))
    except contract.StageError as exc:
        raise contract.StageError(f"{key}: {exc}", hint=exc.hint) from None


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
