"""`runner publish`: released, versioned artifacts in object storage.

A version is the chosen LoRA (and its kohya twin), its metadata, the evaluation it was chosen by,
the latest report, the spec and a manifest (spec digest, git commit and dirty flag, tag, the
checkpoint and its metrics, every file's sha256 and size, runner version, created time), stored
content-addressed (see :mod:`runner.publish.store` for the layout and the write order):

1. :func:`runner.publish.release.build` gathers and hashes the files from the workspace;
2. an existing manifest for the tag is compared by content digest: equal is a no-op, different is
   refused (:class:`VersionExists`) - a published version is never overwritten;
3. blobs the store lacks are uploaded;
4. the manifest is written last, create-only.

Not to be confused with the stage ``publish`` hook (:mod:`runner.core.contract`), which copies
exports out of the store into ``.runner/exports/`` after an apply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from runner.core.errors import UserError
from runner.publish.release import NothingToPublish, Release, build, content_digest
from runner.publish.store import BadDestination, Store, StoreError

__all__ = ["BadDestination", "NothingToPublish", "PublishError", "Published", "StoreError", "VersionExists",
           "list_versions", "publish"]


class PublishError(UserError):
    """A request `runner publish` cannot carry out (no tag, a bad destination); exit 2."""

    exit_code = 2


class VersionExists(UserError):
    """The tag is published with other content; the message names the tag and what differs.
    Exit 4, so a script can tell it from other failures."""

    exit_code = 4


@dataclass
class Published:
    character: str
    tag: str
    url: str  # the manifest's URL
    digest: str
    uploaded: list[str] = field(default_factory=list)  # files sent
    skipped: list[str] = field(default_factory=list)  # files whose blob was already there
    unchanged: bool = False  # the same version was already published: nothing was written
    warnings: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


def check_tag(tag: str | None, spec_file: Any) -> str:
    if not tag:
        raise PublishError(f"{spec_file}: no version tag: pass --tag v1 or set publish.tag in the spec")
    from runner.spec.schema import section_schema

    if not re.match(section_schema("publish")["properties"]["tag"]["pattern"], tag):
        raise PublishError(f"tag {tag!r}: use letters, digits, '.', '_' or '-' (at most 64, not starting "
                           "with '.', '_' or '-'), e.g. v3 or 2026-12-rc1")
    return tag


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two manifests of one tag, in a few words."""
    before = {f["path"]: f["sha256"] for f in old.get("files", [])}
    after = {f["path"]: f["sha256"] for f in new.get("files", [])}
    bits = [f"{p} changed" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    bits += [f"{p} added" for p in sorted(after.keys() - before.keys())]
    bits += [f"{p} removed" for p in sorted(before.keys() - after.keys())]
    bits += [f"{k} changed" for k in ("spec", "checkpoint", "metrics") if old.get(k) != new.get(k)]
    return ", ".join(bits[:6]) + (f" and {len(bits) - 6} more" if len(bits) > 6 else "") or "the manifest differs"


def _same_or_refuse(store: Store, release: Release, existing: dict[str, Any]) -> Published | None:
    """A no-op result when ``existing`` is this very version; refuses a different one."""
    url = f"{store.scheme}://{store.manifest_path(release.character, release.tag)}"
    ours = release.manifest["content_digest"]
    theirs = existing.get("content_digest") or content_digest(existing)
    if theirs == ours:
        return Published(release.character, release.tag, url, ours, unchanged=True,
                         skipped=[f.path for f in release.files], warnings=release.warnings, manifest=existing)
    raise VersionExists(
        f"{release.character} {release.tag} is already published at {url} with other content "
        f"({_differences(existing, release.manifest)}; published {theirs[:19]}, now {ours[:19]}); "
        "a published version is never overwritten: publish under a new tag (--tag)")


def publish(spec: Any, to: str, tag: str, *, checkpoint: str | None = None,
            endpoint_url: str | None = None) -> Published:
    """Publish ``spec``'s chosen checkpoint as version ``tag`` at ``to`` (see the module doc)."""
    tag = check_tag(tag, spec.file)
    store = Store(to, endpoint_url)
    release = build(spec, tag, checkpoint)
    mpath = store.manifest_path(release.character, tag)
    with store.lock():
        existing = store.read_json(mpath)
        if existing is not None:
            return _same_or_refuse(store, release, existing)
        done = Published(release.character, tag, f"{store.scheme}://{mpath}", release.manifest["content_digest"],
                         warnings=release.warnings, manifest=release.manifest)
        for f in release.files:
            blob = store.blob(release.character, f.sha256)
            if store.has_blob(blob, f.size):
                done.skipped.append(f.path)
                continue
            store.put_blob(f.local, f.data, blob)
            if not store.has_blob(blob, f.size):
                raise StoreError(f"uploading {f.path} to {store.where()}: "
                                 f"the stored blob does not have its size {f.size}")
            done.uploaded.append(f.path)
        body = json.dumps(release.manifest, indent=1, sort_keys=True).encode("utf-8") + b"\n"
        try:
            store.create_only(mpath, body)
        except FileExistsError:  # another machine published this tag meanwhile
            return _same_or_refuse(store, release, store.read_json(mpath) or {})
    return done


def list_versions(to: str, character: str | None = None, *, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Every published version under ``to`` (of ``character``, or of every character there):
    tag, created, checkpoint, metrics, digest; oldest first per character."""
    store = Store(to, endpoint_url)
    rows = []
    for name in [character] if character else store.list_dirs(store.root):
        for tag in store.list_dirs(store.path(name, "versions")):
            m = store.read_json(store.manifest_path(name, tag))
            if m is None:
                continue
            rows.append({"character": m.get("character", name), "tag": m.get("tag", tag), "created": m.get("created"),
                         "checkpoint": m.get("checkpoint") or {}, "metrics": m.get("metrics") or {},
                         "digest": m.get("content_digest"), "git": m.get("git"),
                         "url": f"{store.scheme}://{store.manifest_path(name, tag)}"})
    return sorted(rows, key=lambda r: (r["character"], r["created"] or "", r["tag"]))
