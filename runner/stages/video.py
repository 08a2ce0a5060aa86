"""`video`: image-to-video clips (LTX-Video) with fidelity, expression dynamics, motion, time and cost.

Node ``<char>:video`` when the spec has ``generate.video``. Its sources:

- ``source: storyboard``: the storyboard's frames numbered in ``key_frames`` (input
  ``storyboard`` from ``<char>:storyboard``); each clip's prompt is ``prompt`` or the scene text;
- ``source: <image path>``: that image (a file-set input, so its content is in the cache key).

The preset (``baseline``, ``aggressive-quality``, shipped in runner/presets/video/) fills steps,
guidance, image conditioning and the prompt prefix/suffix; every value can be set in the spec.
With ``suite: builtin`` (runner/presets/video_suite/builtin.yaml) or a suite file, the suite's
cases also run on every source.

Per clip (run): 1. generate with LTX (:mod:`runner.generate.ltx`); 2. optional 2x upscale (latent
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
import os
import shutil
import time
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.device import choose_device
from runner.stages.common import review_section
from runner.stages.storyboard import _rel, face_backend_from, face_options, reference_inputs

VERSION = 1
# Steps whose wall time counts against targets.max_seconds (analysis is the runner's own check).
COUNTED_STEPS = ("generation", "upscale", "first_frame", "export")


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
        raise contract.StageError(f"generate.video.suite: {exc}", hint=exc.hint or "Fix the suite file's YAML.") from None
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


PRESET_KEYS = ("steps", "guidance", "image_conditioning", "prompt_prefix", "prompt_suffix")


def _preset_fill(video: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """Values the preset gives for keys still null. The spec resolver merges a preset the user
    names; this also covers the default preset (``baseline``) when none is named."""
    missing = [k for k in PRESET_KEYS if video.get(k) is None]
    if not missing:
        return {}
    from runner.spec.resolve import list_presets
    from runner.spec.yamlio import load_yaml_file

    name = video.get("preset") or "baseline"
    path = list_presets("video").get(name) or (project_root / name)
    if not Path(path).is_file():
        raise contract.StageError(f"generate.video.preset: unknown preset {name!r}",
                              hint="Use baseline or aggressive-quality (runner presets), or a path to a preset .yaml.")
    values = (load_yaml_file(Path(path)).data or {}).get("values") or {}
    return {k: values[k] for k in missing if values.get(k) is not None}


def _file_input(value: str | None, graph: contract.GraphView, key: str) -> contract.FileSetRef | None:
    if not value or value.startswith("builtin:"):
        return None
    p = graph.project_root / value
    if p.exists():
        return contract.FileSetRef(root=p, patterns=("*",), recursive=True, spec_key=key)
    return None


def expand(spec: dict[str, Any], graph: contract.GraphView) -> list[contract.PlanNode]:
    video = (spec.get("generate") or {}).get("video")
    if not isinstance(video, dict):
        return []
    character = spec.get("character") or {}
    hardware = spec.get("hardware") or {}
    inputs: dict[str, contract.InputRef] = {}
    source = video.get("source", "storyboard")
    key_frames = [int(k) for k in video.get("key_frames", [1])]
    if source == "storyboard":
        sb = graph.node(contract.node_id(graph.character, "storyboard"))
        if sb is None:
            raise contract.StageError("generate.video.source is 'storyboard' but the spec has no generate.storyboard",
                                  hint="Add generate.storyboard, or set generate.video.source to an image path.")
        n = len(sb.config.get("scenes") or []) or int((sb.config.get("llm_request") or {}).get("max_scenes", 10))
        too_big = [k for k in key_frames if k > n]
        if too_big:
            raise contract.StageError(f"generate.video.key_frames: {too_big} beyond the storyboard's {n} scenes",
                                  hint=f"Use frame numbers 1..{n}.")
        inputs["storyboard"] = contract.StageOutputRef(sb.id, "storyboard")
    else:
        p = graph.project_root / source
        inputs["source"] = contract.FileSetRef(root=p, patterns=("*",), recursive=False, spec_key="generate.video.source")
    width, height = int(video.get("width", 704)), int(video.get("height", 480))
    if width % 32 or height % 32:
        raise contract.StageError(f"generate.video: width and height must be multiples of 32 for LTX-Video (got {width}x{height})",
                              hint=f"e.g. width: {width // 32 * 32}, height: {height // 32 * 32}")
    inputs.update(reference_inputs(spec, graph))
    for name, key in (("model", "model"), ("lora", "lora"), ("upsampler", "upsampler")):
        ref = _file_input(video.get(key), graph, f"generate.video.{key}")
        if ref is not None:
            inputs[f"{name}_files"] = ref
    suite = load_suite(video.get("suite"), graph.project_root)
    if suite is not None:
        suite = {"source": suite["source"], "cases": [_render_case(c, character) for c in suite["cases"]]}
    video = {**video, **_preset_fill(video, graph.project_root)}
    fid = dict(video.get("fidelity") or {})
    ev = spec.get("evaluate") or {}
    targets = dict(video.get("targets") or {})
    config = {
        "model": video.get("model", "Lightricks/LTX-Video"),
        "pipeline": video.get("pipeline", "auto"),
        "preset": video.get("preset", "baseline"),
        "source": source,
        "key_frames": key_frames if source == "storyboard" else [],
        "prompt": video.get("prompt"),
        "prompt_prefix": video.get("prompt_prefix") or "",
        "prompt_suffix": video.get("prompt_suffix") or "",
        "negative_prompt": video.get("negative_prompt", ""),
        "steps": int(video.get("steps") or 10),
        "guidance": float(video.get("guidance") if video.get("guidance") is not None else 1.0),
        "image_conditioning": float(video.get("image_conditioning") if video.get("image_conditioning") is not None else 1.0),
        "frames": int(video.get("frames", 97)),
        "fps": int(video.get("fps", 24)),
        "width": int(video.get("width", 704)),
        "height": int(video.get("height", 480)),
        "seed": int(video.get("seed", 42)),
        "lora": video.get("lora"),
        "lora_scale": float(video.get("lora_scale", 1.0)),
        "replace_first_frame": bool(video.get("replace_first_frame", False)),
        "upscale": bool(video.get("upscale", False)),
        "upsampler": video.get("upsampler"),
        "decode_timestep": float(video.get("decode_timestep", 0.03)),
        "decode_noise_scale": float(video.get("decode_noise_scale", 0.025)),
        "fidelity": {"frames": int(fid.get("frames", 5)), "excellent": float(fid.get("excellent", 20)),
                     "fail": float(fid.get("fail", 30)), "on_fail": fid.get("on_fail", "flag"),
                     "retries": int(fid.get("retries", 1)), "against": fid.get("against", "references")},
        "dynamics": {"frames": 16, "frozen_below": 0.01, "flow_side": 256, **(video.get("dynamics") or {})},
        "targets": {"max_seconds": targets.get("max_seconds"), "max_cost": targets.get("max_cost")},
        "price": {"targets_gpu": targets.get("gpu"), "backend": hardware.get("backend", "local"),
                  "gpu": hardware.get("gpu"), "stage_gpu": hardware.get("stage_gpu", {}),
                  "table": hardware.get("price_table", {}), "currency": hardware.get("currency", "USD")},
        "face": face_options(spec, fid.get("face_model")),
        "clip_model": ev.get("clip_model") or "openai/clip-vit-large-patch14",
        "suite": suite,
        "references": list(character.get("references") or []),
        "device": hardware.get("device", "auto"),
    }
    review = review_section(graph, "video")  # clips a reviewer rejected (runner review)
    if review:
        config["review"] = review
    n_src = len(key_frames) if source == "storyboard" else 1
    n_clips = n_src * (1 + (len(suite["cases"]) if suite else 0))
    label = (f"{n_clips} clip{'s' if n_clips != 1 else ''} ({config['frames']} frames {config['width']}x{config['height']}, "
             f"preset {config['preset']}, {config['steps']} steps) from {'storyboard frames ' + str(key_frames) if source == 'storyboard' else source}")
    gpu = hardware.get("stage_gpu", {}).get("video") or hardware.get("gpu")
    # Prices and time/cost targets only grade the clips (re-graded at report time): not keyed.
    return [contract.PlanNode(id=contract.node_id(graph.character, "video"), kind="video", character=graph.character,
                          config=config, inputs=inputs, outputs=("video",), gpu=gpu, label=label,
                          unkeyed=("price", "targets"))]


# --------------------------------------------------------------------------- running


def _sources(config: dict[str, Any], inputs: dict[str, contract.Artifact]) -> list[dict[str, Any]]:
    from runner.stages.common import load_rgb as _load_rgb

    if config["source"] == "storyboard":
        art = inputs.get("storyboard")
        if art is None:
            raise contract.StageError("video: the storyboard input is missing")
        folder = Path(art.path)
        rep = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        by_index = {int(f["index"]): f for f in rep["frames"]}
        out = []
        for k in config["key_frames"]:
            if k not in by_index:
                raise contract.StageError(f"generate.video.key_frames: frame {k} is not in the storyboard ({len(by_index)} frames)",
                                      hint=f"Use frame numbers 1..{len(by_index)}.")
            f = by_index[k]
            out.append({"name": f"frame{k:02d}", "image": _load_rgb(folder / f["file"]), "text": f["text"],
                        "from": f"storyboard frame {k}", "tiny_random": bool((rep.get("tiny_random") or {}).get("any"))})
        return out
    art = inputs["source"]
    path = Path(art.files[0]) if art.files else Path(art.path)
    if not path.is_file():
        raise contract.StageError(f"generate.video.source: {config['source']} is not an image file",
                              hint="Give an image path (png/jpg) or 'storyboard'.")
    return [{"name": "source", "image": _load_rgb(path), "text": "", "from": config["source"], "tiny_random": False}]


def clip_prompt(config: dict[str, Any], text: str) -> str:
    core = config.get("prompt") or text or "the character moves naturally"
    parts = [config.get("prompt_prefix") or "", core, config.get("prompt_suffix") or ""]
    return ", ".join(p.strip().rstrip(",") for p in parts if p and p.strip())


@contract.register("video", version=VERSION, order=80, expand=expand, typical_seconds=900.0,
               description="Image-to-video clips (LTX-Video) with fidelity, expression dynamics, motion, time and cost.",
               resume_info=lambda scratch: _resume_info(scratch),
               report=lambda config, outputs, env: report_sections(config, outputs, env))
def run(config: dict[str, Any], inputs: dict[str, contract.Artifact], ctx: contract.StageContext) -> dict[str, contract.Artifact]:
    """Image-to-video clips (LTX-Video) with fidelity, expression dynamics, motion, time and cost."""
    import numpy as np

    from runner.generate import ltx

    t_start = time.monotonic()
    sources = _sources(config, inputs)
    device = choose_device(config.get("device", "auto"))

    # 1. the model (first: a bad shape fails before anything slow)
    t = time.monotonic()
    try:
        vp = ltx.load_video_pipeline(config["model"], pipeline=config["pipeline"],
                                     image_conditioning=config["image_conditioning"], device=device,
                                     cache_dir=ctx.cache_dir, project_root=ctx.project_root)
    except ltx.VideoModelError as exc:
        raise contract.StageError(f"generate.video.model: {exc}", hint=exc.hint) from None
    ltx.check_shape(vp, config["width"], config["height"], config["frames"])
    if config.get("lora"):
        art = inputs.get("lora_files")
        lora_path = Path(art.files[0]) if art is not None and art.files else ctx.project_root / config["lora"]
        ltx.load_video_lora(vp, lora_path, config["lora_scale"])
    load_s = time.monotonic() - t
    # 2. what each clip compares with
    from runner.stages.storyboard import load_references

    face_backend = face_backend_from(config["face"], ctx.project_root, "generate.video.fidelity")
    ref_files, ref_images = load_references(inputs)
    ref_faces = _face_embeddings(face_backend, ref_images)
    against = config["fidelity"]["against"]
    if against == "references" and len(ref_faces) == 0:
        ctx.warn("video: no reference face found in character.references; fidelity compares with each clip's source image")
        against = "source"
    threshold = float(getattr(face_backend, "default_identity_threshold", 0.5))
    gpu_name, per_hour, currency = _pricing(config, device)

    clip_model = None
    if config.get("suite") and any(c["expect"].get("features_kept") and c["features"] for c in config["suite"]["cases"]):
        from runner.stages.common import load_embedder as _load_embedder

        clip_model = _load_embedder(config["clip_model"], ctx, "evaluate.clip_model")

    # 3. clips (finished ones are kept in scratch)
    jobs = []
    for src in sources:
        jobs.append({"name": src["name"], "case": None, "source": src, "prompt": clip_prompt(config, src["text"])})
        for case in (config.get("suite") or {}).get("cases", []):
            jobs.append({"name": f"{src['name']}_{case['name']}", "case": case, "source": src,
                         "prompt": clip_prompt({**config, "prompt": None}, case["prompt"])})
    done_dir = ctx.scratch_dir / "clips"
    done_dir.mkdir(parents=True, exist_ok=True)
    prog = ctx.progress(len(jobs), "video: clips")
    clips = []
    for j_index, job in enumerate(jobs):
        record_file = done_dir / job["name"] / "clip.json"
        if record_file.is_file():
            clips.append(json.loads(record_file.read_text(encoding="utf-8")))
            prog.update(1)
            continue
        src_faces = _face_embeddings(face_backend, [job["source"]["image"]])
        compare = ref_faces if against == "references" else src_faces
        clips.append(_make_clip(job, j_index, config, vp, face_backend, compare, threshold, against, clip_model,
                                per_hour, currency, gpu_name, done_dir / job["name"], ctx))
        prog.update(1)
    prog.close()

    # 4. outputs
    out = ctx.out_dir / "video"
    if out.exists():  # left by an interrupted attempt; this stage owns it
        shutil.rmtree(out)
    (out / "clips").mkdir(parents=True)
    for c in clips:
        for key in ("file", "poster"):
            shutil.copy2(done_dir / c["name"] / Path(c[key]).name, out / c[key])
    tiny = {"video_model": vp.tiny_random, "source_frames": any(s["tiny_random"] for s in sources),
            "clip": bool(clip_model is not None and clip_model.is_tiny_random)}
    grades = [c["fidelity"]["grade"] for c in clips]
    report = {
        "format": 1,
        "character": ctx.character,
        "stage_id": ctx.stage_id,
        "run_id": ctx.run_id,
        "model": config["model"],
        "pipeline": vp.kind,
        "preset": config["preset"],
        "settings": {k: config[k] for k in ("steps", "guidance", "image_conditioning", "frames", "fps", "width", "height",
                                            "prompt_prefix", "prompt_suffix", "negative_prompt", "seed", "lora",
                                            "lora_scale", "replace_first_frame", "upscale", "upsampler")},
        "upscale_method": _upscale_method(config),
        "fidelity_settings": {**config["fidelity"], "against": against, "threshold": threshold,
                              "face_backend": getattr(face_backend, "name", None),
                              "face_embedding_model": getattr(face_backend, "embedding_model", None),
                              "scale": "distance = min(100, max(0, 30 * (1 - s) / (1 - t))); s = mean cosine to the "
                                       "reference faces, t = the backend's identity threshold; no face = 100"},
        "dynamics_settings": config["dynamics"],
        "references": [_rel(f, ctx.project_root) for f in ref_files],
        "price": {"gpu": gpu_name, "per_hour": per_hour, "currency": currency, "device": device},
        "targets": config["targets"],
        "suite": config.get("suite"),
        "tiny_random": {**tiny, "any": any(tiny.values())},
        "clips": clips,
        "summary": {
            "clips": len(clips),
            "excellent": grades.count("excellent"), "ok": grades.count("ok"), "fail": grades.count("fail"),
            "flagged": sum(1 for c in clips if c["flagged"]),
            "time_pass": sum(1 for c in clips if c["budget"]["time_pass"]),
            "cost_pass": sum(1 for c in clips if c["budget"]["cost_pass"]),
            "mean_distance": round(float(np.mean([c["fidelity"]["distance"] for c in clips])), 2) if clips else None,
        },
        "timing": {"load_s": round(load_s, 3), "total_s": round(time.monotonic() - t_start, 3)},
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, out / "report.json")
    ctx.metric("clips", len(clips))
    if clips:
        ctx.metric("mean_fidelity_distance", report["summary"]["mean_distance"])
        ctx.metric("mean_seconds_per_clip", float(np.mean([c["budget"]["seconds"] for c in clips])))
    label = " (tiny random models: clips and figures are meaningless)" if report["tiny_random"]["any"] else ""
    ctx.log(f"video: {len(clips)} clip(s), {report['summary']['excellent']} excellent, {report['summary']['fail']} "
            f"failing fidelity{label}")
    flagged = report["summary"]["flagged"]
    if flagged:
        ctx.warn(f"video: {flagged} of {len(clips)} clip(s) flagged (fidelity fail or a suite check failed)")
    return {"video": contract.Artifact("video", out, meta={"clips": len(clips), "tiny_random": report["tiny_random"]["any"]})}


def _pricing(config: dict[str, Any], device: str) -> tuple[str, float, str]:
    """(priced GPU, price per hour, currency) from the spec's price settings (config["price"])."""
    from runner.generate.budget import price, priced_gpu

    pc = config["price"]
    hardware = {"backend": pc["backend"], "gpu": pc["gpu"], "stage_gpu": pc["stage_gpu"], "price_table": pc["table"],
                "currency": pc["currency"]}
    gpu_name = priced_gpu({"gpu": pc["targets_gpu"]}, hardware, device)
    per_hour, currency = price(gpu_name, hardware)
    return gpu_name, per_hour, currency


def _repriced(rep: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The stage's report.json with cost and time verdicts at the spec's current prices and targets.

    Prices and targets change no clip, so they are not in the cache key (``unkeyed``); a cached
    clip is shown with what the spec says now, from the wall seconds it measured.
    """
    from runner.generate.budget import budget

    if "price" not in config or "targets" not in config:
        return rep
    gpu_name, per_hour, currency = _pricing(config, rep.get("price", {}).get("device", "cpu"))
    clips = [{**c, "budget": budget(c["budget"]["steps_s"], per_hour, currency, gpu_name, config["targets"],
                                    tuple(c["budget"]["counted_steps"]))} for c in rep["clips"]]
    summary = {**rep["summary"], "time_pass": sum(1 for c in clips if c["budget"]["time_pass"]),
               "cost_pass": sum(1 for c in clips if c["budget"]["cost_pass"])}
    price = {**rep.get("price", {}), "gpu": gpu_name, "per_hour": per_hour, "currency": currency}
    return {**rep, "clips": clips, "summary": summary, "price": price, "targets": config["targets"]}


def _upscale_method(config: dict[str, Any]) -> str | None:
    if not config["upscale"]:
        return None
    return "latent upsampler (LTXLatentUpsamplePipeline)" if config.get("upsampler") else "plain 2x Lanczos resize (no latent upsampler configured)"


def _face_embeddings(face_backend, images):
    import numpy as np


    found = face_backend.main_face_embeddings([np.asarray(im.convert("RGB")) for im in images])
    embs = [emb for emb, _ in found if emb is not None]
    return np.stack(embs) if embs else np.zeros((0, 1), np.float32)


def render_clip(vp, job: dict[str, Any], config: dict[str, Any], seed: int, timer, ctx) -> list:
    """Generate (and upscale / replace the first frame of) one clip; steps timed into ``timer``."""
    from runner.generate import ltx

    image = job["source"]["image"]
    kw = dict(prompt=job["prompt"], negative_prompt=config["negative_prompt"], width=config["width"],
              height=config["height"], frames=config["frames"], fps=config["fps"], steps=config["steps"],
              guidance=config["guidance"], image_conditioning=config["image_conditioning"], seed=seed,
              decode_timestep=config["decode_timestep"], decode_noise_scale=config["decode_noise_scale"])
    latent_up = bool(config["upscale"] and config.get("upsampler"))
    with timer.step("generation"):
        result = ltx.generate_clip(vp, image, output_latents=latent_up, **kw)
    if config["upscale"]:
        with timer.step("upscale"):
            if latent_up:
                up_ref = config["upsampler"]
                result = ltx.latent_upscale(vp, result, up_ref, width=config["width"], height=config["height"], seed=seed,
                                            decode_timestep=config["decode_timestep"],
                                            decode_noise_scale=config["decode_noise_scale"],
                                            cache_dir=ctx.cache_dir, project_root=ctx.project_root)
            else:
                result = ltx.resize_frames(result, 2)
    frames = result
    if config["replace_first_frame"]:
        with timer.step("first_frame"):
            frames = ltx.replace_first_frame(frames, image)
    return frames


def _make_clip(job, j_index, config, vp, face_backend, compare, threshold, against, clip_model, per_hour, currency,
               gpu_name: str, folder: Path, ctx) -> dict[str, Any]:
    from runner.generate import ltx
    from runner.generate import measures as MS
    from runner.generate.budget import StepTimer, budget

    if folder.exists():
        shutil.rmtree(folder)  # an unfinished clip from a crash
    folder.mkdir(parents=True)
    fid_cfg, dyn_cfg = config["fidelity"], config["dynamics"]
    retries = fid_cfg["retries"] if fid_cfg["on_fail"] == "regenerate" else 0
    timer = StepTimer()
    attempts, best, best_frames = [], None, None
    for attempt in range(retries + 1):
        # A clip a reviewer rejected r times starts r * (retries + 1) attempts on: no seed is reused.
        rejected = int((config.get("review") or {}).get("regenerate_clips", {}).get(job["name"], 0))
        seed = config["seed"] + j_index + (attempt + rejected * (retries + 1)) * 1000
        frames = render_clip(vp, job, config, seed, timer, ctx)
        with timer.step("analysis"):
            # A replaced first frame is the source image itself: not generated, so not checked.
            skip = 1 if config["replace_first_frame"] and len(frames) > 1 else 0
            idx_fid = [i + skip for i in MS.evenly_spaced(len(frames) - skip, fid_cfg["frames"])]
            idx_dyn = MS.evenly_spaced(len(frames), dyn_cfg["frames"])
            recs = MS.analyse_faces(frames, sorted(set(idx_fid) | set(idx_dyn)), face_backend)
            by_frame = {r["frame"]: r for r in recs}
            if len(compare):
                fid = MS.fidelity([by_frame[i] for i in idx_fid], compare, threshold,
                                  excellent=fid_cfg["excellent"], fail=fid_cfg["fail"])
            else:
                fid = {"distance": 100.0, "worst": 100.0, "grade": "fail", "frames": [], "threshold": threshold,
                       "excellent": fid_cfg["excellent"], "fail": fid_cfg["fail"], "faces_found": 0,
                       "note": "no face in the references nor in the source image: nothing to compare with"}
            dyn = MS.expression_dynamics([by_frame[i] for i in idx_dyn], dyn_cfg["frozen_below"])
            motion = MS.motion_magnitude(frames, idx_dyn, dyn_cfg["flow_side"])
        attempts.append({"attempt": attempt, "seed": seed, "distance": fid["distance"], "grade": fid["grade"]})
        if best is None or fid["distance"] < best[0]["distance"]:
            best, best_frames = (fid, dyn, motion, seed, attempt), frames
        if fid["grade"] != "fail":
            break
    fid, dyn, motion, seed, kept = best
    checks: dict[str, Any] = {}
    case = job.get("case")
    if case:
        exp = case.get("expect") or {}
        if exp.get("not_frozen"):
            checks["not_frozen"] = {"pass": None if dyn["frozen"] is None else not dyn["frozen"],
                                    "detail": "no landmarks in 2+ frames" if dyn["frozen"] is None else
                                    f"mouth std {dyn['mouth_std']}, eye std {dyn['eye_std']}"}
        if exp.get("features_kept"):
            if case["features"] and clip_model is not None:
                feats = MS.text_feature_drift(clip_model, best_frames, [f["frame"] for f in fid["frames"]] or [0],
                                              job["source"]["image"], case["features"])
                checks["features_kept"] = {"pass": all(f["kept"] for f in feats), "features": feats}
            else:
                checks["features_kept"] = {"pass": None, "detail": "the spec lists no character.traits.fixed"}
    with timer.step("export"):
        meta = ltx.export_mp4(best_frames, folder / f"{job['name']}.mp4", config["fps"])
        best_frames[0].convert("RGB").save(folder / f"{job['name']}.jpg", quality=88)
    bud = budget(timer.seconds, per_hour, currency, gpu_name, config["targets"], COUNTED_STEPS)
    flagged = fid["grade"] == "fail" or any(c.get("pass") is False for c in checks.values())
    record = {
        "name": job["name"],
        "case": case["name"] if case else None,
        "source": job["source"]["from"],
        "prompt": job["prompt"],
        "seed": seed,
        "kept_attempt": kept,
        "attempts": attempts,
        "file": f"clips/{job['name']}.mp4",
        "poster": f"clips/{job['name']}.jpg",
        "video": meta,
        "fidelity": fid,
        "dynamics": dyn,
        "motion": motion,
        "checks": checks,
        "budget": bud,
        "flagged": bool(flagged),
        "action": ("regenerated" if len(attempts) > 1 else "none") + ("; flagged" if flagged else ""),
    }
    tmp = folder / "clip.json.tmp"
    tmp.write_text(json.dumps(record, default=str), encoding="utf-8")
    os.replace(tmp, folder / "clip.json")
    ctx.log(f"video: {job['name']}: fidelity distance {fid['distance']}/100, lower is closer ({fid['grade']}), {bud['seconds']:.1f} s, "
            f"{bud['cost']:.4f} {currency}")
    return record


def _resume_info(scratch: Path) -> str | None:
    done = sorted((Path(scratch) / "clips").glob("*/clip.json"))
    if not done:
        return None
    return f"resume after {len(done)} finished clip{'s' if len(done) != 1 else ''}"


# --------------------------------------------------------------------------- report


def report_sections(config: dict[str, Any], outputs: dict[str, contract.Artifact], env: dict[str, Any]) -> list[contract.ReportSection]:
    from runner.report import charts
    from runner.report.embed import thumbnail_data_uri, video_data_uri

    art = outputs.get("video")
    if art is None:
        return []
    folder = Path(art.path)
    rep = _repriced(json.loads((folder / "report.json").read_text(encoding="utf-8")), config)
    max_embed = int(env.get("video_embed_max_bytes", 8 * 1024 * 1024))
    clips = []
    for c in rep["clips"]:
        f = folder / c["file"]
        embed = f.is_file() and f.stat().st_size <= max_embed
        series = c["dynamics"]["series"]
        chart = None
        if len(series.get("mouth_open", [])) >= 2:
            chart = charts.line_chart(
                {"mouth openness": list(enumerate(series["mouth_open"])),
                 "eye aspect ratio": list(enumerate(series.get("eye_ratio", [])))},
                width=320, height=140, xlabel="analysed frame")
        clips.append({**c, "video_uri": video_data_uri(f) if embed else None,
                      "poster_uri": thumbnail_data_uri(folder / c["poster"], 512), "chart": chart})
    tiny = rep.get("tiny_random", {})
    tiny_note = ""
    if tiny.get("any"):
        which = [k.replace("_", " ") for k in ("video_model", "source_frames", "clip") if tiny.get(k)]
        tiny_note = (f"Made with tiny random models ({', '.join(which)}): the clips are noise; fidelity, dynamics, "
                     "motion and timings only show that the pipeline runs end to end.")
    return [contract.ReportSection(title="Image-to-video", template="sections/video.html.j2", anchor="video",
                               context={"rep": rep, "clips": clips, "tiny_note": tiny_note})]
