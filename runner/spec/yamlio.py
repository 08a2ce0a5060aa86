"""Safe YAML loading that remembers where every value came from.

PyYAML's ``compose`` gives a node tree with source marks; we construct plain Python values from it
ourselves so that we can:

- refuse anything but the core schema (no ``!!python/...`` tags, no custom tags),
- reject duplicate keys (PyYAML silently keeps the last one),
- bound alias expansion (a "billion laughs" document is refused, not expanded),
- map every key path (``("train", "lora", "rank")``) to its file:line:col.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 200_000  # values constructed, aliases counted each time they are expanded
MAX_BYTES = 4 * 1024 * 1024

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Mark:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass
class LoadedYaml:
    data: Any
    file: Path
    # key path -> mark of the value; key_marks: key path -> mark of the key itself
    value_marks: dict[KeyPath, Mark] = field(default_factory=dict)
    key_marks: dict[KeyPath, Mark] = field(default_factory=dict)
    text: str = ""

    def mark_for(self, path: KeyPath, *, prefer_key: bool = False) -> Mark:
        """The closest known mark for a key path (walks up to the parent when unknown)."""
        p = tuple(path)
        while True:
            if prefer_key and p in self.key_marks:
                return self.key_marks[p]
            if p in self.value_marks:
                return self.value_marks[p]
            if p in self.key_marks:
                return self.key_marks[p]
            if not p:
                return Mark(str(self.file), 1, 1)
            p = p[:-1]


class YamlError(Exception):
    """A YAML problem with its position."""

    def __init__(self, message: str, mark: Mark, hint: str = "") -> None:
        super().__init__(f"{mark}: {message}")
        self.message = message
        self.mark = mark
        self.hint = hint


_SAFE_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
}


def _mark(node: yaml.Node, file: str) -> Mark:
    m = node.start_mark
    return Mark(file, m.line + 1, m.column + 1)


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.count = 0
        self.value_marks: dict[KeyPath, Mark] = {}
        self.key_marks: dict[KeyPath, Mark] = {}
        self._scalar = yaml.SafeLoader.__new__(yaml.SafeLoader)  # only for construct_scalar helpers
        yaml.SafeLoader.__init__(self._scalar, "")
        self._active: set[int] = set()

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise YamlError(
                f"document expands to more than {MAX_NODES} values (alias bomb?)",
                _mark(node, self.file),
                "Remove the deeply nested anchors/aliases.",
            )
        self.value_marks.setdefault(path, _mark(node, self.file))
        if node.tag not in _SAFE_TAGS:
            raise YamlError(
                f"tag {node.tag!r} is not allowed",
                _mark(node, self.file),
                "Specs use plain YAML only: remove the '!' tag.",
            )
        if isinstance(node, yaml.MappingNode):
            if id(node) in self._active:
                raise YamlError("recursive alias", _mark(node, self.file))
            self._active.add(id(node))
            try:
                return self._mapping(node, path)
            finally:
                self._active.discard(id(node))
        if isinstance(node, yaml.SequenceNode):
            if id(node) in self._active:
                raise YamlError("recursive alias", _mark(node, self.file))
            self._active.add(id(node))
            try:
                return [self.build(child, path + (i,)) for i, child in enumerate(node.value)]
            finally:
                self._active.discard(id(node))
        # Scalars: let the SafeLoader resolve ints/floats/bools/nulls/timestamps.
        value = self._scalar.construct_object(node, deep=True)
        if hasattr(value, "isoformat"):  # dates become strings: specs are JSON-shaped
            value = value.isoformat()
        return value

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        # Merge keys ("<<: *base") are supported: flatten first, explicit keys win.
        self._scalar.flatten_mapping(node)
        out: dict[str, Any] = {}
        seen: dict[str, Mark] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("mapping keys must be plain scalars", _mark(key_node, self.file))
            key = self._scalar.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            kmark = _mark(key_node, self.file)
            if key in seen:
                raise YamlError(
                    f"duplicate key {key!r} (first defined at line {seen[key].line})",
                    kmark,
                    "Keep one of them: YAML would silently use the last.",
                )
            seen[key] = kmark
            self.key_marks.setdefault(path + (key,), kmark)
            out[key] = self.build(value_node, path + (key,))
        return out


def load_yaml_text(text: str, file: str | Path) -> LoadedYaml:
    file_s = str(file)
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise YamlError(f"file is larger than {MAX_BYTES // 1024} KiB", Mark(file_s, 1, 1))
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        mark = Mark(file_s, (m.line + 1) if m else 1, (m.column + 1) if m else 1)
        raise YamlError(f"YAML syntax error: {exc.problem or exc}", mark) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"YAML error: {exc}", Mark(file_s, 1, 1)) from None
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        return LoadedYaml(data=None, file=Path(file_s), text=text)
    if len(nodes) > 1:
        raise YamlError(
            "file holds several YAML documents ('---'); a spec is one document",
            _mark(nodes[1], file_s),
        )
    builder = _Builder(file_s)
    data = builder.build(nodes[0], ())
    return LoadedYaml(
        data=data,
        file=Path(file_s),
        value_marks=builder.value_marks,
        key_marks=builder.key_marks,
        text=text,
    )


def load_yaml_file(path: Path) -> LoadedYaml:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise YamlError("file not found", Mark(str(path), 1, 1)) from None
    except IsADirectoryError:
        raise YamlError("is a folder, not a YAML file", Mark(str(path), 1, 1)) from None
    except OSError as exc:
        raise YamlError(f"cannot read: {exc.strerror}", Mark(str(path), 1, 1)) from None
    if len(raw) > MAX_BYTES:
        raise YamlError(f"file is larger than {MAX_BYTES // 1024} KiB", Mark(str(path), 1, 1))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlError("file is not UTF-8 text", Mark(str(path), line, 1)) from None
    return load_yaml_text(text, path)
