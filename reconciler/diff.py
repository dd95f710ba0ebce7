"""Normalise Caddy configs and compute a readable structural diff. PURE.

Caddy re-serialises what it stores (sorted keys, re-encoded numbers, escaped ``<>&``), so configs are
compared as parsed objects, never as bytes. Lists of objects that carry ``@id`` are matched by id, so
a diff names the ingress rule that changed instead of a shifted index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


def normalise(config: Any) -> Any:
    """A plain-JSON copy of ``config`` (tuples become lists, keys become strings); None stays None."""
    return json.loads(json.dumps(config))


def same(live: Any, desired: Any) -> bool:
    """Structural equality of two parsed configs. Both sides are plain JSON values (``live`` from
    ``json.loads``, ``desired`` from the renderer, which emits only dicts, lists, str, int and bool), so
    Python's ``==`` compares them without re-serialising; ``1 == 1.0`` matches Caddy re-encoding numbers."""
    return bool(live == desired)


@dataclass(frozen=True, slots=True)
class Change:
    op: str  # "+", "-", "~"
    path: str
    old: Any = None
    new: Any = None

    def format(self) -> str:
        if self.op == "+":
            return f"+ {self.path}: {_short(self.new)}"
        if self.op == "-":
            return f"- {self.path}: {_short(self.old)}"
        return f"~ {self.path}: {_short(self.old)} -> {_short(self.new)}"


def _short(value: Any, limit: int = 200) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ids(items: list[Any]) -> dict[str, Any] | None:
    if not items or not all(isinstance(i, dict) and isinstance(i.get("@id"), str) for i in items):
        return None
    ids = {i["@id"]: i for i in items}
    return ids if len(ids) == len(items) else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def diff(live: Any, desired: Any, path: str = "") -> list[Change]:
    """Changes that turn ``live`` into ``desired``."""
    if live == desired and type(live) is type(desired):
        return []  # C-speed equality skips identical subtrees (almost all of them, in a big config)
    if isinstance(live, dict) and isinstance(desired, dict):
        return _keyed(live, desired, lambda key: _join(path, key))
    if isinstance(live, list) and isinstance(desired, list):
        a, b = _ids(live), _ids(desired)
        if not live and b is not None:  # (a list of rules added whole: one line per rule)
            a = {}
        elif not desired and a is not None:
            b = {}
        if a is None or b is None:  # plain lists: by position
            n = max(len(live), len(desired))
            return _keyed(dict(enumerate(live)), dict(enumerate(desired)), lambda i: f"{path}[{i}]", range(n),
                          whole=True)
        out = _keyed(a, b, lambda key: f"{path}[@id={key}]", whole=True)
        order = [i["@id"] for i in live], [i["@id"] for i in desired]
        if not out and order[0] != order[1]:
            out.append(Change("~", f"{path} (order)", *order))
        return out
    if live is None:
        return [Change("+", path or "(root)", new=desired)]
    if desired is None:
        return [Change("-", path or "(root)", old=live)]
    return [Change("~", path or "(root)", live, desired)]


def _holds_ids(value: Any) -> bool:
    """``value`` (a dict or list) holds an object with an ``@id`` somewhere."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "@id" in node:
                return True
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return False


def _keyed(live: dict[Any, Any], desired: dict[Any, Any], where: Callable[[Any], str],
           keys: Iterable[Any] | None = None, *, whole: bool = False) -> list[Change]:
    """The changes of two mappings, key by key (sorted unless ``keys`` gives the order). A member only
    one side has is one change when ``whole`` (list items: a rule added or removed); an object of a
    mapping that holds rules (objects with an ``@id``) is opened up, so the rules inside a server added or
    removed are named one by one."""
    out: list[Change] = []
    for key in keys if keys is not None else sorted(set(live) | set(desired)):
        p = where(key)
        if key not in desired:
            old = live[key]
            out.extend(diff(old, type(old)(), p) if not whole and _holds_ids(old) else [Change("-", p, old=old)])
        elif key not in live:
            new = desired[key]
            out.extend(diff(type(new)(), new, p) if not whole and _holds_ids(new) else [Change("+", p, new=new)])
        else:
            out.extend(diff(live[key], desired[key], p))
    return out
