"""`video`: image-to-video clips (a video family: LTX-Video 0.9, LTX-2, Wan 2.2) with fidelity, expression
dynamics, motion, time and cost.

Node ``<char>:video`` when the spec has ``generate.video``. Its sources:

- ``source: storyboard``: the storyboard's frames numbered in ``key_frames`` (input
  ``storyboard`` from ``<char>:storyboard``); each clip's prompt is ``prompt`` or the scene text;
- ``source: <image path>``: that image (a file-set input, so its content is in the cache key).

The preset (``baseline``, ``aggressive-quality``, shipped in runner/presets/video/) fills steps,
guidance, image conditioning and the prompt prefix/suffix; every value can be set in the spec.
With ``suite: builtin`` (runner/presets/video_suite/builtin.yaml) or a suite file, the suite's
cases also run on every source.

The model is one of the registry's video families (``generate.video.family``, auto-detected from
``generate.video.model``; :mod:`runner.generate.video_models`); LTX-2's audio goes into the mp4
when ``generate.video.audio`` is on. Per clip (run): 1. generate; 2. optional 2x upscale (latent
upsampler when ``upsampler`` is set, else a Lanczos resize, and the report says which);
3. optional first-frame replacement by the source image; 4. measure fidelity at ``fidelity.frames``
evenly spaced frames, expression dynamics and motion (:mod:`runner.generate.measures`); a clip
graded ``fail`` is regenerated with the next seed up to ``fidelity.retries`` times when
``on_fail: regenerate`` (the best attempt is kept), else flagged (a clip a reviewer rejected in
``runner review`` is made again from seeds it never used); 5. mp4 (H.264, PyAV) + poster
frame; 6. time per step and cost against ``targets`` (:mod:`runner.generate.budget`).
Finished clips are kept in the scratch folder, so a new apply resumes at the next clip.

Output artifact ``video``: ``clips/<name>.mp4``, ``clips/<name>.jpg`` (poster), ``report.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.device import choose_device
from runner.core.fs import atomic_write_text
from runner.generate.clipcheck import (  # noqa: F401 (COUNTED_STEPS: the stage's names)
    COUNTED_STEPS, ClipJob, ClipMaker, Fidelity, Pricing)
from runner.spec.sections import CharacterConfig, EvaluateConfig, HardwareConfig, VideoConfig
from runner.stages.common import (
    device_setting,
    face_options,
    input_file,
    load_embedder,
    load_rgb,
    model_input,
    output_json,
    reference_inputs,
    rel_path,
    clip_fidelity,
    run_header,
    video_preset_fill,
    resume_note,
    review_section,
    stage_gpu,
    tiny_note,
)

VERSION = 2  # 2: dynamics read mouth opening over eye distance and blinks on every frame (issue 16)
# The settings report.json repeats.
SETTINGS = ("steps", "guidance", "image_conditioning", "frames", "fps", "width", "height", "prompt_prefix",
            "prompt_suffix", "negative_prompt", "seed", "lora", "lora_scale", "replace_first_frame", "upscale",
            "upsampler")


# --------------------------------------------------------------------------- planning


def load_suite(ref: str | None, project_root: Path) -> dict[str, Any] | None:
    """The video test suite: 'builtin', a project-relative .yaml path, or None."""
    if not ref:
        return None
    from runner.resources import resource_dir
    from runner.paths import file_name_problem
    from runner.spec.yamlio import YamlError, load_yaml_file

    path = resource_dir("presets") / "video_suite" / f"{ref}.yaml"
    if not path.is_file():
        path = project_root / ref
    if not path.is_file():
        raise contract.StageError(f"generate.video.suite: {ref!r} is neither a built-in suite nor a file",
                              hint="Use suite: builtin, or a path to a suite .yaml (cases: [{name, prompt, expect}]).")
    try:
        data = load_yaml_file(path).data or {}
    except YamlError as exc:
        raise contract.StageError(f"generate.video.suite: {exc}",
                                  hint=exc.hint or "Fix the suite file's YAML.") from None
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, list) or not cases:
        raise contract.StageError(f"generate.video.suite: {path} has no 'cases' list",
                              hint="A suite file needs cases: [{name: ..., prompt: ..., expect: {...}}].")
    for i, c in enumerate(cases):
        if not isinstance(c, dict) or not c.get("name") or not c.get("prompt"):
            raise contract.StageError(f"generate.video.suite: {path}: cases[{i}] needs a name and a prompt")
        bad_name = file_name_problem(str(c["name"]))  # it names the clip's folder and files
        if bad_name:
            raise contract.StageError(f"generate.video.suite: {path}: cases[{i}].name {c['name']!r}: {bad_name}",
                                  hint="Case names become file names: use letters, digits, '_' or '-'.")
    return {"source": ref, "cases": cases}


def _render_case(case: dict[str, Any], character: dict[str, Any]) -> dict[str, Any]:
    traits = list((character.get("traits") or {}).get("fixed") or [])
    subject = f"the {character.get('class_word') or 'person'}"
    feats = case.get("features")
    features = traits if feats == "{traits}" else list(feats or [])
    prompt = case["prompt"].replace("{subject}", subject).replace("{features}", ", ".join(features) or "their face")
    return {"name": str(case["name"]), "prompt": prompt[:1].upper() + prompt[1:], "features": features,
            "expect": dict(case.get("expect") or {})}


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    video = (spec.get("generate") or {}).get("video")
    if not isinstance(video, dict):
        return []
    v = VideoConfig.from_dict(video)
    source, key_frames = v.source, [int(k) for k in v.key_frames]
    inputs = _source_input(source, key_frames, graph)
    width, height = int(v.width), int(v.height)
    if width % 32 or height % 32:
        raise contract.StageError(f"generate.video: width and height must be multiples of 32 for the video "
                                  f"families (got {width}x{height})",
                                  hint=f"e.g. width: {width // 32 * 32}, height: {height // 32 * 32}")
    inputs.update(reference_inputs(spec, graph))
    lora_from = _lora_inputs(v.lora, graph, inputs)  # best / step-N: from evaluate_video / train_video
    for key in ("model", "lora", "upsampler"):
        ref = model_input(getattr(v, key), graph, f"generate.video.{key}") if key != "lora" or not lora_from else None
        if ref is not None:
            inputs[f"{key}_files"] = ref
    suite = load_suite(v.suite, graph.project_root)
    if suite is not None:
        character = spec.get("character") or {}
        suite = {"source": suite["source"], "cases": [_render_case(c, character) for c in suite["cases"]]}
    video = {**video, **video_preset_fill(video, graph.project_root)}
    config = _node_config(spec, video, source, key_frames, suite)
    if lora_from:
        config["lora_from"] = lora_from
    review = review_section(graph, "video")  # clips a reviewer rejected (runner review)
    if review:
        config["review"] = review
    # Prices and time/cost targets only grade the clips (re-graded at report time): not keyed.
    label = _label(config, key_frames)
    fam = _family_of(config, graph.project_root)  # cheap: a builtin's, a folder's, a hub id's pattern
    label += f" on {fam.title}" if fam is not None else ""
    from runner.diffusion import memory  # offload / VAE tiling resolved, and the plan's GPU memory note
    config.update(memory.video_generate_memory(spec, {**config, "offload": v.offload, "vae_tiling": v.vae_tiling},
                                               fam))
    return [contract.PlanNode(id=contract.node_id(graph.character, "video"), kind="video", character=graph.character,
                              config=config, inputs=inputs, outputs=("video",), gpu=stage_gpu(spec, "video"),
                              label=label, unkeyed=("price", "targets"),
                              notes=memory.video_stage_notes(spec, config, fam))]


def _lora_inputs(lora: str | None, graph: contract.GraphView, inputs: dict[str, contract.InputRef]) -> str | None:
    """``generate.video.lora: best`` (each evaluate_video's pick: inputs ``lora_best<i>``) or ``step-<N>``
    (that checkpoint of train_video's lora: input ``lora_train``); the node it comes from, or None
    for a path (a file-set input, as before) or no LoRA."""
    from runner.generate.video_lora import planned_steps, step_of

    step = step_of(lora)
    if lora != "best" and step is None:
        return None
    trains = graph.nodes_of("train_video")
    if not trains:
        raise contract.StageError(f"generate.video.lora: {lora!r} names a train_video checkpoint, but the spec has no "
                                  "train_video", hint="Add a train_video section, or set generate.video.lora to a "
                                                      "LoRA .safetensors file.")
    if lora == "best":
        evaluates = graph.nodes_of("evaluate_video")
        if not evaluates:
            raise contract.StageError("generate.video.lora: best needs evaluate.video (the evaluate_video stage "
                                      "picks the best checkpoint)",
                                      hint="Add an evaluate.video section, or use step-<N> (a train_video checkpoint).")
        for i, node in enumerate(evaluates):  # one per train_video variant: the best of their picks
            inputs[f"lora_best{i}"] = contract.StageOutputRef(node.id, "best")
        return ", ".join(n.id for n in evaluates)
    if len(trains) > 1:
        raise contract.StageError(f"generate.video.lora: {lora} is ambiguous: train_video has {len(trains)} variants "
                                  f"({', '.join(t.id for t in trains)})",
                                  hint="Use best (evaluate.video picks among every variant's checkpoints), or a "
                                       "LoRA file path.")
    kept = planned_steps(trains[0].config)
    if kept is not None and step not in kept:
        raise contract.StageError(f"generate.video.lora: {trains[0].id} will not keep step {step}; it keeps "
                                  f"{', '.join(f'step-{s}' for s in kept)}",
                                  hint="Use one of those, best, or change train_video.checkpoints "
                                       "(every_steps, keep_last).")
    inputs["lora_train"] = contract.StageOutputRef(trains[0].id, "lora")
    return trains[0].id


def _family_of(config: dict[str, Any], project_root: Path):
    """The video family the spec names or its model is (None when only loading tells)."""
    from runner.core.errors import UserError
    from runner.generate.video_models import family_of_ref

    try:
        return family_of_ref(config["model"], config.get("family", "auto"), project_root)
    except UserError as exc:
        raise contract.StageError(str(exc), hint=exc.hint) from None


def _source_input(source: str, key_frames: list[int], graph: contract.GraphView) -> dict[str, contract.InputRef]:
    """The storyboard's output (its frames numbered in key_frames must exist), or the source image."""
    if source != "storyboard":
        return {"source": contract.FileSetRef(root=graph.project_root / source, patterns=("*",), recursive=False,
                                              spec_key="generate.video.source")}
    sb = graph.node(contract.node_id(graph.character, "storyboard"))
    if sb is None:
        raise contract.StageError("generate.video.source is 'storyboard' but the spec has no generate.storyboard",
                                  hint="Add generate.storyboard, or set generate.video.source to an image path.")
    n = len(sb.config.get("scenes") or []) or int((sb.config.get("llm_request") or {}).get("max_scenes", 10))
    too_big = [k for k in key_frames if k > n]
    if too_big:
        raise contract.StageError(f"generate.video.key_frames: {too_big} beyond the storyboard's {n} scenes",
                                  hint=f"Use frame numbers 1..{n}.")
    return {"storyboard": contract.StageOutputRef(sb.id, "storyboard")}


def _node_config(spec: dict[str, Any], video: dict[str, Any], source: str, key_frames: list[int],
                 suite: dict[str, Any] | None) -> dict[str, Any]:
    """The node config (``video`` has the preset's values filled in), without the review's part."""
    from runner.spec.config import to_plain

    v = VideoConfig.from_dict(video)
    hardware = HardwareConfig.from_dict(spec.get("hardware") or {})
    fid, targets = v.fidelity, v.targets
    return {
        "model": v.model,
        "pipeline": v.pipeline,
        "family": v.family,
        "audio": bool(v.audio),
        "preset": v.preset,
        "source": source,
        "key_frames": key_frames if source == "storyboard" else [],
        "prompt": v.prompt,
        "prompt_prefix": v.prompt_prefix or "",
        "prompt_suffix": v.prompt_suffix or "",
        "negative_prompt": v.negative_prompt,
        "steps": int(v.steps or 10),
        "guidance": float(v.guidance if v.guidance is not None else 1.0),
        "image_conditioning": float(v.image_conditioning if v.image_conditioning is not None else 1.0),
        "frames": int(v.frames),
        "fps": int(v.fps),
        "width": int(v.width),
        "height": int(v.height),
        "seed": int(v.seed),
        "lora": v.lora,
        "lora_scale": float(v.lora_scale),
        "replace_first_frame": bool(v.replace_first_frame),
        "upscale": bool(v.upscale),
        "upsampler": v.upsampler,
        "decode_timestep": float(v.decode_timestep),
        "decode_noise_scale": float(v.decode_noise_scale),
        "fidelity": {"frames": int(fid.frames), "excellent": float(fid.excellent), "fail": float(fid.fail),
                     "on_fail": fid.on_fail, "retries": int(fid.retries), "against": fid.against},
        "dynamics": v.dynamics.to_dict(),
        "targets": {"max_seconds": targets.max_seconds, "max_cost": targets.max_cost},
        "price": {"targets_gpu": targets.gpu, "backend": hardware.backend, "gpu": hardware.gpu,
                  "stage_gpu": to_plain(hardware.stage_gpu), "table": to_plain(hardware.price_table),
                  "currency": hardware.currency},
        "face": face_options(spec, fid.face_model),
        "clip_model": EvaluateConfig.from_dict(spec.get("evaluate") or {}).clip_model,
        "suite": suite,
        "references": list(CharacterConfig.from_dict(spec["character"]).references),
        "device": hardware.device,
    }


def _label(config: dict[str, Any], key_frames: list[int]) -> str:
    from_storyboard = config["source"] == "storyboard"
    suite = config["suite"]
    n_clips = (len(key_frames) if from_storyboard else 1) * (1 + (len(suite["cases"]) if suite else 0))
    return (f"{n_clips} clip{'s' if n_clips != 1 else ''} ({config['frames']} frames "
            f"{config['width']}x{config['height']}, preset {config['preset']}, {config['steps']} steps) from "
            f"{'storyboard frames ' + str(key_frames) if from_storyboard else config['source']}")


# --------------------------------------------------------------------------- running


def _sources(config: dict[str, Any], inputs: dict[str, contract.Artifact]) -> list[dict[str, Any]]:
    """The source images: the storyboard's key frames, or the source file."""
    if config["source"] == "storyboard":
        art = inputs.get("storyboard")
        if art is None:
            raise contract.StageError("video: the storyboard input is missing")
        folder = Path(art.path)
        rep = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        by_index = {int(f["index"]): f for f in rep["frames"]}
        tiny = bool((rep.get("tiny_random") or {}).get("any"))
        out = []
        for k in config["key_frames"]:
            if k not in by_index:
                raise contract.StageError(f"generate.video.key_frames: frame {k} is not in the storyboard "
                                          f"({len(by_index)} frames)", hint=f"Use frame numbers 1..{len(by_index)}.")
            f = by_index[k]
            out.append({"name": f"frame{k:02d}", "image": load_rgb(folder / f["file"]), "text": f["text"],
                        "from": f"storyboard frame {k}", "tiny_random": tiny})
        return out
    art = inputs["source"]
    path = input_file(art, Path(art.path))
    if not path.is_file():
        raise contract.StageError(f"generate.video.source: {config['source']} is not an image file",
                                  hint="Give an image path (png/jpg) or 'storyboard'.")
    return [{"name": "source", "image": load_rgb(path), "text": "", "from": config["source"], "tiny_random": False}]


def clip_prompt(config: dict[str, Any], text: str) -> str:
    core = config.get("prompt") or text or "the character moves naturally"
    parts = [config.get("prompt_prefix") or "", core, config.get("prompt_suffix") or ""]
    return ", ".join(p.strip().rstrip(",") for p in parts if p and p.strip())


def work_units(config: dict[str, Any]) -> tuple[float, str]:
    """Clips one execution makes: a clip per source (each key frame, or the source image), and
    one per suite case and source (the plan's estimates learn seconds per clip)."""
    sources = len(config.get("key_frames") or []) if config.get("source") == "storyboard" else 1
    return float(sources * (1 + len((config.get("suite") or {}).get("cases", [])))), "clip"


@contract.register("video", version=VERSION,
                   review_view="clips", order=80, expand=expand, typical_seconds=900.0, work_units=work_units,
                   description="Image-to-video clips (LTX-Video) with fidelity, expression dynamics, motion, time "
                               "and cost.",
                   resume_info=lambda scratch: _resume_info(scratch),
                   report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact],
        ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Image-to-video clips (LTX-Video) with fidelity, expression dynamics, motion, time and cost."""
    t_start = time.monotonic()
    sources = _sources(config, inputs)
    device = choose_device(device_setting(config))
    # 1. the model (first: a bad shape fails before anything slow)
    t = time.monotonic()
    vp = _video_pipeline(config, inputs, device, ctx)
    load_s = time.monotonic() - t
    # 2. what each clip compares with
    fidelity, ref_files = clip_fidelity(config, inputs, ctx)
    pricing = _pricing(config, device)
    clip_model = _clip_model(config, ctx)
    # 3. clips (finished ones are kept in scratch)
    maker = ClipMaker(config, vp, fidelity, clip_model, pricing, ctx)
    clips = maker.all_clips(_clip_jobs(config, sources))
    # 4. outputs
    out = _copy_clips(ctx, clips)
    tiny = {"video_model": vp.tiny_random, "source_frames": any(s["tiny_random"] for s in sources),
            "clip": bool(clip_model is not None and clip_model.is_tiny_random)}
    report = {**_report_head(config, ctx, vp, fidelity, ref_files, pricing, device),
              "tiny_random": {**tiny, "any": any(tiny.values())}, "clips": clips, "summary": _summary(clips),
              "timing": {"load_s": round(load_s, 3), "total_s": round(time.monotonic() - t_start, 3)}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _log_run(ctx, report)
    return {"video": contract.Artifact("video", out, meta={"clips": len(clips),
                                                           "tiny_random": report["tiny_random"]["any"]})}


def _video_pipeline(config: dict[str, Any], inputs: dict[str, contract.Artifact], device: str,
                    ctx: contract.StageContext):
    """The video family's pipeline (its shape checked) with the video LoRA when one is set."""
    from runner.generate import ltx, video_models

    try:
        vp = ltx.load_video_pipeline(config["model"], pipeline=config["pipeline"],
                                     image_conditioning=config["image_conditioning"], device=device,
                                     cache_dir=ctx.cache_dir, project_root=ctx.project_root,
                                     family=config.get("family", "auto"))
    except video_models.VideoModelError as exc:
        raise contract.StageError(f"generate.video.model: {exc}", hint=exc.hint) from None
    video_models.check_shape(vp, config["width"], config["height"], config["frames"])
    if config["upscale"] and config.get("upsampler") and not vp.family.video.latent_upsampler:
        raise contract.StageError(f"generate.video.upsampler: {vp.family.title} has no latent upsampler here",
                                  hint="Unset generate.video.upsampler (upscale: true then resizes 2x).")
    if config.get("lora"):
        chosen = _chosen_lora(config, inputs, ctx)
        video_models.load_lora(vp, chosen.main, chosen.scale, experts=chosen.experts)
        vp.lora_used = chosen.to_dict()  # report.json says which checkpoint and scale
        ctx.log(f"video: LoRA {chosen.main.name} ({chosen.source}) at scale {chosen.scale:g}")
    done = video_models.apply_memory(vp, offload=config.get("offload", "none"),
                                     vae_tiling=bool(config.get("vae_tiling")), device=device)
    if done:
        ctx.log(f"video: GPU memory: {', '.join(done)}")
    return vp


def _chosen_lora(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext):
    """The LoRA file(s) and scale: evaluate_video's best (its scale), a train_video step, or a path."""
    from runner.generate import video_lora

    bests = [Path(inputs[k].path) for k in sorted(inputs) if k.startswith("lora_best")]
    if bests:
        return _best_of(bests, ctx)
    if "lora_train" in inputs:
        return video_lora.from_step(Path(inputs["lora_train"].path), video_lora.step_of(config["lora"]),
                                    config["lora_scale"])
    path = input_file(inputs.get("lora_files"), ctx.project_root / config["lora"])
    return video_lora.ChosenLora(path, None, float(config["lora_scale"]), None, config["lora"])


def _best_of(folders: list[Path], ctx: contract.StageContext):
    """The best of evaluate_video's picks (one per train_video variant), ranked as each stage ranked
    its cells (runner.eval.video.select_best: targets met, face distance, frozen clips, scale, step)."""
    from runner.eval.video import select_best
    from runner.generate import video_lora

    chosen = [video_lora.from_best(f) for f in folders]
    if len(chosen) == 1:
        return chosen[0]
    cells = []
    for folder, c in zip(folders, chosen):
        best = json.loads((folder / "best.json").read_text(encoding="utf-8"))
        if "summary" not in best:
            raise contract.StageError(f"{folder}/best.json was written by an older evaluate_video",
                                      hint="Re-run evaluate_video (runner apply --force evaluate_video).")
        cells.append({**best, "checkpoint_index": 0, "step": c.step, "lora_scale": c.scale})
    pick = select_best(cells)
    ctx.log(f"video: LoRA {chosen[pick['index']].source} step {chosen[pick['index']].step}, the best of "
            f"{len(chosen)} variants' picks ({pick['reason']})")
    return chosen[pick["index"]]


def _clip_model(config: dict[str, Any], ctx: contract.StageContext):
    """The CLIP model of the suite's features_kept checks, None when no case needs it."""
    suite = config.get("suite")
    if suite and any(c["expect"].get("features_kept") and c["features"] for c in suite["cases"]):
        return load_embedder(config["clip_model"], ctx, "evaluate.clip_model")
    return None


def _clip_jobs(config: dict[str, Any], sources: list[dict[str, Any]]) -> list[ClipJob]:
    """A clip per source, and one per suite case and source."""
    jobs = []
    for src in sources:
        jobs.append(ClipJob(src["name"], src, clip_prompt(config, src["text"])))
        for case in (config.get("suite") or {}).get("cases", []):
            jobs.append(ClipJob(f"{src['name']}_{case['name']}", src,
                                clip_prompt({**config, "prompt": None}, case["prompt"]), case))
    return jobs


def _copy_clips(ctx: contract.StageContext, clips: list[dict[str, Any]]) -> Path:
    """Each clip's mp4 and poster from scratch into the output's clips/."""
    out = ctx.out_dir / "video"
    if out.exists():  # left by an interrupted attempt; this stage owns it
        shutil.rmtree(out)
    (out / "clips").mkdir(parents=True)
    for c in clips:
        for key in ("file", "poster"):
            shutil.copy2(ctx.scratch_dir / "clips" / c["name"] / Path(c[key]).name, out / c[key])
    return out


def _report_head(config: dict[str, Any], ctx: contract.StageContext, vp: Any, fidelity: Fidelity,
                 ref_files: list[Path], pricing: Pricing, device: str) -> dict[str, Any]:
    """report.json up to its tiny_random flags: the run, the model and settings, fidelity, prices."""
    backend = fidelity.face_backend
    return {
        **run_header(ctx),
        "model": config["model"],
        "family": vp.family.name,
        "pipeline": vp.kind,
        "preset": config["preset"],
        "settings": {k: config[k] for k in SETTINGS},
        "lora_used": getattr(vp, "lora_used", None),
        "upscale_method": _upscale_method(config),
        "fidelity_settings": {**config["fidelity"], "against": fidelity.against, "threshold": fidelity.threshold,
                              "face_backend": getattr(backend, "name", None),
                              "face_embedding_model": getattr(backend, "embedding_model", None),
                              "scale": "distance = min(100, max(0, 30 * (1 - s) / (1 - t))); s = mean cosine to the "
                                       "reference faces, t = the backend's identity threshold; no face = 100"},
        "dynamics_settings": config["dynamics"],
        "references": [rel_path(f, ctx.project_root) for f in ref_files],
        "price": {"gpu": pricing.gpu, "per_hour": pricing.per_hour, "currency": pricing.currency, "device": device},
        "targets": config["targets"],
        "suite": config.get("suite"),
    }


def _summary(clips: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    grades = [c["fidelity"]["grade"] for c in clips]
    return {
        "clips": len(clips),
        "excellent": grades.count("excellent"), "ok": grades.count("ok"), "fail": grades.count("fail"),
        "flagged": sum(1 for c in clips if c["flagged"]),
        "time_pass": sum(1 for c in clips if c["budget"]["time_pass"]),
        "cost_pass": sum(1 for c in clips if c["budget"]["cost_pass"]),
        "mean_distance": round(float(np.mean([c["fidelity"]["distance"] for c in clips])), 2) if clips else None,
    }


def _log_run(ctx: contract.StageContext, report: dict[str, Any]) -> None:
    import numpy as np

    clips, summary = report["clips"], report["summary"]
    ctx.metric("clips", len(clips))
    if clips:
        ctx.metric("mean_fidelity_distance", summary["mean_distance"])
        ctx.metric("mean_seconds_per_clip", float(np.mean([c["budget"]["seconds"] for c in clips])))
    label = " (tiny random models: clips and figures are meaningless)" if report["tiny_random"]["any"] else ""
    ctx.log(f"video: {len(clips)} clip(s), {summary['excellent']} excellent, {summary['fail']} "
            f"failing fidelity{label}")
    if summary["flagged"]:
        ctx.warn(f"video: {summary['flagged']} of {len(clips)} clip(s) flagged (fidelity fail or a suite check failed)")


def _pricing(config: dict[str, Any], device: str) -> Pricing:
    """The priced GPU, its price per hour and the currency (the spec's price settings, config["price"])."""
    from runner.generate.budget import price, priced_gpu

    pc = config["price"]
    hardware = {"backend": pc["backend"], "gpu": pc["gpu"], "stage_gpu": pc["stage_gpu"],
                "price_table": pc["table"], "currency": pc["currency"]}
    gpu_name = priced_gpu({"gpu": pc["targets_gpu"]}, hardware, device)
    per_hour, currency = price(gpu_name, hardware)
    return Pricing(gpu_name, per_hour, currency)


def _repriced(rep: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The stage's report.json with cost and time verdicts at the spec's current prices and targets.

    Prices and targets change no clip, so they are not in the cache key (``unkeyed``); a cached
    clip is shown with what the spec says now, from the wall seconds it measured.
    """
    from runner.generate.budget import budget

    if "price" not in config or "targets" not in config:
        return rep
    p = _pricing(config, rep.get("price", {}).get("device", "cpu"))
    clips = [{**c, "budget": budget(c["budget"]["steps_s"], p.per_hour, p.currency, p.gpu, config["targets"],
                                    tuple(c["budget"]["counted_steps"]))} for c in rep["clips"]]
    summary = {**rep["summary"], "time_pass": sum(1 for c in clips if c["budget"]["time_pass"]),
               "cost_pass": sum(1 for c in clips if c["budget"]["cost_pass"])}
    price = {**rep.get("price", {}), "gpu": p.gpu, "per_hour": p.per_hour, "currency": p.currency}
    return {**rep, "clips": clips, "summary": summary, "price": price, "targets": config["targets"]}


def _upscale_method(config: dict[str, Any]) -> str | None:
    if not config["upscale"]:
        return None
    if config.get("upsampler"):
        return "latent upsampler (LTXLatentUpsamplePipeline)"
    return "plain 2x Lanczos resize (no latent upsampler configured)"


def _resume_info(scratch: Path) -> str | None:
    return resume_note(len(list((Path(scratch) / "clips").glob("*/clip.json"))), "clip")


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact],
                    env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report.embed import thumbnail_data_uri, video_data_uri

    found = output_json(outputs, "video", "report.json")
    if found is None:
        return []
    folder, rep = found
    rep = _repriced(rep, config)
    max_embed = int(env.get("video_embed_max_bytes", 8 * 1024 * 1024))
    clips = []
    for c in rep["clips"]:
        f = folder / c["file"]
        embed = f.is_file() and f.stat().st_size <= max_embed
        clips.append({**c, "video_uri": video_data_uri(f) if embed else None,
                      "poster_uri": thumbnail_data_uri(folder / c["poster"], 512),
                      "chart": _dynamics_chart(c["dynamics"]["series"])})
    note = tiny_note(rep.get("tiny_random", {}), ("video_model", "source_frames", "clip"),
                     "the clips are noise; fidelity, dynamics, motion and timings only show that the pipeline "
                     "runs end to end.")
    return [contract.ReportSection(title="Image-to-video", template="sections/video.html.j2", anchor="video",
                                   context={"rep": rep, "clips": clips, "tiny_note": note})]


def _dynamics_chart(series: dict[str, list[float]]):
    """Mouth opening (what "frozen" reads: gap over eye distance; mouth openness, over its width, in
    reports made before it) and eye aspect ratio over the analysed frames (None under two frames)."""
    from runner.report import charts

    key, label = ("mouth_gap", "mouth opening") if "mouth_gap" in series else ("mouth_open", "mouth openness")
    if len(series.get(key, [])) < 2:
        return None
    return charts.line_chart({label: list(enumerate(series[key])),
                              "eye aspect ratio": list(enumerate(series.get("eye_ratio", [])))},
                             width=320, height=140, xlabel="analysed frame")
