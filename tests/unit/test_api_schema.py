"""The CRDs are generated from the pydantic models, structural, documented and up to date."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from sd_operator import crds
from sd_operator.api import KINDS, all_crds
from sd_operator.api.crdgen import SchemaError, structural_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _walk(node: dict, path: str = ""):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _schemas():
    for name, crd in all_crds().items():
        yield name, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crds_match_the_models() -> None:
    dirs = [ROOT / "crds"]
    chart_crds = ROOT / "charts" / "sd-operator" / "crds"
    if (ROOT / "charts" / "sd-operator" / "Chart.yaml").exists():
        dirs.append(chart_crds)
    assert crds.stale_files(dirs) == [], "run `make crds` and commit the result"


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = [
        f"{name}{path}"
        for name, schema in _schemas()
        for path, node in _walk(schema)
        if path not in ("", ".metadata") and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert missing == []


def test_schemas_are_structural() -> None:
    forbidden = {"$ref", "$defs", "oneOf", "allOf", "const", "prefixItems", "title", "patternProperties"}
    for name, schema in _schemas():
        for path, node in _walk(schema):
            assert not forbidden & set(node), f"{name}{path}: {forbidden & set(node)}"
            assert node.get("additionalProperties") not in (False, True), f"{name}{path}"
            assert (
                "type" in node
                or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), f"{name}{path} has no type"
            if "anyOf" in node:
                pytest.fail(f"{name}{path}: anyOf left in the schema")


def test_defaults_are_declared_where_a_default_is_right() -> None:
    sdi = all_crds()["sd-operator.dev_sdinstances.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = sdi["properties"]["spec"]["properties"]
    assert spec["replicas"]["default"] == 1
    assert spec["gpu"]["properties"]["resourceName"]["default"] == "nvidia.com/gpu"
    assert spec["webui"]["properties"]["vramMode"]["default"] == "auto"
    assert spec["gpu"]["default"] == {} and spec["webui"]["default"] == {}
    ckpt = spec["model"]["properties"]["checkpoint"]["properties"]
    assert ckpt["allowUnsafePickle"]["default"] is False


def test_scale_subresource_and_categories() -> None:
    by_kind = {c["spec"]["names"]["kind"]: c for c in all_crds().values() if c["spec"]["group"] == "sd-operator.dev"}
    sdi = by_kind["SDInstance"]["spec"]
    assert sdi["versions"][0]["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    for crd in by_kind.values():
        assert crd["spec"]["names"]["categories"] == ["sd"]
        assert "status" in crd["spec"]["versions"][0]["subresources"]
    assert by_kind["LoRAJob"]["spec"]["names"]["shortNames"] == ["lj", "lora"]
    columns = [c["name"] for c in sdi["versions"][0]["additionalPrinterColumns"]]
    assert columns[:6] == ["Model", "Ready", "Desired", "Phase", "GPU", "Age"]


def test_int_or_string_quantities() -> None:
    sdi = all_crds()["sd-operator.dev_sdinstances.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    requests = sdi["properties"]["spec"]["properties"]["resources"]["properties"]["requests"]
    assert requests["additionalProperties"] == {"x-kubernetes-int-or-string": True}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_parse_with_the_models(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    kind = {k.kind: k for k in KINDS}[doc["kind"]]
    assert doc["apiVersion"] == kind.api_version
    kind.spec.model_validate(doc["spec"])


def test_converter_refuses_what_a_crd_cannot_express() -> None:
    class Tupled(BaseModel):
        pair: tuple[int, str]

    class Unioned(BaseModel):
        value: int | list[str]

    with pytest.raises(SchemaError, match="prefixItems"):
        structural_schema(Tupled)
    with pytest.raises(SchemaError, match="unions"):
        structural_schema(Unioned)


def test_optional_fields_are_not_required_and_not_nullable() -> None:
    class M(BaseModel):
        a: int
        b: str | None = None

    schema = structural_schema(M)
    assert schema["required"] == ["a"]
    assert schema["properties"]["b"] == {"type": "string"}
