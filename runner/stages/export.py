"""`export`: trainer-ready copies of the captioned dataset.

- ``kohya``: sd-scripts DreamBooth-style folders ``kohya/img/<repeats>_<trigger> <class>/`` with
  ``<stem>.png`` + ``<stem>.txt`` (stems are the hex image ids: no underscores), one folder per
  distinct repeat count (``export.repeats`` times the image's reweighting repeats), and
  ``kohya/dataset_config.toml`` whose ``image_dir`` paths are relative to the export folder (run
  sd-scripts from there, or edit the paths).
- ``plain``: ``plain/<stem>.png`` + ``.txt``, the image+caption folder ai-toolkit and OneTrainer
  read (per-image repeats are in metadata.jsonl and the kohya folders).
- ``jsonl``: ``metadata.jsonl``, every dataset record plus ``file_name`` (Hugging Face imagefolder
  convention: relative to the metadata file).

Files are hard-linked from the dataset artifact when possible (cached artifacts never change).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from runner.stages import base
from runner.stages.analyze import read_jsonl

FORMATS = ("kohya", "plain", "jsonl")


def expand(spec: dict[str, Any], graph: base.GraphView) -> list[base.PlanNode]:
    caption = graph.node(base.node_id(graph.character, "caption"))
    if caption is None:
        return []
    ch = spec.get("character", {})
    ex = spec.get("dataset", {}).get("export", {})
    config = {
        "formats": sorted(set(ex.get("formats", list(FORMATS)))),
        "repeats": int(ex.get("repeats", 10)),
        "trigger": ch["trigger"],
        "class_word": ch.get("class_word", "person"),
        "resolution": int(spec.get("train", {}).get("resolution", 512)),
    }
    return [
        base.PlanNode(
            id=base.node_id(graph.character, "export"),
            kind="export",
            character=graph.character,
            config=config,
            inputs={"dataset": base.StageOutputRef(caption.id, "dataset")},
            outputs=("export",),
            label=", ".join(config["formats"]),
        )
    ]


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _toml_str(s: str) -> str:
    # A TOML basic string: JSON's escaping is a valid subset for these characters.
    return json.dumps(s, ensure_ascii=False)


def kohya_folder_name(repeats: int, trigger: str, class_word: str) -> str:
    return f"{repeats}_{trigger} {class_word}".strip()


def dataset_config_toml(subsets: list[tuple[str, int]], *, resolution: int, class_tokens: str) -> str:
    lines = [
        "# sd-scripts dataset config written by character-runner (image_dir relative to the export folder).",
        "[general]",
        'caption_extension = ".txt"',
        "shuffle_caption = false",
        "keep_tokens = 1",
        "",
        "[[datasets]]",
        f"resolution = {resolution}",
        "batch_size = 1",
        "enable_bucket = true",
        f"min_bucket_reso = {max(64, resolution // 2)}",
        f"max_bucket_reso = {resolution * 2}",
    ]
    for image_dir, repeats in subsets:
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = {_toml_str(image_dir)}", f"  num_repeats = {repeats}",
                  f"  class_tokens = {_toml_str(class_tokens)}"]
    return "\n".join(lines) + "\n"


@base.register("export", version=1, order=45, expand=expand,
               description="Trainer-ready folders: kohya sd-scripts, plain image+txt, metadata.jsonl.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, base.Artifact], ctx: base.StageContext) -> dict[str, base.Artifact]:
    """Trainer-ready folders: kohya sd-scripts, plain image+txt, metadata.jsonl."""
    unknown = [f for f in config["formats"] if f not in FORMATS]
    if unknown:
        raise base.StageError(f"dataset.export.formats: unknown format {unknown[0]!r}", hint="use kohya, plain, jsonl")
    if "_" in config["trigger"] and "kohya" in config["formats"]:
        ctx.warn(f"trigger {config['trigger']!r} contains '_': sd-scripts splits '<repeats>_<name>' at the first '_', "
                 "which still works, but check the class tokens in dataset_config.toml")
    ddir = Path(inputs["dataset"].path)
    out = Path(ctx.out_dir) / "export"
    out.mkdir(parents=True)
    records = list(read_jsonl(ddir / "dataset.jsonl"))
    formats = set(config["formats"])
    summary: dict[str, Any] = {"images": len(records), "formats": sorted(formats)}

    if "kohya" in formats:
        img_root = out / "kohya" / "img"
        img_root.mkdir(parents=True)
        subsets: dict[int, str] = {}
        for r in records:
            reps = config["repeats"] * max(1, int(r.get("repeats", 1)))
            if reps not in subsets:
                name = kohya_folder_name(reps, config["trigger"], config["class_word"])
                (img_root / name).mkdir()
                subsets[reps] = name
            folder = img_root / subsets[reps]
            stem = r["id"].replace("_", "")
            _link(ddir / r["image"], folder / f"{stem}.png")
            _link(ddir / f"{Path(r['image']).stem}.txt", folder / f"{stem}.txt")
        toml = dataset_config_toml([(f"kohya/img/{subsets[k]}", k) for k in sorted(subsets)],
                                   resolution=config["resolution"],
                                   class_tokens=f"{config['trigger']} {config['class_word']}".strip())
        (out / "kohya" / "dataset_config.toml").write_text(toml, encoding="utf-8")
        summary["kohya_folders"] = {subsets[k]: sum(1 for r in records if config["repeats"] * max(1, int(r.get("repeats", 1))) == k)
                                    for k in sorted(subsets)}
    if "plain" in formats:
        (out / "plain").mkdir()
        for r in records:
            _link(ddir / r["image"], out / "plain" / r["image"])
            _link(ddir / f"{Path(r['image']).stem}.txt", out / "plain" / f"{Path(r['image']).stem}.txt")
    if "jsonl" in formats:
        with (out / "metadata.jsonl").open("w", encoding="utf-8") as fh:
            for r in records:
                file_name = f"plain/{r['image']}" if "plain" in formats else None
                if file_name is None and "kohya" in formats:
                    reps = config["repeats"] * max(1, int(r.get("repeats", 1)))
                    file_name = f"kohya/img/{kohya_folder_name(reps, config['trigger'], config['class_word'])}/{r['id']}.png"
                fh.write(json.dumps({"file_name": file_name, **r}) + "\n")
    (out / "export.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    ctx.metric("exported_images", len(records))
    ctx.log(f"exported {len(records)} images as {', '.join(sorted(formats))}")
    return {"export": base.Artifact("export", out, meta=summary)}


def report_sections(config: dict[str, Any], outputs: dict[str, base.Artifact], env: dict[str, Any]) -> list[base.ReportSection]:
    folder = Path(outputs["export"].path)
    summary = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    toml = (folder / "kohya" / "dataset_config.toml").read_text(encoding="utf-8") if (folder / "kohya" / "dataset_config.toml").exists() else ""
    return [base.ReportSection(title="Trainer export", template="sections/export.html.j2", anchor="export",
                               context={"summary": summary, "toml": toml})]
