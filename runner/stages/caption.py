"""`caption`: one caption per kept image, written as a .txt sidecar, and the training dataset.

The caption is ``dataset.captions.template`` filled with:

- ``{trigger}`` ``{class}``: character.trigger and character.class_word;
- ``{shot}``: "close-up", "medium shot", ... (from the analysis);
- ``{pose}``: "frontal view" / "three-quarter view" / "profile view" (+ "looking up/down");
- ``{expression}``: "smiling", "open mouth", "eyes closed" or "neutral expression";
- ``{lighting}``: "bright lighting", "dim lighting", "side lighting" or nothing;
- ``{people}``: "solo" or "N people";
- ``{attributes}``: pose, expression, lighting, people, curate's caption hints (``augment``
  names a busy background that stays over its target), then the captioning model's text (when
  ``captions.model`` names one) and ``extra_tags``.

Empty fields and doubled commas are cleaned up. Output ``dataset`` (the interface the train stage
reads): ``<id>.png`` + ``<id>.txt`` per image (crops included) and ``dataset.jsonl``; output
``balance``: ``balance.json`` from curation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.spec.config import node_field, schema_config, view_of
from runner.spec.sections import CaptionsConfig, ReportConfig, spec_config
from runner.stages.common import check_fields, curated_image_inputs, read_jsonl

TEMPLATE_FIELDS = ("trigger", "class", "shot", "attributes", "pose", "expression", "lighting", "people")


@schema_config("dataset", "captions")
class CaptionNode(CaptionsConfig):
    """The caption stage's node config: dataset.captions plus the character's trigger and class word."""

    trigger: str = node_field()
    class_word: str = node_field()


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    curate = graph.node(contract.node_id(graph.character, "curate"))
    if curate is None:
        return []
    typed = spec_config(spec)
    ch, cap = typed.character, typed.dataset.captions
    config = {
        "trigger": ch.trigger,
        "class_word": ch.class_word,
        "template": cap.template,
        "extra_tags": list(cap.extra_tags),
        "model": cap.model,
    }
    check_template(cap.template, "dataset.captions.template")
    return [
        contract.PlanNode(
            id=contract.node_id(graph.character, "caption"),
            kind="caption",
            character=graph.character,
            config=config,
            inputs={"curated": contract.StageOutputRef(curate.id, "curated"), **curated_image_inputs(graph)},
            outputs=("dataset", "balance"),
            label="template captions" + (f" + {cap.model}" if cap.model else ""),
        )
    ]


def check_template(template: str, key: str) -> None:
    check_fields(template, key, TEMPLATE_FIELDS)


def people_words(n: int) -> str:
    return "solo" if n <= 1 else f"{n} people"


def caption_fields(entry: dict[str, Any], config: CaptionNode | dict[str, Any], model_text: str = "") -> dict[str, str]:
    """The template's fields for one curated record (``entry``: analysis + curate's fields)."""
    from runner.vision import shots as S

    node = CaptionNode.from_dict(config)

    pose = S.pose_words(entry.get("pose"))
    expression = S.expression_words(entry.get("expression") or {}) if entry.get("pose") else ""
    lighting = S.lighting_words(entry.get("exposure"))
    people = people_words(int(entry.get("people") or 0))
    hints = entry.get("caption_hints") or []  # from curate (e.g. "busy background" when that stays over target)
    attrs = [a for a in (pose, expression, lighting, people, *hints, model_text.strip(), *node.extra_tags) if a]
    return {
        "trigger": node.trigger, "class": node.class_word, "shot": S.SHOT_WORDS.get(entry["shot"], entry["shot"]),
        "pose": pose, "expression": expression, "lighting": lighting, "people": people, "attributes": ", ".join(attrs),
    }


def render_caption(template: str, fields: dict[str, str]) -> str:
    text = template.format(**fields)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(\s*,\s*)+", ", ", text)  # empty fields leave ", ," behind
    return text.strip(" ,")


class ModelCaptioner:
    """A captioning model through transformers (BLIP-style image-to-text), loaded on first use."""

    def __init__(self, model_ref: str, project_root: Path) -> None:
        local = project_root / model_ref
        self.ref = str(local) if local.exists() else model_ref
        self._model = None
        self._processor = None

    def _load(self) -> None:
        location = self.ref
        from runner.hub import is_hub_id

        if is_hub_id(self.ref):
            # an uncached model without the hub fails now, before torch is imported or anything retries
            from runner.hub import ModelUnavailable, resolve_hub_model

            try:
                location = resolve_hub_model(self.ref, key="dataset.captions.model")
            except ModelUnavailable as exc:
                raise contract.StageError(f"dataset.captions.model: {exc}",
                                      hint=exc.hint + "; captions work without a model") from None
        try:
            import torch  # noqa: F401
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as exc:
            raise contract.StageError("captions.model needs transformers and torch",
                                  hint="pip install 'character-runner[train]', or remove dataset.captions.model",
                                  ) from exc
        try:
            self._processor = AutoProcessor.from_pretrained(location)
            self._model = AutoModelForImageTextToText.from_pretrained(location).eval()
        except (OSError, ValueError) as exc:
            raise contract.StageError(
                f"dataset.captions.model: cannot load {self.ref!r}: {str(exc).splitlines()[0]}",
                hint="give a local folder with the model, or a hub id reachable from this machine; captions work "
                     "without a model",
            ) from exc

    def __call__(self, image) -> str:
        if self._model is None:
            self._load()
        import torch

        inputs = self._processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=30, do_sample=False)
        return self._processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def _place_image(src: Path, dest: Path) -> None:
    """Hard-link (cached artifacts are immutable) or copy; convert to PNG when needed."""
    if src.suffix.lower() == ".png":
        try:
            os.link(src, dest)
            return
        except OSError:
            shutil.copyfile(src, dest)
            return
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").save(dest, format="PNG", compress_level=1)


@contract.register("caption", version=1, order=40, expand=expand,
               description="Template captions (optional captioning model) as .txt sidecars; the training dataset.",
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Template captions (optional captioning model) as .txt sidecars; the training dataset."""
    node = CaptionNode.from_dict(config)
    check_template(node.template, "dataset.captions.template")
    cdir = Path(inputs["curated"].path)
    out = Path(ctx.out_dir) / "dataset"
    out.mkdir(parents=True)
    bal_dir = Path(ctx.out_dir) / "balance"
    bal_dir.mkdir()
    shutil.copyfile(cdir / "balance.json", bal_dir / "balance.json")
    captioner = ModelCaptioner(node.model, Path(ctx.project_root)) if node.model else None
    if captioner:
        ctx.log(f"captioning model: {captioner.ref}")

    entries = list(read_jsonl(cdir / "curated.jsonl"))
    progress = ctx.progress(len(entries), "captions")
    n = 0
    with (out / "dataset.jsonl").open("w", encoding="utf-8") as fh:
        for e in entries:
            if e.get("parent"):
                src = cdir / e["file"]
            else:
                art = inputs.get(e["input"])
                if art is None:
                    raise contract.StageError(f"caption: input {e['input']!r} for image {e['id']} is missing",
                                          hint="the curate and caption stages must see the same image inputs")
                src = Path(art.path) / e["file"]
            dest = out / f"{e['id']}.png"
            _place_image(src, dest)
            model_text = ""
            if captioner:
                from PIL import Image

                with Image.open(dest) as im:
                    model_text = captioner(im.convert("RGB"))
            fields = caption_fields(e, node, model_text)
            caption = render_caption(node.template, fields)
            (out / f"{e['id']}.txt").write_text(caption + "\n", encoding="utf-8")
            rec = {
                "id": e["id"], "image": dest.name, "caption": caption, "shot": e["shot"],
                "categories": e["categories"], "repeats": int(e.get("repeats", 1)), "parent": e.get("parent"),
                "width": e["width"], "height": e["height"], "source": e.get("source", ""),
                "crop_box": e.get("crop_box"), "identity": e.get("identity"), "quality": e.get("quality"),
                "attributes": {k: fields[k] for k in ("pose", "expression", "lighting", "people")},
            }
            fh.write(json.dumps(rec) + "\n")
            n += 1
            progress.update(1)
    progress.close()
    if n == 0:
        ctx.warn("no images survived curation: the dataset is empty")
    ctx.metric("captions", n)
    ctx.log(f"{n} captions written")
    return {
        "dataset": contract.Artifact("dataset", out, meta={"count": n}),
        "balance": contract.Artifact("balance", bal_dir),
    }


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.embed import thumbnail_data_uri

    node = view_of(CaptionsConfig, config)  # the template and model are all the section shows
    folder = Path(outputs["dataset"].path)
    rep = view_of(ReportConfig, env)
    px, limit = rep.thumbnail_px, min(rep.gallery_limit, 48)
    items = []
    total = 0
    for r in read_jsonl(folder / "dataset.jsonl"):
        total += 1
        if len(items) < limit:
            items.append({"src": thumbnail_data_uri(folder / r["image"], px), "caption": r["caption"],
                          "repeats": r["repeats"], "parent": r.get("parent")})
    return [contract.ReportSection(title="Captions", template="sections/caption.html.j2", anchor="caption",
                               context={"items": items, "total": total, "template": node.template,
                                        "model": node.model})]
