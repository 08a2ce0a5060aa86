"""The review app (FastAPI, server-rendered Jinja pages, a little vanilla JS for keys and saving).

Pages and saves run in the server's thread pool (plain ``def`` endpoints), so a slow page never
holds up a save. Pages: ``/dataset`` (every ingested image with its analysis and curate's decision; keep, drop,
shot type, reference), ``/identity`` (identity sets from video; move between sets, drop),
``/evaluation`` (checkpoint x category x scale grid; rate pass/fail, pick a checkpoint; where
people and metrics disagree), ``/storyboard`` (frames and clips; approve or reject with a note).

``POST /api/decide`` saves one decision into ``<spec>.review.yaml`` (locked, merged, atomic; see
:mod:`runner.review.decisions`). It requires the ``X-Review`` header, which a cross-site form
cannot send. ``GET /file/<key>/<path>`` serves images and clips from inside the workspace store
only. With a token (any host but loopback), every request needs ``Authorization: Bearer <token>``
or the cookie that opening ``/?token=<token>`` once sets.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from runner.review import decisions
from runner.review.state import ReviewState

COOKIE = "runner_review_token"
PAGES = (("dataset", "Dataset"), ("identity", "Identity sets"), ("evaluation", "Evaluation"),
         ("storyboard", "Storyboard and clips"))
SORTS = ("name", "identity", "yaw", "shot", "people")


def _jinja():
    import jinja2

    from runner.resources import resource_dir

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates") / "review")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=2: "—" if v is None else f"{float(v):.{d}f}"
    env.filters["tojson_attr"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env


def token_ok(request: Request, token: str | None) -> bool:
    """The rule of `runner serve`: a bearer token (here also the cookie set from ?token=)."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        given = request.cookies.get(COOKIE, "")
    return bool(given) and hmac.compare_digest(given.strip().encode(), token.encode())


def _reviewed(r: dict[str, Any]) -> bool:
    return any(r["review"].get(k) for k in ("decision", "shot", "reference"))


# What each "Show" choice of the dataset page keeps.
STATUS_FILTERS: dict[str, Any] = {
    "all": lambda r: True,
    "curate-kept": lambda r: r["curate"]["decision"] == "keep",
    "curate-dropped": lambda r: r["curate"]["decision"] == "drop",
    "reviewed": _reviewed,
    "unreviewed": lambda r: not _reviewed(r),
    "reviewer-dropped": lambda r: r["review"].get("decision") == "drop",
    "disagree": lambda r: bool(r["review"].get("decision")) and r["review"]["decision"] != r["curate"]["decision"],
}
STATUSES = tuple(STATUS_FILTERS)


def shown_shot(r: dict[str, Any]) -> str | None:
    return r["review"].get("shot") or r["shot"]


def filter_rows(rows: list[dict[str, Any]], *, shot: str = "", status: str = "all", q: str = "",
                sort: str = "name") -> list[dict[str, Any]]:
    """The dataset rows a filter selects, in the order ``sort`` names (rows without a value last)."""
    keep = STATUS_FILTERS.get(status, STATUS_FILTERS["all"])

    def key(r: dict[str, Any]) -> tuple:
        v = r["name"].lower() if sort == "name" else shown_shot(r) if sort == "shot" else r.get(sort)
        return (v is None, v if v is not None else 0, r["name"])

    picked = (r for r in rows if keep(r) and (not shot or shown_shot(r) == shot)
              and (not q or q.lower() in r["source"].lower()))
    return sorted(picked, key=key)


def create_app(spec: Any, *, token: str | None = None) -> FastAPI:
    """The review app for ``spec``; ``token`` (None: no authentication) guards every request."""
    app = FastAPI(title=f"character-runner review: {spec.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = ReviewState.open(spec)
    app.state.spec, app.state.token, app.state.jinja = spec, token, _jinja()
    app.middleware("http")(_auth)
    app.include_router(router)
    return app


async def _auth(request: Request, call_next):
    token = request.app.state.token
    given = request.query_params.get("token")
    if token is not None and given and hmac.compare_digest(given.encode(), token.encode()):
        resp = RedirectResponse(request.url.path, status_code=303)
        resp.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        return resp
    if not token_ok(request, token):
        return JSONResponse({"error": {"code": "unauthorized", "message": "missing or wrong bearer token: send "
                                       "'Authorization: Bearer <token>' or open /?token=<token> once"}},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


def _state(request: Request, refresh: bool = False) -> ReviewState:
    state = request.app.state.review
    if refresh:
        state.refresh()
    return state


def _page(name: str, request: Request, **ctx: Any) -> HTMLResponse:
    spec, state = request.app.state.spec, _state(request)
    data = state.decisions()
    orphans = state.orphans()
    html = request.app.state.jinja.get_template(f"{name}.html.j2").render(
        page=name, pages=PAGES, character=spec.name, spec_file=spec.file.name,
        review_file=state.review_file.name, summary=decisions.summary(data), orphans=orphans,
        reviewer=decisions.reviewer(), shot_types=decisions.SHOT_TYPES, **ctx)
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "Content-Security-Policy": PAGE_POLICY})


PAGE_POLICY = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; media-src 'self'; "
               "frame-ancestors 'none'")
router = APIRouter()


@router.get("/")
def index() -> RedirectResponse:
    return RedirectResponse("/dataset", status_code=303)


@router.get("/dataset", response_class=HTMLResponse)
def dataset(request: Request, shot: str = "", status: str = "all", q: str = "", sort: str = "name"):
    rows = _state(request, refresh=True).dataset()
    shown = filter_rows(rows, shot=shot if shot in decisions.SHOT_TYPES else "",
                        status=status if status in STATUSES else "all", q=q[:200],
                        sort=sort if sort in SORTS else "name")
    return _page("dataset", request, rows=shown, total=len(rows), shot=shot, status=status, q=q, sort=sort,
                 sorts=SORTS, statuses=STATUSES)


@router.get("/identity", response_class=HTMLResponse)
def identity(request: Request):
    return _page("identity", request, videos=_state(request, refresh=True).identity(), sets=decisions.VIDEO_SETS)


@router.get("/evaluation", response_class=HTMLResponse)
def evaluation(request: Request):
    state = _state(request, refresh=True)
    return _page("evaluation", request, evaluations=[_grid(e, state) for e in state.evaluations()])


@router.get("/storyboard", response_class=HTMLResponse)
def storyboard(request: Request):
    return _page("storyboard", request, **_state(request, refresh=True).storyboard())


@router.get("/static/review.js")
def script() -> Response:
    from runner.resources import resource_dir

    js = (resource_dir("templates") / "review" / "review.js").read_text(encoding="utf-8")
    return Response(js, media_type="text/javascript", headers={"Cache-Control": "no-store"})


@router.get("/file/{rel:path}")
def file(rel: str, request: Request) -> Response:
    path = _state(request).store_file(rel)
    if path is None:
        return JSONResponse({"error": {"code": "not_found", "message": "no such file in the workspace store"}},
                            status_code=404)
    return FileResponse(path, headers={"Cache-Control": "private, max-age=3600",
                                       "X-Content-Type-Options": "nosniff"})


@router.get("/api/decisions")
def get_decisions(request: Request) -> JSONResponse:
    return JSONResponse(_state(request).decisions())


@router.post("/api/decide")
async def decide(request: Request) -> JSONResponse:
    if request.headers.get("x-review") != "1":
        return _bad(403, "send the X-Review: 1 header (the page does)")
    raw = await request.body()
    return await run_in_threadpool(_decide, _state(request), raw)


def _decide(state: ReviewState, raw: bytes) -> JSONResponse:
    try:
        body = json.loads(raw)
        section, key, fields = body["section"], str(body["key"]), dict(body["fields"])
    except (ValueError, KeyError, TypeError):
        return _bad(422, "expected JSON {section, key, fields: {...}, by}")
    try:
        data = decisions.save(state.review_file, [(section, key, fields)], by=body.get("by"))
    except decisions.ReviewError as exc:
        return _bad(422, str(exc))
    return JSONResponse({"entry": data[section].get(key, {}), "summary": decisions.summary(data)})


def _bad(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "invalid_request" if status == 422 else "forbidden", "message": message}},
                        status_code=status)


def _grid(e: dict[str, Any], state: ReviewState) -> dict[str, Any]:
    """An evaluation as rows (categories) x columns (cells: checkpoint step x LoRA scale)."""
    ev, folder, ratings = e["evaluation"], e["folder"], state.decisions()["ratings"]
    cats = list((ev.get("suite") or {}).get("categories") or [])
    columns = []
    for c in ev.get("cells", []):
        per_cat = {}
        for cat in cats:
            imgs = []
            for img in c.get("images", []):
                if img["category"] != cat or img.get("path") not in e["sha_of"]:
                    continue
                sha = e["sha_of"][img["path"]]
                r = ratings.get(sha, {})
                imgs.append({"sha": sha, "src": state.url(Path(folder) / img["path"]), "seed": img.get("seed"),
                             "rating": r.get("rating"), "note": r.get("note", ""),
                             "disagree": e["disagree"].get(img["path"], []),
                             "metrics": {k: img.get(k) for k in ("face_similarity", "clip_t", "clip_i", "dino")}})
            per_cat[cat] = {"metrics": c.get("categories", {}).get(cat, {}),
                            "targets": (c.get("targets") or {}).get(cat, {}), "images": imgs}
        columns.append({"cell": c["cell"], "step": c["step"], "lora_scale": c["lora_scale"], "score": c.get("score"),
                        "overall": c.get("overall", {}), "per_cat": per_cat,
                        "lora_sha256": e["lora_sha"].get(int(c["step"]), ""),
                        "best": (ev.get("best") or {}).get("cell") == c["cell"]})
    return {"stage": e["stage"], "categories": cats, "columns": columns, "pick": e["pick"],
            "best": ev.get("best") or {}, "agreement": e["agreement"],
            "tiny": bool((ev.get("tiny_random") or {}).get("any"))}


def serve(spec: Any, *, host: str, port: int, token: str | None) -> None:
    import uvicorn

    uvicorn.run(create_app(spec, token=token), host=host, port=port, log_level="warning")
