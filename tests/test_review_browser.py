"""`runner review` in a real browser (Playwright driving Debian's Chromium, headless): a reviewer
filters the dataset, drops three images and changes a shot type by keyboard, picks a checkpoint;
then `runner plan` names exactly those changes and `runner apply` honours them. Every page is
checked at 1280 and 390 px (no horizontal overflow; screenshots kept for the README), hostile file
names and captions stay text, and two browser sessions saving at once lose nothing.

Chromium comes from Debian (`apt-get install chromium`, which `make setup` does when it is
missing); Playwright is told to launch /usr/bin/chromium and never downloads a browser.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from review_fixture import HOSTILE, build
from test_cli import runner

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
PAGES = ("dataset", "identity", "evaluation", "storyboard")
pytestmark = pytest.mark.slow


def _need_browser() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    else:
        why = "" if CHROMIUM.exists() else f"{CHROMIUM} is missing (make setup installs Debian's chromium)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_data: Path) -> Path:
    _need_browser()
    root = tmp_path_factory.mktemp("review") / "project"
    build(root, shared_data)
    return root


@pytest.fixture(scope="module")
def server(project: Path):
    """The review app on 127.0.0.1 at a free port, in a thread of this process."""
    import uvicorn

    from runner.review.app import create_app
    from runner.spec import load_spec

    spec = load_spec(project / "specs" / "hero.yaml")
    old = os.environ.get("RUNNER_REVIEWER")
    os.environ["RUNNER_REVIEWER"] = "Ada"  # the default name on the pages (and in the screenshots)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(spec), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "the review app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)
    if old is None:
        os.environ.pop("RUNNER_REVIEWER", None)
    else:
        os.environ["RUNNER_REVIEWER"] = old


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _page(browser, width: int = 1280):
    ctx = browser.new_context(viewport={"width": width, "height": 900})
    page = ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs  # an alert() would mean a hostile name ran as script
    return page


def _saved(page, item, before: str | None) -> None:
    page.wait_for_function("([el, b]) => el.getAttribute('data-saved') !== b", arg=[item.element_handle(), before],
                           timeout=10_000)


def _decisions(project: Path) -> dict:
    from runner.review.decisions import load

    return load(project / "specs" / "hero.review.yaml")


def _load_all_images(page) -> None:
    page.evaluate("""() => Promise.all([...document.images].map(i => { i.loading = 'eager';
        return i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; }); }))""")


def test_pages_fit_phone_and_desktop_and_escape_hostile_names(server: str, browser, project: Path,
                                                               tmp_path: Path) -> None:
    # The README's screenshots are made by this test: RUNNER_UPDATE_SCREENSHOTS=1 writes them into
    # docs/images; otherwise they go to the test's tmp folder, so a test run leaves the tree clean.
    out = REPO / "docs" / "images" if os.environ.get("RUNNER_UPDATE_SCREENSHOTS") else tmp_path / "shots"
    out.mkdir(parents=True, exist_ok=True)
    for width, suffix in ((1280, ""), (390, "-mobile")):
        page = _page(browser, width)
        for name in PAGES:
            page.goto(f"{server}/{name}")
            _load_all_images(page)
            fits = page.evaluate("document.scrollingElement.scrollWidth <= innerWidth")
            assert fits, f"/{name} overflows at {width} px"
            # Only our script runs, hostile text is shown as text, no injected element exists.
            assert page.evaluate("document.scripts.length") == 1
            assert page.locator("img[src='x']").count() == 0
            assert not page.dialogs
            page.screenshot(path=str(out / f"review-{name}{suffix}.png"))
        page.goto(f"{server}/dataset")
        assert page.get_by_text(f"{HOSTILE} biden.jpg").count() >= 1
        page.goto(f"{server}/identity")
        assert page.get_by_text(HOSTILE, exact=False).count() >= 1
        page.goto(f"{server}/storyboard")
        assert page.get_by_text('<script>alert("scene")</script>', exact=False).count() == 1
        page.context.close()


def test_reviewer_flow_then_plan_and_apply(server: str, browser, project: Path) -> None:
    page = _page(browser)
    # Filter: only the obama photos, by name.
    page.goto(f"{server}/dataset")
    total = page.locator(".item[data-section=images]").count()
    page.fill("input[name=q]", "obama")
    page.click("button[type=submit]")
    rows = page.locator(".item[data-section=images]")
    names = [rows.nth(i).get_attribute("aria-label") for i in range(rows.count())]
    assert names and all("obama" in n for n in names) and len(names) < total
    # By keyboard, row by row (j moves down): change the shot type of the first image curate keeps
    # (its number key), drop the three others (d).
    from runner.review.decisions import SHOT_TYPES

    assert len(names) == 4
    curate = [rows.nth(i).locator("[data-curate]").inner_text() for i in range(4)]
    k = curate.index("keep")
    dropped, shot_key, new_shot = [], None, None
    for i in range(4):
        item = rows.nth(i)
        before = item.get_attribute("data-saved")
        if i == k:
            shown = item.locator(".shot").inner_text().replace(" ", "_")
            new_shot = next(s for s in ("close_up", "medium") if s != shown)
            page.keyboard.press(str(SHOT_TYPES.index(new_shot) + 1))
            shot_key, shot_name = item.get_attribute("data-key"), item.get_attribute("aria-label")
        else:
            page.keyboard.press("d")
            dropped.append(item.get_attribute("data-key"))
        _saved(page, item, before)
        page.keyboard.press("j")
    item = rows.nth(k)
    assert item.locator(f"button[data-field=shot][data-value='\"{new_shot}\"']").get_attribute("aria-pressed") == "true"
    # Pick the second checkpoint on the evaluation page.
    page.goto(f"{server}/evaluation")
    pick = page.locator("button[data-field=cell]").nth(1)
    holder = page.locator(".item[data-section=checkpoints]")
    before = holder.get_attribute("data-saved")
    pick.click()
    _saved(page, holder, before)
    assert pick.get_attribute("aria-pressed") == "true"
    page.context.close()

    data = _decisions(project)
    assert sorted(k for k, v in data["images"].items() if v.get("decision") == "drop") == sorted(dropped)
    assert data["images"][shot_key]["shot"] == new_shot
    assert data["checkpoints"]["hero:evaluate"]["step"] == 8

    # `runner serve` takes the pick as best too.
    from runner.serve.character import resolve_target
    from runner.spec import load_spec

    target = resolve_target(load_spec(project / "specs" / "hero.yaml"))
    assert target.lora_file.endswith("checkpoint-8/pytorch_lora_weights.safetensors"), target.lora_source
    assert target.lora_source.startswith("reviewer's pick for hero:evaluate: step 8")

    plan = runner("plan", "specs/hero.yaml", cwd=project)
    assert plan.returncode == 0, plan.stderr
    lines = {ln.split()[1]: ln for ln in plan.stdout.splitlines() if ln.startswith("  ")}
    assert "rerun   review: 3 images dropped, 1 shot type changed" in lines["hero:curate"]
    assert "review: checkpoint step 8 at LoRA scale 1 picked" in lines["hero:storyboard"]
    for stage in ("hero:ingest", "hero:analyze", "hero:evaluate", "hero:train"):
        assert "review" not in lines[stage]
    assert "no longer in the workspace" not in plan.stdout

    r = runner("apply", "specs/hero.yaml", "--only", "curate", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    curated = _curate_outputs(project)
    kept = {e["id"]: e for e in curated["kept"]}
    by_reviewer = [x for x in curated["rejected"] if x["reason"] == "dropped by reviewer"]
    assert sorted(x["id"] for x in by_reviewer) == sorted(k[:16] for k in dropped)
    assert not set(kept) & {k[:16] for k in dropped}
    assert kept[shot_key[:16]]["shot"] == new_shot, shot_name
    assert curated["review"]["missing"] == []


def _curate_outputs(project: Path) -> dict:
    from runner.engine.executor import plan_specs
    from runner.spec import load_spec

    plan, ws = plan_specs([load_spec(project / "specs" / "hero.yaml")])
    try:
        ps = next(p for p in plan.stages if p.node.kind == "curate")
        assert ws.store_has(ps.key), "curate did not run"
        folder = ws.store_path(ps.key) / "curated"
    finally:
        ws.close()
    read = lambda f: [json.loads(x) for x in (folder / f).read_text().splitlines() if x.strip()]  # noqa: E731
    return {"kept": read("curated.jsonl"), "rejected": read("rejected.jsonl"),
            "review": json.loads((folder / "review.json").read_text())}


def test_two_sessions_saving_at_once_lose_nothing(server: str, browser, project: Path) -> None:
    a, b = _page(browser), _page(browser)
    for p in (a, b):
        p.goto(f"{server}/storyboard")
    notes = {a: f"note A {HOSTILE}", b: "note B “ü”"}
    items = {p: p.locator(".item[data-section=frames]").nth(i) for i, p in enumerate((a, b))}
    before = {p: items[p].get_attribute("data-saved") for p in (a, b)}
    for p in (a, b):  # both saves are in flight together: fill fires change events without waiting
        items[p].locator("input[data-field=note]").fill(notes[p])
        items[p].evaluate("el => el.querySelector('input[data-field=note]')"
                          ".dispatchEvent(new Event('change', {bubbles: true}))")
        items[p].locator("button.reject").evaluate("el => el.click()")
    for p in (a, b):
        _saved(p, items[p], before[p])
        p.wait_for_function("el => el.querySelector('button.reject').getAttribute('aria-pressed') === 'true'",
                            arg=items[p].element_handle(), timeout=10_000)
    data = _decisions(project)
    frames = {e["scene"]: e for e in data["frames"].values()}
    assert frames[1]["note"] == notes[a] and frames[2]["note"] == notes[b]
    assert frames[1]["verdict"] == frames[2]["verdict"] == "reject"
    # The notes come back escaped on reload, in both sessions.
    a.reload()
    assert a.locator("input[data-field=note]").first.input_value() == notes[a]
    assert a.locator("img[src='x']").count() == 0 and not a.dialogs
    for p in (a, b):
        p.context.close()


def test_identity_sets_move_and_drop_reach_curate(server: str, browser, project: Path) -> None:
    page = _page(browser)
    page.goto(f"{server}/identity")
    frames = page.locator(".item[data-section=identity]")
    assert frames.count() == 3
    first, second = frames.nth(0), frames.nth(1)
    before = first.get_attribute("data-saved")
    page.keyboard.press("3")  # the first frame (an anchor) moves to challenge
    _saved(page, first, before)
    before = second.get_attribute("data-saved")
    page.keyboard.press("j")
    page.keyboard.press("d")
    _saved(page, second, before)
    keys = first.get_attribute("data-key"), second.get_attribute("data-key")
    page.context.close()
    ident = _decisions(project)["identity"]
    assert ident[keys[0]]["set"] == "challenge" and ident[keys[1]]["decision"] == "drop"
    assert {ident[k]["origin"] for k in keys} == {"hero:video_identity[1]"}  # the stage whose sets they are
    from runner.plan.graph import build_graph
    from runner.spec import load_spec

    graph = build_graph([load_spec(project / "specs" / "hero.yaml")])
    section = graph.nodes["hero:curate"].config["review"]["identity"]
    assert sorted(v.get("decision") for v in section.values()) == ["drop", "set"]
    video = graph.nodes["hero:video_identity[1]"].config["review"]["identity"]  # its sets are rebuilt
    assert video == {keys[0]: {"decision": "set", "set": "challenge"}, keys[1]: {"decision": "drop"}}


def test_a_decision_for_a_vanished_image_is_listed_not_dropped(server: str, browser, project: Path) -> None:
    from runner.review.decisions import review_path, save

    gone = "0f" * 32
    save(review_path(project / "specs" / "hero.yaml"),
         [("images", gone, {"decision": "drop", "file": "photos/renamed_away.jpg"})], by="Ada")
    page = _page(browser)
    page.goto(f"{server}/dataset")
    listed = page.locator("ul.orphans li")
    assert listed.count() == 1 and "photos/renamed_away.jpg" in listed.inner_text() and gone[:12] in listed.inner_text()
    page.context.close()
    plan = runner("plan", "specs/hero.yaml", cwd=project)
    assert "1 decision for things no longer in the workspace" in plan.stdout
    assert f"images: photos/renamed_away.jpg (sha256 {gone[:12]}): drop" in plan.stdout
    data = json.loads(runner("plan", "specs/hero.yaml", "--json", cwd=project).stdout)
    assert [o["sha"] for o in data["review_orphans"]] == [gone]
    assert gone in _decisions(project)["images"]  # still in the file


def test_a_rejected_clip_reaches_the_video_stage(server: str, browser, project: Path) -> None:
    page = _page(browser)
    page.goto(f"{server}/storyboard")
    clip = page.locator(".item[data-section=clips]")
    assert clip.count() == 1 and page.locator("video").count() == 1
    frames = page.locator(".item[data-section=frames]").count()
    for _ in range(frames):
        page.keyboard.press("j")
    before = clip.get_attribute("data-saved")
    page.keyboard.press("n")
    _saved(page, clip, before)
    key = clip.get_attribute("data-key")
    page.context.close()
    assert _decisions(project)["clips"][key]["verdict"] == "reject"
    from runner.plan.graph import build_graph
    from runner.spec import load_spec

    graph = build_graph([load_spec(project / "specs" / "hero.yaml")])
    assert graph.nodes["hero:video"].config["review"] == {"regenerate_clips": {"frame01": 1}}
