"""Render functions of GenerationBatch and LoRAJob, and the batch's status from its Job."""

from __future__ import annotations

import json
from typing import Any

from sd_operator.api.generationbatch import GenerationBatchSpec
from sd_operator.api.lorajob import LoRAJobSpec
from sd_operator.api.models import ModelFile
from sd_operator.controllers.generationbatch import derive_status
from sd_operator.render import generationbatch as gb
from sd_operator.render import lorajob as lj
from sd_operator.render.sdinstance import RenderSettings

OWNER = {
    "apiVersion": "sd-operator.dev/v1alpha1",
    "kind": "GenerationBatch",
    "metadata": {"name": "b", "namespace": "ns", "uid": "u-1", "labels": {"team": "art"}},
}
SETTINGS = RenderSettings(operator_image="op:1")


def batch_spec(**over: Any) -> GenerationBatchSpec:
    raw = {
        "target": {"model": "m.safetensors"},
        "items": {"inline": [{"prompt": "x"}]},
        "output": {"pvc": {"claimName": "out", "path": "runs/1"}},
        **over,
    }
    return GenerationBatchSpec.model_validate(raw)


def test_runner_command_mounts_and_permissions() -> None:
    spec = batch_spec(items={"file": {"claimName": "data", "path": "prompts.jsonl"}})
    job = gb.render_job(OWNER, spec, "m.safetensors", SETTINGS, "http://gw:8080")
    pod = job["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[:2] == ["sd-operator", "batch"] and cmd[cmd.index("--model") + 1] == "m.safetensors"
    assert cmd[cmd.index("--gateway-url") + 1] == "http://gw:8080"
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["items"]["subPath"] == "prompts.jsonl" and mounts["output"]["subPath"] == "runs/1"
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "b-batch"
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [gb.PERMANENT_FAILURE_EXIT]
    assert job["metadata"]["labels"]["team"] == "art" and job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    role = gb.render_rbac(OWNER)[1]
    assert role["rules"] == [
        {
            "apiGroups": ["sd-operator.dev"],
            "resources": ["generationbatches/status"],
            "resourceNames": ["b"],
            "verbs": ["get", "patch"],
        }
    ]


def test_the_pod_template_does_not_change_with_the_mutable_fields() -> None:
    # A Job's pod template is immutable: concurrency and priority must reach the runner another way.
    a = gb.render_job(OWNER, batch_spec(concurrency=2, priority=1), "m", SETTINGS, "http://gw")
    b = gb.render_job(OWNER, batch_spec(concurrency=8, priority=9), "m", SETTINGS, "http://gw")
    assert a["spec"]["template"] == b["spec"]["template"]


def test_s3_output_takes_credentials_from_the_secret() -> None:
    spec = batch_spec(output={"s3": {"bucket": "out", "key": "p", "credentialsSecret": {"name": "creds"}}})
    env = gb.render_job(OWNER, spec, "m", SETTINGS, "http://gw")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "creds", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    assert gb.output_location(spec, "ns") == "s3://out/p"


def test_api_key_comes_from_the_secret_and_control_images_from_the_inputs_claim() -> None:
    spec = batch_spec(apiKeySecret={"name": "batch-key", "key": "token"}, inputs={"claimName": "data", "path": "poses"})
    container = gb.render_job(OWNER, spec, "m", SETTINGS, "http://gw")["spec"]["template"]["spec"]["containers"][0]
    cmd = container["command"]
    assert cmd[cmd.index("--api-key-env") + 1] == gb.API_KEY_ENV
    assert cmd[cmd.index("--inputs-dir") + 1] == gb.INPUTS_DIR
    key_env = next(e for e in container["env"] if e["name"] == gb.API_KEY_ENV)
    assert key_env == {"name": gb.API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "batch-key", "key": "token"}}}
    assert not any("batch-key" in arg or "token" in arg for arg in cmd)  # the key never on the command line
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["inputs"] == {"name": "inputs", "mountPath": gb.INPUTS_DIR, "readOnly": True, "subPath": "poses"}
    plain = gb.render_job(OWNER, batch_spec(), "m", SETTINGS, "http://gw")["spec"]["template"]["spec"]
    assert "--api-key-env" not in plain["containers"][0]["command"]
    assert "--inputs-dir" not in plain["containers"][0]["command"]
    assert "inputs" not in {v["name"] for v in plain["volumes"]}


def test_the_runner_logs_in_the_operators_format() -> None:
    for fmt in ("json", "plain"):
        settings = RenderSettings(operator_image="op:1", log_format=fmt)
        env = gb.render_job(OWNER, batch_spec(), "m", settings, "http://gw")["spec"]["template"]["spec"]["containers"][
            0
        ]
        assert {"name": "SD_LOG_FORMAT", "value": fmt} in env["env"]


def job(conditions: list[dict[str, str]] | None = None, **status: Any) -> dict[str, Any]:
    return {"spec": {"suspend": status.pop("suspend", False)}, "status": {"conditions": conditions or [], **status}}


def test_batch_phase_follows_the_job() -> None:
    assert derive_status(job(), {}, 1)["phase"] == "Pending"
    assert derive_status(job(active=1), {}, 1)["phase"] == "Pending"  # pod not ready yet
    assert derive_status(job(active=1, ready=1, startTime="t0"), {}, 1)["startTime"] == "t0"
    done = derive_status(job([{"type": "Complete", "status": "True"}], completionTime="t1"), {}, 1)
    assert done["phase"] == "Succeeded" and done["completionTime"] == "t1"
    failed = derive_status(
        job(
            [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "m",
                    "lastTransitionTime": "t2",
                }
            ]
        ),
        {},
        1,
    )
    assert failed["phase"] == "Failed" and "failed for good" in failed["message"] and failed["completionTime"] == "t2"
    assert derive_status(job(suspend=True), {}, 1)["phase"] == "Suspended"


def test_training_job_lints_fetches_and_trains_on_a_gpu() -> None:
    spec = LoRAJobSpec.model_validate(
        {
            "baseModel": {"family": "sdxl", "fromInstance": {"name": "xl"}},
            "dataset": {"source": {"pvc": {"claimName": "data", "path": "mystyle"}}, "triggerWord": "mystyle"},
            "output": {"name": "mystyle", "destination": {"pvc": {"claimName": "out", "path": "loras"}}},
            "gpu": {"memoryGiB": 12, "product": "NVIDIA-GeForce-RTX-3060"},
            "backoffLimit": 1,
            "activeDeadlineSeconds": 3600,
        }
    )
    model = ModelFile.model_validate(
        {"name": "xl.safetensors", "source": {"http": {"url": "https://h/xl.safetensors"}}}
    )
    owner = {**OWNER, "kind": "LoRAJob"}
    job_ = lj.render_train_job(owner, spec, model, SETTINGS)
    pod = job_["spec"]["template"]["spec"]
    lint, fetch = pod["initContainers"]
    assert lint["command"][lint["command"].index("--trigger-word") + 1] == "mystyle"
    assert fetch["command"][:2] == ["sd-operator", "fetch-model"]
    trainer = pod["containers"][0]
    assert trainer["command"][trainer["command"].index("--model-path") + 1].endswith("/Stable-diffusion/xl.safetensors")
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-3060"}
    assert job_["spec"]["backoffLimit"] == 1 and job_["spec"]["activeDeadlineSeconds"] == 3600
    rule = job_["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["onExitCodes"]["containerName"] == "dataset-lint"
    evaluation = lj.render_evaluation(
        owner,
        LoRAJobSpec.model_validate({**spec.to_api(), "evaluation": {"prompts": ["mystyle, a cat", "a dog"]}}),
        "xl",
    )
    sweep = evaluation["spec"]["sweep"]
    assert sweep["prompts"] == ["mystyle, a cat", "mystyle, a dog"] and sweep["loraWeights"] == [0.6, 0.8, 1.0]
    assert evaluation["spec"]["output"]["pvc"] == {"claimName": "out", "path": "loras/evaluation"}


def test_a_hugging_face_base_model_is_fetched_from_the_operators_mirror() -> None:
    spec = LoRAJobSpec.model_validate(
        {
            "baseModel": {"family": "sd15", "fromInstance": {"name": "base"}},
            "dataset": {"source": {"pvc": {"claimName": "data"}}, "triggerWord": "tw"},
            "output": {"name": "tw", "destination": {"pvc": {"claimName": "out"}}},
        }
    )
    hf = {"repo": "org/sd15", "file": "v1-5.safetensors", "tokenSecret": {"name": "hf", "key": "token"}}
    model = ModelFile.model_validate({"name": "v1-5.safetensors", "source": {"huggingFace": hf}})
    owner = {**OWNER, "kind": "LoRAJob"}
    mirrored = RenderSettings(operator_image="op:1", hf_endpoint="https://mirror.internal")
    configmap = lj.render_configmap(owner, spec.to_api(), model, mirrored)
    (entry,) = json.loads(configmap["data"]["models.json"])["files"]
    assert entry["url"] == "https://mirror.internal/org/sd15/resolve/main/v1-5.safetensors"
    assert entry["headers"]["Authorization"]["env"] == "SD_SECRET_0"
    fetch = lj.render_train_job(owner, spec, model, mirrored)["spec"]["template"]["spec"]["initContainers"][1]
    assert fetch["env"][0]["name"] == "SD_SECRET_0"  # the token the manifest names reaches the fetcher
    (default,) = json.loads(lj.render_configmap(owner, spec.to_api(), model, SETTINGS)["data"]["models.json"])["files"]
    assert default["url"] == "https://huggingface.co/org/sd15/resolve/main/v1-5.safetensors"
