"""The ``llm`` storyboard planner: any OpenAI-compatible ``/chat/completions`` endpoint.

Two requests, each answered as JSON and validated with jsonschema:

1. **Scenes** (:func:`scene_list_schema`): ``{"scenes": [{"text", "description", "hero", "shot"}]}``,
   ``min_scenes`` to ``max_scenes`` of them in story order. ``text`` is the part of the story the
   frame shows; ``description`` is that frame described simply for an image model: one clear
   action, the people facing the viewer (a front view), a concrete setting, no names (the main
   character is "the <class word>"); ``hero`` says whether the main character is in the frame.
2. **Prompt refinement** (:func:`prompt_list_schema`, ``llm.refine_prompts``, on by default):
   the scenes are sent back and each description is rewritten as a short text-to-image prompt
   (comma-separated visual phrases, front-facing, at most 40 words, no names and no framing words:
   the runner adds the trigger, the shot and the style). ``{"prompts": [str, ...]}``, one per scene.

An answer that is not JSON or does not fit its schema is asked for once more, with the
validation error quoted; a second miss is a :class:`PlannerError` naming the field. The key is
read from the environment variable ``llm.api_key_env``; it never appears in a spec or a record.
"""

from __future__ import annotations

import json
import os
from typing import Any

from runner.generate.planner import SHOTS, PlannerError


def scene_list_schema(min_scenes: int, max_scenes: int) -> dict[str, Any]:
    """JSON Schema of the scene answer (see the module docstring)."""
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
                    "required": ["text", "description", "hero", "shot"],
                    "properties": {
                        "text": {"type": "string", "minLength": 1},
                        "description": {"type": "string", "minLength": 1},
                        "hero": {"type": "boolean"},
                        "shot": {"type": "string", "enum": list(SHOTS)},
                    },
                },
            }
        },
    }


def prompt_list_schema(n: int) -> dict[str, Any]:
    """JSON Schema of the refinement answer: exactly ``n`` prompts."""
    return {"type": "object", "additionalProperties": False, "required": ["prompts"],
            "properties": {"prompts": {"type": "array", "minItems": n, "maxItems": n,
                                       "items": {"type": "string", "minLength": 1}}}}


def _who(character: dict[str, Any]) -> tuple[str, str]:
    name = character.get("display_name") or character.get("name") or "the character"
    aliases = [a for a in character.get("aliases") or [] if a]
    also = f" (also called {', '.join(aliases)})" if aliases else ""
    pronouns = f", pronouns {character['pronouns']}" if character.get("pronouns") else ""
    return f"{name}{also}{pronouns}", f"the {character.get('class_word') or 'person'}"


def scene_messages(story: str, character: dict[str, Any], min_scenes: int, max_scenes: int) -> list[dict[str, str]]:
    name, stand_in = _who(character)
    system = (
        "You turn a story into a storyboard. Answer with JSON only: an object with a key 'scenes', "
        f"a list of {min_scenes} to {max_scenes} scenes in story order. Each scene has 'text' (the part of "
        "the story the frame shows, one sentence), 'description' (the frame described simply for an image "
        "model, one sentence: one clear action, every person facing the viewer in a front view, a concrete "
        f"setting; no names: call the main character '{stand_in}'), 'hero' (true when the main character "
        "is in the frame, false when the frame shows only other people, places or things) and 'shot', one of "
        + ", ".join(SHOTS) + "."
    )
    desc = character.get("description") or ""
    user = f"Main character: {name}, {stand_in}. {desc}\n\nStory:\n{story.strip()}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def refine_messages(scenes: list[dict[str, Any]], character: dict[str, Any]) -> list[dict[str, str]]:
    _, stand_in = _who(character)
    system = (
        "You refine storyboard frame descriptions into text-to-image prompts. For each scene write one "
        "prompt: comma-separated visual phrases, a simplified front-facing view, concrete details (pose, "
        "expression, clothing, setting, light), at most 40 words, no names (the main character is "
        f"'{stand_in}'), no shot or camera words (the framing is added separately). Answer with JSON only: "
        "an object with a key 'prompts', one prompt per scene, in order."
    )
    rows = [{"scene": i + 1, "description": s["description"], "shot": s["shot"], "main_character_in_frame": s["hero"]}
            for i, s in enumerate(scenes)]
    return [{"role": "system", "content": system}, {"role": "user", "content": json.dumps(rows, indent=1)}]


def schema_problem(answer: Any, schema: dict[str, Any]) -> str | None:
    """None when ``answer`` fits ``schema``; else where and what (the most telling error first)."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(answer))
    if not errors:
        return None
    # A missing required field says more than the extra one next to it.
    err = min(errors, key=lambda e: (e.validator != "required", len(e.absolute_path)))
    path = "answer" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"at {path}: {err.message}{more}"


class Endpoint:
    """One chat endpoint from ``generate.storyboard.llm`` (errors name the spec key)."""

    def __init__(self, llm: dict[str, Any]) -> None:
        self.env = llm.get("api_key_env", "OPENAI_API_KEY")
        self.key = os.environ.get(self.env, "")
        if not self.key:
            raise PlannerError(
                f"generate.storyboard.llm.api_key_env: the environment variable {self.env} is not set",
                hint=f"export {self.env}=... (the API key of {llm.get('base_url')}), or use planner: rules.",
            )
        self.url = str(llm.get("base_url", "https://api.openai.com/v1")).rstrip("/") + "/chat/completions"
        self.model = llm.get("model", "gpt-4o-mini")
        self.format = llm.get("response_format", "json_schema")
        self.temperature = float(llm.get("temperature", 0.2))
        self.timeout = float(llm.get("timeout_s", 60))
        self.requests = 0

    def post(self, messages: list[dict[str, str]], name: str, schema: dict[str, Any]) -> str:
        """One request; the answer's message content."""
        import httpx

        if self.format == "json_schema":
            fmt: dict[str, Any] = {"type": "json_schema",
                                   "json_schema": {"name": name, "strict": True, "schema": schema}}
        else:
            fmt = {"type": "json_object"}
        body = {"model": self.model, "messages": messages, "response_format": fmt, "temperature": self.temperature}
        self.requests += 1
        try:
            resp = httpx.post(self.url, json=body, headers={"Authorization": f"Bearer {self.key}"},
                              timeout=self.timeout)
        except httpx.TimeoutException:
            raise PlannerError(f"generate.storyboard.llm: no answer from {self.url} within {self.timeout:g} s",
                               hint="Raise llm.timeout_s or check the endpoint.") from None
        except httpx.HTTPError as exc:
            raise PlannerError(f"generate.storyboard.llm: cannot reach {self.url}: {exc}",
                               hint="Check llm.base_url and the network.") from None
        if resp.status_code != 200:
            raise PlannerError(f"generate.storyboard.llm: {self.url} answered HTTP {resp.status_code}: "
                               f"{resp.text[:300]}",
                               hint=f"Check llm.model and the key in {self.env}.")
        try:
            return resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PlannerError(f"generate.storyboard.llm: {self.url} did not answer in the chat-completions format "
                               f"(choices[0].message.content): {resp.text[:300]}",
                               hint="llm.base_url must point at an OpenAI-compatible API (ending in /v1).") from None

    def ask_json(self, messages: list[dict[str, str]], name: str, schema: dict[str, Any]) -> tuple[Any, int]:
        """The parsed answer that fits ``schema`` and how many retries it took (0 or 1)."""
        messages = list(messages)
        for attempt in range(2):
            content = self.post(messages, name, schema)
            try:
                answer = json.loads(content)
            except (TypeError, json.JSONDecodeError) as exc:
                problem, answer = f"is not JSON ({exc}): {str(content)[:200]}", None
            else:
                problem = schema_problem(answer, schema)
                problem = None if problem is None else f"does not fit the {name} schema {problem}"
            if problem is None:
                return answer, attempt
            if attempt == 0:
                messages += [{"role": "assistant", "content": str(content)},
                             {"role": "user", "content": f"Your answer {problem}. Answer again with JSON only, "
                                                         "fitting the schema."}]
        raise PlannerError(f"generate.storyboard.llm: the model's answer {problem} (asked twice; the retry quoted "
                           "the error)",
                           hint="Use a model that supports JSON output (response_format), or plan the scenes with "
                           "planner: rules / manual.")


def call_llm_planner(story: str, character: dict[str, Any], llm: dict[str, Any], min_scenes: int,
                     max_scenes: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scenes ``{text, shot, hero, description, prompt}`` from the endpoint, and the exchange record."""
    ep = Endpoint(llm)
    answer, retried = ep.ask_json(scene_messages(story, character, min_scenes, max_scenes), "scene_list",
                                  scene_list_schema(min_scenes, max_scenes))
    scenes = [{k: (v.strip() if isinstance(v, str) else v) for k, v in s.items()} for s in answer["scenes"]]
    record: dict[str, Any] = {"url": ep.url, "model": ep.model, "response_format": ep.format, "answer": answer,
                              "retries": {"scene_list": retried}}
    for s in scenes:
        s["prompt"] = s["description"]
    if llm.get("refine_prompts", True):
        refined, retried = ep.ask_json(refine_messages(scenes, character), "prompt_list",
                                       prompt_list_schema(len(scenes)))
        for s, p in zip(scenes, refined["prompts"]):
            s["prompt"] = p.strip()
        record["refined"] = refined
        record["retries"]["prompt_list"] = retried
    record["requests"] = ep.requests
    return scenes, record
