"""`evaluate_video`: which video LoRA checkpoint (and LoRA scale) makes the best clips?

One node per train_video node (``<char>:evaluate_video`` or ``<char>:evaluate_video[<variant>]``),
planned when the spec has ``train_video``, ``generate.video`` and ``evaluate.video``. Inputs: the
train_video node's ``lora`` (index.json + checkpoints), the character's references (what face
fidelity compares with) and the key frames (``evaluate.video.key_frames``, else
``character.canonical_reference``, else the first reference image).

The clips are made as the video stage makes them (:mod:`runner.generate.clipcheck`: the same model,
preset, prompt prefix/suffix, fidelity and dynamics settings; frames, size and steps can be made
smaller with ``evaluate.video``), one pipeline loaded once. For every checkpoint x LoRA scale (a
*cell*; scale 0 is one ``baseline`` cell, the base model without the LoRA) a clip per prompt x
key frame x seed, each measured by the video stage's suite (face fidelity at several frames
against the 20 / 30 thresholds, mouth and eye openness over time, blinks, motion, identity drift
first to last). A checkpoint's LoRA is loaded once and its scales set with ``set_adapters``.

Each cell is written in its own folder of the shared cache (``<cache>/evaluate-video-cells/<key>/``,
keyed by everything that changes its clips: the LoRA files' content, scale, model, clip settings,
prompts, seeds, key frames, references, face and dynamics settings); a clip's folder is complete
once its clip.json is written and the cell's cell.json comes last, so a run killed with -9 resumes
at the next clip, and changing only the targets re-selects without generating anything.

Targets and the best cell: :mod:`runner.eval.video` (meets the targets, then the lowest mean face
distance, then fewer frozen clips, then the lower scale, then the earlier step). Outputs:
``results`` (results.json, clips/<cell>/ with each clip's mp4, poster and frame strip, and
compare.html: the video rows of :mod:`runner.eval.compare`) and ``best`` (best.json naming the
checkpoint, its scale and its LoRA file(s), copied beside it), which ``generate.video.lora: best``
takes. Figures from a tiny random model (builtin:tiny-*) are labelled as such.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.fs import atomic_write_text
from runner.spec.config import view_of
from runner.spec.sections import CharacterConfig, EvaluateConfig, HardwareConfig, ReportConfig, VideoConfig
from runner.stages.common import (
    IMAGE_EXTENSIONS,
    device_setting,
    face_options,
    load_rgb,
    model_input,
    output_json,
    reference_files,
    reference_inputs,
    rel_path,
    clip_fidelity,
    run_header,
    video_preset_fill,
    stage_gpu,
    variant_of,
    with_tracking,
)

KIND = "evaluate_video"
VERSION = 1
CELLS_DIR = "evaluate-video-cells"
DEFAULT_PROMPT = "the character moves naturally"  # the video stage's, when generate.video.prompt is null


# --------------------------------------------------------------------------- planning


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    """One node per train_video node, when the spec has an ``evaluate.video`` section."""
    section = (spec.get("evaluate") or {}).get("video")
    if not isinstance(section, dict):
        return []
    trains = graph.nodes_of("train_video")
    video = (spec.get("generate") or {}).get("video")
    if not trains or not isinstance(video, dict):
        missing = " and ".join(k for k, ok in (("train_video", trains), ("generate.video", isinstance(video, dict)))
                               if not ok)
        raise contract.StageError(f"evaluate.video evaluates train_video's checkpoints with generate.video's model; "
                                  f"the spec has no {missing}",
                                  hint="Add the missing section(s), or remove evaluate.video.")
    ev = EvaluateConfig.from_dict(spec.get("evaluate") or {}).video
    config = _node_config(spec, ev, graph)
    inputs = {**reference_inputs(spec, graph), **_key_frame_inputs(spec, ev, graph)}
    ref = model_input(config["model"], graph, "generate.video.model")
    if ref is not None:
        inputs["model_files"] = ref
    nodes = []
    for train in trains:
        _check_steps(config["checkpoints"], train)
        variant = variant_of(train.id)
        notes = () if train.config.get("base_model") == config["model"] else (
            f"train_video trains on {train.config.get('base_model')} but the clips are made with "
            f"generate.video.model {config['model']}: the LoRA must fit that model",)
        nodes.append(with_tracking(contract.PlanNode(
            id=contract.node_id(graph.character, KIND, variant), kind=KIND, character=graph.character,
            config={**config, "variant": variant}, inputs={"lora": contract.StageOutputRef(train.id, "lora"), **inputs},
            outputs=("results", "best"), gpu=stage_gpu(spec, KIND), label=_label(config), notes=notes), spec, graph))
    return nodes


def _label(config: dict[str, Any]) -> str:
    n = len(config["prompts"]) * len(config["seeds"]) * max(1, len(config["key_frames"]))
    scales = ", ".join(f"{s:g}" for s in config["lora_scales"])
    return (f"{n} clip{'s' if n != 1 else ''} ({config['frames']} frames {config['width']}x{config['height']}, "
            f"{config['steps']} steps) per checkpoint ({config['checkpoints']}) x LoRA scale ({scales})")


def _node_config(spec: dict[str, Any], ev: Any, graph: contract.GraphView) -> dict[str, Any]:
    """What every evaluate_video node runs with: the video stage's clip settings (with
    evaluate.video's frames / size / steps), the grid, the targets."""
    from runner.spec.config import to_plain

    raw = (spec.get("generate") or {}).get("video") or {}
    v = VideoConfig.from_dict({**raw, **video_preset_fill(raw, graph.project_root)})
    width, height = int(ev.width or v.width), int(ev.height or v.height)
    if width % 32 or height % 32:
        raise contract.StageError(f"evaluate.video: width and height must be multiples of 32 for the video families "
                                  f"(got {width}x{height})",
                                  hint=f"e.g. {width // 32 * 32 or 32}x{height // 32 * 32 or 32}")
    scales = [float(s) for s in ev.lora_scales]
    if not any(s > 0 for s in scales):
        raise contract.StageError("evaluate.video.lora_scales: only 0 (the base model without the LoRA) is listed",
                                  hint="Add the scales to evaluate the checkpoints at, e.g. [0, 0.8, 1.0].")
    prefix, suffix = v.prompt_prefix or "", v.prompt_suffix or ""
    prompts = [_prompt(p, prefix, suffix) for p in (ev.prompts or [v.prompt or DEFAULT_PROMPT])]
    fid, character = v.fidelity, CharacterConfig.from_dict(spec["character"])
    return {
        "model": v.model, "pipeline": v.pipeline, "family": v.family,
        "checkpoints": ev.checkpoints if isinstance(ev.checkpoints, str) else [int(s) for s in ev.checkpoints],
        "lora_scales": sorted(set(scales)), "prompts": prompts, "seeds": [int(s) for s in ev.seeds],
        "key_frames": list(ev.key_frames) or ([character.canonical_reference] if character.canonical_reference else []),
        "negative_prompt": v.negative_prompt,
        "steps": int(ev.steps or v.steps or 10),
        "guidance": float(v.guidance if v.guidance is not None else 1.0),
        "image_conditioning": float(v.image_conditioning if v.image_conditioning is not None else 1.0),
        "frames": int(ev.frames or v.frames), "fps": int(v.fps), "width": width, "height": height,
        "decode_timestep": float(v.decode_timestep), "decode_noise_scale": float(v.decode_noise_scale),
        # the checkpoints are compared on the same seeds: no regeneration, no upscale, no replaced frame
        "fidelity": {"frames": int(fid.frames), "excellent": float(fid.excellent), "fail": float(fid.fail),
                     "on_fail": "flag", "retries": 0, "against": fid.against},
        "dynamics": v.dynamics.to_dict(),
        "targets": to_plain(ev.targets),
        "face": face_options(spec, fid.face_model),
        "references": list(character.references),
        "device": HardwareConfig.from_dict(spec.get("hardware") or {}).device,
    }


def _prompt(core: str, prefix: str, suffix: str) -> str:
    return ", ".join(p.strip().rstrip(",") for p in (prefix, core, suffix) if p and p.strip())


def _key_frame_inputs(spec: dict[str, Any], ev: Any, graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """``key_frame<i>`` file sets (each one image); none when the first reference image is the key frame."""
    character = CharacterConfig.from_dict(spec["character"])
    frames = list(ev.key_frames) or ([character.canonical_reference] if character.canonical_reference else [])
    if not frames and not character.references:
        raise contract.StageError("evaluate.video: no key frame: evaluate.video.key_frames, "
                                  "character.canonical_reference and character.references are all empty",
                                  hint="List key-frame images in evaluate.video.key_frames (or add references).")
    key = "evaluate.video.key_frames" if ev.key_frames else "character.canonical_reference"
    return {f"key_frame{i}": contract.FileSetRef(root=graph.project_root / f, patterns=("*",), recursive=False,
                                                 spec_key=f"{key}[{i}]" if ev.key_frames else key)
            for i, f in enumerate(frames)}


def _check_steps(which: Any, train: contract.PlanNode) -> None:
    if isinstance(which, str):
        return
    from runner.generate.video_lora import planned_steps

    steps = planned_steps(train.config)
    missing = [s for s in which if steps is not None and s not in steps]
    if missing:
        raise contract.StageError(f"evaluate.video.checkpoints: {train.id} will not keep step(s) "
                                  f"{', '.join(map(str, missing))}; it keeps {', '.join(map(str, steps))}",
                                  hint="List kept steps, or use all / last (train_video.checkpoints: "
                                       "every_steps, keep_last).")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Checkpoint:
    index: int  # position in index.json's checkpoints
    entry: dict[str, Any]  # step, phase, diffusers and experts file names
    main: Path  # the diffusers file
    files: dict[str, Path]  # every expert's file: {component: file} (Wan 2.2 A14B: transformer, transformer_2)

    @property
    def step(self) -> int:
        return int(self.entry["step"])


def read_index(lora_root: Path) -> dict[str, Any]:
    path = lora_root / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise contract.StageError(f"cannot read train_video's LoRA index {path}: {exc}",
                                  hint="Re-run train_video (runner apply --force train_video).") from None
    if not index.get("checkpoints"):
        raise contract.StageError(f"{path}: no checkpoints listed",
                                  hint="Re-run train_video; its output is incomplete.")
    return index


def select_checkpoints(index: dict[str, Any], lora_root: Path, which: Any) -> list[Checkpoint]:
    """all, last, or the listed steps (a step the index does not have is refused, naming those it has)."""
    cks = list(enumerate(index["checkpoints"]))
    if which == "last":
        cks = [cks[int(index.get("final", len(cks) - 1))]]
    elif not isinstance(which, str):
        have = [int(ck["step"]) for _, ck in cks]
        missing = [s for s in which if s not in have]
        if missing:
            raise contract.StageError(f"evaluate.video.checkpoints: step(s) {missing} not in {lora_root}/index.json",
                                      hint=f"Its checkpoints: steps {have}.")
        cks = [(i, ck) for i, ck in cks if int(ck["step"]) in which]
    from runner.generate.video_lora import checkpoint_files

    out = []
    for i, ck in cks:
        if not ck.get("diffusers"):
            raise contract.StageError(f"train_video checkpoint at step {ck.get('step')} lists no LoRA file",
                                      hint="Re-run train_video; its output looks incomplete.")
        main, files = checkpoint_files(lora_root, ck)
        bad = [str(f) for f in {main, *files.values()} if not f.is_file()]
        if bad:
            raise contract.StageError(f"train_video checkpoint at step {ck.get('step')}: LoRA file missing: "
                                      f"{', '.join(bad)}", hint="Re-run train_video; its output looks incomplete.")
        out.append(Checkpoint(i, ck, main, files))
    return out


def _key_frames(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx) -> list[dict[str, Any]]:
    """(name, image, from) of each key frame: the key_frame inputs, else the first reference image."""
    frames = []
    names = sorted((k for k in inputs if k.startswith("key_frame")), key=lambda k: int(k[len("key_frame"):]))
    for i, k in enumerate(names):
        art = inputs[k]
        f = Path(art.files[0]) if art.files else Path(art.path)
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
            raise contract.StageError(f"evaluate.video: key frame {config['key_frames'][i]} is not an image file",
                                      hint=f"Give image files ({', '.join(IMAGE_EXTENSIONS)}).")
        frames.append({"name": f"kf{i}", "image": load_rgb(f), "text": "", "from": rel_path(f, ctx.project_root),
                       "tiny_random": False, "file": f})
    if not frames:
        refs = reference_files(inputs)
        if not refs:
            raise contract.StageError("evaluate.video: no key frame (no reference image found)",
                                      hint="Set evaluate.video.key_frames or add images to character.references.")
        frames.append({"name": "kf0", "image": load_rgb(refs[0]), "text": "",
                       "from": rel_path(refs[0], ctx.project_root), "tiny_random": False, "file": refs[0]})
    return frames


def _load_pipeline(config: dict[str, Any], ctx):
    from runner.core.device import choose_device
    from runner.generate import ltx, video_models

    device = choose_device(device_setting(config))
    try:
        vp = ltx.load_video_pipeline(config["model"], pipeline=config["pipeline"],
                                     image_conditioning=config["image_conditioning"], device=device,
                                     cache_dir=ctx.cache_dir, project_root=ctx.project_root,
                                     family=config.get("family", "auto"))
    except video_models.VideoModelError as exc:
        raise contract.StageError(f"generate.video.model: {exc}", hint=exc.hint) from None
    try:
        video_models.check_shape(vp, config["width"], config["height"], config["frames"])
    except contract.StageError as exc:
        raise contract.StageError(f"evaluate.video (frames, width, height): {exc}", hint=exc.hint) from None
    return vp


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@dataclass
class Grid:
    """Makes the cells: one clip per prompt x key frame x seed, each cell once (cached by content)."""

    config: dict[str, Any]
    vp: Any
    fidelity: Any
    key_frames: list[dict[str, Any]]
    ctx: Any
    common_key: str
    prog: Any = None
    folders: dict[str, Path] = field(default_factory=dict)  # cell name -> its cache folder

    @classmethod
    def start(cls, config, vp, fidelity, key_frames, ref_files, ctx) -> Grid:
        from runner.core.hashing import file_sha256

        keyed = {k: config[k] for k in ("model", "pipeline", "family", "prompts", "seeds", "negative_prompt", "steps",
                                        "guidance", "image_conditioning", "frames", "fps", "width", "height",
                                        "decode_timestep", "decode_noise_scale", "fidelity", "dynamics", "face")}
        common = _sha({"version": VERSION, **keyed, "device": device_setting(config),
                       "key_frames": [file_sha256(k["file"]) for k in key_frames],
                       "references": sorted(file_sha256(f) for f in ref_files)})
        (ctx.cache_dir / CELLS_DIR).mkdir(parents=True, exist_ok=True)
        return cls(config, vp, fidelity, key_frames, ctx, common)

    def jobs(self) -> list[tuple[Any, int]]:
        from runner.generate.clipcheck import ClipJob

        out = []
        for p_i, prompt in enumerate(self.config["prompts"]):
            for kf in self.key_frames:
                for seed in self.config["seeds"]:
                    out.append((ClipJob(f"p{p_i}_{kf['name']}_s{seed}", kf, prompt), seed))
        return out

    def run_all(self, checkpoints: list[Checkpoint]) -> list[dict[str, Any]]:
        scales = self.config["lora_scales"]
        lora_scales = [s for s in scales if s > 0]
        self.prog = self.ctx.progress(len(self.jobs()) * ((0 in scales) + len(checkpoints) * len(lora_scales)),
                                      "evaluate_video: clips")
        cells = [self.cell("baseline", None, 0.0, [self.common_key, "baseline"])] if 0 in scales else []
        for c in cells:
            c.pop("_loaded")
        for ck in checkpoints:
            cells += self.checkpoint(ck, lora_scales)
        self.prog.close()
        return cells

    def checkpoint(self, ck: Checkpoint, scales: list[float]) -> list[dict[str, Any]]:
        """Every scale of one checkpoint: its LoRA loaded once, when a cell is not cached yet."""
        from runner.core.hashing import file_sha256
        from runner.diffusion.lora import unload_loras

        shas = {k: file_sha256(f) for k, f in ck.files.items()}
        loaded, cells = False, []
        for scale in scales:
            name = f"step{ck.step:06d}_scale{scale:g}"
            cells.append(self.cell(name, ck, scale, [self.common_key, shas, scale], loaded))
            loaded = loaded or cells[-1].pop("_loaded")
        if loaded:
            unload_loras(self.vp.pipe)
        return cells

    def cell(self, name: str, ck: Checkpoint | None, scale: float, key: list, loaded: bool = False) -> dict[str, Any]:
        """One cell's clips, from its cache folder or made there; its cell.json is written last."""
        folder = self.ctx.cache_dir / CELLS_DIR / _sha(key)[:40]
        self.folders[name] = folder
        done = folder / "cell.json"
        meta = {"cell": name, "step": ck.step if ck else None, "phase": ck.entry.get("phase") if ck else None,
                "checkpoint_index": ck.index if ck else None, "lora_scale": float(scale), "_loaded": False}
        if done.is_file():
            self.prog.update(len(self.jobs()))
            return {**json.loads(done.read_text(encoding="utf-8")), **meta}
        if ck is not None:
            self._apply_lora(ck, scale, loaded)
            meta["_loaded"] = True
        t0 = time.monotonic()
        clips = [self._clip(job, seed, folder) for job, seed in self.jobs()]
        cell = {"clips": clips, "timing": {"seconds": round(time.monotonic() - t0, 3)}}
        atomic_write_text(done, json.dumps(cell, default=str))
        return {**cell, **meta}

    def _apply_lora(self, ck: Checkpoint, scale: float, loaded: bool) -> None:
        from runner.generate import video_models

        if loaded:  # the checkpoint's adapter(s) at the next scale
            names = list(self.vp.pipe.get_active_adapters())
            self.vp.pipe.set_adapters(names, adapter_weights=[float(scale)] * len(names))
            return
        video_models.load_lora(self.vp, ck.main, scale, key=f"train_video checkpoint {ck.step}", experts=ck.files)

    def _clip(self, job: Any, seed: int, folder: Path) -> dict[str, Any]:
        """One clip with the video stage's ClipMaker (kept when its clip.json exists)."""
        from runner.generate.clipcheck import ClipMaker, Pricing

        record = folder / "clips" / job.name / "clip.json"
        if record.is_file():
            rec = json.loads(record.read_text(encoding="utf-8"))
        else:
            config = {**self.config, "seed": int(seed), "upscale": False, "upsampler": None,
                      "replace_first_frame": False, "audio": False,
                      "targets": {"max_seconds": None, "max_cost": None}}
            maker = ClipMaker(config, self.vp, self.fidelity, None, Pricing("none", 0.0, ""), self.ctx)
            rec = maker.make(job, 0, folder / "clips" / job.name)
        self.prog.update(1)
        return rec


TRACKED = ("distance", "worst_distance", "excellent", "fail", "frozen", "blinks_min", "mouth_spread", "motion",
           "drift_max")


def track(config: dict[str, Any], outputs: dict[str, contract.Artifact], env: dict[str, Any]) -> list[dict[str, Any]]:
    """One tracked run: the node config as params; per LoRA scale, each figure over the checkpoint
    steps (``eval_video/<figure>/scale_<s>``); the best cell's figures as the summary; results.json
    and best/ as artifacts."""
    from runner.stages.common import track as send
    from runner.tracking import StageLog

    out = outputs["results"].path
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    series: dict[str, list[tuple[int, float]]] = {}
    for cell in results["cells"]:
        for name in TRACKED:
            v = cell["summary"].get(name)
            if cell.get("step") is not None and isinstance(v, (int, float)):
                series.setdefault(f"eval_video/{name}/scale_{float(cell['lora_scale']):g}", []).append(
                    (int(cell["step"]), float(v)))
    best = results["best"]
    best_cell = next(c for c in results["cells"] if c["cell"] == best["cell"])
    summary = {"best_step": float(best["step"]), "best_lora_scale": float(best["lora_scale"]),
               **{f"best_{k}": float(v) for k, v in best_cell["summary"].items()
                  if k in TRACKED and isinstance(v, (int, float))}}
    log = StageLog(name=f"{env['stage_id']} {env['run_id']}", kind=KIND,
                   params={k: v for k, v in config.items() if k != "tracking"},
                   tags={"runner.variant": str(config.get("variant") or "")}, series=series, metrics=summary,
                   artifacts=[(out / "results.json", "results"), (outputs["best"].path, "best")])
    return send(config, log, env)


def work_units(config: dict[str, Any]) -> tuple[float, str] | None:
    """Clips one execution makes (the plan's estimates learn seconds per clip); None for
    ``checkpoints: all``, whose count only train_video's output tells."""
    which = config.get("checkpoints", "all")
    if which == "all":
        return None
    per_cell = len(config["prompts"]) * len(config["seeds"]) * max(1, len(config.get("key_frames") or []))
    scales = config["lora_scales"]
    n_ckpt = 1 if which == "last" else len(which)
    return float(per_cell * ((0 in scales) + n_ckpt * sum(1 for s in scales if s > 0))), "clip"


@contract.register(KIND, version=VERSION, order=65, expand=expand, typical_seconds=1800.0, work_units=work_units,
                   track=track,
                   description="Clips per video LoRA checkpoint x scale, checked by the video suite; the best one.",
                   report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Clips per video LoRA checkpoint x scale, checked by the video suite; the best one."""
    from runner.eval import video as EV

    t_start = time.monotonic()
    if "lora" not in inputs:
        raise contract.StageError("evaluate_video needs train_video's 'lora' output")
    lora_root = Path(inputs["lora"].path)
    index = read_index(lora_root)
    checkpoints = select_checkpoints(index, lora_root, config["checkpoints"])
    key_frames = _key_frames(config, inputs, ctx)
    vp = _load_pipeline(config, ctx)
    fidelity, ref_files = clip_fidelity(config, inputs, ctx, source_is="key frame")
    grid = Grid.start(config, vp, fidelity, key_frames, ref_files, ctx)
    cells = [EV.score_cell(c, config["targets"]) for c in grid.run_all(checkpoints)]
    choice = EV.select_best(cells)
    best_cell = cells[choice["index"]]
    tiny = {"video_model": bool(vp.tiny_random), "lora": bool(index.get("tiny_random_model"))}
    results = {**run_header(ctx), "kind": KIND, "variant": config.get("variant"), "model": config["model"],
               "family": vp.family.name, "tiny_random": {**tiny, "any": any(tiny.values())},
               "generation": {k: config[k] for k in ("prompts", "seeds", "lora_scales", "frames", "fps", "width",
                                                     "height", "steps", "guidance")},
               "key_frames": [k["from"] for k in key_frames], "references": [rel_path(f, ctx.project_root)
                                                                              for f in ref_files],
               "fidelity_settings": {**config["fidelity"], "against": fidelity.against,
                                     "threshold": fidelity.threshold},
               "targets": config["targets"], "cells": cells}
    out = _write_results(ctx, results, grid.folders)
    best = _write_best(ctx, index, checkpoints, best_cell, choice, config, results["tiny_random"]["any"])
    results["best"] = best
    results["duration_s"] = round(time.monotonic() - t_start, 2)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    _write_compare(out, results, ctx)
    _log(ctx, best, best_cell)
    meta = {"best": best, "tiny_random": results["tiny_random"]["any"]}
    return {"results": contract.Artifact("results", out, meta=meta),
            "best": contract.Artifact("best", ctx.out_dir / "best", meta=meta)}


def _write_results(ctx, results: dict[str, Any], folders: dict[str, Path]) -> Path:
    """Each cell's clips (mp4, poster, a strip of the analysed frames) under clips/<cell>/."""
    from runner.eval.video import write_strip

    out = ctx.out_dir / "results"
    if out.exists():  # left by an interrupted attempt; this stage owns it
        shutil.rmtree(out)
    for cell in results["cells"]:
        dest = out / "clips" / cell["cell"]
        dest.mkdir(parents=True)
        for c in cell["clips"]:
            src = folders[cell["cell"]] / "clips" / c["name"]
            for key in ("file", "poster"):
                shutil.copy2(src / Path(c[key]).name, dest / Path(c[key]).name)
            c["file"], c["poster"] = (f"clips/{cell['cell']}/{Path(c[k]).name}" for k in ("file", "poster"))
            frames = [f["frame"] for f in c["fidelity"].get("frames") or []] or [0]
            c["strip"] = f"clips/{cell['cell']}/" + write_strip(out / c["file"], frames,
                                                                  dest / f"{c['name']}_strip.jpg")
    return out


def _write_best(ctx, index: dict[str, Any], checkpoints: list[Checkpoint], best_cell: dict[str, Any],
                choice: dict[str, Any], config: dict[str, Any], tiny: bool) -> dict[str, Any]:
    """best/: the best checkpoint's LoRA file(s) and best.json (what generate.video.lora: best reads)."""
    ck = next(c for c in checkpoints if c.index == best_cell["checkpoint_index"])
    folder = ctx.out_dir / "best"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    experts = {}
    for component, f in ck.files.items():  # each expert's file; a second one with the same name is prefixed
        name = f.name if f.name not in experts.values() else f"{component}_{f.name}"
        shutil.copy2(f, folder / name)
        experts[component] = name
    main = next((n for c, n in experts.items() if ck.files[c] == ck.main), None)
    if main is None:
        main = ck.main.name
        shutil.copy2(ck.main, folder / main)
    best = {"stage_id": ctx.stage_id, "variant": config.get("variant"), "step": ck.step, "phase": ck.entry.get("phase"),
            "checkpoint_index": ck.index, "lora_scale": best_cell["lora_scale"], "cell": best_cell["cell"],
            "file": main, "experts": experts, "base_model": index.get("base_model"),
            "model_family": index.get("model_family"),
            "targets_met": choice["targets_met"], "decided_by": choice["decided_by"], "reason": choice["reason"],
            # what the selection ranked it by, so the video stage can rank the variants' picks alike
            "summary": best_cell["summary"], "targets_passed": best_cell["targets_passed"],
            "targets_total": best_cell["targets_total"], "tiny_random": tiny}
    atomic_write_text(folder / "best.json", json.dumps(best, indent=1))
    return best


def _write_compare(out: Path, results: dict[str, Any], ctx) -> None:
    """compare.html in the results: the video rows of runner compare for this stage's cells."""
    from runner.eval.compare import render_comparison, load_any

    atomic_write_text(out / "compare.html", render_comparison([load_any(out / "results.json", ctx.stage_id)]))


def _log(ctx, best: dict[str, Any], best_cell: dict[str, Any]) -> None:
    s = best_cell["summary"]
    if s["distance"] is not None:
        ctx.metric("best_face_distance", s["distance"])
    ctx.metric("best_step", best["step"])
    ctx.metric("best_lora_scale", best["lora_scale"])
    label = " (tiny random model: figures are meaningless)" if best["tiny_random"] else ""
    ctx.log(f"evaluate_video: best step {best['step']} at LoRA scale {best['lora_scale']:g} - {best['reason']}{label}")
    if not best["targets_met"]:
        ctx.warn(f"evaluate_video: no checkpoint x scale meets every target ({best_cell['cell']} is the closest)")


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.eval.video import video_rows

    found = output_json(outputs, "results", "results.json")
    if found is None:
        return []
    folder, results = found
    rows = video_rows(results, folder, thumb_px=view_of(ReportConfig, env).thumbnail_px // 2,
                      embed_max_bytes=int(env.get("video_embed_max_bytes", 2 * 1024 * 1024)))
    page = folder / "compare.html"
    ctx = {"v": rows, "compare_uri": page.resolve().as_uri() if page.is_file() else "",
           "run_id": results.get("run_id") or ""}
    variant = results.get("variant")
    return [contract.ReportSection(title="Video LoRA evaluation" + (f" [{variant}]" if variant else ""),
                                   template="sections/evaluate_video.html.j2", context=ctx,
                                   anchor="evaluate-video" + (f"-{variant}" if variant else ""))]
