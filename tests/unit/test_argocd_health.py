"""Argo CD health checks in deploy/argocd/health, run under Lua 5.1 the way Argo CD (gopher-lua) runs them."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51  # gopher-lua implements Lua 5.1; lupa's default runtime is a newer Lua

from sd_operator.api import generationbatch, lorajob, sdinstance

ARGOCD = Path(__file__).resolve().parents[2] / "deploy" / "argocd"
GROUP = ARGOCD / "health" / "sd-operator.dev"
KINDS = ("SDInstance", "LoRAJob", "GenerationBatch")
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended"}
# The globals Argo CD gives a health script when useOpenLibs is off (base, table, package, a safe os):
# no string or math library, so a script that needs them would fail here as it would in Argo CD.
SAFE_GLOBALS = ("assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring", "type")
SAFE_GLOBALS += ("unpack", "table", "os")

_lua = lua51.LuaRuntime(unpack_returned_tuples=True)
_sandbox = _lua.eval(
    "function(source, name, names) "
    "  local fn, err = loadstring('return function(obj) ' .. source .. '\\nend', name) "
    "  if fn == nil then error(err) end "
    "  local env = {} "
    "  for _, n in ipairs(names) do env[n] = _G[n] end "
    "  return setfenv(fn, env)() "
    "end"
)
_lua.execute("getmetatable('').__index = {}")  # no string library means no ("x"):upper() either
_scripts: dict[str, Any] = {}


def to_lua(value: Any) -> Any:
    """Python data -> Lua tables, recursively (table_from converts only the top level)."""
    if isinstance(value, dict):
        return _lua.table_from({k: to_lua(v) for k, v in value.items()})
    if isinstance(value, list):
        return _lua.table_from([to_lua(v) for v in value])
    return value


def health(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    if kind not in _scripts:
        source = (GROUP / kind / "health.lua").read_text()
        _scripts[kind] = _sandbox(source, f"{kind}/health.lua", to_lua(list(SAFE_GLOBALS)))
    return dict(_scripts[kind](to_lua(obj)))


def cases() -> list[Any]:
    out = []
    for kind in KINDS:
        for test in yaml.safe_load((GROUP / kind / "health_test.yaml").read_text())["tests"]:
            out.append(pytest.param(kind, test, id=f"{kind}-{Path(test['inputPath']).stem}"))
    return out


@pytest.mark.parametrize(("kind", "test"), cases())
def test_health_test_yaml(kind: str, test: dict[str, Any]) -> None:
    obj = yaml.safe_load((GROUP / kind / test["inputPath"]).read_text())
    assert obj["kind"] == kind
    assert health(kind, obj) == test["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_testdata_file_is_listed(kind: str) -> None:
    listed = {t["inputPath"] for t in yaml.safe_load((GROUP / kind / "health_test.yaml").read_text())["tests"]}
    assert listed == {f"testdata/{p.name}" for p in (GROUP / kind / "testdata").glob("*.yaml")}


SPECS = {
    "SDInstance": sdinstance.SDInstanceSpec,
    "LoRAJob": lorajob.LoRAJobSpec,
    "GenerationBatch": generationbatch.GenerationBatchSpec,
}


@pytest.mark.parametrize("kind", KINDS)
def test_testdata_specs_are_valid(kind: str) -> None:
    # Sample objects that the API would reject would test states that cannot happen.
    for path in (GROUP / kind / "testdata").glob("*.yaml"):
        SPECS[kind].model_validate(yaml.safe_load(path.read_text())["spec"])


# Expected status of every phase, per kind; a phase added to an enum fails the key check below until listed here.
JOB_LIKE = {"Succeeded": "Healthy", "Failed": "Degraded", "Suspended": "Suspended"}
EXPECTED = {
    "SDInstance": (sdinstance.Phase, {"Ready": "Healthy", "Degraded": "Degraded", "Failed": "Degraded"}),
    "LoRAJob": (lorajob.Phase, JOB_LIKE),
    "GenerationBatch": (generationbatch.Phase, JOB_LIKE),
}


def sample(kind: str, phase: str | None, generation: int, observed: int | None, **spec: Any) -> dict[str, Any]:
    status = {"phase": phase, "message": "why", "observedGeneration": observed, "replicas": 1, "readyReplicas": 1}
    obj = {"kind": kind, "metadata": {"name": "x", "generation": generation}, "spec": spec}
    obj["status"] = {k: v for k, v in status.items() if v is not None}
    return obj


@pytest.mark.parametrize("kind", KINDS)
def test_every_phase_maps_to_a_status(kind: str) -> None:
    phases, special = EXPECTED[kind]
    assert set(special) <= {p.value for p in phases}
    for phase in phases:
        hs = health(kind, sample(kind, phase.value, 2, 2))
        assert hs["status"] == special.get(phase.value, "Progressing"), phase
        assert hs["message"]


@pytest.mark.parametrize("kind", ["LoRAJob", "GenerationBatch"])
def test_spec_suspend_suspends_unfinished_work(kind: str) -> None:
    for phase in EXPECTED[kind][0]:
        hs = health(kind, sample(kind, phase.value, 2, 2, suspend=True))
        finished = {"Succeeded": "Healthy", "Failed": "Degraded"}
        assert hs["status"] == finished.get(phase.value, "Suspended"), phase


def test_scaled_to_zero_is_healthy_in_every_phase() -> None:
    for phase in sdinstance.Phase:
        assert health("SDInstance", sample("SDInstance", phase.value, 2, 2, replicas=0))["status"] == "Healthy"


@pytest.mark.parametrize("kind", KINDS)
def test_stale_generation_is_always_progressing(kind: str) -> None:
    phases = [None, *(p.value for p in EXPECTED[kind][0])]
    specs = [{}, {"suspend": True}, {"replicas": 0}]
    for phase, spec, observed in itertools.product(phases, specs, [None, 1, 6]):
        hs = health(kind, sample(kind, phase, 7, observed, **spec))
        assert hs == {"status": "Progressing", "message": "Waiting for the operator to observe generation 7"}


def test_statuses_are_argo_cd_statuses() -> None:
    for kind in KINDS:
        for test in yaml.safe_load((GROUP / kind / "health_test.yaml").read_text())["tests"]:
            assert test["healthStatus"]["status"] in STATUSES


def test_committed_argocd_cm_matches_the_lua_files() -> None:
    spec = importlib.util.spec_from_file_location("render_argocd_cm", ARGOCD / "render_argocd_cm.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    rendered = render.render()
    assert (ARGOCD / "argocd-cm-health.yaml").read_text() == rendered, "run python deploy/argocd/render_argocd_cm.py"
    data = yaml.safe_load(rendered)["data"]
    key = "resource.customizations.health.sd-operator.dev_{}"
    assert data == {key.format(k): (GROUP / k / "health.lua").read_text() for k in KINDS}


def autoscaled(phase: str, reason: str, pods: int, ready: int, message: str, **spec: Any) -> dict[str, Any]:
    """An SDInstance with spec.autoscaling as the operator reports it (the Ready condition carries the reason)."""
    model = {
        "family": "sd15",
        "checkpoint": {"name": "m.safetensors", "source": {"http": {"url": "https://h/m.safetensors"}}},
    }
    obj = {
        "kind": "SDInstance",
        "metadata": {"name": "sleepy", "generation": 3},
        "spec": {"model": model, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}, **spec},
        "status": {
            "phase": phase,
            "message": message,
            "observedGeneration": 3,
            "replicas": pods,
            "readyReplicas": ready,
            "desiredReplicas": pods,
            "conditions": [
                {"type": "Ready", "status": "True" if phase == "Ready" else "False", "reason": reason},
                {"type": "ScaledToZero", "status": "True" if pods == 0 else "False", "reason": reason},
            ],
        },
    }
    sdinstance.SDInstanceSpec.model_validate(obj["spec"])
    return obj


def test_autoscaled_instance_at_zero_is_healthy() -> None:
    at_zero = "scaled to zero for lack of demand; the gateway holds the next request while a pod starts"
    for spec in ({}, {"replicas": 0}, {"replicas": 2}):  # spec.replicas is ignored under autoscaling
        hs = health("SDInstance", autoscaled("Ready", "ScaledToZero", 0, 0, at_zero, **spec))
        assert hs == {"status": "Healthy", "message": "Scaled to zero"}, spec


def test_autoscaled_from_zero_is_progressing_until_ready() -> None:
    starting = "Counterfeit-V3.0_fp16.safetensors 41% (856 MiB of 2.1 GiB)"
    for spec in ({}, {"replicas": 0}, {"replicas": 1}):
        hs = health("SDInstance", autoscaled("Downloading", "Downloading", 1, 0, starting, **spec))
        assert hs == {"status": "Progressing", "message": f"Downloading: {starting}"}, spec
        hs = health("SDInstance", autoscaled("Loading", "Loading", 1, 0, "loading the checkpoint", **spec))
        assert hs["status"] == "Progressing", spec
    hs = health("SDInstance", autoscaled("Ready", "Ready", 2, 2, "scaled 0 -> 2 (demand 3)"))
    assert hs == {"status": "Healthy", "message": "2/2 replicas ready"}
