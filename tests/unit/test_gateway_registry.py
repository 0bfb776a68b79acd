"""Model names: what a request may call a model, and 404 vs 503 when nothing serves it yet."""

from __future__ import annotations

from typing import Any

import pytest

from sd_operator.gateway.discovery import declared_model
from sd_operator.gateway.dispatch import Backend, Dispatcher
from sd_operator.gateway.registry import ModelNotReady, Registry, UnknownModel

SHA = "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"


def instance(name: str, model: str, phase: str | None = None, ready: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "art", "name": name},
        "spec": {"model": {"checkpoint": {"name": model, "sha256": SHA.upper()}}},
        "status": {"phase": phase, "conditions": [{"type": "Ready", **ready}] if ready else []},
    }


def test_a_model_is_found_by_file_name_stem_title_hash_and_alias() -> None:
    d = Dispatcher()
    d.add(Backend("http://a", "sd_xl_base_1.0.safetensors", title=f"sd_xl_base_1.0 [{SHA[:10]}]", sha256=SHA,
                  aliases=frozenset({"XL"})))  # fmt: skip
    registry = Registry(d)
    for name in ("sd_xl_base_1.0.safetensors", "SD_XL_BASE_1.0", f"sd_xl_base_1.0 [{SHA[:10]}]", SHA[:8], "xl"):
        assert registry.resolve(name) == "sd_xl_base_1.0.safetensors", name


def test_the_name_index_follows_backends_that_come_and_go() -> None:
    d = Dispatcher()
    registry = Registry(d)
    with pytest.raises(UnknownModel):
        registry.resolve("anime.safetensors")
    b = Backend("http://a", "anime.safetensors")
    d.add(b)
    assert registry.resolve("anime") == "anime.safetensors"
    d.remove(b)
    with pytest.raises(UnknownModel):
        registry.resolve("anime")


def test_a_declared_model_without_ready_pods_is_not_ready_rather_than_unknown() -> None:
    d = Dispatcher()
    d.add(Backend("http://b", "other.safetensors"))
    registry = Registry(d)
    declared = declared_model(
        instance("xl", "sd_xl_base_1.0.safetensors", "Downloading", {"status": "False", "message": "fetching"})
    )
    assert declared is not None and declared.sha256 == SHA  # checksums compare in lower case
    registry.declared[declared.instance] = declared
    with pytest.raises(ModelNotReady) as not_ready:
        registry.resolve(SHA[:10])
    assert "art/xl Downloading (fetching)" in str(not_ready.value)
    with pytest.raises(UnknownModel) as unknown:
        registry.resolve("nope")
    assert unknown.value.available == ["other.safetensors"]


def test_declared_model_reads_phase_and_only_a_not_ready_reason() -> None:
    ready = declared_model(instance("a", "m.safetensors", "Ready", {"status": "True", "message": "serving"}))
    assert ready is not None and (ready.phase, ready.message, ready.instance) == ("Ready", None, "art/a")
    assert declared_model({"metadata": {"namespace": "art", "name": "x"}, "spec": {}}) is None
    # No declared sha256: the one the instance's fetchers computed (status.modelSHA256) names it too.
    computed = instance("c", "m.safetensors", "Loading")
    del computed["spec"]["model"]["checkpoint"]["sha256"]
    assert declared_model(computed).sha256 is None  # type: ignore[union-attr]
    computed["status"]["modelSHA256"] = SHA
    assert declared_model(computed).sha256 == SHA  # type: ignore[union-attr]
