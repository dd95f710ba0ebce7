"""The JSON Schemas of ``schemas/`` and schema validation with readable, located messages. PURE.

The schema files are the single source of truth for the loader, the API and editors. They ship inside
the wheel as ``reconciler/_schemas`` and are read from the repository's ``schemas/`` in a checkout.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.parse import ParsedDocument

if TYPE_CHECKING:
    import jsonschema

_rs: Any
try:  # Rust validator for the fast "is it valid?" path (~1 us/doc instead of ~400 us)
    import jsonschema_rs as _rs
except ImportError:  # pragma: no cover - optional speed-up
    _rs = None

INGRESS_SCHEMA = "ingress.schema.json"
INSTANCE_SCHEMA = "instance.schema.json"


def schemas_dir() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here / "_schemas"
    return packaged if packaged.is_dir() else here.parent / "schemas"


@cache
def load_schema(name: str) -> dict[str, Any]:
    with (schemas_dir() / name).open(encoding="utf-8") as fh:
        schema: dict[str, Any] = json.load(fh)
    return schema


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """The full validator, for readable error messages (imported when first needed: ~70 ms of start-up
    otherwise, and valid documents never need it while jsonschema-rs is there)."""
    import jsonschema

    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@cache
def _fast(name: str) -> Any:
    """Compiled Rust validator for the same schema, or None when jsonschema-rs is unavailable."""
    if _rs is None:
        return None
    return _rs.validator_for(load_schema(name), validate_formats=True)


def format_path(path: tuple[str | int, ...] | list[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_UNEXPECTED = re.compile(r"\('(.+?)' (?:was|were) unexpected\)")


#: fields whose values are secrets: a schema error about one never quotes it
SECRET_FIELDS = frozenset({"request_header_auth", "basic_auth"})


def _message(err: jsonschema.ValidationError) -> tuple[tuple[str | int, ...], str]:
    path = tuple(err.absolute_path)
    where = format_path(path)
    if any(part in SECRET_FIELDS for part in path):
        return path, f"{where}: invalid ({err.validator} {err.validator_value!r}; the value is not shown)"
    schema: Any = err.schema
    if err.validator == "additionalProperties" and isinstance(schema, dict) and isinstance(err.instance, dict):
        known = schema.get("properties", {})
        extra = sorted(set(err.instance) - set(known))
        if extra:
            field = format_path((*path, extra[0]))
            allowed = ", ".join(sorted(known))
            return (*path, extra[0]), f"{field}: unknown field (allowed: {allowed})"
    if err.validator == "required":
        missing = re.match(r"'(.+?)' is a required property", err.message)
        name = missing.group(1) if missing else "?"
        return path, f"{format_path((*path, name))}: required field is missing"
    if err.validator == "type":
        return path, f"{where or 'document'}: expected {err.validator_value}, got {_short(err.instance)}"
    if err.validator == "pattern":
        return path, f"{where}: {_short(err.instance)} does not match {err.validator_value}"
    options: Any = err.validator_value
    if (err.validator == "oneOf" and isinstance(options, list)
            and all(isinstance(sub, dict) and list(sub) == ["required"] for sub in options)):
        names = " or ".join(str(sub["required"][0]) for sub in options)
        return path, f"{where or 'document'}: exactly one of {names} is required"
    if err.validator == "anyOf" and path and path[-1] == "ip":
        return path, f"{where}: {_short(err.instance)} is not an IPv4 or IPv6 address"
    return path, f"{where or 'document'}: {err.message}"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


#: fields of a manifest holding free text (pages, messages), where tabs and line breaks belong
FREE_TEXT_FIELDS = frozenset({"error_pages", "maintenance"})


def control_character_path(data: Any, free_text: frozenset[str] = frozenset()) -> tuple[str | int, ...] | None:
    """Path of the first string (key or value) holding a control character, iteratively; tab, line feed
    and carriage return are allowed in strings under the keys ``free_text`` (at the top level)."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            allowed = "\t\n\r" if path and path[0] in free_text else ""
            if any((ord(c) < 0x20 and c not in allowed) or ord(c) == 0x7F for c in value):
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(k)):
                    return (*path, str(k))
                stack.append(((*path, k), v))
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
    return None


def schema_errors(name: str, doc: ParsedDocument) -> list[tuple[int, str]]:
    """``(line, message)`` for every schema violation of ``doc``, sorted by line."""
    fast = _fast(name)
    if fast is not None and fast.is_valid(doc.data):
        return []
    v = validator(name)
    if v.is_valid(doc.data):
        if fast is None:
            return []
        # Python's `$` also matches before a trailing newline, ECMA/Rust's does not: trust the strict one
        path = control_character_path(doc.data)
        if path is not None:
            return [(doc.line_of(path), f"{format_path(path) or 'document'}: control characters are not allowed")]
        return [(doc.line, "document: a value does not match its pattern")]
    found = {}
    for err in v.iter_errors(doc.data):
        path, msg = _message(err)
        found[msg] = doc.line_of(path)
    return sorted(((line, msg) for msg, line in found.items()), key=lambda t: (t[0], t[1]))
