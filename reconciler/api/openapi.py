"""The OpenAPI document: ``schemas/openapi.yaml`` with the ingress JSON Schema inlined (one schema)."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import yaml

from reconciler.schema import INGRESS_SCHEMA, load_schema, schemas_dir

_EXTERNAL = "./ingress.schema.json"


def _rewrite(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                if v == _EXTERNAL:
                    v = "#/components/schemas/IngressSpec"
                elif v.startswith(_EXTERNAL + "#/$defs/") or v.startswith("#/$defs/"):
                    v = "#/components/schemas/IngressSpec_" + v.rsplit("/", 1)[1]
            out[k] = _rewrite(v)
        return out
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    return node


@cache
def _document() -> dict[str, Any]:
    with (schemas_dir() / "openapi.yaml").open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    ingress = copy.deepcopy(load_schema(INGRESS_SCHEMA))
    defs = ingress.pop("$defs", {})
    for key in ("$schema", "$id"):
        ingress.pop(key, None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["IngressSpec"] = ingress
    for name, schema in defs.items():
        schemas[f"IngressSpec_{name}"] = schema
    result: dict[str, Any] = _rewrite(doc)
    return result


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the served OpenAPI document."""
    return copy.deepcopy(_document())
