"""Where the files that ship with the package live (schemas, templates, presets).

In a wheel, schemas/ and templates/ are packaged as runner/_data/<name>; in a source checkout or
an editable install they are the top-level folders of the repository.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def resource_dir(name: str) -> Path:
    """Folder of a shipped resource: 'schemas', 'templates' or 'presets'."""
    if name == "presets":
        return _PKG / "presets"
    packaged = _PKG / "_data" / name
    if packaged.is_dir():
        return packaged
    source = _PKG.parent / name
    if source.is_dir():
        return source
    raise FileNotFoundError(
        f"character-runner resource folder {name!r} not found (looked in {packaged} and {source}); "
        "the installation is incomplete: reinstall the package"
    )


def schema_path() -> Path:
    return resource_dir("schemas") / "character.schema.json"
