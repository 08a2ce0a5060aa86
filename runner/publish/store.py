"""The published store, through fsspec (s3fs for ``s3://``, the local filesystem for ``file://``).

Layout under the destination prefix::

    <prefix>/<character>/blobs/sha256/<sha256>            file contents, named by their hash
    <prefix>/<character>/versions/<tag>/manifest.json     one per version; names its blobs

Blobs are written before the manifest, and a blob that exists with its size is not sent again.
The manifest is written last and only if absent: on S3 with a conditional put (``If-None-Match:
*``, fsspec's ``mode="create"``), on a local folder by hard-linking a finished temporary file
into place (``link(2)`` fails when the name exists). Both run under a lock file in the cache
folder, which also makes the existence check safe on backends with neither (this machine only).

Credentials come only from the environment (botocore's chain: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...); the endpoint of an S3-compatible server from
``--endpoint-url``, ``publish.endpoint_url`` or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterator

from runner.core.errors import UserError
from runner.core.fs import atomic_write_bytes, copy_atomic
from runner.paths import storage_url_problem


class StoreError(UserError):
    """The destination cannot be reached or used; the message says why and what to set (exit 1)."""


class BadDestination(StoreError):
    """The destination URL itself is unusable (a request error, not a storage failure: exit 2)."""

    exit_code = 2


def redacted(url: str) -> str:
    """``url`` without anything before an '@' in its host part (never echo a secret)."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{'***@' + host.rsplit('@', 1)[1] if '@' in host else host}{slash}{path}"


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def scrubbed(text: str) -> str:
    """``text`` with the credentials of the environment blanked out (storage errors echo
    requests; nothing of a credential reaches the terminal or a log)."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class Store:
    """One destination URL (s3://bucket/prefix or file:///folder), opened through fsspec."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        problem = storage_url_problem(url)
        if problem:
            raise BadDestination(f"destination {redacted(url)!r}: {problem}")
        self.url = url.rstrip("/")
        self.scheme = url.split("://", 1)[0]
        self.endpoint_url = endpoint_url or (endpoint_from_env() if self.scheme == "s3" else None)
        self.fs, self.root = self._open()

    def _open(self) -> tuple[Any, str]:
        try:
            import fsspec
        except ImportError:
            raise StoreError("fsspec is not installed: pip install 'character-runner[publish]'") from None
        opts: dict[str, Any] = {}
        if self.scheme == "s3":
            try:
                import s3fs  # noqa: F401
            except ImportError:
                raise StoreError("s3:// needs s3fs: pip install 'character-runner[publish]'") from None
            if self.endpoint_url:
                opts["endpoint_url"] = self.endpoint_url
            opts["skip_instance_cache"] = True  # a fresh listing cache: what is stored now
        if self.scheme == "file":
            opts["auto_mkdir"] = True
        fs, root = fsspec.core.url_to_fs(self.url, **opts)
        return fs, root.rstrip("/")

    # ----------------------------------------------------------------------- names

    def where(self) -> str:
        """The destination for messages (never with credentials: the URL cannot hold any)."""
        return self.url + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def blob(self, character: str, sha256: str) -> str:
        return self.path(character, "blobs", "sha256", sha256)

    def manifest_path(self, character: str, tag: str) -> str:
        return self.path(character, "versions", tag, "manifest.json")

    # ----------------------------------------------------------------------- operations

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """This machine's lock for the destination (one publisher at a time per URL)."""
        from runner.buildcache import file_lock
        from runner.paths import cache_root

        name = hashlib.sha256(f"{self.url}|{self.endpoint_url}".encode()).hexdigest()[:32]
        with file_lock(cache_root() / "publish-locks" / f"{name}.lock"):
            yield

    def call(self, what: str, fn: Any, *args: Any, reading: bool = False, **kw: Any) -> Any:
        """Run one fsspec call; storage errors become a StoreError that names the destination
        (FileNotFoundError stays itself when ``reading``: a thing that is not there yet)."""
        try:
            return fn(*args, **kw)
        except FileExistsError:
            raise
        except FileNotFoundError as exc:
            if reading:
                raise
            raise StoreError(f"{what} at {self.where()}: not found ({scrubbed(str(exc))}); "
                             "does the bucket exist?") from None
        except PermissionError as exc:
            raise StoreError(f"{what} at {self.where()}: permission denied ({scrubbed(str(exc))}); "
                             "check the credentials in "
                             "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from None
        except Exception as exc:  # botocore and aiohttp errors have no common base class
            name = type(exc).__name__
            hint = ("; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
                    if "Credential" in name else "")
            raise StoreError(scrubbed(f"{what} at {self.where()}: {name}: {exc}{hint}")) from None

    def read_json(self, path: str) -> dict[str, Any] | None:
        """The JSON document at ``path``, or None when there is none."""
        try:
            data = self.call(f"reading {path}", self.fs.cat_file, path, reading=True)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StoreError(f"{self.scheme}://{path} is not valid JSON ({exc}); "
                             "it was not written by runner publish") from None

    def has_blob(self, path: str, size: int) -> bool:
        try:
            info = self.call(f"checking {path}", self.fs.info, path, reading=True)
        except FileNotFoundError:
            return False
        return info.get("type") == "file" and int(info.get("size") or -1) == size

    def put_blob(self, local: Any, data: bytes | None, path: str) -> None:
        """Upload one blob; on a local folder through a temporary name (:mod:`runner.core.fs`),
        so a reader never sees half a file under a hash."""
        if self.scheme == "file":
            if data is not None:
                self.call(f"uploading {path}", atomic_write_bytes, path, data)
            else:
                self.call(f"uploading {path}", copy_atomic, local, path)
        elif data is not None:
            self.call(f"uploading {path}", self.fs.pipe_file, path, data)
        else:
            self.call(f"uploading {path}", self.fs.put_file, str(local), path)

    def create_only(self, path: str, data: bytes) -> None:
        """Write ``path`` only if it does not exist (FileExistsError otherwise)."""
        if self.scheme == "file":
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            try:
                self.fs.link(tmp, path)  # atomic: fails when the name exists
            finally:
                self.fs.rm_file(tmp)
            return
        self.call(f"writing {path}", self.fs.pipe_file, path, data, mode="create")

    def list_dirs(self, path: str) -> list[str]:
        """Names of the folders directly under ``path`` (none when it does not exist)."""
        try:
            entries = self.call(f"listing {path}", self.fs.ls, path, detail=True, refresh=True, reading=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
