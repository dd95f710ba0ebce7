"""Safe YAML/JSON parsing of manifest text into documents with line numbers. PURE: bytes in, data out.

Only plain data is accepted: mappings with string keys, sequences, and the scalar types of JSON
(str, int, float, bool, null). Object-constructing tags (``!!python/...``), ``!!binary``, ``!!set``
and any custom tag are refused. Alias expansion is budgeted so an alias bomb ("billion laughs") is
rejected instead of eating memory; duplicate keys are an error instead of a silent overwrite.

A file holds one or more documents: YAML ``---`` separated documents, and a top-level sequence is
read as a list of documents (so a JSON file can hold an array of manifests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

try:  # the C parser is ~10x faster; fall back to pure Python where libyaml is missing
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on the build of PyYAML
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

#: Most nodes (after alias expansion) accepted from one file.
MAX_NODES = 100_000
#: Deepest nesting accepted.
MAX_DEPTH = 64

_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_SCALAR_TAGS = frozenset(
    {
        _STR,
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
        _TIMESTAMP,
    }
)

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """One document of a file: its data, where it starts, and the line of every value in it."""

    index: int
    line: int
    data: Any
    lines: Mapping[Path, int] = field(repr=False, compare=False)

    def line_of(self, path: Path) -> int:
        """Line of the value at ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            found = self.lines.get(p)
            if found is not None:
                return found
            p = p[:-1]
        return self.line


class ParseError(Exception):
    """The text is not acceptable; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _Builder:
    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._nodes = 0
        self._active: set[int] = set()

    def build(self, node: yaml.Node, path: Path, lines: dict[Path, int], depth: int) -> Any:
        self._nodes += 1
        line = node.start_mark.line + 1
        if self._nodes > MAX_NODES:
            raise ParseError(
                f"document expands to more than {MAX_NODES} values (alias bomb or oversized document)", line
            )
        if depth > MAX_DEPTH:
            raise ParseError(f"nesting deeper than {MAX_DEPTH} levels", line)
        lines[path] = line
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, line)
        if id(node) in self._active:
            raise ParseError("recursive alias", line)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ:
                    raise ParseError(f"unsupported tag {node.tag!r}", line)
                return [self.build(item, (*path, i), lines, depth + 1) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path, lines, depth, line)
        finally:
            self._active.discard(id(node))
        raise ParseError(f"unsupported YAML node {type(node).__name__}", line)  # pragma: no cover

    def _scalar(self, node: yaml.ScalarNode, line: int) -> Any:
        if node.tag not in _SCALAR_TAGS:
            raise ParseError(f"unsupported tag {node.tag!r} (only plain data is allowed)", line)
        if node.tag in (_STR, _TIMESTAMP):
            return node.value
        try:
            return self._loader.construct_object(node)
        except yaml.YAMLError as exc:
            raise ParseError(f"bad scalar {node.value!r}: {exc}", line) from exc

    def _mapping(self, node: yaml.MappingNode, path: Path, lines: dict[Path, int], depth: int, line: int) -> Any:
        if node.tag != _MAP:
            raise ParseError(f"unsupported tag {node.tag!r}", line)
        if any(k.tag == _MERGE for k, _ in node.value):
            try:
                self._loader.flatten_mapping(node)
            except yaml.YAMLError as exc:
                raise ParseError(f"bad merge key: {exc}", line) from exc
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                raise ParseError(f"mapping keys must be strings, got {key_node.tag!r}", key_line)
            key = key_node.value
            if key in result:
                raise ParseError(f"duplicate key {key!r}", key_line)
            result[key] = self.build(value_node, (*path, key), lines, depth + 1)
            lines[(*path, key)] = key_line
        return result


def parse_documents(text: str) -> list[ParsedDocument]:
    """Parse YAML (or JSON, a subset) ``text`` into documents.

    Raises :class:`ParseError` for syntax errors, unsupported tags, alias bombs and duplicate keys.
    Empty documents are skipped; a top-level sequence yields one document per item.
    """
    loader = _Loader(text)
    builder = _Builder(loader)
    docs: list[ParsedDocument] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node guards it
                break
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
                items = list(node.value)
            else:
                items = [node]
            for item in items:
                lines: dict[Path, int] = {}
                data = builder.build(item, (), lines, 0)
                if data is not None:
                    docs.append(ParsedDocument(len(docs), item.start_mark.line + 1, data, lines))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or str(exc)
        context = f" {exc.context}" if exc.context else ""
        raise ParseError(f"YAML syntax error: {problem}{context}".strip(), line) from exc
    except yaml.YAMLError as exc:
        raise ParseError(f"YAML error: {exc}") from exc
    except RecursionError as exc:
        raise ParseError("nesting too deep") from exc
    finally:
        loader.dispose()
    return docs


def decode(raw: bytes) -> str:
    """Decode file bytes as UTF-8 text (BOM allowed); binary content is refused."""
    if b"\x00" in raw:
        raise ParseError("binary file (contains NUL bytes), expected YAML or JSON text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ParseError(f"not valid UTF-8 text (byte {exc.start})", line) from exc
