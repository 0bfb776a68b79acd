"""Benchmark: the cold start of an autoscaled SDInstance on the local chain, PVC model cache vs ephemeral storage.

A temporary local cluster in runner mode (pods run as processes, tools/cluster/podrunner.py) with the real
operator and a gateway as the chart runs them (`--report-demand`). The stand-in model host serves every
checkpoint at `--size-mib` (its `--size-kib` flag: one size for all files; default 2 GiB, so the download
matters). Per storage mode (`storage.pvc` on a claim of the runner's default StorageClass, then
`storage.ephemeral`) one SDInstance with `autoscaling {minReplicas: 0, maxReplicas: 1, scaleDownDelaySeconds:
3}`, its checkpoint pinned by sha256, is left to reach zero; then, per round, one txt2img is sent through
the gateway (which holds it through the cold start) and three times are taken from the moment it is sent:

- to the scale decision: the SDInstance's status.desiredReplicas becomes 1;
- to Ready: status.ready becomes "1/1" (fetch-model done, WebUI up and its readiness probe passing);
- to the first image: the 200 answer.

Status is polled every 0.1 s, so the first two are late by up to one poll plus one GET. The fetch-model
init container's log (<cluster dir>/runner/logs/pods/<ns>_<pod>_<uid>/fetch-model.log) tells whether the
checkpoint was downloaded, reused from the cache (`already present`: its `.verified` sidecar matched), or
re-hashed; its termination message must list the pinned sha256. With the PVC, the file's inode and mtime
on the claim folder are recorded per round too. Between rounds the instance goes back to zero
(desiredReplicas 0 and no pod at all, terminating ones included) and the gateway lists it ScaledToZero.

Run inside the loopback-only network namespace (as `make bench` does), as root like `make e2e`:

    tools/netns.sh .venv/bin/python bench/cold_start.py [--rounds 3] [--size-mib 2048] [--json out.json]

SD_KEEP_CLUSTER_DIR=1 keeps the cluster's folder (pods', operator's and gateway's logs) afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools" / "cluster"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from common import dump_json, markdown_table  # noqa: E402
from e2e_support import Chain, claims, get, instance, start_gateway  # noqa: E402

import localcluster  # noqa: E402
from cluster_support import Cluster, Operator, start_operator, stop_operator  # noqa: E402
from helpers import wait_for  # noqa: E402
from processes import Proc  # noqa: E402

LOCAL_FLEET = ROOT / "tools/cluster/fleet-local.yaml"
NAMESPACE = "bench-cold-start"
CLAIM = "bench-model-cache"
HF_REPO = "e2e/models"  # e2e_support.instance's Hugging Face repo (the stand-in serves any)
CHECKPOINT_DIR = "Stable-diffusion"
POLL = 0.1
MODES = ("pvc", "ephemeral")


@dataclass
class Round:
    mode: str
    round: int
    to_scale_decision_s: float | None
    to_ready_s: float | None
    to_first_image_s: float | None
    status_code: int
    fetch: str  # downloaded | reused | re-hashed | unknown
    fetch_log: list[str]  # the fetch-model lines about the checkpoint
    termination_sha256: str | None  # what the termination message lists for the checkpoint
    pod: str
    cache_file: dict[str, int] | None  # PVC: inode and mtime_ns of the checkpoint on the claim


def install_crds(cluster: Cluster) -> None:
    """As tests/conftest.py's `crds` fixture: crds/ applied server-side, then Established."""
    kubectl = [str(ROOT / ".local/bin/kubectl"), f"--kubeconfig={cluster.kubeconfig}"]
    subprocess.run([*kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds")],
                   check=True, capture_output=True)  # fmt: skip
    ext = client.ApiextensionsV1Api(cluster.api)
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").glob("*.yaml")]

    def established() -> bool:
        conditions = [ext.read_custom_resource_definition(n).status.conditions or [] for n in names]
        return all(any(c.type == "Established" and c.status == "True" for c in cs) for cs in conditions)

    wait_for(established, timeout=30, what="the CRDs to be Established")


def create_namespace(cluster: Cluster, name: str) -> None:
    core = cluster.core
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    wait_for(has_default_sa, timeout=30, what=f"ServiceAccount default in {name}")


def stand_in(model_url: str, checkpoint: str) -> tuple[int, str]:
    """Size and sha256 (the ETag) of the stand-in's file. A HEAD makes the host build the file now, so the
    first measured download does not pay for generating it."""
    answer = requests.head(f"{model_url}/{HF_REPO}/resolve/main/{checkpoint}", timeout=600)
    answer.raise_for_status()
    return int(answer.headers["Content-Length"]), answer.headers["ETag"].strip('"')


def all_pods(cluster: Cluster, name: str) -> list[client.V1Pod]:
    """The instance's pods, terminating ones included."""
    return cluster.core.list_namespaced_pod(NAMESPACE, label_selector=f"sd-operator.dev/instance={name}").items


def status(chain: Chain, name: str) -> dict[str, Any]:
    return get(client.CustomObjectsApi(chain.cluster.api), NAMESPACE, "sdinstances", name).get("status") or {}


def listed(url: str, checkpoint: str) -> dict[str, Any] | None:
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    return next((m for m in models if m["filename"] == checkpoint), None)


def wait_at_zero(chain: Chain, name: str, checkpoint: str, timeout: float = 180) -> None:
    """desiredReplicas 0, Ready (ScaledToZero), no pod left at all, and the gateway lists it at zero."""

    def at_zero() -> bool:
        s = status(chain, name)
        ready: dict[str, Any] = next((c for c in s.get("conditions") or [] if c["type"] == "Ready"), {})
        return (
            s.get("desiredReplicas") == 0
            and ready.get("reason") == "ScaledToZero"
            and not all_pods(chain.cluster, name)
        )  # fmt: skip

    wait_for(at_zero, timeout=timeout, interval=0.5, what=f"{name} at zero with no pods")

    def gateway_at_zero() -> bool:
        m = listed(chain.gateway_url, checkpoint) or {}
        return m.get("state") == "ScaledToZero" and m.get("instances") == 0

    wait_for(gateway_at_zero, timeout=60, interval=0.2, what=f"the gateway to list {checkpoint} at zero")


def txt2img(url: str, checkpoint: str, tag: str) -> requests.Response:
    return requests.post(
        f"{url}/sdapi/v1/txt2img",
        json={
            "prompt": f"a lighthouse in fog, {tag}",  # unique per round: the gateway caches results
            "steps": 20,
            "width": 512,
            "height": 512,
            "seed": 1234,
            "override_settings": {"sd_model_checkpoint": checkpoint},
        },
        timeout=1200,
    )


def fetch_evidence(chain: Chain, pod: client.V1Pod, checkpoint: str) -> tuple[str, list[str], str | None]:
    """What fetch-model did with the checkpoint (from its log) and the sha256 its termination message lists."""
    logs = chain.runner_dir / "logs" / "pods" / f"{NAMESPACE}_{pod.metadata.name}_{pod.metadata.uid}"
    log = logs / "fetch-model.log"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if checkpoint in ln] if log.exists() else []
    if any(ln.startswith(f"fetched {CHECKPOINT_DIR}/{checkpoint}") for ln in lines):
        what = "downloaded"
    elif any("verifying it" in ln for ln in lines):
        what = "re-hashed"
    elif any(ln.startswith(f"already present {CHECKPOINT_DIR}/{checkpoint}") for ln in lines):
        what = "reused"
    else:
        what = "unknown"
    sha = None
    fresh = chain.cluster.core.read_namespaced_pod(pod.metadata.name, NAMESPACE)
    for st in fresh.status.init_container_statuses or []:
        if st.name == "fetch-model" and st.state.terminated and st.state.terminated.message:
            message = json.loads(st.state.terminated.message)
            sha = message.get("sha256", {}).get(f"{CHECKPOINT_DIR}/{checkpoint}")
    outcome = [ln for ln in lines if not ln.endswith(" MB/s")]  # without the progress lines
    return what, outcome, sha


def cache_file(chain: Chain, checkpoint: str) -> dict[str, int] | None:
    path = chain.claim_dir(NAMESPACE, CLAIM) / "models" / CHECKPOINT_DIR / checkpoint
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def one_round(chain: Chain, mode: str, n: int, name: str, checkpoint: str, run_id: str) -> Round:
    answer: dict[str, Any] = {}

    def send() -> None:
        try:
            answer["response"] = txt2img(chain.gateway_url, checkpoint, f"{run_id} {mode} {n}")
        finally:
            answer["at"] = time.monotonic()

    t0 = time.monotonic()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    decided = ready = None
    pod: client.V1Pod | None = None
    while True:
        s = status(chain, name)
        now = time.monotonic()
        if decided is None and (s.get("desiredReplicas") or 0) >= 1:
            decided = now - t0
        if ready is None and s.get("ready") == "1/1":
            ready = now - t0
        if pod is None:
            pods = all_pods(chain.cluster, name)
            pod = pods[0] if pods else None
        if not sender.is_alive() and ((decided is not None and ready is not None) or now - answer["at"] > 30):
            break
        if now - t0 > 1500:
            raise RuntimeError(f"{mode} round {n}: no answer after {now - t0:.0f}s; status {s}")
        time.sleep(POLL)
    sender.join()
    response: requests.Response | None = answer.get("response")
    if response is None:
        raise RuntimeError(f"{mode} round {n}: the request failed (see the gateway's log)")
    if pod is None:
        raise RuntimeError(f"{mode} round {n}: answered {response.status_code} but no pod was seen")
    what, lines, sha = fetch_evidence(chain, pod, checkpoint)
    return Round(
        mode=mode,
        round=n,
        to_scale_decision_s=decided,
        to_ready_s=ready,
        to_first_image_s=answer["at"] - t0 if response.status_code == 200 else None,
        status_code=response.status_code,
        fetch=what,
        fetch_log=lines,
        termination_sha256=sha,
        pod=pod.metadata.name,
        cache_file=cache_file(chain, checkpoint) if mode == "pvc" else None,
    )


def run_mode(chain: Chain, mode: str, rounds: int, checkpoint: str, sha: str, run_id: str) -> list[Round]:
    name = f"cold-{mode}"
    storage = {"pvc": {"claimName": CLAIM, "path": "models"}} if mode == "pvc" else {"ephemeral": {}}
    body = instance(name, checkpoint, sha, autoscaling={"minReplicas": 0, "maxReplicas": 1,
                    "scaleDownDelaySeconds": 3}, storage=storage)  # fmt: skip
    body["spec"].pop("replicas")
    custom = client.CustomObjectsApi(chain.cluster.api)
    custom.create_namespaced_custom_object("sd-operator.dev", "v1alpha1", NAMESPACE, "sdinstances", body)
    out = []
    for n in range(1, rounds + 1):
        wait_at_zero(chain, name, checkpoint)
        r = one_round(chain, mode, n, name, checkpoint, run_id)
        print(
            f"  {mode} round {n}: decision {fmt(r.to_scale_decision_s)} s, Ready {fmt(r.to_ready_s)} s, "
            f"image {fmt(r.to_first_image_s)} s (HTTP {r.status_code}), fetch {r.fetch}",
            flush=True,
        )
        if r.termination_sha256 != sha:
            print(f"  !! fetch-model's termination message lists sha256 {r.termination_sha256}, pinned {sha}")
        out.append(r)
    wait_at_zero(chain, name, checkpoint)
    custom.delete_namespaced_custom_object("sd-operator.dev", "v1alpha1", NAMESPACE, "sdinstances", name)
    return out


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def report(rounds: list[Round], size: int, sha: dict[str, str]) -> dict[str, Any]:
    rows = [
        [r.mode, r.round, fmt(r.to_scale_decision_s), fmt(r.to_ready_s), fmt(r.to_first_image_s), r.fetch]
        for r in rounds
    ]
    print()
    print(f"checkpoint: {size} bytes ({size / 2**30:.2f} GiB), one per mode, pinned by sha256")
    print(markdown_table(["mode", "round", "to-scale-decision s", "to-Ready s", "to-first-image s", "fetch"], rows))
    medians = {m: median([r.to_first_image_s for r in rounds if r.mode == m]) for m in MODES}
    ratio = medians["pvc"] / medians["ephemeral"] if medians["pvc"] and medians["ephemeral"] else None
    print()
    print(f"median time to first image: pvc {fmt(medians['pvc'])} s, ephemeral {fmt(medians['ephemeral'])} s; "
          f"pvc / ephemeral = {'-' if ratio is None else f'{ratio:.2f}'}")  # fmt: skip
    warm = median([r.to_first_image_s for r in rounds if r.mode == "pvc" and r.round > 1])
    if warm is not None and medians["ephemeral"]:
        print(f"pvc rounds after the first (cache warm): median {warm:.1f} s = "
              f"{warm / medians['ephemeral']:.2f} x ephemeral")  # fmt: skip
    pvc = [r for r in rounds if r.mode == "pvc"]
    surprises = [f"pvc round {r.round}: fetch {r.fetch}" for r in pvc if r.round > 1 and r.fetch != "reused"]
    surprises += [f"{r.mode} round {r.round}: fetch {r.fetch}" for r in rounds
                  if r.mode == "ephemeral" and r.fetch != "downloaded"]  # fmt: skip
    surprises += [f"{r.mode} round {r.round}: termination message sha256 {r.termination_sha256}" for r in rounds
                  if r.termination_sha256 != sha[r.mode]]  # fmt: skip
    surprises += [f"{r.mode} round {r.round}: HTTP {r.status_code}" for r in rounds if r.status_code != 200]
    files = [r.cache_file for r in pvc if r.cache_file]
    if files and any((f["inode"], f["mtime_ns"]) != (files[0]["inode"], files[0]["mtime_ns"]) for f in files):
        surprises.append(f"pvc: the cached file changed between rounds: {files}")
    elif files:
        print(f"pvc cache file: same inode {files[0]['inode']} and mtime in all {len(files)} rounds")
    print("surprises: " + ("; ".join(surprises) if surprises else "none"))
    return {
        "checkpoint_bytes": size,
        "sha256": sha,
        "rounds": [asdict(r) for r in rounds],
        "median_to_first_image_s": medians,
        "pvc_over_ephemeral_median_to_first_image": ratio,
        "pvc_warm_median_to_first_image_s": warm,
        "surprises": surprises,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="cold starts per storage mode")
    p.add_argument("--size-mib", type=int, default=2048, help="size of the stand-in checkpoints (MiB of tensor data)")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.size_mib < 1:
        p.error("--rounds and --size-mib must be at least 1")
    if not localcluster.loopback_only():
        p.error("the local chain runs inside a loopback-only network namespace: tools/netns.sh " + " ".join(sys.argv))
    run_id = uuid.uuid4().hex[:8]
    extra = {"modelserver": [f"--size-kib={args.size_mib * 1024}"]}
    started = time.monotonic()
    with localcluster.temporary_cluster(fleet_file=LOCAL_FLEET, runner=True, extra_args=extra) as local:
        print(f"cluster up in {time.monotonic() - started:.1f}s ({local.cfg.workdir})", flush=True)
        api = config.new_client_from_config(config_file=str(local.cfg.kubeconfig))
        cluster = Cluster(local.cfg.kubeconfig, api, local)
        logs = local.cfg.workdir / "bench"
        logs.mkdir()
        gateway: Proc | None = None
        operator: Operator | None = None
        try:
            install_crds(cluster)
            gateway = start_gateway(cluster, logs / "gateway.log", "--gateway-id=bench-cold-start")
            env = {
                "SD_HF_ENDPOINT": local.cfg.model_url,
                "SD_GATEWAY_URL": gateway.url,
                "SD_OPERATOR_IMAGE": "ghcr.io/sd-operator/sd-operator:bench",
            }
            operator = start_operator(cluster, logs / "operator.log", env=env)
            chain = Chain(cluster, True, gateway.url, operator)
            create_namespace(cluster, NAMESPACE)
            claims(chain, NAMESPACE, [CLAIM])
            checkpoints = {m: f"bench-cold-{m}-{run_id}.safetensors" for m in MODES}
            sizes, shas = {}, {}
            for mode, ckpt in checkpoints.items():
                t = time.monotonic()
                sizes[mode], shas[mode] = stand_in(local.cfg.model_url, ckpt)
                print(f"stand-in {ckpt}: {sizes[mode]} bytes, built in {time.monotonic() - t:.1f}s", flush=True)
            rounds: list[Round] = []
            for mode in MODES:
                rounds += run_mode(chain, mode, args.rounds, checkpoints[mode], shas[mode], run_id)
            result = report(rounds, sizes["pvc"], shas)
            result["args"] = {"rounds": args.rounds, "size_mib": args.size_mib}
            if args.json:
                args.json.write_text(dump_json(result) + "\n")
        finally:
            if operator is not None:
                stop_operator(operator)
            if gateway is not None:
                gateway.stop()
            api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
