"""Safe YAML/JSON parsing of manifest text into documents with line numbers. PURE: bytes in, data out.

Only plain data is accepted: mappings with string keys, sequences, and the scalar types of JSON
(str, int, float, bool, null). Object-constructing tags (``!!python/...``), ``!!binary``, ``!!set``
and any custom tag are refused. Alias expansion is budgeted so an alias bomb ("billion laughs") is
rejected instead of eating memory; duplicate keys are an error instead of a silent overwrite.

A file holds one or more documents: YAML ``---`` separated documents, and a top-level sequence is
read as a list of documents (so a JSON file can hold an array of manifests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

try:  # the C parser is ~10x faster; fall back to pure Python where libyaml is missing
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - depends on the build of PyYAML
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

# Plain scalars starting with one of these can only resolve to str under YAML 1.1's implicit resolvers
# (bool/null start with y n t f o ~, numbers/timestamps with digits, sign or dot, merge with '<').
_STR_START = frozenset("abcdeghijklmpqrsuvwxzABCDEGHIJKLMPQRSUVWXZ_/")


class _Loader(_BaseLoader):
    """The safe loader with a fast path for the commonest scalar tag resolution (plain strings)."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode:
            if implicit[0] and value:
                if value[0] in _STR_START:
                    return _STR
                if value.isascii() and value.isdigit() and (value[0] != "0" or value == "0"):
                    return _INT
        elif kind is yaml.MappingNode and implicit:
            return _MAP
        elif kind is yaml.SequenceNode and implicit:
            return _SEQ
        return super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]

#: Most nodes (after alias expansion) accepted from one file.
MAX_NODES = 100_000
#: Deepest nesting accepted.
MAX_DEPTH = 64

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
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
    """One document of a file: its data, where it starts, and (lazily) the line of every value in it.

    The YAML node tree is kept so lines are looked up only when an error needs one.
    """

    index: int
    line: int
    data: Any
    node: yaml.Node | None = field(default=None, repr=False, compare=False)

    def line_of(self, path: Path) -> int:
        """Line of the value at ``path`` (of its key, inside a mapping), or of its nearest ancestor."""
        node, line = self.node, self.line
        for part in path:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == part:
                        node, line = value, key.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    @property
    def lines(self) -> Mapping[Path, int]:
        """Every path in the document mapped to its line (for tools and tests; not used on hot paths)."""
        out: dict[Path, int] = {(): self.line}
        stack: list[tuple[Path, Any]] = [((), self.data)]
        while stack:
            path, value = stack.pop()
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for k, v in items:
                child = (*path, k)
                out[child] = self.line_of(child)
                stack.append((child, v))
        return out


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

    def build(self, node: yaml.Node, depth: int) -> Any:
        self._nodes += 1
        line = node.start_mark.line + 1
        if self._nodes > MAX_NODES:
            raise ParseError(
                f"document expands to more than {MAX_NODES} values (alias bomb or oversized document)", line
            )
        if depth > MAX_DEPTH:
            raise ParseError(f"nesting deeper than {MAX_DEPTH} levels", line)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, line)
        if id(node) in self._active:
            raise ParseError("recursive alias", line)
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ:
                    raise ParseError(f"unsupported tag {node.tag!r}", line)
                return [self.build(item, depth + 1) for item in node.value]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, depth, line)
        finally:
            self._active.discard(id(node))
        raise ParseError(f"unsupported YAML node {type(node).__name__}", line)  # pragma: no cover

    def _scalar(self, node: yaml.ScalarNode, line: int) -> Any:
        if node.tag not in _SCALAR_TAGS:
            raise ParseError(f"unsupported tag {node.tag!r} (only plain data is allowed)", line)
        if node.tag in (_STR, _TIMESTAMP):
            return node.value
        if (node.tag == _INT and node.value.isascii() and node.value.isdigit()
                and (node.value[0] != "0" or node.value == "0")):
            return int(node.value)
        try:
            return self._loader.construct_object(node)
        except yaml.YAMLError as exc:
            raise ParseError(f"bad scalar {node.value!r}: {exc}", line) from exc

    def _mapping(self, node: yaml.MappingNode, depth: int, line: int) -> Any:
        if node.tag != _MAP:
            raise ParseError(f"unsupported tag {node.tag!r}", line)
        if any(k.tag == _MERGE for k, _ in node.value):
            _flatten(node, set())
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                raise ParseError(f"mapping keys must be strings, got {key_node.tag!r}", key_line)
            key = key_node.value
            if key in result:
                raise ParseError(f"duplicate key {key!r}", key_line)
            result[key] = self.build(value_node, depth + 1)
        return result


def _flatten(node: yaml.MappingNode, active: set[int]) -> None:
    """Resolve merge keys (``<<``) in place, as YAML specifies: the mapping's own keys win over merged
    ones, and an earlier mapping in ``<<: [a, b]`` wins over a later one. Only real duplicates among the
    mapping's own keys are left for the caller to report. (PyYAML's ``flatten_mapping`` keeps overridden
    pairs, which made every override a "duplicate key", and its order differs between versions.)
    """
    if id(node) in active:
        raise ParseError("recursive alias", node.start_mark.line + 1)
    active.add(id(node))
    merged: list[tuple[yaml.Node, yaml.Node]] = []
    own: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE:
            own.append((key_node, value_node))
            continue
        subs = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for sub in subs:
            if not isinstance(sub, yaml.MappingNode) or sub.tag != _MAP:
                raise ParseError("bad merge key: expected a mapping or a list of mappings",
                                 sub.start_mark.line + 1)
            if any(k.tag == _MERGE for k, _ in sub.value):
                _flatten(sub, active)
            merged.extend(sub.value)
    seen = {k.value for k, _ in own if isinstance(k, yaml.ScalarNode)}
    kept: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in merged:
        if isinstance(key_node, yaml.ScalarNode):
            if key_node.value in seen:
                continue
            seen.add(key_node.value)
        kept.append((key_node, value_node))
    node.value = kept + own
    active.discard(id(node))


def parse_documents(text: str) -> list[ParsedDocument]:
    """Parse YAML (or JSON, a subset) ``text`` into documents.

    Raises :class:`ParseError` for syntax errors, unsupported tags, alias bombs and duplicate keys.
    Empty documents are skipped; a top-level sequence yields one document per item. JSON that YAML 1.1
    cannot read (surrogate-pair escapes such as ``"\\ud83d\\ude00"``, raw DEL characters) is read
    with the JSON parser instead.
    """
    try:
        return _parse_yaml(text)
    except ParseError as yaml_error:
        if text.lstrip()[:1] not in ("{", "["):
            raise
        try:
            return _parse_json(text)
        except ParseError:
            raise yaml_error from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(text: str) -> list[ParsedDocument]:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ParseError(f"JSON syntax error: {exc.msg}", exc.lineno) from exc
    except RecursionError as exc:
        raise ParseError("nesting too deep") from exc
    items = data if isinstance(data, list) else [data]
    return [ParsedDocument(i, 1, item) for i, item in enumerate(x for x in items if x is not None)]


def _parse_yaml(text: str) -> list[ParsedDocument]:
    loader = _Loader(text)
    builder = _Builder(loader)
    docs: list[ParsedDocument] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node guards it
                break
            items = list(node.value) if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ else [node]
            for item in items:
                data = builder.build(item, 0)
                if data is not None:
                    docs.append(ParsedDocument(len(docs), item.start_mark.line + 1, data, item))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or str(exc)
        context = f" {exc.context}" if exc.context else ""
        raise ParseError(f"YAML syntax error: {problem}{context}".strip(), line) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (control characters, ...)
        line = text[: exc.position].count("\n") + 1 if isinstance(exc.position, int) else None
        raise ParseError(f"YAML error: unacceptable character #x{exc.character:04x}: {exc.reason}"
                         if isinstance(exc.character, int) else f"YAML error: {exc.reason}", line) from exc
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
    # the BOM by hand: the "utf-8-sig" codec is pure Python, "utf-8" is the C fast path
    skip = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return (raw[skip:] if skip else raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + skip
        line = raw[:start].count(b"\n") + 1
        raise ParseError(f"not valid UTF-8 text (byte {start})", line) from exc
