"""Well-known folders.

- The cache root holds things that are expensive to make and safe to share between projects and
  runs, each keyed by content: built-in tiny models, downloaded/converted models, latent and
  text-embedding caches. ``CHARACTER_RUNNER_CACHE`` overrides it (tests point it at a temp folder).
  Stages get it as ``ctx.cache_dir``.
- The workspace (``<project>/.runner``) holds the state database, the lock, the artifact store,
  scratch space for resumable stages, and logs.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("CHARACTER_RUNNER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "character-runner"


def workspace_dir(project_root: Path) -> Path:
    return project_root / ".runner"


# --------------------------------------------------------------------------- names and paths

MAX_NAME_BYTES = 100  # a kohya folder '<repeats>_<trigger> <class>' stays under the 255-byte limit
_WINDOWS_RESERVED = '<>:"|?*'
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be (part of) a file or folder name, or None when it can.

    The one rule for every user value that reaches a file name (schema ``format: file-name``):
    no path separators, no '..', no control or invisible format characters, no leading dot (a
    hidden file), no characters or device names Windows refuses, no trailing dot, no leading or
    trailing space, at most 100 bytes.
    """
    import unicodedata

    if not name:
        return None
    for sep in ("/", "\\"):
        if sep in name:
            return f"it contains {sep!r}, a path separator"
    if ".." in name:
        return "it contains '..'"
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"it contains the control character U+{ord(ch):04X}"
        if ch in _WINDOWS_RESERVED:
            return f"it contains {ch!r}, which Windows does not allow in file names"
    if name.startswith("."):
        return "it starts with '.', which makes a hidden file"
    if name != name.strip():
        return "it starts or ends with a space"
    if name.endswith("."):
        return "it ends with '.', which Windows drops from file names"
    if name.split(".")[0].upper() in _WINDOWS_DEVICES:
        return f"'{name.split('.')[0]}' is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def sub_path_problem(value: str) -> str | None:
    """Why ``value`` is not a relative path that stays inside its folder (``format: sub-path``),
    e.g. a weight file or subfolder inside a model repository; None when it is."""
    if value.startswith("~"):
        return "it starts with '~' (a home folder)"
    if value.startswith("/"):
        return "it is an absolute path"
    for part in value.split("/"):
        if part in ("", "."):
            continue
        problem = file_name_problem(part)
        if problem:
            return problem
    return None


def storage_url_problem(url: str) -> str | None:
    """Why ``url`` is not a place `runner publish` can upload to (``format: storage-url``), or None.

    ``s3://bucket/prefix`` (S3 or an S3-compatible server) or ``file:///absolute/folder``; no
    credentials inside the URL (they come from the environment only, so they never reach a spec,
    a manifest or a log)."""
    from urllib.parse import urlsplit

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("s3", "file"):
        return "it is not an s3://bucket/prefix or file:///folder URL"
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return "it holds credentials (user@ or key:secret@); set them in the environment instead"
    if scheme == "s3" and not parts.netloc:
        return "it names no bucket (s3://bucket/prefix)"
    if scheme == "file" and (parts.netloc or not rest.startswith("/")):
        return "a file:// URL must name an absolute folder (file:///srv/releases)"
    if any(file_name_problem(p) for p in (parts.netloc + parts.path).split("/") if p):
        return "a part of it cannot be a file or folder name (hidden, '..', control characters)"
    return None


def inside(path: Path | str, root: Path | str) -> bool:
    """Whether ``path`` lies in ``root`` once every symlink in both is resolved."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        return True
    except ValueError:
        return False


def iter_tree(root: Path, recursive: bool = True, enter=None):
    """(relative posix path, os.DirEntry) of everything under folder ``root``, the way the runner
    reads folders: hidden names are skipped; sub-folders (symlinked ones too, each real folder
    once, so a link loop ends) are entered when ``recursive`` and ``enter(entry)`` allows it.
    Entries that cannot be read are skipped."""
    try:
        st = os.stat(root)
    except OSError:
        return
    stack = [(str(root), "")]
    seen = {(st.st_dev, st.st_ino)}
    while stack:
        folder, rel = stack.pop()
        try:
            it = os.scandir(folder)
        except OSError:
            continue
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                yield f"{rel}{entry.name}", entry
                try:
                    if not (recursive and entry.is_dir(follow_symlinks=True)):
                        continue
                    if enter is not None and not enter(entry):
                        continue
                    dst = entry.stat(follow_symlinks=True)
                except OSError:
                    continue
                if (dst.st_dev, dst.st_ino) not in seen:
                    seen.add((dst.st_dev, dst.st_ino))
                    stack.append((entry.path, f"{rel}{entry.name}/"))


def links_leaving(folder: Path, root: Path, *, recursive: bool = True) -> list[tuple[str, str]]:
    """(relative path, real target) of every symlink under ``folder`` that leads outside ``root``,
    among the entries the runner would read (see iter_tree); such links are not entered."""
    found: list[tuple[str, str]] = []

    def stays(entry: os.DirEntry) -> bool:
        return not entry.is_symlink() or inside(entry.path, root)

    for rel, entry in iter_tree(folder, recursive, enter=stays):
        if entry.is_symlink() and not inside(entry.path, root):
            found.append((rel, os.path.realpath(entry.path)))
    return sorted(found)


def list_files(root: Path | str, recursive: bool = True) -> list[Path]:
    """The files the runner reads under ``root`` (see iter_tree), sorted; ``[root]`` for a file."""
    root = Path(root)
    if not os.path.isdir(root):
        return [root] if os.path.isfile(root) else []
    out = []
    for _, entry in iter_tree(root, recursive):
        try:
            if entry.is_file(follow_symlinks=True):
                out.append(Path(entry.path))
        except OSError:
            continue
    return sorted(out)


# --------------------------------------------------------------------------- videos and globs

# The video files a folder or glob source reads (the train_video clip reader knows the same ones).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi")
_GLOB_MAGIC = frozenset("*?[")


def is_video_file(name: str) -> bool:
    """Whether a file name ends with one of :data:`VIDEO_EXTENSIONS` (any case)."""
    return name.lower().endswith(VIDEO_EXTENSIONS)


def split_glob(value: str) -> tuple[str, str] | None:
    """(root folder, pattern) of a glob: the leading path parts without ``*``, ``?`` or ``[`` and
    the rest (``rides/**/*.mp4`` -> ``('rides', '**/*.mp4')``; ``*.mp4`` -> ``('', '*.mp4')``);
    None when ``value`` has no glob character."""
    parts = value.split("/")
    first = next((k for k, part in enumerate(parts) if _GLOB_MAGIC & set(part)), None)
    if first is None:
        return None
    return "/".join(parts[:first]), "/".join(parts[first:])


def glob_walks_folders(pattern: str) -> bool:
    """Whether matching ``pattern`` needs sub-folders (``**``, or a wildcard before a ``/``)."""
    return "/" in pattern.strip("/")


def _matches(parts: list[str], segs: list[str]) -> bool:
    """Segment-wise glob match: ``*``, ``?`` and ``[...]`` within one name, ``**`` any number of
    folders (none included)."""
    from fnmatch import fnmatchcase

    if not segs:
        return not parts
    if segs[0] == "**":
        return any(_matches(parts[k:], segs[1:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], segs[0]) and _matches(parts[1:], segs[1:])


def video_files_under(root: Path | str, *, pattern: str | None = None,
                      recursive: bool = True) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the video files under folder ``root``, sorted: every one the
    runner reads (iter_tree: hidden names skipped, ``recursive`` honoured) or, with ``pattern``
    (a glob relative to ``root``), those it matches (sub-folders only as far as it reaches). One
    walk; ``path`` lies under ``root`` as the walk found it (symlinks are not resolved)."""
    segs = [s for s in pattern.split("/") if s] if pattern is not None else None
    walk = recursive if segs is None else glob_walks_folders(pattern or "")
    out = []
    for rel, entry in iter_tree(Path(root), walk):
        if not is_video_file(entry.name) or (segs is not None and not _matches(rel.split("/"), segs)):
            continue
        try:
            if entry.is_file(follow_symlinks=True):
                out.append((rel, Path(entry.path)))
        except OSError:
            continue
    return sorted(out)
