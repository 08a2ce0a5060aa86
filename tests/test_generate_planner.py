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
    assert any(s.shot == "close_up" and "shivers" in s.text for s in scenes)  # the split clause, a reaction shot
    for s in scenes:
        assert s.prompt.startswith("aldrkse man, ") and "fox-fur hat, beardless face" in s.prompt
        assert s.prompt.endswith("storybook") and s.source == "rules"
    # deterministic, and the whole story is covered in order
    assert [s.to_dict() for s in P.plan_scenes(spec())] == [s.to_dict() for s in scenes]
    joined = " ".join(s.text for s in scenes)
    assert joined.index("greedy bai") < joined.index("magic fur coat") < joined.index("shivers")
    # more beats than max_scenes: neighbours are merged
    assert len(P.plan_scenes(spec(min_scenes=2, max_scenes=3))) == 3
    with pytest.raises(P.PlannerError, match="fewer than min_scenes"):
        P.plan_scenes(spec(story="He sleeps.", min_scenes=3))


def test_manual_planner_keeps_order_and_explicit_prompts() -> None:
    scenes = P.plan_scenes(spec(planner="manual", scenes=[
        {"text": "Aldar grins.", "shot": "close_up"},
        {"text": "A wide steppe.", "shot": "wide", "prompt": "empty steppe at dawn"},
        {"text": "Aldar with hat.", "prompt": "aldrkse man in a hat"},
    ]))
    assert [s.shot for s in scenes] == ["close_up", "wide", "medium"]
    assert scenes[0].prompt == "aldrkse man, close-up portrait, Aldar grins, fox-fur hat, beardless face, storybook"
    assert scenes[1].prompt == "aldrkse man, empty steppe at dawn"  # the trigger is added when missing
    assert scenes[2].prompt == "aldrkse man in a hat"
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
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
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


def test_llm_planner_against_loopback_server(server: _Server, monkeypatch) -> None:
    monkeypatch.setenv("TEST_PLANNER_KEY", "sk-test")
    answer = {"scenes": [{"text": "Aldar arrives on his horse.", "shot": "wide"},
                         {"text": "Aldar laughs at the bai.", "shot": "close_up"}]}
    server.answers.append((200, json.dumps(answer)))
    exchange: dict = {}
    scenes = P.plan_scenes(_llm_spec(server), llm_exchange=exchange)
    assert [(s.text, s.shot, s.source) for s in scenes] == [("Aldar arrives on his horse.", "wide", "llm"),
                                                             ("Aldar laughs at the bai.", "close_up", "llm")]
    assert scenes[1].prompt.startswith("aldrkse man, close-up portrait, Aldar laughs at the bai")
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "tiny-planner" and body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["scenes"]["maxItems"] == 4
    assert STORY in body["messages"][1]["content"]
    assert exchange["answer"] == answer
    # json_object mode is requested as such (and still validated)
    server.answers.append((200, json.dumps(answer)))
    P.plan_scenes(_llm_spec(server, response_format="json_object"))
    assert server.requests[1]["body"]["response_format"] == {"type": "json_object"}
    # the preview never calls the network
    with pytest.raises(P.PlannerError, match="preview does not call it"):
        P.plan_scenes(_llm_spec(server), allow_llm=False)


@pytest.mark.parametrize("status, content, message", [
    (200, json.dumps({"scenes": [{"text": "A", "shot": "wide"}, {"text": "B", "shot": "extreme"}]}),
     r"at answer\.scenes\[1\]\.shot: 'extreme' is not one of"),
    (200, json.dumps({"scenes": [{"text": "only one", "shot": "wide"}]}), r"at answer\.scenes: .* should be non-empty|too short"),
    (200, json.dumps({"frames": []}), r"at answer: 'scenes' is a required property"),
    (200, "Sure! Here are your scenes: ...", "is not JSON"),
    (500, {"error": {"message": "overloaded"}}, "HTTP 500"),
    (200, b'{"unexpected": true}', r"did not answer in the chat-completions format"),
])
def test_llm_planner_clear_errors(server: _Server, monkeypatch, status, content, message) -> None:
    monkeypatch.setenv("TEST_PLANNER_KEY", "sk-test")
    server.answers.append((status, content))
    with pytest.raises(P.PlannerError, match=message) as ei:
        P.plan_scenes(_llm_spec(server))
    assert "generate.storyboard.llm" in str(ei.value) and ei.value.hint


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
