"""Safe YAML loading that remembers where every value came from.

PyYAML's ``compose`` gives a node tree with source marks; we construct plain Python values from it
ourselves so that we can:

- refuse anything but the core schema (no ``!!python/...`` tags, no custom tags),
- reject duplicate keys (PyYAML silently keeps the last one),
- bound alias expansion (a "billion laughs" document is refused, not expanded),
- bound nesting depth (500 nested '[' is refused at its position, not a RecursionError),
- turn every loader failure (control characters, impossible dates, 5,000-digit numbers, bad merge
  keys, lone surrogates) into a :class:`YamlError` with the file:line:col where it happened,
- map every key path (``("train", "lora", "rank")``) to its file:line:col.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.core.errors import UserError

MAX_NODES = 200_000  # values constructed, aliases counted each time they are expanded
MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64  # nesting levels; real specs use fewer than 10

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


class YamlError(UserError):
    """A YAML problem with its position: ``message`` says what, ``mark`` where; ``str()`` is
    ``file:line:col: message``. A broken YAML file is a spec problem (exit 2)."""

    exit_code = 2

    def __init__(self, message: str, mark: Mark, hint: str = "", key_path: KeyPath = ()) -> None:
        super().__init__(message, hint=hint)
        self.mark = mark
        self.key_path = key_path  # where in the document, when known

    def __str__(self) -> str:
        return f"{self.mark}: {self.message}"


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


def _mark(node: yaml.Node | yaml.Event, file: str) -> Mark:
    m = node.start_mark
    return Mark(file, m.line + 1, m.column + 1)


def _text_mark(text: str, position: int, file: str) -> Mark:
    """file:line:col of a character offset in ``text`` (line breaks counted as YAML counts them)."""
    lines = re.split("\r\n|[\r\n\x85\u2028\u2029]", text[:position])
    return Mark(file, len(lines), len(lines[-1]) + 1)


def _too_deep(mark: Mark) -> YamlError:
    return YamlError(f"values are nested more than {MAX_DEPTH} levels deep", mark,
                     "A spec is a few levels of mappings and lists; remove the extra brackets or indentation.")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe composer with a depth limit (its composer recurses once per level)."""

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _too_deep(_mark(self.peek_event(), self.file))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


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
        if len(path) >= MAX_DEPTH:  # aliases can nest anchored values inside each other
            raise _too_deep(_mark(node, self.file))
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
        value = self._scalar_value(node, path)
        if hasattr(value, "isoformat"):  # dates become strings: specs are JSON-shaped
            value = value.isoformat()
        return value

    def _scalar_value(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        """The SafeLoader's ints/floats/bools/nulls/timestamps, with its failures positioned."""
        mark = _mark(node, self.file)
        try:
            value = self._scalar.construct_object(node, deep=True)
        except ValueError as exc:  # 2001-13-45, '!!float abc', more than 4300 digits
            reason = str(exc).split("; use sys.", 1)[0]  # not advice for a spec author
            raise YamlError(f"cannot read {node.value[:40]!r}: {reason}", mark,
                            "Quote the value to keep it as text.", path) from None
        except yaml.YAMLError as exc:
            raise YamlError(f"cannot read {node.value[:40]!r}: {getattr(exc, 'problem', None) or exc}",
                            mark, key_path=path) from None
        if isinstance(value, str):
            _check_text(value, mark, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise YamlError(f"{node.value!r} is not a finite number", mark,
                            "Specs are JSON-shaped: use a number, or null where a key allows 'none'.", path)
        return value

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        # Merge keys ("<<: *base") are supported: explicit keys win over merged ones, and only
        # explicit keys written twice are duplicates.
        n_explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
        try:
            self._scalar.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            m = exc.problem_mark or node.start_mark
            raise YamlError(f"bad merge key '<<': {exc.problem}", Mark(self.file, m.line + 1, m.column + 1),
                            "'<<' takes an alias of a mapping (<<: *base) or a list of them.") from None
        first_explicit = len(node.value) - n_explicit
        winners: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        seen: dict[str, Mark] = {}
        for i, (key_node, value_node) in enumerate(node.value):
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("mapping keys must be plain scalars", _mark(key_node, self.file))
            key = self._scalar_value(key_node, path)
            key = key if isinstance(key, str) else str(key)
            if i >= first_explicit:
                if key in seen:
                    raise YamlError(
                        f"duplicate key {key!r} (first defined at line {seen[key].line})",
                        _mark(key_node, self.file),
                        "Keep one of them: YAML would silently use the last.",
                    )
                seen[key] = _mark(key_node, self.file)
            winners.pop(key, None)  # keep the winner's place in the order
            winners[key] = (key_node, value_node)
        out: dict[str, Any] = {}
        for key, (key_node, value_node) in winners.items():
            self.key_marks.setdefault(path + (key,), _mark(key_node, self.file))
            out[key] = self.build(value_node, path + (key,))
        return out


def _check_text(value: str, mark: Mark, path: KeyPath) -> None:
    """Refuse characters that no spec value can carry: NUL (from a "\\0" escape) and lone
    surrogates (from "\\ud800"), which break every file name and every UTF-8 write."""
    for ch in value:
        if ch == "\0" or "\ud800" <= ch <= "\udfff":
            raise YamlError(f"the value contains the character U+{ord(ch):04X}, which a spec cannot hold",
                            mark, "Remove the escape sequence that produces it.", path)


def _char_name(code: int) -> str:
    import unicodedata

    return unicodedata.name(chr(code), "a control character")


def load_yaml_text(text: str, file: str | Path) -> LoadedYaml:
    file_s = str(file)
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise YamlError(f"file is larger than {MAX_BYTES // 1024} KiB", Mark(file_s, 1, 1))
    loader = None
    try:
        loader = _Loader(text, file_s)  # the reader checks every character here
        nodes = []
        while loader.check_node():
            nodes.append(loader.get_node())
    except yaml.reader.ReaderError as exc:
        raise YamlError(
            f"the file contains U+{exc.character:04X} ({_char_name(exc.character)}), which YAML does not allow",
            _text_mark(text, exc.position, file_s),
            "A spec is plain text: remove the character.",
        ) from None
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        mark = Mark(file_s, (m.line + 1) if m else 1, (m.column + 1) if m else 1)
        raise YamlError(f"YAML syntax error: {exc.problem or exc}", mark) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"YAML error: {exc}", Mark(file_s, 1, 1)) from None
    finally:
        if loader is not None:
            loader.dispose()
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
        raw = _read_capped(path)
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


def _read_capped(path: Path) -> bytes:
    """The file's bytes, never more than MAX_BYTES + 1 (so /dev/zero or a FIFO cannot hang us)."""
    import os
    import stat

    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(0, "not a regular file")
        return fh.read(MAX_BYTES + 1)
