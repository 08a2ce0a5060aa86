"""Storyboard planners: manual and rules as pure functions, llm against a loopback
OpenAI-compatible server started by the test (http.server in a thread)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from runner.generate import planner as P

CHARACTER = {"name": "aldar", "display_name": "Aldar Kose", "trigger": "aldrkse", "class_word": "man",
             "traits": {"fixed": ["fox-fur hat", "beardless face"]}}
STORY = ("Aldar Kose rides into a steppe village on his old horse. He meets a greedy bai who refuses to share his "
         "tea. Aldar tells the bai of a magic fur coat that keeps the wearer warm in any frost. The bai trades his "
         "best horse and coat for it. Aldar rides away laughing across the snowy steppe while the bai shivers in "
         "the worn coat.")


def spec(**sb: Any) -> dict:
    base = {"planner": "rules", "story": STORY, "min_scenes": 6, "max_scenes": 8, "style_prompt": "storybook",
            "scenes": [], "llm": {}}
    base.update(sb)
    return {"character": CHARACTER, "generate": {"storyboard": base}}


def test_rules_planner_beats_shots_and_prompts() -> None:
    scenes = P.plan_scenes(spec())
    assert 6 <= len(scenes) <= 8 and [s.index for s in scenes] == list(range(1, len(scenes) + 1))
    assert scenes[0].text.startswith("Aldar Kose rides into a steppe village") and scenes[0].shot == "wide"
    for s in scenes:
        assert s.prompt.endswith("storybook") and s.source == "rules" and s.hero_reason
        if s.hero:
            assert s.prompt.startswith("aldrkse man, ") and "fox-fur hat, beardless face" in s.prompt
        else:  # no trigger, no class word, no traits: the frame is not of him
            assert "aldrkse" not in s.prompt and "fox-fur hat" not in s.prompt and " man," not in s.prompt
    # the scene: the bai shivers; the hero is not in it, and it is a close-up of the bai
    shiver = next(s for s in scenes if "shivers" in s.text)
    assert not shiver.hero and shiver.subject == "the bai" and shiver.shot == "close_up"
    assert shiver.prompt == "close-up portrait, The bai shivers in the worn coat, storybook"
    assert [s.hero for s in scenes] == [True, True, True, False, True, False]
    # deterministic, and the whole story is covered in order
    assert [s.to_dict() for s in P.plan_scenes(spec())] == [s.to_dict() for s in scenes]
    joined = " ".join(s.text for s in scenes)
    assert joined.index("greedy bai") < joined.index("magic fur coat") < joined.index("shivers")
    # more beats than max_scenes: neighbours are merged
    assert len(P.plan_scenes(spec(min_scenes=2, max_scenes=3))) == 3


ONE_LINERS = [
    "He sleeps.",
    "Aldar rides to the bazaar, trades his hat for a melon and laughs all the way home.",
    "Aldar wakes before dawn and feeds his horse while the bai snores in his yurt; then he rides off.",
    "The wind howls over the empty steppe",
    "Aldar smiles",
]


@pytest.mark.parametrize("story", ONE_LINERS)
@pytest.mark.parametrize("min_s, max_s", [(1, 1), (3, 4), (6, 8), (8, 10)])
def test_one_line_story_is_split_into_the_scene_range(story: str, min_s: int, max_s: int) -> None:
    """short_story: split (the default) turns any one-line story into min..max scenes, in story
    order, and says how; a place or thing never gets a close-up."""
    plan = P.plan_story(spec(story=story, min_scenes=min_s, max_scenes=max_s))
    assert plan.planner == "rules" and min_s <= len(plan.scenes) <= max_s
    assert [s.index for s in plan.scenes] == list(range(1, len(plan.scenes) + 1))
    words = [w.strip(".,;") for s in plan.scenes for w in s.text.lower().split()]
    assert set(words) <= set(story.lower().replace(",", "").replace(";", "").replace(".", "").split())
    if min_s > 1:
        assert plan.notes and "fewer than min_scenes" in plan.notes[0] and "short_story: split" in plan.notes[0]
    else:
        assert not plan.notes
    for s in plan.scenes:
        if not s.hero and s.subject and "wind" in s.subject:
            assert s.shot in ("wide", "medium")
    # same beat shown again: a different framing first
    texts = [s.text for s in plan.scenes]
    for t in set(texts):
        shots = [s.shot for s in plan.scenes if s.text == t]
        assert len(set(shots)) == min(len(shots), 4 if any(s.hero for s in plan.scenes if s.text == t) else 2)


def test_one_line_story_can_go_to_the_llm_planner() -> None:
    plan = P.plan_story(spec(story="He sleeps.", min_scenes=3, short_story="llm"), allow_llm=False)
    assert plan.planner == "llm" and plan.scenes == []
    assert "the LLM planner makes the scenes (short_story: llm)" in plan.notes[0]
    with pytest.raises(P.PlannerError, match="preview does not call it"):
        P.plan_scenes(spec(story="He sleeps.", min_scenes=3, short_story="llm"), allow_llm=False)
    # enough sentences: the rules planner, whatever short_story says
    assert P.plan_story(spec(short_story="llm", min_scenes=3)).planner == "rules"


def test_format_scenes_says_who_is_in_each_scene() -> None:
    plan = P.plan_story(spec())
    text = P.format_scenes(plan.scenes, plan.notes)
    assert "character: not in the scene (its subject is 'the bai', another character" in text
    assert "character: in the scene (names the character ('aldar kose'))" in text


def test_manual_planner_keeps_order_and_explicit_prompts() -> None:
    scenes = P.plan_scenes(spec(planner="manual", scenes=[
        {"text": "Aldar grins.", "shot": "close_up"},
        {"text": "A wide steppe.", "shot": "wide", "prompt": "empty steppe at dawn"},
        {"text": "Aldar with hat.", "prompt": "aldrkse man in a hat"},
        {"text": "The horse waits.", "prompt": "a horse by a yurt", "hero": True},
        {"text": "He grins.", "hero": False},
    ]))
    assert [s.shot for s in scenes] == ["close_up", "wide", "medium", "medium", "medium"]
    assert scenes[0].prompt == "aldrkse man, close-up portrait, Aldar grins, fox-fur hat, beardless face, storybook"
    assert scenes[1].prompt == "empty steppe at dawn" and not scenes[1].hero  # no hero: no trigger added
    assert scenes[2].prompt == "aldrkse man in a hat" and scenes[2].hero
    assert scenes[3].prompt == "aldrkse man, a horse by a yurt" and "scenes[3].hero is true" in scenes[3].hero_reason
    assert scenes[4].prompt == "medium shot, He grins, storybook" and not scenes[4].hero
    with pytest.raises(P.PlannerError, match="needs a list of scenes"):
        P.plan_scenes(spec(planner="manual", scenes=[]))


class _Server:
    """A tiny OpenAI-compatible /v1/chat/completions endpoint on 127.0.0.1 (answers are queued)."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = outer.answers.pop(0)
                raw = isinstance(content, bytes) or status != 200
                payload = content.decode() if isinstance(content, bytes) else content if raw else {
                    "id": "x", "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}]}
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def _llm_spec(server: _Server, **llm: Any) -> dict:
    return spec(planner="llm", min_scenes=2, max_scenes=4,
                llm={"base_url": server.url, "model": "tiny-planner", "api_key_env": "TEST_PLANNER_KEY",
                     "timeout_s": 5, **llm})


SCENES = {"scenes": [{"text": "Aldar arrives on his horse.",
                      "description": "a man on a horse faces the viewer in a village",
                       "hero": True, "shot": "wide"},
                      {"text": "The bai shivers.", "description": "an old man in a thin coat shivers, front view",
                       "hero": False, "shot": "close_up"}]}
PROMPTS = {"prompts": ["man riding a brown horse, front view, snowy village, morning light",
                       "old man shivering, worn thin coat, front view, frost"]}


def test_llm_planner_against_loopback_server(server: _Server, monkeypatch) -> None:
    monkeypatch.setenv("TEST_PLANNER_KEY", "sk-test")
    server.answers += [(200, json.dumps(SCENES)), (200, json.dumps(PROMPTS))]
    exchange: dict = {}
    scenes = P.plan_scenes(_llm_spec(server), llm_exchange=exchange)
    assert [(s.text, s.shot, s.source, s.hero) for s in scenes] == [
        ("Aldar arrives on his horse.", "wide", "llm", True), ("The bai shivers.", "close_up", "llm", False)]
    # the refined prompts, with the trigger and traits only where the hero is
    assert scenes[0].prompt == ("aldrkse man, wide establishing shot, man riding a brown horse, front view, "
                                "snowy village, morning light, fox-fur hat, beardless face, storybook")
    assert scenes[1].prompt == "close-up portrait, old man shivering, worn thin coat, front view, frost, storybook"
    first, second = server.requests
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert body["model"] == "tiny-planner" and body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["scenes"]["maxItems"] == 4
    assert schema["properties"]["scenes"]["items"]["required"] == ["text", "description", "hero", "shot"]
    assert STORY in body["messages"][1]["content"] and "front view" in body["messages"][0]["content"]
    # the refinement pass gets the descriptions back and asks for exactly one prompt per scene
    ref = second["body"]
    assert ref["response_format"]["json_schema"]["name"] == "prompt_list"
    assert ref["response_format"]["json_schema"]["schema"]["properties"]["prompts"]["minItems"] == 2
    assert json.loads(ref["messages"][1]["content"])[1]["description"] == SCENES["scenes"][1]["description"]
    assert exchange["answer"] == SCENES and exchange["refined"] == PROMPTS and exchange["requests"] == 2
    # json_object mode is requested as such (and still validated); no refinement when turned off
    server.answers.append((200, json.dumps(SCENES)))
    plain = P.plan_scenes(_llm_spec(server, response_format="json_object", refine_prompts=False))
    assert server.requests[2]["body"]["response_format"] == {"type": "json_object"} and len(server.requests) == 3
    assert "a man on a horse faces the viewer in a village" in plain[0].prompt
    # the preview never calls the network
    with pytest.raises(P.PlannerError, match="preview does not call it"):
        P.plan_scenes(_llm_spec(server), allow_llm=False)


def test_llm_planner_retries_once_with_the_validation_error(server: _Server, monkeypatch) -> None:
    monkeypatch.setenv("TEST_PLANNER_KEY", "sk-test")
    bad = {"scenes": [{**SCENES["scenes"][0], "shot": "extreme"}, SCENES["scenes"][1]]}
    server.answers += [(200, json.dumps(bad)), (200, json.dumps(SCENES)), (200, "not json"), (200, json.dumps(PROMPTS))]
    exchange: dict = {}
    scenes = P.plan_scenes(_llm_spec(server), llm_exchange=exchange)
    assert [s.shot for s in scenes] == ["wide", "close_up"] and len(server.requests) == 4
    retry = server.requests[1]["body"]["messages"]
    assert retry[-2] == {"role": "assistant", "content": json.dumps(bad)}
    assert "answer.scenes[0].shot: 'extreme' is not one of" in retry[-1]["content"]
    assert "is not JSON" in server.requests[3]["body"]["messages"][-1]["content"]
    assert exchange["retries"] == {"scene_list": 1, "prompt_list": 1}


@pytest.mark.parametrize("status, content, message", [
    (200, json.dumps({"scenes": [SCENES["scenes"][0], {**SCENES["scenes"][1], "shot": "extreme"}]}),
     r"at answer\.scenes\[1\]\.shot: 'extreme' is not one of"),
    (200, json.dumps({"scenes": [SCENES["scenes"][0]]}), r"at answer\.scenes: .* should be non-empty|too short"),
    (200, json.dumps({"frames": []}), r"at answer: 'scenes' is a required property"),
    (200, json.dumps({"scenes": [{"text": "A", "shot": "wide"}] * 2}), r"'description' is a required property"),
    (200, "Sure! Here are your scenes: ...", "is not JSON"),
    (500, {"error": {"message": "overloaded"}}, "HTTP 500"),
    (200, b'{"unexpected": true}', r"did not answer in the chat-completions format"),
])
def test_llm_planner_clear_errors(server: _Server, monkeypatch, status, content, message) -> None:
    """A bad answer is asked for once more (quoting the error), then it is an error naming the
    field; HTTP and format failures are not retried."""
    monkeypatch.setenv("TEST_PLANNER_KEY", "sk-test")
    server.answers += [(status, content), (status, content)]
    with pytest.raises(P.PlannerError, match=message) as ei:
        P.plan_scenes(_llm_spec(server))
    assert "generate.storyboard.llm" in str(ei.value) and ei.value.hint
    assert len(server.requests) == (2 if status == 200 and not isinstance(content, bytes) else 1)
    if len(server.requests) == 2:
        assert "asked twice" in str(ei.value)


def test_llm_planner_missing_key_and_timeout(server: _Server, monkeypatch) -> None:
    monkeypatch.delenv("TEST_PLANNER_KEY", raising=False)
    with pytest.raises(P.PlannerError, match="TEST_PLANNER_KEY is not set"):
        P.plan_scenes(_llm_spec(server))
    assert server.requests == []
    monkeypatch.setenv("TEST_PLANNER_KEY", "k")
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection, never answers
    try:
        s = spec(planner="llm", min_scenes=2, max_scenes=4,
                 llm={"base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "api_key_env": "TEST_PLANNER_KEY",
                      "timeout_s": 1})
        with pytest.raises(P.PlannerError, match="no answer .* within 1 s"):
            P.plan_scenes(s)
    finally:
        silent.close()
