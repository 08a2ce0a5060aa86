"""Story -> scenes: the storyboard planners.

``plan_story(spec_data)`` returns a :class:`StoryPlan` (the :class:`Scene` s, the planner that
made them, notes) for a resolved spec's ``generate.storyboard`` section; ``plan_scenes`` returns
just the scenes. Three planners:

``manual``
    The scenes listed in ``generate.storyboard.scenes`` (text, shot, optional prompt, optional
    ``hero``), in order.
``rules``
    The story is split into beats: sentences first; while there are fewer than ``min_scenes``,
    the longest beat is split at its most central clause boundary (:data:`_CLAUSE_SPLITS`); while
    there are more than ``max_scenes``, the shortest neighbouring pair is merged. Each beat gets
    a shot by keyword (:data:`SHOT_KEYWORDS`: faces and feelings -> close_up, journeys and places
    -> wide, ...; the first beat defaults to a wide establishing shot, the others to medium; a
    beat about a place or thing never gets a person's framing). A story with fewer sentences than
    ``min_scenes`` follows ``short_story``: ``split`` (clauses, then :func:`covered`, the same beat
    from other framings) or ``llm`` (the LLM planner makes the scenes); a note says which.
``llm``
    Any OpenAI-compatible ``/chat/completions`` endpoint (:mod:`runner.generate.llm_planner`):
    simplified, front-facing scene descriptions, then a prompt-refinement pass, each answered as
    JSON and validated with jsonschema (one retry quoting the error).

Whether the character is in each scene (``Scene.hero``, with ``hero_reason``) comes from
:mod:`runner.generate.presence` for rules and manual scenes (``scenes[].hero`` overrides), from
the answer for llm scenes. Every scene's prompt is written by :func:`scene_prompt`: trigger token
and class word, shot framing, the scene text, the character's fixed traits, the style prompt; a
scene without the character has no trigger, class word or traits. A scene with an explicit
``prompt`` keeps it (the trigger is prepended when missing and the character is in the scene).

``manual`` and ``rules`` are pure functions of the spec (``runner storyboard-preview`` prints
them without a GPU); ``llm`` makes two HTTP requests (three or four with retries).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from runner.generate.presence import Presence, hero_presence
from runner.core.errors import StageError

SHOTS = ("close_up", "medium", "full_body", "wide")
SHOT_PHRASES = {
    "close_up": "close-up portrait",
    "medium": "medium shot",
    "full_body": "full body shot",
    "wide": "wide establishing shot",
}
# First match wins, checked in this order (places and journeys before faces: "rides away
# laughing across the steppe" is a wide shot).
SHOT_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wide", ("rides", "ride", "riding", "across", "arrives", "journey", "travels", "landscape", "steppe",
              "village", "city", "mountains", "field", "sea", "desert", "forest", "crowd")),
    ("medium", ("meets", "talks", "tells", "says", "asks", "trades", "gives", "sits", "eats", "drinks",
                "holds", "shows", "argues")),
    ("close_up", ("face", "eyes", "smile", "smiles", "laugh", "laughs", "laughing", "cry", "cries", "crying",
                  "tears", "whisper", "whispers", "frown", "frowns", "shiver", "shivers", "shivering",
                  "stares", "gaze", "expression", "blush", "winks")),
    ("full_body", ("walks", "walking", "runs", "running", "dances", "dancing", "jumps", "stands", "standing",
                   "climbs", "wears", "outfit")),
)
_CLAUSE_SPLITS = ("; ", ", then ", ", and ", ", but ", " while ", " and then ", " and ", " but ", ", so ", ", ")
# Shot coverage: a beat shown again from another framing, in this order (persons first).
COVERAGE = ("wide", "medium", "close_up", "full_body")
PERSON_SHOTS = {"close_up", "full_body"}  # framings of a person: a place or thing gets wide or medium


class PlannerError(StageError):
    """The planner could not produce a valid scene list (message names the spec key / field)."""


@dataclass
class Scene:
    """One storyboard scene. ``index`` counts from 1 (frame numbers in key_frames use it)."""

    index: int
    text: str
    shot: str
    prompt: str
    source: str  # manual | rules | llm
    control_image: str | None = None  # project-relative path of a pose/edge map (guided mode)
    hero: bool = True  # the character is in this scene (trigger, traits and the identity check)
    hero_reason: str = ""  # why (runner.generate.presence, the spec or the LLM)
    subject: str | None = None  # the scene's subject as written

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- prompts


def character_phrase(character: dict[str, Any]) -> str:
    trigger = str(character.get("trigger", "")).strip()
    class_word = str(character.get("class_word", "person")).strip()
    return f"{trigger} {class_word}".strip()


def scene_prompt(text: str, shot: str, character: dict[str, Any], style_prompt: str = "", hero: bool = True) -> str:
    """The frame prompt for a scene: who, framing, what happens, fixed traits, style. A scene
    without the character has no trigger, class word or traits."""
    traits = [t for t in ((character.get("traits") or {}).get("fixed") or []) if t] if hero else []
    who = f"{character_phrase(character)}, " if hero else ""
    parts = [f"{who}{SHOT_PHRASES.get(shot, shot.replace('_', ' '))}", text.strip().rstrip(" .!?;,")]
    if traits:
        parts.append(", ".join(traits))
    if style_prompt.strip():
        parts.append(style_prompt.strip())
    return ", ".join(p for p in parts if p)


def _explicit_prompt(prompt: str, character: dict[str, Any], hero: bool = True) -> str:
    trigger = str(character.get("trigger", "")).strip()
    if hero and trigger and trigger.lower() not in prompt.lower():
        return f"{character_phrase(character)}, {prompt.strip()}"
    return prompt.strip()


# --------------------------------------------------------------------------- rules planner


def split_sentences(story: str) -> list[str]:
    text = " ".join(story.split())
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])", text)
    return [p.strip() for p in parts if p.strip(" .")]


def _split_clause(beat: str) -> tuple[str, str] | None:
    """Split a beat at its most central clause boundary; None when it has none."""
    best: tuple[int, int, str] | None = None
    for sep in _CLAUSE_SPLITS:
        start = 0
        while (i := beat.find(sep, start)) != -1:
            left, right = beat[:i].strip(" ,;"), beat[i + len(sep):].strip(" ,;")
            if len(left.split()) >= 3 and len(right.split()) >= 3:
                balance = abs(len(left) - len(right))
                if best is None or balance < best[0]:
                    best = (balance, i, sep)
            start = i + 1
    if best is None:
        return None
    _, i, sep = best
    left, right = beat[:i].strip(" ,;"), beat[i + len(sep):].strip(" ,;")
    if not left.endswith((".", "!", "?")):
        left += "."
    right = right[:1].upper() + right[1:]
    return left, right


def story_beats(story: str, min_scenes: int, max_scenes: int) -> list[str]:
    beats = split_sentences(story)
    while len(beats) < min_scenes:
        order = sorted(range(len(beats)), key=lambda i: -len(beats[i]))
        for i in order:
            split = _split_clause(beats[i])
            if split:
                beats[i:i + 1] = list(split)
                break
        else:
            break  # nothing left to split: fewer beats than min_scenes (reported by the caller)
    while len(beats) > max_scenes:
        i = min(range(len(beats) - 1), key=lambda j: len(beats[j]) + len(beats[j + 1]))
        beats[i:i + 2] = [beats[i].rstrip(".") + "; " + beats[i + 1][:1].lower() + beats[i + 1][1:]]
    return beats


def shot_for(text: str, position: int, person: bool = True) -> str:
    """The shot by keyword (:data:`SHOT_KEYWORDS`); a scene of a place or thing (``person``
    False) gets no close-up or full-body shot: medium instead, and wide by default."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    for shot, keys in SHOT_KEYWORDS:
        if words.intersection(keys):
            return shot if person or shot not in PERSON_SHOTS else "medium"
    return "wide" if position == 0 or not person else "medium"


def covered(rows: list[tuple[str, str, Presence]], n: int) -> list[tuple[str, str, Presence]]:
    """Shot coverage: while there are fewer than ``n`` rows, the beat with the fewest shots (the
    earliest on a tie) is shown once more, from the next framing of :data:`COVERAGE` it has not
    had (wide and medium only for a place or thing), right after its other shots."""
    groups = [[r] for r in rows]
    while groups and sum(len(g) for g in groups) < n:
        g = min(groups, key=len)
        text, _, pres = g[0]
        options = [s for s in COVERAGE if pres.hero or pres.subject_is_person or s not in PERSON_SHOTS]
        used = [r[1] for r in g]
        fresh = [s for s in options if s not in used] or [options[len(used) % len(options)]]
        g.append((text, fresh[0], pres))
    return [r for g in groups for r in g]


def rules_scenes(story: str, character: dict[str, Any], min_scenes: int,
                 max_scenes: int) -> tuple[list[tuple[str, str, Presence]], list[str]]:
    """[(beat, shot, presence)] and the notes saying how a short story was split."""
    sentences = split_sentences(story)
    beats = story_beats(story, min_scenes, max_scenes)
    presence = hero_presence(beats, character, story)
    rows = [(b, shot_for(b, i, p.hero or p.subject_is_person), p) for i, (b, p) in enumerate(zip(beats, presence))]
    if len(sentences) >= min_scenes:
        return rows, []
    rows = covered(rows, min_scenes)
    extra = len(rows) - len(beats)
    note = (f"generate.storyboard.story has {len(sentences)} sentence(s), fewer than min_scenes ({min_scenes}): "
            f"split into {len(beats)} beat(s) at clause boundaries")
    if extra:
        note += f", and {extra} more shot(s) of the same beats (shot coverage)"
    return rows, [note + " (short_story: split; short_story: llm asks the LLM planner instead)"]


# --------------------------------------------------------------------------- entry point


@dataclass
class StoryPlan:
    """What the planner decided: the scenes (empty while the LLM is still to be asked), the
    planner that makes them, and notes saying how (a short story split or sent to the LLM)."""

    scenes: list[Scene]
    planner: str
    notes: list[str]
    llm_exchange: dict[str, Any] | None = None


def _manual_scenes(sb: dict[str, Any], character: dict[str, Any], style: str) -> list[Scene]:
    listed = sb.get("scenes") or []
    if not listed:
        raise PlannerError("generate.storyboard.scenes: planner 'manual' needs a list of scenes",
                           hint="List scenes as {text: ..., shot: close_up|medium|full_body|wide}.")
    presence = hero_presence([s["text"] for s in listed], character)
    trigger = str(character.get("trigger", "")).lower()
    scenes = []
    for i, (s, pres) in enumerate(zip(listed, presence)):
        hero, why = pres.hero, pres.reason
        if s.get("hero") is not None:
            hero, why = bool(s["hero"]), f"scenes[{i}].hero is {str(bool(s['hero'])).lower()} in the spec"
        elif s.get("prompt") and trigger and trigger in str(s["prompt"]).lower():
            hero, why = True, "its prompt has the trigger"
        shot = s.get("shot") or "medium"
        prompt = (_explicit_prompt(s["prompt"], character, hero) if s.get("prompt")
                  else scene_prompt(s["text"], shot, character, style, hero))
        scenes.append(Scene(i + 1, s["text"], shot, prompt, "manual", s.get("control_image"), hero, why, pres.subject))
    return scenes


def plan_story(spec_data: dict[str, Any], *, allow_llm: bool = True) -> StoryPlan:
    """The storyboard of a resolved spec (``generate.storyboard`` must be present).

    With ``allow_llm=False`` scenes the LLM planner would make are not asked for: the plan has
    planner ``llm`` and no scenes (the stage asks at run time; the preview says so)."""
    sb = (spec_data.get("generate") or {}).get("storyboard")
    if not isinstance(sb, dict):
        raise PlannerError("the spec has no generate.storyboard section",
                           hint="Add generate.storyboard (story + planner) to the spec.")
    character = spec_data.get("character") or {}
    planner = sb.get("planner", "rules")
    min_s, max_s = int(sb.get("min_scenes", 6)), int(sb.get("max_scenes", 10))
    style = sb.get("style_prompt", "") or ""
    if planner == "manual":
        return StoryPlan(_manual_scenes(sb, character, style), "manual", [])
    story = sb.get("story", "") or ""
    if not story.strip():
        raise PlannerError(f"generate.storyboard.story: planner '{planner}' needs a story",
                           hint="Write the story text under generate.storyboard.story.")
    notes: list[str] = []
    if planner == "rules" and sb.get("short_story", "split") == "llm" and len(split_sentences(story)) < min_s:
        notes.append(f"generate.storyboard.story has {len(split_sentences(story))} sentence(s), fewer than "
                     f"min_scenes ({min_s}): the LLM planner makes the scenes (short_story: llm)")
        planner = "llm"
    if planner == "rules":
        rows, notes = rules_scenes(story, character, min_s, max_s)
        return StoryPlan([Scene(i + 1, text, shot, scene_prompt(text, shot, character, style, p.hero), "rules",
                                hero=p.hero, hero_reason=p.reason, subject=p.subject)
                          for i, (text, shot, p) in enumerate(rows)], "rules", notes)
    if planner != "llm":
        raise PlannerError(f"generate.storyboard.planner: unknown planner {planner!r}",
                           hint="Use manual, rules or llm.")
    if not allow_llm:
        return StoryPlan([], "llm", notes)
    from runner.generate.llm_planner import call_llm_planner

    rows, exchange = call_llm_planner(story, character, sb.get("llm") or {}, min_s, max_s)
    scenes = [Scene(i + 1, r["text"], r["shot"], scene_prompt(r["prompt"], r["shot"], character, style, r["hero"]),
                    "llm", hero=r["hero"], hero_reason="the LLM planner's answer") for i, r in enumerate(rows)]
    return StoryPlan(scenes, "llm", notes, exchange)


def plan_scenes(spec_data: dict[str, Any], *, allow_llm: bool = True,
                llm_exchange: dict[str, Any] | None = None) -> list[Scene]:
    """The storyboard's scenes (:func:`plan_story`). ``allow_llm=False`` makes scenes that only
    the LLM planner can make raise :class:`PlannerError` instead of calling the network (the
    plan preview). ``llm_exchange``, when given, receives the request/answer record."""
    plan = plan_story(spec_data, allow_llm=allow_llm)
    if plan.planner == "llm" and not plan.scenes:
        raise PlannerError("planner 'llm' asks a chat endpoint for the scenes; the preview does not call it",
                           hint="Run `runner storyboard-preview --llm SPEC` to call the endpoint now.")
    if llm_exchange is not None and plan.llm_exchange:
        llm_exchange.update(plan.llm_exchange)
    return plan.scenes


def format_scenes(scenes: list[Scene], notes: list[str] | None = None) -> str:
    """A plain-text table of scenes, with whether the character is in each and why (the CLI preview)."""
    lines = [f"  note: {n}" for n in notes or []]
    for s in scenes:
        lines.append(f"{s.index:>3}. [{s.shot}] {s.text}")
        lines.append(f"     character: {'in' if s.hero else 'not in'} the scene ({s.hero_reason or 'as planned'})")
        lines.append(f"     prompt: {s.prompt}")
    return "\n".join(lines)
