"""The HTTP API (FastAPI) for on-demand generation with a trained character.

Endpoints (every /v1 endpoint needs ``Authorization: Bearer <token>``)::

    GET  /healthz        liveness, no auth
    GET  /v1/info        the character, model, LoRA, defaults, limits, queue and batch statistics
    POST /v1/images      one image: PNG (default) or JSON with the PNG in base64
    POST /v1/videos      one clip (mp4) when the spec has generate.video; 501 otherwise

Errors are JSON: ``{"error": {"code": ..., "message": ..., "details": [...]}}`` with
401 (token missing or wrong), 422 (invalid request: one entry per bad field, with the reason;
a body that is not JSON gets one entry for ``body`` with the line, column and character offset
of the syntax error), 413 (body larger than generate.api.max_body_bytes, whether or not the
client sent Content-Length), 415 (a body that is not uncompressed UTF-8 JSON with
``Content-Type: application/json``), 429 (queue full, with Retry-After), 400 ``content_filtered`` (the
safety checker withheld the output), 501 (video not available), 500 (generation failed).
"""

from __future__ import annotations

import base64
import hmac
import io
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from runner.core.errors import StageError, UserError
from runner.serve.batcher import Batcher, QueueFull
from runner.serve.engine import ContentFiltered, ImageJob, ImageParams, VideoJob, png_bytes

MAX_SEED = 2**32 - 1


class ApiError(UserError):
    """A request the API refuses or cannot serve: answered as JSON with ``status`` and ``code``."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code
        self.details = details or []
        self.headers = headers or {}


def _error(status: int, code: str, message: str, details: list | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000, description="What to generate.")
    negative_prompt: str = Field("", max_length=2000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: a random seed (returned).")
    steps: int | None = Field(None, ge=1, le=150)
    guidance: float | None = Field(None, ge=0.0, le=30.0)
    lora_scale: float | None = Field(None, ge=0.0, le=2.0, description="None: the evaluated best scale.")
    width: int | None = Field(None, ge=64, description="Multiple of 8, at most generate.api.max_side.")
    height: int | None = Field(None, ge=64)
    include_trigger: bool = Field(True, description="Prepend the trigger word when the prompt lacks it.")
    response_format: Literal["png", "json"] = "png"


class VideoRequest(ImageRequest):
    frames: int = Field(25, ge=9, le=257, description="k * 8 + 1 for LTX-Video.")
    fps: int = Field(24, ge=1, le=60)
    image_base64: str | None = Field(None, description="PNG/JPEG to animate; None: the character is generated first.")
    response_format: Literal["mp4", "json"] = "mp4"  # type: ignore[assignment]


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``.

    A Content-Length over the cap is answered before the body is read; a body without one
    (chunked) is counted as it arrives, and once past the cap the app's own answer (it sees the
    read fail) is replaced by the 413. Starlette's limiter answers in plain text; this one answers
    in the API's JSON error format.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        unreadable = _not_json(headers) if scope.get("method") in ("POST", "PUT", "PATCH") else None
        if unreadable:
            return await _error(415, "unsupported_media_type", unreadable)(scope, receive, send)
        seen, over, answered = 0, False, False

        async def counted_receive() -> dict:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise ValueError("request body over the limit")
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal answered
            if not over:
                await send(message)
            elif not answered:
                answered = True
                await self._too_large(scope, receive, send)

        await self.app(scope, counted_receive, guarded_send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        mib = self.max_bytes / 2**20
        await _error(413, "payload_too_large",
                     f"the request body is larger than {self.max_bytes} bytes ({mib:.3g} MiB), the most this "
                     "server accepts (generate.api.max_body_bytes); send a smaller request "
                     "(e.g. a smaller image_base64)")(scope, receive, send)


def _not_json(headers: dict[bytes, bytes]) -> str | None:
    """Why a request body would not be read as JSON (FastAPI would answer a vague 400 or 'not a
    dictionary'), or None: the API reads uncompressed UTF-8 JSON only."""
    send = "send the request as uncompressed UTF-8 JSON with 'Content-Type: application/json'"
    encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
    if encoding not in ("", "identity"):
        return f"request bodies with Content-Encoding '{encoding}' are not accepted; {send}"
    media, _, params = headers.get(b"content-type", b"").decode("latin-1").partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        return f"the body's Content-Type is {repr(media) if media else 'missing'}; {send}"
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params.split(";"))
                    if k.strip().lower() == "charset"), "utf-8")
    if charset not in ("utf-8", "utf8"):
        return f"the body's charset is {charset!r}; {send}"
    return None


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    """One entry per problem; a JSON syntax error is placed by line, column and character offset
    (FastAPI reports it with the offset in ``loc``, where a field name would be)."""
    details = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            details.append(_json_syntax_detail(exc.body, e))
            continue
        details.append({"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
                        "reason": e.get("msg", "invalid")})
    return details


def _json_syntax_detail(doc: Any, error: dict[str, Any]) -> dict[str, Any]:
    loc = error.get("loc", ())
    pos = next((p for p in reversed(loc) if isinstance(p, int)), 0)
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else str(doc or "")
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    why = (error.get("ctx") or {}).get("error") or error.get("msg", "invalid JSON")
    return {"field": "body", "reason": f"not valid JSON: {why} at line {line}, column {column} (char {pos})",
            "line": line, "column": column, "char": pos}


@dataclass
class _Server:
    """What the routes need: the engine, its batcher and the limits (``app.state.server``)."""

    engine: Any
    batcher: Batcher
    token: str | None
    max_queue: int
    max_batch: int
    max_side: int
    max_body_bytes: int

    @property
    def target(self) -> Any:
        return self.engine.target

    def size(self, req: ImageRequest) -> tuple[int, int]:
        w = req.width or self.target.resolution
        h = req.height or self.target.resolution
        bad = []
        for name, v in (("width", w), ("height", h)):
            if v % 8:
                bad.append({"field": name, "reason": f"must be a multiple of 8 (got {v})"})
            if v > self.max_side:
                bad.append({"field": name,
                            "reason": f"must be at most {self.max_side} (generate.api.max_side; got {v})"})
        if bad:
            raise ApiError(422, "invalid_request", "the request is invalid: "
                           + "; ".join(f"{d['field']}: {d['reason']}" for d in bad), bad)
        return w, h

    def prompt(self, req: ImageRequest) -> str:
        p = req.prompt.strip()
        if req.include_trigger and self.target.trigger.lower() not in p.lower():
            p = f"{self.target.trigger} {self.target.class_word}, {p}"
        return p

    async def run(self, job: Any) -> Any:
        """The job's result through the batcher; every failure becomes the API's JSON error."""
        try:
            fut = self.batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": "5"}) from None
        try:
            return await fut
        except ContentFiltered:
            raise ApiError(400, "content_filtered",
                           "the safety checker flagged the output; it was withheld") from None
        except ApiError:
            raise
        except Exception as exc:
            raise _generation_error(exc) from None


def _generation_error(exc: Exception) -> ApiError:
    if isinstance(exc, StageError) and type(exc).__name__ != "VideoModelError":
        # a request the model cannot honour (e.g. a clip length the video VAE cannot make)
        return ApiError(422, "invalid_request", str(exc) + (f" (hint: {exc.hint})" if exc.hint else ""),
                        [{"field": "body", "reason": str(exc)}])
    hint = getattr(exc, "hint", "")
    return ApiError(500, "generation_failed", f"{type(exc).__name__}: {exc}" + (f" (hint: {hint})" if hint else ""))


def create_app(engine: Any, *, token: str | None, max_queue: int = 32, max_batch: int = 4,
               max_side: int = 1536, batch_window_s: float = 0.02,
               max_body_bytes: int | None = None) -> FastAPI:
    """The ASGI app around a loaded :class:`runner.serve.engine.ImageEngine`. ``token=None``
    turns authentication off (only with --insecure-no-auth). ``max_body_bytes``: the largest
    request body accepted (None: the generate.api.max_body_bytes default)."""
    if max_body_bytes is None:
        from runner.serve import api_default

        max_body_bytes = int(api_default("max_body_bytes"))
    batcher = Batcher(engine.run_batch, max_queue=max_queue, max_batch=max_batch, batch_window_s=batch_window_s)
    app = FastAPI(title=f"character-runner: {engine.target.character}", version="1", lifespan=_lifespan,
                  description=__doc__)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.server = _Server(engine, batcher, token, max_queue, max_batch, max_side, max_body_bytes)
    app.state.batcher = batcher
    app.state.engine = engine
    app.state.max_body_bytes = max_body_bytes
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    await app.state.server.batcher.start()
    yield
    await app.state.server.batcher.stop()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = _validation_details(exc)
    return _error(422, "invalid_request", "the request is invalid: "
                  + "; ".join(f"{d['field']}: {d['reason']}" for d in details), details)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail))


def _server(request: Request) -> _Server:
    return request.app.state.server


def authorized(request: Request) -> None:
    token = _server(request).token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    return {"status": "ok", "character": _server(request).target.character}


@router.get("/v1/info", dependencies=[Depends(authorized)])
async def info(request: Request) -> dict[str, Any]:
    srv = _server(request)
    engine, target, batcher = srv.engine, srv.target, srv.batcher
    video_ok, video_why = engine.video_available
    return {
        "character": target.character, "trigger": target.trigger, "class_word": target.class_word,
        "base_model": target.base_model, "lora": target.lora_source or None, "lora_loaded": engine.lora_loaded,
        "tiny_random_model": target.tiny_random,
        "note": "builtin:tiny-* models are tiny random models: their images are noise" if target.tiny_random else "",
        "defaults": {"steps": target.steps, "guidance": target.guidance, "lora_scale": target.lora_scale,
                     "width": target.resolution, "height": target.resolution},
        "limits": {"max_queue": srv.max_queue, "max_batch": srv.max_batch, "max_side": srv.max_side,
                   "max_body_bytes": srv.max_body_bytes},
        "safety_filter": engine.safety is not None, "device": engine.device,
        "video": {"available": video_ok, "reason": video_why or None},
        "queue": {"waiting": batcher.waiting, "running": batcher.running, **batcher.stats.as_json()},
        "warnings": target.warnings,
    }


@router.post("/v1/images", dependencies=[Depends(authorized)])
async def images(req: ImageRequest, request: Request) -> Response:
    srv = _server(request)
    target = srv.target
    w, h = srv.size(req)
    seed = req.seed if req.seed is not None else random.randint(0, MAX_SEED)
    params = ImageParams(
        negative_prompt=req.negative_prompt, steps=req.steps or target.steps,
        guidance=target.guidance if req.guidance is None else req.guidance,
        width=w, height=h, lora_scale=target.lora_scale if req.lora_scale is None else req.lora_scale)
    t0 = time.monotonic()
    res = await srv.run(ImageJob(prompt=srv.prompt(req), seed=seed, params=params))
    image, flagged = res.value
    if flagged:
        raise ApiError(400, "content_filtered", "the safety checker flagged the image; it was withheld")
    png = png_bytes(image)
    headers = {"X-Seed": str(seed), "X-Batch-Size": str(res.batch_size),
               "X-Queue-Seconds": f"{res.queued_s:.3f}", "X-Generation-Seconds": f"{res.run_s:.3f}"}
    if target.tiny_random:
        headers["X-Tiny-Random-Model"] = "true"
    if req.response_format == "json":
        return JSONResponse({"seed": seed, "width": w, "height": h, "batch_size": res.batch_size,
                             "seconds": round(time.monotonic() - t0, 3), "tiny_random_model": target.tiny_random,
                             "png_base64": base64.b64encode(png).decode("ascii")}, headers=headers)
    return Response(png, media_type="image/png", headers=headers)


@router.post("/v1/videos", dependencies=[Depends(authorized)])
async def videos(req: VideoRequest, request: Request) -> Response:
    srv = _server(request)
    target = srv.target
    ok, why = srv.engine.video_available
    if not ok:
        raise ApiError(501, "video_not_available", f"video jobs are not available for {target.character}: {why}")
    w, h = srv.size(req)
    seed = req.seed if req.seed is not None else random.randint(0, MAX_SEED)
    v = target.video or {}
    job = VideoJob(prompt=srv.prompt(req), negative_prompt=req.negative_prompt, seed=seed,
                   steps=req.steps or int(v.get("steps") or 10), guidance=1.0 if req.guidance is None else req.guidance,
                   width=w, height=h, frames=req.frames, fps=req.fps,
                   lora_scale=target.lora_scale if req.lora_scale is None else req.lora_scale,
                   image=_start_image(req.image_base64))
    res = await srv.run(job)
    headers = {"X-Seed": str(seed), "X-Generation-Seconds": f"{res.run_s:.3f}"}
    if req.response_format == "json":
        return JSONResponse({"seed": seed, "mp4_base64": base64.b64encode(res.value).decode("ascii")}, headers=headers)
    return Response(res.value, media_type="video/mp4", headers=headers)


def _start_image(image_base64: str | None) -> Any:
    """The image a clip starts from (None: the character is generated first)."""
    if not image_base64:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(base64.b64decode(image_base64, validate=True))).convert("RGB")
    except (ValueError, UnidentifiedImageError) as exc:
        raise ApiError(422, "invalid_request", f"image_base64: not a readable image ({exc})",
                       [{"field": "image_base64", "reason": "not a base64 PNG/JPEG"}]) from None
