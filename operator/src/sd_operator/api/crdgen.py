"""Turns the pydantic models into structural CRD schemas (the models are the single source of truth).

pydantic's JSON Schema is not a structural schema: it has $ref/$defs, anyOf with null for optional
fields, const, exclusive bounds as numbers, and titles. This converts it, and refuses what a CRD
cannot express instead of emitting something the apiserver would reject.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

# JSON Schema keywords a CRD schema accepts (apiextensions JSONSchemaProps), minus the forbidden ones.
ALLOWED = {
    "type",
    "format",
    "description",
    "default",
    "enum",
    "maximum",
    "minimum",
    "exclusiveMaximum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "multipleOf",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "properties",
    "additionalProperties",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "anyOf",
}
DROPPED = {"title", "$defs", "discriminator"}
UNSUPPORTED = {"prefixItems", "patternProperties", "dependencies", "$schema", "oneOf", "allOf", "not", "const"}


class SchemaError(ValueError):
    """The model uses something a structural CRD schema cannot express."""


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs, path=model.__name__)


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inlines $ref (also behind allOf/anyOf-with-null), merging the referring node's own keys."""
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node.update(node.pop("allOf")[0])
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v != {"type": "null"}]
        if len(variants) != len(node["anyOf"]) and len(variants) == 1:
            # Optional[X]: the field is simply not required; null is not written (exclude_none).
            node.pop("anyOf")
            node = {**variants[0], **node}
            if node.get("default", "absent") is None:
                node.pop("default")
    if "$ref" in node:
        ref = node.pop("$ref")
        name = ref.rsplit("/", 1)[-1]
        if name not in defs:
            raise SchemaError(f"{path}: unresolved reference {ref}")
        target = copy.deepcopy(defs[name])
        own_rules = node.pop("x-kubernetes-validations", [])
        merged = {**target, **node}
        rules = target.get("x-kubernetes-validations", []) + own_rules
        if rules:
            merged["x-kubernetes-validations"] = rules
        node = _resolve(merged, defs, path)
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs, path)
    for key in list(node):
        if key in DROPPED:
            node.pop(key)
        elif key in UNSUPPORTED:
            raise SchemaError(f"{path}: '{key}' cannot be expressed in a structural CRD schema")
        elif key not in ALLOWED:
            raise SchemaError(f"{path}: unknown schema keyword '{key}'")
    if "anyOf" in node:
        if not node.get("x-kubernetes-int-or-string"):
            raise SchemaError(f"{path}: unions other than Optional[X] and int-or-string are not structural")
        node.pop("anyOf")
        # The apiserver derives the int-or-string shape itself; keep the node minimal and structural.
    if "description" in node:
        node["description"] = " ".join(node["description"].split())
    # pydantic's gt/lt become JSON Schema 2020 numbers; OpenAPI v3.0 wants booleans.
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node.get(bound), bool):
            node[flag] = node.pop(bound)
            node[bound] = True
    if "properties" in node:
        node["properties"] = {name: _convert(sub, defs, f"{path}.{name}") for name, sub in node["properties"].items()}
        node.setdefault("type", "object")
    if "items" in node:
        node["items"] = _convert(node["items"], defs, f"{path}[]")
    ap = node.get("additionalProperties")
    if isinstance(ap, dict):
        node["additionalProperties"] = _convert(ap, defs, f"{path}{{}}")
    elif ap is False:
        node.pop("additionalProperties")  # forbidden in CRDs; unknown fields are pruned instead
    elif ap is True:
        node.pop("additionalProperties")
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in node and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        if "enum" in node:
            node["type"] = "string"
        else:
            raise SchemaError(f"{path}: no type")
    return node


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(manifest: dict[str, Any]) -> str:
    """Deterministic YAML for generated files (sorted keys, no anchors)."""
    return yaml.dump(manifest, Dumper=_NoAliasDumper, sort_keys=True, width=100)


def crd(
    *,
    group: str,
    version: str,
    kind: str,
    plural: str,
    short_names: list[str],
    categories: list[str],
    spec: type[BaseModel],
    status: type[BaseModel],
    description: str,
    printer_columns: list[dict[str, Any]],
    scale: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A complete apiextensions.k8s.io/v1 CustomResourceDefinition for one kind."""
    spec_schema = structural_schema(spec)
    status_schema = structural_schema(status)
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = scale
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": {"app.kubernetes.io/part-of": "sd-operator"}},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": categories,
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": " ".join(description.split()),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version of the object."},
                                "kind": {"type": "string", "description": "Kind of the object."},
                                "metadata": {"type": "object"},  # only name/generateName may be constrained here
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }
