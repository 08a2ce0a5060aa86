"""Clip making and measuring, shared by the ``video`` and ``evaluate_video`` stages.

Per clip: generate (optional 2x upscale, first-frame replacement), measure fidelity at
``fidelity.frames`` evenly spaced frames against the 20 / 30 thresholds, expression dynamics
(mouth and eye openness over time, blinks), motion and identity drift first to last
(:mod:`runner.generate.measures`); a clip graded fail is made again with the next seed when
``on_fail: regenerate``; then mp4 + poster and time / cost (:mod:`runner.generate.budget`).
Moved out of runner/stages/video.py (issue 16) so that stages do not import each other.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.core import contract
from runner.core.fs import atomic_write_text

# Steps whose wall time counts against targets.max_seconds (analysis is the runner's own check).
COUNTED_STEPS = ("generation", "upscale", "first_frame", "export")


@dataclass
class ClipJob:
    """One clip to make: a source image (a storyboard frame or the source file) and its prompt;
    ``case`` is the suite case it checks, None for the plain clip."""

    name: str
    source: dict[str, Any]  # name, image, text, from, tiny_random
    prompt: str
    case: dict[str, Any] | None = None


@dataclass
class Fidelity:
    """What a clip's faces are compared with: the reference faces, or each clip's source image."""

    face_backend: Any
    ref_faces: Any
    against: str  # "references" or "source"
    threshold: float

    def compare_with(self, job: ClipJob) -> Any:
        src_faces = face_embeddings(self.face_backend, [job.source["image"]])
        return self.ref_faces if self.against == "references" else src_faces


@dataclass(frozen=True)
class Pricing:
    gpu: str
    per_hour: float
    currency: str


def face_embeddings(face_backend, images):
    import numpy as np

    found = face_backend.main_face_embeddings([np.asarray(im.convert("RGB")) for im in images])
    embs = [emb for emb, _ in found if emb is not None]
    return np.stack(embs) if embs else np.zeros((0, 1), np.float32)


def render_clip(vp, job: ClipJob, config: dict[str, Any], seed: int, timer, ctx) -> list:
    """Generate (and upscale / replace the first frame of) one clip; steps timed into ``timer``."""
    from runner.generate import ltx

    image = job.source["image"]
    kw = {"prompt": job.prompt, "negative_prompt": config["negative_prompt"], "width": config["width"],
          "height": config["height"], "frames": config["frames"], "fps": config["fps"], "steps": config["steps"],
          "guidance": config["guidance"], "image_conditioning": config["image_conditioning"], "seed": seed,
          "decode_timestep": config["decode_timestep"], "decode_noise_scale": config["decode_noise_scale"]}
    latent_up = bool(config["upscale"] and config.get("upsampler"))
    with timer.step("generation"):
        result = ltx.generate_clip(vp, image, output_latents=latent_up, **kw)
    if config["upscale"]:
        with timer.step("upscale"):
            if latent_up:
                up_ref = config["upsampler"]
                result = ltx.latent_upscale(vp, result, up_ref, width=config["width"], height=config["height"],
                                            seed=seed,
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


@dataclass
class Attempt:
    """One generated clip and its measures."""

    frames: list[Any]
    seed: int
    attempt: int
    fidelity: dict[str, Any]
    dynamics: dict[str, Any]
    motion: Any
    audio: Any = None  # (samples (channels, n), sample rate) when the family generates audio


@dataclass
class ClipMaker:
    """Makes each clip once: generate, measure, regenerate a failing clip when asked, export, cost.
    A finished clip's folder (``<scratch>/clips/<name>/``, its clip.json last) is reused."""

    config: dict[str, Any]
    vp: Any
    fidelity: Fidelity
    clip_model: Any
    pricing: Pricing
    ctx: contract.StageContext

    def all_clips(self, jobs: list[ClipJob]) -> list[dict[str, Any]]:
        done_dir = self.ctx.scratch_dir / "clips"
        done_dir.mkdir(parents=True, exist_ok=True)
        prog = self.ctx.progress(len(jobs), "video: clips")
        clips = []
        for j_index, job in enumerate(jobs):
            record_file = done_dir / job.name / "clip.json"
            if record_file.is_file():
                clips.append(json.loads(record_file.read_text(encoding="utf-8")))
            else:
                clips.append(self.make(job, j_index, done_dir / job.name))
            prog.update(1)
        prog.close()
        return clips

    def make(self, job: ClipJob, j_index: int, folder: Path) -> dict[str, Any]:
        from runner.generate import ltx
        from runner.generate.budget import StepTimer, budget

        compare = self.fidelity.compare_with(job)
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished clip from a crash
        folder.mkdir(parents=True)
        timer = StepTimer()
        best, attempts = self._best_attempt(job, j_index, compare, timer)
        checks = self._checks(job, best)
        with timer.step("export"):
            meta = ltx.export_mp4(best.frames, folder / f"{job.name}.mp4", self.config["fps"])
            if best.audio is not None and self.config.get("audio", True):  # LTX-2: its audio into the mp4
                from runner.generate.video_models import add_audio

                meta.update(add_audio(folder / f"{job.name}.mp4", *best.audio))
            best.frames[0].convert("RGB").save(folder / f"{job.name}.jpg", quality=88)
        p = self.pricing
        bud = budget(timer.seconds, p.per_hour, p.currency, p.gpu, self.config["targets"], COUNTED_STEPS)
        record = _clip_record(job, best, attempts, meta, checks, bud)
        atomic_write_text(folder / "clip.json", json.dumps(record, default=str))
        self.ctx.log(f"video: {job.name}: fidelity distance {best.fidelity['distance']}/100, lower is closer "
                     f"({best.fidelity['grade']}), {bud['seconds']:.1f} s, {bud['cost']:.4f} {p.currency}")
        return record

    def _best_attempt(self, job: ClipJob, j_index: int, compare: Any,
                      timer: Any) -> tuple[Attempt, list[dict[str, Any]]]:
        """Generate and measure; a clip graded fail is made again with the next seed (on_fail:
        regenerate) up to fidelity.retries times. The closest attempt is kept."""
        config = self.config
        fid_cfg = config["fidelity"]
        retries = fid_cfg["retries"] if fid_cfg["on_fail"] == "regenerate" else 0
        # A clip a reviewer rejected r times starts r * (retries + 1) attempts on: no seed is reused.
        rejected = int((config.get("review") or {}).get("regenerate_clips", {}).get(job.name, 0))
        attempts, best = [], None
        for attempt in range(retries + 1):
            seed = config["seed"] + j_index + (attempt + rejected * (retries + 1)) * 1000
            frames = render_clip(self.vp, job, config, seed, timer, self.ctx)
            with timer.step("analysis"):
                got = Attempt(frames, seed, attempt, *self._measure(frames, compare),
                              audio=getattr(self.vp, "last_audio", None))
            attempts.append({"attempt": attempt, "seed": seed, "distance": got.fidelity["distance"],
                             "grade": got.fidelity["grade"]})
            if best is None or got.fidelity["distance"] < best.fidelity["distance"]:
                best = got
            if got.fidelity["grade"] != "fail":
                break
        return best, attempts

    def _measure(self, frames: list[Any], compare: Any) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """(fidelity at fidelity.frames evenly spaced frames, expression dynamics, motion)."""
        from runner.generate import measures as MS

        fid_cfg, dyn_cfg = self.config["fidelity"], self.config["dynamics"]
        # A replaced first frame is the source image itself: not generated, so not checked.
        skip = 1 if self.config["replace_first_frame"] and len(frames) > 1 else 0
        idx_fid = [i + skip for i in MS.evenly_spaced(len(frames) - skip, fid_cfg["frames"])]
        idx_dyn = MS.evenly_spaced(len(frames), dyn_cfg["frames"])
        idx_blink = MS.blink_indices(len(frames), self.config["fps"])
        recs = MS.analyse_faces(frames, sorted(set(idx_fid) | set(idx_dyn) | set(idx_blink)),
                                self.fidelity.face_backend)
        by_frame = {r["frame"]: r for r in recs}
        threshold = self.fidelity.threshold
        if len(compare):
            fid = MS.fidelity([by_frame[i] for i in idx_fid], compare, threshold,
                              excellent=fid_cfg["excellent"], fail=fid_cfg["fail"])
        else:
            fid = {"distance": 100.0, "worst": 100.0, "grade": "fail", "frames": [], "threshold": threshold,
                   "excellent": fid_cfg["excellent"], "fail": fid_cfg["fail"], "faces_found": 0,
                   "note": "no face in the references nor in the source image: nothing to compare with"}
        dyn = MS.expression_dynamics([by_frame[i] for i in idx_dyn], dyn_cfg["frozen_below"],
                                     [by_frame[i] for i in idx_blink])
        dyn["identity_drift"] = MS.identity_drift([by_frame[i] for i in idx_dyn], threshold)
        return fid, dyn, MS.motion_magnitude(frames, idx_dyn, dyn_cfg["flow_side"])

    def _checks(self, job: ClipJob, best: Attempt) -> dict[str, Any]:
        """The suite case's expectations (not_frozen, features_kept) on the kept attempt."""
        from runner.generate import measures as MS

        checks: dict[str, Any] = {}
        case, dyn = job.case, best.dynamics
        if not case:
            return checks
        exp = case.get("expect") or {}
        if exp.get("not_frozen"):
            checks["not_frozen"] = {"pass": None if dyn["frozen"] is None else not dyn["frozen"],
                                    "detail": MS.dynamics_detail(dyn)}
        if exp.get("features_kept"):
            if case["features"] and self.clip_model is not None:
                feats = MS.text_feature_drift(self.clip_model, best.frames,
                                              [f["frame"] for f in best.fidelity["frames"]] or [0],
                                              job.source["image"], case["features"])
                checks["features_kept"] = {"pass": all(f["kept"] for f in feats), "features": feats}
            else:
                checks["features_kept"] = {"pass": None, "detail": "the spec lists no character.traits.fixed"}
        return checks


def _clip_record(job: ClipJob, best: Attempt, attempts: list[dict[str, Any]], meta: Any, checks: dict[str, Any],
                 bud: dict[str, Any]) -> dict[str, Any]:
    """A clip's clip.json (and its entry in report.json)."""
    flagged = best.fidelity["grade"] == "fail" or any(c.get("pass") is False for c in checks.values())
    return {
        "name": job.name,
        "case": job.case["name"] if job.case else None,
        "source": job.source["from"],
        "prompt": job.prompt,
        "seed": best.seed,
        "kept_attempt": best.attempt,
        "attempts": attempts,
        "file": f"clips/{job.name}.mp4",
        "poster": f"clips/{job.name}.jpg",
        "video": meta,
        "fidelity": best.fidelity,
        "dynamics": best.dynamics,
        "motion": best.motion,
        "checks": checks,
        "budget": bud,
        "flagged": bool(flagged),
        "action": ("regenerated" if len(attempts) > 1 else "none") + ("; flagged" if flagged else ""),
    }
