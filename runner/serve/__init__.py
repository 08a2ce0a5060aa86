"""On-demand generation with a trained character: `runner serve` (local HTTP API) and
`runner deploy` (the same ASGI app as a Modal web endpoint).

- :mod:`runner.serve.character`  which base model and LoRA to load (best / last / a file)
- :mod:`runner.serve.engine`     the pipelines (image, video) and the optional safety checker
- :mod:`runner.serve.batcher`    bounded queue + batching of compatible requests
- :mod:`runner.serve.app`        the FastAPI app (auth, validation, errors)
- :mod:`runner.serve.deploy`     the Modal app for `runner deploy`
"""

from __future__ import annotations

import os
from typing import Any

from runner.core.errors import UserError


class ServeError(UserError):
    """A problem the user can fix before the server starts (message says how); exit 2."""

    exit_code = 2


def _api_schema() -> dict[str, Any]:
    from runner.spec.schema import section_schema

    return section_schema("generate")["properties"]["api"]["properties"]


def api_default(key: str) -> Any:
    """The default of generate.api.<key>, read from the schema (where spec defaults live)."""
    return _api_schema()[key]["default"]


def api_settings(target: Any) -> dict[str, Any]:
    """generate.api of the target's spec, schema defaults filled in."""
    return {**{k: v["default"] for k, v in _api_schema().items()}, **(target.api or {})}


def token_from_env(token_env: str, *, insecure_no_auth: bool) -> str | None:
    """The bearer token from the variable generate.api.token_env names; refuses to go on without
    one unless authentication was turned off explicitly."""
    token = os.environ.get(token_env, "").strip()
    if token:
        if len(token) < 16:
            raise ServeError(f"the token in ${token_env} is {len(token)} characters long; use at least 16 "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return token
    if insecure_no_auth:
        return None
    raise ServeError(
        f"no API token: set ${token_env} (generate.api.token_env) to a secret of 16+ characters, "
        f"e.g. export {token_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))'); "
        "or pass --insecure-no-auth to serve without authentication (loopback only)")


def build_app(target: Any, *, token: str | None, device: str = "auto", safety_model: str | None = None):
    """Load the character's pipeline and return the ASGI app (what serve and deploy both run)."""
    from runner.serve.app import create_app
    from runner.serve.engine import SAFETY_CHECKER_DEFAULT, ImageEngine

    api = api_settings(target)
    if api.get("safety_filter") and not safety_model:
        safety_model = SAFETY_CHECKER_DEFAULT
    engine = ImageEngine(target, device=device, safety_model=safety_model)
    return create_app(engine, token=token, max_queue=int(api["max_queue"]), max_batch=int(api["max_batch"]),
                      max_side=int(api["max_side"]), max_body_bytes=int(api["max_body_bytes"]))
