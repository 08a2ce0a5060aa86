"""Hugging Face hub models: which references are hub ids, which are in the local cache, and where a
loader should load one from, failing in seconds with what to do when it cannot be had.

Without this, a hub id that is not cached on a machine without network costs the hub client's
retries (about 99 s for an SDXL base model) before a generic error. Every loader that takes a hub
id (base models, VAE, CLIP/DINO, the captioner, the general-vision model, the video model and its
upsampler, ControlNet, IP-Adapter, the safety checker) calls :func:`resolve_hub_model` first, and
`runner plan` calls :func:`uncached_reason` to warn before anything runs.

The cache is asked through huggingface_hub itself (``snapshot_download(local_files_only=True)``,
which also knows an interrupted download from a complete one), so it is the very cache, under the
same HF_HOME / HF_HUB_CACHE rules, that diffusers and transformers read. Whether the hub can be
reached is asked once per process (a HEAD on the endpoint through huggingface_hub's own HTTP
session: proxies and HF_ENDPOINT apply), unless HF_HUB_OFFLINE says so already.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from runner.core.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
_PROBE_TIMEOUT_S = 3.0
_probe: tuple[float, str | None] | None = None  # (when, why unreachable or None)


class ModelUnavailable(UserError):
    """A hub model that is neither cached nor downloadable now; the message says where we looked."""


def is_hub_id(ref: str, project_root: Path | None = None) -> bool:
    """``owner/name`` that is not a local path (relative to ``project_root`` or the working folder)."""
    ref = str(ref)
    if not _HUB_ID.match(ref) or ".." in ref:
        return False
    return not Path(ref).exists() and not (project_root is not None and (Path(project_root) / ref).exists())


def cache_dir() -> str:
    """The hub cache the loaders read (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_snapshot(ref: str) -> str | None:
    """The folder of the complete cached snapshot of hub model ``ref``, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return snapshot_download(ref, local_files_only=True)
    except (LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError, OSError):
        return None


def offline_setting() -> str | None:
    """'HF_HUB_OFFLINE is set' when the environment turns the hub off, else None (no network)."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE") else None


def offline_reason() -> str | None:
    """Why the hub cannot be reached now (HF_HUB_OFFLINE, no route, no DNS), or None."""
    global _probe
    from huggingface_hub import constants

    off = offline_setting()
    if off:
        return off
    if _probe is not None and time.monotonic() - _probe[0] < 60:
        return _probe[1]
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S, follow_redirects=False)
        why = None
    except Exception as exc:  # any transport failure: DNS, refused, timeout, proxy
        why = f"{constants.ENDPOINT} cannot be reached ({type(exc).__name__}: {exc})"
    _probe = (time.monotonic(), why)
    return why


def uncached_reason(ref: str) -> str | None:
    """For `runner plan`: why hub model ``ref`` will need the network, or None when it is cached.
    Looks at the cache only (no network)."""
    if cached_snapshot(ref) is not None:
        return None
    return f"not in the Hugging Face cache ({cache_dir()})"


def resolve_hub_model(ref: str, *, key: str = "") -> str:
    """Where to load hub model ``ref`` from.

    The id itself while the hub can be reached (the library downloads or refreshes it); the
    cached snapshot folder when it cannot (so nothing waits on the network); and when it is
    neither cached nor reachable, :class:`ModelUnavailable` at once, naming the model, the cache
    folder looked in, and what to do. ``key`` names the spec key in the hint (callers put it in
    front of the message, as their other errors do).
    """
    why = offline_reason()
    if why is None:
        return ref
    snapshot = cached_snapshot(ref)
    if snapshot is not None:
        return snapshot
    raise ModelUnavailable(
        f"model {ref!r} is not in the Hugging Face cache ({cache_dir()}) and cannot be downloaded: {why}",
        hint=f"download it on a machine with network (`hf download {ref}`) into this cache (or point "
             "HF_HOME / HF_HUB_CACHE at a cache that has it)"
             + (f", or set {key} to a local folder" if key else ", or use a local folder instead"),
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
