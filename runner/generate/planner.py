"""Story -> scenes: the storyboard planners.

``plan_scenes(spec_data)`` returns the list of :class:`Scene` s for a resolved spec's
``generate.storyboard`` section. Three planners:

``manual``
    The scenes listed in ``generate.storyboard.scenes`` (text, shot, optional prompt), in order.
``rules``
    The story is split into beats: sentences first; while there are fewer than ``min_scenes``,
    the longest beat is split at its last clause boundary (``;``, ``, then``, ``, and``,
    `` while ``, `` and ``, ``,``); while there are more than ``max_scenes``, the shortest
    neighbouring pair is merged. Each beat gets a shot by keyword (:data:`SHOT_KEYWORDS`: faces
    and feelings -> close_up, journeys and places -> wide, ...; the first beat defaults to a
    wide establishing shot, the others to medium).
``llm``
    Any OpenAI-compatible ``/chat/completions`` endpoint (``llm.base_url``, ``llm.model``, the key
    in the environment variable named by ``llm.api_key_env``). The answer is requested as JSON
    (``response_format``) and validated with jsonschema against :func:`scene_list_schema`; an
    answer that does not fit raises :class:`PlannerError` naming the field.

Whatever the planner, every scene's prompt is written by :func:`scene_prompt`: trigger token and
class word, shot framing, the scene text, the character's fixed traits, the style prompt.
A scene with an explicit ``prompt`` keeps it (the trigger is prepended when missing).

``manual`` and ``rules`` are pure functions of the spec (``runner storyboard-preview`` prints
them without a GPU); ``llm`` makes one HTTP request.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from runner.stages.base import StageError

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
_CLAUSE_SPLITS = ("; ", ", then ", ", and ", " while ", " and then ", " and ", ", ")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- prompts


def character_phrase(character: dict[str, Any]) -> str:
    trigger = str(character.get("trigger", "")).strip()
    class_word = str(character.get("class_word", "person")).strip()
    return f"{trigger} {class_word}".strip()


def scene_prompt(text: str, shot: str, character: dict[str, Any], style_prompt: str = "") -> str:
    """The frame prompt for a scene: who, framing, what happens, fixed traits, style."""
    traits = [t for t in ((character.get("traits") or {}).get("fixed") or []) if t]
    parts = [f"{character_phrase(character)}, {SHOT_PHRASES.get(shot, shot.replace('_', ' '))}",
             text.strip().rstrip(" .!?;,")]
    if traits:
        parts.append(", ".join(traits))
    if style_prompt.strip():
        parts.append(style_prompt.strip())
    return ", ".join(p for p in parts if p)


def _explicit_prompt(prompt: str, character: dict[str, Any]) -> str:
    trigger = str(character.get("trigger", "")).strip()
    if trigger and trigger.lower() not in prompt.lower():
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


def shot_for(text: str, position: int) -> str:
    words = set(re.findall(r"[a-z]+", text.lower()))
    for shot, keys in SHOT_KEYWORDS:
        if words.intersection(keys):
            return shot
    return "wide" if position == 0 else "medium"


def rules_scenes(story: str, min_scenes: int, max_scenes: int) -> list[tuple[str, str]]:
    beats = story_beats(story, min_scenes, max_scenes)
    if len(beats) < min_scenes:
        raise PlannerError(
            f"generate.storyboard.story: the rules planner found {len(beats)} beat(s), fewer than "
            f"min_scenes ({min_scenes})",
            hint="Write the story in more sentences (one per scene), lower min_scenes, or list the scenes "
            "yourself with planner: manual.",
        )
    return [(b, shot_for(b, i)) for i, b in enumerate(beats)]


# --------------------------------------------------------------------------- llm planner


def scene_list_schema(min_scenes: int, max_scenes: int) -> dict[str, Any]:
    """JSON Schema of the LLM's answer: {"scenes": [{"text": str, "shot": one of SHOTS}, ...]}."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["scenes"],
        "properties": {
            "scenes": {
                "type": "array",
                "minItems": int(min_scenes),
                "maxItems": int(max_scenes),
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["text", "shot"],
                    "properties": {
                        "text": {"type": "string", "minLength": 1},
                        "shot": {"type": "string", "enum": list(SHOTS)},
                    },
                },
            }
        },
    }


def _llm_messages(story: str, character: dict[str, Any], min_scenes: int, max_scenes: int) -> list[dict[str, str]]:
    name = character.get("display_name") or character.get("name") or "the character"
    system = (
        "You turn a story into a storyboard. Answer with JSON only: an object with a key 'scenes', "
        f"a list of {min_scenes} to {max_scenes} scenes in story order. Each scene has 'text' (one sentence: "
        "what is seen in that frame, with the main character in it) and 'shot', one of "
        + ", ".join(SHOTS) + "."
    )
    desc = character.get("description") or ""
    user = f"Main character: {name}. {desc}\n\nStory:\n{story.strip()}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _schema_error_path(err: Any) -> str:
    path = "answer"
    for part in err.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_scene_list(answer: Any, min_scenes: int, max_scenes: int) -> list[tuple[str, str]]:
    """Validate a parsed LLM answer; returns [(text, shot)] or raises PlannerError naming the field."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(scene_list_schema(min_scenes, max_scenes))
    errors = list(validator.iter_errors(answer))
    if errors:
        # A missing required field says more than the extra one next to it.
        err = min(errors, key=lambda e: (e.validator != "required", len(e.absolute_path)))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise PlannerError(
            f"generate.storyboard.llm: the model's answer does not fit the scene-list schema at "
            f"{_schema_error_path(err)}: {err.message}{more}",
            hint="Use a model that supports JSON output (response_format), or plan the scenes with "
            "planner: rules / manual.",
        )
    return [(s["text"].strip(), s["shot"]) for s in answer["scenes"]]


def call_llm_planner(story: str, character: dict[str, Any], llm: dict[str, Any], min_scenes: int,
                     max_scenes: int) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Ask an OpenAI-compatible chat endpoint for the scenes. Returns (scenes, exchange record)."""
    import httpx

    env = llm.get("api_key_env", "OPENAI_API_KEY")
    key = os.environ.get(env, "")
    if not key:
        raise PlannerError(
            f"generate.storyboard.llm.api_key_env: the environment variable {env} is not set",
            hint=f"export {env}=... (the API key of {llm.get('base_url')}), or use planner: rules.",
        )
    base_url = str(llm.get("base_url", "https://api.openai.com/v1")).rstrip("/")
    fmt = llm.get("response_format", "json_schema")
    if fmt == "json_schema":
        response_format: dict[str, Any] = {"type": "json_schema", "json_schema": {
            "name": "scene_list", "strict": True, "schema": scene_list_schema(min_scenes, max_scenes)}}
    else:
        response_format = {"type": "json_object"}
    body = {
        "model": llm.get("model", "gpt-4o-mini"),
        "messages": _llm_messages(story, character, min_scenes, max_scenes),
        "response_format": response_format,
        "temperature": float(llm.get("temperature", 0.2)),
    }
    url = f"{base_url}/chat/completions"
    try:
        resp = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=float(llm.get("timeout_s", 60)))
    except httpx.TimeoutException:
        raise PlannerError(f"generate.storyboard.llm: no answer from {url} within {llm.get('timeout_s', 60)} s",
                           hint="Raise llm.timeout_s or check the endpoint.") from None
    except httpx.HTTPError as exc:
        raise PlannerError(f"generate.storyboard.llm: cannot reach {url}: {exc}",
                           hint="Check llm.base_url and the network.") from None
    if resp.status_code != 200:
        raise PlannerError(f"generate.storyboard.llm: {url} answered HTTP {resp.status_code}: {resp.text[:300]}",
                           hint=f"Check llm.model and the key in {env}.")
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise PlannerError(f"generate.storyboard.llm: {url} did not answer in the chat-completions format "
                           f"(choices[0].message.content): {resp.text[:300]}",
                           hint="llm.base_url must point at an OpenAI-compatible API (ending in /v1).") from None
    try:
        answer = json.loads(content)
    except (TypeError, json.JSONDecodeError) as exc:
        raise PlannerError(f"generate.storyboard.llm: the model's answer is not JSON ({exc}): {str(content)[:200]}",
                           hint="Use a model that supports response_format JSON.") from None
    scenes = validate_scene_list(answer, min_scenes, max_scenes)
    return scenes, {"url": url, "model": body["model"], "response_format": fmt, "answer": answer}


# --------------------------------------------------------------------------- entry point


def plan_scenes(spec_data: dict[str, Any], *, allow_llm: bool = True,
                llm_exchange: dict[str, Any] | None = None) -> list[Scene]:
    """The storyboard's scenes for a resolved spec (``generate.storyboard`` must be present).

    ``allow_llm=False`` makes planner ``llm`` raise :class:`PlannerError` instead of calling the
    network (the plan preview). ``llm_exchange``, when given, receives the request/answer record.
    """
    sb = (spec_data.get("generate") or {}).get("storyboard")
    if not isinstance(sb, dict):
        raise PlannerError("the spec has no generate.storyboard section",
                           hint="Add generate.storyboard (story + planner) to the spec.")
    character = spec_data.get("character") or {}
    planner = sb.get("planner", "rules")
    min_s, max_s = int(sb.get("min_scenes", 6)), int(sb.get("max_scenes", 10))
    style = sb.get("style_prompt", "") or ""
    scenes: list[Scene] = []
    if planner == "manual":
        listed = sb.get("scenes") or []
        if not listed:
            raise PlannerError("generate.storyboard.scenes: planner 'manual' needs a list of scenes",
                               hint="List scenes as {text: ..., shot: close_up|medium|full_body|wide}.")
        for i, s in enumerate(listed):
            shot = s.get("shot") or "medium"
            prompt = _explicit_prompt(s["prompt"], character) if s.get("prompt") else scene_prompt(s["text"], shot, character, style)
            scenes.append(Scene(i + 1, s["text"], shot, prompt, "manual", s.get("control_image")))
        return scenes
    story = sb.get("story", "") or ""
    if not story.strip():
        raise PlannerError(f"generate.storyboard.story: planner '{planner}' needs a story",
                           hint="Write the story text under generate.storyboard.story.")
    if planner == "rules":
        pairs = rules_scenes(story, min_s, max_s)
    elif planner == "llm":
        if not allow_llm:
            raise PlannerError("planner 'llm' asks a chat endpoint for the scenes; the preview does not call it",
                               hint="Run `runner storyboard-preview --llm SPEC` to call the endpoint now.")
        pairs, exchange = call_llm_planner(story, character, sb.get("llm") or {}, min_s, max_s)
        if llm_exchange is not None:
            llm_exchange.update(exchange)
    else:
        raise PlannerError(f"generate.storyboard.planner: unknown planner {planner!r}",
                           hint="Use manual, rules or llm.")
    return [Scene(i + 1, text, shot, scene_prompt(text, shot, character, style), planner)
            for i, (text, shot) in enumerate(pairs)]


def format_scenes(scenes: list[Scene]) -> str:
    """A plain-text table of scenes (for the CLI preview)."""
    lines = []
    for s in scenes:
        lines.append(f"{s.index:>3}. [{s.shot}] {s.text}")
        lines.append(f"     prompt: {s.prompt}")
    return "\n".join(lines)
