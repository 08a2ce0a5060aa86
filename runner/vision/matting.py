"""Background removal through rembg's ONNX sessions (https://github.com/danielgatis/rembg).

A model reference (``dataset.export.identity_crops.background.model``) is one of:

- ``rembg:<session>`` (``rembg:u2net``, ``rembg:isnet-general-use``, ``rembg:birefnet-portrait``,
  ``rembg:bria-rmbg``, ...): that rembg session with its own model file, which must already be in
  rembg's model folder (``$REMBG_HOME``/``$U2NET_HOME``, else ``~/.rembg``; rembg's own lookup).
  The runner never lets rembg download it.
- a local ``.onnx`` file, or a folder holding exactly one;
- a Hugging Face hub id (``briaai/RMBG-1.4``) whose snapshot holds one ``.onnx`` file, found
  through :mod:`runner.hub` (the cache when the hub cannot be reached).

A file or hub model runs in the rembg session named by ``session``: the session decides the
input size, normalisation and how the output becomes a mask (u2net: 320 px, ImageNet mean/std,
min-max; isnet/dis: 1024 px; birefnet: 1024 px and a sigmoid; ...), so it must be the one the
model was exported for. The file is loaded by that session class, with only its download step
replaced by the resolved path.

A model whose ONNX metadata has ``character_runner.tiny_random`` = ``1`` (the tests build such
graphs) is reported as a tiny random model: its masks mean nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runner.core.errors import StageError

SCHEME = "rembg:"
TINY_RANDOM_KEY = "character_runner.tiny_random"
OUTPUTS = ("flat", "rgba")
_UNUSABLE = ("sam", "u2net_cloth_seg")  # need prompts / give several masks, not one foreground
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass
class Matting:
    """A loaded background-removal model and what the manifest says about it."""

    session: Any
    info: dict[str, Any] = field(default_factory=dict)

    def alpha(self, rgb: np.ndarray) -> np.ndarray:
        """The foreground alpha (HxW uint8) of an RGB uint8 image."""
        from PIL import Image
        from rembg import remove

        mask = remove(Image.fromarray(np.ascontiguousarray(rgb)), session=self.session, only_mask=True)
        return np.asarray(mask.convert("L").resize((rgb.shape[1], rgb.shape[0])), dtype=np.uint8)


def session_names() -> list[str]:
    """The rembg sessions a model can run in (local, one foreground mask)."""
    from rembg.sessions import sessions

    def usable(cls: Any) -> bool:  # the remote, paid and keyed sessions of newer rembg versions are not
        return (getattr(cls, "is_local", lambda: True)() and not getattr(cls, "requires_credentials", lambda: False)()
                and not getattr(cls, "has_usage_cost", lambda: False)())

    return sorted(n for n, cls in sessions.items() if n not in _UNUSABLE and usable(cls))


def _session_class(name: str, key: str) -> type:
    from rembg.sessions import sessions

    if name not in session_names():
        import difflib

        close = difflib.get_close_matches(name, session_names(), n=1)
        raise StageError(f"{key}: unknown rembg session {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                         hint="one of: " + ", ".join(session_names()))
    return sessions[name]


def _only_onnx(folder: Path, what: str, key: str) -> Path:
    files = sorted(p for p in folder.rglob("*.onnx") if p.is_file())
    if len(files) != 1:
        listed = ", ".join(p.relative_to(folder).as_posix() for p in files[:6]) or "none"
        raise StageError(f"{key}: {what} must hold exactly one .onnx file; it holds {len(files)} ({listed})",
                         hint="point the key at the .onnx file itself")
    return files[0]


def resolve_model_file(ref: str, project_root: Path, key: str) -> tuple[Path, str | None]:
    """(the .onnx file of ``ref``, the rembg session it names or None). Never downloads a
    ``rembg:`` model; a hub id is downloaded only while the hub can be reached, else read from the
    cache (:func:`runner.hub.resolve_hub_model`)."""
    if ref.startswith(SCHEME):
        name = ref[len(SCHEME):]
        cls = _session_class(name, key)
        found = cls.resolve_existing(f"{name}.onnx")
        if found is None:
            raise StageError(f"{key}: rembg model {name!r} is not in rembg's model folder ({cls.model_dir()})",
                             hint=f"download {name}.onnx yourself into {cls.model_dir()} (the runner never "
                                  "downloads it), or point the key at a local .onnx file")
        return Path(found), name
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else project_root / p
    if p.is_file():
        return p, None
    if p.is_dir():
        return _only_onnx(p, str(p), key), None
    from runner import hub

    if not hub.is_hub_id(ref, project_root):
        raise StageError(f"{key}: {ref!r} is neither a file, a folder, a hub id nor rembg:<session>",
                         hint="give a local .onnx file, a hub id such as briaai/RMBG-1.4, or rembg:u2net")
    try:
        where = hub.resolve_hub_model(ref, key=key)
    except hub.ModelUnavailable as exc:
        raise StageError(f"{key}: {exc}", hint=exc.hint) from None
    if where == ref:
        from huggingface_hub import snapshot_download

        where = snapshot_download(ref, allow_patterns=["*.onnx"])
    return _only_onnx(Path(where), f"hub model {ref}", key), None


def load_matting(ref: str, session: str | None, project_root: Path, *, key: str) -> Matting:
    """The rembg session for model ``ref`` (see the module docstring)."""
    path, named = resolve_model_file(ref, Path(project_root), key)
    name = session or named
    if name is None:
        raise StageError(f"{key}: a model file needs its rembg session ({key.rsplit('.', 1)[0]}.session)",
                         hint="the session the model was exported for: " + ", ".join(session_names()))
    cls = _session_class(name, key.rsplit(".", 1)[0] + ".session")
    local = type(f"Local{cls.__name__}", (cls,), {"download_models": classmethod(lambda c, *a, **k: str(path))})
    import onnxruntime as ort

    try:
        sess = local(name, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # a file that is not an ONNX model, a graph the runtime refuses
        raise StageError(f"{key}: {path} cannot be loaded as an ONNX model ({type(exc).__name__}: {exc})",
                         hint="check the file (re-download it), or use another model") from None
    meta = sess.inner_session.get_modelmeta().custom_metadata_map or {}
    info = {"model": ref, "session": name, "file": path.name, "sha256": _sha256(path),
            "tiny_random_model": meta.get(TINY_RANDOM_KEY) == "1"}
    return Matting(sess, info)


def _sha256(path: Path) -> str:
    from runner.core.hashing import file_sha256

    return file_sha256(path)


def check_color(color: str, key: str) -> tuple[int, int, int]:
    if not isinstance(color, str) or not _COLOR.match(color):
        raise StageError(f"{key}: {color!r} is not a colour", hint="write #rrggbb, e.g. #ffffff")
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def composite(rgb: np.ndarray, alpha: np.ndarray, output: str, color: tuple[int, int, int]) -> np.ndarray:
    """RGBA (``output == "rgba"``) or the foreground over ``color`` (``"flat"``), uint8."""
    if output == "rgba":
        return np.dstack([rgb, alpha]).astype(np.uint8)
    a = alpha.astype(np.float32)[..., None] / 255.0
    flat = rgb.astype(np.float32) * a + np.asarray(color, np.float32) * (1.0 - a)
    return np.clip(np.rint(flat), 0, 255).astype(np.uint8)


__all__ = ["Matting", "OUTPUTS", "SCHEME", "check_color", "composite", "load_matting", "resolve_model_file",
           "session_names"]
