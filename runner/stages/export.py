"""`export`: trainer-ready copies of the captioned dataset.

The stage writes into the store; ``runner apply`` then publishes a copy of it, outside the store,
to ``<project>/.runner/exports/<character>/`` (see :func:`publish`). Point every trainer at that
copy: sd-scripts writes ``.npz`` latents next to the images, ai-toolkit writes ``_latent_cache/``,
``_t_e_cache/`` and ``.aitk_size.json`` into its folder, and none of that may change the store.
The published config files carry absolute paths into the published copy.

- ``kohya``: sd-scripts DreamBooth-style folders ``kohya/img/<repeats>_<trigger> <class>/`` with
  ``<stem>.png`` + ``<stem>.txt`` (stems are the hex image ids: no underscores), one folder per
  distinct repeat count (``export.repeats`` times the image's reweighting repeats), and
  ``kohya/dataset_config.toml`` with the bucket settings the trainer uses
  (:class:`runner.diffusion.data.BucketSettings`, one source for both).
- ``plain``: ``plain/`` holds every image once with its ``.txt`` caption: the folder ai-toolkit's
  ``folder_path`` points at (it walks sub-folders, so nothing else may lie below it). When
  reweighting gave images different repeat counts they sit in ``plain/repeats_<n>/``. Beside it:
  ``concepts.json`` (OneTrainer's concept list, one concept per repeat group, ``balancing`` = the
  group's repeats) and ``ai-toolkit.yaml`` (the ``datasets:`` entries for an ai-toolkit config,
  ``num_repeats`` per group).
- ``jsonl``: ``metadata.jsonl``, every dataset record plus ``file_name`` (Hugging Face imagefolder
  convention: relative to the metadata file).
- ``identity_crops``: ``identity_crops/<adapter>/<crop>/<id>.png`` + ``manifest.json`` per identity
  adapter (InstantID, IP-Adapter-FaceID and its Plus, PuLID), each face aligned from the analysis'
  landmarks the way the adapter expects, optionally without its background
  (:mod:`runner.vision.identity_crops`).

Files are hard-linked from the dataset artifact when possible (cached artifacts never change).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from runner.core.fs import replace_folder
from runner.core import contract
from runner.spec.config import node_field, schema_config, schema_default
from runner.spec.sections import (BackgroundConfig, BucketsConfig, DatasetExportConfig, IdentityCropsConfig,
                                  TrainConfig, spec_config)
from runner.stages.common import analysis_inputs, read_jsonl

FORMATS = ("kohya", "plain", "jsonl", "identity_crops")
PUBLISHED = Path("exports")  # under the workspace folder (.runner/): <character>/
_KEY_FILE = ".export-key"


@schema_config("dataset", "export", "identity_crops")
class IdentityCropsNode(IdentityCropsConfig):
    """identity_crops in the export node: the section, with no background when no matting model is set."""

    background: BackgroundConfig | None = node_field(None)


@schema_config("dataset", "export")
class ExportNode(DatasetExportConfig):
    """The export stage's node config: dataset.export, the character's trigger and class word, and
    the train section's resolution, buckets and model (what bucket sides must be multiples of;
    base_model None without a train section: SD 1.x's 64)."""

    identity_crops: IdentityCropsNode | None = node_field(None)  # only with the identity_crops format
    trigger: str = node_field()
    class_word: str = node_field()
    resolution: int = node_field(schema_default("train", "resolution"))
    buckets: BucketsConfig = node_field(BucketsConfig.from_dict({}))
    base_model: str | None = node_field(None)
    model_family: str = node_field(schema_default("train", "model_family"))


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    caption = graph.node(contract.node_id(graph.character, "caption"))
    if caption is None:
        return []
    typed = spec_config(spec)
    ch, ex = typed.character, typed.dataset.export
    train = typed.train or TrainConfig.from_dict({})
    formats = sorted(set(ex.formats))
    config = {
        "formats": formats,
        "repeats": ex.repeats,
        "trigger": ch.trigger,
        "class_word": ch.class_word,
        "resolution": train.resolution,
        "buckets": train.buckets.to_dict(),
        "base_model": train.base_model if typed.train else None,
        "model_family": train.model_family,
    }
    inputs: dict[str, contract.InputRef] = {"dataset": contract.StageOutputRef(caption.id, "dataset")}
    if "identity_crops" in formats:
        crops = config["identity_crops"] = identity_crops_config(ex.identity_crops)
        inputs.update(identity_crops_inputs(IdentityCropsNode.from_dict(crops), caption, graph))
    return [
        contract.PlanNode(
            id=contract.node_id(graph.character, "export"),
            kind="export",
            character=graph.character,
            config=config,
            inputs=inputs,
            outputs=("export",),
            label=", ".join(formats),
        )
    ]


def identity_crops_config(section: IdentityCropsConfig | dict[str, Any]) -> dict[str, Any]:
    """The node config of ``dataset.export.identity_crops`` (defaults come from the schema)."""
    crops = IdentityCropsConfig.from_dict(section)
    bg = crops.background
    if bg.model and not bg.model.startswith("rembg:") and not bg.session:
        raise contract.StageError("dataset.export.identity_crops.background.session: a local or hub model needs "
                                  "the rembg session it was exported for",
                                  hint="e.g. session: u2net (320 px), isnet-general-use, birefnet-general or "
                                       "bria-rmbg; or use model: rembg:<session>")
    return {"adapters": sorted(set(crops.adapters)), "max_upscale": float(crops.max_upscale),
            "max_yaw": float(crops.max_yaw), "max_pitch": float(crops.max_pitch),
            "background": bg.to_dict() if bg.model else None}


def identity_crops_inputs(cfg: IdentityCropsNode, caption: contract.PlanNode,
                          graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """The analysis (landmarks), curation's identity threshold and a local matting model's bytes."""
    analyze = graph.node(contract.node_id(graph.character, "analyze"))
    if analyze is None:
        raise contract.StageError("dataset.export.formats: identity_crops needs the face analysis of dataset.sources",
                              hint="add image sources, or drop identity_crops from dataset.export.formats")
    inputs: dict[str, contract.InputRef] = {**analysis_inputs(graph),  # analyze's records and extracted frames'
                                        "balance": contract.StageOutputRef(caption.id, "balance")}
    model = (cfg.background.model if cfg.background else None) or ""
    p = graph.project_root / model
    if model and not model.startswith("rembg:") and p.exists():
        inputs["matting_model"] = contract.FileSetRef(root=p, patterns=("*",), recursive=True,
                                                  spec_key="dataset.export.identity_crops.background.model")
    return inputs


def _export_identity_crops(records: list[dict], ddir: Path, out: Path, config: ExportNode,
                           inputs: dict[str, contract.Artifact], ctx) -> dict[str, Any]:
    from runner.vision import identity_crops as IC

    cfg = config.identity_crops or IdentityCropsNode.from_dict(identity_crops_config({}))
    adir = Path(inputs["analysis"].path)
    summary = json.loads((adir / "summary.json").read_text(encoding="utf-8"))
    balance = json.loads((Path(inputs["balance"].path) / "balance.json").read_text(encoding="utf-8"))
    wanted = {r["id"] for r in records}
    analysis = {r["id"]: r for name in sorted(n for n in inputs if n.startswith("analysis"))
                for r in read_jsonl(Path(inputs[name].path) / "records.jsonl") if r["id"] in wanted}
    settings = IC.Settings(adapters=list(cfg.adapters), max_upscale=cfg.max_upscale, max_yaw=cfg.max_yaw,
                           max_pitch=cfg.max_pitch, identity_threshold=balance.get("identity_threshold"),
                           backend=summary.get("backend", ""))
    bg = cfg.background
    if bg:
        from runner.vision.matting import check_color, load_matting

        key = "dataset.export.identity_crops.background"
        settings.color = check_color(bg.color, f"{key}.color")
        settings.output = bg.output
        settings.matting = load_matting(bg.model, bg.session, Path(ctx.project_root), key=f"{key}.model")
        if settings.matting.info["tiny_random_model"]:
            ctx.warn(f"{key}.model is a tiny random model: its masks are noise")
    if settings.identity_threshold is None:
        ctx.warn("identity_crops: no character.references, so no face is identity-checked and none is exported")
    progress = ctx.progress(len(records), "identity crops")
    counts = IC.export(records, analysis, ddir, out / "identity_crops", settings, progress=lambda: progress.update(1))
    progress.close()
    ctx.log("identity crops: " + ", ".join(f"{a} {c['images']} ({c['skipped']} skipped)" for a, c in counts.items()))
    return counts


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _toml_str(s: str) -> str:
    # A TOML basic string: JSON's escaping is a valid subset for these characters.
    return json.dumps(s, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return _toml_str(v) if isinstance(v, str) else str(v)


def kohya_folder_name(repeats: int, trigger: str, class_word: str) -> str:
    return f"{repeats}_{trigger} {class_word}".strip()


def bucket_settings_of(config: ExportNode | dict[str, Any], ctx: contract.StageContext | None = None):
    """The trainer's bucket settings for this export's train section (see BucketSettings)."""
    from runner.diffusion.data import bucket_settings

    node = ExportNode.from_dict(config)
    multiple = 64
    if node.base_model:
        try:
            from runner.diffusion.models import ModelLoadError, size_multiple

            multiple = size_multiple(node.base_model, family=node.model_family,
                                     cache_dir=getattr(ctx, "cache_dir", None),
                                     project_root=getattr(ctx, "project_root", None))
        except (ImportError, ModelLoadError, OSError, KeyError, ValueError) as exc:
            if ctx is not None:
                ctx.warn(f"export: could not read the size multiple of {node.base_model} ({exc}); "
                         "dataset_config.toml assumes 64 (SD 1.x)")
    return bucket_settings(node.resolution, node.buckets, multiple=multiple)


def dataset_config_toml(subsets: list[tuple[str, int]], *, buckets: dict[str, Any], resolution: int,
                        class_tokens: str, keep_tokens: int = 1) -> str:
    """sd-scripts' dataset config: ``buckets`` is ``BucketSettings.kohya()``."""
    lines = [
        "# sd-scripts dataset config written by character-runner: the buckets the runner trains with.",
        "[general]",
        'caption_extension = ".txt"',
        "shuffle_caption = false",
        f"keep_tokens = {keep_tokens}",
        "",
        "[[datasets]]",
        f"resolution = {resolution}",
        "batch_size = 1",
        *(f"{k} = {_toml_value(v)}" for k, v in buckets.items()),
    ]
    for image_dir, repeats in subsets:
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {_toml_str(image_dir)}", f"  num_repeats = {repeats}",
                  f"  class_tokens = {_toml_str(class_tokens)}"]
    return "\n".join(lines) + "\n"


def onetrainer_concepts(groups: dict[int, str], *, name: str) -> list[dict[str, Any]]:
    """OneTrainer's concepts.json (a list of ConceptConfig dicts, config version 2): one concept
    per repeat group, captions from the .txt beside each image (prompt_source "sample")."""
    return [{
        "__version": 2, "name": f"{name} x{reps}" if len(groups) > 1 else name, "path": path, "seed": 0,
        "enabled": True, "type": "STANDARD", "include_subdirectories": False,
        "image_variations": 1, "text_variations": 1,
        "balancing": float(reps), "balancing_strategy": "REPEATS", "loss_weight": 1.0, "concept_stats": {},
        "image": {"enable_crop_jitter": True, "enable_random_flip": False, "enable_fixed_flip": False},
        "text": {"prompt_source": "sample", "prompt_path": "", "enable_tag_shuffling": False,
                 "tag_delimiter": ",", "keep_tags_count": 1},
    } for reps, path in sorted(groups.items())]


def ai_toolkit_datasets(groups: dict[int, str], *, resolution: int) -> str:
    """The ``datasets:`` entries of an ai-toolkit config, one per repeat group (YAML)."""
    lines = ["# ai-toolkit: paste under config.process[0] of your job file, or point folder_path at",
             "# the plain/ folder beside this file (it holds every image once).", "datasets:"]
    for reps, path in sorted(groups.items()):
        lines += [f"  - folder_path: {json.dumps(path)}", '    caption_ext: "txt"', f"    num_repeats: {reps}",
                  f"    resolution: [{resolution}]"]
    return "\n".join(lines) + "\n"


def _image_repeats(r: dict[str, Any]) -> int:
    return max(1, int(r.get("repeats", 1)))


def write_tool_configs(out: Path, summary: dict[str, Any], root: str = "") -> None:
    """(Re)write the files that name paths: relative to the export folder in the store, and with
    ``root`` (the published copy, absolute) in front when publishing."""
    def at(rel: str) -> str:
        return f"{root}/{rel}" if root else rel

    if "kohya" in summary:
        k = summary["kohya"]
        toml = dataset_config_toml([(at(f"kohya/img/{name}"), reps) for name, reps in k["subsets"]],
                                   buckets=k["buckets"], resolution=k["resolution"], class_tokens=k["class_tokens"])
        (out / "kohya" / "dataset_config.toml").write_text(toml, encoding="utf-8")
    if "plain" in summary:
        groups = {int(reps): at(rel) for reps, rel in summary["plain"]["groups"].items()}
        (out / "concepts.json").write_text(json.dumps(onetrainer_concepts(groups, name=summary["name"]), indent=1),
                                           encoding="utf-8")
        (out / "ai-toolkit.yaml").write_text(ai_toolkit_datasets(groups, resolution=summary["resolution"]),
                                             encoding="utf-8")


def _export_kohya(records: list[dict], ddir: Path, out: Path, config: ExportNode, ctx) -> dict[str, Any]:
    img_root = out / "kohya" / "img"
    img_root.mkdir(parents=True)
    subsets: dict[int, str] = {}
    for r in records:
        reps = config.repeats * _image_repeats(r)
        if reps not in subsets:
            subsets[reps] = kohya_folder_name(reps, config.trigger, config.class_word)
            (img_root / subsets[reps]).mkdir()
        r["_kohya"] = f"kohya/img/{subsets[reps]}/{r['id'].replace('_', '')}"
        _link(ddir / r["image"], out / f"{r['_kohya']}.png")
        _link(ddir / f"{Path(r['image']).stem}.txt", out / f"{r['_kohya']}.txt")
    settings = bucket_settings_of(config, ctx)
    return {"subsets": [(subsets[k], k) for k in sorted(subsets)], "buckets": settings.kohya(),
            "resolution": config.resolution, "class_tokens": f"{config.trigger} {config.class_word}".strip(),
            "folders": {subsets[k]: sum(1 for r in records if config.repeats * _image_repeats(r) == k)
                        for k in sorted(subsets)}}


def _export_plain(records: list[dict], ddir: Path, out: Path) -> dict[str, Any]:
    counts = sorted({_image_repeats(r) for r in records})
    groups = {n: "plain" if len(counts) <= 1 else f"plain/repeats_{n}" for n in counts} or {1: "plain"}
    for rel in groups.values():
        (out / rel).mkdir(parents=True, exist_ok=True)
    for r in records:
        r["_plain"] = f"{groups[_image_repeats(r)]}/{r['image']}"
        _link(ddir / r["image"], out / r["_plain"])
        _link(ddir / f"{Path(r['image']).stem}.txt", out / Path(r["_plain"]).with_suffix(".txt"))
    return {"groups": {str(n): rel for n, rel in groups.items()}}


@contract.register("export", version=2, order=45, expand=expand,
               description="Trainer-ready folders: kohya sd-scripts, image+txt (ai-toolkit, OneTrainer), "
                           "metadata.jsonl.",
               report=lambda config, outputs, env: report_sections(config, outputs, env),
               publish=lambda config, outputs, dest: publish(outputs["export"].path, dest))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Trainer-ready folders: kohya sd-scripts, image+txt (ai-toolkit, OneTrainer), metadata.jsonl."""
    node = ExportNode.from_dict(config)
    unknown = [f for f in node.formats if f not in FORMATS]
    if unknown:
        raise contract.StageError(f"dataset.export.formats: unknown format {unknown[0]!r}",
                                  hint="use " + ", ".join(FORMATS))
    if "_" in node.trigger and "kohya" in node.formats:
        ctx.warn(f"trigger {node.trigger!r} contains '_': sd-scripts splits '<repeats>_<name>' at the first '_', "
                 "which still works, but check the class tokens in dataset_config.toml")
    ddir = Path(inputs["dataset"].path)
    out = Path(ctx.out_dir) / "export"
    out.mkdir(parents=True)
    records = list(read_jsonl(ddir / "dataset.jsonl"))
    formats = set(node.formats)
    summary: dict[str, Any] = {"images": len(records), "formats": sorted(formats), "name": ctx.character,
                               "resolution": node.resolution}
    if "kohya" in formats:
        summary["kohya"] = _export_kohya(records, ddir, out, node, ctx)
        summary["kohya_folders"] = summary["kohya"]["folders"]
    if "plain" in formats:
        summary["plain"] = _export_plain(records, ddir, out)
    write_tool_configs(out, summary)
    if "identity_crops" in formats:
        summary["identity_crops"] = _export_identity_crops(records, ddir, out, node, inputs, ctx)
    if "jsonl" in formats:
        with (out / "metadata.jsonl").open("w", encoding="utf-8") as fh:
            for r in records:
                file_name = r.get("_plain") or (f"{r['_kohya']}.png" if "_kohya" in r else None)
                rec = {k: v for k, v in r.items() if not k.startswith("_")}
                fh.write(json.dumps({"file_name": file_name, **rec}) + "\n")
    (out / "export.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    ctx.metric("exported_images", len(records))
    ctx.log(f"exported {len(records)} images as {', '.join(sorted(formats))}")
    return {"export": contract.Artifact("export", out, meta={k: summary[k] for k in ("images", "formats")})}


def publish(src: Path, dest: Path) -> Path:
    """Copy the stored export to ``dest`` (outside the store) for trainers to read and write in,
    with the config files' paths pointing into the copy. Nothing happens when ``dest`` already
    holds this export; a different one is replaced whole (what tools cached there goes with it,
    as it belongs to other images)."""
    key = src.parent.name
    marker = dest / _KEY_FILE
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == key:
        return dest
    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp)  # real copies: a tool rewriting an image must not reach the store
        summary = json.loads((tmp / "export.json").read_text(encoding="utf-8"))
        write_tool_configs(tmp, summary, root=dest.resolve().as_posix())
        (tmp / _KEY_FILE).write_text(key, encoding="utf-8")

    return replace_folder(dest, fill)


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    folder = Path(outputs["export"].path)
    summary = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    toml_file = folder / "kohya" / "dataset_config.toml"
    toml = toml_file.read_text(encoding="utf-8") if toml_file.exists() else ""
    return [contract.ReportSection(title="Trainer export", template="sections/export.html.j2", anchor="export",
                               context={"summary": summary, "toml": toml,
                                        "published": f".runner/{PUBLISHED.as_posix()}/{summary.get('name', '')}"})]
