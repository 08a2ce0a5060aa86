"""The review decisions file: ``<spec name>.review.yaml`` next to the spec.

What people decided in ``runner review`` lives here, in git beside the spec, and flows into the
stages it affects as part of their config (so into their cache keys). The format::

    format: 1
    images:                       # dataset images, by sha256 of the image file (renames keep it)
      3f1c...e9:
        decision: drop            # keep | drop (keep overrides curate's gates and dedupe)
        shot: close_up            # optional: the reviewer's shot type
        reference: true           # optional: kept and listed as a reference candidate
        note: partly covered
        image_id: 3f1c0d2a9b8e7f60  # the id analyze gives it (content-derived too)
        file: photos/obama_02.jpg # last known name, for people reading the file
        by: alice
        at: '2026-12-01T22:40:00Z'
    identity:                     # frames of video identity sets, by sha256 of the frame PNG
      <sha256>: {decision: drop | set, set: anchors | coverage | challenge, person: 0, origin: <stage id>, ...}
    ratings:                      # evaluation images, by sha256 of the generated image
      <sha256>: {rating: pass | fail, note, stage, cell, category, ...}
    checkpoints:                  # the reviewer's checkpoint per evaluate stage: `best` for generation
      <stage id>: {cell, step, lora_scale, ...}
    frames:                       # storyboard frames, by sha256 of the frame PNG
      <sha256>: {verdict: approve | reject, scene: 3, note, ...}
    clips:                        # video clips, by sha256 of the mp4
      <sha256>: {verdict: approve | reject, clip: name, note, ...}

Every section is a mapping sorted by key and every decision is one block with ``by`` and ``at``,
so two reviewers' changes to different items merge cleanly in git. Saving takes a file lock,
re-reads the file, applies only the fields that changed, and renames a temporary file into
place: two people saving at once never lose a decision.

This module is a leaf (yaml, fcntl, hashlib): stages read their section through
:func:`stage_section`, the planner words changes through :func:`describe_change`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from runner.core.errors import UserError
from runner.core.fs import atomic_write_text

FORMAT = 1
SECTIONS = ("images", "identity", "ratings", "checkpoints", "frames", "clips")
SHOT_TYPES = ("extreme_close_up", "close_up", "medium", "full_body", "wide")
VIDEO_SETS = ("anchors", "coverage", "challenge")
# Allowed values per field; a field not listed here is free text (notes, names, ids).
CHOICES: dict[str, dict[str, tuple[Any, ...]]] = {
    "images": {"decision": ("keep", "drop", None), "shot": SHOT_TYPES + (None,), "reference": (True, False, None)},
    "identity": {"decision": ("drop", "set", None), "set": VIDEO_SETS + (None,)},
    "ratings": {"rating": ("pass", "fail", None)},
    "checkpoints": {},
    "frames": {"verdict": ("approve", "reject", None)},
    "clips": {"verdict": ("approve", "reject", None)},
}
# Fields that change what a stage produces (the rest, notes and names, are for people).
EFFECT_FIELDS = {
    "images": ("decision", "shot", "reference"),
    "identity": ("decision", "set"),
    "frames": ("verdict",),
    "clips": ("verdict",),
    "checkpoints": ("step", "lora_scale", "lora_sha256"),
}
HEADER = ("# Review decisions, written by `runner review` (see README: Reviewing in the browser).\n"
          "# One block per decision, sorted by content hash; `by` and `at` say who decided and when.\n")


class ReviewError(UserError):
    """The review file cannot be read or a decision is invalid (the message names the file/key);
    exit 2, like a spec problem."""

    exit_code = 2


def review_path(spec_file: Path) -> Path:
    """``specs/demo.yaml`` -> ``specs/demo.review.yaml``."""
    spec_file = Path(spec_file)
    return spec_file.with_name(spec_file.stem + ".review.yaml")


def empty() -> dict[str, Any]:
    return {"format": FORMAT, **{s: {} for s in SECTIONS}}


def load(path: Path) -> dict[str, Any]:
    """The decisions in ``path`` (an empty set when the file does not exist)."""
    from runner.spec.yamlio import YamlError, load_yaml_file

    path = Path(path)
    if not path.exists():
        return empty()
    if path.is_symlink():  # never read through: it could lead out of the project, and a save replaces it
        raise ReviewError(f"{path}: is a symbolic link (to {os.path.realpath(path)}), which is not read; "
                          "`runner review` writes this file itself (a save replaces the link): make it a "
                          "plain file next to the spec, or remove it")
    try:  # read like the spec (bounded nesting, aliases and size; no tags): any failure names its line
        data = load_yaml_file(path).data or {}
    except YamlError as exc:
        raise ReviewError(f"{exc.mark}: not valid YAML ({exc.message}); "
                          "fix or remove the file (git diff shows what changed)") from None
    if not isinstance(data, dict):
        raise ReviewError(f"{path}: expected a mapping with the sections {', '.join(SECTIONS)}")
    out = empty()
    for name, value in data.items():
        if name == "format":
            continue
        if name not in SECTIONS:
            raise ReviewError(f"{path}: unknown section {name!r}; known: {', '.join(SECTIONS)}")
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise ReviewError(f"{path}: section {name!r} must map each key to a block of fields")
        out[name] = {str(k): dict(v) for k, v in value.items()}
    return out


def dump(data: dict[str, Any]) -> str:
    import yaml

    body = {"format": FORMAT, **{s: dict(sorted(data.get(s, {}).items())) for s in SECTIONS if data.get(s)}}
    return HEADER + yaml.safe_dump(body, sort_keys=True, allow_unicode=True, default_flow_style=False, width=100)


def reviewer(given: str | None = None) -> str:
    """Who decides: the name the page sends, else $RUNNER_REVIEWER, else git's user.name, else the login."""
    for name in (given, os.environ.get("RUNNER_REVIEWER")):
        if name and name.strip():
            return name.strip()[:80]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()[:80]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate(section: str, key: str, fields: dict[str, Any]) -> None:
    if section not in SECTIONS:
        raise ReviewError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    if not key or len(key) > 200 or any(c in key for c in "\n\r\0"):
        raise ReviewError(f"{section}: invalid key {key!r}")
    for name, value in fields.items():
        allowed = CHOICES[section].get(name)
        if allowed is not None and value not in allowed:
            raise ReviewError(f"{section}.{key}.{name}: {value!r} is not one of "
                              + ", ".join(repr(a) for a in allowed if a is not None))
        if isinstance(value, str) and len(value) > 2000:
            raise ReviewError(f"{section}.{key}.{name}: longer than 2000 characters")
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise ReviewError(f"{section}.{key}.{name}: must be text, a number or true/false")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def apply_patch(data: dict[str, Any], section: str, key: str, fields: dict[str, Any], *,
                by: str, at: str) -> dict[str, Any]:
    """Set ``fields`` on one decision (``None`` removes a field); a decision left with nothing but
    names and times is removed. Returns the decision (or {} when removed)."""
    validate(section, key, fields)
    entry = dict(data[section].get(key, {}))
    for name, value in fields.items():
        if value is None or value == "":
            entry.pop(name, None)
        else:
            entry[name] = value
    meaningful = {k for k in entry if k not in ("by", "at", "file", "image_id", "stage", "cell", "category",
                                                 "scene", "clip", "person", "origin")}
    if not meaningful:
        data[section].pop(key, None)
        return {}
    entry.update(by=by, at=at)
    data[section][key] = entry
    return entry


def save(path: Path, patches: list[tuple[str, str, dict[str, Any]]], *, by: str | None = None) -> dict[str, Any]:
    """Apply ``patches`` [(section, key, fields)] to the file under a lock and return the merged
    decisions. The file is re-read under the lock, so changes others saved meanwhile are kept."""
    path = Path(path)
    who, when = reviewer(by), now()
    for section, key, fields in patches:  # refuse the whole batch before touching the file
        validate(section, key, fields)
    with _locked(path):
        data = load(path)
        for section, key, fields in patches:
            apply_patch(data, section, key, fields, by=who, at=when)
        atomic_write_text(path, dump(data))
    return data


# --------------------------------------------------------------------------- what stages see


def stage_section(data: dict[str, Any], part: str, **kw: Any) -> dict[str, Any]:
    """The part of the decisions one stage depends on (only fields that change its outputs), so
    a note or a rating never re-runs curate. ``part``: dataset (curate) | references (analyze) |
    identity (video_identity) | storyboard | video."""
    def effects(section: str) -> dict[str, dict[str, Any]]:
        keep = EFFECT_FIELDS[section]
        out = {}
        for k, v in sorted(data.get(section, {}).items()):
            e = {f: v[f] for f in keep if f in v}
            if e:
                out[k] = e
        return out

    if part == "dataset":  # keyed by the image id analyze uses (ingest's is the sha256's first 16)
        sec = {s: {(data[s][k].get("image_id") or k[:16]): v for k, v in effects(s).items()}
               for s in ("images", "identity")}
        return {k: dict(sorted(v.items())) for k, v in sec.items() if v}
    if part == "references":  # analyze: images a reviewer marked as references, by image id
        refs = {(data["images"][k].get("image_id") or k[:16]): {"reference": True}
                for k, v in effects("images").items() if v.get("reference")}
        return {"images": dict(sorted(refs.items()))} if refs else {}
    if part == "identity":  # video_identity: drops and moves of frames, by the frame's PNG sha256;
        # with ``stage``, only frames of that stage (the page records it as ``origin``)
        stage = kw.get("stage")
        mine = {k: v for k, v in effects("identity").items()
                if stage is None or data["identity"][k].get("origin") in (None, stage)}
        return {"identity": mine} if mine else {}
    if part == "storyboard":
        out: dict[str, Any] = {}
        regen: dict[str, int] = {}
        for e in data.get("frames", {}).values():
            if e.get("verdict") == "reject" and e.get("scene") is not None:
                regen[str(int(e["scene"]))] = regen.get(str(int(e["scene"])), 0) + 1
        if regen:
            out["regenerate_scenes"] = dict(sorted(regen.items(), key=lambda kv: int(kv[0])))
        pick = data.get("checkpoints", {}).get(kw.get("evaluate") or "")
        if pick and pick.get("step") is not None:
            out["checkpoint"] = {f: pick[f] for f in ("stage", "step", "lora_scale", "lora_sha256") if f in pick}
            out["checkpoint"]["stage"] = kw.get("evaluate")
        return out
    if part == "video":
        regen = {}
        for e in data.get("clips", {}).values():
            if e.get("verdict") == "reject" and e.get("clip"):
                regen[str(e["clip"])] = regen.get(str(e["clip"]), 0) + 1
        return {"regenerate_clips": dict(sorted(regen.items()))} if regen else {}
    raise ValueError(f"unknown review part {part!r}")


def describe_change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """One plan reason for a change of a stage's review section:
    ``review: 3 images dropped, 1 shot type changed``."""
    old, new = old or {}, new or {}
    bits: list[str] = []

    def count(section: str, field: str, value: Any = None) -> tuple[int, int]:
        a, b = old.get(section, {}), new.get(section, {})
        def has(d: dict, k: str) -> bool:
            v = d.get(k, {}).get(field)
            return v is not None and (value is None or v == value)
        added = sum(1 for k in b
                    if has(b, k) and (not has(a, k) or (value is None and a[k].get(field) != b[k].get(field))))
        removed = sum(1 for k in a if has(a, k) and not has(b, k))
        return added, removed

    def word(n: int, what: str, verb: str) -> None:
        if n:
            bits.append(f"{n} {what}{'s' if n != 1 else ''} {verb}")

    for section, noun in (("images", "image"), ("identity", "video frame")):
        d_add, d_rem = count(section, "decision", "drop")
        k_add, k_rem = count(section, "decision", "keep")
        word(d_add, noun, "dropped")
        word(k_add, noun, "kept by hand")
        word(d_rem + k_rem, f"{noun} decision", "withdrawn")
    s_add, s_rem = count("images", "shot")
    word(s_add, "shot type", "changed")
    word(s_rem, "shot type change", "withdrawn")
    r_add, r_rem = count("images", "reference", True)
    word(r_add, "image", "marked as reference")
    word(r_rem, "reference mark", "withdrawn")
    v_add, _ = count("identity", "set")
    word(v_add, "video frame", "moved to another set")
    for key, noun in (("regenerate_scenes", "frame"), ("regenerate_clips", "clip")):
        a, b = old.get(key, {}), new.get(key, {})
        n = sum(max(0, b.get(k, 0) - a.get(k, 0)) for k in b)
        word(n, noun, "rejected")
    # The whole file (the report's section): ratings, verdicts and picks as people made them.
    r_add, r_rem = count("ratings", "rating")
    word(r_add, "evaluation image", "rated")
    word(r_rem, "rating", "withdrawn")
    for section, noun in (("frames", "frame"), ("clips", "clip")):
        for verdict, verb in (("reject", "rejected"), ("approve", "approved")):
            word(count(section, "verdict", verdict)[0], noun, verb)
    picks = sum(1 for k, v in new.get("checkpoints", {}).items()
                if old.get("checkpoints", {}).get(k, {}).get("cell") != v.get("cell"))
    word(picks, "checkpoint", "picked")
    if old.get("checkpoint") != new.get("checkpoint"):
        c = new.get("checkpoint")
        bits.append(f"checkpoint step {c['step']} at LoRA scale {c.get('lora_scale', 1.0):g} picked" if c
                    else "checkpoint pick withdrawn")
    return "review: " + (", ".join(bits) if bits else "decisions changed")


def summary(data: dict[str, Any]) -> dict[str, int]:
    """Counts of what people decided, for the page header and the report."""
    imgs, frames = data.get("images", {}), data.get("frames", {})
    return {
        "dropped": sum(1 for e in imgs.values() if e.get("decision") == "drop"),
        "kept": sum(1 for e in imgs.values() if e.get("decision") == "keep"),
        "shots": sum(1 for e in imgs.values() if e.get("shot")),
        "references": sum(1 for e in imgs.values() if e.get("reference")),
        "identity": len(data.get("identity", {})),
        "ratings": len(data.get("ratings", {})),
        "checkpoints": len(data.get("checkpoints", {})),
        "frames_rejected": sum(1 for e in frames.values() if e.get("verdict") == "reject"),
        "frames_approved": sum(1 for e in frames.values() if e.get("verdict") == "approve"),
        "clips": len(data.get("clips", {})),
    }


_CACHE: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def for_spec(spec_file: Path) -> dict[str, Any]:
    """The decisions next to ``spec_file``, read once per change of the file (several stages'
    ``expand`` ask during one plan). Raises :class:`ReviewError` for a broken file."""
    path = review_path(spec_file)
    try:
        st = path.stat()
    except OSError:
        return empty()
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is None or hit[0] != stamp:
        hit = (stamp, load(path))
        _CACHE[path] = hit
    return hit[1]



def describe(section: str, key: str, entry: dict[str, Any]) -> dict[str, str]:
    """One decision as text for pages, plan and report: what it is about, what was decided, by whom."""
    what = entry.get("file") or entry.get("clip") or entry.get("cell") or (
        f"scene {entry['scene']}" if entry.get("scene") is not None else key[:12])
    bits = [str(entry[f]) for f in ("decision", "verdict", "rating") if entry.get(f) and entry.get(f) != "set"]
    if entry.get("shot"):
        bits.append(f"shot {entry['shot']}")
    if entry.get("reference"):
        bits.append("reference")
    if entry.get("set"):
        bits.append(f"moved to {entry['set']}")
    if section == "checkpoints":
        bits.append(f"picked step {entry.get('step')} at LoRA scale {entry.get('lora_scale', 1.0)}")
    return {"section": section, "key": key, "what": str(what), "decision": ", ".join(bits),
            "note": str(entry.get("note", "")), "by": str(entry.get("by", "")), "at": str(entry.get("at", ""))}
