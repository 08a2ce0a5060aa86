"""What the review pages show: the workspace store's outputs for one spec, joined with the decisions.

For each stage the pages use the outputs of the planned key when the store has them, else those of
the stage's last success (a review of the previous run while the next one is pending). Files are
served only from inside the store (:meth:`ReviewState.store_file`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.core.hashing import file_sha256
from runner.review import agreement, decisions
from runner.spec.config import view_of
from runner.spec.sections import CurationConfig

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
SERVABLE = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".mp4", ".webm"}


@dataclass
class StageOutputs:
    stage_id: str
    key: str
    folders: dict[str, Path]
    config: dict[str, Any]
    current: bool  # the planned key (False: an earlier run's outputs)


@dataclass
class ReviewState:
    """One spec's plan, workspace and decisions file."""

    spec: Any
    review_file: Path
    plan: Any = None
    stages: dict[str, StageOutputs] = field(default_factory=dict)
    store_dir: Path = Path()
    _sha_cache: dict[Path, tuple[tuple[int, int], str]] = field(default_factory=dict)

    @classmethod
    def open(cls, spec: Any) -> "ReviewState":
        st = cls(spec=spec, review_file=decisions.review_path(spec.file))
        st.refresh()
        return st

    def refresh(self) -> None:
        from runner.engine.executor import plan_specs
        from runner.stages import registry

        plan, ws = plan_specs([self.spec], registry=registry())
        try:
            self.use_plan(plan, ws)
        finally:
            ws.close()

    def use_plan(self, plan: Any, ws: Any) -> None:
        """Take the outputs of ``plan``'s stages from workspace ``ws`` (an open Workspace)."""
        stages: dict[str, StageOutputs] = {}  # built aside, then swapped in: pages run in threads
        for ps in plan.stages:
            if ps.node.character != self.spec.name:
                continue
            key = ps.key if ws.store_has(ps.key) else None
            prior = ws.last_success(ps.id)
            if key is None and prior is not None and ws.store_has(prior.key):
                key = prior.key
            if key is None:
                continue
            folders = {name: Path(a.path) for name, a in ws.load_outputs(key).items()}
            stages[ps.id] = StageOutputs(ps.id, key, folders, ps.node.config, key == ps.key)
        self.plan, self.store_dir, self.stages = plan, ws.store_dir.resolve(), stages

    # ------------------------------------------------------------------ helpers
    def decisions(self) -> dict[str, Any]:
        return decisions.load(self.review_file)

    def showing(self, view: str) -> list[StageOutputs]:
        """The stages whose kind declares ``review_view=view`` (runner.core.contract.StageKind)."""
        registry = self.plan.graph.registry
        return [s for sid, s in self.stages.items()
                if _review_view(registry, self.plan.graph.nodes[sid].kind) == view]

    def url(self, path: Path) -> str:
        """The page URL of a file inside the store."""
        from urllib.parse import quote

        rel = Path(path).resolve().relative_to(self.store_dir)
        return "/file/" + quote(rel.as_posix())

    def store_file(self, rel: str) -> Path | None:
        """The store file ``rel`` names, or None when it is not a servable file inside the store."""
        parts = Path(rel).parts
        if not parts or not KEY_RE.match(parts[0]) or any(p in ("..", "") for p in parts):
            return None
        path = (self.store_dir / rel).resolve()
        if not path.is_relative_to(self.store_dir) or not path.is_file() or path.suffix.lower() not in SERVABLE:
            return None
        return path

    def sha(self, path: Path) -> str:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._sha_cache.get(path)
        if hit is None or hit[0] != stamp:
            hit = (stamp, file_sha256(path))
            self._sha_cache[path] = hit
        return hit[1]

    # ------------------------------------------------------------------ dataset
    def dataset(self) -> list[dict[str, Any]]:
        """Every analyzed image with its analysis, curate's decision and the reviewer's."""
        from runner.stages.common import read_jsonl

        analyze = self.showing("analysis")
        if not analyze:
            return []
        adir = analyze[0].folders["analysis"]
        manifests: dict[str, dict[str, Any]] = {}
        for s in self.stages.values():
            for name, folder in s.folders.items():
                if name.startswith("images") and (folder / "manifest.jsonl").is_file():
                    for rec in read_jsonl(folder / "manifest.jsonl"):
                        manifests[rec["id"]] = {**rec, "path": folder / rec["file"]}
        view = CurateView.of(self.showing("curation"))
        records = list(read_jsonl(adir / "records.jsonl"))
        groups = _duplicate_groups(records, view_of(CurationConfig, view.cfg).dedupe_hamming)
        dec = self.decisions()["images"]
        rows = []
        for rec in records:
            man = manifests.get(rec["id"], {})
            rows.append(_dataset_row(rec, man, dec.get(man.get("sha256", ""), {}), view, groups.get(rec["id"]),
                                     self._thumb(adir, rec, man)))
        return rows

    def _thumb(self, adir: Path, rec: dict[str, Any], man: dict[str, Any]) -> str | None:
        thumb = adir / "thumbs" / f"{rec['id']}.jpg"
        if thumb.is_file():
            return self.url(thumb)
        return self.url(man["path"]) if man.get("path") and Path(man["path"]).is_file() else None

    # ------------------------------------------------------------------ identity sets from video
    def identity(self) -> list[dict[str, Any]]:
        dec = self.decisions()["identity"]
        out = []
        for s in self.showing("identity"):
            root = s.folders.get("identity")
            if root is None:
                continue
            summary = _read_json(root / "summary.json")
            records = _frame_records(s.folders.get("images"))
            persons = []
            for pdir in sorted(root.glob("person_*")):
                sets = {}
                for name in decisions.VIDEO_SETS:
                    items = []
                    for meta_file in sorted((pdir / name).glob("*_meta.json")):
                        meta = _read_json(meta_file)
                        png = meta_file.with_name(meta.get("file") or meta_file.name[: -len("_meta.json")] + ".png")
                        if not png.is_file():
                            continue
                        # The key is the frame's PNG in the images artifact (what video_identity and
                        # curate match), the set file's own sha256 when the manifest lacks it.
                        rec = records.get((meta.get("person_id", _person_no(pdir)), meta.get("frame_idx"),
                                           tuple(meta.get("crop_box") or ())), {})
                        sha = rec.get("sha256") or self.sha(png)
                        d = dec.get(sha, {})
                        items.append({"sha": sha, "image_id": rec.get("id", ""), "src": self.url(png),
                                      "name": png.name, "set": name, "person": pdir.name,
                                      "quality": meta.get("quality"), "timestamp_ms": meta.get("timestamp_ms"),
                                      "decision": d.get("decision"), "review_set": d.get("set"),
                                      "note": d.get("note", "")})
                    sets[name] = items
                persons.append({"name": pdir.name, "meta": _read_json(pdir / "meta.json"), "sets": sets})
            applied = _read_json(root / "review.json").get("applied", [])  # drops video_identity applied
            out.append({"stage": s.stage_id, "video": summary.get("video", ""), "persons": persons,
                        "applied": applied})
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluations(self) -> list[dict[str, Any]]:
        data = self.decisions()
        out = []
        for s in self.showing("evaluation"):
            folder = s.folders.get("evaluation")
            if folder is None or not (folder / "evaluation.json").is_file():
                continue
            ev = _read_json(folder / "evaluation.json")
            sha_of = {img["path"]: self.sha(folder / img["path"]) for c in ev.get("cells", [])
                      for img in c.get("images", []) if (folder / img.get("path", "")).is_file()}
            rated = agreement.rated_images(ev, data["ratings"], sha_of)
            out.append({"stage": s.stage_id, "evaluation": ev, "folder": folder, "sha_of": sha_of,
                        "pick": data["checkpoints"].get(s.stage_id), "agreement": agreement.table(ev, rated),
                        "disagree": agreement.disagreements(ev, rated),
                        "lora_sha": self._lora_shas(s.stage_id)})
        return out

    def _lora_shas(self, evaluate_id: str) -> dict[int, str]:
        """step -> sha256 of that checkpoint's LoRA file (recorded with a pick)."""
        ref = self.plan.graph.nodes[evaluate_id].inputs.get("lora")
        train = self.stages.get(getattr(ref, "stage_id", ""))
        if train is None or "lora" not in train.folders:
            return {}
        folder = train.folders["lora"]
        index = _read_json(folder / "index.json")
        return {int(ck["step"]): self.sha(folder / ck["diffusers"]) for ck in index.get("checkpoints", [])
                if (folder / ck.get("diffusers", "")).is_file()}

    # ------------------------------------------------------------------ storyboard and clips
    def storyboard(self) -> dict[str, Any]:
        data = self.decisions()
        frames, clips = [], []
        for s in self.showing("frames"):
            folder = s.folders.get("storyboard")
            rep = _read_json(folder / "report.json") if folder else {}
            for f in rep.get("frames", []):
                path = folder / f["file"]
                if path.is_file():
                    sha = self.sha(path)
                    frames.append({**f, "stage": s.stage_id, "sha": sha, "src": self.url(path),
                                   **_verdict(data["frames"].get(sha))})
        for s in self.showing("clips"):
            folder = s.folders.get("video")
            if folder is None:
                continue
            for mp4 in sorted(folder.rglob("*.mp4")):
                sha = self.sha(mp4)
                poster = mp4.with_suffix(".jpg")
                clips.append({"stage": s.stage_id, "name": mp4.stem, "sha": sha, "src": self.url(mp4),
                              "poster": self.url(poster) if poster.is_file() else None,
                              **_verdict(data["clips"].get(sha))})
        return {"frames": frames, "clips": clips}

    # ------------------------------------------------------------------ decisions whose subject is gone
    def orphans(self) -> list[dict[str, Any]]:
        """Decisions for images, frames or clips the workspace no longer has (listed, never dropped)."""
        data = self.decisions()
        known: dict[str, set[str]] = {
            "images": {r["sha256"] for r in self.dataset() if r["sha256"]},
            "identity": {i["sha"] for v in self.identity() for p in v["persons"] for items in p["sets"].values()
                         for i in items} | {sha for v in self.identity() for sha in v["applied"]},
            "ratings": {sha for e in self.evaluations() for sha in e["sha_of"].values()},
            "frames": {f["sha"] for f in self.storyboard()["frames"]},
            "clips": {c["sha"] for c in self.storyboard()["clips"]},
        }
        out = []
        for section, shas in known.items():
            if not shas:
                continue  # that stage has not run here: nothing to compare with
            for sha, entry in sorted(data[section].items()):
                if sha not in shas:
                    out.append({**decisions.describe(section, sha, entry), "sha": sha})
        return out


def _review_view(registry: Any, kind: str) -> str | None:
    return registry.get(kind).review_view if kind in registry else None


def _verdict(d: dict[str, Any] | None) -> dict[str, Any]:
    d = d or {}
    return {"verdict": d.get("verdict"), "note": d.get("note", ""), "by": d.get("by", ""), "at": d.get("at", "")}


def _person_no(pdir: Path) -> int | None:
    tail = pdir.name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _frame_records(images: Path | None) -> dict[tuple, dict[str, Any]]:
    """Manifest records of a video_identity images artifact by (person, frame, crop box)."""
    if images is None or not (images / "manifest.jsonl").is_file():
        return {}
    from runner.stages.common import read_jsonl

    out = {}
    for r in read_jsonl(images / "manifest.jsonl"):
        v = r.get("video") or {}
        out[(v.get("person_id"), v.get("frame_idx"), tuple(v.get("crop_box") or ()))] = r
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _duplicate_groups(records: list[dict[str, Any]], hamming: int) -> dict[str, str]:
    """Image id -> the id of its near-duplicate group (the best image of it), for groups of 2+."""
    from runner.stages.common import dedupe, quality_score

    cands = [{**r, "quality": quality_score(r)} for r in records if r.get("phash") and not r.get("error")]
    _, dups = dedupe(cands, hamming)
    groups: dict[str, str] = {}
    for rec, keeper, _dist in dups:
        groups[rec["id"]] = keeper["id"]
        groups[keeper["id"]] = keeper["id"]
    return groups


@dataclass
class CurateView:
    """What curate's outputs say about each image (empty when curate has not run)."""

    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, dict[str, Any]] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None

    @classmethod
    def of(cls, curate: list[StageOutputs]) -> "CurateView":
        from runner.stages.common import read_jsonl

        if not curate:
            return cls()
        cdir = curate[0].folders["curated"]
        return cls(kept={e["id"]: e for e in read_jsonl(cdir / "curated.jsonl") if not e.get("parent")},
                   rejected={r["id"]: r for r in read_jsonl(cdir / "rejected.jsonl") if "id" in r},
                   cfg=curate[0].config, threshold=_read_json(cdir / "balance.json").get("identity_threshold"))

    def decision(self, image_id: str) -> dict[str, Any]:
        if image_id in self.kept:
            by_hand = (self.kept[image_id].get("review") or {}).get("decision") == "keep"
            return {"decision": "keep", "reason": "kept by a reviewer's decision" if by_hand else "passed every gate"}
        if image_id in self.rejected:
            r = self.rejected[image_id]
            return {"decision": "drop", "reason": f"{r['reason']}: {r.get('detail', '')}".rstrip(": ")}
        return {"decision": None, "reason": "curate has not run on this image"}

    def gate(self, rec: dict[str, Any]) -> tuple[str, str] | None:
        from runner.stages.common import gate

        return gate(rec, self.cfg, self.threshold) if self.cfg else None


def _dataset_row(rec: dict[str, Any], man: dict[str, Any], dec: dict[str, Any], curate: CurateView,
                 group: str | None, thumb: str | None) -> dict[str, Any]:
    face = rec["faces"][rec["main_face"]] if rec.get("main_face") is not None else None
    pose = (face or {}).get("pose") or {}
    failed = curate.gate(rec)
    return {
        "id": rec["id"], "sha256": man.get("sha256", ""), "source": rec.get("source") or man.get("source", ""),
        "name": Path(rec.get("source") or rec["id"]).name, "thumb": thumb,
        "shot": rec.get("shot"), "people": rec.get("people_substantial", rec.get("people", 0)),
        "yaw": _num(pose.get("yaw")), "pitch": _num(pose.get("pitch")), "identity": _num(rec.get("identity")),
        "gates": [failed[0]] if failed else [], "gate_detail": failed[1] if failed else "",
        "group": group, "curate": curate.decision(rec["id"]), "video": bool(man.get("video")),
        "review": {k: dec.get(k) for k in ("decision", "shot", "reference", "note", "by", "at")},
    }


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else round(f, 3)

